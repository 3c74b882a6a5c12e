"""A V1 logits processor that changes no logit: it mirrors the persistent batch's row order.

vLLM calls ``update_state(BatchUpdate)`` inside the runner's state update, after rows were
removed/added/condensed/reordered and *before* the forward of the same step — exactly when the
Telltale hooks need to know which request sits in which row. It is the public, documented way to
follow the batch (``vllm.v1.sample.logits_processor.LogitsProcessor``).
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor


class TelltaleRowMirror(LogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.runtime = None

    def attach(self, runtime) -> None:
        self.runtime = runtime

    def is_argmax_invariant(self) -> bool:
        # False so that ``apply`` sees the raw logits (before temperature) — used for LRS's
        # trace confidence; the logits are always returned unchanged.
        return False

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.runtime is not None:
            self.runtime.apply_logits(logits)
        return logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if self.runtime is not None:
            self.runtime.apply_batch_update(batch_update)
