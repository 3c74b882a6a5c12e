"""A cell's directory under the grid's output root, and its state on disk.

``<output>/cells/<model>__<method>[__sweep]__<task>[__s<seed>]__<id>/``:

- ``cell.json``  the cell's definition and its ``lm_eval`` command line;
- ``state.json`` ``running`` (with the pid and host of the process), ``done``, ``failed`` or
  ``interrupted``, with times and the exit status;
- ``log.txt``    the run's output;
- ``out/``       lm-eval's ``--output_path`` (results, samples, the telltale sidecar);
- ``attempts/<time>/`` an earlier attempt's ``out/`` and log, kept aside before a rerun (never
  mixed into the new one).

A cell is **done** only when its state says so *and* its results file is complete JSON *and*, for
a telltale model type, its sidecar is there: a crash between lm-eval's exit and the state write
leaves it to be rerun, not half-counted.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from ...spec import MODEL_TYPES
from .spec import Cell


def cell_dir(output: Path, cell: Cell) -> Path:
    return output / "cells" / cell.dirname


def _read(path: Path) -> dict | None:
    try:
        v = json.loads(path.read_text(encoding="utf-8"))
        return v if isinstance(v, dict) else None
    except (OSError, json.JSONDecodeError):
        return None


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON atomically (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def results_of(d: Path) -> Path | None:
    """The newest complete results file of a cell's ``out/`` (None when there is none)."""
    files = sorted((d / "out").rglob("results_*.json"))
    for f in reversed(files):
        res = _read(f)
        if res and isinstance(res.get("results"), dict) and res["results"]:
            return f
    return None


def sidecar_of(d: Path) -> Path | None:
    from ..runs import find_sidecar

    f = results_of(d)
    res = _read(f) if f else None
    return find_sidecar(f, res) if f and res else None


def complete(d: Path, cell: Cell) -> bool:
    if results_of(d) is None:
        return False
    return cell.model_type not in MODEL_TYPES or sidecar_of(d) is not None


def state_of(output: Path, cell: Cell) -> tuple[str, dict]:
    """(state, state.json) of a cell; a ``running`` cell whose process is gone (on this host) is
    ``interrupted``."""
    d = cell_dir(output, cell)
    st = _read(d / "state.json") or {}
    s = st.get("state")
    if s == "done":
        return ("done", st) if complete(d, cell) else ("interrupted", st)
    if s == "running":
        if st.get("host") == socket.gethostname() and not _alive(int(st.get("pid") or 0)):
            return "interrupted", st
        return "running", st
    if s in ("failed", "interrupted"):
        return s, st
    return ("interrupted", st) if d.exists() and any(d.iterdir()) else ("pending", st)


def prepare(output: Path, cell: Cell, command: list[str]) -> Path:
    """Make the cell's directory ready for a fresh attempt: an earlier attempt's ``out/`` and log
    go to ``attempts/<time>/``; the definition and command line are (re)written."""
    d = cell_dir(output, cell)
    d.mkdir(parents=True, exist_ok=True)
    leftovers = [p for p in (d / "out", d / "log.txt", d / "state.json") if p.exists()]
    if leftovers:
        aside = d / "attempts" / time.strftime("%Y%m%dT%H%M%S")
        n = 1
        while aside.exists():
            aside = aside.with_name(f"{aside.name.split('.')[0]}.{n}")
            n += 1
        aside.mkdir(parents=True)
        for p in leftovers:
            shutil.move(str(p), str(aside / p.name))
    write_json(d / "cell.json", {"id": cell.id, "label": cell.label, "model": cell.model, "method": cell.method,
                                 "point": dict(cell.point), "task": cell.task, "seed": cell.seed,
                                 "model_type": cell.model_type, "model_args": cell.model_args, "gpus": cell.gpus,
                                 "settings": cell.settings, "depends": list(cell.depends), "command": command})
    return d


def mark(d: Path, state: str, **extra: Any) -> None:
    st = _read(d / "state.json") or {}
    st.update(state=state, **extra)
    if state == "running":
        st.update(host=socket.gethostname(), started=time.strftime("%Y-%m-%dT%H:%M:%S"))
    else:
        st["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_json(d / "state.json", st)

