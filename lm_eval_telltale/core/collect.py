"""From a step log to per-request records: the part of statistics collection every adapter shares.

An adapter keeps the host rows that :meth:`~lm_eval_telltale.core.engine.CoreEngine.end` returns
(one dict of arrays per step: ``serial``, ``position``, ``norm``, ``tau``, ``event``, ``norm_out``,
the method's columns) and, when requests are finished, turns them into one record per request:

- :func:`take_rows` splits the log by request serial (token order) and keeps what is not taken;
- :func:`trim_rows` drops rows past an answer's last fed position (vLLM: a forward the engine ran
  after the request had stopped);
- :func:`request_record` summarises one request (``core.stats.summarize``, the method's
  ``summarize_columns``, the per-token trace with ``record_tokens``) into the dict the lm-eval model
  types turn into a sidecar row.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .stats import summarize

Rows = dict[str, np.ndarray]


def take_rows(log: list[dict[str, torch.Tensor]], serials: set[int]) -> tuple[dict[int, Rows], list[dict[str, torch.Tensor]]]:
    """``({serial: rows in position order}, the log without them)``."""
    if not log or not serials:
        return {}, log
    cat = {k: torch.cat([r[k] for r in log]).numpy() for k in log[0]}
    want = np.isin(cat["serial"], np.fromiter(serials, dtype=np.int64))
    keep = ~want
    rest = [{k: torch.from_numpy(v[keep]) for k, v in cat.items()}] if keep.any() else []
    sub = {k: v[want] for k, v in cat.items()}
    order = np.lexsort((sub["position"], sub["serial"]))
    sub = {k: v[order] for k, v in sub.items()}
    uniq, start = np.unique(sub["serial"], return_index=True)
    bounds = list(start[1:]) + [len(sub["serial"])]
    return {int(s): {k: v[a:b] for k, v in sub.items()} for s, a, b in zip(uniq, start, bounds)}, rest


def trim_rows(rows: Rows, last_fed: int) -> tuple[Rows, int]:
    """``rows`` without positions past ``last_fed``, and how many were dropped."""
    if rows["position"].size and rows["position"][-1] > last_fed:
        keep = rows["position"] <= last_fed
        return {k: v[keep] for k, v in rows.items()}, int((~keep).sum())
    return rows, 0


def empty_rows(num_layers: int, columns: tuple[str, ...]) -> Rows:
    """The rows of a request that never had a generated token fed back."""
    L = num_layers
    return {"position": np.zeros(0, np.int64), "norm": np.zeros((0, L), np.float32),
            "tau": np.zeros((0, L), np.float32), "event": np.zeros((0, L), np.int16),
            **{c: np.zeros((0, L), np.float32) for c in columns}}


def _nullable(a: np.ndarray) -> list:
    """Rows of floats rounded to 5 digits; NaN (nothing recorded) → null."""
    return [[None if not np.isfinite(v) else round(float(v), 5) for v in row] for row in a]


def request_record(info, rows: Rows, layers: list[int], method, record_tokens: bool) -> dict[str, Any]:
    """One request's record: ``tag``, ``request_id``, ``prompt_len``, ``n_decode_tokens``,
    ``layers`` (per-layer statistics and the method's own), the request's meta (e.g. LRS's trace
    confidence) and, with ``record_tokens``, the per-token trace."""
    r = rows
    rec = {
        "tag": info.tag, "request_id": info.key, "prompt_len": info.meta.get("prompt_len"),
        "n_decode_tokens": int(r["norm"].shape[0]),
        "layers": summarize(r["norm"], r["tau"], r["event"], layers),
    }
    rec.update({k: v for k, v in info.meta.items() if k not in ("prompt_len", "_read")})
    cols = {c: r[c] for c in method.columns if c in r}
    for l, extra in method.summarize_columns(r["position"], cols, r["event"], layers).items():
        rec["layers"].setdefault(l, {}).update(extra)
    if record_tokens:
        rec["tokens"] = {
            "position": r["position"].tolist(),
            "norm": np.round(r["norm"], 5).tolist(),
            "tau": _nullable(r["tau"]),
            "event": r["event"].tolist(),
        }
        if "norm_out" in r:
            rec["tokens"]["norm_out"] = np.round(r["norm_out"], 5).tolist()
        for c, v in cols.items():  # the method's columns
            rec["tokens"][c] = _nullable(v)
    return rec
