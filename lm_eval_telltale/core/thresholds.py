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
``update`` call feeds one sample to every estimator selected by ``mask``. Adapters whose model
runs compiled also compile that update (:meth:`Thresholds.fuse`): one kernel instead of ~170
small operations per step, with the same results bit for bit.
"""

from __future__ import annotations

import contextlib

import torch

from ..spec import TAU_MODES
from .fuse import compiled, fallback

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
        self._update = p2_update
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
        self._warm()

    # -- estimates ---------------------------------------------------------------------------
    def quartiles(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q1, Q3); NaN where fewer than 5 samples were seen."""
        ready = (self.count >= 5)
        mid = self.q[..., 2]  # [..., 2]
        nan = torch.full_like(mid[..., 0], float("nan"))
        return torch.where(ready, mid[..., 0], nan), torch.where(ready, mid[..., 1], nan)

    # -- update ------------------------------------------------------------------------------
    def update(self, x: torch.Tensor, mask: torch.Tensor) -> None:
        """Feed sample ``x[...]`` (float) to every estimator where ``mask[...]`` is True."""
        if self._update is p2_update:
            out = p2_update(self.q, self.n, self.np_, self.count, self.dn, x.to(torch.float32), mask)
        else:
            with torch.inference_mode():  # the inputs the compiled graph was warmed with (see fuse)
                args = (self.q, self.n, self.np_, self.count, self.dn,
                        x.to(torch.float32, memory_format=torch.contiguous_format, copy=True),
                        mask.to(torch.bool, memory_format=torch.contiguous_format, copy=True))
                try:
                    out = self._update(*args)
                except Exception as e:  # noqa: BLE001 — the plain operations give the same numbers
                    self._update = fallback(p2_update, e)
                    out = p2_update(*args)
        self.q, self.n, self.np_, self.count = out

    def fuse(self) -> None:
        """Run :meth:`update` as one compiled kernel (:func:`~lm_eval_telltale.core.fuse.compiled`)
        instead of ~170 small operations — the same arithmetic, bit for bit (tested). Compiles now,
        for the table's current shape (again after a :meth:`resize`), so the cost lands in the
        engine's start-up rather than in its first step.

        A compiled graph is specialised on its inputs, inference-mode tensors or not included, and
        vLLM steps run under ``torch.inference_mode``: so the fused estimator keeps its state as
        inference tensors, and calls (and warms) its graph under inference mode with contiguous
        copies of the step's inputs (vLLM's are views or expanded, which a graph also specialises
        on) — one graph per shape, whoever calls."""
        self._update = compiled(p2_update)
        with torch.inference_mode():
            self.q, self.n, self.np_, self.count = (t.clone() for t in (self.q, self.n, self.np_, self.count))
            self.dn = self.dn.clone()
        self._warm()

    @property
    def fused(self) -> bool:
        return self._update is not p2_update

    def _mode(self):
        # the state's in-place writes: inference tensors (a fused estimator's, or any estimator's
        # after a step under vLLM's inference mode) take them in inference mode only
        return torch.inference_mode() if self.q.is_inference() else contextlib.nullcontext()

    def _warm(self) -> None:
        if self.fused:  # a dry call (no estimator selected; the update is pure) compiles this shape
            with torch.inference_mode():
                try:
                    self._update(self.q, self.n, self.np_, self.count, self.dn,
                                 torch.zeros_like(self.q[..., 0, 0]), torch.zeros_like(self.count, dtype=torch.bool))
                except Exception as e:  # noqa: BLE001
                    self._update = fallback(p2_update, e)


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
    q_init = torch.where(full, torch.sort(q_init, dim=-1).values, q_init)
    q = torch.where(init[..., None, None], q_init, q)

    # main phase
    q, n, np_ = _p2_step(q, n, np_, dn, xe, main[..., None])
    return q, n, np_, c + mask.to(torch.int64)


def _p2_step(q, n, np_, dn, x, m):
    # m: [..., 1] broadcast over the two quantiles
    k = (x[..., None] >= q[..., 1:4]).sum(-1)  # [..., 2] cell index 0..3
    q0 = torch.minimum(q[..., 0], x)
    q4 = torch.maximum(q[..., 4], x)
    q_new = torch.cat([q0[..., None], q[..., 1:4], q4[..., None]], -1)
    ar = torch.arange(5, device=q.device)
    n_new = n + (ar > k[..., None]).to(n.dtype)
    np_new = np_ + dn
    # fresh tensors (not the state's), so the markers below are adjusted in place, in order
    q = torch.where(m[..., None], q_new, q)
    n = torch.where(m[..., None], n_new, n)
    np_ = torch.where(m[..., None], np_new, np_)
    for i in (1, 2, 3):
        d = np_[..., i] - n[..., i]
        up = n[..., i + 1] - n[..., i]
        dn_ = n[..., i - 1] - n[..., i]
        adj = ((d >= 1) & (up > 1)) | ((d <= -1) & (dn_ < -1))
        adj = adj & m
        s = torch.sign(d)
        qi, qp1, qm1 = q[..., i], q[..., i + 1], q[..., i - 1]
        ni, np1, nm1 = n[..., i], n[..., i + 1], n[..., i - 1]
        par = qi + s / (np1 - nm1) * ((ni - nm1 + s) * (qp1 - qi) / (np1 - ni) + (np1 - ni - s) * (qi - qm1) / (ni - nm1))
        lin_q = torch.where(s > 0, qp1, qm1)
        lin_n = torch.where(s > 0, np1, nm1)
        lin = qi + s * (lin_q - qi) / (lin_n - ni)
        ok = (qm1 < par) & (par < qp1)
        qi_new = torch.where(ok, par, lin)
        q[..., i] = torch.where(adj, qi_new, qi)
        n[..., i] = torch.where(adj, ni + s, ni)
    return q, n, np_


