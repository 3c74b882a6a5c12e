"""``telltale profile`` and ``telltale calibrate``: per-layer norm distributions of generated tokens.

Both drive vLLM directly, in this process's driver (no lm-eval evaluation, no scoring):

1. prompts: the lm-eval task's own documents and prompt (``TaskManager.load`` +
   ``Task.build_all_requests``, first ``--limit`` documents per task, chat template applied through
   the model's tokenizer unless ``--no-chat-template``) — the same contexts ``lm_eval
   --apply_chat_template`` sends; the task's ``generation_kwargs`` give the budget, stop strings and
   greedy/sampling (``--max-tokens``/``--temperature`` override);
2. thinking: for a chat template that knows ``enable_thinking`` (Qwen3) ``--thinking both`` renders
   every prompt twice, ``enable_thinking=True`` and ``False``; ``on``/``off`` one of them;
   ``default`` passes nothing (the template's default); ``auto`` (profile's default) = ``both`` when
   the template has the switch, else ``default``;
3. one engine: ``LLM(model, **engine_kwargs(resolve("norms", {layers, record_tokens: true,
   warmup}), arch))`` — the ``vllm-norms`` observer on every layer by default (``--layers``), outputs
   identical to stock vLLM; every request is tagged and its per-token trace (norm and the
   engine's adaptive request-mode τ per layer) collected with the ``telltale_collect`` RPC.

``profile`` writes ``<out>/profile.json`` (per mode and layer: count, mean, std, min, max,
quantiles of the norms of all generated tokens; per sample: mean norm per layer; the traces of the
chosen sample), ``<out>/profile_layers.png`` (layer-wise mean with p10–p90 and p25–p75 bands,
thinking vs non-thinking — the paper's Fig. 1 right panel) and ``<out>/profile_trace.png`` (the
token-wise norm of one sample at one layer with the adaptive τ overlaid; the ``</think>`` token
marked).

``calibrate`` reduces the same collection to per-layer quantiles (all generated tokens of all
prompts pooled; ``--thinking default`` unless given) and writes a YAML (or ``.json``) file::

    model: <path or id>          # informational
    architecture: Qwen3ForCausalLM
    num_layers: 28               # checked against the model when used as a preset
    telltale: {tau_mode: calibrated, tau_q: 0.9}
    calibration:
      model: ..., tasks: [...], limit: N, thinking: default, n_samples: ..., n_tokens: {layer: n}
      quantiles: {<layer>: {p50: x, p75: x, p80: x, p85: x, p90: x, p95: x, p99: x}}

Use it as ``tau_mode=calibrated,tau_file=FILE,tau_q=0.95`` or as a preset, ``config=FILE`` (the
preset's own ``calibration`` section is then the τ file; ``tau_q`` 0.9 unless given).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .plots import plot_layers, plot_trace

PROFILE_QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
CALIB_QUANTILES = (0.5, 0.75, 0.8, 0.85, 0.9, 0.95, 0.99)
MODES = {"on": ["thinking"], "off": ["non-thinking"], "both": ["thinking", "non-thinking"], "default": ["default"]}
THINK_FLAG = {"thinking": True, "non-thinking": False, "default": None}


def qkey(q: float) -> str:
    """0.9 → "p90", 0.975 → "p97.5" (the keys ``config.calibrated_tau`` reads)."""
    return f"p{round(q * 100, 6):g}"


# --------------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------------

def _leaf_tasks(d: dict):
    from lm_eval.api.task import Task

    for v in d.values():
        if isinstance(v, Task):
            yield v
        elif isinstance(v, dict):
            yield from _leaf_tasks(v)


def has_thinking_switch(tokenizer) -> bool:
    tpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, dict):
        tpl = " ".join(tpl.values())
    return bool(tpl) and "enable_thinking" in str(tpl)


def build_prompts(tokenizer, tasks: list[str], *, limit: int | None, modes: list[str], include_path: str | None = None,
                  metadata: dict | None = None, chat_template: bool = True) -> list[dict[str, Any]]:
    """[{mode, task, doc_id, prompt (text), gen_kwargs}] for every mode, task and document."""
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=include_path, metadata=metadata) if metadata else TaskManager(include_path=include_path)
    if hasattr(tm, "load"):  # lm-eval >= 0.4.12: {"tasks": {name: Task}, "groups": ..., "group_map": ...}
        leaves = list(tm.load(list(tasks))["tasks"].values())
    else:
        from lm_eval.tasks import get_task_dict

        leaves = list(_leaf_tasks(get_task_dict(tasks, tm)))
    out = []
    for task in leaves:
        if task.OUTPUT_TYPE != "generate_until":
            print(f"telltale: skipping {task.config.task}: output type {task.OUTPUT_TYPE} generates nothing",
                  file=sys.stderr)
            continue
        for mode in modes:
            flag = THINK_FLAG[mode]

            def ct(history, add_generation_prompt=True, _flag=flag):
                kw = {} if _flag is None else {"enable_thinking": _flag}
                return tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                     **kw)

            task.build_all_requests(limit=limit, rank=0, world_size=1, apply_chat_template=chat_template,
                                    chat_template=ct if chat_template else None,
                                    tokenizer_name=getattr(tokenizer, "name_or_path", ""))
            seen = set()
            for inst in task.instances:
                if inst.doc_id in seen:  # repeats: one generation per document
                    continue
                seen.add(inst.doc_id)
                out.append({"mode": mode, "task": task.config.task, "doc_id": inst.doc_id, "prompt": inst.args[0],
                            "gen_kwargs": dict(inst.args[1] or {}), "chat_template": chat_template})
    return out


def sampling_params(gen: dict, tag: str, max_tokens: int | None, temperature: float | None, seed: int):
    from vllm import SamplingParams

    from ..vllm.runtime import TAG_KEY

    gen = dict(gen)
    until = gen.pop("until", None) or []
    if isinstance(until, str):
        until = [until]
    mt = max_tokens if max_tokens is not None else int(gen.pop("max_gen_toks", 256))
    do_sample = gen.pop("do_sample", None)
    t = temperature if temperature is not None else float(gen.pop("temperature", 0.0) or 0.0)
    if do_sample is False and temperature is None:
        t = 0.0
    kw = {k: gen[k] for k in ("top_p", "top_k", "min_p") if k in gen and t > 0}
    return SamplingParams(max_tokens=mt, temperature=t, stop=list(until) or None, seed=seed if t > 0 else None,
                          extra_args={TAG_KEY: tag}, **kw)


# --------------------------------------------------------------------------------------------
# collection
# --------------------------------------------------------------------------------------------

def resolve_modes(thinking: str, tokenizer, chat_template: bool) -> list[str]:
    switch = chat_template and has_thinking_switch(tokenizer)
    if thinking == "auto":
        thinking = "both" if switch else "default"
    if thinking in ("on", "off", "both") and not switch:
        raise SystemExit(f"telltale: --thinking {thinking}: the model's chat template has no enable_thinking switch"
                         + ("" if chat_template else " (and --no-chat-template was given)"))
    return MODES[thinking]


def collect(model: str, tasks: list[str], *, limit: int | None = None, thinking: str = "auto",
            layers: str = "all", warmup: int | None = None, max_tokens: int | None = None,
            temperature: float | None = None, include_path: str | None = None, metadata: dict | None = None,
            chat_template: bool = True, engine_args: dict | None = None, seed: int = 0,
            trust_remote_code: bool = False) -> dict[str, Any]:
    """Generate the task's prompts through the ``norms`` observer; returns ``{"meta", "samples"}``
    where every sample holds its per-token ``norm`` and ``tau`` arrays ([T, L], NaN = warm-up)."""
    from transformers import AutoTokenizer
    from vllm import LLM

    from ..config import resolve
    from ..vllm import engine_kwargs, inspect_model

    arch, n_layers = inspect_model(model, trust_remote_code=trust_remote_code)
    tt: dict[str, Any] = {"layers": f"0-{n_layers - 1}" if layers == "all" else layers, "record_tokens": True}
    if warmup is not None:
        tt["warmup"] = warmup
    cfg = resolve("norms", tt, n_layers, seed=seed)
    tok = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    modes = resolve_modes(thinking, tok, chat_template)
    prompts = build_prompts(tok, tasks, limit=limit, modes=modes, include_path=include_path, metadata=metadata,
                            chat_template=chat_template)
    if not prompts:
        raise SystemExit(f"telltale: no generation prompts from tasks {tasks}")
    kw = dict(model=model, seed=seed, trust_remote_code=trust_remote_code)
    kw.update(engine_args or {})
    kw.update(engine_kwargs(cfg, arch, kw.pop("hf_overrides", None)))
    llm = LLM(**kw)
    try:
        ids, sps = [], []
        for i, p in enumerate(prompts):
            p["tag"] = f"prof{i}"
            enc = tok(p["prompt"], add_special_tokens=not p["chat_template"])["input_ids"]
            ids.append({"prompt_token_ids": enc})
            sps.append(sampling_params(p["gen_kwargs"], p["tag"], max_tokens, temperature, seed + i))
        outs = llm.generate(ids, sps, use_tqdm=True)
        recs = {r["tag"]: r for r in llm.collective_rpc("telltale_collect", args=([p["tag"] for p in prompts],))[0]}
    finally:
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001
            pass
    L = len(cfg.layers)
    samples = []
    for p, o, enc in zip(prompts, outs, ids):
        rec = recs.get(p["tag"]) or {}
        t = rec.get("tokens") or {}
        norm = np.asarray(t.get("norm") or np.zeros((0, L)), dtype=np.float64).reshape(-1, L)
        tau = np.asarray([[np.nan if v is None else v for v in row] for row in (t.get("tau") or [])],
                         dtype=np.float64).reshape(-1, L)
        out = o.outputs[0]
        samples.append({"mode": p["mode"], "task": p["task"], "doc_id": p["doc_id"],
                        "n_prompt_tokens": len(enc["prompt_token_ids"]), "token_ids": list(out.token_ids),
                        "text": out.text, "finish_reason": out.finish_reason,
                        "position": list(t.get("position") or []), "norm": norm, "tau": tau})
    think_end = tok.convert_tokens_to_ids("</think>") if "</think>" in tok.get_vocab() else None
    meta = {"model": model, "architecture": arch, "num_layers": n_layers, "layers": cfg.layers, "tasks": tasks,
            "limit": limit, "modes": modes, "warmup": cfg.warmup, "iqr_k": cfg.iqr_k, "tau_mode": cfg.tau_mode,
            "chat_template": chat_template, "think_end_token_id": think_end,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    return {"meta": meta, "samples": samples}


def layer_stats(samples: list[dict], layers: list[int], quantiles=PROFILE_QUANTILES) -> dict[str, dict]:
    out = {}
    for j, l in enumerate(layers):
        v = np.concatenate([s["norm"][:, j] for s in samples]) if samples else np.zeros(0)
        v = v[np.isfinite(v)]
        if v.size == 0:
            out[str(l)] = {"count": 0}
            continue
        qs = np.quantile(v, quantiles)
        out[str(l)] = {"count": int(v.size), "mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
                       "max": float(v.max()), "quantiles": {qkey(q): float(x) for q, x in zip(quantiles, qs)}}
    return out


def summarize_profile(col: dict, trace_layer: int | None = None, trace_sample: int = 0) -> dict[str, Any]:
    meta, samples = col["meta"], col["samples"]
    layers = meta["layers"]
    from ..config import default_layers

    if trace_layer is None:
        dl = [l for l in default_layers(meta["num_layers"]) if l in layers]
        trace_layer = dl[-1] if dl else layers[len(layers) // 2]
    if trace_layer not in layers:
        raise SystemExit(f"telltale: --trace-layer {trace_layer} was not recorded (layers {layers})")
    j = layers.index(trace_layer)
    modes = {}
    for m in meta["modes"]:
        ss = [s for s in samples if s["mode"] == m]
        modes[m] = {"n_samples": len(ss), "n_tokens": int(sum(s["norm"].shape[0] for s in ss)),
                    "finish_length_rate": (sum(s["finish_reason"] == "length" for s in ss) / len(ss)) if ss else None,
                    "layers": layer_stats(ss, layers)}
    keys = []
    for s in samples:
        k = (s["task"], s["doc_id"])
        if k not in keys:
            keys.append(k)
    if not 0 <= trace_sample < len(keys):
        raise SystemExit(f"telltale: --trace-sample {trace_sample} out of range (0..{len(keys) - 1})")
    task, doc = keys[trace_sample]
    te = meta.get("think_end_token_id")
    traces = {}
    for s in samples:
        if (s["task"], s["doc_id"]) != (task, doc):
            continue
        ids = s["token_ids"]
        # trace row i is the forward of generated token i (its input), position = prompt + i
        think_end = next((i for i, t in enumerate(ids[:len(s["norm"])]) if te is not None and t == te), None)
        traces[s["mode"]] = {"norm": [round(float(x), 5) for x in s["norm"][:, j]],
                             "tau": [None if not math.isfinite(x) else round(float(x), 5) for x in s["tau"][:, j]],
                             "think_end_index": think_end, "finish_reason": s["finish_reason"]}
    per_sample = [{"mode": s["mode"], "task": s["task"], "doc_id": s["doc_id"], "n_tokens": int(s["norm"].shape[0]),
                   "finish_reason": s["finish_reason"],
                   "mean_norm": {str(l): (float(s["norm"][:, i].mean()) if s["norm"].shape[0] else None)
                                 for i, l in enumerate(layers)}} for s in samples]
    return {"meta": meta, "modes": modes, "samples": per_sample,
            "trace": {"layer": trace_layer, "task": task, "doc_id": doc, "modes": traces}}


# --------------------------------------------------------------------------------------------
# calibration file
# --------------------------------------------------------------------------------------------

def calibration_data(col: dict, quantiles=CALIB_QUANTILES, tau_q: float = 0.9) -> dict[str, Any]:
    meta, samples = col["meta"], col["samples"]
    st = layer_stats(samples, meta["layers"], quantiles)
    empty = [l for l, v in st.items() if not v.get("count")]
    if empty:
        raise SystemExit(f"telltale calibrate: no generated tokens recorded for layer(s) {', '.join(empty)}")
    if not any(abs(q - tau_q) < 1e-9 for q in quantiles):
        raise SystemExit(f"telltale calibrate: --tau-q {tau_q} must be one of the quantiles {list(quantiles)}")
    return {
        "model": meta["model"],
        "architecture": meta["architecture"],
        "num_layers": meta["num_layers"],
        "telltale": {"tau_mode": "calibrated", "tau_q": tau_q},
        "calibration": {
            "model": meta["model"], "created": meta["created"], "tasks": meta["tasks"], "limit": meta["limit"],
            "thinking": meta["modes"], "n_samples": len(samples),
            "n_tokens": {int(l): v["count"] for l, v in st.items()},
            "mean": {int(l): v["mean"] for l, v in st.items()},
            "quantiles": {int(l): v["quantiles"] for l, v in st.items()},
        },
    }


def write_calibration(data: dict, path: str | Path) -> Path:
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps(data, indent=2) + "\n")
    else:
        head = ("# written by `telltale calibrate`: per-layer quantiles of the residual-stream norm of generated tokens.\n"
                "# Use: --model_args ...,tau_mode=calibrated,tau_file=THIS_FILE,tau_q=0.9  or  ...,config=THIS_FILE\n")
        path.write_text(head + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120))
    return path


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def _common_args(ap: argparse.ArgumentParser, thinking_default: str) -> None:
    ap.add_argument("--model", required=True, help="model path or Hugging Face id")
    ap.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks or groups (generate_until)")
    ap.add_argument("--limit", type=int, default=None, help="first N documents per task")
    ap.add_argument("--include_path", "--include-path", dest="include_path", default=None,
                    help="extra lm-eval task directory")
    ap.add_argument("--metadata", default=None, help="JSON metadata for the TaskManager (e.g. telltale_data_dir)")
    ap.add_argument("--thinking", default=thinking_default, choices=["auto", "both", "on", "off", "default"],
                    help=f"enable_thinking of the chat template (default {thinking_default})")
    ap.add_argument("--no-chat-template", action="store_true", help="send the task's plain prompt")
    ap.add_argument("--layers", default="all", help="layers to record: all (default), auto, '21-26', '3;5'")
    ap.add_argument("--warmup", type=int, default=None, help="tokens before the adaptive τ is defined (default 64)")
    ap.add_argument("--max-tokens", type=int, default=None, help="override the task's max_gen_toks")
    ap.add_argument("--temperature", type=float, default=None, help="override the task's temperature")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trust-remote-code", action="store_true")
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--gpu-memory-utilization", type=float, default=None)
    ap.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    ap.add_argument("--engine-args", default=None, help="more vLLM LLM(...) arguments as JSON")


def _collect_from(a) -> dict:
    eng = json.loads(a.engine_args) if a.engine_args else {}
    for k in ("max_model_len", "dtype", "gpu_memory_utilization", "kv_cache_memory_bytes"):
        v = getattr(a, k)
        if v is not None:
            eng[k] = v
    return collect(a.model, [t for t in a.tasks.split(",") if t], limit=a.limit, thinking=a.thinking,
                   layers=a.layers, warmup=a.warmup, max_tokens=a.max_tokens, temperature=a.temperature,
                   include_path=a.include_path, metadata=json.loads(a.metadata) if a.metadata else None,
                   chat_template=not a.no_chat_template, engine_args=eng, seed=a.seed,
                   trust_remote_code=a.trust_remote_code)


def main_profile(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="telltale profile", description="Per-layer norm distributions of generated "
                                 "tokens (vllm-norms observer), thinking on/off; JSON + PNG plots.")
    _common_args(ap, "auto")
    ap.add_argument("--out", default="telltale_profile", help="output directory (profile.json, *.png)")
    ap.add_argument("--trace-layer", type=int, default=None, help="layer of the token-wise trace plot "
                                                                  "(default: the deepest default patched layer)")
    ap.add_argument("--trace-sample", type=int, default=0, help="which document (in prompt order) to trace")
    a = ap.parse_args(argv)
    col = _collect_from(a)
    prof = summarize_profile(col, a.trace_layer, a.trace_sample)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(prof, indent=1) + "\n")
    p1 = plot_layers(prof, out / "profile_layers.png")
    p2 = plot_trace(prof, out / "profile_trace.png")
    for m, st in prof["modes"].items():
        print(f"telltale profile: {m}: {st['n_samples']} samples, {st['n_tokens']} generated tokens", file=sys.stderr)
    print(f"telltale profile: wrote {out / 'profile.json'}, {p1}, {p2}", file=sys.stderr)
    return 0


def main_calibrate(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="telltale calibrate", description="Per-layer norm quantiles of generated "
                                 "tokens, written as a tau_mode=calibrated file (also a config= preset).")
    _common_args(ap, "default")
    ap.add_argument("--out", required=True, help="output file (.yaml, or .json)")
    ap.add_argument("--quantiles", default=",".join(f"{q:g}" for q in CALIB_QUANTILES),
                    help="comma-separated quantiles in (0, 1)")
    ap.add_argument("--tau-q", type=float, default=0.9, help="the quantile the file selects when used as config=")
    a = ap.parse_args(argv)
    qs = tuple(float(x) for x in a.quantiles.split(",") if x.strip())
    if not qs or not all(0 < q < 1 for q in qs):
        ap.error("--quantiles must be numbers in (0, 1)")
    col = _collect_from(a)
    data = calibration_data(col, qs, a.tau_q)
    p = write_calibration(data, a.out)
    print(f"telltale calibrate: {data['calibration']['n_samples']} samples, layers "
          f"{min(data['calibration']['quantiles'])}..{max(data['calibration']['quantiles'])}; wrote {p}", file=sys.stderr)
    return 0
