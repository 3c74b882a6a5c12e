"""``vllm-suppress``: the causal ablation of docs/methods.md §5.

At a patched layer, selected generated tokens get their residual stream scaled down. Both parts
of vLLM's fused residual are scaled by the same factor f, so h' + r' = f·(h + r) = x' and the
next layer sees exactly the suppressed stream:

- ``suppress_mode=high`` (default): tokens with n > τ_l. ``action=scale`` → f = ``scale`` (0.1);
  ``action=clamp`` → f = min(1, (τ/``clamp_div``)/n), i.e. ‖x'‖ ≤ τ/4.
- ``suppress_mode=random``: every generated token/layer past the warm-up (τ defined) with
  probability ``p`` (0.05), from counter-based draws seeded by the request (reproducible,
  independent of the batch). The reference code's random mode also waits out the warm-up.
- ``suppress_mode=matched``: random suppression at the rate the high-norm rule suppressed —
  per layer, from a reference run's sidecar (``match_stats=<sidecar.jsonl>``), from explicit
  rates (``match_rate=0.03`` or a JSON list per layer), or, with neither, online: the running
  fraction of generated tokens above τ in this run (engine-wide). It draws only among tokens
  that have a τ (past warm-up) — the population the high rule chooses from — and the rates are
  per such token, so the control hits the same tokens' share as the high rule, not earlier ones.
  This is the control the paper describes ("random suppression of the same proportion") and the
  reference code lacks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .engine import Method
from .params import checks_of, keys_of, knob
from .rng import uniform
from .stats import EV_SUPPRESSED

STREAM = 0x5AFE

MODES = ("high", "random", "matched")
ACTIONS = ("scale", "clamp")


@dataclass(frozen=True)
class SuppressParams:
    suppress_mode: str = knob("high", "high | random | matched", lambda v: v in MODES,
                              "must be high, random or matched")
    action: str = knob("scale", "scale (x' = scale·x) | clamp (‖x'‖ ≤ τ/clamp_div), in every suppress_mode",
                       lambda v: v in ACTIONS, "must be scale or clamp")
    scale: float = knob(0.1, "suppression factor for action=scale", lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]")
    clamp_div: float = knob(4.0, "action=clamp bound: ‖x'‖ ≤ τ/clamp_div", lambda v: v > 0, "must be > 0")
    p: float = knob(0.05, "suppression probability per generated token and layer (random mode)",
                    lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]")
    match_rate: Any = knob(None, "matched mode: rate (a number, or a JSON list per patched layer)")
    match_stats: Any = knob(None, "matched mode: sidecar JSONL of a suppress_mode=high run to take per-layer "
                                  "rates from")


KEYS = keys_of(SuppressParams)
CHECKS = checks_of(SuppressParams)


def rates_from_rows(rows: list[dict], layers: list[int]) -> list[float]:
    """Per-layer suppression rate of a high-mode run, from its sidecar rows: suppressed tokens per
    token that had a τ (past warm-up; older sidecars without ``tau_ready``: per generated token)."""
    sup = {str(l): 0 for l in layers}
    tok = {str(l): 0 for l in layers}
    for row in rows:
        for l, st in (row.get("layers") or {}).items():
            if l in sup:
                sup[l] += int(st.get("suppressed", 0))
                tok[l] += int(st.get("tau_ready", st.get("count", 0)))
    missing = [l for l in sup if tok[l] == 0]
    if missing:
        raise ValueError(f"no generated tokens recorded for layer {missing[0]}")
    return [sup[l] / tok[l] for l in sup]


class Suppress(Method):
    name = "suppress"
    modifies = True

    def __init__(self, cfg, table, num_layers, device=None):
        super().__init__(cfg, table, num_layers, device)
        self.p = SuppressParams(**cfg.params)
        rates = self.p.match_rate
        self.rates = torch.tensor(rates, dtype=torch.float32, device=device) if rates is not None else None
        # online matching: generated tokens seen / above τ, per layer (engine-wide)
        self.seen = torch.zeros(num_layers, dtype=torch.float32, device=device)
        self.above = torch.zeros(num_layers, dtype=torch.float32, device=device)

    @classmethod
    def engine_wide(cls, cfg) -> bool:
        p = SuppressParams(**cfg.params)
        return p.suppress_mode == "matched" and p.match_rate is None  # online rates: every request's tokens

    def graph_state(self) -> dict[str, torch.Tensor]:
        state = {"seen": self.seen, "above": self.above}
        if self.rates is not None:
            state["rates"] = self.rates
        return state

    def layer_op(self, j, h, r, x, n, tau, step, columns, state, rerun=None):
        if self.p.suppress_mode == "high":
            mask = step.act & (n > tau)
        else:
            if self.p.suppress_mode == "random":
                prob = self.p.p
            elif "rates" in state:
                prob = state["rates"][j]
            else:
                seen, above = state["seen"], state["above"]
                prob = above[j] / seen[j].clamp(min=1.0)
                newf = (step.new & torch.isfinite(tau)).to(torch.float32)
                seen[j] += newf.sum()
                above[j] += (newf * (n > tau).to(torch.float32)).sum()
            # the controls draw from the tokens the high rule could have hit (τ defined, i.e. past
            # warm-up) — matched at the high run's rate per such token: same population, same rate
            mask = step.act & torch.isfinite(tau) & (uniform(step.seed, step.position, self.cfg.layers[j], STREAM) < prob)
        if self.p.action == "clamp":
            f = torch.clamp((tau / self.p.clamp_div) / n.clamp(min=1e-12), max=1.0)
        else:
            f = torch.full_like(n, self.p.scale)
        f = torch.where(mask, f, torch.ones_like(f))[:, None]
        h2 = torch.where(mask[:, None], (h.float() * f).to(h.dtype), h)
        r2 = torch.where(mask[:, None], (r.float() * f).to(r.dtype), r)
        return h2, r2, torch.where(mask, EV_SUPPRESSED, 0).to(torch.int16)


METHOD = Suppress
