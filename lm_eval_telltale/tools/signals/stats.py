"""Correlations, effect sizes and their bootstrap intervals for ``telltale signals``.

Tokens of one generation are not independent, so every interval resamples whole generations (a
cluster bootstrap: ``groups`` gives each token's generation), percentile method, 95 %.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

CI = 0.95


def pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of each row of ``a`` [S, n] with ``b`` [n] (NaN where a row or b is constant)."""
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean()
    den = np.sqrt((a * a).sum(-1) * (b * b).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(-1) / np.where(den > 0, den, 1.0), np.nan)


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman ρ (Pearson of average ranks, ties shared) of each row of ``a`` with ``b``."""
    return pearson_rows(rankdata(a, axis=-1), rankdata(b))


def cohens_d(a: np.ndarray, b: np.ndarray) -> float:
    """(mean a − mean b) / pooled SD."""
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        return float("nan")
    s = np.sqrt(((na - 1) * a.var(ddof=1) + (nb - 1) * b.var(ddof=1)) / (na + nb - 2))
    return float((a.mean() - b.mean()) / s) if s > 0 else float("nan")


def auc(a: np.ndarray, b: np.ndarray) -> float:
    """P(a token of ``a`` > a token of ``b``), ties counting ½ (Mann–Whitney U / (n_a n_b))."""
    if not len(a) or not len(b):
        return float("nan")
    r = rankdata(np.concatenate([a, b]))
    return float((r[:len(a)].sum() - len(a) * (len(a) + 1) / 2) / (len(a) * len(b)))


class Draws:
    """``n`` bootstrap draws of whole generations (``groups``: each row's generation): iterating
    gives each draw's row indices, built on demand from the stored picks (n × generations small
    integers), so the same draws serve every statistic without holding n × rows indices."""

    def __init__(self, groups: np.ndarray, n: int, seed: int):
        rng = np.random.default_rng(seed)
        ids = np.unique(groups)
        self.members = [np.flatnonzero(groups == g) for g in ids]
        self.picks = rng.integers(0, len(ids), (n, len(ids))) if len(ids) else np.zeros((n, 0), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.picks)

    def __iter__(self):
        for pick in self.picks:
            yield np.concatenate([self.members[i] for i in pick]) if len(pick) else np.zeros(0, dtype=np.int64)


def cluster_draws(groups: np.ndarray, n_boot: int, seed: int) -> Draws:
    """``n_boot`` draws, each the rows of as many generations drawn with replacement."""
    return Draws(groups, n_boot, seed)


def interval(values: list[float] | np.ndarray) -> list[float | None]:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size < 2:
        return [None, None]
    lo, hi = np.quantile(v, [(1 - CI) / 2, 1 - (1 - CI) / 2])
    return [float(lo), float(hi)]


def correlations(signals: np.ndarray, target: np.ndarray, draws) -> dict[str, np.ndarray]:
    """Spearman and Pearson of each signal row [S, n] with ``target`` [n]: point values [S],
    intervals [S, 2] and the draws' values [n_boot, S] (``*_boot``: paired statistics use them)."""
    out = {}
    for name, fn in (("spearman", spearman_rows), ("pearson", pearson_rows)):
        point = fn(signals, target)
        boot = np.array([fn(signals[:, ix], target[ix]) for ix in draws]).reshape(len(draws), len(signals))
        out[name] = point
        out[name + "_boot"] = boot
        out[name + "_ci"] = np.array([interval(boot[:, s]) for s in range(len(signals))], dtype=object)
    return out


def contrast(values: np.ndarray, think: np.ndarray, answer: np.ndarray, draws) -> dict:
    """Thinking vs answering tokens for one signal: means, Cohen's d (with interval) and AUC."""
    d_boot = [cohens_d(values[ix][think[ix]], values[ix][answer[ix]]) for ix in draws]
    a, b = values[think], values[answer]
    return {"n_think": int(a.size), "n_answer": int(b.size),
            "mean_think": float(a.mean()) if a.size else None, "mean_answer": float(b.mean()) if b.size else None,
            "d": cohens_d(a, b), "d_ci": interval(d_boot), "auc": auc(a, b)}
