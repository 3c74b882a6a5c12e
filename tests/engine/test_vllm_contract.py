"""The vLLM internals the plugin relies on (docs/architecture.md, "The vLLM contract"), checked in
the installed vLLM without building an engine: a future vLLM that renames or reshapes one of them
fails here instead of producing wrong numbers. Checked to hold in vLLM 0.32.0 and 0.33.0."""

from __future__ import annotations

import dataclasses
import inspect

import pytest


def _params(fn) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "self"]


def _src(obj) -> str:
    return inspect.getsource(obj)


def test_worker_and_runner():
    from vllm.v1.worker.cpu_worker import CPUWorker
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    for cls in (Worker, CPUWorker):
        assert callable(cls.load_model) and callable(cls.execute_model)
        assert _params(cls.execute_model)[:1] == ["scheduler_output"]
    assert callable(GPUModelRunner.get_model)
    init = _src(GPUModelRunner.__init__)
    # the runtime reads the step's query_start_loc and row count from the runner
    assert "self.query_start_loc = self._make_buffer(" in init and "self.input_batch" in init
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    assert issubclass(CPUModelRunner, GPUModelRunner)  # the V1 runner on CPU too


def test_logits_processor_interface_and_batch_update():
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

    assert _params(LogitsProcessor.__init__) == ["vllm_config", "device", "is_pin_memory"]
    for m in ("apply", "update_state", "is_argmax_invariant"):
        assert callable(getattr(LogitsProcessor, m))
    fields = {f.name for f in dataclasses.fields(BatchUpdate)}
    assert {"batch_size", "removed", "added", "moved"} <= fields
    assert {m.name for m in MoveDirectionality} >= {"SWAP", "UNIDIRECTIONAL"}
    from vllm.v1.worker.gpu_input_batch import InputBatch

    # update_state runs inside the runner's state update, before the forward of the same step
    assert "update_state" in _src(InputBatch.refresh_metadata)


def test_scheduler_output_fields():
    from vllm.v1.core.sched.output import NewRequestData, SchedulerOutput

    fields = {f.name for f in dataclasses.fields(SchedulerOutput)}
    assert {"scheduled_new_reqs", "finished_req_ids", "total_num_scheduled_tokens", "num_scheduled_tokens"} <= fields
    assert {"req_id", "sampling_params", "prompt_token_ids"} <= {f.name for f in dataclasses.fields(NewRequestData)}


def test_forward_context_and_the_kv_write_path():
    from vllm.forward_context import ForwardContext, get_forward_context  # noqa: F401
    from vllm.model_executor.layers.attention import attention as A

    assert {"attn_metadata", "slot_mapping"} <= {f.name for f in dataclasses.fields(ForwardContext)}
    # the KV write is a separate op that looks the layer's slot mapping up (a missing entry: no write)
    assert "slot_mapping" in _src(A.get_attention_context)
    assert "do_kv_cache_update" in _src(A.unified_kv_cache_update)
    init = _src(A.Attention.__init__)
    for attr in ("self.layer_name", "self.attn_backend", "self.kv_sharing_target_layer_name", "self.kv_cache"):
        assert attr in init, attr
    from vllm.v1.attention.backend import AttentionBackend
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    assert AttentionBackend.forward_includes_kv_cache_update is True  # the default the guard checks
    assert CPUAttentionBackend.forward_includes_kv_cache_update is False


def test_sampling_params_engine_args_and_configs():
    from vllm import SamplingParams
    from vllm.engine.arg_utils import EngineArgs
    from vllm.sampling_params import RequestOutputKind

    sp = SamplingParams(extra_args={"telltale_tag": "x"})
    assert sp.clone().extra_args == {"telltale_tag": "x"}
    assert RequestOutputKind.FINAL_ONLY
    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    assert {"hf_overrides", "worker_cls", "logits_processors", "enforce_eager", "enable_prefix_caching",
            "async_scheduling", "attention_backend", "compilation_config", "kv_cache_memory_bytes"} <= fields
    from vllm.config import VllmConfig

    assert isinstance(inspect.getattr_static(VllmConfig, "use_v2_model_runner"), property)
    from vllm import envs

    assert "VLLM_USE_V2_MODEL_RUNNER" in envs.environment_variables
    assert "VLLM_BATCH_INVARIANT" in envs.environment_variables


def test_engine_and_llm_entry_points():
    from vllm import LLM
    from vllm.v1.engine.llm_engine import LLMEngine

    assert _params(LLM.collective_rpc)[:4] == ["method", "timeout", "args", "kwargs"]
    assert _params(LLMEngine.add_request)[:3] == ["request_id", "prompt", "params"]
    assert "lora_request" in _params(LLMEngine.add_request)
    for m in ("step", "has_unfinished_requests", "abort_request"):
        assert callable(getattr(LLMEngine, m))


@pytest.mark.parametrize("module,cls", [("qwen2", "Qwen2DecoderLayer"), ("qwen3", "Qwen3DecoderLayer"),
                                        ("llama", "LlamaDecoderLayer"), ("mistral", "MistralDecoderLayer")])
def test_decoder_layer_contract(module, cls):
    import importlib

    layer = getattr(importlib.import_module(f"vllm.model_executor.models.{module}"), cls)
    assert _params(layer.forward)[:3] == ["positions", "hidden_states", "residual"]


def test_model_registry_and_plugins():
    from vllm import ModelRegistry
    from vllm.plugins import DEFAULT_PLUGINS_GROUP

    assert DEFAULT_PLUGINS_GROUP == "vllm.general_plugins"
    assert callable(ModelRegistry.register_model) and "Qwen3ForCausalLM" in ModelRegistry.get_supported_archs()
    from vllm.model_executor.models.utils import PPMissingLayer, make_layers  # noqa: F401
