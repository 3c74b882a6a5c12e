"""Run a layer without writing the KV cache.

vLLM writes K/V through ``unified_kv_cache_update``, which looks up
``forward_context.slot_mapping[layer_name]`` and skips the write when the entry is missing. Every
layer of a KV-cache group shares ONE slot-mapping tensor, so it must never be modified in place:
we remove this layer's dict entry for the duration of the call and put it back in ``finally``.
The re-run's attention still reads K/V from the cache — i.e. pass-0 keys/values for the current
tokens (cache-read semantics, documented in docs/methods.md §2).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def attention_layer_names(layer: torch.nn.Module) -> list[str]:
    names = []
    for m in layer.modules():
        ln = getattr(m, "layer_name", None)
        if isinstance(ln, str) and hasattr(m, "kv_cache"):
            names.append(ln)
    return names


@contextmanager
def no_kv_write(layer: torch.nn.Module):
    from vllm.forward_context import get_forward_context

    names = getattr(layer, "_tt_attn_names", None)
    if names is None:
        names = attention_layer_names(layer)
        if not names:
            raise RuntimeError(f"telltale: no attention layer found inside {type(layer).__name__}")
        layer._tt_attn_names = names
    fc = get_forward_context()
    sm = fc.slot_mapping
    if not isinstance(sm, dict):
        raise RuntimeError("telltale: forward_context.slot_mapping is not a per-layer dict; cannot suppress KV writes")
    saved = {n: sm.pop(n) for n in names if n in sm}
    try:
        yield
    finally:
        sm.update(saved)
