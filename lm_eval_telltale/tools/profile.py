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
3. one engine: ``LLM(**assemble_engine_args(resolve("norms", {layers, record_tokens: true, warmup}),
   arch, {model, seed, **engine_args}))`` — the user's explicit ``--engine-args`` win where they
   may, as in the lm-eval model types, and ``profile.json`` records them and the engine's settings;
   the ``vllm-norms`` observer on every layer by default (``--layers``), outputs identical to stock
   vLLM; every request is tagged and its per-token trace (norm and the
   engine's adaptive request-mode τ per layer) collected with the ``telltale_collect`` RPC.
   ``--engine hf`` runs the same observer on transformers instead (the ``hf-norms`` generation
   loop, :mod:`lm_eval_telltale.hf.runtime`; ``--engine-args`` then holds ``device``,
   ``batch_size`` and ``from_pretrained`` arguments), with the same records.

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
preset's own ``calibration`` section is then the τ file; ``tau_q`` the default (``spec.TAU_Q``) unless given).

Every argument (quantiles, ``--tau-q``, ``--layers``, ``--trace-layer``, ``--trace-sample``, the JSON
flags and the ``--engine-args`` keys vLLM takes, the ``--tasks`` names, the model's config, whether
``--out`` can be written) is checked before the engine starts. No output is written over an input
(the ``--collection`` file; when generating, the files of a local ``--model``, of ``--include_path``
and the task YAML files given).
Right after generation the raw collection is saved (``<out>/collection.npz`` for ``profile``,
``<out minus suffix>.collection.npz`` for ``calibrate``) before any later step that could fail;
``--collection FILE`` recomputes the outputs from such a file without generating again.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..files import unwritable
from ..spec import TAU_Q
from .checks import unknown_engine_args
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

def has_thinking_switch(tokenizer) -> bool:
    tpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, dict):
        tpl = " ".join(tpl.values())
    return bool(tpl) and "enable_thinking" in str(tpl)


class TaskLoadError(ValueError):
    """lm-eval cannot load the tasks asked for (its ``KeyError``); raised before any engine starts."""


def build_prompts(tokenizer, tasks: list[str], *, limit: int | None, modes: list[str], include_path: str | None = None,
                  metadata: dict | None = None, chat_template: bool = True) -> list[dict[str, Any]]:
    """[{mode, task, doc_id, prompt (text), gen_kwargs}] for every mode, task and document."""
    from ..harness.taskindex import load_tasks

    # {"tasks": {name: Task}, "groups": ..., "group_map": ...} (lm-eval >= 0.4.12, as pyproject requires)
    try:
        leaves = list(load_tasks(list(tasks), include_path, metadata or None)["tasks"].values())
    except KeyError as e:  # lm-eval's error for a name (or a group member) it does not know
        raise TaskLoadError(str(e.args[0]) if e.args else repr(e)) from None
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

    return SamplingParams(**decoding(gen, max_tokens, temperature, seed), extra_args={TAG_KEY: tag})


