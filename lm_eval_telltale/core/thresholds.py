"""Per-layer thresholds τ_l (docs/methods.md §1).

τ_l = Q3 + k · max(IQR, min_iqr)  (optionally at least ``tau_floor``), from streaming quartiles.

Modes:
- ``request``: one pair of P² quartile estimators per (request, layer), fed with that request's
  own generated-token norms; no decision before ``warmup`` of its tokens (the paper's wording).
- ``global``: one pair per layer shared by the engine, fed one sample per decode step = the mean
  norm over the step's decode tokens (the reference code; batch-size dependent by construction);
  warm-up counted in decode steps.
- ``fixed``: τ_l given per layer (no decision in a request's first ``warmup`` generated tokens;
  default 0).
- ``calibrated``: τ_l = the ``tau_q`` quantile of a calibration run (a file from ``telltale
  calibrate``); warm-up as in fixed mode.

τ is NaN where no decision may be taken yet: every comparison with NaN is False, so the methods
need no extra "ready" mask.

The P² algorithm (Jain & Chlamtac, 1985) is vectorised here over any leading shape: one
``update`` call feeds one sample to every estimator selected by ``mask``. Each mode's step is one
function that also gives τ for the next step, so ``tau_slots`` reads it instead of recomputing it:
every step writes its state in place (:meth:`Thresholds.step_parts`); :func:`request_step` reads
and writes only the rows of the slots that have a token in the step (its cost follows the step's
tokens, not the slot table's size). Adapters whose model runs compiled also compile that step
(:meth:`Thresholds.fuse`), and run it inside the engine's compiled end of step
(:meth:`~lm_eval_telltale.core.engine.CoreEngine.end`): one kernel instead of ~200 small operations
per step, with the same results bit for bit.
"""

from __future__ import annotations

import torch

from ..spec import IQR_K, MIN_IQR, TAU_MODES
from .fuse import run

_P = (0.25, 0.75)


