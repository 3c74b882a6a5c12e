"""Compiled per-step kernels.

A method's per-step tensor work is many small operations; at a small batch each costs its
dispatch (on a GPU, a launch) rather than its arithmetic, so together they outweigh the work.
:func:`compiled` turns such a function of fixed-shape tensors into one torch.compile'd kernel.
Adapters decide when (:meth:`~lm_eval_telltale.core.engine.CoreEngine.fuse`): the vLLM adapter
does whenever vLLM compiles the model, and not under ``enforce_eager=True``, so eager mode
compiles nothing. The compiled functions compute the same arithmetic in the same order; tests
hold them to bit-identical results.

Shapes are static (``dynamic=False``): each function is compiled for the shapes of the tables it
updates (a slot table's size), once per shape and process, with torch's on-disk caches making a
second process's compile cheaper. A function that also takes the step's tokens is compiled with
``dynamic=True`` asked for: its callers mark the token dimension dynamic, so one graph serves every
token count (torch compiles a single token apart). Up to :data:`SHAPES` shapes per function and process (engines
built one after another in one process share it); past that, or if compiling fails at all, the
caller runs the plain operations again and logs why (:func:`fallback`) — never a wrong number.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

logger = logging.getLogger("lm_eval_telltale")

#: compiled shapes per function and process
SHAPES = 64

_COMPILED: dict[tuple[Callable, bool], Callable] = {}


def compiled(fn: Callable, dynamic: bool = False) -> Callable:
    """``fn`` compiled once per process (one whole graph; static shapes, or with ``dynamic`` the
    dimensions its callers mark dynamic)."""
    c = _COMPILED.get((fn, dynamic))
    if c is None:
        mode = None if dynamic else False  # None: torch's default, which honours mark_dynamic
        try:
            c = torch.compile(fn, dynamic=mode, fullgraph=True, recompile_limit=SHAPES)
        except TypeError:  # a torch without per-function recompile limits
            c = torch.compile(fn, dynamic=mode, fullgraph=True)
        _COMPILED[(fn, dynamic)] = c
    return c


def fallback(fn: Callable, err: BaseException) -> Callable:
    """The plain ``fn`` after its compiled version failed with ``err``, logged; the caller runs the
    plain operations from then on, so it is logged once per estimator."""
    logger.warning("telltale: the compiled %s failed (%s: %s); running its operations one by one instead "
                   "(same results, slower)", getattr(fn, "__name__", fn), type(err).__name__, str(err).splitlines()[0][:200])
    return fn
