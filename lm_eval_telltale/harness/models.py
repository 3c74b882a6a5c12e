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
``vllm-lrs`` (:mod:`lm_eval_telltale.harness.lrs`). What does not depend on the engine — the
settings, the plan, the sidecar row, the results-JSON block — is in
:mod:`lm_eval_telltale.harness.common`, shared with the ``hf-*`` types.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.vllm_causallms import VLLM

from ..config import ConfigError, all_keys
from ..core.rng import request_identity
from ..vllm import engine_kwargs, modifies_kv
from ..vllm.runtime import TAG_KEY
from .common import Answer, Plan, TelltaleLM, Unit, default_stats_path  # noqa: F401  (re-exported)

logger = logging.getLogger("lm_eval_telltale")

#: finished answers are collected from the worker and written at most this often (seconds; the
#: interval grows when a collection takes long, so that it stays a small share of the run)
FLUSH_S = 0.5


class TelltaleVLLM(TelltaleLM, VLLM):
    METHOD = "norms"
    ENGINE = "vllm"

    def __init__(self, pretrained: str, **kwargs: Any):
        tt_args, preset = self._tt_take_args(kwargs)
        self._tt_check_engine_args(kwargs)
        self._tt_check_unknown(kwargs)
        cfg, arch = self._tt_resolve(pretrained, kwargs, tt_args, preset, seed=int(kwargs.get("seed", 1234) or 0))
        self._tt_configure(cfg, kwargs)
        self._tt_set_stats_path(cfg, pretrained)
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
        self._tt_init_state(cfg, arch)
        self._tt_modifies = modifies_kv(cfg)
        super().__init__(pretrained=pretrained, **kwargs)
        if self.data_parallel_size > 1:
            logger.warning("telltale: data_parallel_size>1 — the method runs in every replica, but per-sample "
                           "statistics cannot be collected from ray replicas; the sidecar stays empty")
        if self._tt_writer is None:
            logger.warning("telltale: no --output_path and no stats_path=: per-sample statistics are not written")

    # -- hooks for subclasses -------------------------------------------------------------------
    def _tt_configure(self, cfg, kwargs: dict[str, Any]) -> None:
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
        extra["telltale_seed"] = request_identity(key, k)
        sp.extra_args = extra
        return sp, tag

    def _tt_eos(self) -> str:
        """The EOS string lm-eval's vLLM backend adds to the stop sequences (same rule)."""
        eos = self.tokenizer.decode(self.eot_token_id)
        if not eos and getattr(self.tokenizer, "eos_token", None):
            eos = self.tokenizer.eos_token
        return eos

    def _tt_encode(self, strings: list[str]) -> list[list[int]]:
        return self.tok_encode(strings)

    def _tt_until(self, gen_kwargs: dict) -> list[str]:
        _, until, _ = self.modify_gen_kwargs(gen_kwargs, eos=self._tt_eos(), default_max_gen_toks=self.max_gen_toks)
        return until

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
        self._tt_emit(rows)

    def _tt_collect(self, tags: list[str], lengths: list[int], timeout: float | None = None) -> dict[str, dict]:
        """The worker's statistics of these finished requests; ``lengths`` (generated tokens) let
        the worker drop any row past an answer's end (a forward the engine ran for a request that
        had already stopped, e.g. under async scheduling)."""
        res = self.model.collective_rpc("telltale_collect", timeout=timeout, args=(tags, lengths))
        recs = res[0] if res else []
        return {r["tag"]: r for r in recs}

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
