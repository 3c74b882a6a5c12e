"""``vllm-lrs``: ℓ2-guided Response Selection (METHODS.md §4), and the selectors it is compared
with on the SAME N traces.

Decoding is observation only (the base :class:`Method`); the worker also tracks, per candidate,
a DeepConf-style trace confidence from the logits (:class:`ConfidenceTracker`). Selection
happens in the driver, once the N candidates of a prompt are finished:

Norm scores (per candidate, over its generated tokens, summed over the patched layers):
  ``late_sum`` (default) Σ_l Σ_{t in last third} n_t — the reading of the paper's "summed norms
             over the deepest layers of the last third of generated tokens";
  ``mean``   mean over layers of the mean norm (length-normalised);
  ``A`` Σ n_t, ``B`` Σ max(0, n_t − τ), ``C`` #{n_t > τ}, ``D`` B over the last 30 % — the
  reference code's metrics (τ from the configured τ mode).
The paper's exact formula is not public; see the README for what is uncertain.

Compute-matched selectors: ``maj`` (majority over the task's extracted answers, ties → the
answer seen first), ``conf`` (highest lowest-group confidence, DeepConf), ``random`` (seeded per
prompt), ``first`` (= plain sampling, pass@1). With ``prefer_complete`` (default), candidates
whose thinking closed rank before truncated ones for every score-based selector.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Sequence

import torch

from .engine import Method
from .rng import seed_from

SCORES = ("late_sum", "mean", "A", "B", "C", "D")
SELECTORS = (*SCORES, "maj", "conf", "random", "first")

KEYS = {
    "n_candidates": (4, "answers sampled per prompt"),
    "lrs_score": ("late_sum", f"the score whose pick is returned: one of {', '.join(SCORES)}"),
    "prefer_complete": (True, "rank candidates whose thinking closed before truncated ones"),
    "conf_topk": (20, "DeepConf: top-k log-probabilities per token for the token confidence"),
    "conf_window": (2048, "DeepConf: sliding window (tokens) for the group confidence"),
}

CHECKS = {
    "n_candidates": lambda v: (1 <= v <= 64, f"must be in 1..64, got {v}"),
    "lrs_score": lambda v: (v in SCORES, f"must be one of {SCORES}, got {v!r}"),
    "conf_topk": lambda v: (1 <= v <= 1000, f"must be in 1..1000, got {v}"),
    "conf_window": lambda v: (1 <= v <= 1 << 20, f"must be >= 1, got {v}"),
}

METHOD = Method


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
    """Candidate index holding the most frequent non-empty answer; ties → the answer whose first
    occurrence is earliest; no answer at all → 0."""
    keys = [(i, a) for i, a in enumerate(answers) if a not in (None, "")]
    if not keys:
        return 0
    counts = Counter(a for _, a in keys)
    top = max(counts.values())
    return next(i for i, a in keys if counts[a] == top)


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


# --- DeepConf trace confidence, worker side -------------------------------------------------

class ConfidenceTracker:
    """Per request slot: token confidence c_t = −mean(top-k log-probs) of the distribution each
    generated token was sampled from; group confidence = mean of c over a sliding window of
    ``window`` tokens; the trace's confidence is its lowest group confidence (the mean over all
    tokens when shorter than a window). Vectorised over the rows of a step."""

    def __init__(self, table, k: int, window: int, device=None):
        self.k, self.w = int(k), int(window)
        self.table = table
        table.register("conf_ring", (self.w,), torch.float32, 0.0)
        table.register("conf_win", (), torch.float32, 0.0)
        table.register("conf_n", (), torch.int64, 0)
        table.register("conf_low", (), torch.float32, float("inf"))
        table.register("conf_total", (), torch.float32, 0.0)

    def update(self, slots: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> None:
        """``slots``: [R] slot per logits row; ``mask``: rows whose sampled token is kept."""
        t = self.table.t
        k = min(self.k, logits.shape[-1])
        lp = torch.log_softmax(logits.float(), dim=-1)
        c = -lp.topk(k, dim=-1).values.mean(-1)  # [R]
        s = slots  # one row per slot per step: indices are unique, so plain index writes are safe
        n = t["conf_n"][s]
        idx = n % self.w
        old = t["conf_ring"][s, idx]
        full = n >= self.w
        win = t["conf_win"][s] + c - torch.where(full, old, torch.zeros_like(old))
        n1 = n + 1
        low = torch.where(n1 >= self.w, torch.minimum(t["conf_low"][s], win / self.w), t["conf_low"][s])
        # rows outside the mask (a prefill chunk's discarded sample) write their old values back
        t["conf_ring"][s, idx] = torch.where(mask, c, old)
        t["conf_win"][s] = torch.where(mask, win, t["conf_win"][s])
        t["conf_total"][s] = torch.where(mask, t["conf_total"][s] + c, t["conf_total"][s])
        t["conf_low"][s] = torch.where(mask, low, t["conf_low"][s])
        t["conf_n"][s] = torch.where(mask, n1, n)

    def read(self, slot: int) -> dict[str, float | int | None]:
        t = self.table.t
        n = int(t["conf_n"][slot])
        if n == 0:
            return {"conf": None, "conf_mean": None, "conf_tokens": 0}
        low = float(t["conf_low"][slot])
        mean = float(t["conf_total"][slot]) / n
        return {"conf": low if n >= self.w else mean, "conf_mean": mean, "conf_tokens": n}
