"""``worker_cls`` on GPU: vLLM's GPU worker with the Telltale mixin (never imports the CPU worker)."""

from __future__ import annotations

from vllm.v1.worker.gpu_worker import Worker

from .worker import TelltaleWorkerMixin


class TelltaleGPUWorker(TelltaleWorkerMixin, Worker):
    pass
