"""Start-up hook that makes ``lm_eval --model vllm-norms`` (and the other telltale model types)
work from lm-eval's own console script.

lm-eval 0.4.x has no plugin discovery. ``lm_eval_telltale.pth`` (and, for Python >= 3.15,
``lm_eval_telltale.start``) calls :func:`install` at interpreter start. That only puts a
meta-path finder in front of the import system (well under a millisecond). When — and only
when — ``lm_eval.api.registry`` is imported, the finder lets the module execute and then:

1. imports ``lm_eval.models`` first, so the stock model names (``vllm``, ``hf``, ...) are
   registered. ``get_model`` only imports ``lm_eval.models`` when the registry is empty, so
   registering anything before that would hide every stock model (the "ordering trap");
2. registers our names as lazy ``"module:Class"`` placeholders (nothing of vLLM is imported
   until a telltale model type is actually asked for).

When ``lm_eval.tasks.manager`` is imported it also adds the packaged task directory to every
``TaskManager``'s include paths, so ``--tasks telltale_gsm8k`` works without ``--include_path``
(set ``TELLTALE_NO_TASKS=1`` to opt out). With ``TELLTALE_TASKS_ONLY=1`` a ``TaskManager`` built
without an explicit ``include_defaults`` indexes only the telltale tasks and its include paths, not
lm-eval's ~14,750 built-in tasks: about 15 s less at every ``lm_eval`` start on a 2-core CPU, for
runs of telltale (or ``--include_path``) tasks only; ``make eval`` and the tests set it. Each
switch of this module is off when unset, empty or ``0``.

Everything fails soft: a problem is printed to stderr and never breaks lm-eval.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

_TARGETS = ("lm_eval.api.registry", "lm_eval.tasks.manager")


def _warn(msg: str) -> None:
    print(f"[lm_eval_telltale] {msg}", file=sys.stderr)


def register_models() -> None:
    """Register the telltale model types into lm-eval's registry (idempotent)."""
    try:
        import lm_eval.models  # noqa: F401  (stock placeholders first: see module docstring)
        from lm_eval.api.registry import model_registry

        from lm_eval_telltale import MODEL_TYPES

        for name, target in MODEL_TYPES.items():
            if name not in model_registry:
                model_registry.register(name, target=target)
    except Exception as exc:  # pragma: no cover - defensive
        _warn(f"could not register model types with lm-eval: {exc!r}")


def _on(name: str) -> bool:
    """A switch of this hook: set to anything but empty or ``0``."""
    return os.environ.get(name, "") not in ("", "0")


def _with_ours(include_path):
    """``include_path`` with the telltale task directory in front (once)."""
    from lm_eval_telltale import tasks_dir

    ours = str(tasks_dir())
    if include_path is None:
        return [ours]
    if isinstance(include_path, (list, tuple)):
        return [ours, *include_path] if ours not in map(str, include_path) else list(include_path)
    return include_path if str(include_path) == ours else [ours, include_path]


def _patch_task_manager(module) -> None:
    if _on("TELLTALE_NO_TASKS"):
        return
    cls = getattr(module, "TaskManager", None)
    if cls is None or getattr(cls.__init__, "_telltale", False):
        return
    import inspect

    orig = cls.__init__
    sig = inspect.signature(orig)

    def __init__(self, *args, **kwargs):
        try:  # the caller's arguments by lm-eval's own signature, positional or not
            bound = sig.bind(self, *args, **kwargs)
        except TypeError:
            return orig(self, *args, **kwargs)  # lm-eval's own error
        given = bound.arguments
        if _on("TELLTALE_TASKS_ONLY") and "include_defaults" not in given:
            given["include_defaults"] = False  # see the module docstring
        try:
            given["include_path"] = _with_ours(given.get("include_path"))
        except Exception as exc:  # pragma: no cover - defensive
            _warn(f"could not add the telltale task directory: {exc!r}")
        orig(*bound.args, **bound.kwargs)

    __init__._telltale = True  # type: ignore[attr-defined]
    cls.__init__ = __init__


class _Loader(importlib.abc.Loader):
    def __init__(self, inner, name):
        self._inner = inner
        self._name = name

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        try:
            if self._name == "lm_eval.api.registry":
                register_models()
            else:
                _patch_task_manager(module)
        except Exception as exc:  # pragma: no cover - defensive
            _warn(f"post-import hook failed for {self._name}: {exc!r}")


class _Finder(importlib.abc.MetaPathFinder):
    _telltale = True

    def find_spec(self, fullname, path, target=None):
        if fullname not in _TARGETS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _Loader(spec.loader, fullname)
        return spec


def install(force: bool = False) -> None:
    """Idempotent. Also handles the case where lm-eval was imported before us.
    ``TELLTALE_NO_HOOK=1`` disables the start-up hook (``force`` overrides it: the
    ``python -m lm_eval_telltale`` fallback)."""
    try:
        if _on("TELLTALE_NO_HOOK") and not force:
            return
        if not any(getattr(f, "_telltale", False) for f in sys.meta_path):
            sys.meta_path.insert(0, _Finder())
        if "lm_eval.api.registry" in sys.modules:
            register_models()
        if "lm_eval.tasks.manager" in sys.modules:
            _patch_task_manager(sys.modules["lm_eval.tasks.manager"])
    except Exception as exc:  # pragma: no cover - defensive
        _warn(f"start-up hook failed: {exc!r}")
