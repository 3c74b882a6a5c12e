"""From a step log to per-request records: the part of statistics collection every adapter shares.

:meth:`~lm_eval_telltale.core.engine.CoreEngine.end` appends each step's rows of new generated
tokens to a device buffer (:class:`StepRows`: no device→host transfer in a step);
:meth:`~lm_eval_telltale.core.engine.CoreEngine.drain` moves what accumulated to the host (one
dict of arrays: ``serial``, ``position``, ``norm``, ``tau``, ``event``, ``norm_out``, the method's
columns). An adapter drains when it collects finished requests (and the buffer drains itself
before it could overflow) and, when requests are finished, turns the rows into one record per
request:

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

#: rows a device buffer holds before it must drain (grown when one step could bring more)
STEP_ROWS = 4096


class StepRows:
    """The rows of new generated tokens, accumulated on the device step after step.

    Each step's rows (``ints`` [N, 2 + L]: serial, position, events; ``floats`` [N, k·L]: the named
    float columns) are compacted into static buffers with device arithmetic only: the i-th new
    token goes to ``cursor + i`` (a cumulative sum over the step's ``new`` mask), every other token
    to a spare row, and the cursor (a device scalar) advances by the count. The host never learns
    how many rows were written until :meth:`drain`. It only keeps an upper bound (each request
    brings at most one new token per step: ``rows``), and drains first whenever that bound could
    pass the buffer's size. So a steady-state step transfers nothing to the host; a drain is one
    sync and two copies for many steps."""

    def __init__(self, names: list[str], num_layers: int, device=None, capacity: int = STEP_ROWS):
        self.names, self.L, self.device = list(names), int(num_layers), device
        self.held: list[dict[str, torch.Tensor]] = []  # drained early (the buffer was full)
        self._fixed = False
        self._alloc(int(capacity))

    # the buffers are written in vLLM's steps (inference mode) and drained outside them: every
    # operation on them runs in inference mode

    @torch.inference_mode()
    def _alloc(self, capacity: int) -> None:
        self.capacity = capacity
        self.ints = torch.zeros(capacity + 1, 2 + self.L, dtype=torch.int64, device=self.device)
        self.floats = torch.zeros(capacity + 1, len(self.names) * self.L, dtype=torch.float32, device=self.device)
        self.cursor = torch.zeros((), dtype=torch.int64, device=self.device)
        self.bound = 0  # host: the most rows written since the last drain

    @torch.inference_mode()
    def append(self, ints: torch.Tensor, floats: torch.Tensor, new: torch.Tensor, rows: int) -> None:
        """One step's rows; ``new`` [N] marks the rows kept; ``rows``: the step's requests (a bound
        on its new tokens)."""
        rows_write(*self.reserve(rows), ints, floats, new)

    def reserve(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Make room for a step with ``rows`` requests (the host's part of :meth:`append`: drain
        first if the buffer could fill up); the buffers :func:`rows_write` then writes."""
        if self.bound + rows > self.capacity:
            self._hold()
            if rows > self.capacity:
                if self._fixed:
                    raise RuntimeError(f"telltale: {rows} rows in a step, more than the fixed rows' buffer holds "
                                       f"({self.capacity})")
                self._alloc(2 * rows)
        self.bound += rows
        return self.ints, self.floats, self.cursor

    def fixed(self, max_rows: int) -> None:
        """Keep these buffers from now on (a model graph holds them), big enough for steps of up to
        ``max_rows`` rows."""
        if max_rows > self.capacity:
            self._hold()
            self._alloc(2 * max_rows)
        self._fixed = True

    def _hold(self) -> None:
        part = self._take()
        if part is not None:
            self.held.append(part)

    @torch.inference_mode()
    def _take(self) -> dict[str, torch.Tensor] | None:
        if self.bound == 0:
            return None
        n = int(self.cursor)  # the one host sync of a drain
        self.bound = 0
        if n == 0:
            return None
        ints = self.ints[:n].to("cpu", copy=True)
        floats = self.floats[:n].to("cpu", copy=True)
        self.cursor.zero_()
        L = self.L
        out = {"serial": ints[:, 0], "position": ints[:, 1], "event": ints[:, 2:].to(torch.int16)}
        for i, name in enumerate(self.names):
            out[name] = floats[:, i * L:(i + 1) * L]
        return out

    def drain(self) -> list[dict[str, torch.Tensor]]:
        """Every row appended since the last drain, on the host (a list of row dicts, step order)."""
        self._hold()
        out, self.held = self.held, []
        return out


def rows_write(ints_buf, floats_buf, cursor, ints, floats, new) -> None:
    """The device's part of :meth:`StepRows.append`: the step's rows where ``new`` [N] into the
    buffers from ``cursor`` on, every other row into the spare last row, and the cursor advanced —
    in place, device arithmetic only (a compiled step calls it)."""
    dest = cursor + torch.cumsum(new.to(torch.int64), 0) - 1
    dest = torch.where(new, dest, torch.full_like(dest, ints_buf.shape[0] - 1))  # the spare row
    ints_buf.index_copy_(0, dest, ints)
    floats_buf.index_copy_(0, dest, floats)
    cursor += new.sum()


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
    rec.update({k: v for k, v in info.meta.items() if k != "prompt_len" and not k.startswith("_")})
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