class P2Quartiles:
    """Vectorised P² estimators of Q1 and Q3 over a leading shape ``shape``."""

    def __init__(self, shape: tuple[int, ...], device=None):
        self.shape = tuple(shape)
        p = torch.tensor(_P, dtype=torch.float32, device=device)  # [2]
        self.dn = torch.stack([torch.zeros_like(p), p / 2, p, (1 + p) / 2, torch.ones_like(p)], -1)  # [2,5]
        self.q = torch.zeros(*shape, 2, 5, device=device)
        self.n = torch.zeros(*shape, 2, 5, device=device)
        self.np_ = torch.zeros(*shape, 2, 5, device=device)
        self.count = torch.zeros(*shape, dtype=torch.int64, device=device)
        self._init_desired = torch.stack([torch.zeros_like(p), 2 * p, 4 * p, 2 + 2 * p, 4 * torch.ones_like(p)], -1)
        self.fused = False  # True: :meth:`run` calls compiled steps (:meth:`fuse`)
        self.reset(None)

    # -- state management --------------------------------------------------------------------
    def reset(self, index) -> None:
        """Reset estimators at ``index`` (any valid indexer of the leading shape; None = all)."""
        idx = (slice(None),) if index is None else (index,)
        with self._mode():
            self.q[idx] = 0.0
            self.n[idx] = torch.arange(5, dtype=torch.float32, device=self.n.device)
            self.np_[idx] = self._init_desired
            self.count[idx] = 0

    def resize(self, new_first: int) -> None:
        """Grow the first leading dimension (slot tables grow)."""
        old = self.shape[0]
        if new_first <= old:
            return
        grow = new_first - old

        def pad(t):
            return torch.cat([t, torch.zeros(grow, *t.shape[1:], dtype=t.dtype, device=t.device)], 0)

        with self._mode():
            self.q, self.n, self.np_, self.count = pad(self.q), pad(self.n), pad(self.np_), pad(self.count)
        self.shape = (new_first, *self.shape[1:])
        self.reset(slice(old, new_first))

    # -- estimates ---------------------------------------------------------------------------
    def quartiles(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q1, Q3); NaN where fewer than 5 samples were seen."""
        return p2_quartiles(self.q, self.count)

    # -- update ------------------------------------------------------------------------------
    def update(self, x: torch.Tensor, mask: torch.Tensor) -> None:
        """Feed sample ``x[...]`` (float) to every estimator where ``mask[...]`` is True."""
        self.run(p2_update, x.to(torch.float32), mask)

    def run(self, step, *inputs, tokens: bool = False) -> tuple:
        """Advance the state by ``step(q, n, np_, count, dn, *inputs)``, a pure function that returns
        the new ``q, n, np_, count`` and anything else, which is returned. ``tokens``: the inputs'
        first dimension counts the step's tokens (it changes from step to step)."""
        out = self._call(step, inputs, tokens)
        self.q, self.n, self.np_, self.count = out[:4]
        return tuple(out[4:])

    def write(self, step, *inputs, tables: tuple = (), tokens: bool = False) -> None:
        """Advance the state in place: ``step(q, n, np_, count, dn, *tables, *inputs)`` writes the
        rows it updates, of the state and of ``tables`` (the caller's own, e.g. τ), and returns
        nothing."""
        self._call(step, inputs, tokens, tables)

    def warm(self, step, *inputs, tables: tuple = (), tokens: bool = False) -> None:
        """Compile ``step`` for these input shapes now (a dry call that must not advance the state:
        a :meth:`write` step is given only masked-out tokens)."""
        if self.fused:
            self._call(step, inputs, tokens, tables)

    def _call(self, step, inputs: tuple, tokens: bool, tables: tuple = ()):
        state = (self.q, self.n, self.np_, self.count, self.dn, *tables)
        if not self.fused:
            with self._mode():
                return step(*state, *inputs)
        out, self.fused = run(step, state, inputs, tokens=tokens)  # inputs as warmed (see fuse)
        return out

    def fuse(self) -> None:
        """Let :meth:`run` call compiled steps (:func:`~lm_eval_telltale.core.fuse.compiled`) instead
        of their small operations one by one — the same arithmetic, bit for bit (tested). The
        owner warms (:meth:`warm`) each step it will run, for the table's shape (again after a
        :meth:`resize`), so compiling lands in the engine's start-up rather than in its steps.

        A compiled graph is specialised on its inputs, inference-mode tensors or not included, and
        vLLM steps run under ``torch.inference_mode``: so the fused estimator keeps its state as
        inference tensors, and calls (and warms) its graphs under inference mode with the step's
        inputs as contiguous inference tensors that are not views
        (:func:`~lm_eval_telltale.core.fuse.plain` copies those that are not: a graph also
        specialises on that) — one graph per shape, whoever calls."""
        self.fused = True
        with torch.inference_mode():
            self.q, self.n, self.np_, self.count = (t.clone() for t in (self.q, self.n, self.np_, self.count))
            self.dn = self.dn.clone()

    def _mode(self):
        # the state's in-place writes, and the tables made for them (request mode's τ), in the
        # state's own mode: inference tensors (a fused estimator's) are written in inference mode
        # only, and a normal state (an eager one) stays normal whoever calls, in inference mode
        # (vLLM's steps) or not
        return torch.inference_mode(self.q.is_inference())


def p2_update(q, n, np_, count, dn, x, mask):
    """One P² step over every estimator (pure: returns the new ``q, n, np_, count``). ``x``
    float32 and ``mask`` bool have the leading shape; ``dn`` [2, 5] the desired-position
    increments."""
    xe = x[..., None].expand(*x.shape, 2)  # per quantile
    c = count
    init = mask & (c < 5)
    main = mask & (c >= 5)

    # initial phase: collect the first five samples, sort when complete
    idx = c.clamp(max=4)[..., None, None].expand(*c.shape, 2, 1)
    q_init = q.scatter(-1, idx, xe[..., None])
    full = (init & (c == 4))[..., None, None]
    q_init = torch.where(full, sort5(q_init), q_init)
    q = torch.where(init[..., None, None], q_init, q)

    # main phase
    q, n, np_ = _p2_step(q, n, np_, dn, xe, main[..., None])
    return q, n, np_, c + mask.to(torch.int64)


