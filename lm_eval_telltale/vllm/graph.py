"""The in-graph step: the whole per-step work of a method inside the model's forward, on static
buffers — every method (:meth:`~lm_eval_telltale.core.engine.Method.in_graph`: a method whose
per-layer and per-step work are tensor operations with no host decision), but ALRR with its skip
decision (``skip_sync=true``).

:class:`GraphStep` holds every tensor the step touches as a buffer, allocated before vLLM compiles
(or captures) the model: the core's slot table, τ and threshold state, the rows' device buffer and
the method's own state (:meth:`~lm_eval_telltale.core.engine.CoreEngine.graph_parts`: the same
tensors the core keeps, never replaced), the runner's own ``query_start_loc`` buffer (vLLM pads it
with the step's token count past the last row), a ``row_slot`` buffer, a norms buffer, for a
method that changes (h, r) the running step's map, τ, events, output norms and record columns, and
for a method with per-step work (online LRS's windows, :meth:`~lm_eval_telltale.core.engine.Method.step_op`,
run after the last layer) the runner's own ``input_ids`` buffer (the fed token ids), and for a
method that reads the sampling logits (LRS) each row's last fed position and whether its sampled
token is kept (:func:`~lm_eval_telltale.core.step.sampling_rows`, made after the last layer:
:meth:`GraphStep.sampling`) and what the method kept of the sampling logits with each row's slot
(:meth:`GraphStep.defer`, on the host), folded into the method's state by the next forward before
those rows are made anew (:meth:`~lm_eval_telltale.core.engine.Method.fold_logits`, over every
slot; :meth:`GraphStep.flush` folds them on the host when a finished request's state is read
first).
Each patched layer's forward hook (:func:`graph_hook`) hands the layer's (h, r) to
:meth:`GraphStep.layer`, in the traced graph, which records ‖h + r‖. The token → slot map (from
``query_start_loc`` and ``row_slot``, on the device) and each token's τ
(:func:`~lm_eval_telltale.core.engine.graph_start`) are made at the first patched layer for a
method that changes (h, r) — its :meth:`~lm_eval_telltale.core.engine.Method.layer_op` runs at
every layer, and its (h', r') become the layer's output — and after the last one for a method that
only observes. After the last layer come the events, the threshold update, each request's last
position and the rows of new generated tokens (:func:`~lm_eval_telltale.core.engine.graph_end`),
every write in place.
torch.compile traces it into the model's graph (no custom op, no graph split, no Python at run
time); in eager mode the same code runs as plain operations.

The model's forward itself runs no Python of telltale's, so a FULL CUDA graph may capture it. The
host's part of a step runs outside it: when the runner's batch update reaches the row mirror
(every step, before the forward), the step's row → slot map is copied into ``row_slot`` (on a
GPU from double-buffered pinned memory, non-blocking; on the CPU through the numpy array that
shares its memory, no torch call) and room is made in the rows' buffer; after the worker's
``execute_model``, ``row_slot`` is reset to −1. A forward with no step running (vLLM's dummy,
profiling and capture runs) thus sees no request: every token has slot −1, nothing decodes, no
method acts and nothing is new, and no state changes (but the fold of values deferred before it,
which any forward does once). Whether every patched layer ran in every
step is counted on the device (``calls``, one per layer and forward with a request) and checked
when the rows are drained: a replay that skipped the step, or a hook traced away, fails there.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..core.engine import HookWiringError, graph_end, graph_start, residual_norm
from ..core.methods import method_module
from ..core.step import StepMap, sampling_rows
from .kvguard import rerun_in_graph

#: the running step's map, one buffer per :class:`~lm_eval_telltale.core.step.StepMap` field (in
#: :func:`~lm_eval_telltale.core.step.step_tensors`' order)
STEP_BUFFERS = (("s_slot", torch.int64), ("s_pos", torch.int64), ("s_decode", torch.bool), ("s_new", torch.bool),
                ("s_act", torch.bool), ("s_seed", torch.int64))

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
    for a request that already stopped writes only that request's own rows and state: the rows
    past its end are dropped at collection, and what it added to the method's per-request results
    (LRS's confidence from its logits, online LRS's window) is taken back there by position
    (:meth:`~lm_eval_telltale.core.engine.Method.trim_meta`). An engine-wide stream would see it —
    ``tau_mode=global``'s, or the method's own (:meth:`~lm_eval_telltale.core.engine.Method.engine_wide`)."""
    method = method_module(cfg.method).METHOD
    return cfg.tau_mode != "global" and not method.engine_wide(cfg)


