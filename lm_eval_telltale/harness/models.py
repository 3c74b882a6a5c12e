"""lm-eval model types over stock vLLM: ``vllm-norms`` (observe) and the method types built on it.

Like lm-eval's ``steered`` model, each type is the stock backend plus a small surface:

- ``__init__`` takes the telltale model_args out of the arguments (they would otherwise reach
  ``LLM(...)`` and be rejected), validates them against the model's config — before any engine is
  built — and adds the engine arguments (:func:`lm_eval_telltale.vllm.assemble_engine_args`, the one
  place that assembles a telltale engine's ``LLM(...)`` arguments);
- ``generate_until`` first lays out a plan: every lm-eval Instance by its prompt tokens, with its
  repeat, the doc id lm-eval writes (the true one under ``--samples``), its ``doc_hash`` and its
  stop sequences — so each answer can be written the moment it is finished;
- ``_model_generate`` tags every request and drives the engine itself
  (:func:`lm_eval_telltale.vllm.driver.drive`: ``LLMEngine.add_request`` / ``step``); finished
  answers are collected from the workers in small batches (at most every ``driver.FLUSH_S``
  seconds; tensor-parallel ranks and pipeline stages merged) and appended to the JSONL sidecar at
  once, so a crash or Ctrl-C loses no finished answer (:mod:`lm_eval_telltale.sidecar`); with
  ``data_parallel_size > 1`` each replica runs the same driver in a ray task;
- ``get_model_info`` puts the resolved config and a run summary into lm-eval's results JSON.

One *unit* is one answer lm-eval asked for: one tagged vLLM request here, N candidates for
``vllm-lrs`` (:mod:`lm_eval_telltale.harness.lrs`). What does not depend on the engine — the
settings, the plan, the sidecar row, the results-JSON block — is in
:mod:`lm_eval_telltale.harness.common`, shared with the ``hf-*`` types.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lm_eval.models.vllm_causallms import VLLM

from ..config import ConfigError
from ..core.rng import request_identity
from ..vllm import assemble_engine_args, modifies_kv, unknown_engine_keys
from ..vllm.reaper import guarded
from ..vllm.runtime import TAG_KEY
from .common import Answer, Plan, TelltaleLM, Unit, default_stats_path, define_model_type, unknown_model_arg  # noqa: F401

logger = logging.getLogger("lm_eval_telltale")

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
        # every request gets its own cache_salt (_tt_run): prefix caching is safe for every method
        kwargs = assemble_engine_args(cfg, arch, kwargs, salted_requests=True)
        if kwargs.get("batch_size", 1) in (1, "1"):
            logger.warning("telltale: batch_size=1 sends requests to vLLM one at a time; use --batch_size auto")
        self._tt_init_state(cfg, arch)
        self._tt_modifies = modifies_kv(cfg)
        # the engine's processes end with this one, also when it is killed (vllm/reaper.py)
        guarded(lambda: super(TelltaleVLLM, self).__init__(pretrained=pretrained, **kwargs))
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
        import inspect

        lm_eval_args = set(inspect.signature(VLLM.__init__).parameters) | {"device", "batch_size", "max_batch_size"}
        bad = unknown_engine_keys(kwargs, also=lm_eval_args)
        if bad:
            raise unknown_model_arg(cls._tt_model_type(), cls.METHOD, bad[0], "an lm-eval/vLLM engine argument")

    def _tt_tag(self, prompt: list[int], sp) -> tuple[Any, str]:
        key = tuple(prompt)
        k = self._tt_occurrence(key)
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
    def _model_generate(self, requests, generate=False, sampling_params=None):
        if not generate or sampling_params is None:  # log-likelihood requests: nothing to record
            out = super()._model_generate(requests, generate=generate, sampling_params=sampling_params)
            if self.data_parallel_size == 1:
                self.model.collective_rpc("telltale_discard")
            return out
        if not isinstance(sampling_params, list):
            sampling_params = [sampling_params] * len(requests)
        plan = getattr(self, "_tt_plan", None)
        units = [self._tt_unit(list(p), sp, plan.take(p) if plan is not None else None)
                 for p, sp in zip(requests, sampling_params)]
        if self.data_parallel_size > 1:
            self._tt_run_dp(units)
        else:
            self._tt_run(units)
        return [u.chosen for u in units]

    def _tt_unit(self, prompt: list[int], params, answer: Answer | None) -> Unit:
        """One answer = one tagged request (``vllm-lrs`` makes N); ``params``: its SamplingParams."""
        sp, tag = self._tt_tag(prompt, params)
        return Unit(prompt, answer, [tag], [sp])

    def _tt_requests(self, units: list[Unit]) -> list[tuple[str, list[int], Any]]:
        """The requests sent at once (online LRS: the warm-up candidates; the rest follow from
        :meth:`_tt_finished`)."""
        return [(tag, u.prompt, sp) for u in units for tag, sp in self._tt_first(u)]

    def _tt_progress(self, units: list[Unit]):
        """Answers finished (and saved) so far. lm-eval's own bar over the call moves only when a
        whole ``_model_generate`` call returns — with ``--batch_size auto`` at the very end, so after
        an interruption it reads 0 while answers were saved; this one is shown in logs too (not only
        on a terminal) and reads what the sidecar holds."""
        from tqdm.auto import tqdm

        return tqdm(total=len(units), desc=f"{self._tt_model_type()}: answers", unit="answer",
                    disable=bool(getattr(self, "_tt_quiet", False)), mininterval=1.0)

    def _tt_run(self, units: list[Unit]) -> None:
        """Queue every request of ``units``, step the engine, and write each answer's row as soon
        as its unit is finished (:func:`lm_eval_telltale.vllm.driver.drive`)."""
        from ..vllm.driver import drive

        owner = {tag: u for u in units for tag in u.tags}
        pbar = self._tt_progress(units)
        try:  # the tag is the request id (and, for the methods that change hidden states, the cache salt)
            drive(self.model, self._tt_requests(units), lambda batch: self._tt_finished(batch, owner, pbar),
                  salt=self._tt_modifies, lora_request=self.lora_request)
        finally:
            pbar.close()

    def _tt_finished(self, batch, owner: dict[str, Unit], pbar) -> list[tuple[str, list[int], Any]]:
        """Finished requests ((tag, output, statistics)): each unit that is now complete becomes
        its sidecar row, written at once; the progress bar counts them once written. Returns the
        requests that became ready (online LRS: a prompt's later candidates, once its warm-up
        candidates are finished)."""
        rows, done, more = [], 0, []
        for tag, out, stats in batch:
            u = owner.pop(tag, None)
            if u is None:  # already handed over (a flush interrupted after its rows were written)
                continue
            u.outputs[tag], u.stats[tag] = out, stats
            more.extend((t, u.prompt, sp) for t, sp in self._tt_later(u))
            if u.complete:
                row = self._tt_answer(u)
                done += 1
                if row is not None:
                    rows.append(row)
        self._tt_emit(rows)
        pbar.update(done)
        return more

    def _tt_run_dp(self, units: list[Unit]) -> None:
        """lm-eval's data parallelism: one replica (its own engine, in a ray task) per share of
        the units — a unit's LRS candidates stay together. Each replica appends every finished
        request at once to its own part file next to the sidecar (crash-safe, raw outputs and
        statistics by tag); the driver then builds the rows exactly as with one replica, writes
        them, and removes the part files."""
        import ray

        from ..vllm.driver import run_replica

        n = self.data_parallel_size
        shares = [[u for i, u in enumerate(units) if i % n == k] for k in range(n)]
        parts = [f"{self.tt_cfg.stats_path}.dp{k}.part.jsonl" if self.tt_cfg.stats_path else None for k in range(n)]
        gpu = self.model_args.get("device", "cuda") != "cpu" and _has_cuda()
        per = int(self.model_args.get("tensor_parallel_size", 1)) * int(self.model_args.get("pipeline_parallel_size", 1))
        remote = ray.remote(num_gpus=per if gpu else 0, num_cpus=0 if gpu else 1)(run_replica)
        refs = [remote.remote(self.model_args, self._tt_requests(share), parts[k], k, n, self._tt_modifies)
                for k, share in enumerate(shares) if share]
        owner = {tag: u for u in units for tag in u.tags}
        pbar = self._tt_progress(units)
        try:
            for finished in ray.get(refs):
                self._tt_finished(finished, owner, pbar)
        finally:
            pbar.close()
            ray.shutdown()  # as lm-eval does: later calls start their replicas afresh
        if owner:
            raise RuntimeError(f"telltale: {len(owner)} requests came back from no data-parallel replica")
        for part in parts:
            if part:
                Path(part).unlink(missing_ok=True)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


VLLMNorms = define_model_type(TelltaleVLLM, "norms", "VLLMNorms", "Observe the residual-stream norm at the patched "
                              "layers; outputs identical to ``vllm``.")
VLLMSuppress = define_model_type(TelltaleVLLM, "suppress", "VLLMSuppress", "High-norm suppression (and the random / "
                                 "rate-matched controls), docs/methods.md §5.")
VLLMAlrr = define_model_type(TelltaleVLLM, "alrr", "VLLMAlrr", "Adaptive Layer-wise Reasoning Recursion, docs/methods.md §2.")
VLLMErss = define_model_type(TelltaleVLLM, "erss", "VLLMErss", "Endogenous Reasoning State Steering, docs/methods.md §3: "
                             "per request and patched layer, a bank of high-norm states; after a low-norm streak, "
                             "h ← h + β·(v − r) with the best-cosine bank vector.")
