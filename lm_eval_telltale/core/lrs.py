"""``vllm-lrs``: ℓ2-guided Response Selection (docs/methods.md §4), and the selectors it is compared
with on the SAME N traces.

Decoding is observation only (the base :class:`Method`); the worker also tracks, per candidate,
a DeepConf-style trace confidence from the logits (:class:`ConfidenceTracker`). Selection
happens in the driver, once the N candidates of a prompt are finished.

Online LRS (``stop_signal`` ``norm`` or ``conf``, docs/methods.md §4): the first
``warmup_candidates`` of a prompt run to the end; the driver sets the prompt's threshold from their
scores (:func:`online_threshold`) and sends the later candidates with it. In the worker
(:class:`OnlineStop`) a later candidate whose windowed score falls below its threshold is marked
stopped on the device, and the next token it samples is forced to its stop token — no host
sync, no abort from the driver. Stopped candidates are excluded from selection.

Norm scores (per candidate, over its generated tokens, summed over the patched layers):
  ``late_sum`` (default) Σ_l Σ_{t in last third} n_t — the reading of the paper's "summed norms
             over the deepest layers of the last third of generated tokens";
  ``mean``   mean over layers of the mean norm (length-normalised);
  ``A`` Σ n_t, ``B`` Σ max(0, n_t − τ), ``C`` #{n_t > τ}, ``D`` B over the last 30 % — the
  reference code's metrics (τ from the configured τ mode).
The paper's exact formula is not public; docs/methods.md §4 says what is uncertain.

Compute-matched selectors: ``maj`` (majority over the task's extracted answers, ties → the
answer seen first), ``conf`` (highest lowest-group confidence, DeepConf), ``random`` (seeded per
prompt), ``first`` (= plain sampling, pass@1). With ``prefer_complete`` (default), candidates
whose thinking closed rank before truncated ones for every score-based selector.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..spec import LRS_SCORES, LRS_SELECTORS, majority_index
from .engine import Method
from .params import checks_of, keys_of, knob
from .rng import seed_from

logger = logging.getLogger("lm_eval_telltale")

SCORES = LRS_SCORES
SELECTORS = LRS_SELECTORS
#: online LRS's stop signals: ``none`` (full LRS), the selected norm score, DeepConf's confidence
STOP_SIGNALS = ("none", "norm", "conf")
#: ``extra_args`` the driver sets on an online candidate: its prompt's threshold and the token to force
STOP_THRESHOLD_KEY = "telltale_stop_threshold"
STOP_TOKEN_KEY = "telltale_stop_token"
#: ``extra_args`` of every online candidate: the end-of-thinking token id (windows count thinking only)
THINK_END_KEY = "telltale_think_end_token"
#: a slot's windows as read when its request ended (:meth:`SlidingLow.raw`), kept in the request's
#: meta until collection settles them (:meth:`LrsMethod.trim_meta`); not part of the record
WINDOWS_KEY = "_windows"


@dataclass(frozen=True)
class LrsParams:
    n_candidates: int = knob(4, "answers sampled per prompt", lambda v: 1 <= v <= 64, "must be in 1..64")
    lrs_score: str = knob("late_sum", f"the score whose pick is returned: one of {', '.join(SCORES)}",
                          lambda v: v in SCORES, f"must be one of {SCORES}")
    prefer_complete: bool = knob(True, "rank candidates whose thinking closed before truncated ones")
    conf_topk: int = knob(20, "DeepConf: top-k log-probabilities per token for the token confidence",
                          lambda v: 1 <= v <= 1000, "must be in 1..1000")
    conf_window: int = knob(2048, "DeepConf: sliding window (tokens) for the group confidence",
                            lambda v: 1 <= v <= 1 << 20, "must be in 1..1048576")
    stop_signal: str = knob("none", "online LRS: stop a later candidate whose windowed score falls below its prompt's "
                            "threshold: none (full LRS), norm (the lrs_score's per-token signal) or conf (DeepConf)",
                            lambda v: v in STOP_SIGNALS, f"must be one of {STOP_SIGNALS}")
    warmup_candidates: int = knob(2, "online LRS: candidates per prompt that always run to the end; their lowest "
                                  "window scores set the prompt's threshold", lambda v: 1 <= v <= 63, "must be in 1..63")
    stop_percentile: float = knob(10.0, "online LRS: the threshold is this percentile of the warm-up candidates' "
                                  "lowest window scores (10: DeepConf-high, 90: DeepConf-low)",
                                  lambda v: 0 <= v <= 100, "must be in 0..100")
    stop_window: int = knob(2048, "online LRS: the window (generated tokens) of the windowed score",
                            lambda v: 1 <= v <= 1 << 20, "must be in 1..1048576")


KEYS = keys_of(LrsParams)
CHECKS = checks_of(LrsParams)


#: the knobs of online LRS only
ONLINE_KNOBS = ("warmup_candidates", "stop_percentile", "stop_window")


def unused_knobs(params: dict) -> tuple[str, ...]:
    """Knobs these settings leave unused (``telltale table`` does not label a run with them)."""
    return ONLINE_KNOBS if params.get("stop_signal", "none") == "none" else ()


def check_params(params: dict) -> tuple[str, str] | None:
    """Checks across knobs (``config.validate_params``): ``(key, why)`` or None."""
    if params.get("stop_signal", "none") != "none" and params["warmup_candidates"] >= params["n_candidates"]:
        return ("warmup_candidates", f"must be below n_candidates ({params['n_candidates']}) with "
                f"stop_signal={params['stop_signal']}: no candidate would be left to stop, got {params['warmup_candidates']}")
    return None


class LrsMethod(Method):
    """Observation only while decoding, plus each candidate's DeepConf trace confidence from the
    logits it was sampled from (:class:`ConfidenceTracker`); selection happens in the driver."""

    name = "lrs"
    wants_logits = True

    def __init__(self, cfg, table, num_layers, device=None):
        super().__init__(cfg, table, num_layers, device)
        self.p = LrsParams(**cfg.params)
        self.conf = ConfidenceTracker(table, self.p.conf_topk, self.p.conf_window, device)
        self.stop = OnlineStop(table, self.p.stop_window) if self.p.stop_signal != "none" else None

    def slot_values(self, extra: dict) -> dict:
        if self.stop is None:
            return {}
        out = {}
        if extra.get(THINK_END_KEY) is not None:
            out["stop_think_end"] = int(extra[THINK_END_KEY])
        if extra.get(STOP_THRESHOLD_KEY) is not None:
            if extra.get(STOP_TOKEN_KEY) is None:
                raise ValueError(f"telltale: {STOP_THRESHOLD_KEY} without {STOP_TOKEN_KEY}")
            out.update({"stop_thr": float(extra[STOP_THRESHOLD_KEY]), "stop_tok": int(extra[STOP_TOKEN_KEY])})
        return out

    def graph_state(self) -> dict[str, torch.Tensor]:
        """The confidence window's tensors (:meth:`fold_logits`) and online LRS's (:meth:`step_op`)."""
        t = self.table.t
        return {**{k: t[k] for k in self.conf.win.k.values()}, **({} if self.stop is None else self.stop.tensors())}

    def step_op(self, step, norm, tau, state) -> None:
        """Online LRS: which candidates closed their thinking, and (``stop_signal=norm``) each
        candidate's window of the norm signal over its new token."""
        if self.stop is None:
            return
        self.stop.see_tokens(step, state)
        if self.p.stop_signal == "norm":
            self.stop.update_tokens(step, token_signal(self.p.lrs_score, norm, tau), state)

    def logits_values(self, slots, logits) -> torch.Tensor:
        """Each row's token confidence (taken before a stop is forced)."""
        c = token_confidence(logits, self.conf.conf_topk)
        if self.stop is not None:
            # a slot stopped so far samples its stop token now: for ``norm`` that includes this
            # step's forward (its window counts the tokens fed so far), for ``conf`` the steps before
            # (the window counts the distributions sampled so far; this one's token is kept) — in
            # both cases a candidate stopped at W tokens has W tokens, then its stop token
            self.stop.force(slots, logits)
        return c

    def fold_logits(self, slots, values, keep, pos, state) -> None:
        """The confidences into their windows (and, ``stop_signal=conf``, online LRS's)."""
        self.conf.win.update(slots, values, keep, state, pos)
        if self.stop is not None and self.p.stop_signal == "conf":
            self.stop.update(slots, values, keep, state, pos)

    def read_slot(self, slot: int) -> dict:
        raws = {"conf": self.conf.win.raw(slot)}
        out = ConfidenceTracker.figures(raws["conf"])
        if self.stop is not None:
            raws["stop"] = self.stop.win.raw(slot)
            out.update(OnlineStop.figures(raws["stop"], self.stop.stopped_at(slot)))
        return {**out, WINDOWS_KEY: raws}

    def trim_meta(self, meta: dict, last_fed: int) -> dict:
        """The confidence (and online LRS's score) over the answer's own positions only: values
        counted from a forward after the answer ended are taken back (:meth:`SlidingLow.resolve`);
        a stop decided from such a value is no stop."""
        raws = meta.get(WINDOWS_KEY)
        if not raws:
            return {}
        out = ConfidenceTracker.figures(raws["conf"], last_fed)
        if "stop" in raws:
            out.update(OnlineStop.figures(raws["stop"], meta.get("stopped_at"), last_fed))
        if "conf_exact" in out or "online_exact" in out:
            logger.warning("telltale: the engine ran %d+ steps past a request's answer end (a stop string found "
                           "late); its confidence counts them (conf_exact/online_exact false in its record)",
                           SlidingLow.HISTORY)
        return out


