"""Per-request state in fixed-size slot tensors.

A request gets a slot when it first enters the batch and keeps it — across the runner's row
reordering, condensing, and preemption — until it finishes or is aborted. Everything per request
(threshold estimators, method state, prompt length, seed, last seen position) lives in tensors
indexed by slot, so a step updates all requests with a handful of tensor operations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class SlotInfo:
    slot: int
    serial: int                # unique per request over the engine's life (slots are reused)
    key: str                   # engine-side request id
    tag: str | None = None     # caller's tag (lm-eval instance / LRS candidate)
    meta: dict[str, Any] = field(default_factory=dict)


class SlotTable:
    def __init__(self, capacity: int = 64, device=None):
        self.capacity = max(1, int(capacity))
        self.device = device
        self._free = list(range(self.capacity - 1, -1, -1))
        self.by_key: dict[str, SlotInfo] = {}
        self._serial = 0
        self._specs: dict[str, tuple[tuple[int, ...], torch.dtype, float]] = {}
        self.t: dict[str, torch.Tensor] = {}
        self._on_resize: list[Callable[[int], None]] = []
        self._on_reset: list[Callable[[int], None]] = []
        #: True once an adapter holds the tensors as static buffers (a model graph reads them): the
        #: table may not grow then (:meth:`~lm_eval_telltale.core.engine.CoreEngine.graph_parts`)
        self.fixed = False
        self.register("prompt_len", (), torch.int64, 0)
        self.register("last_pos", (), torch.int64, -1)
        self.register("seed", (), torch.int64, 0)
        self.register("serial", (), torch.int64, -1)
        self.register("enabled", (), torch.bool, True)

    # -- tensors -----------------------------------------------------------------------------
    def register(self, name: str, tail: tuple[int, ...], dtype: torch.dtype, fill: float) -> torch.Tensor:
        self._specs[name] = (tuple(tail), dtype, fill)
        self.t[name] = torch.full((self.capacity, *tail), fill, dtype=dtype, device=self.device)
        return self.t[name]

    def on_resize(self, fn: Callable[[int], None]) -> None:
        self._on_resize.append(fn)

    def on_reset(self, fn: Callable[[int], None]) -> None:
        self._on_reset.append(fn)

    def _grow(self) -> None:
        if self.fixed:
            raise RuntimeError(f"telltale: more than {self.capacity} requests hold a slot at once; the slot table is "
                               "fixed in size here (its tensors are static buffers of the model's graph)")
        old, new = self.capacity, self.capacity * 2
        for name, (tail, dtype, fill) in self._specs.items():
            ext = torch.full((new - old, *tail), fill, dtype=dtype, device=self.device)
            self.t[name] = torch.cat([self.t[name], ext], 0)
        self.capacity = new
        self._free.extend(range(new - 1, old - 1, -1))
        for fn in self._on_resize:
            fn(new)

    # -- lifecycle -----------------------------------------------------------------------------
    def acquire(self, key: str, *, prompt_len: int, seed: int, tag: str | None = None,
                meta: dict | None = None, enabled: bool = True, values: dict | None = None) -> SlotInfo:
        """The slot of ``key``; a new one (state reset) if the request is not known yet. ``values``:
        per-request settings ``{registered tensor: value}`` written into the new slot."""
        info = self.by_key.get(key)
        if info is not None:  # resumed after preemption: keep its state
            return info
        if not self._free:
            self._grow()
        slot = self._free.pop()
        self._serial += 1
        info = SlotInfo(slot=slot, serial=self._serial, key=key, tag=tag, meta=dict(meta or {}))
        self.by_key[key] = info
        for name, (_tail, _dtype, fill) in self._specs.items():
            self.t[name][slot] = fill
        self.t["prompt_len"][slot] = int(prompt_len)
        self.t["seed"][slot] = int(seed)
        self.t["serial"][slot] = info.serial
        self.t["enabled"][slot] = bool(enabled)
        for fn in self._on_reset:
            fn(slot)
        for name, v in (values or {}).items():
            self.t[name][slot] = v
        return info

    def release(self, key: str) -> SlotInfo | None:
        info = self.by_key.pop(key, None)
        if info is not None:
            self.t["serial"][info.slot] = -1
            self._free.append(info.slot)
        return info

    def __len__(self) -> int:
        return len(self.by_key)
