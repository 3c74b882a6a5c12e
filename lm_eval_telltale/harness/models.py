"""lm-eval model types over stock vLLM: ``vllm-norms`` (observe) and the method types built on it.

Like lm-eval's ``steered`` model, each type is the stock backend plus a small surface:

- ``__init__`` takes the telltale model_args out of the arguments (they would otherwise reach
  ``LLM(...)`` and be rejected), validates them against the model's config — before any engine is
  built — and adds the engine arguments from :func:`lm_eval_telltale.vllm.engine_kwargs`;
- ``generate_until`` first lays out a plan: every lm-eval Instance by its prompt tokens, with its
  repeat, the doc id lm-eval writes (the true one under ``--samples``), its ``doc_hash`` and its
  stop sequences — so each answer can be written the moment it is finished;
- ``_model_generate`` tags every request, queues them (``LLM.enqueue``) and steps the engine
  itself (``LLMEngine.step``); finished answers are collected from the worker in small batches
  (at most every ``FLUSH_S`` seconds) and appended to the JSONL sidecar at once, so a crash or
  Ctrl-C loses no finished answer (:mod:`lm_eval_telltale.sidecar`);
- ``get_model_info`` puts the resolved config and a run summary into lm-eval's results JSON.

One *unit* is one answer lm-eval asked for: one tagged vLLM request here, N candidates for
``vllm-lrs`` (:mod:`lm_eval_telltale.harness.lrs`).
"""

from __future__ import annotations

import copy
import datetime as _dt
import itertools
import json
import logging
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.vllm_causallms import VLLM

from ..config import PRESET_PASSTHROUGH, ConfigError, TelltaleConfig, all_keys, load_preset, resolve
from ..core.rng import seed_from
from ..sidecar import RunSummary, SidecarWriter
from ..vllm import engine_kwargs, inspect_model, modifies_kv
from ..vllm.runtime import TAG_KEY
from . import argv

logger = logging.getLogger("lm_eval_telltale")

#: finished answers are collected from the worker and written at most this often (seconds; the
#: interval grows when a collection takes long, so that it stays a small share of the run)
FLUSH_S = 0.5


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

    def __init__(self, lm: "TelltaleVLLM", requests):
        from lm_eval.utils import handle_non_serializable, hash_string

        wanted = argv.samples() or {}
        eos = lm._tt_eos()
        self.by_prompt: dict[tuple, deque[Answer]] = defaultdict(deque)
        repeats: dict[tuple, int] = defaultdict(int)
        encodings = lm.tok_encode([inst.args[0] for inst in requests]) if requests else []
        for inst, toks in zip(requests, encodings):
            key = (inst.task_name, inst.doc_id)
            rep = repeats[key]
            repeats[key] += 1
            # lm-eval renumbers the docs selected by --samples 0..k-1 and writes indices[doc_id]
            idx = wanted.get(inst.task_name)
            doc_id = idx[inst.doc_id] if isinstance(idx, list) and isinstance(inst.doc_id, int) \
                and 0 <= inst.doc_id < len(idx) else inst.doc_id
            gk = copy.deepcopy(inst.args[1]) if len(inst.args) > 1 and isinstance(inst.args[1], dict) else {}
            _, until, _ = lm.modify_gen_kwargs(gk, eos=eos, default_max_gen_toks=lm.max_gen_toks)
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

    @property
    def complete(self) -> bool:
        return len(self.outputs) == len(self.tags)


