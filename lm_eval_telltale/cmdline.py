"""What the ``lm_eval`` command line of this process says, read as lm-eval 0.4's own CLI reads it,
and the one parser of lm-eval's ``key=value`` argument strings.

lm-eval builds the model before it hands it any request, and its model constructor receives only
``--model_args``; a task's ``process_results`` receives only the doc and the responses. Some
decisions need more: where the sidecar goes (``--output_path``), which doc ids are asked for
(``--samples``), whether LRS can work at all (``--tasks``, ``--gen_kwargs``), whether the prompts
end inside an open think block (``--model_args``, ``--apply_chat_template``). Those are read here,
from ``sys.argv``. Under the Python API (no such flags) every reader returns its empty value and
the callers fall back to their defaults.

:func:`parse_args_string` is the one reading of ``--model_args`` / ``--gen_kwargs`` values, on the
command line and in results files: a dict, a JSON object, ``k=v,k=v`` (commas inside brackets or
quotes kept, as lm-eval's ``split_top_level``) or several of these (``--model_args a=1 b=2``),
merged. Values written as ``k=v`` stay strings (each consumer checks its own keys and types);
JSON values keep their types.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterable

__all__ = ["split_top_level", "parse_args_string", "option_values", "option_value", "model_args", "gen_kwargs",
           "tasks", "output_path", "samples", "applies_chat_template"]


def split_top_level(text: str) -> list[str]:
    """``text`` split at the commas outside brackets, braces and quotes (empty parts dropped)."""
    parts: list[str] = []
    buf: list[str] = []
    depth = 0
    quote: str | None = None
    for ch in text:
        if quote is not None:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch in "[({":
            depth += 1
        elif ch in "])}":
            depth = max(depth - 1, 0)
        elif ch == "," and depth == 0:
            parts.append("".join(buf))
            buf = []
            continue
        buf.append(ch)
    parts.append("".join(buf))
    return [p for p in parts if p.strip()]


def parse_args_string(value: Any) -> dict[str, Any]:
    """A ``--model_args`` / ``--gen_kwargs`` value as a dict (see the module's docstring). A part
    without ``=`` is glued to the value before it (``stop=a,b`` written by an older lm-eval); a
    malformed JSON object gives {}."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, (list, tuple)):
        out: dict[str, Any] = {}
        for v in value:
            out.update(parse_args_string(v))
        return out
    text = str(value).strip()
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except ValueError:
            return {}
        return {str(k): v for k, v in obj.items()} if isinstance(obj, dict) else {}
    out = {}
    for part in split_top_level(text):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
        elif out:
            last = next(reversed(out))
            out[last] = f"{out[last]},{part}"
    return out


def _is_flag(token: str) -> bool:
    """An option name (``--x``, ``-x``), not a value such as ``-1``."""
    return token.startswith("--") or (len(token) >= 2 and token[0] == "-" and token[1].isalpha())


def option_values(*flags: str, argv: list[str] | None = None) -> list[str] | None:
    """Every value given to any of ``flags``, over all their occurrences, in order: ``--flag A B``
    (lm-eval's ``nargs="+"`` options), ``--flag=A``. None when no flag occurs."""
    argv = sys.argv if argv is None else argv
    found: list[str] | None = None
    i = 0
    while i < len(argv):
        a = argv[i]
        name, eq, inline = a.partition("=")
        if name in flags and _is_flag(name):
            found = [] if found is None else found
            if eq:
                found.append(inline)
            else:
                while i + 1 < len(argv) and not _is_flag(argv[i + 1]):
                    i += 1
                    found.append(argv[i])
        i += 1
    return found


def option_value(*flags: str, argv: list[str] | None = None) -> str | None:
    """The last value given to any of ``flags`` (a one-value option), else None."""
    vals = option_values(*flags, argv=argv)
    return vals[-1] if vals else None


def model_args(argv: list[str] | None = None) -> dict[str, Any]:
    """``--model_args`` / ``-a``, merged; {} when absent."""
    return parse_args_string(option_values("--model_args", "-a", argv=argv) or [])


def gen_kwargs(argv: list[str] | None = None) -> dict[str, Any]:
    """``--gen_kwargs``, merged; {} when absent."""
    return parse_args_string(option_values("--gen_kwargs", argv=argv) or [])


def tasks(argv: list[str] | None = None) -> list[str]:
    """``--tasks`` / ``-t``: names split at commas and spaces, as lm-eval's ``SplitArgs``."""
    vals: Iterable[str] = option_values("--tasks", "-t", argv=argv) or []
    return [t.strip() for v in vals for t in v.replace(",", " ").split() if t.strip()]


def output_path(argv: list[str] | None = None) -> str | None:
    return option_value("--output_path", "-o", argv=argv)


def applies_chat_template(argv: list[str] | None = None) -> bool:
    """Does the command line apply a chat template (``--apply_chat_template`` [NAME])?"""
    return option_values("--apply_chat_template", argv=argv) is not None


def samples(argv: list[str] | None = None) -> dict[str, list[int]] | None:
    """``--samples``: a JSON mapping task → doc indices, inline or in a file (lm-eval's own rule)."""
    v = option_value("--samples", "-E", argv=argv)
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
