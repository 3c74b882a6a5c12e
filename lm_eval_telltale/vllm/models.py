"""Telltale architectures: stock vLLM model classes plus one forward hook per patched layer.

Each class subclasses the stock ``*ForCausalLM`` (weights, names and loading unchanged) and, at
construction in the worker, reads its settings from ``hf_config.telltale`` (carried there by
``hf_overrides``) and registers a ``torch`` forward hook on ``model.layers[l]`` for every patched
layer l — stable hook sites named ``model.layers.<l>`` in the spirit of TransformerLens' hook
points. The top-level ``forward`` (plain Python in every mode: vLLM compiles the inner ``*Model``)
builds the step's token → request map once; each layer hook calls one opaque custom op
(:mod:`lm_eval_telltale.vllm.ops`). For a method that changes the residual stream it is
``telltale::post_layer``, which hands (hidden_states, residual) to the core and writes the method's
result back into them. For a method that only observes (norms, LRS) it is
``telltale::observe_norm``, which gets the norm ‖h + r‖ computed in the traced graph and nothing
else, so a compiled model computes its residual stream exactly as stock vLLM does.

Because the hook's only work is that op, it survives torch.compile (the traced graph calls the op
on every forward) and CUDA graphs (the op is a graph-splitting point: it runs eagerly between the
captured pieces); in eager mode the same op runs as a plain call. The worker checks after every
step that the model forward and every layer hook ran, and fails loudly otherwise.

Where the in-graph step runs (:mod:`lm_eval_telltale.vllm.graph`: every method but ALRR with its
skip decision, on one rank and stage), :meth:`TelltaleModelMixin.telltale_attach` replaces those
hooks by :func:`~lm_eval_telltale.vllm.graph.graph_hook`: the step is tensor work the traced graph
contains (no op, but the pair around ALRR's re-run), and the top-level ``forward`` runs no
telltale Python at all.
"""

from __future__ import annotations

from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

from ..config import TelltaleConfig
from ..core.engine import residual_norm
from ..core.methods import method_module
from . import ops
from .graph import graph_hook, plain_hooks
from .kvguard import check_separable_kv_write


def _post_layer_hook(module, args, output):
    """After a patched layer: the op reads and may rewrite (h, r) in place. Nothing else here, so
    that torch.compile traces exactly one opaque call."""
    h, r = output
    ops.post_layer(h, r, module._tt_index)
    return output


def _observe_hook(module, args, output):
    """After a patched layer, for a method that only observes: ‖h + r‖ is computed here, inside the
    traced graph (inductor fuses it with the kernels stock vLLM builds anyway), and only the norm
    reaches the op. (h, r) stay graph values the op never reads, so the compiled model computes the
    residual stream exactly as stock vLLM's does."""
    h, r = output
    ops.observe_norm(residual_norm(h, r)[1], module._tt_index)
    return output


def _plain_python_hook(module, args, output):
    """Debug only (``TELLTALE_DEBUG_PLAIN_HOOKS=1``): the hook as plain Python that reads process
    state — what torch.compile silently traces away. The per-step check must catch it."""
    rt = ops.active()
    if rt is None:
        return None
    h, r = output
    rt.post_layer(module._tt_index, h, r)
    return output


class TelltaleModelMixin:
    telltale_cfg: TelltaleConfig

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        raw = getattr(vllm_config.model_config.hf_config, "telltale", None)
        if not isinstance(raw, dict):
            raise ValueError(
                f"{type(self).__name__} needs its settings in hf_config.telltale; build the engine with "
                "lm_eval_telltale.vllm.engine_kwargs(...) or an lm-eval telltale model type")
        self.telltale_cfg = TelltaleConfig.from_dict(raw)
        _check_wiring(vllm_config)
        self._tt_runtime = None
        inner = self.model
        lo, hi = getattr(inner, "start_layer", 0), getattr(inner, "end_layer", len(inner.layers))
        # pipeline parallel: this stage hooks the patched layers it owns; the driver merges the
        # per-layer statistics of all stages into one record per answer
        owned = [l for l in self.telltale_cfg.layers if lo <= l < hi]
        self.telltale_stage_cfg = self.telltale_cfg.for_layers(owned)
        if plain_hooks():
            hook = _plain_python_hook
        elif method_module(self.telltale_cfg.method).METHOD.observes_only():
            hook = _observe_hook
        else:
            hook = _post_layer_hook
        self._tt_handles = []
        self.telltale_layers = []        # the patched layer modules of this stage, in patched order (j)
        for j, l in enumerate(owned):
            layer = inner.layers[l]
            if self.telltale_cfg.method == "alrr":
                check_separable_kv_write(layer, f"model.layers.{l}")
            layer._tt_index = j
            self.telltale_layers.append(layer)
            self._tt_handles.append(layer.register_forward_hook(hook))

    def telltale_attach(self, runtime) -> None:
        self._tt_runtime = runtime
        if runtime.graph is not None:  # the in-graph step: its hook instead of the op's
            for h in self._tt_handles:
                h.remove()
            self._tt_handles = []
            for layer in self.telltale_layers:
                object.__setattr__(layer, "_tt_graph", runtime.graph)  # not a submodule: no state_dict entry
                self._tt_handles.append(layer.register_forward_hook(graph_hook))

    def forward(self, input_ids, positions, *args, **kwargs):
        rt = self._tt_runtime
        # the in-graph step runs no Python here: its host part is the runtime's, outside the forward
        if rt is None or not rt.step_active or rt.graph is not None:
            return super().forward(input_ids, positions, *args, **kwargs)
        rt.begin_step(positions, input_ids)
        try:
            return super().forward(input_ids, positions, *args, **kwargs)
        finally:
            rt.end_step()


def _check_wiring(vllm_config) -> None:
    """Fail at construction (not silently at run time) if the engine was not built with the
    Telltale worker and row mirror: without them no hook would ever fire."""
    from . import ROW_MIRROR, WORKERS

    wc = vllm_config.parallel_config.worker_cls
    if wc not in WORKERS.values():
        raise ValueError(f"telltale: worker_cls is {wc!r}, not a Telltale worker ({', '.join(WORKERS.values())}); "
                         "build the engine with lm_eval_telltale.vllm.engine_kwargs(...)")
    lps = [lp if isinstance(lp, str) else f"{lp.__module__}:{lp.__qualname__}"
           for lp in (vllm_config.model_config.logits_processors or [])]
    if ROW_MIRROR not in lps:
        raise ValueError(f"telltale: logits_processors must include {ROW_MIRROR!r}; "
                         "build the engine with lm_eval_telltale.vllm.engine_kwargs(...)")


def _make(base):
    name = f"Telltale{base.__name__}"
    return type(name, (TelltaleModelMixin, base), {"__module__": __name__, "__qualname__": name})


TelltaleQwen2ForCausalLM = _make(Qwen2ForCausalLM)
TelltaleQwen3ForCausalLM = _make(Qwen3ForCausalLM)
TelltaleLlamaForCausalLM = _make(LlamaForCausalLM)


def __getattr__(name):  # Mistral / Phi3 imported only when asked for
    if name == "TelltaleMistralForCausalLM":
        from vllm.model_executor.models.mistral import MistralForCausalLM

        cls = _make(MistralForCausalLM)
    elif name == "TelltalePhi3ForCausalLM":
        from vllm.model_executor.models.phi3 import Phi3ForCausalLM

        cls = _make(Phi3ForCausalLM)
    else:
        raise AttributeError(name)
    globals()[name] = cls
    return cls
