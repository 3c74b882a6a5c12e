"""Run a layer without writing the KV cache.

vLLM writes K/V through ``unified_kv_cache_update``, which looks up
``forward_context.slot_mapping[layer_name]`` and skips the write when the entry is missing. Every
layer of a KV-cache group shares ONE slot-mapping tensor, so it must never be modified in place:
we remove this layer's dict entry for the duration of the call and put it back in ``finally``.
The re-run's attention still reads K/V from the cache — i.e. pass-0 keys/values for the current
tokens (cache-read semantics, documented in docs/methods.md §2).

That holds only for attention backends whose KV write is that separate op
(``forward_includes_kv_cache_update = False``: CPU, FlashAttention, FlashInfer, Triton, Flex).
A backend that writes K/V inside its own forward would let the re-run overwrite the cache
silently; :func:`check_separable_kv_write` refuses such a layer when the model is built.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def attention_modules(layer: torch.nn.Module) -> list[torch.nn.Module]:
    """vLLM ``Attention`` modules inside ``layer`` (the ones that own a KV cache)."""
    return [m for m in layer.modules() if isinstance(getattr(m, "layer_name", None), str) and hasattr(m, "kv_cache")]


def check_separable_kv_write(layer: torch.nn.Module, where: str) -> None:
    """Raise when an attention module of ``layer`` uses a backend that writes K/V inside its
    forward (ALRR's re-run could not keep the cache at its pass-0 keys/values there)."""
    mods = attention_modules(layer)
    if not mods:
        raise ValueError(f"telltale: no attention layer found inside {where} ({type(layer).__name__})")
    for m in mods:
        if getattr(m, "kv_sharing_target_layer_name", None) is not None:
            continue  # shares another layer's cache: it writes nothing itself
        backend = getattr(m, "attn_backend", None)
        if backend is None or not getattr(backend, "forward_includes_kv_cache_update", True):
            continue
        name = backend.get_name() if hasattr(backend, "get_name") else getattr(backend, "__name__", str(backend))
        raise ValueError(
            f"telltale: vllm-alrr re-runs {where} with its KV-cache write suppressed, which needs an attention "
            f"backend whose KV write is a separate op; {m.layer_name} uses {name}, which writes K/V inside its "
            "forward, so the re-run would overwrite the cache. Choose another backend, e.g. "
            "--model_args ...,attention_backend=FLASH_ATTN (or TRITON_ATTN, FLASHINFER)")


def attention_names(layer: torch.nn.Module) -> list[str]:
    """The ``layer_name`` of each attention module of ``layer`` (cached on the layer)."""
    names = getattr(layer, "_tt_attn_names", None)
    if names is None:
        names = [m.layer_name for m in attention_modules(layer)]
        if not names:
            raise RuntimeError(f"telltale: no attention layer found inside {type(layer).__name__}")
        layer._tt_attn_names = names
    return names


#: the slot-mapping entries taken out by :func:`suspend`, by layer name, until :func:`resume`
_SUSPENDED: dict[str, torch.Tensor] = {}


def suspend(names) -> None:
    """Take the named layers' entries out of the forward context's slot mapping: their KV write
    is skipped until :func:`resume`."""
    from vllm.forward_context import get_forward_context

    sm = get_forward_context().slot_mapping
    if not isinstance(sm, dict):
        raise RuntimeError("telltale: forward_context.slot_mapping is not a per-layer dict; cannot suppress KV writes")
    for n in names:
        if n in sm:
            _SUSPENDED[n] = sm.pop(n)


def resume(names) -> None:
    """Put back what :func:`suspend` took out (the dict is the same step's: vLLM builds one per step)."""
    from vllm.forward_context import get_forward_context

    sm = get_forward_context().slot_mapping
    for n in names:
        if n in _SUSPENDED:
            sm[n] = _SUSPENDED.pop(n)


@contextmanager
def no_kv_write(layer: torch.nn.Module):
    """``layer`` runs without writing the KV cache inside this block (the ops' path: eager Python)."""
    names = attention_names(layer)
    suspend(names)
    try:
        yield
    finally:
        resume(names)


def rerun_in_graph(layer: torch.nn.Module, positions: torch.Tensor, h: torch.Tensor, r: torch.Tensor):
    """The same layer again on (h, r) with its KV write suppressed, as traced code (the in-graph
    step's ALRR re-run): the layer's own forward, compiled with the model, between two ops
    (:data:`~lm_eval_telltale.vllm.ops.KV_OFF_NAME`, :data:`~lm_eval_telltale.vllm.ops.KV_ON_NAME`)
    that take the layer's slot-mapping entries out and put them back. Each op returns copies of
    its inputs, so the data flow orders them around the re-run's KV-cache update (after the first,
    before the second) and the re-run works on copies of (h, r) (in-place kernels cannot reach the
    pass-0 tensors). Under a CUDA graph the ops run when it is captured (FULL: the re-run's write
    is then not in the graph) or between its pieces (PIECEWISE: they are splitting ops, like vLLM's
    KV-cache update)."""
    from . import ops

    names = ",".join(attention_names(layer))
    h, r = ops.kv_write_off(h, r, names)
    h2, r2 = layer.forward(positions, h, r)
    return ops.kv_write_on(h2, r2, names)
