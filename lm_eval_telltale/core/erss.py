"""``vllm-erss``: Endogenous Reasoning State Steering (docs/methods.md §3).

Per request and patched layer l, after the layer's normal pass, for the request's new generated
tokens (``step.act & step.new``, with a finite τ: nothing happens during the τ warm-up):

- **bank**: a token with n > τ stores a copy of x = h + r (float32) in the request's bank; the
  bank keeps the ``bank_k`` largest-norm vectors (a new vector replaces the smallest one when the
  bank is full and it is strictly larger);
- **streak**: ``low_streak`` counts consecutive tokens with n < γ·τ and resets on any other one;
- **cooldown**: the number of following tokens that may not inject;
- **trigger**: low_streak ≥ ``low_k``, cooldown 0 and a draw u < ``p_inject``; then the bank
  vector v of highest cosine with x is chosen and, if cos ≥ ``cos_min``, injected:
  h ← h + β·(v − r), so x' = x + β·(v − r) (the reference code's rule, not a convex mix; r is
  returned unchanged; without a residual, h ← h + β·v); then low_streak = 0, cooldown = ``cooldown``.
  An attempt whose best cosine is below ``cos_min`` (or whose bank is empty) changes nothing:
  the streak stays armed and the next token draws again.

Order within one token (the reference code's ``erss_adaptive.py`` order):

1. cooldown: ``blocked = cooldown > 0``, then cooldown decreases by one (not below 0). So after an
   injection at token t, exactly the ``cooldown`` tokens t+1 … t+cooldown are blocked. (The
   reference decrements *before* testing, which blocks one token fewer.)
2. bank update with this token's x (before the trigger): with γ > 1 a token with τ < n < γ·τ is
   both banked and low, and the vector stored this step may be the one chosen (cos = 1, so
   x' = x + β·h). With γ ≤ 1 a banked token is never low, so this cannot happen.
3. streak update with this token, then the trigger test — the decision uses the streak AFTER this
   token: the token that completes a run of ``low_k`` low tokens is the first that may be injected.
4. injection (into this token's h; later layers and later tokens see it), streak/cooldown reset.

The bank and the cosine use the pre-injection x of this layer. Preemption: the slot (and with it
the bank, streak and cooldown) survives; re-fed old positions (not ``new``) are neither counted
nor steered, so their recomputed K/V do not carry earlier injections.

State lives in slot tensors of the :class:`~lm_eval_telltale.core.state.SlotTable` (reset when a
request acquires its slot): ``erss_bank`` [S, L, K+1, hidden] float32 (allocated at the first
step, when the hidden size is known), ``erss_bank_norm`` [S, L, K+1] (−inf = empty),
``erss_streak`` and ``erss_cooldown`` [S, L]. Entry K of each bank is a scratch entry that absorbs
the writes of tokens that store nothing, so one ``index_put_`` per step writes the bank with no
host sync and no duplicate indices among real writes. A step works on the first min(N, S) tokens
in "new first" order (a stable sort; at most one new token per request per step), so a prefill
chunk of thousands of tokens costs no bank gathers. Memory: S·L·(K+1)·hidden·4 bytes, e.g.
S = 512 slots (2 × max_num_seqs), 6 layers, K = 32, hidden 2048 → 0.8 GiB (allocated after vLLM
sized its KV cache; lower ``max_num_seqs`` or ``bank_k`` if the device is tight).

Draws: :func:`~lm_eval_telltale.core.rng.uniform` of (request seed, position, model layer,
``STREAM``) — reproducible and independent of the batch.

Recorded per (token, layer) besides the event bits (``EV_BANKED``, ``EV_INJECTED``):
``erss_cos`` (best cosine at every attempt with a non-empty bank), ``erss_vnorm`` (norm of the
injected vector), ``erss_bank`` (bank occupancy after the token). :meth:`ErssMethod.summarize_columns`
turns them into the sidecar's per-layer ``inject_positions`` (absolute positions),
``inject_cos``, ``inject_vnorm``, ``inject_rejected`` (attempts below ``cos_min``),
``bank_max`` and ``bank_last``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .engine import Method
from .params import checks_of, keys_of, knob
from .rng import uniform
from .stats import EV_BANKED, EV_INJECTED

STREAM = 0xE255

@dataclass(frozen=True)
class ErssParams:
    bank_k: int = knob(32, "bank size per request and patched layer: the bank_k largest-norm states x = h + r "
                           "among the request's generated tokens with n > τ", lambda v: 1 <= v <= 4096, "must be in 1..4096")
    gamma: float = knob(1.0, "a generated token is 'low' when n < gamma·τ", lambda v: v > 0, "must be > 0")
    low_k: int = knob(40, "consecutive low tokens that arm an injection attempt", lambda v: v >= 1, "must be >= 1")
    p_inject: float = knob(0.2, "probability that an armed token attempts an injection (per request, position, layer)",
                           lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]")
    cos_min: float = knob(0.5, "inject only if the best bank vector's cosine with x is >= cos_min (-1: always)",
                          lambda v: -1.0 <= v <= 1.0, "must be in [-1, 1]")
    cooldown: int = knob(32, "generated tokens after an injection during which that request/layer cannot inject",
                         lambda v: v >= 0, "must be >= 0")
    beta: float = knob(0.5, "injection strength: h ← h + beta·(v − r), i.e. x' = x + beta·(v − r) (0: a no-op "
                            "control that keeps the trigger bookkeeping)", lambda v: v >= 0, "must be >= 0")


KEYS = keys_of(ErssParams)
CHECKS = checks_of(ErssParams)

COLUMNS = ("erss_cos", "erss_vnorm", "erss_bank")


class ErssMethod(Method):
    name = "erss"
    modifies = True
    columns = COLUMNS

    def __init__(self, cfg, table, num_layers, device=None):
        super().__init__(cfg, table, num_layers, device)
        self.p = ErssParams(**cfg.params)
        self.layer_ids = list(cfg.layers)
        if len(self.layer_ids) != num_layers:
            raise ValueError(f"erss: {num_layers} patched layers but cfg.layers = {self.layer_ids}")
        L, K = num_layers, self.p.bank_k
        table.register("erss_bank_norm", (L, K + 1), torch.float32, float("-inf"))
        table.register("erss_streak", (L,), torch.int32, 0)
        table.register("erss_cooldown", (L,), torch.int32, 0)
        self.hidden: int | None = None
        self._step = None

    # -- state ---------------------------------------------------------------------------------
    def _ensure_bank(self, hidden: int) -> None:
        if self.hidden is None:
            self.table.register("erss_bank", (self.L, self.p.bank_k + 1, hidden), torch.float32, 0.0)
            self.hidden = hidden
        elif hidden != self.hidden:
            raise ValueError(f"erss: hidden size changed from {self.hidden} to {hidden}")

    def _prepare(self, step) -> None:
        """Once per step: the tokens that may carry state (new ones first), at most one per slot."""
        m = min(step.num_tokens, self.table.capacity)
        key = (~(step.new & step.act)).to(torch.int8)
        order = torch.argsort(key, stable=True)[:m]
        self._step = step
        self._order = order
        self._live = (step.new & step.act)[order]
        self._sl = step.slot[order].clamp(min=0)
        self._seed = step.seed[order]
        self._pos = step.position[order]

    @staticmethod
    def _scatter_col(col: torch.Tensor, idx: torch.Tensor, val: torch.Tensor) -> None:
        """``col[idx] = val`` for a per-slot column, where idx == len(col) means 'drop'."""
        ext = torch.cat([col, col.new_zeros(1)])
        ext.scatter_(0, idx, val.to(col.dtype))
        col.copy_(ext[:-1])

    # -- the step --------------------------------------------------------------------------------
    def apply(self, core, j, h, r, x, n, tau, rerun):
        step = core.step
        self._ensure_bank(int(x.shape[-1]))
        if step is not self._step:
            self._prepare(step)
        o, sl = self._order, self._sl
        if o.numel() == 0:
            return h, r, None
        t = self.table.t
        K, S = self.p.bank_k, self.table.capacity
        ts, ns, xs = tau[o], n[o], x[o]
        act = self._live & torch.isfinite(ts)

        bn = t["erss_bank_norm"][sl, j, :K]            # [M, K] copies
        bank = t["erss_bank"][sl, j, :K]               # [M, K, H]
        streak = t["erss_streak"][sl, j]
        cd = t["erss_cooldown"][sl, j]
        ar = torch.arange(o.numel(), device=o.device)

        # 1. cooldown
        blocked = cd > 0
        cd1 = (cd - 1).clamp(min=0)
        # 2. bank update (copy of x; the smallest entry is replaced, empties first)
        minv, pos = bn.min(dim=1)
        store = act & (ns > ts) & (ns > minv)
        bn[ar, pos] = torch.where(store, ns, bn[ar, pos])
        bank[ar, pos] = torch.where(store[:, None], xs, bank[ar, pos])
        filled = torch.isfinite(bn)
        # 3. streak, trigger
        streak1 = torch.where(ns < self.p.gamma * ts, streak + 1, torch.zeros_like(streak))
        u = uniform(self._seed, self._pos, self.layer_ids[j], STREAM)
        attempt = act & (streak1 >= self.p.low_k) & ~blocked & (u < self.p.p_inject)
        vn = torch.where(filled, bn, torch.zeros_like(bn))
        dots = torch.einsum("mkh,mh->mk", bank, xs)
        cos = dots / ((vn + 1e-6) * (ns + 1e-6)[:, None])
        cos = torch.where(filled, cos, torch.full_like(cos, float("-inf")))
        best_cos, best = cos.max(dim=1)
        inject = attempt & (best_cos >= self.p.cos_min)
        # 4. injection
        v = bank[ar, best]
        hs = h[o]
        delta = v if r is None else v - r[o].float()
        h_new = torch.where(inject[:, None], (hs.float() + self.p.beta * delta).to(h.dtype), hs)
        h2 = h.clone()
        h2[o] = h_new
        streak2 = torch.where(inject, torch.zeros_like(streak1), streak1)
        cd2 = torch.where(inject, torch.full_like(cd1, self.p.cooldown), cd1)

        # write back (only act tokens; the others go to the dump index / scratch entry)
        drop = torch.where(act, sl, torch.full_like(sl, S))
        self._scatter_col(t["erss_streak"][:, j], drop, streak2)
        self._scatter_col(t["erss_cooldown"][:, j], drop, cd2)
        pos_w = torch.where(store, pos, torch.full_like(pos, K))
        t["erss_bank_norm"][:, j].index_put_((sl, pos_w), torch.where(store, ns, torch.full_like(ns, float("-inf"))))
        t["erss_bank"][:, j].index_put_((sl, pos_w), xs)

        # records
        nan = torch.full_like(ns, float("nan"))
        cols = core.columns
        cols["erss_cos"][o, j] = torch.where(attempt & torch.isfinite(best_cos), best_cos, nan)
        cols["erss_vnorm"][o, j] = torch.where(inject, vn[ar, best], nan)
        cols["erss_bank"][o, j] = torch.where(act, filled.sum(1).to(torch.float32), nan)
        ev_s = (torch.where(store, EV_BANKED, 0) | torch.where(inject, EV_INJECTED, 0)).to(torch.int16)
        ev = torch.zeros(n.shape[0], dtype=torch.int16, device=n.device)
        ev[o] = ev_s
        return h2, r, ev

    # -- reporting -------------------------------------------------------------------------------
    def summarize_columns(self, position: np.ndarray, cols: dict[str, np.ndarray], events: np.ndarray,
                          layers: list[int]) -> dict[str, dict]:
        out: dict[str, dict] = {}
        T = len(position)
        for j, layer in enumerate(layers):
            inj = (events[:, j] & EV_INJECTED) != 0 if T else np.zeros(0, bool)
            cos = cols["erss_cos"][:, j] if "erss_cos" in cols else np.full(T, np.nan)
            vn = cols["erss_vnorm"][:, j] if "erss_vnorm" in cols else np.full(T, np.nan)
            bank = cols["erss_bank"][:, j] if "erss_bank" in cols else np.full(T, np.nan)
            fb = bank[np.isfinite(bank)]
            out[str(layer)] = {
                "inject_positions": [int(p) for p in position[inj]],
                "inject_cos": [round(float(c), 5) for c in cos[inj]],
                "inject_vnorm": [round(float(c), 5) for c in vn[inj]],
                "inject_rejected": int((np.isfinite(cos) & ~inj).sum()),
                "bank_max": int(fb.max()) if fb.size else 0,
                "bank_last": int(fb[-1]) if fb.size else 0,
            }
        return out

    def summary(self) -> dict:
        t = self.table.t
        live = t["serial"] >= 0
        has = torch.isfinite(t["erss_bank_norm"][:, :, : self.p.bank_k]).flatten(1).any(1)
        armed = (t["erss_streak"] > 0).any(1) | (t["erss_cooldown"] > 0).any(1)
        nbytes = 0 if self.hidden is None else t["erss_bank"].numel() * 4
        return {
            "bank_k": self.p.bank_k,
            "hidden": self.hidden,
            "bank_mib": round(nbytes / 2**20, 3),
            "live_with_state": int((live & (has | armed)).sum()),
        }


METHOD = ErssMethod