#: a sorting network for five values (nine compare-exchanges, each pair in this order)
SORT5 = ((0, 1), (3, 4), (2, 4), (2, 3), (0, 3), (0, 2), (1, 4), (1, 3), (1, 2))


def sort5(q: torch.Tensor) -> torch.Tensor:
    """``q`` sorted along its last dimension of five, ascending, NaN last — the values of
    ``torch.sort(q, -1)``, as element-wise operations: a compiled step fuses them with the rest of
    the P² update (a sort is a kernel of its own, called every step for the one step in five
    samples that needs it)."""
    v = list(q.unbind(-1))
    for i, j in SORT5:
        a, b = v[i], v[j]
        swap = (b < a) | torch.isnan(a)
        v[i], v[j] = torch.where(swap, b, a), torch.where(swap, a, b)
    return torch.stack(v, -1)


def _p2_step(q, n, np_, dn, x, m):
    # m: [..., 1] broadcast over the two quantiles. The markers are kept as lists of columns and
    # adjusted in order (each reads its neighbours' new values), as element-wise operations only:
    # a compiled step fuses them, with no buffer per in-place column write
    k = (x[..., None] >= q[..., 1:4]).sum(-1)  # [..., 2] cell index 0..3
    ar = torch.arange(5, device=q.device)
    n_new = n + (ar > k[..., None]).to(n.dtype)
    mm = m[..., None]
    qs = list(q.unbind(-1))
    qs[0] = torch.where(m, torch.minimum(qs[0], x), qs[0])
    qs[4] = torch.where(m, torch.maximum(qs[4], x), qs[4])
    ns = list(torch.where(mm, n_new, n).unbind(-1))
    np_ = torch.where(mm, np_ + dn, np_)
    for i in (1, 2, 3):
        qi, qp1, qm1 = qs[i], qs[i + 1], qs[i - 1]
        ni, np1, nm1 = ns[i], ns[i + 1], ns[i - 1]
        d = np_[..., i] - ni
        up = np1 - ni
        dn_ = nm1 - ni
        adj = ((d >= 1) & (up > 1)) | ((d <= -1) & (dn_ < -1))
        adj = adj & m
        s = torch.sign(d)
        par = qi + s / (np1 - nm1) * ((ni - nm1 + s) * (qp1 - qi) / (np1 - ni) + (np1 - ni - s) * (qi - qm1) / (ni - nm1))
        lin_q = torch.where(s > 0, qp1, qm1)
        lin_n = torch.where(s > 0, np1, nm1)
        lin = qi + s * (lin_q - qi) / (lin_n - ni)
        ok = (qm1 < par) & (par < qp1)
        qi_new = torch.where(ok, par, lin)
        qs[i] = torch.where(adj, qi_new, qi)
        ns[i] = torch.where(adj, ni + s, ni)
    return torch.stack(qs, -1), torch.stack(ns, -1), np_


def iqr_tau(q1: torch.Tensor, q3: torch.Tensor, iqr_k: float, min_iqr: float, tau_floor: float | None) -> torch.Tensor:
    tau = q3 + iqr_k * torch.clamp(q3 - q1, min=min_iqr)
    if tau_floor is not None:
        tau = torch.clamp(tau, min=tau_floor)
    return tau


def p2_quartiles(q, count):
    """(Q1, Q3) of P² states; NaN where fewer than 5 samples were seen."""
    ready = count >= 5
    mid = q[..., 2]  # [..., 2]
    nan = torch.full_like(mid[..., 0], float("nan"))
    return torch.where(ready, mid[..., 0], nan), torch.where(ready, mid[..., 1], nan)


