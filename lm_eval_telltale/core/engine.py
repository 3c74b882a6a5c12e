"""The engine-agnostic per-step pipeline.

Per forward step an adapter calls::

    core.begin(step_map)                 # once
    h, r = core.layer(j, h, r, rerun)    # after each patched layer j (0..len(layers)-1)
    core.end()                           # once: feeds thresholds, keeps the step's rows on the device

and, when it collects finished requests, ``core.drain()`` (the rows of every step since, on the
host). ``layer`` computes the residual-stream norm ‖h + r‖ (float32) per token, looks up τ for each
token's request and layer, and lets the method transform (h, r). Everything is tensor work over
the whole step: no Python loop over tokens or requests, no host sync in a step (ALRR's "skip the
re-run" test, :meth:`CoreEngine.any`, is the one host decision a method may take).
"""

from __future__ import annotations

from typing import Callable

import torch

from . import fuse as _fuse
from .collect import StepRows, rows_write
from .state import SlotTable
from .stats import EV_ABOVE
from .step import STEP_TABLES, StepMap, advance_last_pos, step_map, step_tensors
from .thresholds import Thresholds

Rerun = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def step_tau(tau_t, slot, decode, num_layers: int):
    """τ of each token's request [N, L] (``tau_t``: :meth:`Thresholds.tau_table`), NaN where the
    token is not generated (NaN compares False everywhere: no decision elsewhere)."""
    n = slot.shape[0]
    tau = tau_t.expand(n, num_layers) if tau_t.shape[0] == 1 else tau_t[slot.clamp(min=0)]
    return torch.where(decode[:, None], tau, torch.full_like(tau, float("nan")))


def step_buffers(tau_t, slot, decode, num_layers: int, modifies: bool, num_columns: int):
    """A step's per-(token, layer) buffers: τ (:func:`step_tau`); the norms and events to fill;
    ``norm_out`` for a method that may change (h, r), else None; the method's columns, NaN-filled."""
    n = slot.shape[0]
    tau = step_tau(tau_t, slot, decode, num_layers)
    norm = torch.zeros(n, num_layers, dtype=torch.float32, device=slot.device)
    event = torch.zeros(n, num_layers, dtype=torch.int16, device=slot.device)
    norm_out = torch.zeros(n, num_layers, dtype=torch.float32, device=slot.device) if modifies else None
    cols = tuple(torch.full((n, num_layers), float("nan"), dtype=torch.float32, device=slot.device)
                 for _ in range(num_columns))
    return tau, norm, event, norm_out, cols


def end_kernel(event, norm, tau, floats, slot, position, new, serial, last_pos, rows_ints, rows_floats, cursor,
               thr_tables, thr_inputs, thr_consts, thr_step):
    """The end of a step as one function of tensors (:meth:`CoreEngine.end`), every write in place:
    the "above τ" events of every layer; the thresholds' update (``thr_step(*thr_tables,
    *thr_inputs, *thr_consts)``, :meth:`Thresholds.step_parts`; None: τ keeps no state); each
    request's last seen position; the step's rows of new generated tokens (serial, position,
    events; the float columns ``floats``) into the device buffers (:func:`rows_write`)."""
    event |= torch.where(norm > tau, EV_ABOVE, 0).to(torch.int16)
    if thr_step is not None:
        thr_step(*thr_tables, *thr_inputs, *thr_consts)
    advance_last_pos(last_pos, slot, position, new)
    ints = torch.cat([serial[slot.clamp(min=0)][:, None], position[:, None], event.to(torch.int64)], 1)
    rows_write(rows_ints, rows_floats, cursor, ints, torch.cat(floats, 1), new)


