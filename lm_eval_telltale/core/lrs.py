"""``vllm-lrs``: ℓ2-guided Response Selection (docs/methods.md §4), and the selectors it is compared
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
The paper's exact formula is not public; docs/methods.md §4 says what is uncertain.

Compute-matched selectors: ``maj`` (majority over the task's extracted answers, ties → the
answer seen first), ``conf`` (highest lowest-group confidence, DeepConf), ``random`` (seeded per
prompt), ``first`` (= plain sampling, pass@1). With ``prefer_complete`` (default), candidates
whose thinking closed rank before truncated ones for every score-based selector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..spec import LRS_SCORES, LRS_SELECTORS, majority_index
from .engine import Method
from .params import checks_of, keys_of, knob
from .rng import seed_from

SCORES = LRS_SCORES
SELECTORS = LRS_SELECTORS


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


KEYS = keys_of(LrsParams)
CHECKS = checks_of(LrsParams)


class LrsMethod(Method):
    """Observation only while decoding, plus each candidate's DeepConf trace confidence from the
    logits it was sampled from (:class:`ConfidenceTracker`); selection happens in the driver."""

    name = "lrs"
    wants_logits = True

    def __init__(self, cfg, table, num_layers, device=None):
        super().__init__(cfg, table, num_layers, device)
        self.p = LrsParams(**cfg.params)
        self.conf = ConfidenceTracker(table, self.p.conf_topk, self.p.conf_window, device)

    def observe_logits(self, slots, logits, keep) -> None:
        self.conf.update(slots, logits, keep)

    def read_slot(self, slot: int) -> dict:
        return self.conf.read(slot)


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


# --- DeepConf trace confidence, worker side -------------------------------------------------

class ConfidenceTracker:
    """Per request slot: token confidence c_t = −mean(top-k log-probs) of the distribution each
    generated token was sampled from; group confidence = mean of c over a sliding window of
    ``window`` tokens; the trace's confidence is its lowest group confidence (the mean over all
    tokens when shorter than a window). Vectorised over the rows of a step."""

    def __init__(self, table, conf_topk: int, conf_window: int, device=None):
        self.conf_topk, self.conf_window = int(conf_topk), int(conf_window)
        self.table = table
        table.register("conf_ring", (self.conf_window,), torch.float32, 0.0)
        table.register("conf_win", (), torch.float32, 0.0)
        table.register("conf_n", (), torch.int64, 0)
        table.register("conf_low", (), torch.float32, float("inf"))
        table.register("conf_total", (), torch.float32, 0.0)

    def update(self, slots: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> None:
        """``slots``: [R] slot per logits row; ``mask``: rows whose sampled token is kept."""
        t = self.table.t
        k = min(self.conf_topk, logits.shape[-1])
        lp = torch.log_softmax(logits.float(), dim=-1)
        c = -lp.topk(k, dim=-1).values.mean(-1)  # [R]
        s = slots  # one row per slot per step: indices are unique, so plain index writes are safe
        n = t["conf_n"][s]
        idx = n % self.conf_window
        old = t["conf_ring"][s, idx]
        full = n >= self.conf_window
        win = t["conf_win"][s] + c - torch.where(full, old, torch.zeros_like(old))
        n1 = n + 1
        low = torch.where(n1 >= self.conf_window, torch.minimum(t["conf_low"][s], win / self.conf_window), t["conf_low"][s])
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
        return {"conf": low if n >= self.conf_window else mean, "conf_mean": mean, "conf_tokens": n}


METHOD = LrsMethod