def iqr_tau(q1: torch.Tensor, q3: torch.Tensor, iqr_k: float, min_iqr: float, tau_floor: float | None) -> torch.Tensor:
    tau = q3 + iqr_k * torch.clamp(q3 - q1, min=min_iqr)
    if tau_floor is not None:
        tau = torch.clamp(tau, min=tau_floor)
    return tau


class Thresholds:
    """τ for every (slot, layer) of an engine, in one of the four modes.

    ``tau_slots()`` → [S, L] (request mode; fixed/calibrated with a warm-up) or a broadcast [1, L]
    (global; fixed/calibrated without one), computed from the state *before* the current step;
    ``update(...)`` feeds the step's decode-token norms. In fixed/calibrated mode ``warmup`` counts
    the request's own generated tokens (like request mode); its default there is 0.
    """

    MODES = TAU_MODES

    def __init__(self, mode: str, num_layers: int, capacity: int, *, iqr_k: float = 1.5, min_iqr: float = 1e-3,
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
            self._fixed = torch.tensor(tau_values, dtype=torch.float32, device=device)[None, :]
            # with a warm-up, no decision before `warmup` of the request's own generated tokens
            self.seen = torch.zeros(capacity, dtype=torch.int64, device=device) if self.warmup > 0 else None
        elif mode == "request":
            self.p2 = P2Quartiles((capacity, num_layers), device=device)
        else:
            self.p2 = P2Quartiles((num_layers,), device=device)

    @property
    def _counts_tokens(self) -> bool:
        return self.mode in ("fixed", "calibrated") and self.seen is not None

    def fuse(self) -> None:
        """Compile the per-step quartile update (request and global modes; see :meth:`P2Quartiles.fuse`)."""
        if self.mode in ("request", "global"):
            self.p2.fuse()

    @property
    def fused(self) -> bool:
        return self.mode in ("request", "global") and self.p2.fused

    def resize(self, capacity: int) -> None:
        if self.mode == "request":
            self.p2.resize(capacity)
        elif self._counts_tokens and capacity > self.seen.shape[0]:
            self.seen = torch.cat([self.seen, self.seen.new_zeros(capacity - self.seen.shape[0])])

    def reset_slot(self, slot: int) -> None:
        if self.mode == "request":
            self.p2.reset(slot)
        elif self._counts_tokens:
            self.seen[slot] = 0

    def tau_slots(self) -> torch.Tensor:
        if self.mode in ("fixed", "calibrated"):
            if not self._counts_tokens:
                return self._fixed
            ready = (self.seen >= self.warmup)[:, None]
            return torch.where(ready, self._fixed, torch.full_like(self._fixed, float("nan")))
        q1, q3 = self.p2.quartiles()
        tau = iqr_tau(q1, q3, self.iqr_k, self.min_iqr, self.tau_floor)
        ready = self.p2.count >= max(self.warmup, 5)
        tau = torch.where(ready, tau, torch.full_like(tau, float("nan")))
        return tau if self.mode == "request" else tau[None, :]

    def update(self, slot: torch.Tensor, norms: torch.Tensor, mask: torch.Tensor) -> None:
        """Feed one step. ``slot``: [N] slot per token; ``norms``: [N, L]; ``mask``: [N] tokens
        that are new generated tokens. At most one such token per slot per step."""
        if self.mode == "request":
            S = self.p2.shape[0]
            idx = torch.where(mask, slot, torch.full_like(slot, S))  # dump non-decode tokens in row S
            x = torch.zeros(S + 1, self.L, device=norms.device, dtype=torch.float32)
            x[idx] = norms.to(torch.float32)
            has = torch.zeros(S + 1, dtype=torch.bool, device=norms.device)
            has[idx] = True
            self.p2.update(x[:S], has[:S, None].expand(S, self.L))
        elif self.mode == "global":
            m = mask.to(torch.float32)[:, None]
            cnt = m.sum(0)  # [1] broadcast per layer
            mean = (norms.to(torch.float32) * m).sum(0) / cnt.clamp(min=1)
            self.p2.update(mean, (cnt > 0).expand(self.L))
        elif self._counts_tokens:
            S = self.seen.shape[0]
            idx = torch.where(mask, slot, torch.full_like(slot, S))
            self.seen = torch.cat([self.seen, self.seen.new_zeros(1)]).index_add_(
                0, idx, torch.ones_like(idx))[:S]
