"""``vllm-alrr``: Adaptive Layer-wise Reasoning Recursion (docs/methods.md §2).

At a patched layer l, for generated tokens:

1. pass 0 is the normal forward (KV-cache write on): (h1, r1), n0 = ‖h1 + r1‖;
2. candidates: τ < n0 < blowup·τ;
3. the SAME layer runs again on its own output, (h2, r2) = layer_l(h1, r1), with the KV-cache
   write of layer l suppressed — the cache keeps pass-0 keys/values and the re-run's queries
   attend to them (cache-read semantics). The re-run gets copies of (h1, r1): in-place kernels
   (GPU fused add-RMSNorm) would otherwise overwrite pass-0 outputs (the reference code's bug);
4. a candidate is accepted iff n2 > τ, n2 < blowup·τ and (n2 − n0)/(n0 + 1e-6) ≥ growth_eps;
   accepted tokens take (1 − α)·(h1, r1) + α·(h2, r2) (α = 1: full replacement, bit-exact),
   every other token — and every other request — keeps pass-0 bits exactly.

``max_extra_iters`` > 1 repeats 3–4 on the tokens accepted in the previous iteration, each
iteration judged against the norm before it (for the loop analysis; the paper finds 1 best).

Skipping: the re-run is skipped when no token of the step is a candidate. That test is one
``any()`` per patched layer — free on CPU, one device→host sync per layer on GPU; set
``skip_sync=false`` to always run the re-run pass instead (no sync, one extra layer forward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .engine import Method, residual_norm
from .params import checks_of, keys_of, knob
from .stats import EV_ACCEPTED, EV_CANDIDATE


@dataclass(frozen=True)
class AlrrParams:
    blowup: float = knob(1.5, "candidates and accepted re-runs stay below blowup·τ", lambda v: v > 1.0, "must be > 1")
    growth_eps: float = knob(0.2, "minimum relative norm growth (n2 − n0)/n0 for accepting a re-run")
    alpha: float = knob(1.0, "accepted state = (1 − alpha)·pass0 + alpha·re-run (1 = replacement)",
                        lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]")
    max_extra_iters: int = knob(1, "re-runs per token and layer (1 = the paper's setting)",
                                lambda v: 1 <= v <= 64, "must be in 1..64")
    skip_sync: bool = knob(True, "skip the re-run when no token is a candidate (one host sync per layer on GPU)")


KEYS = keys_of(AlrrParams)
CHECKS = checks_of(AlrrParams)


class Alrr(Method):
    name = "alrr"
    modifies = True

    def __init__(self, cfg, table, num_layers, device=None):
        super().__init__(cfg, table, num_layers, device)
        self.p = AlrrParams(**cfg.params)
        # re-run work for `telltale bench`'s compute limit: (step, layer) re-run calls and the token
        # rows they pushed through the layer — host ints from shapes and the existing skip test, no sync
        self.rerun_calls = 0
        self.rerun_rows = 0

    def apply(self, core, j, h, r, x, n, tau, rerun):
        step, p = core.step, self.p
        active = step.act & (n > tau) & (n < p.blowup * tau)
        events = torch.where(active, EV_CANDIDATE, 0).to(torch.int16)
        if rerun is None or (p.skip_sync and not core.any(active)):
            return h, r, events
        cur_h, cur_r, cur_n = h, r, n
        accepted_any = torch.zeros_like(active)
        for _ in range(p.max_extra_iters):
            h2, r2 = rerun(cur_h.clone(), cur_r.clone())
            self.rerun_calls += 1
            self.rerun_rows += int(cur_h.shape[0])
            n2 = residual_norm(h2, r2)[1]
            ok = active & (n2 > tau) & (n2 < p.blowup * tau) & ((n2 - cur_n) / (cur_n + 1e-6) >= p.growth_eps)
            if p.alpha != 1.0:
                h2 = ((1 - p.alpha) * cur_h.float() + p.alpha * h2.float()).to(h.dtype)
                r2 = ((1 - p.alpha) * cur_r.float() + p.alpha * r2.float()).to(r.dtype)
                n2 = residual_norm(h2, r2)[1]
            cur_h = torch.where(ok[:, None], h2, cur_h)
            cur_r = torch.where(ok[:, None], r2, cur_r)
            cur_n = torch.where(ok, n2, cur_n)
            accepted_any |= ok
            active = ok
            if p.max_extra_iters > 1 and p.skip_sync and not core.any(active):
                break
        events |= torch.where(accepted_any, EV_ACCEPTED, 0).to(torch.int16)
        return cur_h, cur_r, events

    def summary(self) -> dict:
        """Engine-lifetime totals of the re-run pass (``telltale_state``'s ``method``)."""
        return {"rerun_calls": self.rerun_calls, "rerun_rows": self.rerun_rows}


METHOD = Alrr
