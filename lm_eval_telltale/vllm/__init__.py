"""vLLM adapter. Import-light: vLLM is imported only by the submodules that need it.

``engine_kwargs(cfg, architecture)`` returns everything an ``LLM(...)`` needs to run a Telltale
method on stock vLLM; :func:`assemble_engine_args` merges it with a user's own engine settings (the
one place that does: the lm-eval model types, ``telltale profile``/``calibrate`` and ``telltale
bench`` call it). Plain vLLM scripts can use either::

    from vllm import LLM
    from lm_eval_telltale.config import resolve
    from lm_eval_telltale.vllm import engine_kwargs, inspect_model

    arch, n_layers = inspect_model("Qwen/Qwen3-1.7B")
    cfg = resolve("norms", {"layers": "auto"}, n_layers)
    llm = LLM(model="Qwen/Qwen3-1.7B", **engine_kwargs(cfg, arch))
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

from ..config import ConfigError, TelltaleConfig
from ..spec import parse_bool
from .plugin import ARCHITECTURES

ROW_MIRROR = "lm_eval_telltale.vllm.rows:TelltaleRowMirror"
WORKERS = {
    "cpu": "lm_eval_telltale.vllm.worker_cpu.TelltaleCPUWorker",
    "gpu": "lm_eval_telltale.vllm.worker_gpu.TelltaleGPUWorker",
}


class UnsupportedModelError(ValueError):
    pass


def inspect_model(pretrained: str, revision: str | None = None, trust_remote_code: bool = False) -> tuple[str, int]:
    """(architecture, num_hidden_layers) from the model's config, without building an engine."""
    p = Path(pretrained).expanduser()
    # a local path rather than a Hugging Face id ("name" or "namespace/name")
    looks_like_path = (pretrained.startswith(("/", "./", "../", "~", ".\\", "..\\")) or pretrained in (".", "..")
                       or pretrained.count("/") > 1 or (os.sep != "/" and os.sep in pretrained))
    if p.exists() or looks_like_path:
        if not p.is_dir():
            what = "is a file, not a model directory" if p.exists() else "no such directory"
            raise UnsupportedModelError(
                f"telltale: pretrained={pretrained!r}: {what} ({p.absolute()}); give the directory that holds the "
                "model's config.json, or a Hugging Face id such as Qwen/Qwen3-1.7B")
        f = p / "config.json"
        if not f.is_file():
            raise UnsupportedModelError(f"telltale: pretrained={pretrained!r}: {p.absolute()} has no config.json "
                                        "(is it the model directory?)")
        try:
            cfg = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise UnsupportedModelError(f"telltale: cannot parse {f.absolute()}: {e.msg} at line {e.lineno} column "
                                        f"{e.colno}; fix or re-download the model's config.json") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UnsupportedModelError(f"telltale: cannot read {f.absolute()}: {e}") from None
        if not isinstance(cfg, dict):
            raise UnsupportedModelError(f"telltale: {f.absolute()} is not a JSON object")
    else:
        from transformers import AutoConfig

        try:
            cfg = AutoConfig.from_pretrained(pretrained, revision=revision, trust_remote_code=trust_remote_code).to_dict()
        except Exception as e:  # noqa: BLE001
            offline = any(parse_bool(os.environ.get(k, "")) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
            tried = ("the local Hugging Face cache (offline: HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE)" if offline
                     else "the Hugging Face Hub and its local cache")
            raise UnsupportedModelError(
                f"telltale: cannot read the config of pretrained={pretrained!r}: it is not a local directory, and "
                f"{tried} gave: {e}") from e
    text = cfg.get("text_config") or {}
    archs = cfg.get("architectures") or text.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise UnsupportedModelError(
            f"telltale: architecture {archs or '(none)'} of {pretrained!r} is not supported; "
            f"supported: {', '.join(sorted(ARCHITECTURES))}")
    n = cfg.get("num_hidden_layers") or text.get("num_hidden_layers")
    if not isinstance(n, int):
        raise UnsupportedModelError(f"telltale: {pretrained!r} has no num_hidden_layers in its config")
    return arch, n


def worker_cls() -> str:
    from vllm.platforms import current_platform

    return WORKERS["cpu" if current_platform.is_cpu() else "gpu"]


def _set_vllm_env(name: str, value: str, why: str) -> None:
    """Set a vLLM environment switch for the engines this process builds. vLLM freezes its
    environment once an engine has started in this process (in-process engines): then a value
    that differs can no longer take effect, and this fails loudly instead of silently."""
    cur = os.environ.get(name)
    if cur is not None and cur != value:
        raise UnsupportedModelError(f"telltale: {name}={cur} is set, but {why} (needs {name}={value})")
    os.environ[name] = value
    from vllm import envs

    if getattr(envs, "_is_envs_cache_enabled", lambda: False)():
        frozen = getattr(envs, name)
        as_str = str(int(frozen)) if isinstance(frozen, bool) else ("" if frozen is None else str(frozen))
        if as_str != value:
            raise UnsupportedModelError(
                f"telltale: an engine already started in this process froze vLLM's environment with {name}={frozen}; "
                f"{why}. Start the telltale engine in a fresh process (or set {name}={value} before the first one)")


#: vLLM 0.32's default ``max_num_seqs`` per rank on the CPU engine (offline ``LLM``)
CPU_DEFAULT_MAX_NUM_SEQS = 256


def whole_prompt_budget(engine: dict[str, Any]) -> int:
    """``max_num_batched_tokens`` for a CPU engine without chunked prefill (``vllm-lrs`` and its bench
    comparator: vLLM 0.32's CPU runner cannot resume a seeded request whose prompt was split): a
    whole prompt (``max_model_len``) and at least one token per sequence of a step (vLLM refuses
    a budget below ``max_num_seqs``)."""
    mml = int(engine.get("max_model_len") or engine.get("max_length"))
    world = int(engine.get("tensor_parallel_size") or 1) * int(engine.get("pipeline_parallel_size") or 1)
    return max(mml, int(engine.get("max_num_seqs") or CPU_DEFAULT_MAX_NUM_SEQS * world))


def modifies_kv(cfg: TelltaleConfig) -> bool:
    """Whether the method can change the hidden states of generated tokens (and so their K/V)."""
    from ..core.methods import method_module

    return bool(method_module(cfg.method).METHOD.modifies)


def compilation_config(user: dict | None = None, full_graphs: bool = False) -> dict | None:
    """vLLM's compilation settings for the telltale hooks. CPU (inductor, no CUDA graphs): vLLM's
    defaults as they are — the hook ops are opaque to torch.compile. GPU: piecewise CUDA graphs with
    the telltale ops (``telltale::post_layer``, ``telltale::observe_norm``) among the splitting ops
    (vLLM's own defaults kept), so they run eagerly between the captured pieces; FULL graphs would
    replay without running any Python, and are refused unless ``full_graphs`` (the in-graph step,
    ``vllm/graph.py``: its forward runs no Python and calls no telltale op)."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return user
    from vllm.config import CompilationConfig

    from .ops import OP_NAMES

    cc = dict(user or {})
    split = list(cc.get("splitting_ops") or [*CompilationConfig._attention_ops, "vllm::unified_kv_cache_update",
                                              "vllm::unified_mla_kv_cache_update"])
    split += [op for op in OP_NAMES if op not in split]
    cc["splitting_ops"] = split
    mode = str(cc.get("cudagraph_mode") or "PIECEWISE").upper().replace("CUDAGRAPHMODE.", "")
    if mode.startswith("FULL") and not full_graphs:
        raise UnsupportedModelError(
            f"telltale: compilation_config cudagraph_mode={mode}: FULL CUDA graphs replay without running the "
            "telltale hooks; use PIECEWISE (the default of the telltale model types) or NONE")
    cc["cudagraph_mode"] = mode
    return cc


def engine_kwargs(cfg: TelltaleConfig, architecture: str, hf_overrides: dict[str, Any] | None = None, *,
                  compilation: dict | None = None, salted_requests: bool = False,
                  parallel: tuple[int, int] = (1, 1)) -> dict[str, Any]:
    """``LLM(**kwargs)`` additions for a Telltale method.

    - ``hf_overrides``: the Telltale architecture and the resolved config (reaches every worker,
      lm-eval's data-parallel replicas included);
    - ``worker_cls`` and ``logits_processors``: lifecycle and row-order wiring;
    - compilation: vLLM's default (compiled; ``enforce_eager=True`` still works and gives the same
      numbers on the CPU engine); on GPU ``compilation_config`` with piecewise CUDA graphs split at
      the telltale op (:func:`compilation_config`; pass yours as ``compilation``);
    - prefix caching: on for the observing methods (norms, LRS: nothing they do changes a K/V);
      for the methods that change hidden states only when ``salted_requests`` — the caller gives
      every request its own ``cache_salt`` (the lm-eval model types do), so no request reuses
      blocks computed under another request's intervention, while a preempted request still
      resumes from its own — and off otherwise;
    - ``async_scheduling=False``: with it (vLLM's GPU default) the engine plans step N+1 before it
      knows that step N sampled a stop token, so a stopped request takes one more forward. Its
      rows are dropped at collection, but the engine-wide streams (``tau_mode=global``, online
      matched suppression) and LRS's confidence (from the sampler's logits) would have seen them;
      a synchronous step keeps every statistic exact.
      Pass ``async_scheduling=True`` yourself to trade that for speed. Where the in-graph step runs
      (``vllm/graph.py``; ``parallel``: the tensor and pipeline parallel sizes) and its statistics
      stay exact with it (:func:`~lm_eval_telltale.vllm.graph.async_exact`), vLLM's default is
      kept, and FULL CUDA graphs are allowed.

    Environment: the V1 model runner (``VLLM_USE_V2_MODEL_RUNNER=0``: the hooks follow its
    persistent batch) and, with ``cfg.batch_invariant``, vLLM's batch-invariant kernels
    (``VLLM_BATCH_INVARIANT=1``).
    """
    if architecture not in ARCHITECTURES:
        raise UnsupportedModelError(f"telltale: unsupported architecture {architecture!r}; supported: "
                                    f"{', '.join(sorted(ARCHITECTURES))}")
    ov = dict(hf_overrides or {})
    ov["architectures"] = [ARCHITECTURES[architecture]]
    ov["telltale"] = cfg.to_dict()
    _set_vllm_env("VLLM_USE_V2_MODEL_RUNNER", "0",
                  "the telltale hooks follow the V1 model runner's persistent batch (Model Runner V2 is not supported)")
    if cfg.batch_invariant:
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            raise UnsupportedModelError(
                "telltale: batch_invariant=true: vLLM's batch-invariant kernels need Triton and are not available on "
                "the CPU engine (where a request's float32 results are already independent of the batch)")
        _set_vllm_env("VLLM_BATCH_INVARIANT", "1", "batch_invariant=true asks for vLLM's batch-invariant kernels")
    from .graph import async_exact, in_graph

    graph = in_graph(cfg, *parallel)
    kw: dict[str, Any] = {
        "hf_overrides": ov,
        "worker_cls": worker_cls(),
        "logits_processors": [ROW_MIRROR],
    }
    if not (graph and async_exact(cfg)):
        kw["async_scheduling"] = False
    cc = compilation_config(compilation, full_graphs=graph)
    if cc is not None:
        kw["compilation_config"] = cc
    if modifies_kv(cfg) and not salted_requests:
        kw["enable_prefix_caching"] = False
    return kw


#: the engine settings of :func:`engine_kwargs` that a user may set otherwise (each is safe either
#: way, with the trade-off its docstring names); every other one is the method's and is always set
USER_MAY_SET = ("async_scheduling", "enable_prefix_caching")


def json_arg(key: str, value: Any) -> Any:
    """An engine argument that vLLM takes as a dict, given as JSON text (a command line's form)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise ConfigError(key, f"not JSON ({e.msg} at column {e.colno}): {value!r}") from None


def assemble_engine_args(cfg: TelltaleConfig, architecture: str, user: dict[str, Any], *,
                         salted_requests: bool, explicit: Iterable[str] | None = None) -> dict[str, Any]:
    """The ``LLM(...)`` arguments of a telltale engine: the caller's and user's settings ``user``
    with :func:`engine_kwargs` added — the one place that assembles them (the lm-eval model types,
    ``telltale profile``/``calibrate`` and ``telltale bench`` call it).

    ``hf_overrides`` and ``compilation_config`` (dicts, or JSON text) are merged into the method's;
    a user's explicit :data:`USER_MAY_SET` settings win over the method's defaults (``explicit``:
    the keys the user set; default, every key of ``user`` with a value). A setting that cannot work
    raises here, before any engine starts (FULL CUDA graphs: :func:`compilation_config`)."""
    kw = dict(user)
    overrides = json_arg("hf_overrides", kw.pop("hf_overrides", None))
    cc = json_arg("compilation_config", kw.pop("compilation_config", None))
    if isinstance(cc, int):
        cc = {"mode": cc}
    mine = set(explicit) if explicit is not None else {k for k, v in user.items() if v is not None}
    parallel = (int(kw.get("tensor_parallel_size") or 1), int(kw.get("pipeline_parallel_size") or 1))
    for k, v in engine_kwargs(cfg, architecture, overrides, compilation=cc, salted_requests=salted_requests,
                              parallel=parallel).items():
        if k in USER_MAY_SET and k in mine:
            continue
        kw[k] = v
    return kw


@lru_cache(maxsize=1)
def engine_arg_names() -> frozenset[str]:
    """Every keyword vLLM's ``LLM(...)`` takes: the fields of ``EngineArgs`` (its ``**kwargs``) and
    ``LLM.__init__``'s own named parameters. Imports vLLM (seconds)."""
    import dataclasses
    import inspect

    from vllm import LLM
    from vllm.engine.arg_utils import EngineArgs

    named = {n for n, p in inspect.signature(LLM.__init__).parameters.items()
             if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return frozenset(named | {f.name for f in dataclasses.fields(EngineArgs)})


def unknown_engine_keys(keys: Iterable[str], also: Iterable[str] = ()) -> list[str]:
    """The keys (in the order given) that are neither an ``LLM(...)`` argument nor in ``also`` (the
    caller's own extra keys, e.g. lm-eval's ``VLLM`` arguments). No keys: vLLM is not imported."""
    keys = list(keys)
    if not keys:
        return []
    known = engine_arg_names() | set(also)
    return [k for k in keys if k not in known]