# --- scores and selectors (driver side, plain Python on a handful of numbers) ---------------

def score(layers: dict[str, dict], name: str) -> float:
    """One candidate's score from its per-layer statistics (see module docstring)."""
    if not layers:
        return float("-inf")
    if name == "mean":
        return sum(st["mean"] for st in layers.values()) / len(layers)
    return float(sum(st[name] for st in layers.values()))


def argmax_pick(values: Sequence[float], complete: Sequence[bool] | None = None, prefer_complete: bool = True) -> int:
    """Index of the best value; ties → the first; complete candidates first if asked."""
    best, best_key = 0, None
    for i, v in enumerate(values):
        v = float("-inf") if v is None or (isinstance(v, float) and math.isnan(v)) else v
        key = (bool(complete[i]) if (prefer_complete and complete is not None) else True, v)
        if best_key is None or key > best_key:
            best, best_key = i, key
    return best


def majority_pick(answers: Sequence[Any]) -> int:
    """Candidate index of the majority answer (:func:`lm_eval_telltale.spec.majority_index`);
    no answer at all → 0."""
    i = majority_index(answers)
    return 0 if i is None else i


def random_pick(n: int, *identity: object) -> int:
    return seed_from("lrs-random", *identity) % n


def pick_all(cands: list[dict], prefer_complete: bool, identity: tuple) -> dict[str, int]:
    """``cands``: [{"layers", "complete", "answer", "conf"}] → {selector: index}."""
    complete = [c.get("complete", True) for c in cands]
    picks = {name: argmax_pick([score(c["layers"], name) for c in cands], complete, prefer_complete) for name in SCORES}
    picks["maj"] = majority_pick([c.get("answer") for c in cands])
    picks["conf"] = argmax_pick([c.get("conf") for c in cands], complete, prefer_complete)
    picks["random"] = random_pick(len(cands), *identity)
    picks["first"] = 0
    return picks


