"""vLLM adapter. Import-light: vLLM is imported only by the submodules that need it.

``engine_kwargs(cfg, architecture)`` returns everything an ``LLM(...)`` needs to run a Telltale
method on stock vLLM; the lm-eval model types call it, and so can plain vLLM scripts::

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
from pathlib import Path
from typing import Any

from ..config import TelltaleConfig
from .plugin import ARCHITECTURES

ROW_MIRROR = "lm_eval_telltale.vllm.rows:TelltaleRowMirror"
WORKERS = {
    "cpu": "lm_eval_telltale.vllm.worker.TelltaleCPUWorker",
    "gpu": "lm_eval_telltale.vllm.worker.TelltaleGPUWorker",
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
            offline = any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
                          for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
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


def engine_kwargs(cfg: TelltaleConfig, architecture: str, hf_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """``LLM(**kwargs)`` additions for a Telltale method.

    - ``hf_overrides``: the Telltale architecture and the resolved config (reaches every worker,
      lm-eval's data-parallel replicas included);
    - ``worker_cls`` and ``logits_processors``: lifecycle and row-order wiring;
    - ``enforce_eager=True``: plain Python hooks are traced away by torch.compile/CUDA graphs;
    - ``enable_prefix_caching=False``: cached blocks would skip the forward of prompt tokens and
      could carry K/V computed under another request's intervention.
    """
    if architecture not in ARCHITECTURES:
        raise UnsupportedModelError(f"telltale: unsupported architecture {architecture!r}; supported: "
                                    f"{', '.join(sorted(ARCHITECTURES))}")
    ov = dict(hf_overrides or {})
    ov["architectures"] = [ARCHITECTURES[architecture]]
    ov["telltale"] = cfg.to_dict()
    # vLLM >= 0.32 defaults to Model Runner V2 on GPU; the hooks follow the V1 runner's batch.
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    return {
        "hf_overrides": ov,
        "worker_cls": worker_cls(),
        "logits_processors": [ROW_MIRROR],
        "enforce_eager": True,
        "enable_prefix_caching": False,
    }
