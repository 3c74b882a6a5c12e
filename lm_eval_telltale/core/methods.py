"""Method registry: ``cfg.method`` → the class that transforms (h, r) at a patched layer.

One file per method (``suppress.py``, ``alrr.py``, ``erss.py``); ``norms`` and ``lrs`` only
observe during decoding (LRS selects among finished candidates in the driver).
"""

from __future__ import annotations

from .engine import Method

_REGISTRY: dict[str, str] = {
    "norms": "lm_eval_telltale.core.engine:Method",
    "lrs": "lm_eval_telltale.core.engine:Method",
}


def method_class(name: str) -> type[Method]:
    import importlib

    try:
        target = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"telltale: unknown method {name!r} (known: {sorted(_REGISTRY)})") from None
    mod, cls = target.split(":")
    return getattr(importlib.import_module(mod), cls)


def make_method(cfg, table, num_layers: int, device) -> Method:
    return method_class(cfg.method)(cfg, table, num_layers, device)