def decoding(gen: dict, max_tokens: int | None, temperature: float | None, seed: int) -> dict[str, Any]:
    """A task's generation kwargs (with the command line's overrides) as decoding settings:
    ``max_tokens``, ``temperature``, ``stop``, ``seed`` and top_p/top_k/min_p when sampling."""
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
    return dict(max_tokens=mt, temperature=t, stop=list(until) or None, seed=seed if t > 0 else None, **kw)


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
            trust_remote_code: bool = False,
            before_engine: Callable[[list[dict]], None] | None = None, engine: str = "vllm") -> dict[str, Any]:
    """Generate the task's prompts through the ``norms`` observer; returns ``{"meta", "samples"}``
    where every sample holds its per-token ``norm`` and ``tau`` arrays ([T, L], NaN = warm-up).
    ``before_engine(prompts)`` runs once the prompts are built, before the engine (checks that
    need the prompt list). ``engine``: ``vllm`` or ``hf`` (transformers)."""
    from transformers import AutoTokenizer

    from ..config import resolve
    from ..vllm import inspect_model

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
    if before_engine is not None:
        before_engine(prompts)
    ids = []
    for i, p in enumerate(prompts):
        p["tag"] = f"prof{i}"
        ids.append(tok(p["prompt"], add_special_tokens=not p["chat_template"])["input_ids"])
    settings = [decoding(p["gen_kwargs"], max_tokens, temperature, seed + i) for i, p in enumerate(prompts)]
    run = _generate_hf if engine == "hf" else _generate_vllm
    used: dict[str, Any] = {}
    gens = run(model, cfg, arch, tok, prompts, ids, settings, engine_args or {}, seed, trust_remote_code, used)
    L = len(cfg.layers)
    samples = []
    for p, (token_ids, text, finish, rec), enc in zip(prompts, gens, ids):
        t = (rec or {}).get("tokens") or {}
        norm = np.asarray(t.get("norm") or np.zeros((0, L)), dtype=np.float64).reshape(-1, L)
        tau = np.asarray([[np.nan if v is None else v for v in row] for row in (t.get("tau") or [])],
                         dtype=np.float64).reshape(-1, L)
        samples.append({"mode": p["mode"], "task": p["task"], "doc_id": p["doc_id"],
                        "n_prompt_tokens": len(enc), "prompt_ids": list(enc), "token_ids": list(token_ids),
                        "text": text, "finish_reason": finish,
                        "position": list(t.get("position") or []), "norm": norm, "tau": tau})
    think_end = tok.convert_tokens_to_ids("</think>") if "</think>" in tok.get_vocab() else None
    meta = {"model": model, "engine": engine, "architecture": arch, "num_layers": n_layers, "layers": cfg.layers,
            "tasks": tasks,
            "limit": limit, "modes": modes, "warmup": cfg.warmup, "iqr_k": cfg.iqr_k, "tau_mode": cfg.tau_mode,
            "chat_template": chat_template, "think_end_token_id": think_end,
            "engine_args": dict(engine_args or {}), "engine_settings": json.loads(json.dumps(used, default=str)),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    return {"meta": meta, "samples": samples}


def _generate_vllm(model, cfg, arch, tok, prompts, ids, settings, engine_args, seed, trust_remote_code, used):
    """[(token_ids, text, finish_reason, record)] per prompt, from one vLLM engine (``used`` receives
    the engine's settings: :func:`lm_eval_telltale.vllm.assemble_engine_args`, the user's explicit
    ones winning where they may)."""
    from vllm import LLM, SamplingParams

    from ..vllm import assemble_engine_args
    from ..vllm.driver import collect
    from ..vllm.reaper import guarded
    from ..vllm.runtime import TAG_KEY

    kw = dict(model=model, seed=seed, trust_remote_code=trust_remote_code)
    kw.update(engine_args)
    kw = assemble_engine_args(cfg, arch, kw, salted_requests=False, explicit=engine_args)
    used.update({k: v for k, v in kw.items() if k not in ("model", "hf_overrides")})
    llm = guarded(lambda: LLM(**kw))  # its processes end with this one (vllm/reaper.py)
    try:
        sps = [SamplingParams(**st, extra_args={TAG_KEY: p["tag"]}) for p, st in zip(prompts, settings)]
        outs = llm.generate([{"prompt_token_ids": enc} for enc in ids], sps, use_tqdm=True)
        recs = collect(llm, [p["tag"] for p in prompts], [len(o.outputs[0].token_ids) for o in outs])
        used["model_dtype"] = str(llm.llm_engine.model_config.dtype).removeprefix("torch.")  # vLLM may downcast
    finally:
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001
            pass
    return [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason, recs.get(p["tag"]))
            for p, o in zip(prompts, outs)]


