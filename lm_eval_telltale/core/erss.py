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
step, when the hidden size is known, or ahead by :meth:`ErssMethod.prepare` for a step in a
model's graph), ``erss_bank_norm`` [S, L, K+1] (−inf = empty),
``erss_streak`` and ``erss_cooldown`` [S, L]. Entry K of each bank is a scratch entry that absorbs
the writes of tokens that store nothing, so one ``index_put_`` per step writes the bank with no
host sync and no duplicate indices among real writes. A step of N ≤ S tokens works on all of them
in their order (each token's work is its own); a longer one (a prefill chunk of thousands of
tokens) on the first S in "new first" order (:func:`new_first`; at most one new token per request
per step), gathered and scattered back, so it costs no more bank gathers than S. In a model's graph
(:meth:`ErssMethod.layer_op`, vLLM's in-graph step) every step takes this gathered form on the
first min(N, S) tokens — no host decision, the same numbers (tested). Memory:
S·L·(K+1)·hidden·4 bytes, e.g. S = 512 slots (2 × max_num_seqs), 6 layers, K = 32, hidden 2048 →
0.8 GiB (the in-graph step allocates it when the engine starts, before vLLM measures its memory for
the KV cache; the ops' path at the first step, after; lower ``max_num_seqs`` or ``bank_k`` if the
device is tight).

Compiled: in the in-graph step, inside the model's compiled graph; on the ops' path (tensor or
pipeline parallelism), when the model runs compiled (:meth:`~lm_eval_telltale.core.engine.CoreEngine.fuse`),
each layer's step (:func:`erss_layer`) is one compiled kernel instead of ~60 small operations,
compiled at a request's first steps (one graph for a single token, one for any count up to S). Its
dot products with the bank (:func:`bank_dots`) are element-wise products and additions in one
fixed pairwise order, so a token's are the same bits in any step, and the compiled kernel keeps
that order: on a CPU (inductor compiles C++ without contracting a product and a sum) it gives the
plain operations' numbers bit for bit (tested); a GPU kernel may fuse a product and an addition
into one rounding, so its cosines may part from eager ones in the last bit. On the ops' path a step
of more than S tokens runs the plain operations.

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
from .fuse import run
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
        # per patched layer: (its index, its model layer) as 0-dim tensors — one compiled graph for all
        self._jt = [(torch.tensor(i, device=device), torch.tensor(l, device=device))
                    for i, l in enumerate(self.layer_ids)]
        self.fused = False  # True: each layer's step runs as one compiled kernel (:meth:`fuse`)

    # -- state ---------------------------------------------------------------------------------
    def _ensure_bank(self, hidden: int) -> None:
        if self.hidden is None:
            self.table.register("erss_bank", (self.L, self.p.bank_k + 1, hidden), torch.float32, 0.0)
            self.hidden = hidden
        elif hidden != self.hidden:
            raise ValueError(f"erss: hidden size changed from {self.hidden} to {hidden}")

    def _prepare(self, step) -> None:
        """Once per step of at most the table's size: every token may carry state, in the step's order."""
        self._step = step
        self._sel = (step.new & step.act, step.slot.clamp(min=0), step.seed, step.position, None)

    def fuse(self) -> None:
        self.fused = True

    def _state(self, j: int) -> tuple:
        t = self.table.t
        return (t["erss_bank"], t["erss_bank_norm"], t["erss_streak"], t["erss_cooldown"], *self._jt[j])

    # -- the step --------------------------------------------------------------------------------
    def apply(self, core, j, h, r, x, n, tau, rerun):
        """The core's step: a step of at most the table's size in its own order (compiled when
        fused); a longer one (a long prefill chunk) in the gathered form, :meth:`layer_op`."""
        step = core.step
        self._ensure_bank(int(x.shape[-1]))
        if step.num_tokens == 0:
            return h, r, None
        if step.num_tokens > self.table.capacity:
            return self.layer_op(j, h, r, x, n, tau, step, core.columns, self.graph_state())
        if step is not self._step:
            self._prepare(step)
        p, cols = self.p, core.columns
        cols = (cols["erss_cos"], cols["erss_vnorm"], cols["erss_bank"])
        h_s, ev_s = self._call(erss_layer, self._state(j), (h, r, x, n, tau, *self._sel), cols,
                               (p.bank_k, p.gamma, p.low_k, p.p_inject, p.cos_min, p.cooldown, p.beta))
        return h_s, r, ev_s

    def prepare(self, hidden: int) -> None:
        self._ensure_bank(hidden)

    def graph_state(self) -> dict[str, torch.Tensor]:
        t = self.table.t
        if self.hidden is None:
            raise RuntimeError("erss: graph_state before the bank is allocated (prepare(hidden))")
        return {"bank": t["erss_bank"], "bank_norm": t["erss_bank_norm"], "streak": t["erss_streak"],
                "cooldown": t["erss_cooldown"], "index": torch.stack([i for i, _ in self._jt]),
                "layer": torch.stack([l for _, l in self._jt])}

    def layer_op(self, j, h, r, x, n, tau, step, columns, state, rerun=None):
        """The step in the gathered form, for any token count (inside a model's graph; the core's step
        for a step longer than the table): the first min(N, capacity) tokens in "new first" order —
        every live token — so the bank gathers stay bounded by the table's size without a host
        decision."""
        live, sl = step.new & step.act, step.slot.clamp(min=0)
        o = new_first(live)[: torch.sym_min(n.shape[0], self.table.capacity)]
        p = self.p
        h_s, ev_s = erss_layer(state["bank"], state["bank_norm"], state["streak"], state["cooldown"],
                               state["index"][j], state["layer"][j], h[o], None if r is None else r[o], x[o], n[o],
                               tau, live[o], sl[o], step.seed[o], step.position[o], o,
                               columns["erss_cos"], columns["erss_vnorm"], columns["erss_bank"],
                               p.bank_k, p.gamma, p.low_k, p.p_inject, p.cos_min, p.cooldown, p.beta)
        h2 = h.index_put((o,), h_s)
        ev = torch.zeros(n.shape[0], dtype=torch.int16, device=n.device).index_put((o,), ev_s)
        return h2, r, ev

    def _call(self, fn, state: tuple, tokens: tuple, written: tuple, consts: tuple):
        """``fn(*state, *tokens, *written, *consts)``: compiled when fused. ``state``: the slot tables
        (and the layer's index tensors), written in place; ``tokens``: per-token inputs, read only;
        ``written``: the step's record columns."""
        if not self.fused:
            return fn(*state, *tokens, *written, *consts)
        out, self.fused = run(fn, state, tokens, written, consts, tokens=True)
        return out

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


def bank_dots(bank: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[M, K] dot products of each token's bank vectors [M, K, hidden] with its x [M, hidden], each
    summed in one fixed pairwise order (the products padded with zeros to a power of two, then
    halves added): elementwise operations only, so a token's cosines are the same bits whatever else
    is in its step. (A batched matrix product sums in an order that depends on the batch: the same
    request alone and in a batch got cosines a bit apart.) A compiled step fuses them with the rest
    of the layer's work, in the same order (module docstring)."""
    p = bank * x[:, None, :]
    h = int(p.shape[-1])
    size = 1 << max(h - 1, 0).bit_length()
    if size != h:
        p = torch.nn.functional.pad(p, (0, size - h))
    while size > 1:
        size //= 2
        p = p[..., :size] + p[..., size:]
    return p[..., 0]


def new_first(live: torch.Tensor) -> torch.Tensor:
    """The step's token indices [N], those where ``live`` first, each group in token order — the
    stable sort of ``~live``, made from one cumulative sum and a scatter (a compiled step fuses the
    rest; a sort is a kernel of its own)."""
    n = live.shape[0]
    t = torch.arange(n, device=live.device)
    cl = torch.cumsum(live.to(torch.int64), 0)  # live tokens up to and with each
    rank = torch.where(live, cl - 1, cl[-1:] + t - cl)  # a live token's place, or the live count + its place among the rest
    return torch.zeros_like(t).scatter(0, rank, t)


def erss_layer(bank, bank_norm, streak_t, cd_t, j, layer, h, r, x, n, tau_j, live, sl, seed, pos, rows,
               col_cos, col_vn, col_bank, K, gamma, low_k, p_inject, cos_min, cooldown, beta):
    """ERSS at patched layer ``j`` (model layer ``layer``; both 0-dim int64 tensors) for M tokens of
    a step: ``h``, ``r`` [M, hidden] (``r`` may be None), ``x`` = h + r and its norm ``n``, ``live``
    (new generated tokens the method may act on), ``sl`` (slot), ``seed``, ``pos`` [M] — at most
    one live token per slot — and ``rows`` [M], their rows in the step (None: rows 0…M−1;
    ``tau_j``, the layer's τ of every token of the step, is [N], the record columns ``col_*``
    [N, L]). Reads and writes the slot tables in place, in the module docstring's order, and writes
    the records into column ``j`` at ``rows``. Returns (h' [M, hidden], event bits int16 [M]). The
    engine's per-layer step: one kernel when the model runs compiled."""
    jv = j.expand_as(sl)
    ar = torch.arange(sl.shape[0], device=sl.device)
    rows = ar if rows is None else rows
    tau = tau_j[rows]
    # index tensors throughout (jv): a 0-dim index would be read on the host
    act = live & torch.isfinite(tau)
    bn = bank_norm[sl, jv, :K]                     # [M, K] copies
    bank_m = bank[sl, jv, :K]                      # [M, K, H]
    streak = streak_t[sl, jv]
    cd = cd_t[sl, jv]

    # 1. cooldown
    blocked = cd > 0
    cd1 = (cd - 1).clamp(min=0)
    # 2. bank update (copy of x; the smallest entry is replaced, empties first)
    minv, p = bn.min(dim=1)
    store = act & (n > tau) & (n > minv)
    bn[ar, p] = torch.where(store, n, bn[ar, p])
    bank_m[ar, p] = torch.where(store[:, None], x, bank_m[ar, p])
    filled = torch.isfinite(bn)
    # 3. streak, trigger
    streak1 = torch.where(n < gamma * tau, streak + 1, torch.zeros_like(streak))
    u = uniform(seed, pos, layer, STREAM)
    attempt = act & (streak1 >= low_k) & ~blocked & (u < p_inject)
    vn = torch.where(filled, bn, torch.zeros_like(bn))
    dots = bank_dots(bank_m, x)
    cos = dots / ((vn + 1e-6) * (n + 1e-6)[:, None])
    cos = torch.where(filled, cos, torch.full_like(cos, float("-inf")))
    best_cos, best = cos.max(dim=1)
    inject = attempt & (best_cos >= cos_min)
    # 4. injection
    v = bank_m[ar, best]
    delta = v if r is None else v - r.float()
    h_new = torch.where(inject[:, None], (h.float() + beta * delta).to(h.dtype), h)
    streak2 = torch.where(inject, torch.zeros_like(streak1), streak1)
    cd2 = torch.where(inject, torch.full_like(cd1, cooldown), cd1)

    # write back, only for act tokens, with no host-side selection. Streak and cooldown: each token
    # adds its change (0 unless act; integers, so exact), as other tokens of an act token's slot
    # may sit in the step (a resumed request's re-fed positions). The bank: the others write a
    # scratch entry K, so no two real writes share an index.
    streak_t.index_put_((sl, jv), torch.where(act, streak2 - streak, 0).to(streak_t.dtype), accumulate=True)
    cd_t.index_put_((sl, jv), torch.where(act, cd2 - cd, 0).to(cd_t.dtype), accumulate=True)
    pos_w = torch.where(store, p, torch.full_like(p, K))
    bank_norm.index_put_((sl, jv, pos_w), torch.where(store, n, torch.full_like(n, float("-inf"))))
    bank.index_put_((sl, jv, pos_w), x)

    nan = torch.full_like(n, float("nan"))
    at = (rows, jv)
    col_cos.index_put_(at, torch.where(attempt & torch.isfinite(best_cos), best_cos, nan))
    col_vn.index_put_(at, torch.where(inject, vn[ar, best], nan))
    col_bank.index_put_(at, torch.where(act, filled.sum(1).to(torch.float32), nan))
    ev = (torch.where(store, EV_BANKED, 0) | torch.where(inject, EV_INJECTED, 0)).to(torch.int16)
    return h_new, ev


METHOD = ErssMethod