def online_threshold(scores: Sequence[float | None], percentile: float) -> float:
    """A prompt's online-LRS threshold: the ``percentile`` (numpy's linear rule) of its warm-up
    candidates' scores; NaN (no candidate is ever stopped) when none has a score."""
    xs = [float(v) for v in scores if v is not None and math.isfinite(float(v))]
    return float(np.percentile(xs, percentile)) if xs else float("nan")


# --- worker side: sliding windows, DeepConf trace confidence, online stopping ---------------

class SlidingLow:
    """Per request slot: a per-token value's mean over a sliding window of ``window`` tokens, the
    lowest of those window means (once a window is full), and the mean over all tokens. Tensors
    ``<prefix>_ring/_win/_n/_low/_total`` in the slot table, and the history of the last
    :attr:`HISTORY` counted values (``_hlow/_htotal/_hpos``: the low and total after each, and its
    position), which lets collection take back values from past an answer's end (:meth:`resolve`).
    Vectorised over the rows of a call; one row per slot per call (indices unique, so plain index
    writes are safe)."""

    #: how many of a slot's last counted values can be taken back when its request is collected
    #: (:meth:`resolve`): the values of forwards the engine ran after the answer had ended
    HISTORY = 16

    def __init__(self, table, prefix: str, window: int):
        self.table, self.window = table, int(window)
        self.k = {n: f"{prefix}_{n}" for n in ("ring", "win", "n", "low", "total", "hlow", "htotal", "hpos")}
        table.register(self.k["ring"], (self.window,), torch.float32, 0.0)
        table.register(self.k["win"], (), torch.float32, 0.0)
        table.register(self.k["n"], (), torch.int64, 0)
        table.register(self.k["low"], (), torch.float32, float("inf"))
        table.register(self.k["total"], (), torch.float32, 0.0)
        # after the c-th counted value, at c % HISTORY: the lowest window mean, the total and the
        # value's position (the fed position it belongs to; -1: not known, never taken back)
        table.register(self.k["hlow"], (self.HISTORY,), torch.float32, float("inf"))
        table.register(self.k["htotal"], (self.HISTORY,), torch.float32, 0.0)
        table.register(self.k["hpos"], (self.HISTORY,), torch.int64, -1)

    def update(self, slots: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
               t: dict[str, torch.Tensor] | None = None, pos: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add ``v`` [R] to the rows' slots where ``mask``; returns (tokens counted, the current
        window mean — meaningful once tokens counted ≥ window) per row. ``t``: the tensors by
        slot-table name (default: the slot table's own); ``pos`` [R]: the position each value
        belongs to (kept in the history, :meth:`resolve`; None: not known)."""
        t, k, w, H = self.table.t if t is None else t, self.k, self.window, self.HISTORY
        s = slots
        ring, win_t, n_t, low_t, total_t = (t[k[x]] for x in ("ring", "win", "n", "low", "total"))
        hlow, htotal, hpos = (t[k[x]] for x in ("hlow", "htotal", "hpos"))
        n, win0, low0, total0 = n_t[s], win_t[s], low_t[s], total_t[s]  # each gathered once
        idx = n % w
        old = ring[s, idx]
        win = win0 + v - torch.where(n >= w, old, 0.0)
        n1 = n + 1
        mean = win / w
        low = torch.where(n1 >= w, torch.minimum(low0, mean), low0)
        counted = torch.where(mask, n1, n)
        # rows outside the mask (a prefill chunk's discarded sample) write their old values back
        ring[s, idx] = torch.where(mask, v, old)
        win_t[s] = torch.where(mask, win, win0)
        total = torch.where(mask, total0 + v, total0)
        total_t[s] = total
        low = torch.where(mask, low, low0)
        low_t[s] = low
        n_t[s] = counted
        h = n1 % H  # the history's entry of this value (rows outside the mask write it back unchanged)
        hlow[s, h] = torch.where(mask, low, hlow[s, h])
        htotal[s, h] = torch.where(mask, total, htotal[s, h])
        at = torch.full_like(n, -1) if pos is None else pos.to(torch.int64)
        hpos[s, h] = torch.where(mask, at, hpos[s, h])
        return counted, mean

    def raw(self, slot: int) -> dict[str, Any]:
        """One slot's counts and history as host values (read before the slot is reused;
        :meth:`resolve` makes the figures of them)."""
        t, k = self.table.t, self.k
        return {"n": int(t[k["n"]][slot]), "low": float(t[k["low"]][slot]), "total": float(t[k["total"]][slot]),
                "window": self.window, **{x: t[k[x]][slot].tolist() for x in ("hlow", "htotal", "hpos")}}

    @staticmethod
    def resolve(raw: dict[str, Any], last: int | None = None) -> tuple[float | None, float | None, int, bool]:
        """(the lowest window mean, or the mean over all tokens when fewer than a window; the mean;
        tokens) of :meth:`raw`'s values, counting only the values at positions up
        to ``last`` (None: all): a request's answer ends at a known position, and a forward the
        engine ran after it (async scheduling plans a step before the stop is known; a stop string
        is found by the frontend after the engine went on) is taken back from the history. The
        last item says whether that was possible: with :attr:`HISTORY` or more values past
        ``last``, nothing is taken back (False; the caller says so in the record)."""
        n, w, H = raw["n"], raw["window"], len(raw["hpos"])
        low, total = raw["low"], raw["total"]
        exact = True
        if last is not None:
            back = 0
            while back < min(n, H) and raw["hpos"][(n - back) % H] > last:
                back += 1
            if back >= H and n > back:
                exact = False
            elif back:
                n -= back
                low, total = raw["hlow"][n % H], raw["htotal"][n % H]
        if n == 0:
            return None, None, 0, exact
        mean = total / n
        return (low if n >= w else mean), mean, n, exact


class ConfidenceTracker:
    """Per request slot: token confidence c_t = −mean(top-k log-probs) of the distribution each
    generated token was sampled from; group confidence = mean of c over a sliding window of
    ``window`` tokens; the trace's confidence is its lowest group confidence (the mean over all
    tokens when shorter than a window). The token confidence is :func:`token_confidence`, taken at
    sampling (:meth:`LrsMethod.logits_values`); :attr:`win` takes it in (:meth:`LrsMethod.fold_logits`)."""

    def __init__(self, table, conf_topk: int, conf_window: int, device=None):
        self.conf_topk, self.conf_window = int(conf_topk), int(conf_window)
        self.win = SlidingLow(table, "conf", self.conf_window)

    @staticmethod
    def figures(raw: dict[str, Any], last: int | None = None) -> dict[str, float | int | None]:
        """The record's confidence of a slot's window (:meth:`SlidingLow.raw`), over the values at
        positions up to ``last`` (None: all)."""
        score, mean, n, exact = SlidingLow.resolve(raw, last)
        return {"conf": score, "conf_mean": mean, "conf_tokens": n, **({} if exact else {"conf_exact": False})}


def token_confidence(logits: torch.Tensor, topk: int) -> torch.Tensor:
    """DeepConf's token confidence per row: −mean of the top-``topk`` log-probabilities."""
    k = min(topk, logits.shape[-1])
    lp = torch.log_softmax(logits.float(), dim=-1)
    return -lp.topk(k, dim=-1).values.mean(-1)