def p2_tau(q, count, iqr_k: float, min_iqr: float, tau_floor: float | None, ready_at: int):
    """τ of P² states: NaN before ``ready_at`` samples."""
    q1, q3 = p2_quartiles(q, count)
    tau = iqr_tau(q1, q3, iqr_k, min_iqr, tau_floor)
    return torch.where(count >= ready_at, tau, torch.full_like(tau, float("nan")))


def request_step(q, n, np_, count, dn, tau, slot, norms, mask, iqr_k, min_iqr, tau_floor, ready_at):
    """One step of request mode, in place: each new generated token's norms (``norms`` [N, L]
    float32, ``mask`` [N]) fed to its slot's (``slot`` [N]) estimators, at most one such token per
    slot, and its slot's τ for the next step written (``tau`` [S + 1, L]). The state and ``tau``
    have S + 1 rows: the last one is a dump row, where the step's other tokens read and write (it
    is never read as a slot's). Only the step's rows are gathered, updated and written back."""
    S = q.shape[0] - 1
    idx = torch.where(mask, slot, torch.full_like(slot, S))
    m = mask[:, None].expand(idx.shape[0], q.shape[1])
    qs, ns, nps, cs = p2_update(q[idx], n[idx], np_[idx], count[idx], dn, norms, m)
    q[idx] = qs
    n[idx] = ns
    np_[idx] = nps
    count[idx] = cs
    tau[idx] = p2_tau(qs, cs, iqr_k, min_iqr, tau_floor, ready_at)


def global_sample(slot, norms, mask):
    """Global mode's sample of a step: the mean norm of its new generated tokens (``norms`` [N, L],
    ``mask`` [N]) per layer, and whether it has any ([L]). The core's compiled end of step keeps
    this sum out of its kernel (a compiled reduction may add in another order:
    :mod:`~lm_eval_telltale.core.fuse`), so eager and compiled cores agree bit for bit; the in-graph
    step (:func:`~lm_eval_telltale.core.engine.graph_end`) computes it in the model's compiled
    graph, where the mean may differ from the eager one in its last bit, as the norms themselves
    may."""
    m = mask.to(torch.float32)[:, None]
    cnt = m.sum(0)  # [1] broadcast per layer
    mean = (norms.to(torch.float32) * m).sum(0) / cnt.clamp(min=1)
    return mean, (cnt > 0).expand(norms.shape[1])


def global_step(q, n, np_, count, dn, tau, mean, has, iqr_k, min_iqr, tau_floor, ready_at):
    """One step of global mode, in place: the step's sample (:func:`global_sample`) fed where it
    has one, and τ for the next step written (``tau`` [1, L])."""
    q2, n2, np2, c2 = p2_update(q, n, np_, count, dn, mean, has)
    q.copy_(q2)
    n.copy_(n2)
    np_.copy_(np2)
    count.copy_(c2)
    tau.copy_(p2_tau(q2, c2, iqr_k, min_iqr, tau_floor, ready_at)[None])


def _same(tau):
    return tau


def warmed_tau(fixed, seen, warmup: int):
    """Fixed and calibrated τ [S, L] with a warm-up: NaN for a request before ``warmup`` of its
    generated tokens (``seen`` [S])."""
    return torch.where((seen >= warmup)[:, None], fixed, torch.full_like(fixed, float("nan")))


def seen_step(seen, slot, norms, mask):
    """Fixed and calibrated τ with a warm-up, in place: count each request's new generated tokens
    (``seen`` [S]; every other token adds 0)."""
    seen.index_add_(0, slot.clamp(min=0), mask.to(seen.dtype))


