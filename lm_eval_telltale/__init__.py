"""lm-eval-telltale: the Tell-Tale Norm test-time methods as lm-eval model types over stock vLLM.

This module is imported by the ``lm_eval_telltale.pth`` start-up hook in every interpreter of the
environment, so it must stay import-light: no torch, no vLLM, no lm-eval here.
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"

from .spec import MODEL_TYPES  # noqa: E402,F401  (lm-eval model type -> "module:Class")


def _data_dir(name: str) -> Path:
    """Directory shipped beside the package: inside it when installed from a wheel, at the
    repository root in a source/editable checkout."""
    here = Path(__file__).resolve().parent
    for cand in (here / name, here.parent / name):
        if cand.is_dir():
            return cand
    raise FileNotFoundError(f"lm_eval_telltale: cannot find the {name!r} directory near {here}")


def tasks_dir() -> Path:
    """The packaged lm-eval task YAMLs (pass to ``--include_path`` if the start-up hook is off)."""
    return _data_dir("tasks")


def model_configs_dir() -> Path:
    return _data_dir("model_configs")


def grids_dir() -> Path:
    """The shipped ``telltale grid`` files (``arith.yaml``: ``make eval``; ``paper.yaml``)."""
    return _data_dir("grids")
