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

The selection and the row are engine-independent (:class:`lm_eval_telltale.harness.common.LrsSelection`,
shared with ``hf-lrs``); this module adds vLLM's side: the candidates' sampling parameters and seeds.
"""

from __future__ import annotations

import logging
from typing import Any

from ..config import ConfigError
from ..core.rng import candidate_seed
from ..vllm import whole_prompt_budget
from .common import LrsSelection, greedy  # noqa: F401  (greedy: re-exported)
from .models import TelltaleVLLM, Unit

logger = logging.getLogger("lm_eval_telltale")

_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p")


class VLLMLrs(LrsSelection, TelltaleVLLM):
    METHOD = "lrs"

    def _tt_configure(self, cfg, kwargs: dict[str, Any]) -> None:
        """Before the engine exists: refuse greedy decoding with N > 1 when the command line says
        so; on CPU, prefill whole prompts — vLLM 0.32's CPU runner cannot rewind a seeded request's
        generator after a discarded partial-prefill sample ("CPU Generator does not use offset"),
        and every candidate here is seeded — unless the user chose."""
        from vllm.platforms import current_platform

        self._tt_check_sampling_early(cfg)
        signal = cfg.params["stop_signal"]
        if signal != "none" and int(kwargs.get("data_parallel_size", 1) or 1) > 1:
            raise ConfigError("stop_signal", f"online LRS (stop_signal={signal}) sends a prompt's later candidates "
                              "after its warm-up candidates finished, which data-parallel replicas (each a fixed share "
                              "of the requests) cannot do; use data_parallel_size=1 or stop_signal=none")
        if signal == "norm" and int(kwargs.get("pipeline_parallel_size", 1) or 1) > 1:
            raise ConfigError("stop_signal", "stop_signal=norm needs every patched layer's norm where the token is "
                              "sampled, which pipeline stages do not share; use pipeline_parallel_size=1 or "
                              "stop_signal=conf")
        if current_platform.is_cpu() and kwargs.get("enable_chunked_prefill") is None:
            kwargs["enable_chunked_prefill"] = False
            mml = kwargs.get("max_model_len") or kwargs.get("max_length")
            if mml and not kwargs.get("max_num_batched_tokens"):
                kwargs["max_num_batched_tokens"] = whole_prompt_budget(kwargs)

    # -- sampling --------------------------------------------------------------------------------
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

    def _tt_with_extra(self, sp, extra: dict):
        sp = sp.clone()
        sp.extra_args = {**(sp.extra_args or {}), **extra}
        return sp

    def _tt_unit(self, prompt, params, answer) -> Unit:
        sp = self._tt_sampling(params)
        key = tuple(prompt)
        occ = self._tt_occurrence(("lrs", key))
        tags, params = [], []
        for k in range(self.tt_cfg.params["n_candidates"]):
            spk = sp.clone()
            spk.n = 1
            spk.seed = candidate_seed(self.tt_cfg.seed, key, occ, k, sp.seed)
            spk, tag = self._tt_tag(prompt, spk)
            tags.append(tag)
            params.append(spk)
        return Unit(prompt, answer, tags, params)