class Thresholds:
    """τ for every (slot, layer) of an engine, in one of the four modes.

    ``tau_slots()`` → [S, L] (request mode; fixed/calibrated with a warm-up) or a broadcast [1, L]
    (global; fixed/calibrated without one), computed from the state *before* the current step;
    ``update(...)`` feeds the step's decode-token norms. In fixed/calibrated mode ``warmup`` counts
    the request's own generated tokens (like request mode); its default there is 0.
    """

    MODES = TAU_MODES

    def __init__(self, mode: str, num_layers: int, capacity: int, *, iqr_k: float = IQR_K, min_iqr: float = MIN_IQR,
                 tau_floor: float | None = None, warmup: int = 0, tau_values: list[float] | None = None,
                 device=None):
        if mode not in self.MODES:
            raise ValueError(f"tau_mode must be one of {self.MODES}, got {mode!r}")
        self.mode, self.L, self.iqr_k, self.min_iqr, self.tau_floor = mode, num_layers, iqr_k, min_iqr, tau_floor
        self.warmup = int(warmup)
        self.device = device
        if mode in ("fixed", "calibrated"):
            if tau_values is None or len(tau_values) != num_layers:
                raise ValueError(f"tau_mode={mode} needs one τ per patched layer ({num_layers})")
            self._fixed = torch.tensor([tau_values], dtype=torch.float32, device=device)  # [1, L]
            # with a warm-up, no decision before `warmup` of the request's own generated tokens
            self.seen = torch.zeros(capacity, dtype=torch.int64, device=device) if self.warmup > 0 else None
        elif mode == "request":
            # one row per slot and a dump row (request_step)
            self.p2 = P2Quartiles((capacity + 1, num_layers), device=device)
        else:
            self.p2 = P2Quartiles((num_layers,), device=device)
        self._tau = None  # τ from the last update (P² modes; request mode's has the dump row); None: compute it
        self.capacity = capacity
        self._warms = True  # a fused update compiles for each table shape ahead (fuse)

    @property
    def _counts_tokens(self) -> bool:
        return self.mode in ("fixed", "calibrated") and self.seen is not None

    @property
    def _consts(self) -> tuple:
        return self.iqr_k, self.min_iqr, self.tau_floor, max(self.warmup, 5)

    def fuse(self, warm: bool = True) -> None:
        """Compile the per-step update of request and global modes (:meth:`P2Quartiles.fuse`): the
        quartile update and the next step's τ in one kernel, in request mode the scatter of the
        step's tokens to their slots too. Compiles now, for the table's shape (not with ``warm``
        false: a caller that runs the update inside its own kernel, :meth:`step_parts`)."""
        if self.mode in ("request", "global"):
            self.p2.fuse()
            self._tau = None  # made again from the fused (inference) state
            self._warms = warm  # again after a resize
            self._warm()

    def _warm(self) -> None:
        p2 = self.p2
        if not (p2.fused and self._warms):
            return
        if self.mode == "request":
            tau = self._tau_table()  # the table the step writes
            for n in (1, 2):  # one token (its own graph) and any count ≥ 2; masked out: only the dump row is written
                slot = torch.zeros(n, dtype=torch.int64, device=p2.q.device)
                p2.warm(request_step, slot, torch.zeros(n, self.L, device=p2.q.device), slot.bool(), *self._consts,
                        tables=(tau,), tokens=True)
        else:  # no sample: the same state and τ written back
            p2.warm(global_step, torch.zeros(self.L, device=p2.q.device),
                    torch.zeros(self.L, dtype=torch.bool, device=p2.q.device), *self._consts, tables=(self._tau_table(),))

    @property
    def fused(self) -> bool:
        return self.mode in ("request", "global") and self.p2.fused

    def resize(self, capacity: int) -> None:
        if capacity <= self.capacity:
            return
        if self.mode == "request":
            old = self.capacity
            self.p2.resize(capacity + 1)
            self.p2.reset(old)  # the old dump row is a slot now
            if self._tau is not None:  # the new rows' τ: NaN, as of every reset estimator
                with self.p2._mode():
                    self._tau = torch.cat([self._tau[:old], self._tau.new_full((capacity + 1 - old, self.L), float("nan"))])
            self._warm()
        elif self._counts_tokens:
            self.seen = torch.cat([self.seen, self.seen.new_zeros(capacity - self.seen.shape[0])])
        self.capacity = capacity

    def reset_slot(self, slot: int) -> None:
        if self.mode == "request":
            self.p2.reset(slot)
            if self._tau is not None:  # a reset estimator's τ is NaN (0 samples < ready_at)
                with self.p2._mode():
                    self._tau[slot] = float("nan")
        elif self._counts_tokens:
            self.seen[slot] = 0

    def tau_slots(self) -> torch.Tensor:
        tau = self.tau_table()
        return tau[: self.capacity] if self.mode == "request" else tau

    def tau_parts(self) -> tuple:
        """τ as ``(fn, tables, consts)``: ``fn(*tables, *consts)`` is :meth:`tau_table` (a function
        of the state's tensors, for a step that runs in a model's graph)."""
        if self.mode in ("request", "global"):
            return _same, (self._tau_table(),), ()
        if self._counts_tokens:
            return warmed_tau, (self._fixed, self.seen), (self.warmup,)
        return _same, (self._fixed,), ()

    def tau_table(self) -> torch.Tensor:
        """τ as one tensor that is not a view, for a step to index: [rows ≥ S, L] by slot (request
        mode has a dump row more), or [1, L] for every token (global; fixed/calibrated without a
        warm-up)."""
        fn, tables, consts = self.tau_parts()
        return fn(*tables, *consts)

    def _tau_table(self) -> torch.Tensor:
        """τ from the state (P² modes), computed only before the first step (or fusing): each step
        writes the next one, and a slot's reset writes its own row. Global mode's is [1, L]."""
        if self._tau is None:
            with self.p2._mode():  # a table the fused step writes: made as its state is
                tau = p2_tau(self.p2.q, self.p2.count, *self._consts)
                self._tau = tau if self.mode == "request" else tau[None].clone()
        return self._tau

    def update_parts(self) -> tuple:
        """The update as ``(step, sample, tables, consts)``: ``step(*tables, *inputs, *consts)``
        writes the state in place, with ``inputs`` = ``sample(slot, norms, mask)`` (None: those
        three); ``(None, None, (), ())`` when τ keeps no state. See :meth:`step_parts`."""
        if self.mode in ("request", "global"):
            p2 = self.p2
            tables = (p2.q, p2.n, p2.np_, p2.count, p2.dn, self._tau_table())
            if self.mode == "request":
                return request_step, None, tables, self._consts
            return global_step, global_sample, tables, self._consts
        if self._counts_tokens:
            return seen_step, None, (self.seen,), ()
        return None, None, (), ()

    def step_parts(self, slot: torch.Tensor, norms: torch.Tensor, mask: torch.Tensor) -> tuple:
        """A step's update as ``(step, tables, inputs, consts)``: ``step(*tables, *inputs, *consts)``
        writes the state in place (:func:`request_step`, :func:`global_step`, :func:`seen_step`), or
        ``(None, (), (), ())`` when τ keeps no state. ``slot`` [N], ``norms`` [N, L] and ``mask`` [N]
        (the step's new generated tokens) as :meth:`update` takes them; ``inputs`` have the token
        dimension first, but global mode's (its sample, made here). :meth:`update` runs it; a
        compiled engine step runs it inside its own kernel
        (:meth:`~lm_eval_telltale.core.engine.CoreEngine.end`)."""
        step, sample, tables, consts = self.update_parts()
        inputs = (slot.to(torch.int64), norms.to(torch.float32), mask.to(torch.bool))
        return step, tables, inputs if sample is None else sample(*inputs), consts

    def update(self, slot: torch.Tensor, norms: torch.Tensor, mask: torch.Tensor) -> None:
        """Feed one step. ``slot``: [N] slot per token; ``norms``: [N, L]; ``mask``: [N] tokens
        that are new generated tokens. At most one such token per slot per step."""
        step, tables, inputs, consts = self.step_parts(slot, norms, mask)
        if self.mode in ("request", "global"):
            self.p2.write(step, *inputs, *consts, tables=(tables[-1],), tokens=self.mode == "request")
        elif step is not None:
            step(*tables, *inputs, *consts)
