"""``vllm-lrs``: sample N candidates per request, return the one with the strongest norm signature.

lm-eval's filters only see strings, so selection happens here, in ``_model_generate``:

- every lm-eval request becomes one unit of N tagged vLLM requests (one per candidate, each with
  its own sampling seed derived from the engine seed, the prompt and the candidate index — so the
  candidate ↔ statistics mapping is exact by construction and a run is reproducible); the unit's
  row is written as soon as its N candidates are finished;
- the worker records each candidate's norm statistics and DeepConf trace confidence;
- the candidate picked by ``lrs_score`` (complete ones first with ``prefer_complete``) is returned;
- the sidecar row keeps every candidate (text, tokens, finish reason, all scores, the task's
  extracted answer and verdict) and what every selector — the norm scores, ``maj``, ``conf``,
  ``random``, ``first`` — would have picked, so "accuracy if selector X had been used" needs no
  re-generation. The results JSON's ``telltale.summary.lrs_selectors`` holds those accuracies.
"""

from __future__ import annotations

import logging
from typing import Any

from lm_eval.api.registry import register_model

from ..config import ConfigError
from ..core.lrs import SCORES, argmax_pick, pick_all, score
from ..core.rng import seed_from
from . import argv
from .models import TelltaleVLLM, Unit
from .taskscore import scorer_for, task_generation_kwargs

logger = logging.getLogger("lm_eval_telltale")

_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p")


def greedy(gen_kwargs: dict) -> bool:
    """Whether lm-eval's vLLM backend would decode these generation kwargs greedily (its rule:
    temperature 0, or do_sample=False without a temperature)."""
    t = gen_kwargs.get("temperature")
    if t is not None:
        try:
            return float(t) < 1e-5
        except (TypeError, ValueError):
            return False
    return str(gen_kwargs.get("do_sample", "")).lower() in ("false", "0")


@register_model("vllm-lrs")
class VLLMLrs(TelltaleVLLM):
    METHOD = "lrs"

    def __init__(self, pretrained: str, **kwargs: Any):
        super().__init__(pretrained, **kwargs)
        self._tt_selector_acc: dict[str, list[float]] = {}

    def _tt_configure(self, cfg, kwargs: dict[str, Any]) -> None:
        """Before the engine exists: refuse greedy decoding with N > 1 when the command line says
        so; on CPU, prefill whole prompts — vLLM 0.32's CPU runner cannot rewind a seeded request's
        generator after a discarded partial-prefill sample ("CPU Generator does not use offset"),
        and every candidate here is seeded — unless the user chose."""
        from vllm.platforms import current_platform

        self._tt_check_sampling_early(cfg)
        if current_platform.is_cpu() and kwargs.get("enable_chunked_prefill") is None:
            kwargs["enable_chunked_prefill"] = False
            mml = kwargs.get("max_model_len") or kwargs.get("max_length")
            if mml and not kwargs.get("max_num_batched_tokens"):
                kwargs["max_num_batched_tokens"] = int(mml)

    # -- sampling --------------------------------------------------------------------------------
    def _tt_greedy_error(self, n: int) -> ConfigError:
        return ConfigError(
            "n_candidates",
            f"vllm-lrs samples {n} candidates per prompt, but the task asks for greedy decoding (identical "
            "candidates). Pass e.g. --gen_kwargs temperature=0.6,top_p=0.95,do_sample=True, or a preset "
            "with a sampling section (config=qwen3-8b), or n_candidates=1.")

    def _tt_check_sampling_early(self, cfg) -> None:
        """The lm_eval command line names the tasks and --gen_kwargs before any engine starts: when
        every task would decode greedily and no preset supplies sampling, fail now, not after the
        engine was built. (Under the Python API this cannot be known yet; the check at generation
        time stays.)"""
        n = cfg.params["n_candidates"]
        if n <= 1 or (getattr(self, "_tt_preset", None) or {}).get("sampling"):
            return
        cli = argv.gen_kwargs()
        if "temperature" in cli or "do_sample" in cli:
            if greedy(cli):
                raise self._tt_greedy_error(n)
            return
        names = argv.tasks()
        per_task = task_generation_kwargs(names) if names else None
        if per_task and all(greedy(gk) for gk in per_task):
            raise self._tt_greedy_error(n)

    def _tt_sampling(self, sp):
        n = self.tt_cfg.params["n_candidates"]
        if n > 1 and sp.temperature < 1e-5:
            preset = (self._tt_preset or {}).get("sampling")
            if not preset:
                raise self._tt_greedy_error(n)
            sp = sp.clone()
            for k in _SAMPLING_KEYS:
                if k in preset:
                    setattr(sp, k, preset[k])
        return sp

    def _tt_unit(self, prompt, sp, answer, seen) -> Unit:
        sp = self._tt_sampling(sp)
        key = tuple(prompt)
        occ = seen[("lrs", key)] = seen.get(("lrs", key), -1) + 1
        tags, params = [], []
        for k in range(self.tt_cfg.params["n_candidates"]):
            spk = sp.clone()
            spk.n = 1
            spk.seed = seed_from(self.tt_cfg.seed, hash(key), occ, k, sp.seed)
            spk, tag = self._tt_tag(prompt, spk, seen)
            tags.append(tag)
            params.append(spk)
        return Unit(prompt, answer, tags, params)

    # -- selection and the sidecar row ------------------------------------------------------------
    def _tt_candidate(self, tag: str, output, stats: dict | None) -> dict[str, Any]:
        out = output.outputs[0]
        stats = stats or {}
        think_end = getattr(self, "think_end_token", None)
        complete = (think_end in out.text) if think_end else out.finish_reason == "stop"
        layers = stats.get("layers", {})
        return {
            "tag": tag, "text": out.text, "n_tokens": len(out.token_ids), "finish_reason": out.finish_reason,
            "complete": bool(complete), "truncated_thinking": bool(think_end) and not complete,
            "layers": layers, "conf": stats.get("conf"), "conf_mean": stats.get("conf_mean"),
            "scores": {**{name: score(layers, name) for name in SCORES}, "conf": stats.get("conf")},
        }

    def _tt_answer(self, u: Unit) -> dict[str, Any] | None:
        p = self.tt_cfg.params
        cands = [self._tt_candidate(tag, u.outputs[tag], u.stats[tag]) for tag in u.tags]
        idx = argmax_pick([score(c["layers"], p["lrs_score"]) for c in cands], [c["complete"] for c in cands],
                          p["prefer_complete"])
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
        picks = pick_all(cands, p["prefer_complete"], (self.tt_cfg.seed, inst.task_name, ans.doc_id, ans.repeat))
        assert picks[p["lrs_score"]] == idx, "selector mismatch between generation and report"
        row.update({"n_candidates": len(cands), "candidates": cands, "picks": picks, "chosen": p["lrs_score"],
                    "chosen_index": idx, "scorer": "task" if scorer else None})
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
