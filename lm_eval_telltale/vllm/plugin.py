"""``vllm.general_plugins`` entry point: runs in every vLLM process (driver, engine core, workers,
the registry's inspection subprocess). Registers the Telltale architectures as lazy
``module:Class`` strings — nothing heavy is imported here."""

from __future__ import annotations

#: stock architecture -> Telltale architecture (all share the decoder-layer contract
#: forward(positions, hidden_states, residual) -> (hidden_states, residual))
ARCHITECTURES: dict[str, str] = {
    "Qwen2ForCausalLM": "TelltaleQwen2ForCausalLM",
    "Qwen3ForCausalLM": "TelltaleQwen3ForCausalLM",
    "LlamaForCausalLM": "TelltaleLlamaForCausalLM",
    "MistralForCausalLM": "TelltaleMistralForCausalLM",
    "Phi3ForCausalLM": "TelltalePhi3ForCausalLM",
}

MODULE = "lm_eval_telltale.vllm.models"


def register() -> None:
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for ours in ARCHITECTURES.values():
        if ours not in supported:
            ModelRegistry.register_model(ours, f"{MODULE}:{ours}")
