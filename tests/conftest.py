"""Shared fixtures: offline environment, tiny model directories, in-process vLLM engines.

Engine tests run vLLM in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0: ~3 s and ~0.1 GB per engine)
with a 32 MiB KV cache; CLI tests run the real ``lm_eval`` console script in a subprocess.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # would override kv_cache_memory_bytes
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

KV_BYTES = 32 << 20
BIN = Path(sys.executable).parent


def _build(tmp_path_factory, arch: str, **kw) -> Path:
    from lm_eval_telltale.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch, **kw)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A small random Qwen3 (8 layers, hidden 128, head_dim 64) with a byte-level tokenizer and a
    chat template with <think>...</think>."""
    return _build(tmp_path_factory, "qwen3")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    return {"qwen3": tiny_model_dir, "qwen2": _build(tmp_path_factory, "qwen2"),
            "llama": _build(tmp_path_factory, "llama")}


@pytest.fixture(scope="session")
def local_task_dir(tmp_path_factory) -> Path:
    from lm_eval_telltale.localtask import write_local_task

    return write_local_task(tmp_path_factory.mktemp("task"))


class Engines:
    """Builds in-process engines and shuts every one down at the end of the session."""

    def __init__(self):
        self.live = []

    def make(self, model_dir, method: str | None = "norms", tt_args: dict | None = None, **llm_kw):
        from vllm import LLM

        kw = dict(model=str(model_dir), kv_cache_memory_bytes=KV_BYTES, max_model_len=1024, seed=0, dtype="float32",
                  enforce_eager=True)
        if method is not None:
            from lm_eval_telltale.config import resolve
            from lm_eval_telltale.vllm import engine_kwargs, inspect_model

            arch, n_layers = inspect_model(str(model_dir))
            cfg = resolve(method, dict(tt_args or {}), n_layers, seed=kw["seed"])
            kw.update(engine_kwargs(cfg, arch))
        kw.update(llm_kw)
        llm = LLM(**kw)
        self.live.append(llm)
        return llm

    def close(self, llm) -> None:
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:
            pass
        if llm in self.live:
            self.live.remove(llm)


@pytest.fixture(scope="session")
def engines():
    e = Engines()
    yield e
    for llm in list(e.live):
        e.close(llm)


def worker(llm):
    """The in-process worker (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    return llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker


def rpc(llm, name, *args):
    return llm.collective_rpc(name, args=args)[0]