def token_signal(score: str, norm: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Online LRS's per-token norm signal for ``lrs_score`` (norm, τ [N, L] → [N], the mean over
    the patched layers): the norm (``late_sum``, ``mean``, ``A``), its excess over τ (``B``,
    ``D``) or whether it is above τ (``C``); a token without τ contributes 0 to the last two."""
    if score in ("B", "D"):
        return (norm - tau).clamp(min=0).nan_to_num(0.0).mean(1)
    if score == "C":
        return (norm > tau).to(torch.float32).mean(1)
    return norm.mean(1)


class OnlineStop:
    """Online LRS in the worker: per slot the stop signal's windowed score (:class:`SlidingLow`
    over ``window`` tokens), the slot's threshold (NaN: a warm-up candidate, never stopped), its
    stop token and ``stop_at`` (-1, or the generated tokens counted when its window first fell
    below the threshold: the tokens it generated before its stop token). A stopped slot's next token is forced to its stop token
    (:meth:`force`), so the engine ends it as any finished answer. All tensor work, no host
    sync."""

    #: the slot-table tensors of the step's work (:meth:`tensors`)
    NAMES = ("stop_think_end", "stop_answering", "stop_thr", "stop_at")

    def __init__(self, table, window: int):
        self.table, self.window = table, int(window)
        self.win = SlidingLow(table, "stop", self.window)
        self._all: torch.Tensor | None = None
        table.register("stop_thr", (), torch.float32, float("nan"))
        table.register("stop_tok", (), torch.int64, -1)
        table.register("stop_at", (), torch.int64, -1)
        table.register("stop_think_end", (), torch.int64, -1)
        table.register("stop_answering", (), torch.bool, False)

    def tensors(self) -> dict[str, torch.Tensor]:
        """What the per-step work (:meth:`see_tokens`, :meth:`update_tokens`) reads and writes, by
        slot-table name, and ``all``, every slot's index: an in-graph adapter holds them as
        buffers (the table is fixed in size by then)."""
        t, cap = self.table.t, self.table.capacity
        if self._all is None or self._all.shape[0] != cap:  # made once per table size
            self._all = torch.arange(cap, device=t["stop_at"].device)
        return {**{k: t[k] for k in (*self.NAMES, *self.win.k.values())}, "all": self._all}

    def see_tokens(self, step, t: dict[str, torch.Tensor] | None = None) -> None:
        """A slot whose end-of-thinking token was fed is answering from then on: its later tokens
        are not counted and it is not stopped (an answer's norm and confidence differ from its
        thinking's; the candidate is about to finish anyway). ``t``: :meth:`tensors` (default: the
        slot table's own)."""
        if step.token is None:
            return
        t, cap = self.table.t if t is None else t, self.table.capacity
        end = t["stop_think_end"][step.slot.clamp(min=0)]
        hit = step.new & (end >= 0) & (step.token == end)
        cnt = torch.zeros(cap + 1, dtype=torch.int64, device=step.slot.device)
        cnt.index_put_((torch.where(hit, step.slot, torch.full_like(step.slot, cap)),), torch.ones_like(step.slot),
                       accumulate=True)
        t["stop_answering"] |= cnt[:cap] > 0

    def update(self, slots: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
               t: dict[str, torch.Tensor] | None = None, pos: torch.Tensor | None = None) -> None:
        """One value per row (one row per slot) where ``mask`` and the slot is still thinking; marks
        the rows whose full window fell below their threshold. ``pos``: the values' positions."""
        t = self.table.t if t is None else t
        mask = mask & ~t["stop_answering"][slots]
        n1, cur = self.win.update(slots, v, mask, t, pos)
        at = t["stop_at"][slots]
        now = mask & (n1 >= self.window) & (cur < t["stop_thr"][slots]) & (at < 0)
        t["stop_at"][slots] = torch.where(now, n1, at)

    def update_tokens(self, step, v: torch.Tensor, t: dict[str, torch.Tensor] | None = None) -> None:
        """``v`` [N] per token of a forward step: the new generated tokens' values, gathered per
        slot (at most one new token per request and step; the others go to a spare row)."""
        t = self.tensors() if t is None else t
        cap = self.table.capacity
        s = torch.where(step.new, step.slot, torch.full_like(step.slot, cap))
        per = torch.zeros(cap + 1, dtype=torch.float32, device=v.device)
        per.index_put_((s,), torch.where(step.new, v, torch.zeros_like(v)), accumulate=True)
        cnt = torch.zeros(cap + 1, dtype=torch.int64, device=v.device)
        cnt.index_put_((s,), torch.ones_like(s), accumulate=True)
        at = torch.full((cap + 1,), -1, dtype=torch.int64, device=v.device)  # the spare row takes the rest
        at.index_put_((s,), torch.where(step.new, step.position, torch.full_like(step.position, -1)))
        self.update(t["all"], per[:cap], cnt[:cap] > 0, t, at[:cap])

    def force(self, slots: torch.Tensor, logits: torch.Tensor) -> None:
        """In place: the rows of stopped slots can sample only their stop token."""
        t = self.table.t
        tok = t["stop_tok"][slots]
        stopped = (t["stop_at"][slots] >= 0) & (tok >= 0)
        cols = torch.arange(logits.shape[-1], device=logits.device)
        logits.masked_fill_(stopped[:, None] & (cols[None, :] != tok[:, None]), float("-inf"))

    def stopped_at(self, slot: int) -> int | None:
        at = int(self.table.t["stop_at"][slot])
        return at if at >= 0 else None

    @staticmethod
    def figures(raw: dict[str, Any], stopped_at: int | None, last: int | None = None) -> dict[str, Any]:
        """The record's online score of a slot's window (:meth:`SlidingLow.raw`) over the values at
        positions up to ``last`` (None: all), and its stop — none if it was decided from a value
        past ``last``."""
        score, _mean, n, exact = SlidingLow.resolve(raw, last)
        return {"online_score": score, "stopped_at": stopped_at if stopped_at is not None and stopped_at <= n else None,
                **({} if exact else {"online_exact": False})}


METHOD = LrsMethod
