"""Per-answer statistics from a request's generated-token trace (docs/methods.md §4).

For each patched layer, over the T generated tokens of one answer (norm n_t, threshold τ_t):
  count = T, mean, max,
  A = Σ n_t,  B = Σ max(0, n_t − τ_t),  C = Σ [n_t > τ_t],
  D = B over the last 30 % of the tokens (t ≥ ⌊0.7·T⌋),
  late_sum = Σ n_t over the last third (t ≥ ⌊2T/3⌋),
τ summary (first/last finite value, mean) and event counters. A NaN τ (warm-up) contributes 0 to
B, C and D.
"""

from __future__ import annotations

import numpy as np

# event bits written by the methods, per (token, layer)
EV_ABOVE = 1        # n > τ
EV_SUPPRESSED = 2   # suppression applied
EV_CANDIDATE = 4    # ALRR: τ < n0 < blowup·τ, second pass run
EV_ACCEPTED = 8     # ALRR: second pass accepted
EV_INJECTED = 16    # ERSS: bank vector injected
EV_BANKED = 32      # ERSS: stored in the bank

EVENT_NAMES = {
    "above_tau": EV_ABOVE,
    "suppressed": EV_SUPPRESSED,
    "recursed": EV_CANDIDATE,
    "accepted": EV_ACCEPTED,
    "injected": EV_INJECTED,
    "banked": EV_BANKED,
}


def late_start(t: int, frac: float) -> int:
    """First index of the last ``frac`` of ``t`` tokens."""
    return int(np.floor((1.0 - frac) * t + 1e-9))


def summarize(norms: np.ndarray, tau: np.ndarray, events: np.ndarray | None, layers: list[int]) -> dict:
    """norms, tau, events: [T, L] arrays (token order). Returns {layer: {stat: value}}."""
    norms = np.asarray(norms, dtype=np.float64)
    tau = np.asarray(tau, dtype=np.float64)
    t = norms.shape[0]
    out: dict[str, dict] = {}
    d0 = late_start(t, 0.3)
    l0 = (2 * t) // 3
    for j, layer in enumerate(layers):
        n = norms[:, j]
        tj = tau[:, j]
        fin = np.isfinite(tj)
        exc = np.where(fin, np.maximum(0.0, n - np.where(fin, tj, 0.0)), 0.0)
        above = fin & (n > np.where(fin, tj, np.inf))
        rec = {
            "count": int(t),
            "mean": float(n.mean()) if t else 0.0,
            "max": float(n.max()) if t else 0.0,
            "A": float(n.sum()),
            "B": float(exc.sum()),
            "C": int(above.sum()),
            "D": float(exc[d0:].sum()),
            "late_sum": float(n[l0:].sum()),
            "tau_first": float(tj[fin][0]) if fin.any() else None,
            "tau_last": float(tj[fin][-1]) if fin.any() else None,
            "tau_mean": float(tj[fin].mean()) if fin.any() else None,
            "tau_ready": int(fin.sum()),
        }
        if events is not None:
            ev = np.asarray(events)[:, j]
            for name, bit in EVENT_NAMES.items():
                if name == "above_tau":
                    continue
                c = int(((ev & bit) != 0).sum())
                if c:
                    rec[name] = c
        out[str(layer)] = rec
    return out
