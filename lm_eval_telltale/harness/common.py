"""What every telltale lm-eval model type shares, whatever engine generates: the telltale
model_args and their validation, the plan that joins each generated answer to lm-eval's
documents, the sidecar row of an answer, the ``config.telltale`` block of the results JSON, and
LRS's selection among N candidates. Nothing here imports an engine (vLLM or transformers): the
``vllm-*`` types (:mod:`lm_eval_telltale.harness.models`, :mod:`lm_eval_telltale.harness.lrs`) and
the ``hf-*`` types (:mod:`lm_eval_telltale.harness.hf`) both build on it.

The protocol between this shared part and an engine's model type is written out in
:class:`TelltaleLM` ("the engine's side"): ``ENGINE`` (the model-type prefix), ``_tt_encode``,
``_tt_until`` and ``_tt_unit``, one signature each, implemented by ``harness/models.py`` (vLLM) and
``harness/hf.py`` (transformers); answers come back as vLLM-shaped outputs (``output.outputs[0]``
with ``text``, ``token_ids``, ``finish_reason``).
"""

from __future__ import annotations

import copy
import datetime as _dt
import itertools
import json
import logging
import os
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import cmdline
from ..config import PRESET_PASSTHROUGH, ConfigError, TelltaleConfig, all_keys, load_preset, resolve
from ..core.lrs import SCORES, STOP_THRESHOLD_KEY, STOP_TOKEN_KEY, THINK_END_KEY, argmax_pick, online_threshold, pick_all, score
from ..sidecar import RunSummary, SidecarWriter, unwritable_sidecar
from ..spec import parse_bool
from .taskscore import scorer_for, task_generation_kwargs

logger = logging.getLogger("lm_eval_telltale")


def unknown_model_arg(model_type: str, method: str, key: str, engine: str) -> ConfigError:
    """The one error for a model_arg that no layer takes (the same words for every engine):
    ``engine`` says what else it could have been."""
    return ConfigError(key, f"unknown model_arg for {model_type} (not a telltale key {sorted(all_keys(method))}, "
                            f"nor {engine})")


def default_stats_path(pretrained: str, method: str, output_path: str | None) -> Path | None:
    """Next to lm-eval's own files: ``<output_path>/<model_name_sanitized>/telltale_<method>_<time>.jsonl``
    (lm-eval's layout for a directory ``--output_path``; its parent for a ``.json`` path)."""
    if not output_path:
        return None
    from lm_eval.utils import sanitize_model_name

    stamp = _dt.datetime.now().isoformat().replace(":", "-")
    out = Path(output_path).expanduser()
    if out.suffix == ".json":
        return out.parent / f"telltale_{method}_{stamp}.jsonl"
    return out / sanitize_model_name(pretrained) / f"telltale_{method}_{stamp}.jsonl"


@dataclass
class Answer:
    """One answer lm-eval asked for, as the sidecar joins it: the Instance, its repeat, the doc id
    lm-eval writes in its samples file, lm-eval's ``doc_hash`` of the document and the stop
    sequences lm-eval post-processes the text with."""

    inst: Any
    repeat: int
    doc_id: Any
    doc_hash: str
    until: list[str]


class Plan:
    """The Instances of one ``generate_until`` call by prompt tokens, in request order, made before
    any generation: each generated request takes its Answer by its prompt (identical prompts — the
    repeats of one document — are taken in order, as lm-eval's stable sort keeps them)."""

    def __init__(self, lm: "TelltaleLM", requests):
        from lm_eval.utils import handle_non_serializable, hash_string

        wanted = cmdline.samples() or {}
        self.by_prompt: dict[tuple, deque[Answer]] = defaultdict(deque)
        repeats: dict[tuple, int] = defaultdict(int)
        encodings = lm._tt_encode([inst.args[0] for inst in requests]) if requests else []
        for inst, toks in zip(requests, encodings):
            key = (inst.task_name, inst.doc_id)
            rep = repeats[key]
            repeats[key] += 1
            # lm-eval renumbers the docs selected by --samples 0..k-1 and writes indices[doc_id]
            idx = wanted.get(inst.task_name)
            doc_id = idx[inst.doc_id] if isinstance(idx, list) and isinstance(inst.doc_id, int) \
                and 0 <= inst.doc_id < len(idx) else inst.doc_id
            gk = copy.deepcopy(inst.args[1]) if len(inst.args) > 1 and isinstance(inst.args[1], dict) else {}
            until = lm._tt_until(gk)
            doc_hash = hash_string(json.dumps(inst.doc, indent=2, default=handle_non_serializable, ensure_ascii=False))
            self.by_prompt[tuple(toks)].append(Answer(inst, rep, doc_id, doc_hash, list(until)))

    def take(self, prompt) -> Answer | None:
        key = tuple(prompt)
        q = self.by_prompt.get(key)
        if not q:  # lm-eval truncated the prompt to fit max_model_len: a suffix (or prefix) of a planned one
            n = len(key)
            q = next((v for k, v in self.by_prompt.items() if v and len(k) > n and (k[-n:] == key or k[:n] == key)),
                     None)
        return q.popleft() if q else None


