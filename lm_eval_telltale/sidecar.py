"""The per-answer JSONL sidecar: its writer, the one reader, and the run summary recorded in
lm-eval's results JSON.

One JSON line per generated answer::

    {"task", "doc_id" (the id lm-eval writes in its samples file, also under --samples),
     "doc_hash" (lm-eval's doc_hash of the document: joins by content), "repeat", "method", "tag",
     "n_prompt_tokens", "n_generated_tokens", "finish_reason", "response" (lm-eval's post-processed
     text), "raw_output" (full text, thinking included), "n_decode_tokens",
     "layers": {"<layer>": {count, mean, max, A, B, C, D, late_sum, tau_first, tau_last, tau_mean,
     tau_ready, [suppressed, recursed, accepted, injected, banked], [the method's own statistics,
     e.g. ERSS: inject_positions, inject_cos, inject_vnorm, inject_rejected, bank_max, bank_last]}},
     ["tokens": {position, norm, tau, event[, norm_out][, the method's columns]}, "token_ids"]
     (record_tokens=true)}

**Durability.** A row is appended as soon as its answer is finished (the model types collect the
statistics of finished answers while generation goes on), as one whole line per ``write`` call,
flushed to the operating system at once and fsync'ed at most every ``fsync_s`` seconds and when a
``generate_until`` call ends. So after Ctrl-C or a kill, every answer finished before the last
flush is a valid line; at most the line being written is torn, and the reader skips it with a
warning. The writer repairs a torn tail before appending. Join to lm-eval's samples on
(task, doc_id, repeat).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from .core.stats import EVENT_NAMES
from .files import unwritable


def append_lines(path: str | Path, rows: list[dict[str, Any]], fsync: bool = False) -> None:
    """Append ``rows`` as whole JSON lines in one write, flushed at once; a torn tail left by a
    killed writer is closed first so it cannot swallow the new line."""
    if not rows:
        return
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with Path(path).open("a+b") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                text = "\n" + text
        f.write(text.encode("utf-8"))
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def unwritable_sidecar(path: str | Path) -> str | None:
    """Why a run cannot write its sidecar at ``path`` (None: it can). A sidecar belongs to one run:
    an existing file would get this run's rows appended to another run's, so it is refused. The
    directory is created here (as the writer would), so an impossible path fails now, before any
    engine starts, not at the first finished answer."""
    path = Path(path)
    if path.is_dir():
        return f"{path} is a directory; give the path of a new .jsonl file"
    if path.exists():
        return (f"{path} already exists (the sidecar of an earlier run?); this run's rows would be appended to "
                "it and two runs' rows mixed. Give a new path, or move the old file away")
    why = unwritable(path)
    if why:
        return why
    try:  # what the permission bits cannot tell (a root process passes them everywhere: /proc/...)
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot create the directory {path.parent}: {e.strerror or e}"
    return None


class SidecarWriter:
    def __init__(self, path: str | Path, fsync_s: float = 10.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.count = 0
        self.fsync_s = float(fsync_s)
        self._last_sync = time.monotonic()
        self._dirty = False

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Append whole lines (one ``write`` call), flushed at once, fsync'ed at the cadence."""
        if not rows:
            return
        due = time.monotonic() - self._last_sync >= self.fsync_s
        append_lines(self.path, rows, fsync=due)
        if due:
            self._last_sync, self._dirty = time.monotonic(), False
        else:
            self._dirty = True
        self.count += len(rows)

    def sync(self) -> None:
        """fsync what was written (end of a generate_until call)."""
        if self._dirty and self.path.exists():
            with self.path.open("rb") as f:
                os.fsync(f.fileno())
        self._last_sync, self._dirty = time.monotonic(), False


def read_sidecar(path: str | Path, warn: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The answer rows of a sidecar, in file order.

    A line that is not a complete row — the torn last line of a run killed while writing, a
    damaged line — is skipped and reported through ``warn`` (one message naming the file and the
    line numbers); without ``warn`` it raises :class:`ValueError`."""
    path = Path(path)
    rows, bad = [], []
    with path.open(encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict) and "task" in row and "doc_id" in row:
                rows.append(row)
            else:
                bad.append(i)
    if bad:
        msg = (f"sidecar {path}: skipped {len(bad)} unreadable or partial line(s) "
               f"({', '.join(map(str, bad[:5]))}{', ...' if len(bad) > 5 else ''})")
        if warn is None:
            raise ValueError(msg)
        warn(msg)
    return rows


class RunSummary:
    """Totals over all answers of a run: tokens, per-layer mean norm, events per 1k tokens."""

    def __init__(self, cfg):
        self.layers = [str(l) for l in cfg.layers]
        self.answers = 0
        self.generated = 0
        self.decode = 0
        self.length_finish = 0
        self.norm_sum = {l: 0.0 for l in self.layers}
        self.events = {name: {l: 0 for l in self.layers} for name in EVENT_NAMES if name != "above_tau"}
        self.above = {l: 0 for l in self.layers}

    def add(self, row: dict[str, Any]) -> None:
        self.answers += 1
        self.generated += int(row.get("n_generated_tokens", 0))
        self.decode += int(row.get("n_decode_tokens", 0))
        self.length_finish += row.get("finish_reason") == "length"
        for l, st in (row.get("layers") or {}).items():
            if l not in self.norm_sum:
                continue
            self.norm_sum[l] += st.get("A", 0.0)
            self.above[l] += st.get("C", 0)
            for name in self.events:
                self.events[name][l] += st.get(name, 0)

    def to_dict(self) -> dict[str, Any]:
        d = max(1, self.decode)
        out = {
            "answers": self.answers,
            "generated_tokens": self.generated,
            "decode_tokens": self.decode,
            "finish_length_rate": self.length_finish / max(1, self.answers),
            "mean_norm": {l: self.norm_sum[l] / d for l in self.layers},
            "above_tau_per_1k": {l: 1000.0 * self.above[l] / d for l in self.layers},
        }
        for name, per in self.events.items():
            tot = sum(per.values())
            if tot:
                out[name] = {"total": tot, "per_1k_tokens": 1000.0 * tot / d, "per_layer": per}
        return out
