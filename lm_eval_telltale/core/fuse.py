"""Compiled per-step kernels.

A method's per-step tensor work is many small operations; at a small batch each costs its
dispatch (on a GPU, a launch) rather than its arithmetic, so together they outweigh the work.
:func:`compiled` turns such a function of fixed-shape tensors into one torch.compile'd kernel.
Adapters decide when (:meth:`~lm_eval_telltale.core.engine.CoreEngine.fuse`): the vLLM adapter
does whenever vLLM compiles the model, and not under ``enforce_eager=True``, so eager mode
compiles nothing. The compiled functions compute the same arithmetic in the same order; tests
hold them to bit-identical results. A sum over many elements would not be (a compiled reduction
adds in another order), so a function writes such a sum as additions in a fixed order (ERSS's dot
products with its bank: :func:`~lm_eval_telltale.core.erss.bank_dots`) or leaves it to its caller
(the norms).

Compiled now: the threshold update of request and global τ (once per step) and ERSS's layer step
(once per patched layer).

Shapes are static (``dynamic=False``): each function is compiled for the shapes of the tables it
updates (a slot table's size), once per shape and process, with torch's on-disk caches making a
second process's compile cheaper. A function that also takes the step's tokens is compiled with
``dynamic=True`` asked for: its callers mark the token dimension dynamic (:func:`plain`,
:func:`dynamic_tokens`), so one graph serves every token count (torch compiles a single token
apart). Up to :data:`SHAPES` shapes per function and process (engines built one after another in
one process share it); past that, or if compiling fails at all, the
caller runs the plain operations again and logs why (:func:`fallback`) — never a wrong number.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

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


def run(fn: Callable, state: tuple, inputs: tuple, written: tuple = (), consts: tuple = (), *,
        tokens: bool) -> tuple[object, bool]:
    """``fn(*state, *inputs, *written, *consts)`` compiled, under inference mode (vLLM's steps run in
    it, and a graph specialises on it): ``state`` as it is (tables the step may write in place),
    ``inputs`` read only, as :func:`plain` makes them, ``written`` (tensors it writes in place with
    a token dimension) as :func:`dynamic_tokens` does. ``tokens``: the inputs' first dimension
    counts the step's tokens. Returns (its result, True), or if compiling fails the plain
    operations' result and False — the caller runs them from then on."""
    with torch.inference_mode():
        args = (*state, *(plain(t, tokens) for t in inputs), *(dynamic_tokens(w) for w in written), *consts)
        if _get_current_dispatch_mode() is not None:
            # a dispatch mode is watching every operation (the sync audit, core/audit.py): the plain
            # operations, which it can see; a compiled call would not run under it, and its failure
            # must not switch the compiled kernel off for the steps after the audit
            return fn(*args), True
        try:
            return compiled(fn, dynamic=tokens)(*args), True
        except Exception as e:  # noqa: BLE001 — the plain operations give the same numbers
            return fallback(fn, e)(*args), False


def plain(t, tokens: bool = False):
    """A compiled step's input as its graph was warmed: a contiguous inference tensor that is not a
    view (else a copy; a graph specialises on each of these); with ``tokens``, its first (token)
    dimension marked dynamic — one graph for every token count ≥ 2 (and one for a single token).
    Anything but a tensor passes through."""
    if not isinstance(t, torch.Tensor):
        return t
    if t._is_view() or not t.is_contiguous() or not t.is_inference():
        t = t.to(memory_format=torch.contiguous_format, copy=True)
    if tokens and t.ndim and t.shape[0] >= 2:
        torch._dynamo.maybe_mark_dynamic(t, 0)
    return t


def dynamic_tokens(t):
    """A compiled step's input that it writes in place (a step's record column): never copied, its
    first (token) dimension marked dynamic as :func:`plain` does."""
    if isinstance(t, torch.Tensor) and t.ndim and t.shape[0] >= 2:
        torch._dynamo.maybe_mark_dynamic(t, 0)
    return t