def graph_start(positions, query_start_loc, row_slot, prompt_len, last_pos, enabled, seed, tau_tables, *, tau_fn,
                tau_consts, num_layers: int):
    """The start of a step as one function of tensors, for a step an adapter runs inside its
    model's graph (:meth:`Method.in_graph`; the parts of :meth:`CoreEngine.graph_parts`): the step
    map's tensors (:func:`~lm_eval_telltale.core.step.step_tensors`) and each token's τ
    (:func:`step_tau`) — :meth:`CoreEngine.start`'s work. ``query_start_loc`` and ``row_slot`` may
    be padded to fixed sizes: rows without a request (slot −1) and tokens past the last row's end
    are no request's."""
    parts = step_tensors(prompt_len, last_pos, enabled, seed, query_start_loc, row_slot, positions)
    return parts, step_tau(tau_fn(*tau_tables, *tau_consts), parts[0], parts[2], num_layers)


def graph_end(event, norm, tau, floats, slot, position, new, serial, last_pos, rows_ints, rows_floats, cursor,
              thr_tables, *, thr_step, thr_sample, thr_consts):
    """The end of a step run inside a model's graph: :func:`end_kernel` with the thresholds'
    inputs made in the graph too (global τ's sample, :meth:`Thresholds.update_parts`)."""
    inputs = (slot, norm, new) if thr_sample is None else thr_sample(slot, norm, new)
    end_kernel(event, norm, tau, floats, slot, position, new, serial, last_pos, rows_ints, rows_floats, cursor,
               thr_tables, inputs, thr_consts, thr_step)


class HookWiringError(RuntimeError):
    """An adapter's hooks did not run as wired (a hook traced away, a wrong runner, rows out of
    sync): the step's statistics would be silently wrong, so it fails instead."""


