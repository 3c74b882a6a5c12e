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

Branch-free by default: every step runs the re-run pass for all its tokens and selects per token
(:meth:`Alrr.layer_op`) — tensor work only, which vLLM's adapter runs inside the model's compiled
graph. ``skip_sync=true`` skips the pass when no token of the step is a candidate: one ``any()``
per patched layer (free on CPU, one device→host sync per layer on GPU), and the step runs through
the custom op, the re-run eagerly (docs/performance.md: slower on the shipped model at batch 1 and
64).
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
    skip_sync: bool = knob(False, "skip the re-run when no token is a candidate: one host decision (a sync on "
                                  "GPU) per patched layer, and the step leaves the model's graph")


KEYS = keys_of(AlrrParams)
CHECKS = checks_of(AlrrParams)


class Alrr(Method):
    name = "alrr"
    modifies = True

    def __init__(self, cfg, table, num_layers, device=None):
        super().__init__(cfg, table, num_layers, device)
        self.p = AlrrParams(**cfg.params)
        # re-run work for `telltale bench`'s compute limit, counted on the device: the (step, layer)
        # re-run passes and the request tokens they pushed through the layer
        self.reruns = torch.zeros(2, dtype=torch.int64, device=device)

    @classmethod
    def in_graph(cls, cfg) -> bool:
        """Without the skip decision (``skip_sync=false``) every step re-runs: tensor work only."""
        return not AlrrParams(**cfg.params).skip_sync

    def graph_state(self) -> dict[str, torch.Tensor]:
        return {"reruns": self.reruns}

    def apply(self, core, j, h, r, x, n, tau, rerun):
        return self._iterate(h, r, n, tau, core.step, self.reruns, rerun, core.any if self.p.skip_sync else None)

    def layer_op(self, j, h, r, x, n, tau, step, columns, state, rerun=None):
        """Branch-free (the in-graph step): every token of the step goes through the re-run; the
        accepted ones take its result."""
        return self._iterate(h, r, n, tau, step, state["reruns"], rerun, None)

    def _iterate(self, h, r, n, tau, step, reruns, rerun, any_):
        """Candidates, then up to ``max_extra_iters`` re-runs, each judged against the norm before it.
        ``any_``: the host decision that skips a re-run no token needs (None: always re-run)."""
        p = self.p
        active = step.act & (n > tau) & (n < p.blowup * tau)
        events = torch.where(active, EV_CANDIDATE, 0).to(torch.int16)
        if rerun is None or (any_ is not None and not any_(active)):
            return h, r, events
        cur_h, cur_r, cur_n = h, r, n
        accepted_any = torch.zeros_like(active)
        live = step.slot >= 0
        for _ in range(p.max_extra_iters):
            h2, r2 = rerun(cur_h.clone(), cur_r.clone())
            reruns += torch.stack([live.any(), live.sum()]).to(torch.int64)
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
            if p.max_extra_iters > 1 and any_ is not None and not any_(active):
                break
        events |= torch.where(accepted_any, EV_ACCEPTED, 0).to(torch.int16)
        return cur_h, cur_r, events

    def summary(self) -> dict:
        """Engine-lifetime totals of the re-run pass (``telltale_state``'s ``method``; one host read)."""
        calls, rows = self.reruns.tolist()
        return {"rerun_calls": calls, "rerun_rows": rows}


METHOD = Alrr
