"""The in-graph step of the methods that only observe (``vllm-norms``, ``vllm-lrs`` without online
stopping): the whole per-step work inside the model's forward, on static buffers.

For these methods a step's work is tensor arithmetic once the norms are known
(:meth:`~lm_eval_telltale.core.engine.Method.in_graph`). :class:`GraphStep` holds every tensor it
touches as a buffer, allocated before vLLM compiles (or captures) the model: the core's slot table,
τ and threshold state and the rows' device buffer (:meth:`~lm_eval_telltale.core.engine.CoreEngine.graph_parts`,
the same tensors the core keeps, never replaced), the runner's own ``query_start_loc`` buffer
(vLLM pads it with the step's token count past the last row), a ``row_slot`` buffer and a norms
buffer. Each patched layer's forward hook (:func:`graph_hook`) computes ‖h + r‖ in the traced graph
and writes it into its column; the last patched layer's hook then runs
:func:`~lm_eval_telltale.core.engine.observe_step`: the token → slot map from ``query_start_loc``
and ``row_slot`` on the device, τ, the events, the threshold update, each request's last position
and the rows of new generated tokens, every write in place. torch.compile traces it into the
model's graph (no custom op, no graph split, no Python at run time); in eager mode the same code
runs as plain operations.

The model's forward itself runs no Python of telltale's, so a FULL CUDA graph may capture it. The
host's part of a step runs outside it: when the runner's batch update reaches the row mirror
(every step, before the forward), the step's row → slot map is copied into ``row_slot`` (on a
GPU from double-buffered pinned memory, non-blocking) and room is made in the rows' buffer; after
the worker's ``execute_model``, ``row_slot`` is reset to −1. A forward with no step running (vLLM's
dummy, profiling and capture runs) thus sees no request: every token has slot −1, nothing decodes
and nothing is new, and no state changes. Whether every patched layer ran in every step is counted
on the device (``calls``, one per layer and forward with a request) and checked when the rows are
drained: a replay that skipped the step, or a hook traced away, fails there.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..core.engine import HookWiringError, observe_step, residual_norm
from ..core.methods import method_module

#: debug switch: the layer hooks as plain Python that reads process state (models.py)
PLAIN_HOOKS_ENV = "TELLTALE_DEBUG_PLAIN_HOOKS"


def plain_hooks() -> bool:
    return os.environ.get(PLAIN_HOOKS_ENV) == "1"


def in_graph(cfg, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1) -> bool:
    """Whether an engine of ``cfg`` runs the in-graph step — the one place this is decided (the
    engine settings, the worker): a method whose step allows it
    (:meth:`~lm_eval_telltale.core.engine.Method.in_graph`), on one rank and one stage (the
    tensor-parallel digest check reads each step's norms on the host; a pipeline stage's forward
    differs), without the debug hooks."""
    return (not plain_hooks() and int(tensor_parallel_size or 1) == 1 and int(pipeline_parallel_size or 1) == 1
            and method_module(cfg.method).METHOD.in_graph(cfg))


def async_exact(cfg) -> bool:
    """Whether an in-graph engine's statistics stay exact under async scheduling. Its extra forward
    for a request that already stopped writes only that request's own rows and state (the rows
    past its end are dropped at collection); only ``tau_mode=global``'s engine-wide stream would
    see it."""
    return cfg.tau_mode != "global"


class GraphStep(torch.nn.Module):
    """The static buffers of the in-graph step, and the step itself (:meth:`layer`)."""

    def __init__(self, core, query_start_loc: torch.Tensor, max_tokens: int):
        super().__init__()
        dev = query_start_loc.device
        self._pinned = None
        if dev.type == "cuda":  # the row map's staging: two pinned buffers, each reused once its copy ran
            n = int(query_start_loc.shape[0]) - 1
            self._pinned = [torch.empty(n, dtype=torch.int64, pin_memory=True) for _ in range(2)]
            self._copied: list = [None, None]
            self._flip = 0
        rows = int(query_start_loc.shape[0]) - 1
        tensors, self.consts = core.graph_parts(rows)
        self.n_tau = sum(k.startswith("tau") for k in tensors)
        self.n_thr = sum(k.startswith("thr") for k in tensors)
        for name, t in tensors.items():
            self.register_buffer(name, t, persistent=False)
        self.register_buffer("qsl", query_start_loc, persistent=False)
        self.register_buffer("row_slot", torch.full((rows,), -1, dtype=torch.int64, device=dev), persistent=False)
        self.register_buffer("norm", torch.zeros(max_tokens, core.L, dtype=torch.float32, device=dev), persistent=False)
        self.register_buffer("calls", torch.zeros(core.L, dtype=torch.int64, device=dev), persistent=False)
        self.last = core.L - 1
        self.steps = 0  # host: the forwards with a request (counted by the adapter)

    def layer(self, j: int, positions: torch.Tensor, n: torch.Tensor) -> None:
        """After patched layer ``j``, inside the traced forward: its norms ``n`` [N] recorded; after
        the last one, the whole step."""
        num = n.shape[0]
        self.norm[:num, j] = n
        self.calls[j] += (self.row_slot[0] >= 0).to(torch.int64)
        if j == self.last:
            observe_step(self.norm[:num], positions, self.qsl, self.row_slot, self.prompt_len, self.last_pos,
                         self.enabled, self.seed, self.serial, self.rows_ints, self.rows_floats, self.cursor,
                         tuple(getattr(self, f"tau{i}") for i in range(self.n_tau)),
                         tuple(getattr(self, f"thr{i}") for i in range(self.n_thr)), **self.consts)

    # -- host, around the forward ------------------------------------------------------------------
    def begin(self, row_slot) -> torch.Tensor:
        """The step's row → slot map (``row_slot``: [R], a numpy array or a tensor) into the buffer
        the forward reads; returns it on the device (the sampling rows' slots)."""
        src = torch.from_numpy(row_slot.copy()) if isinstance(row_slot, np.ndarray) else row_slot
        rows = int(src.shape[0])
        if self._pinned is None:
            dev = src.to(self.row_slot.device, torch.int64, copy=True)
        else:
            i, self._flip = self._flip, self._flip ^ 1
            if self._copied[i] is not None:
                self._copied[i].synchronize()  # that buffer's copy, two steps ago, has run
            pin = self._pinned[i][:rows]
            pin.copy_(src)
            dev = pin.to(self.row_slot.device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            self._copied[i] = ev
        self.row_slot[:rows].copy_(dev)
        return dev

    def end(self, ran: bool) -> None:
        """After the step: ``row_slot`` reset (a forward outside a step sees no request); ``ran``:
        a forward with a request ran, counted for :meth:`check`."""
        self.steps += bool(ran)
        self.row_slot.fill_(-1)

    def check(self) -> None:
        """Every patched layer ran in every step (read when the rows are drained: one host read)."""
        calls = self.calls.tolist()
        if any(c != self.steps for c in calls):
            raise HookWiringError(
                f"telltale: the in-graph step's layer hooks ran {calls} times in {self.steps} steps (one per layer "
                "and step expected): a hook was traced away or skipped, and the statistics would be wrong")


def graph_hook(module, args, output):
    """After a patched layer (in-graph step): ‖h + r‖ inside the traced graph, handed with the
    layer's positions to :meth:`GraphStep.layer`. (h, r) are only read: the residual stream stays
    stock vLLM's."""
    h, r = output
    module._tt_graph.layer(module._tt_index, args[0], residual_norm(h, r)[1])
    return output
