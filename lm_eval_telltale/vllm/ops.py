"""The opaque custom ops through which every patched layer reaches the core.

``telltale::post_layer(h, r, j)`` (methods that change the residual stream) is a registered
``torch.library`` custom op with declared mutations of ``h`` and ``r`` — the mechanism vLLM uses
for attention. torch.compile cannot see inside it, so the traced graph calls it on every forward
instead of tracing its Python away (a plain Python hook that reads process state would be baked in
as a no-op), and it cannot be dead-code-eliminated (it mutates its inputs). On GPU it is one of
``compilation_config.splitting_ops`` (:data:`OP_NAMES`), so piecewise CUDA graphs capture the
pieces between patched layers and this op — with its data-dependent, per-request work — runs
eagerly between them. In eager mode it is an ordinary call to the same Python, so both modes
compute the same thing.

``telltale::observe_norm(n, j)`` (methods that only observe: norms, LRS) takes only the norm
‖h + r‖, which the hook computes inside the traced graph. It reads nothing else, so inductor
computes the residual stream as for stock vLLM (the norm joins a kernel it builds anyway).
Compiled stock carries that stream in float32 between layers; an op reading (h, r) would force
bfloat16 copies of them that later layers then read, and the numbers would part from stock's. It
has no outputs and no mutations and is marked as having a side effect, so the traced graph keeps
it. On GPU it is a splitting op too.

The ops act only while a real step runs: the runtime of that step is *active* (set by
``begin_step``, cleared by ``end_step``; one step runs at a time in a worker process). During
vLLM's dummy, profiling and CUDA-graph capture runs nothing is active and the op does nothing.
"""

from __future__ import annotations

import torch

OP_NAME = "telltale::post_layer"
#: the observe-only op (methods that never change (h, r): ``norms``, ``lrs``)
OBSERVE_OP_NAME = "telltale::observe_norm"
#: every telltale op (GPU: all of them are graph-splitting points)
OP_NAMES = (OP_NAME, OBSERVE_OP_NAME)

_ACTIVE = None  # the VllmRuntime whose step is running in this process


def activate(runtime) -> None:
    global _ACTIVE
    _ACTIVE = runtime


def deactivate() -> None:
    global _ACTIVE
    _ACTIVE = None


def active():
    return _ACTIVE


@torch.compiler.disable
def _run(body, *args) -> None:
    # called from inside compiled code: keep torch.compile from tracing what an op runs (the
    # method's tensor work, ALRR's eager re-run of the layer)
    body(*args)


@torch.library.custom_op(OP_NAME, mutates_args=("h", "r"))
def _post_layer(h: torch.Tensor, r: torch.Tensor, j: int) -> None:
    rt = _ACTIVE
    if rt is not None:
        _run(rt.post_layer, j, h, r)


@_post_layer.register_fake
def _post_layer_fake(h: torch.Tensor, r: torch.Tensor, j: int) -> None:
    return None


@torch.library.custom_op(OBSERVE_OP_NAME, mutates_args=())
def _observe_norm(n: torch.Tensor, j: int) -> None:
    rt = _ACTIVE
    if rt is not None:
        _run(rt.observe_layer, j, n)


@_observe_norm.register_fake
def _observe_norm_fake(n: torch.Tensor, j: int) -> None:
    return None


# no output and no mutation: without this mark the traced graph would drop the call as dead code
torch.fx.node.has_side_effect(torch.ops.telltale.observe_norm.default)

#: the ops as the hooks call them (OpOverloadPackets: one node each in a traced graph)
post_layer = torch.ops.telltale.post_layer
observe_norm = torch.ops.telltale.observe_norm
