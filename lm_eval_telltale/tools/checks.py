"""Argument checks the ``telltale`` tools share, made before anything is built, written or started.

- :func:`unwritable`: why a path cannot be written as a file or a directory (``--out``, ``--plot``);
- :func:`unknown_engine_args`: the keys of an ``--engine-args`` object that vLLM's ``LLM(...)``
  would reject with a ``TypeError`` only once the engine starts
  (:func:`lm_eval_telltale.vllm.unknown_engine_keys`).

Which destinations overwrite an input is :meth:`lm_eval_telltale.tools.runs.Inputs.conflict`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable


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


def unknown_engine_args(engine_args: Iterable[str]) -> str | None:
    """Why vLLM would reject an ``--engine-args`` object (its unknown keys), or None."""
    from ..vllm import unknown_engine_keys

    bad = unknown_engine_keys(engine_args)
    if not bad:
        return None
    return (f"unknown vLLM engine argument(s) {', '.join(map(repr, bad))} (neither a field of "
            "vllm.engine.arg_utils.EngineArgs nor an argument of vllm.LLM)")
