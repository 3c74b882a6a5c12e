"""Typed, frozen parameter objects for the methods' knobs.

A method module declares its knobs once, as a frozen dataclass whose fields are made with
:func:`knob` (default, help text, optional range check)::

    @dataclass(frozen=True)
    class AlrrParams:
        blowup: float = knob(1.5, "candidates ... stay below blowup·τ", lambda v: v > 1, "must be > 1")

and derives ``KEYS = keys_of(AlrrParams)`` (``{name: (default, help)}``, what the config layer
validates ``--model_args`` against) and ``CHECKS = checks_of(AlrrParams)``. Field names are the
``--model_args`` names; the method reads ``self.p.blowup`` — one name from the command line to the
tensor operation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


def knob(default: Any, help: str, check: Callable[[Any], bool] | None = None, why: str = "") -> Any:
    """A dataclass field carrying its help text and range check."""
    return dataclasses.field(default=default, metadata={"help": help, "check": check, "why": why})


def keys_of(cls) -> dict[str, tuple[Any, str]]:
    return {f.name: (f.default, f.metadata.get("help", "")) for f in dataclasses.fields(cls)}


def checks_of(cls) -> dict[str, Callable[[Any], tuple[bool, str]]]:
    out = {}
    for f in dataclasses.fields(cls):
        check, why = f.metadata.get("check"), f.metadata.get("why", "")
        if check is not None:
            out[f.name] = (lambda c, w: (lambda v: (bool(c(v)), f"{w}, got {v!r}")))(check, why)
    return out

