"""What the ``lm_eval`` command line says about the run, for model classes that lm-eval does not
tell: ``--output_path``, ``--samples``, ``--include_path``, ``--tasks``, ``--gen_kwargs``.

lm-eval builds the model before it hands it any request, and its model constructor receives only
``--model_args``. These values decide where the sidecar goes, which doc id lm-eval writes, and
whether a configuration can work at all (LRS with greedy decoding) — so the model classes read
them from ``sys.argv``, as lm-eval's own CLI parses them. Under the Python API (no such flags)
every function returns None and the callers fall back to their defaults.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def argv_value(*flags: str, argv: list[str] | None = None) -> str | None:
    """The value of the last occurrence of any of ``flags`` (``--flag V`` or ``--flag=V``)."""
    argv = sys.argv if argv is None else argv
    found = None
    for i, a in enumerate(argv):
        for f in flags:
            if a == f and i + 1 < len(argv):
                found = argv[i + 1]
            elif a.startswith(f + "="):
                found = a.split("=", 1)[1]
    return found


def output_path(argv: list[str] | None = None) -> str | None:
    return argv_value("--output_path", "-o", argv=argv)


def samples(argv: list[str] | None = None) -> dict[str, list[int]] | None:
    """``--samples``: a JSON mapping task → doc indices, inline or in a file (lm-eval's own rule)."""
    v = argv_value("--samples", "-E", argv=argv)
    if not v:
        return None
    try:
        obj = json.loads(v)
    except json.JSONDecodeError:
        p = Path(v)
        if not p.is_file():
            return None
        try:
            obj = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None
    return obj if isinstance(obj, dict) else None


def gen_kwargs(argv: list[str] | None = None) -> dict[str, Any]:
    """``--gen_kwargs`` as a dict (``k=v,...`` or JSON); {} when absent."""
    v = argv_value("--gen_kwargs", argv=argv)
    if not v:
        return {}
    try:
        obj = json.loads(v)
        return obj if isinstance(obj, dict) else {}
    except json.JSONDecodeError:
        from lm_eval.utils import simple_parse_args_string

        return simple_parse_args_string(v)


def tasks(argv: list[str] | None = None) -> list[str]:
    v = argv_value("--tasks", "-t", argv=argv)
    return [t.strip() for t in v.split(",") if t.strip()] if v else []
