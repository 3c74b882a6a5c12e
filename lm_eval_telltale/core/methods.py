"""Method registry: ``cfg.method`` → the module that implements it.

A reader finds each method in one file. A method module defines:

- a frozen parameter dataclass of its knobs (fields made with :func:`~lm_eval_telltale.core.params.knob`:
  default, help, range check; defaults and their sources in docs/methods.md), and
  ``KEYS``/``CHECKS`` derived from it;
- ``METHOD``: a :class:`~lm_eval_telltale.core.engine.Method` subclass (the tensor operation at a
  patched layer).

``norms`` only observes (the base :class:`Method`); ``lrs`` observes and tracks each candidate's
confidence (LRS selects among finished candidates in the driver).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..spec import METHODS
from .engine import Method

#: each method lives in ``core/<name>.py``
MODULES: dict[str, str] = {m: f"lm_eval_telltale.core.{m}" for m in METHODS}


def method_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(MODULES[name])
    except KeyError:
        raise ValueError(f"telltale: unknown method {name!r} (known: {sorted(MODULES)})") from None


def method_keys(name: str) -> dict:
    return dict(getattr(method_module(name), "KEYS", {}))


def method_checks(name: str) -> dict:
    return dict(getattr(method_module(name), "CHECKS", {}))


def make_method(cfg, table, num_layers: int, device) -> Method:
    return method_module(cfg.method).METHOD(cfg, table, num_layers, device)