class GraphStep(torch.nn.Module):
    """The static buffers of the in-graph step, and the step itself (:meth:`layer`)."""

    def __init__(self, core, query_start_loc: torch.Tensor, max_tokens: int, hidden: int,
                 input_ids: torch.Tensor | None = None):
        super().__init__()
        dev = query_start_loc.device
        rows = int(query_start_loc.shape[0]) - 1
        self._pinned = None
        self._host = None  # on the CPU: the row map's buffer itself, written as a numpy array (no torch call)
        if dev.type == "cuda":  # the row map's staging: two pinned buffers, each reused once its copy ran
            self._pinned = [torch.empty(rows, dtype=torch.int64, pin_memory=True) for _ in range(2)]
            self._copied: list = [None, None]
            self._flip = 0
        tensors, self.start_consts, self.end_consts = core.graph_parts(rows, hidden)
        self.method = core.method
        self.modifies = bool(core.method.modifies)
        self.n_tau = sum(k.startswith("tau") for k in tensors)
        self.n_thr = sum(k.startswith("thr") for k in tensors)
        self.state_names = [k[2:] for k in tensors if k.startswith("m_")]
        self.col_names = list(core.method.columns)
        for name, t in tensors.items():
            self.register_buffer(name, t, persistent=False)
        self.register_buffer("qsl", query_start_loc, persistent=False)
        # a method with per-step work (Method.step_op) reads the fed token ids: the runner's own buffer
        self.step_work = core.method.has_step_op()
        if self.step_work:
            if input_ids is None:
                raise ValueError(f"telltale: the in-graph step of {core.method.name} needs the runner's input_ids buffer")
            self.register_buffer("input_ids", input_ids, persistent=False)
        self.register_buffer("row_slot", torch.full((rows,), -1, dtype=torch.int64, device=dev), persistent=False)
        if dev.type == "cpu":
            self._host = self.row_slot.numpy()
        L, T = core.L, max_tokens
        self.register_buffer("norm", torch.zeros(T, L, dtype=torch.float32, device=dev), persistent=False)
        if self.modifies:
            # a method that changes (h, r) acts at every patched layer: the running step's map (slot,
            # position, decode, new, act, seed) and τ, made at the first; the events, output norms and
            # record columns each layer fills
            for name, dtype in STEP_BUFFERS:
                self.register_buffer(name, torch.zeros(T, dtype=dtype, device=dev), persistent=False)
            for name, dtype in (("s_tau", torch.float32), ("event", torch.int16), ("norm_out", torch.float32)):
                self.register_buffer(name, torch.zeros(T, L, dtype=dtype, device=dev), persistent=False)
            for i in range(len(self.col_names)):
                self.register_buffer(f"col{i}", torch.zeros(T, L, dtype=torch.float32, device=dev), persistent=False)
        self.register_buffer("calls", torch.zeros(L, dtype=torch.int64, device=dev), persistent=False)
        # a method that reads the sampling logits (LRS): each row's last fed position and whether its
        # sampled token is kept, made after the last layer (core.step.sampling_rows)
        self.wants_logits = bool(core.method.wants_logits)
        self._p_host = None
        self.pending = False  # host: values deferred (:meth:`defer`) and not yet folded by a forward or :meth:`flush`
        if self.wants_logits:
            self.register_buffer("r_keep", torch.zeros(rows, dtype=torch.bool, device=dev), persistent=False)
            self.register_buffer("r_last", torch.zeros(rows, dtype=torch.int64, device=dev), persistent=False)
            # what the method kept of the last sampling's logits (Method.logits_values) and each
            # row's slot (−1: none), folded into its state in the next forward (:meth:`_fold`)
            self.register_buffer("p_val", torch.zeros(rows, dtype=torch.float32, device=dev), persistent=False)
            self.register_buffer("p_slot", torch.full((rows,), -1, dtype=torch.int64, device=dev), persistent=False)
            if dev.type == "cpu":
                self._p_host = (self.p_slot.numpy(), self.p_val.numpy())
        self.last = L - 1
        self.steps = 0  # host: the forwards with a request (counted by the adapter)

    def layer(self, j: int, positions: torch.Tensor, h: torch.Tensor, r: torch.Tensor, rerun=None):
        """After patched layer ``j``, inside the traced forward: its (h, r) → the method's (h', r')
        (``rerun``: the layer again without its KV write, for ALRR)."""
        x, n = residual_norm(h, r)
        return self.step(j, positions, n, h, r, x, rerun)

    def step(self, j: int, positions: torch.Tensor, n: torch.Tensor, h=None, r=None, x=None, rerun=None):
        """Patched layer ``j``'s part of the step, from its norms ``n`` [N] (and, for a method that
        changes them, (h, r), x = h + r and the layer's re-run). A method that changes (h, r) gets the step's map and τ
        at the first layer and runs its :meth:`~lm_eval_telltale.core.engine.Method.layer_op` at
        each; one that only observes needs them only after the last, where they are made. After the
        last layer, the end of the step (events, thresholds, last positions, rows)."""
        num = n.shape[0]
        self.norm[:num, j] = n
        self.calls[j] += (self.row_slot[0] >= 0).to(torch.int64)
        if j == self.last and self.wants_logits:
            self._fold()  # the last sampling's values, with its rows' (keep, last), before they are made anew
            keep, last = sampling_rows(positions, self.qsl, self.row_slot, self.prompt_len)
            self.r_keep.copy_(keep)
            self.r_last.copy_(last)
        if not self.modifies:
            if j == self.last:
                parts, tau = self._start(positions)
                slot, pos, _, new, _, _ = parts
                self._step_op(num, StepMap(*parts), tau)
                cols = [torch.full_like(tau, float("nan")) for _ in self.col_names]
                self._end(num, torch.zeros(tau.shape, dtype=torch.int16, device=tau.device), tau, cols, slot, pos, new)
            return h, r
        if j == 0:
            parts, tau = self._start(positions)
            for (name, _), v in zip(STEP_BUFFERS, parts):
                getattr(self, name)[:num] = v
            self.s_tau[:num] = tau
            self.event[:num] = 0
            for i in range(len(self.col_names)):
                getattr(self, f"col{i}")[:num] = float("nan")
        step = StepMap(*(getattr(self, name)[:num] for name, _ in STEP_BUFFERS))
        cols = [getattr(self, f"col{i}")[:num] for i in range(len(self.col_names))]
        state = {k: getattr(self, f"m_{k}") for k in self.state_names}
        h, r, ev = self.method.layer_op(j, h, r, x, n, self.s_tau[:num, j], step, dict(zip(self.col_names, cols)), state,
                                        rerun)
        if ev is not None:
            self.event[:num, j] = ev
        self.norm_out[:num, j] = residual_norm(h, r)[1]
        if j == self.last:
            self._step_op(num, step, self.s_tau[:num])
            self._end(num, self.event[:num], self.s_tau[:num], [self.norm_out[:num], *cols], step.slot, step.position,
                      step.new)
        return h, r

    def _step_op(self, num: int, step: StepMap, tau) -> None:
        """The method's per-step work (:meth:`~lm_eval_telltale.core.engine.Method.step_op`) with the
        step's fed token ids, where it has one."""
        if self.step_work:
            step = StepMap(step.slot, step.position, step.decode, step.new, step.act, step.seed,
                           token=self.input_ids[:num].to(torch.int64))
            self.method.step_op(step, self.norm[:num], tau, {k: getattr(self, f"m_{k}") for k in self.state_names})

    def _start(self, positions):
        return graph_start(positions, self.qsl, self.row_slot, self.prompt_len, self.last_pos, self.enabled, self.seed,
                           self._tables("tau", self.n_tau), **self.start_consts)

    def _end(self, num, event, tau, floats, slot, pos, new) -> None:
        norm = self.norm[:num]
        graph_end(event, norm, tau, (norm, tau, *floats), slot, pos, new, self.serial, self.last_pos, self.rows_ints,
                  self.rows_floats, self.cursor, self._tables("thr", self.n_thr), **self.end_consts)

    def _fold(self) -> None:
        """The deferred values of the last sampling (:meth:`defer`) into the method's state
        (:meth:`~lm_eval_telltale.core.engine.Method.fold_logits`), over every slot: each row's value,
        keep and last position go to its slot (a spare slot takes the rows of none; a slot with no
        row is left as it was). Then nothing is pending."""
        cap = self.prompt_len.shape[0]
        valid = self.p_slot >= 0
        at = torch.where(valid, self.p_slot, cap)
        dev = at.device
        values = torch.zeros(cap + 1, dtype=torch.float32, device=dev).index_put_((at,), self.p_val)
        keep = torch.zeros(cap + 1, dtype=torch.bool, device=dev).index_put_((at,), valid & self.r_keep)
        last = torch.full((cap + 1,), -1, dtype=torch.int64, device=dev).index_put_((at,), self.r_last)
        self.method.fold_logits(torch.arange(cap, device=dev), values[:cap], keep[:cap], last[:cap],
                                {k: getattr(self, f"m_{k}") for k in self.state_names})
        self.p_slot.fill_(-1)

    def _tables(self, prefix: str, count: int) -> tuple:
        return tuple(getattr(self, f"{prefix}{i}") for i in range(count))

    # -- host, around the forward ------------------------------------------------------------------
    def begin(self, row_slot, slots: bool = False) -> torch.Tensor | None:
        """The step's row → slot map (``row_slot``: [R], a numpy array or a tensor) into the buffer
        the forward reads; with ``slots``, returns it as a tensor of its own on the device (the
        sampling rows' slots, read after :meth:`end` reset the buffer). On the CPU the buffer is
        written as the numpy array it shares memory with: a step's host part calls no torch
        operation there (each costs its dispatch, and the first after a forward several more µs)."""
        if self._host is not None:
            rows = int(row_slot.shape[0])
            self._host[:rows] = row_slot
            if not slots:
                return None
            return torch.from_numpy(np.array(row_slot, dtype=np.int64))
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

    def sampling(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's first ``rows`` sampling rows, as the forward made them: (keep, last position),
        which the next forward's fold reads (:meth:`_fold`) before it writes them again."""
        return self.r_keep[:rows], self.r_last[:rows]

    def defer(self, slots: torch.Tensor, values: torch.Tensor) -> None:
        """At sampling (a method that reads the logits): the rows' values
        (:meth:`~lm_eval_telltale.core.engine.Method.logits_values`, [R]) and slots, folded into the
        method's state by the next forward, inside its graph, with the rows' (keep, last position)
        that this step's forward made — or by :meth:`flush` when the host reads the state first."""
        if self.pending:  # no forward ran since the last values: fold those first
            self.flush()
        n = int(values.shape[0])
        if self._p_host is not None:  # on the CPU: as numpy arrays (begin)
            self._p_host[0][:n] = slots.numpy()
            self._p_host[1][:n] = values.numpy()
        else:
            self.p_slot[:n].copy_(slots)
            self.p_val[:n].copy_(values)
        self.pending = True

    def flush(self) -> None:
        """The deferred values folded now, on the host, before the method's state is read (a
        finished request's last token is folded by no forward)."""
        if self.pending:
            self._fold()
            self.pending = False

    def end(self, ran: bool) -> None:
        """After the step: ``row_slot`` reset (a forward outside a step sees no request); ``ran``:
        a forward with a request ran, counted for :meth:`check`."""
        self.steps += bool(ran)
        if ran:  # the forward folded the deferred values
            self.pending = False
        if self._host is not None:
            self._host.fill(-1)
        else:
            self.row_slot.fill_(-1)

    def check(self) -> None:
        """Every patched layer ran in every step (read when the rows are drained: one host read)."""
        calls = self.calls.tolist()
        if any(c != self.steps for c in calls):
            raise HookWiringError(
                f"telltale: the in-graph step's layer hooks ran {calls} times in {self.steps} steps (one per layer "
                "and step expected): a hook was traced away or skipped, and the statistics would be wrong")


def graph_hook(module, args, output):
    """After a patched layer (in-graph step): the layer's (h, r) and positions to
    :meth:`GraphStep.layer`, inside the traced graph; its (h', r') become the layer's output (for
    a method that only observes, (h, r) themselves: the residual stream stays stock vLLM's). ALRR's
    re-run is the layer's own forward, traced here too (:func:`~lm_eval_telltale.vllm.kvguard.rerun_in_graph`)."""
    h, r = output
    positions = args[0]

    def rerun(h_in, r_in):
        return rerun_in_graph(module, positions, h_in, r_in)

    return module._tt_graph.layer(module._tt_index, positions, h, r, rerun)
