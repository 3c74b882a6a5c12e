"""Counting the operations that make the host wait for the device (a sync audit).

:class:`SyncAudit` is a ``TorchDispatchMode``: every aten operation run inside it passes through
it. It counts, by name, those that need a device→host synchronisation on an accelerator: a value
read on the host (``.item()``, ``bool(t)``, ``aten::_local_scalar_dense``), an output whose size
depends on the data (``nonzero``, ``masked_select``, boolean-mask indexing, ``unique``), a
comparison returning a host bool (``equal``), and a copy from a device to the host. On a CPU the
same operations run through the dispatcher, so the audit tells on this machine which of them a
step would issue on a GPU (a copy to the host is the exception: on a CPU there is none to see).

The tests run steady-state steps of every method under it, through the core and through both
adapters' hooks (``tests/core/test_sync_audit.py``): a step issues none, except ALRR's one host
decision (:meth:`~lm_eval_telltale.core.engine.CoreEngine.any`); the rows of generated tokens
reach the host only when drained (:class:`~lm_eval_telltale.core.collect.StepRows`).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: aten operations that read a value on the host or have a data-dependent output size
SYNC_OPS = frozenset({
    "aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal", "aten::nonzero",
    "aten::nonzero_static", "aten::masked_select", "aten::_unique", "aten::_unique2", "aten::unique_dim",
    "aten::unique_consecutive", "aten::argwhere", "aten::_assert_async",
})
#: indexing operations that sync when an index is a boolean mask (it is turned into positions)
MASK_INDEXING = frozenset({"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"})


def _device_to_host(name: str, args: tuple, kwargs: dict) -> bool:
    if name == "aten::_to_copy":
        dev = kwargs.get("device")
        src = args[0] if args else None
        return (dev is not None and torch.device(dev).type == "cpu" and isinstance(src, torch.Tensor)
                and src.device.type != "cpu")
    if name == "aten::copy_" and len(args) >= 2:
        dst, src = args[0], args[1]
        return (isinstance(dst, torch.Tensor) and isinstance(src, torch.Tensor) and dst.device.type == "cpu"
                and src.device.type != "cpu")
    return False


def _mask_index(name: str, args: tuple) -> bool:
    if name not in MASK_INDEXING or len(args) < 2:
        return False
    idx = args[1]
    return isinstance(idx, (list, tuple)) and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx)


class SyncAudit(TorchDispatchMode):
    """``with SyncAudit() as audit: ...`` → ``audit.syncs``: {operation: count} of the syncing
    operations that ran inside; ``audit.total``."""

    def __init__(self):
        super().__init__()
        self.syncs: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args: tuple = (), kwargs: dict[str, Any] | None = None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name in SYNC_OPS or _mask_index(name, args) or _device_to_host(name, args, kwargs):
            self.syncs[name] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.syncs.values())
