"""Argument checks the ``telltale`` tools share, made before anything is built, written or started.

- :func:`unknown_engine_args`: the keys of an ``--engine-args`` object that vLLM's ``LLM(...)``
  would reject with a ``TypeError`` only once the engine starts
  (:func:`lm_eval_telltale.vllm.unknown_engine_keys`).

Which destinations overwrite an input is :meth:`lm_eval_telltale.tools.runs.Inputs.conflict`.
"""

from __future__ import annotations

from typing import Iterable


def unknown_engine_args(engine_args: Iterable[str]) -> str | None:
    """Why vLLM would reject an ``--engine-args`` object (its unknown keys), or None."""
    from ..vllm import unknown_engine_keys

    bad = unknown_engine_keys(engine_args)
    if not bad:
        return None
    return (f"unknown vLLM engine argument(s) {', '.join(map(repr, bad))} (neither a field of "
            "vllm.engine.arg_utils.EngineArgs nor an argument of vllm.LLM)")
