"""Shared fixtures: offline environment, tiny model directories, in-process vLLM engines.

Engine tests run vLLM in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0: ~3 s and ~0.1 GB per engine)
with a 32 MiB KV cache; CLI tests run the real ``lm_eval`` console script in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # would override kv_cache_memory_bytes
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
# in-process engines freeze vLLM's environment at the first start: the V1 runner for all of them
os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
# compiled engines: torch's own inductor cache, shared by every configuration (vLLM's cache is one per
# configuration: each telltale setting would compile its identical graph again, ~45 s on 2 cores)
os.environ.setdefault("VLLM_DISABLE_COMPILE_CACHE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# lm-eval indexes the telltale tasks and --include_path only, not its ~14,750 built-in tasks (~15 s
# at every lm_eval start and bare TaskManager()); tests/tasks/test_tasks_load.py's installed copy
# runs without it
os.environ.setdefault("TELLTALE_TASKS_ONLY", "1")

from lm_eval_telltale.tasksupport.scoring import BBH_KINDS  # noqa: E402  (after the offline switches)
from lm_eval_telltale.tasksupport.taskdata import GSM_PLUS_TYPES, MMLU_PRO_SUBJECTS  # noqa: E402

KV_BYTES = 32 << 20
BIN = Path(sys.executable).parent


def _build(tmp_path_factory, arch: str, **kw) -> Path:
    from lm_eval_telltale.tools.tiny import build_tiny_model

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
    from lm_eval_telltale.tasksupport.localtask import write_local_task

    return write_local_task(tmp_path_factory.mktemp("task"))


class Engines:
    """Builds in-process engines and shuts every one down at the end of the session."""

    def __init__(self):
        self.live = []

    def make(self, model_dir, method: str | None = "norms", tt_args: dict | None = None, *, compiled: bool = False,
             **llm_kw):
        """An in-process engine: eager by default (fast to build); ``compiled=True`` is vLLM's default
        on this CPU (torch.compile with inductor)."""
        from vllm import LLM

        kw = dict(model=str(model_dir), kv_cache_memory_bytes=KV_BYTES, max_model_len=1024, seed=0, dtype="float32",
                  enforce_eager=not compiled)
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


def no_generation(monkeypatch):
    """Any attempt to generate (``tools.profile.collect``, which profile, calibrate and signals
    call) fails the test: a tool's argument checks must come before its engine."""
    import lm_eval_telltale.tools.profile as prof

    def boom(*a, **k):
        raise AssertionError("generation started before the arguments were checked")

    monkeypatch.setattr(prof, "collect", boom)


# -- crafted steps for the core (tests/core) ----------------------------------------------------

def end_step(core):
    """``core.end()``, then that step's rows on the host (``core.drain()``, the collection path)."""
    import torch

    core.end()
    parts = core.drain()
    if not parts:
        rows = core._rows
        L = core.L
        empty = {"serial": torch.zeros(0, dtype=torch.int64), "position": torch.zeros(0, dtype=torch.int64),
                 "event": torch.zeros(0, L, dtype=torch.int16)}
        return {**empty, **{n: torch.zeros(0, L) for n in rows.names}}
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def begin_step(core, infos, positions_per_req):
    """Start one forward step of ``core``: request ``infos[i]`` feeds tokens at positions
    ``positions_per_req[i]`` (flattened in that order, as the adapters lay out a batch)."""
    import torch

    from lm_eval_telltale.core.step import build_step

    qsl, slots, pos = [0], [], []
    for info, ps in zip(infos, positions_per_req):
        qsl.append(qsl[-1] + len(ps))
        slots.append(info.slot)
        pos += ps
    core.begin(build_step(core.table, torch.tensor(qsl), torch.tensor(slots), torch.tensor(pos)))


# -- the lm_eval console script (e2e tests) ------------------------------------------------------

LM_EVAL = str(BIN / "lm_eval")


def run(args, env_extra=None, timeout=600):
    """A subprocess as users run it: multiprocess vLLM (the in-process switch of this session is dropped,
    unless ``env_extra`` sets it)."""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env.update(env_extra or {})
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)


def samples(d: Path, task: str) -> list[dict]:
    """lm-eval's logged samples of ``task`` under the run directory ``d``."""
    f = next(d.rglob(f"samples_{task}_*.jsonl"))
    return [json.loads(l) for l in f.read_text().splitlines() if l.strip()]


# -- the packaged task catalogue (tasks/ and e2e tests) -------------------------------------------

#: what a user asks for: every task family, groups included
TOP_LEVEL = [
    "telltale_gsm8k",
    "telltale_gsm_plus",
    "telltale_gsm_plus_mini",
    "telltale_aime24",
    "telltale_aime24_k8",
    "telltale_bbh",
    "telltale_mmlu_pro",
]

#: group -> its subtasks
GROUPS: dict[str, list[str]] = {
    "telltale_gsm_plus": [f"telltale_gsm_plus_{s}" for s in GSM_PLUS_TYPES],
    "telltale_gsm_plus_mini": [f"telltale_gsm_plus_mini_{s}" for s in GSM_PLUS_TYPES],
    "telltale_bbh": [f"telltale_bbh_{s}" for s in BBH_KINDS],
    "telltale_mmlu_pro": [f"telltale_mmlu_pro_{s}" for s in MMLU_PRO_SUBJECTS],
}

LEAVES: list[str] = [n for n in TOP_LEVEL if n not in GROUPS] + [t for ts in GROUPS.values() for t in ts]

#: default generation budget (max_gen_toks) per task
BUDGET = {n: (32768 if n.startswith("telltale_aime24") else 16384) for n in LEAVES}
