"""``worker_cls`` on CPU: vLLM's CPU worker with the Telltale mixin. Imported only on CPU (vLLM's
CPU worker module patches ``torch.cuda`` process-wide when imported)."""

from __future__ import annotations

from vllm.v1.worker.cpu_worker import CPUWorker

from .worker import TelltaleWorkerMixin


class TelltaleCPUWorker(TelltaleWorkerMixin, CPUWorker):
    pass
