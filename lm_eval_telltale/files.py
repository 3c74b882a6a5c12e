"""Whether a path can be written, checked before anything is built, written or started: the one rule
the sidecar (``stats_path=``) and every ``telltale`` command's ``--out``/``--plot`` use. Imports
nothing of the package."""

from __future__ import annotations

import os
from pathlib import Path


def tail(path: str | Path, n: int = 20) -> str:
    """The last ``n`` lines of a text file (a log), "" when it cannot be read."""
    try:
        return "".join(Path(path).read_text(errors="replace").splitlines(True)[-n:])
    except OSError:
        return ""


def unwritable(path: str | Path, is_dir: bool = False) -> str | None:
    """Why ``path`` cannot be written as a directory (``is_dir``) or a file, or None. Permission bits
    only: a root process passes them everywhere, so the write itself may still fail (callers catch
    ``OSError`` there too)."""
    p = Path(path).expanduser().absolute()
    if p.exists():
        if is_dir and not p.is_dir():
            return f"{p} exists and is not a directory"
        if not is_dir and p.is_dir():
            return f"{p} is a directory; give a file name"
        d = p if is_dir else p.parent
        if not os.access(d, os.W_OK | os.X_OK) or not os.access(p, os.W_OK):
            return f"{p} is not writable"
        return None
    anc = p.parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        return f"cannot create {p}: {anc} is a file, not a directory"
    if not os.access(anc, os.W_OK | os.X_OK):
        return f"cannot create {p}: {anc} is not writable"
    return None