@dataclass
class Unit:
    """One answer in generation: its tagged requests (one, or LRS's N candidates) and results."""

    prompt: list[int]
    answer: Answer | None
    tags: list[str]
    params: list
    outputs: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, dict | None] = field(default_factory=dict)
    chosen: Any = None
    #: online LRS: the prompt's threshold, set when its warm-up candidates were finished
    threshold: float | None = None

    @property
    def complete(self) -> bool:
        return len(self.outputs) == len(self.tags)


class TelltaleLM:
    """The engine-independent part of a telltale model type (a mixin before the engine's lm-eval
    class): settings, sidecar rows, run summary, results-JSON block."""

    METHOD = "norms"
    #: the model-type prefix: ``vllm-alrr``, ``hf-alrr``
    ENGINE = "vllm"

    @classmethod
    def _tt_model_type(cls) -> str:
        return f"{cls.ENGINE}-{cls.METHOD}"

    # -- settings (before any engine) -------------------------------------------------------------
    def _tt_take_args(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Take the telltale keys out of ``kwargs`` (they would otherwise reach the engine) and load
        the preset (``config=``); the preset's engine-level keys fill ``kwargs`` where unset."""
        tt_args = {k: kwargs.pop(k) for k in list(kwargs) if k in all_keys(self.METHOD)}
        preset = load_preset(str(tt_args.pop("config"))) if tt_args.get("config") is not None else None
        tt_args.pop("config", None)
        if preset:
            for k in PRESET_PASSTHROUGH:
                if k in preset and kwargs.get(k) is None:
                    kwargs[k] = preset[k]
        return tt_args, preset

    def _tt_resolve(self, pretrained: str, kwargs: dict[str, Any], tt_args: dict[str, Any],
                    preset: dict[str, Any] | None, seed: int) -> tuple[TelltaleConfig, str]:
        """The model's architecture and layer count from its config, then the validated settings."""
        from ..vllm import inspect_model  # reads config.json only; imports nothing of vLLM

        arch, n_layers = inspect_model(pretrained, kwargs.get("revision"), bool(kwargs.get("trust_remote_code")))
        cfg = resolve(self.METHOD, tt_args, n_layers, seed=seed, preset=preset, model_type=self._tt_model_type())
        self._tt_preset = preset
        return cfg, arch

    def _tt_set_stats_path(self, cfg: TelltaleConfig, pretrained: str) -> None:
        """The sidecar's path (``stats_path=``, else next to lm-eval's files), checked before any
        engine starts: a new file in a writable directory (:func:`~lm_eval_telltale.sidecar.unwritable_sidecar`).
        Data-parallel ranks other than 0 of the ``hf-*`` types share rank 0's file."""
        key = "stats_path" if cfg.stats_path else "--output_path"
        stats_path = cfg.stats_path or default_stats_path(pretrained, self.METHOD, cmdline.output_path())
        cfg.stats_path = str(Path(stats_path).expanduser().resolve()) if stats_path else None
        if cfg.stats_path and int(os.environ.get("RANK", "0") or 0) == 0:
            why = unwritable_sidecar(cfg.stats_path)
            if why:
                raise ConfigError(key, why)

    def _tt_init_state(self, cfg: TelltaleConfig, arch: str) -> None:
        self.tt_cfg: TelltaleConfig = cfg
        self._tt_arch = arch
        self._tt_counter = itertools.count()
        self._tt_plan: Plan | None = None
        self._tt_quiet = False
        self._tt_seen: dict = {}
        self._tt_writer = SidecarWriter(cfg.stats_path) if cfg.stats_path else None
        self._tt_summary = RunSummary(cfg)

    def _tt_occurrence(self, key) -> int:
        """The occurrence of ``key`` (a prompt's tokens) in this ``generate_until`` call, counted over
        the whole call: lm-eval splits it into several ``_model_generate`` calls with a numeric
        ``--batch_size``, and the repeats of a document in different chunks must not get the same
        identity (nor, in LRS, the same candidate seeds)."""
        k = self._tt_seen[key] = self._tt_seen.get(key, -1) + 1
        return k

    # -- the engine's side: what each engine's model type implements, one signature each ----------
    def _tt_encode(self, strings: list[str]) -> list[list[int]]:
        """The prompt tokens of ``strings`` exactly as this engine's ``generate_until`` sends them
        (the plan joins each generated answer to its Instance by them)."""
        raise NotImplementedError

    def _tt_until(self, gen_kwargs: dict) -> list[str]:
        """The stop sequences lm-eval post-processes this engine's text with (its own rule)."""
        raise NotImplementedError

    def _tt_unit(self, prompt: list[int], params: Any, answer: Answer | None) -> Unit:
        """One answer lm-eval asked for, as this engine's tagged requests: one, or LRS's N
        candidates (each engine's LRS type overrides it). ``params``: the engine's decoding
        settings of the answer (vLLM's ``SamplingParams``; the hf loop's ``Sampling``: sampling,
        budget and stop sequences). Occurrences of a prompt are counted with
        :meth:`_tt_occurrence`, over the whole ``generate_until`` call."""
        raise NotImplementedError

    def _tt_first(self, u: Unit) -> list[tuple[str, Any]]:
        """The (tag, params) of ``u`` to send at once: all of them (online LRS: its warm-up candidates)."""
        return list(zip(u.tags, u.params))

    def _tt_later(self, u: Unit) -> list[tuple[str, Any]]:
        """The (tag, params) of ``u`` that become ready once the requests sent so far are finished
        (online LRS's later candidates, with the prompt's threshold); [] when there are none (left)."""
        return []

    # -- answers ------------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False):
        """The engine's own ``generate_until``, with the call's plan laid out first (every answer
        can be written the moment it is finished) and the sidecar fsync'ed at the end."""
        self._tt_plan = Plan(self, requests)
        self._tt_quiet = disable_tqdm
        self._tt_seen = {}  # occurrences of each prompt in this call: the requests' identities
        try:
            return super().generate_until(requests, disable_tqdm)
        finally:
            self._tt_plan = None
            if self._tt_writer is not None:
                self._tt_writer.sync()

    def _tt_emit(self, rows: list[dict[str, Any]]) -> None:
        """Finished answers' rows: into the run summary and appended to the sidecar at once."""
        for row in rows:
            self._tt_summary.add(row)
        if self._tt_writer is not None:
            self._tt_writer.write(rows)

    def _tt_answer(self, u: Unit) -> dict[str, Any] | None:
        """The unit is finished: choose what lm-eval gets (``u.chosen``) and build its row."""
        tag = u.tags[0]
        u.chosen = u.outputs[tag]
        if u.answer is None:
            logger.warning("telltale: an answer could not be joined to lm-eval's documents (its prompt matches "
                           "no planned request); its statistics are not written")
            return None
        return self._tt_row(u.answer, tag, u.prompt, u.chosen, u.stats[tag] or {})

    def _tt_row(self, ans: Answer, tag: str, prompt: list[int], output, stats: dict) -> dict[str, Any]:
        out = output.outputs[0]
        row = {
            "task": ans.inst.task_name, "doc_id": ans.doc_id, "doc_hash": ans.doc_hash, "repeat": ans.repeat,
            "method": self.METHOD, "tag": tag, "n_prompt_tokens": len(prompt), "n_generated_tokens": len(out.token_ids),
            "finish_reason": out.finish_reason, "response": self._tt_response(ans, out.text), "raw_output": out.text,
            "n_decode_tokens": stats.get("n_decode_tokens", 0), "layers": stats.get("layers", {}),
        }
        if "tokens" in stats:
            row["tokens"] = stats["tokens"]
            row["token_ids"] = list(out.token_ids)
        return row

    def _tt_think_end(self) -> str | None:
        """The end-of-thinking marker as it appears in an answer's text (``think_end_token``)."""
        return getattr(self, "think_end_token", None)

    def _tt_response(self, ans: Answer, text: str) -> str:
        """What lm-eval scores: its own post-processing with the same stop sequences."""
        from lm_eval.models.utils import postprocess_generated_text

        return postprocess_generated_text(text, ans.until, self._tt_think_end())

    # -- results JSON ---------------------------------------------------------------------------------
    def get_model_info(self) -> dict:
        base = super().get_model_info() if hasattr(super(), "get_model_info") else {}
        info = {
            "method": self.METHOD,
            "model_type": self._tt_model_type(),
            "architecture": self._tt_arch,
            "config": self.tt_cfg.to_dict(),
            "preset": self._tt_preset.get("_path") if self._tt_preset else None,
            "stats_path": self.tt_cfg.stats_path,
            "summary": self._tt_summary.to_dict(),
        }
        return {**base, "telltale": info}


# -- LRS: N candidates per answer, the returned one and every selector's pick ----------------------

def greedy(gen_kwargs: dict) -> bool:
    """Whether lm-eval's vLLM backend would decode these generation kwargs greedily (its rule:
    temperature 0, or do_sample=False without a temperature)."""
    t = gen_kwargs.get("temperature")
    if t is not None:
        try:
            return float(t) < 1e-5
        except (TypeError, ValueError):
            return False
    return parse_bool(gen_kwargs.get("do_sample")) is False


class LrsSelection:
    """The engine-independent part of the LRS model types (a mixin before the engine's telltale
    type): the greedy-decoding check, each candidate's record, the returned pick and every
    selector's (docs/methods.md §4), and the selectors' accuracies in the results JSON. The engine
    type makes the N candidates of a unit (``_tt_unit``) and sets their sampling."""

    def __init__(self, pretrained: str, **kwargs: Any):
        super().__init__(pretrained, **kwargs)
        self._tt_selector_acc: dict[str, list[float]] = {}

    def _tt_greedy_error(self, n: int) -> ConfigError:
        return ConfigError(
            "n_candidates",
            f"{self._tt_model_type()} samples {n} candidates per prompt, but the task asks for greedy decoding "
            "(identical candidates). Pass e.g. --gen_kwargs temperature=0.6,top_p=0.95,do_sample=True, or a preset "
            "with a sampling section (config=qwen3-8b), or n_candidates=1.")

    def _tt_check_sampling_early(self, cfg) -> None:
        """The lm_eval command line names the tasks and --gen_kwargs before any engine starts: when
        every task would decode greedily and no preset supplies sampling, fail now, not after the
        engine was built. (Under the Python API this cannot be known yet; the check at generation
        time stays.)"""
        n = cfg.params["n_candidates"]
        if n <= 1 or (getattr(self, "_tt_preset", None) or {}).get("sampling"):
            return
        cli = cmdline.gen_kwargs()
        if "temperature" in cli or "do_sample" in cli:
            if greedy(cli):
                raise self._tt_greedy_error(n)
            return
        names = cmdline.tasks()
        per_task = task_generation_kwargs(names) if names else None
        if per_task and all(greedy(gk) for gk in per_task):
            raise self._tt_greedy_error(n)

    # -- online LRS: warm-up candidates first, the later ones with the prompt's threshold ------------
    def _tt_warmups(self, u: Unit) -> int:
        """How many of ``u``'s candidates are sent first and always run to the end (all of them
        for full LRS)."""
        p = self.tt_cfg.params
        return len(u.tags) if p["stop_signal"] == "none" else min(p["warmup_candidates"], len(u.tags))

    def _tt_first(self, u: Unit) -> list[tuple[str, Any]]:
        first = list(zip(u.tags, u.params))[: self._tt_warmups(u)]
        extra = self._tt_online_extra()
        return [(tag, self._tt_with_extra(q, extra)) for tag, q in first] if extra else first

    def _tt_later(self, u: Unit) -> list[tuple[str, Any]]:
        w = self._tt_warmups(u)
        if w >= len(u.tags) or u.threshold is not None or any(t not in u.outputs for t in u.tags[:w]):
            return []
        p = self.tt_cfg.params
        u.threshold = online_threshold([(u.stats[t] or {}).get("online_score") for t in u.tags[:w]],
                                       p["stop_percentile"])
        extra = {**self._tt_online_extra(), STOP_THRESHOLD_KEY: u.threshold, STOP_TOKEN_KEY: int(self._tt_stop_token())}
        return [(tag, self._tt_with_extra(q, extra)) for tag, q in zip(u.tags[w:], u.params[w:])]

    def _tt_online_extra(self) -> dict:
        """What every candidate of online LRS carries: the end-of-thinking token's id, so that its
        windows count thinking tokens only (docs/methods.md §4); nothing when the marker is not one
        token (then every generated token counts, as for a model without a thinking block)."""
        if self.tt_cfg.params["stop_signal"] == "none":
            return {}
        cached = getattr(self, "_tt_online_extra_cache", None)
        if cached is None:
            end = self._tt_think_end()
            ids = self.tokenizer.encode(end, add_special_tokens=False) if end else []
            if end and len(ids) != 1:
                logger.warning("telltale: think_end_token %r is %d tokens, not one: online LRS counts every "
                               "generated token in its windows, the answer's too", end, len(ids))
            cached = self._tt_online_extra_cache = {THINK_END_KEY: int(ids[0])} if len(ids) == 1 else {}
        return cached

    def _tt_stop_token(self) -> int:
        """The token a stopped candidate is ended with (the tokenizer's end of text, which the
        engine stops on)."""
        return int(self.eot_token_id)

    def _tt_with_extra(self, params: Any, extra: dict) -> Any:
        """A copy of a candidate's engine parameters with ``extra`` added to its extra arguments."""
        raise NotImplementedError

    def _tt_candidate(self, tag: str, output, stats: dict | None, warmup: bool) -> dict[str, Any]:
        out = output.outputs[0]
        stats = stats or {}
        think_end = self._tt_think_end()
        complete = (think_end in out.text) if think_end else out.finish_reason == "stop"
        layers = stats.get("layers", {})
        cand = {
            "tag": tag, "text": out.text, "n_tokens": len(out.token_ids), "finish_reason": out.finish_reason,
            "complete": bool(complete), "truncated_thinking": bool(think_end) and not complete,
            "layers": layers, "conf": stats.get("conf"), "conf_mean": stats.get("conf_mean"),
            "scores": {**{name: score(layers, name) for name in SCORES}, "conf": stats.get("conf")},
        }
        if self.tt_cfg.params["stop_signal"] != "none":
            cand.update({"warmup": warmup, "stopped": stats.get("stopped_at") is not None,
                         "stopped_at": stats.get("stopped_at"), "online_score": stats.get("online_score")})
        return cand

    def _tt_answer(self, u: Unit) -> dict[str, Any] | None:
        p = self.tt_cfg.params
        w = self._tt_warmups(u)
        cands = [self._tt_candidate(tag, u.outputs[tag], u.stats[tag], k < w) for k, tag in enumerate(u.tags)]
        # online LRS: a stopped candidate's partial answer is never selected (warm-ups are never stopped)
        alive = [k for k, c in enumerate(cands) if not c.get("stopped")]
        idx = alive[argmax_pick([score(cands[k]["layers"], p["lrs_score"]) for k in alive],
                                [cands[k]["complete"] for k in alive], p["prefer_complete"])]
        tag = u.tags[idx]
        u.chosen = u.outputs[tag]
        if u.answer is None:
            logger.warning("telltale: an answer could not be joined to lm-eval's documents; not written")
            return None
        ans = u.answer
        row = self._tt_row(ans, tag, u.prompt, u.chosen, u.stats[tag] or {})
        inst = ans.inst
        scorer = scorer_for(inst.task_name)
        for c in cands:
            c["response"] = self._tt_response(ans, c["text"])
            c["answer"] = scorer.answer(inst.doc, c["response"]) if scorer else None
            c["correct"] = scorer.correct(inst.doc, c["response"]) if scorer else None
            c["layers"] = c.pop("layers")  # keep the big per-layer block last
        among = pick_all([cands[k] for k in alive], p["prefer_complete"],
                         (self.tt_cfg.seed, inst.task_name, ans.doc_id, ans.repeat))
        picks = {sel: alive[i] for sel, i in among.items()}
        assert picks[p["lrs_score"]] == idx, "selector mismatch between generation and report"
        row.update({"n_candidates": len(cands), "candidates": cands, "picks": picks, "chosen": p["lrs_score"],
                    "chosen_index": idx, "scorer": "task" if scorer else None,
                    "candidate_tokens": sum(c["n_tokens"] for c in cands)})
        if p["stop_signal"] != "none":
            row["online"] = {"signal": p["stop_signal"], "warmup": w, "threshold": u.threshold,
                             "stopped": len(cands) - len(alive)}
        for sel, i in picks.items():
            v = cands[i]["correct"]
            if v is not None:
                acc = self._tt_selector_acc.setdefault(sel, [0.0, 0])
                acc[0] += v
                acc[1] += 1
        return row

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info["telltale"]["summary"]["lrs_selectors"] = {
            sel: {"accuracy": s / n, "n": n} for sel, (s, n) in self._tt_selector_acc.items() if n
        }
        return info


def define_model_type(base: type, method: str, name: str, doc: str) -> type:
    """The lm-eval model type ``<engine>-<method>`` over ``base``: a class named ``name`` in
    ``base``'s module. It registers nothing itself: the one registry is
    :data:`lm_eval_telltale.spec.MODEL_TYPES` (lazy ``"module:Class"`` names, registered by the
    start-up hook; pyproject's entry points list the same pairs, tested)."""
    return type(name, (base,), {"METHOD": method, "__doc__": doc, "__module__": base.__module__, "__qualname__": name})