class TelltaleVLLM(VLLM):
    METHOD = "norms"

    def __init__(self, pretrained: str, **kwargs: Any):
        tt_args = {k: kwargs.pop(k) for k in list(kwargs) if k in all_keys(self.METHOD)}
        preset = load_preset(str(tt_args.pop("config"))) if tt_args.get("config") is not None else None
        tt_args.pop("config", None)
        if preset:
            for k in PRESET_PASSTHROUGH:
                if k in preset and kwargs.get(k) is None:
                    kwargs[k] = preset[k]
        self._tt_check_engine_args(kwargs)
        self._tt_check_unknown(kwargs)
        arch, n_layers = inspect_model(pretrained, kwargs.get("revision"), bool(kwargs.get("trust_remote_code")))
        if preset and preset.get("num_layers") not in (None, n_layers):
            raise ConfigError("config", f"preset {preset['_path']} is for a {preset['num_layers']}-layer model, "
                                        f"{pretrained!r} has {n_layers}")
        seed = int(kwargs.get("seed", 1234) or 0)
        cfg = resolve(self.METHOD, tt_args, n_layers, seed=seed, preset=preset)
        self._tt_preset = preset
        self._tt_configure(cfg, kwargs)
        stats_path = cfg.stats_path or default_stats_path(pretrained, self.METHOD, argv.output_path())
        cfg.stats_path = str(Path(stats_path).expanduser().resolve()) if stats_path else None
        user_ov = kwargs.pop("hf_overrides", None)
        if isinstance(user_ov, str):
            try:
                user_ov = json.loads(user_ov)
            except json.JSONDecodeError:
                raise ConfigError("hf_overrides", f"not JSON: {user_ov!r}") from None
        cc = kwargs.pop("compilation_config", None)
        if isinstance(cc, str):
            try:
                cc = json.loads(cc)
            except json.JSONDecodeError:
                raise ConfigError("compilation_config", f"not JSON: {cc!r}") from None
        if isinstance(cc, int):
            cc = {"mode": cc}
        # every request gets its own cache_salt (_tt_run): prefix caching is safe for every method
        ek = engine_kwargs(cfg, arch, user_ov, compilation=cc, salted_requests=True)
        for k, v in ek.items():
            if k in ("async_scheduling", "enable_prefix_caching") and kwargs.get(k) is not None:
                continue  # the user's explicit choice wins (the worker warns about async scheduling)
            kwargs[k] = v
        if kwargs.get("batch_size", 1) in (1, "1"):
            logger.warning("telltale: batch_size=1 sends requests to vLLM one at a time; use --batch_size auto")
        self.tt_cfg: TelltaleConfig = cfg
        self._tt_arch = arch
        self._tt_counter = itertools.count()
        self._tt_plan: Plan | None = None
        self._tt_modifies = modifies_kv(cfg)
        self._tt_quiet = False
        self._tt_writer = SidecarWriter(cfg.stats_path) if cfg.stats_path else None
        self._tt_summary = RunSummary(cfg)
        super().__init__(pretrained=pretrained, **kwargs)
        if self.data_parallel_size > 1:
            logger.warning("telltale: data_parallel_size>1 — the method runs in every replica, but per-sample "
                           "statistics cannot be collected from ray replicas; the sidecar stays empty")
        if self._tt_writer is None:
            logger.warning("telltale: no --output_path and no stats_path=: per-sample statistics are not written")

    # -- hooks for subclasses -------------------------------------------------------------------
    def _tt_configure(self, cfg: TelltaleConfig, kwargs: dict[str, Any]) -> None:
        """Method types adjust engine arguments here (called before the engine exists)."""

    @staticmethod
    def _tt_check_engine_args(kwargs: dict[str, Any]) -> None:
        if kwargs.get("speculative_config"):
            raise ConfigError("speculative_config", "speculative decoding is not supported by telltale model types")

    @classmethod
    def _tt_check_unknown(cls, kwargs: dict[str, Any]) -> None:
        """Every remaining model_arg must be an lm-eval VLLM argument or a vLLM engine argument;
        otherwise vLLM would reject it only after minutes of start-up."""
        import dataclasses
        import inspect

        from vllm.engine.arg_utils import EngineArgs

        known = set(inspect.signature(VLLM.__init__).parameters) | {f.name for f in dataclasses.fields(EngineArgs)}
        known |= {"device", "batch_size", "max_batch_size"}
        for k in kwargs:
            if k not in known:
                raise ConfigError(k, f"unknown model_arg for vllm-{cls.METHOD} (not a telltale key "
                                     f"{sorted(all_keys(cls.METHOD))}, nor an lm-eval/vLLM engine argument)")

    # -- generation -----------------------------------------------------------------------------
    def _tt_tag(self, prompt: list[int], sp, seen: dict) -> tuple[Any, str]:
        key = tuple(prompt)
        k = seen[key] = seen.get(key, -1) + 1
        tag = f"tt{next(self._tt_counter)}"
        sp = sp.clone()
        # the request's identity for random draws: its prompt and occurrence, not its batch position
        extra = dict(sp.extra_args or {})
        extra[TAG_KEY] = tag
        extra["telltale_seed"] = seed_from(hash(key), k)
        sp.extra_args = extra
        return sp, tag

    def _tt_eos(self) -> str:
        """The EOS string lm-eval's vLLM backend adds to the stop sequences (same rule)."""
        eos = self.tokenizer.decode(self.eot_token_id)
        if not eos and getattr(self.tokenizer, "eos_token", None):
            eos = self.tokenizer.eos_token
        return eos

    # -- generation -----------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False):
        self._tt_plan = Plan(self, requests)
        self._tt_quiet = disable_tqdm
        try:
            return super().generate_until(requests, disable_tqdm)
        finally:
            self._tt_plan = None
            if self._tt_writer is not None:
                self._tt_writer.sync()

    def _model_generate(self, requests, generate=False, sampling_params=None):
        if not generate or sampling_params is None:  # log-likelihood requests: nothing to record
            out = super()._model_generate(requests, generate=generate, sampling_params=sampling_params)
            if self.data_parallel_size == 1:
                self.model.collective_rpc("telltale_discard")
            return out
        if not isinstance(sampling_params, list):
            sampling_params = [sampling_params] * len(requests)
        plan = getattr(self, "_tt_plan", None)
        seen: dict = {}
        units = [self._tt_unit(list(p), sp, plan.take(p) if plan is not None else None, seen)
                 for p, sp in zip(requests, sampling_params)]
        if self.data_parallel_size > 1:
            return super()._model_generate(requests, generate=True, sampling_params=[u.params[0] for u in units])
        self._tt_run(units)
        return [u.chosen for u in units]

    def _tt_unit(self, prompt: list[int], sp, answer: Answer | None, seen: dict) -> Unit:
        """One answer = one tagged request (``vllm-lrs`` makes N)."""
        sp, tag = self._tt_tag(prompt, sp, seen)
        return Unit(prompt, answer, [tag], [sp])

    def _tt_run(self, units: list[Unit]) -> None:
        """Queue every request of ``units``, step the engine, and write each answer's row as soon
        as its unit is finished (statistics collected in batches, at most every FLUSH_S)."""
        from tqdm.auto import tqdm
        from vllm import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        llm = self.model
        engine = llm.llm_engine
        owner: dict[str, tuple[Unit, str]] = {}
        salt = self._tt_modifies
        try:  # the tag is the request id: the engine's outputs name the candidate they belong to
            for u in units:
                for tag, sp in zip(u.tags, u.params):
                    sp.output_kind = RequestOutputKind.FINAL_ONLY
                    prompt = TokensPrompt(prompt_token_ids=u.prompt)
                    if salt:  # a block cached by this request is reused only by this request
                        prompt["cache_salt"] = tag
                    engine.add_request(tag, prompt, sp, lora_request=self.lora_request)
                    owner[tag] = (u, tag)
        except Exception:
            if owner:
                engine.abort_request(list(owner))
            raise
        pbar = tqdm(total=len(units), desc=f"vllm-{self.METHOD}: answers", unit="answer",
                    disable=True if getattr(self, "_tt_quiet", False) else None)
        done: list = []
        last, interval = time.monotonic(), FLUSH_S
        finished_cleanly = False
        try:
            while engine.has_unfinished_requests():
                done.extend(o for o in engine.step() if o.finished)
                if done and time.monotonic() - last >= interval:
                    t0 = time.monotonic()
                    self._tt_finish(done, owner, pbar)
                    done, last = [], time.monotonic()
                    # collecting costs O(rows held by the worker): keep it under ~2 % of the run
                    interval = max(FLUSH_S, 50.0 * (last - t0))
            finished_cleanly = True
        finally:
            if done:
                try:  # after an interrupt, still save what finished (a short timeout: never hang)
                    self._tt_finish(done, owner, pbar, timeout=None if finished_cleanly else 10.0)
                except Exception as e:  # noqa: BLE001
                    if finished_cleanly:
                        raise
                    logger.warning("telltale: %d finished answers could not be saved after the interruption: %s",
                                   len(done), e)
            pbar.close()

    def _tt_finish(self, outs: list, owner: dict, pbar, timeout: float | None = None) -> None:
        pairs = [(owner.pop(o.request_id), o) for o in outs]
        stats = self._tt_collect([tag for (_u, tag), _o in pairs],
                                 [len(o.outputs[0].token_ids) for _, o in pairs], timeout)
        rows = []
        for (u, tag), o in pairs:
            u.outputs[tag], u.stats[tag] = o, stats.get(tag)
            if u.complete:
                row = self._tt_answer(u)
                pbar.update(1)
                if row is not None:
                    rows.append(row)
        for row in rows:
            self._tt_summary.add(row)
        if self._tt_writer is not None:
            self._tt_writer.write(rows)

    def _tt_collect(self, tags: list[str], lengths: list[int], timeout: float | None = None) -> dict[str, dict]:
        """The worker's statistics of these finished requests; ``lengths`` (generated tokens) let
        the worker drop any row past an answer's end (a forward the engine ran for a request that
        had already stopped, e.g. under async scheduling)."""
        res = self.model.collective_rpc("telltale_collect", timeout=timeout, args=(tags, lengths))
        recs = res[0] if res else []
        return {r["tag"]: r for r in recs}

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

    def _tt_response(self, ans: Answer, text: str) -> str:
        """What lm-eval scores: its own post-processing with the same stop sequences."""
        from lm_eval.models.utils import postprocess_generated_text

        return postprocess_generated_text(text, ans.until, self.think_end_token)

    # -- results JSON ---------------------------------------------------------------------------
    def get_model_info(self) -> dict:
        base = super().get_model_info() if hasattr(super(), "get_model_info") else {}
        info = {
            "method": self.METHOD,
            "model_type": f"vllm-{self.METHOD}",
            "architecture": self._tt_arch,
            "config": self.tt_cfg.to_dict(),
            "preset": self._tt_preset.get("_path") if self._tt_preset else None,
            "stats_path": self.tt_cfg.stats_path,
            "summary": self._tt_summary.to_dict(),
        }
        return {**base, "telltale": info}


@register_model("vllm-norms")
class VLLMNorms(TelltaleVLLM):
    """Observe the residual-stream norm at the patched layers; outputs identical to ``vllm``."""

    METHOD = "norms"


@register_model("vllm-suppress")
class VLLMSuppress(TelltaleVLLM):
    """High-norm suppression (and the random / rate-matched controls), docs/methods.md §5."""

    METHOD = "suppress"


@register_model("vllm-alrr")
class VLLMAlrr(TelltaleVLLM):
    """Adaptive Layer-wise Reasoning Recursion, docs/methods.md §2."""

    METHOD = "alrr"


@register_model("vllm-erss")
class VLLMErss(TelltaleVLLM):
    """Endogenous Reasoning State Steering, docs/methods.md §3: per request and patched layer, a bank of
    high-norm states; after a low-norm streak, h ← h + β·(v − r) with the best-cosine bank vector."""

    METHOD = "erss"