def residual_norm(h: torch.Tensor, r: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, ‖x‖) with x = h + r in float32 — the residual stream after the layer."""
    x = h.float() if r is None else h.float() + r.float()
    return x, torch.linalg.vector_norm(x, dim=-1)


class Method:
    """Observe only (``vllm-norms``). Subclasses override :meth:`apply`."""

    name = "norms"
    #: True when the method may change (h, r); the trace then also records the output norm
    modifies = False
    #: extra float32 per-(token, layer) columns of the step record: ``core.columns[name]`` is an
    #: [N, L] buffer (NaN-filled at ``begin``) the method writes into; the columns travel with the
    #: trace rows and :meth:`summarize_columns` turns a request's rows into per-layer statistics
    columns: tuple[str, ...] = ()
    #: True when the adapter should pass each step's sampling logits to :meth:`observe_logits`
    wants_logits = False

    #: whether :meth:`apply` runs as a compiled kernel (None: a method with no step of its own to
    #: compile; subclasses that have one start at False and set it in :meth:`fuse`)
    fused: bool | None = None

    def __init__(self, cfg, table: SlotTable, num_layers: int, device=None):
        self.cfg = cfg
        self.table = table
        self.L = num_layers
        self.device = device

    @classmethod
    def in_graph(cls, cfg) -> bool:
        """Whether a whole step of this method under ``cfg`` is tensor work over static buffers, so
        an adapter may run it inside its model's graph (:func:`graph_start`, :meth:`layer_op` at each
        patched layer, :func:`graph_end`): a method whose per-layer work is :meth:`layer_op` and
        whose per-step work, if any, is :meth:`step_op` (no host decision, no state outside the
        slot table and :meth:`graph_state`)."""
        return (cls.apply is Method.apply or cls.layer_op is not Method.layer_op) and cls.end_step is Method.end_step

    @classmethod
    def engine_wide(cls, cfg) -> bool:
        """Whether the method under ``cfg`` keeps state that every request's generated tokens feed
        (online matched suppression's rates): a forward run after a request stopped (async
        scheduling) would then count in another request's decisions."""
        return False

    @classmethod
    def observes_only(cls) -> bool:
        """Whether the method never changes (h, r): it keeps the base :meth:`apply`. An adapter may
        then compute ‖h + r‖ itself (inside a compiled graph) and hand the core only the norm
        (:meth:`CoreEngine.observe`)."""
        return cls.apply is Method.apply and not cls.modifies

    def fuse(self) -> None:
        """Compile :meth:`apply`'s operations from now on (:meth:`CoreEngine.fuse`), where the method
        has a per-layer step worth it; the same numbers bit for bit."""

    def apply(self, core: "CoreEngine", j: int, h: torch.Tensor, r: torch.Tensor, x: torch.Tensor,
              n: torch.Tensor, tau: torch.Tensor, rerun: Rerun | None):
        """Return (h', r', events) for patched layer ``j``; ``events``: int16 [N] bits or None. By
        default the tensor operation :meth:`layer_op` on the core's step; a method that needs more
        (ALRR's re-run, ERSS's long steps) overrides this instead."""
        return self.layer_op(j, h, r, x, n, tau, core.step, core.columns, self.graph_state(), rerun)

    def layer_op(self, j: int, h: torch.Tensor, r: torch.Tensor, x: torch.Tensor, n: torch.Tensor,
                 tau: torch.Tensor, step: StepMap, columns: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                 rerun: Rerun | None = None):
        """The method at patched layer ``j`` as a function of tensors: (h, r) after the layer, x =
        h + r and its norm ``n`` [N], τ of each token ``tau`` [N] (NaN: not generated), the step map
        ``step``, the step's record columns (``columns[name]`` [N, L], :attr:`columns`), the
        method's state tensors ``state`` (:meth:`graph_state`), written in place, and ``rerun``, the
        layer again on given (h, r) without its KV write (ALRR). Returns (h', r', events: int16 [N]
        bits or None). Runs in the core's step (:meth:`apply`) and, where :meth:`in_graph`, inside an
        adapter's model graph on static buffers: no host decision."""
        return h, r, None

    def graph_state(self) -> dict[str, torch.Tensor]:
        """The method's own state tensors that :meth:`layer_op` reads or writes (besides the step
        map's slot-table tensors), by name; an in-graph adapter holds them as static buffers."""
        return {}

    def prepare(self, hidden: int) -> None:
        """Allocate the state whose size depends on the model's hidden size (ERSS's bank) now,
        before an in-graph adapter takes :meth:`graph_state` (the core's step allocates it at its
        first step)."""

    def summarize_columns(self, position, cols: dict, events, layers: list[int]) -> dict[str, dict]:
        """Per-layer statistics ``{str(layer): {...}}`` from one request's rows (numpy, token
        order): ``position`` [T], ``cols[name]`` [T, L] for each of :attr:`columns`, ``events``
        [T, L]. Merged into the request's ``layers`` record."""
        return {}

    def summary(self) -> dict:
        return {}

    def observe_logits(self, slots: torch.Tensor, logits: torch.Tensor, keep: torch.Tensor,
                       pos: torch.Tensor | None = None) -> None:
        """``logits`` [R, vocab] of the step's rows (before any processing); ``slots`` [R] the rows'
        request slots; ``keep`` [R] rows whose sampled token is kept (not a partial prefill);
        ``pos`` [R] each row's last fed position, where the adapter knows it (a forward after the
        answer ended is recognised by it at collection: :meth:`trim_meta`): the rows' values
        (:meth:`logits_values`) folded into the method's per-slot state (:meth:`fold_logits`) at
        once. An in-graph adapter folds them in its next forward instead."""
        self.fold_logits(slots, self.logits_values(slots, logits), keep, pos, None)

    def logits_values(self, slots: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """At sampling (a method that :attr:`wants_logits`): what the method keeps of each row's
        ``logits`` [R, vocab] (before any processing), [R] float32 (LRS: the token's confidence).
        It may change ``logits`` in place (online LRS forces a stopped candidate's last token)."""
        raise NotImplementedError(f"{self.name} reads no logits")

    def fold_logits(self, slots: torch.Tensor, values: torch.Tensor, keep: torch.Tensor,
                    pos: torch.Tensor | None, state: dict[str, torch.Tensor] | None) -> None:
        """:meth:`logits_values`' ``values`` [R] into the method's per-slot state, for the rows whose
        sampled token is kept (``keep`` [R]); ``slots`` [R] one row per slot; ``pos`` [R] each row's
        last fed position (or None); ``state``: the method's :meth:`graph_state` (None: the slot
        table's own tensors). Tensor work, no host decision: an in-graph adapter runs it inside its
        next forward, over every slot (``vllm/graph.py``)."""

    def end_step(self, core: "CoreEngine", step: StepMap) -> None:
        """After every patched layer of a step ran (``core.norm``, ``core.tau`` [N, L] complete),
        before the thresholds are fed: the method's per-step work — by default :meth:`step_op` on
        the core's step. A method whose per-step work is not a tensor operation overrides this (and
        is then not :meth:`in_graph`)."""
        if self.has_step_op():
            self.step_op(step, core.norm, core.tau, self.graph_state())

    @classmethod
    def has_step_op(cls) -> bool:
        """Whether the method has per-step work (:meth:`step_op`)."""
        return cls.step_op is not Method.step_op

    def step_op(self, step: StepMap, norm: torch.Tensor, tau: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        """The method's per-step work as a function of tensors (online LRS's windows), after every
        patched layer: the step map ``step`` (its ``token``: the fed token ids), the step's norms
        and τ [N, L] and the method's state tensors ``state`` (:meth:`graph_state`), written in
        place. Runs in the core's end of step and, where :meth:`in_graph`, inside an adapter's model
        graph on static buffers: no host decision."""

    def slot_values(self, extra: dict) -> dict:
        """Per-request settings a request carries in its extra arguments (vLLM's
        ``SamplingParams.extra_args``, the hf loop's ``GenRequest.extra_args``) as slot-table values
        ``{tensor name: value}`` for :meth:`SlotTable.acquire`."""
        return {}

    def read_slot(self, slot: int) -> dict:
        """Per-request results the method holds in slot tensors, read before the slot is reused
        (keys starting with ``_``: kept for :meth:`trim_meta`, not part of the record)."""
        return {}

    def trim_meta(self, meta: dict, last_fed: int) -> dict:
        """At collection, where the answer's last fed position ``last_fed`` is known: the values of
        :meth:`read_slot`'s results ``meta`` over the answer's positions only (what a forward after
        the answer ended added taken back, as its rows are dropped), to update ``meta`` with."""
        return {}


class CoreEngine:
    def __init__(self, layers: list[int], method: Method, thresholds: Thresholds, table: SlotTable):
        self.layers = list(layers)
        self.L = len(self.layers)
        self.method = method
        self.thr = thresholds
        self.table = table
        self.step: StepMap | None = None
        self.layer_calls = 0
        self._rows: StepRows | None = None
        self.steps_fused = False  # whether the end of a step runs as a compiled kernel (fuse)
        table.on_resize(thresholds.resize)
        table.on_reset(thresholds.reset_slot)

    def fuse(self) -> None:
        """Run the end of each step (:meth:`end`: the events, the threshold update, the rows), and
        the method's per-layer step where it has one (ERSS), as compiled kernels
        (:mod:`~lm_eval_telltale.core.fuse`): the same results, fewer small operations. Adapters call
        it when their model runs compiled. Compiles now (dry steps that change nothing: rows without
        a request), so compiling lands in the engine's start-up."""
        self.thr.fuse(warm=False)  # its update runs inside the end of step's kernel
        self.method.fuse()
        self.steps_fused = True
        dev = self.table.t["seed"].device
        if self._rows is None:
            self._rows = StepRows(self._row_names(), self.L, dev)
        bound = self._rows.bound
        for n in (1, 2):  # one token (its own graph) and any count ≥ 2
            self.start(torch.tensor([0, n], device=dev), torch.full((1,), -1, dtype=torch.int64, device=dev),
                       torch.zeros(n, dtype=torch.int64, device=dev))
            self.end()
        self._rows.bound = bound

    @property
    def fused(self) -> bool:
        """Whether the end of each step (the events, the threshold update, the rows) runs as a
        compiled kernel (False in eager adapters, or after a compile failure fell back to the plain
        operations)."""
        return self.steps_fused

    @property
    def method_fused(self) -> bool | None:
        """Whether the method's per-layer step runs compiled; None for a method without one."""
        return self.method.fused

    def any(self, mask: torch.Tensor) -> bool:
        """Whether any element of ``mask`` is set — the one host-side decision a method may take
        (ALRR's "skip the re-run" test). Adapters whose ranks must take it together (tensor
        parallelism: every rank runs the layer's collectives) replace it with a collective version."""
        return bool(mask.any())

    def start(self, query_start_loc: torch.Tensor, row_slot: torch.Tensor, positions: torch.Tensor,
              tokens: torch.Tensor | None = None) -> StepMap:
        """Begin a step from the adapter's own step metadata (:func:`~lm_eval_telltale.core.step.build_step`'s
        arguments): the step map and the step's buffers. Returns the step map."""
        t = self.table.t
        parts = step_tensors(*(t[k] for k in STEP_TABLES), query_start_loc, row_slot, positions)
        self._set(step_map(parts, tokens, int(row_slot.shape[0])),
                  step_buffers(self.thr.tau_table(), parts[0], parts[2], self.L, bool(self.method.modifies),
                               len(self.method.columns)))
        return self.step

    def begin(self, step: StepMap) -> None:
        """Begin a step whose map was built apart (:func:`~lm_eval_telltale.core.step.build_step`)."""
        self._set(step, step_buffers(self.thr.tau_table(), step.slot, step.decode, self.L,
                                     bool(self.method.modifies), len(self.method.columns)))

    def _set(self, step: StepMap, bufs) -> None:
        self.step = step
        self.layer_calls = 0
        self.tau, self.norm, self.event, self.norm_out, cols = bufs
        self.columns = dict(zip(self.method.columns, cols))

    def layer(self, j: int, h: torch.Tensor, r: torch.Tensor, rerun: Rerun | None = None):
        x, n = residual_norm(h, r)
        self.observe(j, n)
        h2, r2, mev = self.method.apply(self, j, h, r, x, n, self.tau[:, j], rerun)
        if mev is not None:
            self.event[:, j] = mev  # "above τ" is added for every layer at once in end()
        if self.norm_out is not None:
            self.norm_out[:, j] = residual_norm(h2, r2)[1]
        return h2, r2

    def observe(self, j: int, n: torch.Tensor) -> None:
        """Record patched layer ``j``'s norm ‖h + r‖ (:func:`residual_norm`) and count its hook.
        :meth:`layer` starts with it; an adapter calls it alone for a method that only observes
        (:meth:`Method.observes_only`), with the norm it computed itself."""
        assert self.step is not None, "CoreEngine.layer/observe called outside a step"
        self.layer_calls += 1
        self.norm[:, j] = n

    def graph_parts(self, max_rows: int, hidden: int) -> tuple[dict[str, torch.Tensor], dict, dict]:
        """What an adapter needs to run a step in its model's graph (:func:`graph_start`, the
        method's :meth:`Method.layer_op`, :func:`graph_end`): the state's tensors (``{name: tensor}``,
        to hold as static buffers: the slot table's :data:`~lm_eval_telltale.core.step.STEP_TABLES`
        and ``serial``, the rows' buffer, the τ and threshold tables as ``tau<i>``/``thr<i>``, the
        method's :meth:`Method.graph_state` as ``m_<name>``) and the constant keyword arguments of
        :func:`graph_start` and :func:`graph_end`. The state's tensors stay these from now on: the
        slot table and the rows' buffer are fixed in size (a table that would grow raises), the
        rows' buffer holds ``max_rows`` rows a step; ``hidden``: the model's hidden size
        (:meth:`Method.prepare`)."""
        self.method.prepare(hidden)
        t = self.table
        t.fixed = True
        if self._rows is None:
            self._rows = StepRows(self._row_names(), self.L, t.t["seed"].device)
        self._rows.fixed(max_rows)
        tau_fn, tau_tables, tau_consts = self.thr.tau_parts()
        thr_step, thr_sample, thr_tables, thr_consts = self.thr.update_parts()
        tensors = {k: t.t[k] for k in (*STEP_TABLES, "serial")}
        tensors.update(rows_ints=self._rows.ints, rows_floats=self._rows.floats, cursor=self._rows.cursor)
        tensors.update({f"tau{i}": x for i, x in enumerate(tau_tables)})
        tensors.update({f"thr{i}": x for i, x in enumerate(thr_tables)})
        tensors.update({f"m_{k}": x for k, x in self.method.graph_state().items()})
        start = dict(tau_fn=tau_fn, tau_consts=tau_consts, num_layers=self.L)
        end = dict(thr_step=thr_step, thr_sample=thr_sample, thr_consts=thr_consts)
        return tensors, start, end

    def _row_names(self) -> list[str]:
        return ["norm", "tau"] + (["norm_out"] if self.method.modifies else []) + list(self.method.columns)

    def end(self) -> None:
        """Set the events, feed the thresholds, advance each request's last position and keep this
        step's rows of new generated tokens on the device (:class:`StepRows`) — one compiled kernel
        when fused (:func:`end_kernel`), after the method's own end of step."""
        step = self.step
        assert step is not None
        self.method.end_step(self, step)
        if self._rows is None:
            self._rows = StepRows(self._row_names(), self.L, step.slot.device)
        rows = self._rows.reserve(step.rows or step.num_tokens)
        # in inference mode: the rows' buffers are inference tensors (StepRows), vLLM's steps run in
        # it, and a compiled kernel is specialised on it (global τ's sample is made here)
        with torch.inference_mode():
            thr_step, thr_tables, thr_inputs, thr_consts = self.thr.step_parts(step.slot, self.norm, step.new)
            floats = (self.norm, self.tau) + ((self.norm_out,) if self.norm_out is not None else ()) \
                + tuple(self.columns.values())
            tokens = (self.event, self.norm, self.tau, floats, step.slot, step.position, step.new)
            if self.steps_fused:  # the token dimension: one graph for every count (see fuse.dynamic_tokens)
                for t in (*tokens[:3], *floats, *tokens[4:]):  # (request τ's inputs are these tensors)
                    _fuse.dynamic_tokens(t)
            args = (*tokens, self.table.t["serial"], self.table.t["last_pos"], *rows)
            consts = (thr_tables, thr_inputs, thr_consts, thr_step)
            if self.steps_fused:
                _, self.steps_fused = _fuse.run(end_kernel, args, (), consts=consts, tokens=True)
            else:
                end_kernel(*args, *consts)
        self.step = None

    def reserve(self, rows: int) -> None:
        """Room for a step of ``rows`` requests in the rows' buffer, for a step the adapter runs
        itself in its model's graph (:func:`graph_start`, :func:`graph_end`; :meth:`end` does it)."""
        self._rows.reserve(rows)

    def drain(self) -> list[dict[str, torch.Tensor]]:
        """The rows of new generated tokens of every step since the last drain, on the host (row
        dicts in step order; the collection path, one host sync)."""
        return [] if self._rows is None else self._rows.drain()


def build_core(cfg, capacity: int = 64, device=None) -> CoreEngine:
    """The core engine for a resolved :class:`~lm_eval_telltale.config.TelltaleConfig`: slot table,
    thresholds in ``cfg.tau_mode`` and the method's tensor operation. Every adapter (and every
    test) builds it here."""
    from .methods import make_method

    table = SlotTable(capacity, device=device)
    thr = Thresholds(cfg.tau_mode, len(cfg.layers), table.capacity, iqr_k=cfg.iqr_k, min_iqr=cfg.min_iqr,
                     tau_floor=cfg.tau_floor, warmup=cfg.warmup, tau_values=cfg.tau_values, device=device)
    method = make_method(cfg, table, len(cfg.layers), device)
    return CoreEngine(cfg.layers, method, thr, table)
