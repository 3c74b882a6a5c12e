"""lm-eval model types over stock vLLM: ``vllm-norms`` (observe) and the method types built on it.

Like lm-eval's ``steered`` model, each type is the stock backend plus a small surface:

- ``__init__`` takes the telltale model_args out of the arguments (they would otherwise reach
  ``LLM(...)`` and be rejected), validates them against the model's config — before any engine is
  built — and adds the engine arguments from :func:`lm_eval_telltale.vllm.engine_kwargs`;
- ``_model_generate`` tags every request, generates, then collects the per-request statistics from
  the worker;
- ``generate_until`` joins those statistics to lm-eval's instances (task, doc_id) and appends
  them to the JSONL sidecar;
- ``get_model_info`` puts the resolved config and a run summary into lm-eval's results JSON.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import logging
import sys
from collections import defaultdict, deque
from pathlib import Path
from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.vllm_causallms import VLLM

from ..config import PRESET_PASSTHROUGH, ConfigError, TelltaleConfig, all_keys, load_preset, resolve
from ..core.rng import seed_from
from ..sidecar import RunSummary, SidecarWriter
from ..vllm import engine_kwargs, inspect_model
from ..vllm.runtime import TAG_KEY

logger = logging.getLogger("lm_eval_telltale")


def _output_path_from_argv(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a in ("--output_path", "-o") and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--output_path="):
            return a.split("=", 1)[1]
    return None


def default_stats_path(pretrained: str, method: str, output_path: str | None) -> Path | None:
    """Next to lm-eval's own files: ``<output_path>/<model_name_sanitized>/telltale_<method>_<time>.jsonl``
    (lm-eval's layout for a directory ``--output_path``; its parent for a ``.json`` path)."""
    if not output_path:
        return None
    from lm_eval.utils import sanitize_model_name

    stamp = _dt.datetime.now().isoformat().replace(":", "-")
    out = Path(output_path).expanduser()
    if out.suffix == ".json":
        return out.parent / f"telltale_{method}_{stamp}.jsonl"
    return out / sanitize_model_name(pretrained) / f"telltale_{method}_{stamp}.jsonl"


class TelltaleVLLM(VLLM):
    METHOD = "norms"

    def __init__(self, pretrained: str, **kwargs: Any):
        tt_args = {k: kwargs.pop(k) for k in list(kwargs) if k in all_keys(self.METHOD)}
        preset = load_preset(str(tt_args.pop("config"))) if tt_args.get("config") is not None else None
        tt_args.pop("config", None)
        if preset:
            for k in PRESET_PASSTHROUGH:
                if k in preset and kwargs.get(k) is None:
                    kwargs[k] = preset[k]
        self._tt_check_engine_args(kwargs)
        self._tt_check_unknown(kwargs)
        arch, n_layers = inspect_model(pretrained, kwargs.get("revision"), bool(kwargs.get("trust_remote_code")))
        if preset and preset.get("num_layers") not in (None, n_layers):
            raise ConfigError("config", f"preset {preset['_path']} is for a {preset['num_layers']}-layer model, "
                                        f"{pretrained!r} has {n_layers}")
        seed = int(kwargs.get("seed", 1234) or 0)
        cfg = resolve(self.METHOD, tt_args, n_layers, seed=seed, preset=preset)
        self._tt_preset = preset
        self._tt_configure(cfg, kwargs)
        stats_path = cfg.stats_path or default_stats_path(pretrained, self.METHOD, _output_path_from_argv(sys.argv))
        cfg.stats_path = str(Path(stats_path).expanduser().resolve()) if stats_path else None
        user_ov = kwargs.pop("hf_overrides", None)
        if isinstance(user_ov, str):
            try:
                user_ov = json.loads(user_ov)
            except json.JSONDecodeError:
                raise ConfigError("hf_overrides", f"not JSON: {user_ov!r}") from None
        kwargs.update(engine_kwargs(cfg, arch, user_ov))
        if kwargs.get("batch_size", 1) in (1, "1"):
            logger.warning("telltale: batch_size=1 sends requests to vLLM one at a time; use --batch_size auto")
        self.tt_cfg: TelltaleConfig = cfg
        self._tt_arch = arch
        self._tt_counter = itertools.count()
        self._tt_pending: list[dict[str, Any]] = []
        self._tt_writer = SidecarWriter(cfg.stats_path) if cfg.stats_path else None
        self._tt_summary = RunSummary(cfg)
        super().__init__(pretrained=pretrained, **kwargs)
        if self.data_parallel_size > 1:
            logger.warning("telltale: data_parallel_size>1 — the method runs in every replica, but per-sample "
                           "statistics cannot be collected from ray replicas; the sidecar stays empty")
        if self._tt_writer is None:
            logger.warning("telltale: no --output_path and no stats_path=: per-sample statistics are not written")

    # -- hooks for subclasses -------------------------------------------------------------------
    def _tt_configure(self, cfg: TelltaleConfig, kwargs: dict[str, Any]) -> None:
        """Method types adjust engine arguments here (called before the engine exists)."""

    @staticmethod
    def _tt_check_engine_args(kwargs: dict[str, Any]) -> None:
        if kwargs.get("enforce_eager") is False or str(kwargs.get("enforce_eager")).lower() == "false":
            raise ConfigError("enforce_eager", "telltale model types run eagerly: torch.compile/CUDA graphs would "
                                               "trace the Python hooks away")
        if kwargs.get("enable_prefix_caching"):
            raise ConfigError("enable_prefix_caching", "telltale model types disable prefix caching (cached blocks "
                                                       "skip the forward and may hold K/V from another intervention)")
        if kwargs.get("speculative_config"):
            raise ConfigError("speculative_config", "speculative decoding is not supported by telltale model types")

    @classmethod
    def _tt_check_unknown(cls, kwargs: dict[str, Any]) -> None:
        """Every remaining model_arg must be an lm-eval VLLM argument or a vLLM engine argument;
        otherwise vLLM would reject it only after minutes of start-up."""
        import dataclasses
        import inspect

        from vllm.engine.arg_utils import EngineArgs

        known = set(inspect.signature(VLLM.__init__).parameters) | {f.name for f in dataclasses.fields(EngineArgs)}
        known |= {"device", "batch_size", "max_batch_size"}
        for k in kwargs:
            if k not in known:
                raise ConfigError(k, f"unknown model_arg for vllm-{cls.METHOD} (not a telltale key "
                                     f"{sorted(all_keys(cls.METHOD))}, nor an lm-eval/vLLM engine argument)")

    # -- generation -----------------------------------------------------------------------------
    def _tt_tag(self, prompt: list[int], sp, seen: dict) -> tuple[Any, str]:
        key = tuple(prompt)
        k = seen[key] = seen.get(key, -1) + 1
        tag = f"tt{next(self._tt_counter)}"
        sp = sp.clone()
        # the request's identity for random draws: its prompt and occurrence, not its batch position
        extra = dict(sp.extra_args or {})
        extra[TAG_KEY] = tag
        extra["telltale_seed"] = seed_from(hash(key), k)
        sp.extra_args = extra
        return sp, tag

    def _tt_collect(self, tags: list[str]) -> dict[str, dict]:
        res = self.model.collective_rpc("telltale_collect", args=(tags,))
        recs = res[0] if res else []
        return {r["tag"]: r for r in recs}

    def _model_generate(self, requests, generate=False, sampling_params=None):
        if not generate or sampling_params is None or self.data_parallel_size > 1:
            out = super()._model_generate(requests, generate=generate, sampling_params=sampling_params)
            if self.data_parallel_size == 1:
                self.model.collective_rpc("telltale_discard")
            return out
        if not isinstance(sampling_params, list):
            sampling_params = [sampling_params] * len(requests)
        seen: dict = {}
        tagged = [self._tt_tag(p, sp, seen) for p, sp in zip(requests, sampling_params)]
        outputs = super()._model_generate(requests, generate=True, sampling_params=[sp for sp, _ in tagged])
        stats = self._tt_collect([t for _, t in tagged])
        for prompt, (_sp, tag), out in zip(requests, tagged, outputs):
            self._tt_pending.append({"prompt": tuple(prompt), "tag": tag, "output": out, "stats": stats.get(tag)})
        return outputs

    def generate_until(self, requests, disable_tqdm: bool = False):
        self._tt_pending = []
        texts = super().generate_until(requests, disable_tqdm)
        self._tt_join(requests, texts)
        return texts

    def _tt_join(self, requests, texts) -> None:
        by_prompt: dict[tuple, deque] = defaultdict(deque)
        for rec in self._tt_pending:
            by_prompt[rec["prompt"]].append(rec)
        self._tt_pending = []
        repeats: dict[tuple, int] = defaultdict(int)
        rows = []
        for inst, text in zip(requests, texts):
            toks = tuple(self.tok_encode(inst.args[0]))
            q = by_prompt.get(toks)
            if not q:  # the backend left-truncated the prompt: find the record whose prompt is a suffix
                q = next((v for k, v in by_prompt.items() if v and len(k) < len(toks) and toks[-len(k):] == k), None)
            if not q:
                logger.warning("telltale: no statistics for %s doc %s (cached response?)", inst.task_name, inst.doc_id)
                continue
            rec = q.popleft()
            key = (inst.task_name, inst.doc_id)
            rows.append(self._tt_row(inst, repeats[key], text, rec))
            repeats[key] += 1
        for row in rows:
            self._tt_summary.add(row)
        if self._tt_writer is not None:
            self._tt_writer.write(rows)

    def _tt_row(self, inst, repeat: int, text: str, rec: dict) -> dict[str, Any]:
        out = rec["output"].outputs[0]
        stats = rec["stats"] or {}
        row = {
            "task": inst.task_name, "doc_id": inst.doc_id, "repeat": repeat, "method": self.METHOD,
            "tag": rec["tag"], "n_prompt_tokens": len(rec["prompt"]), "n_generated_tokens": len(out.token_ids),
            "finish_reason": out.finish_reason, "response": text, "raw_output": out.text,
            "n_decode_tokens": stats.get("n_decode_tokens", 0), "layers": stats.get("layers", {}),
        }
        if "tokens" in stats:
            row["tokens"] = stats["tokens"]
            row["token_ids"] = list(out.token_ids)
        return row

    # -- results JSON ---------------------------------------------------------------------------
    def get_model_info(self) -> dict:
        base = super().get_model_info() if hasattr(super(), "get_model_info") else {}
        info = {
            "method": self.METHOD,
            "model_type": f"vllm-{self.METHOD}",
            "architecture": self._tt_arch,
            "config": self.tt_cfg.to_dict(),
            "preset": self._tt_preset.get("_path") if self._tt_preset else None,
            "stats_path": self.tt_cfg.stats_path,
            "summary": self._tt_summary.to_dict(),
        }
        return {**base, "telltale": info}


@register_model("vllm-norms")
class VLLMNorms(TelltaleVLLM):
    """Observe the residual-stream norm at the patched layers; outputs identical to ``vllm``."""

    METHOD = "norms"


@register_model("vllm-suppress")
class VLLMSuppress(TelltaleVLLM):
    """High-norm suppression (and the random / rate-matched controls), docs/methods.md §5."""

    METHOD = "suppress"


@register_model("vllm-alrr")
class VLLMAlrr(TelltaleVLLM):
    """Adaptive Layer-wise Reasoning Recursion, docs/methods.md §2."""

    METHOD = "alrr"


@register_model("vllm-erss")
class VLLMErss(TelltaleVLLM):
    """Endogenous Reasoning State Steering, docs/methods.md §3: per request and patched layer, a bank of
    high-norm states; after a low-norm streak, h ← h + β·(v − r) with the best-cosine bank vector."""

    METHOD = "erss"