def _generate_hf(model, cfg, arch, tok, prompts, ids, settings, engine_args, seed, trust_remote_code, used):
    """The same, from transformers: the hf adapter's generation loop, ``batch_size`` prompts at a time
    (``engine_args``: ``device``, ``batch_size``, and ``from_pretrained`` arguments)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    from ..hf.runtime import GenRequest, HFRuntime

    kw = dict(engine_args)
    device = kw.pop("device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    bs = int(kw.pop("batch_size", 16))
    kw.setdefault("dtype", "auto")
    used.update({"device": device, "batch_size": bs, **kw})
    lm = AutoModelForCausalLM.from_pretrained(model, trust_remote_code=trust_remote_code, **kw).to(device).eval()
    used["model_dtype"] = str(lm.dtype).removeprefix("torch.")
    rt = HFRuntime(lm, cfg, engine_seed=seed, tokenizer=tok)
    reqs = [GenRequest(list(enc), st["max_tokens"], tag=p["tag"], sampling_seed=st["seed"],
                       temperature=st["temperature"], top_p=float(st.get("top_p", 1.0)),
                       top_k=int(st.get("top_k", 0) or 0), min_p=float(st.get("min_p", 0.0)), stop=st["stop"] or ())
            for p, enc, st in zip(prompts, ids, settings)]
    out = []
    for i in tqdm(range(0, len(reqs), bs), desc="telltale: hf generation", unit="batch"):
        out.extend(rt.generate(reqs[i:i + bs]))
    texts = []
    for r in out:
        text = tok.decode(r.token_ids, skip_special_tokens=True)
        texts.append(text.split(r.stop_str)[0] if r.stop_str else text)
    return [(r.token_ids, t, r.finish_reason, r.stats) for r, t in zip(out, texts)]


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

def calibration_data(col: dict, quantiles=CALIB_QUANTILES, tau_q: float = TAU_Q) -> dict[str, Any]:
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
    ap.add_argument("--model", default=None, help="model path or Hugging Face id (required unless --collection)")
    ap.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks or groups (generate_until; "
                                                   "required unless --collection)")
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
    ap.add_argument("--engine", default="vllm", choices=["vllm", "hf"],
                    help="vllm (default) or hf: transformers, the hf-norms observer")
    ap.add_argument("--engine-args", default=None, help="more vLLM LLM(...) arguments as a JSON object (--engine hf: "
                                                       "device, batch_size and from_pretrained arguments)")
    ap.add_argument("--collection", default=None, metavar="FILE",
                    help="reuse the generations an earlier run saved (its *.collection.npz / collection.npz): "
                         "no engine, --model/--tasks and the generation flags are not used")


def _json_object(ap: argparse.ArgumentParser, flag: str, value: str | None) -> dict | None:
    if value is None:
        return None
    try:
        obj = json.loads(value)
    except json.JSONDecodeError as e:
        ap.error(f"{flag}: malformed JSON {value!r}: {e.msg} at column {e.colno} "
                 f"(a JSON object, e.g. {flag} '{{\"enforce_eager\": true}}')")
    if not isinstance(obj, dict):
        ap.error(f"{flag}: expected a JSON object {{...}}, got {value!r}")
    return obj


def _validate(ap: argparse.ArgumentParser, a: argparse.Namespace) -> dict[str, Any]:
    """Every check that needs no engine, before one starts (``ap.error`` → exit 2 naming the flag).
    Returns {"engine_args", "metadata", "layers" (None with --collection)}."""
    from ..config import ConfigError, parse_layers
    from ..vllm import UnsupportedModelError, inspect_model

    for flag, v, lo in (("--limit", a.limit, 1), ("--max-tokens", a.max_tokens, 1), ("--warmup", a.warmup, 0),
                        ("--max-model-len", a.max_model_len, 1), ("--kv-cache-memory-bytes", a.kv_cache_memory_bytes, 1)):
        if v is not None and v < lo:
            ap.error(f"{flag} must be >= {lo}, got {v}")
    if a.temperature is not None and not (math.isfinite(a.temperature) and a.temperature >= 0):
        ap.error(f"--temperature must be a number >= 0, got {a.temperature}")
    if a.gpu_memory_utilization is not None and not 0 < a.gpu_memory_utilization <= 1:
        ap.error(f"--gpu-memory-utilization must be in (0, 1], got {a.gpu_memory_utilization}")
    if a.engine == "hf":
        for flag, v in (("--gpu-memory-utilization", a.gpu_memory_utilization),
                        ("--kv-cache-memory-bytes", a.kv_cache_memory_bytes), ("--max-model-len", a.max_model_len)):
            if v is not None:
                ap.error(f"{flag} is a vLLM setting; not used with --engine hf")
    out = {"engine_args": _json_object(ap, "--engine-args", a.engine_args) or {},
           "metadata": _json_object(ap, "--metadata", a.metadata), "layers": None}
    if a.collection is not None:
        f = Path(a.collection).expanduser()
        if not f.is_file():
            ap.error(f"--collection {a.collection}: file not found")
        if a.model or a.tasks:
            print("telltale: --collection given: --model/--tasks and the generation flags are not used",
                  file=sys.stderr)
        return out
    missing = [f for f, v in (("--model", a.model), ("--tasks", a.tasks)) if not v]
    if missing:
        ap.error(f"the following arguments are required: {', '.join(missing)} (or --collection FILE)")
    if not [t for t in a.tasks.split(",") if t.strip()]:
        ap.error(f"--tasks: no task names in {a.tasks!r}")
    try:
        _arch, n_layers = inspect_model(a.model, trust_remote_code=a.trust_remote_code)
    except UnsupportedModelError as e:
        ap.error(f"--model: {e}")
    try:
        out["layers"] = parse_layers(f"0-{n_layers - 1}" if a.layers == "all" else a.layers, n_layers)
    except ConfigError as e:
        ap.error(f"--layers {a.layers}: {e}")
    if a.engine == "vllm":  # --engine hf: device, batch_size and any from_pretrained argument
        why = unknown_engine_args(out["engine_args"])
        if why:
            ap.error(f"--engine-args: {why}")
    unknown = _unknown_tasks(a.tasks, a.include_path)
    if unknown:
        ap.error(f"--tasks: unknown task {', '.join(map(repr, unknown))}: not an lm-eval task, group or tag name"
                 + (f" (built-in, telltale or in --include_path {a.include_path})" if a.include_path else "")
                 + " nor a task YAML file")
    return out


def _unknown_tasks(tasks: str, include_path: str | None) -> list[str]:
    """The ``--tasks`` names lm-eval's task index does not have (and that are no YAML file): the small
    index answers known names at once, an unknown one costs the full index (~15 s)."""
    from ..harness.taskindex import index_entry

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    return [t for t in names if not Path(t).expanduser().is_file() and index_entry(t, include_path) is None]


def _inputs(a: argparse.Namespace):
    """What this run reads (:class:`~lm_eval_telltale.tools.runs.Inputs`), never to be written over:
    the ``--collection`` file; when generating, the files of a local ``--model`` directory, of
    ``--include_path`` and the task YAML files named in ``--tasks``."""
    from .runs import Inputs

    inputs = Inputs()
    if a.collection is not None:
        srcs = [a.collection]
    else:
        srcs = [a.model, a.include_path, *(t.strip() for t in (a.tasks or "").split(",") if t.strip())]
    for src in srcs:
        p = Path(src).expanduser() if src else None
        if p is not None and p.is_file():
            inputs.files.add(p.resolve())
        elif p is not None and p.is_dir():
            inputs.files.update(f.resolve() for f in p.rglob("*") if f.is_file())
    return inputs


def _refuse_inputs(ap: argparse.ArgumentParser, a: argparse.Namespace, dests: list[tuple[str, Path]]) -> None:
    """``ap.error`` naming the flag when a file this run writes (``(flag, path)``) is one of its inputs."""
    inputs = _inputs(a)
    for flag, dest in dests:
        why = inputs.conflict(dest)
        if why:
            ap.error(f"{flag}: {why}")


def _collect_from(a, checked: dict, before_engine: Callable[[list[dict]], None] | None = None) -> dict:
    eng = dict(checked["engine_args"])
    for k in ("max_model_len", "dtype", "gpu_memory_utilization", "kv_cache_memory_bytes"):
        v = getattr(a, k)
        if v is not None:
            eng[k] = v
    return collect(a.model, [t.strip() for t in a.tasks.split(",") if t.strip()], limit=a.limit, thinking=a.thinking,
                   layers=a.layers, warmup=a.warmup, max_tokens=a.max_tokens, temperature=a.temperature,
                   include_path=a.include_path, metadata=checked["metadata"],
                   chat_template=not a.no_chat_template, engine_args=eng, seed=a.seed,
                   trust_remote_code=a.trust_remote_code, before_engine=before_engine, engine=a.engine)


# --------------------------------------------------------------------------------------------
# the raw collection on disk (written right after generation, before anything that could fail)
# --------------------------------------------------------------------------------------------

COLLECTION_FORMAT = "telltale-collection-1"


def save_collection(col: dict, path: str | Path) -> Path:
    """``{"meta", "samples"}`` as one ``.npz`` (no pickles): a JSON head plus norm/τ arrays per sample."""
    path = Path(path)
    arrays, samples = {}, []
    for i, smp in enumerate(col["samples"]):
        arrays[f"norm_{i}"] = np.asarray(smp["norm"], dtype=np.float64)
        arrays[f"tau_{i}"] = np.asarray(smp["tau"], dtype=np.float64)
        samples.append({k: v for k, v in smp.items() if k not in ("norm", "tau")})
    head = json.dumps({"format": COLLECTION_FORMAT, "meta": col["meta"], "samples": samples})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, head=np.array(head), **arrays)
    tmp.replace(path)
    return path


def load_collection(path: str | Path) -> dict:
    try:
        with np.load(Path(path).expanduser(), allow_pickle=False) as z:
            head = json.loads(str(z["head"]))
            if head.get("format") != COLLECTION_FORMAT:
                raise ValueError(f"not a {COLLECTION_FORMAT} file")
            samples = [{**smp, "norm": z[f"norm_{i}"], "tau": z[f"tau_{i}"]} for i, smp in enumerate(head["samples"])]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"telltale: --collection {path}: cannot read it ({e}); give a collection.npz written by "
                         "`telltale profile` or `telltale calibrate`") from None
    return {"meta": head["meta"], "samples": samples}


def _save_first(prog: str, col: dict, path: Path) -> Path:
    """Save the collection before any later step; if ``path`` cannot be written, the temp directory."""
    try:
        return save_collection(col, path)
    except OSError as e:
        fallback = Path(tempfile.mkdtemp(prefix="telltale-")) / path.name
        print(f"{prog}: warning: cannot write {path} ({e}); saving the generations to {fallback}", file=sys.stderr)
        return save_collection(col, fallback)


def _late_step(prog: str, saved: Path | None, fn: Callable[[], Any]) -> tuple[bool, Any]:
    """Run a step after generation; on failure, say where the generations are and how to reuse them."""
    try:
        return True, fn()
    except (Exception, SystemExit) as e:  # noqa: BLE001 — reported with the way back, never a lost run
        msg = e.code if isinstance(e, SystemExit) else f"{e.__class__.__name__}: {e}"
        msg = str(msg).removeprefix("telltale: ")
        print(f"{prog}: error: {msg}", file=sys.stderr)
        if saved is not None:
            print(f"{prog}: the generations are saved in {saved}; rerun with --collection {saved} "
                  "to finish without generating again", file=sys.stderr)
        return False, None


def _doc_keys(items: list[dict]) -> list[tuple]:
    keys: list[tuple] = []
    for x in items:
        k = (x["task"], x["doc_id"])
        if k not in keys:
            keys.append(k)
    return keys


def _check_trace(ap, a, layers: list[int], n_docs: int | None) -> None:
    if a.trace_sample < 0:
        ap.error(f"--trace-sample must be >= 0, got {a.trace_sample}")
    if a.trace_layer is not None and a.trace_layer not in layers:
        ap.error(f"--trace-layer {a.trace_layer} is not among the recorded layers {layers} (see --layers)")
    if n_docs is not None and a.trace_sample >= n_docs:
        ap.error(f"--trace-sample {a.trace_sample} out of range: the tasks give {n_docs} documents "
                 f"(0..{n_docs - 1})")


def _collection(prog: str, a, checked: dict, save_to: Path, before_engine=None, on_loaded=None):
    """(collection, path it was saved to or None): read from ``--collection`` (no engine), or
    generated now and written to ``save_to`` before any later step can fail."""
    if a.collection is not None:
        col = load_collection(a.collection)
        if on_loaded is not None:
            on_loaded(col)
        return col, None
    col = _collect_from(a, checked, before_engine)
    return col, _save_first(prog, col, save_to)


def main_profile(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="telltale profile", description="Per-layer norm distributions of generated "
                                 "tokens (vllm-norms observer), thinking on/off; JSON + PNG plots.")
    _common_args(ap, "auto")
    ap.add_argument("--out", default="telltale_profile", help="output directory (profile.json, *.png, and "
                                                               "collection.npz: the raw generations)")
    ap.add_argument("--trace-layer", type=int, default=None, help="layer of the token-wise trace plot "
                                                                  "(default: the deepest default patched layer)")
    ap.add_argument("--trace-sample", type=int, default=0, help="which document (in prompt order) to trace")
    a = ap.parse_args(argv)
    prog = "telltale profile"
    checked = _validate(ap, a)
    out = Path(a.out).expanduser()
    why = unwritable(out, is_dir=True)
    if why:
        ap.error(f"--out {a.out}: {why}")
    written = [out / n for n in ("profile.json", "profile_layers.png", "profile_trace.png")]
    _refuse_inputs(ap, a, [("--out", p) for p in written + ([] if a.collection else [out / "collection.npz"])])
    if a.collection is None:
        _check_trace(ap, a, checked["layers"], None)
    try:
        col, saved = _collection(
            prog, a, checked, out / "collection.npz",
            before_engine=lambda prompts: _check_trace(ap, a, checked["layers"], len(_doc_keys(prompts))),
            on_loaded=lambda c: _check_trace(ap, a, c["meta"]["layers"], len(_doc_keys(c["samples"]))))
    except TaskLoadError as e:
        ap.error(f"--tasks {a.tasks}: {e}")

    def finish():
        prof = summarize_profile(col, a.trace_layer, a.trace_sample)
        out.mkdir(parents=True, exist_ok=True)
        (out / "profile.json").write_text(json.dumps(prof, indent=1) + "\n")
        return prof, plot_layers(prof, out / "profile_layers.png"), plot_trace(prof, out / "profile_trace.png")

    ok, res = _late_step(prog, saved, finish)
    if not ok:
        return 1
    prof, p1, p2 = res
    for m, st in prof["modes"].items():
        print(f"{prog}: {m}: {st['n_samples']} samples, {st['n_tokens']} generated tokens", file=sys.stderr)
    print(f"{prog}: wrote {out / 'profile.json'}, {p1}, {p2}" + (f" (generations: {saved})" if saved else ""),
          file=sys.stderr)
    return 0


def main_calibrate(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="telltale calibrate", description="Per-layer norm quantiles of generated "
                                 "tokens, written as a tau_mode=calibrated file (also a config= preset).")
    _common_args(ap, "default")
    ap.add_argument("--out", required=True, help="output file (.yaml, or .json); the raw generations go next to it "
                                                 "as <name>.collection.npz")
    ap.add_argument("--quantiles", default=",".join(f"{q:g}" for q in CALIB_QUANTILES),
                    help="comma-separated quantiles in (0, 1)")
    ap.add_argument("--tau-q", type=float, default=TAU_Q, help="the quantile the file selects when used as config= "
                                                             "(one of --quantiles)")
    a = ap.parse_args(argv)
    prog = "telltale calibrate"
    try:
        qs = tuple(float(x) for x in a.quantiles.split(",") if x.strip())
    except ValueError:
        ap.error(f"--quantiles {a.quantiles!r}: comma-separated numbers in (0, 1), e.g. 0.5,0.9,0.95")
    if not qs or not all(0 < q < 1 for q in qs):
        ap.error(f"--quantiles {a.quantiles!r}: every quantile must be in (0, 1)")
    if not 0 < a.tau_q < 1:
        ap.error(f"--tau-q must be in (0, 1), got {a.tau_q}")
    if not any(abs(q - a.tau_q) < 1e-9 for q in qs):
        ap.error(f"--tau-q {a.tau_q:g} must be one of --quantiles {','.join(f'{q:g}' for q in qs)}")
    checked = _validate(ap, a)
    out = Path(a.out).expanduser()
    side = out.with_name(out.stem + ".collection.npz") if out.suffix else out.with_name(out.name + ".collection.npz")
    dests = [("--out", out)] + ([] if a.collection else [("--out (its .collection.npz)", side)])
    for flag, path in dests:
        why = unwritable(path, is_dir=False)
        if why:
            ap.error(f"{flag} {a.out}: {why}")
    _refuse_inputs(ap, a, dests)
    try:
        col, saved = _collection(prog, a, checked, side)
    except TaskLoadError as e:
        ap.error(f"--tasks {a.tasks}: {e}")

    def finish():
        data = calibration_data(col, qs, a.tau_q)
        return data, write_calibration(data, out)

    ok, res = _late_step(prog, saved, finish)
    if not ok:
        return 1
    data, p = res
    print(f"{prog}: {data['calibration']['n_samples']} samples, layers "
          f"{min(data['calibration']['quantiles'])}..{max(data['calibration']['quantiles'])}; wrote {p}"
          + (f" (generations: {saved})" if saved else ""), file=sys.stderr)
    return 0
