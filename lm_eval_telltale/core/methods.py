"""Method registry: ``cfg.method`` → the module that implements it.

A reader finds each method in one file. A method module defines:

- ``KEYS``: its model_args knobs, ``{name: (default, help)}`` (defaults from METHODS.md);
- ``CHECKS`` (optional): ``{name: fn(value) -> (ok, message)}`` range checks;
- ``METHOD``: a :class:`~lm_eval_telltale.core.engine.Method` subclass (the tensor operation at a
  patched layer).

``norms`` and ``lrs`` only observe while decoding (LRS selects among finished candidates in the
driver), so they use the base :class:`Method`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .engine import Method

MODULES: dict[str, str] = {
    "norms": "lm_eval_telltale.core.norms",
    "lrs": "lm_eval_telltale.core.lrs",
    "suppress": "lm_eval_telltale.core.suppress",
    "alrr": "lm_eval_telltale.core.alrr",
    "erss": "lm_eval_telltale.core.erss",
}


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
