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

``telltale::kv_write_off(h, r, names)`` / ``telltale::kv_write_on(h, r, names)`` bracket ALRR's
re-run in the in-graph step (:func:`~lm_eval_telltale.vllm.kvguard.rerun_in_graph`): the first takes
the named attention layers' entries out of the step's slot mapping (their KV write is skipped), the
second puts them back; each returns copies of (h, r), which orders it in the traced graph. They act
in every forward, with or without a step.

The first two ops act only while a real step runs: the runtime of that step is *active* (set by
``begin_step``, cleared by ``end_step``; one step runs at a time in a worker process). During
vLLM's dummy, profiling and CUDA-graph capture runs nothing is active and the op does nothing.
"""

from __future__ import annotations

import torch

OP_NAME = "telltale::post_layer"
#: the observe-only op (methods that never change (h, r): ``norms``, ``lrs``)
OBSERVE_OP_NAME = "telltale::observe_norm"
#: the in-graph ALRR re-run's pair (:func:`~lm_eval_telltale.vllm.kvguard.rerun_in_graph`): the
#: named layers' KV write off, and back on
KV_OFF_NAME = "telltale::kv_write_off"
KV_ON_NAME = "telltale::kv_write_on"
#: every telltale op (GPU: all of them are graph-splitting points)
OP_NAMES = (OP_NAME, OBSERVE_OP_NAME, KV_OFF_NAME, KV_ON_NAME)

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

@torch.library.custom_op(KV_OFF_NAME, mutates_args=())
def _kv_write_off(h: torch.Tensor, r: torch.Tensor, names: str) -> tuple[torch.Tensor, torch.Tensor]:
    from .kvguard import suspend

    suspend(names.split(","))
    return h.clone(), r.clone()


@torch.library.custom_op(KV_ON_NAME, mutates_args=())
def _kv_write_on(h: torch.Tensor, r: torch.Tensor, names: str) -> tuple[torch.Tensor, torch.Tensor]:
    from .kvguard import resume

    resume(names.split(","))
    return h.clone(), r.clone()


@_kv_write_off.register_fake
def _kv_write_off_fake(h, r, names):
    return torch.empty_like(h), torch.empty_like(r)


@_kv_write_on.register_fake
def _kv_write_on_fake(h, r, names):
    return torch.empty_like(h), torch.empty_like(r)


#: the ops as the hooks call them (OpOverloadPackets: one node each in a traced graph)
post_layer = torch.ops.telltale.post_layer
observe_norm = torch.ops.telltale.observe_norm
kv_write_off = torch.ops.telltale.kv_write_off
kv_write_on = torch.ops.telltale.kv_write_on
