"""``vllm-lrs``: sample N candidates per request, return the one with the strongest norm signature.

lm-eval's filters only see strings, so selection happens here, in ``_model_generate``:

- every lm-eval request becomes N tagged vLLM requests (one per candidate, each with its own
  sampling seed derived from the engine seed, the prompt and the candidate index — so the
  candidate ↔ statistics mapping is exact by construction and a run is reproducible);
- the worker records each candidate's norm statistics and DeepConf trace confidence;
- the candidate picked by ``lrs_score`` (complete ones first with ``prefer_complete``) is returned;
- the sidecar row keeps every candidate (text, tokens, finish reason, all scores, the task's
  extracted answer and verdict) and what every selector — the norm scores, ``maj``, ``conf``,
  ``random``, ``first`` — would have picked, so "accuracy if selector X had been used" needs no
  re-generation. The results JSON's ``telltale.summary.lrs_selectors`` holds those accuracies.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.registry import register_model

from ..config import ConfigError
from ..core.lrs import SCORES, argmax_pick, pick_all, score
from ..core.rng import seed_from
from .models import TelltaleVLLM
from .taskscore import scorer_for

_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p")


@register_model("vllm-lrs")
class VLLMLrs(TelltaleVLLM):
    METHOD = "lrs"

    def __init__(self, pretrained: str, **kwargs: Any):
        super().__init__(pretrained, **kwargs)
        self._tt_selector_acc: dict[str, list[float]] = {}

    def _tt_configure(self, cfg, kwargs: dict[str, Any]) -> None:
        """vLLM 0.32's CPU runner cannot rewind a seeded request's generator after a discarded
        partial-prefill sample ("CPU Generator does not use offset"), and every candidate here is
        seeded: on CPU, prefill whole prompts (no chunked prefill) unless the user chose."""
        from vllm.platforms import current_platform

        if current_platform.is_cpu() and kwargs.get("enable_chunked_prefill") is None:
            kwargs["enable_chunked_prefill"] = False
            mml = kwargs.get("max_model_len") or kwargs.get("max_length")
            if mml and not kwargs.get("max_num_batched_tokens"):
                kwargs["max_num_batched_tokens"] = int(mml)

    # -- sampling --------------------------------------------------------------------------------
    def _tt_sampling(self, sp):
        n = self.tt_cfg.params["n_candidates"]
        if n > 1 and sp.temperature < 1e-5:
            preset = (self._tt_preset or {}).get("sampling")
            if not preset:
                raise ConfigError(
                    "n_candidates",
                    f"vllm-lrs samples {n} candidates per prompt, but the task asks for greedy decoding (identical "
                    "candidates). Pass e.g. --gen_kwargs temperature=0.6,top_p=0.95,do_sample=True, or a preset "
                    "with a sampling section (config=qwen3-8b), or n_candidates=1.")
            sp = sp.clone()
            for k in _SAMPLING_KEYS:
                if k in preset:
                    setattr(sp, k, preset[k])
        return sp

    def _model_generate(self, requests, generate=False, sampling_params=None):
        if not generate or sampling_params is None or self.data_parallel_size > 1:
            return super()._model_generate(requests, generate=generate, sampling_params=sampling_params)
        if not isinstance(sampling_params, list):
            sampling_params = [sampling_params] * len(requests)
        n = self.tt_cfg.params["n_candidates"]
        exp_reqs, exp_sps, seen = [], [], {}
        for prompt, sp in zip(requests, sampling_params):
            sp = self._tt_sampling(sp)
            key = tuple(prompt)
            occ = seen[key] = seen.get(key, -1) + 1
            for k in range(n):
                spk = sp.clone()
                spk.n = 1
                spk.seed = seed_from(self.tt_cfg.seed, hash(key), occ, k, sp.seed)
                exp_reqs.append(prompt)
                exp_sps.append(spk)
        start = len(self._tt_pending)
        super()._model_generate(exp_reqs, generate=True, sampling_params=exp_sps)
        cand_recs = self._tt_pending[start:]
        del self._tt_pending[start:]
        chosen_outputs = []
        p = self.tt_cfg.params
        for i in range(len(requests)):
            group = cand_recs[i * n:(i + 1) * n]
            cands = [self._tt_candidate(rec) for rec in group]
            vals = [score(c["layers"], p["lrs_score"]) for c in cands]
            idx = argmax_pick(vals, [c["complete"] for c in cands], p["prefer_complete"])
            rec = dict(group[idx])
            rec["lrs"] = {"candidates": cands, "chosen_index": idx}
            self._tt_pending.append(rec)
            chosen_outputs.append(group[idx]["output"])
        return chosen_outputs

    def _tt_candidate(self, rec) -> dict[str, Any]:
        out = rec["output"].outputs[0]
        stats = rec["stats"] or {}
        think_end = getattr(self, "think_end_token", None)
        complete = (think_end in out.text) if think_end else out.finish_reason == "stop"
        layers = stats.get("layers", {})
        return {
            "tag": rec["tag"], "text": out.text, "n_tokens": len(out.token_ids), "finish_reason": out.finish_reason,
            "complete": bool(complete), "truncated_thinking": bool(think_end) and not complete,
            "layers": layers, "conf": stats.get("conf"), "conf_mean": stats.get("conf_mean"),
            "scores": {**{name: score(layers, name) for name in SCORES}, "conf": stats.get("conf")},
        }

    # -- sidecar ---------------------------------------------------------------------------------
    def _tt_row(self, inst, repeat: int, text: str, rec: dict) -> dict[str, Any]:
        from lm_eval.models.utils import postprocess_generated_text

        row = super()._tt_row(inst, repeat, text, rec)
        lrs = rec.get("lrs")
        if lrs is None:
            return row
        scorer = scorer_for(inst.task_name)
        until = (inst.args[1] or {}).get("until") if len(inst.args) > 1 and isinstance(inst.args[1], dict) else None
        cands = []
        for c in lrs["candidates"]:
            resp = postprocess_generated_text(c["text"], until, getattr(self, "think_end_token", None))
            c = {k: v for k, v in c.items() if k != "layers"} | {"response": resp, "layers": c["layers"]}
            c["answer"] = scorer.answer(inst.doc, resp) if scorer else None
            c["correct"] = scorer.correct(inst.doc, resp) if scorer else None
            cands.append(c)
        picks = pick_all(cands, self.tt_cfg.params["prefer_complete"],
                         (self.tt_cfg.seed, inst.task_name, inst.doc_id, repeat))
        chosen = self.tt_cfg.params["lrs_score"]
        assert picks[chosen] == lrs["chosen_index"], "selector mismatch between generation and report"
        row.update({"n_candidates": len(cands), "candidates": cands, "picks": picks, "chosen": chosen,
                    "chosen_index": lrs["chosen_index"], "scorer": "task" if scorer else None})
        for sel, idx in picks.items():
            v = cands[idx]["correct"]
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
