"""``telltale bench``: decode throughput of each model type against stock vLLM on the same
prompts and engine flags. The report gives tokens/s, the ratio to stock, intervention rates and
ALRR's compute limit.

::

    telltale bench --model PATH [--methods vllm,norms,suppress,alrr,erss,lrs] [--batch-sizes 1,8,32,64]
                   [--max-tokens 256] [--repeats 3] [--eager] [--alternate] [--out DIR]

**Cells.** Each (method, batch size, repeat) is one *cell*. A cell gets a fresh engine in its own
process (``python -m lm_eval_telltale.tools.bench --worker SPEC``), so neither a compile cache in
memory nor an allocator state nor the vLLM environment carries over. The order is
``for repeat: for batch: for method``, so the repeats are interleaved across methods and any
drift of the machine hits every method alike. A cell:

1. builds the engine the way the lm-eval model types do. For a telltale method that is
   :func:`lm_eval_telltale.config.resolve` followed by
   :func:`lm_eval_telltale.vllm.assemble_engine_args` with ``salted_requests=True`` (every request gets
   its own ``cache_salt``). For ``vllm`` it is plain ``LLM(...)``. Every method receives the same
   common flags: ``--dtype``, ``--eager``, ``--engine-args``, seed, ``max_model_len`` =
   prompt + max tokens, ``max_num_seqs`` = the largest request count at this batch size, and on
   the CPU engine a KV cache sized for those requests. The time to build the engine (including
   torch.compile and CUDA-graph capture) is reported as *start-up*;
2. runs an untimed warm-up ``generate`` of B other prompts × 16 tokens, which covers first-shape
   effects;
3. times one run of B requests × ``--max-tokens`` with ``ignore_eos=True`` and temperature 0,
   stepping the engine (:func:`timed_run`: as ``LLM.generate`` does, but with each step's new
   tokens reported, which one run of the bench pays for every method alike). The B prompts are distinct,
   ``--prompt-len`` tokens each, and identical in every cell. **Decode tokens/s** = the tokens
   generated after every request had its first token ÷ the time after that moment: the
   throughput without the prompts' prefill, which is what the ratios compare. **End-to-end
   tokens/s** (all generated tokens ÷ the whole run, prefill included) is reported beside it;
4. for a telltale method, collects the requests' statistics (``telltale_collect``; not timed) and
   the method's counters (``telltale_state``).

**``--alternate``** measures differently where the machine drifts more than the effect (small
models, short steps, batch 1): at each batch size one engine per method is started (one after
another, each in its own process, built and warmed up as above) and all stay up; then
``--repeats`` rounds each time one run of every method, the order rotated by one per round. A
method's repeats are its rounds, and each round's paired ratio compares runs seconds apart
instead of cells minutes apart. Every method's engine is in memory at once, so this suits models
that fit several times over (on a GPU, rarely). Start-up is measured once per engine.

**LRS** is measured for its scoring overhead. At batch size B, ``vllm-lrs`` runs B prompts × N
candidates (N = ``n_candidates``, default 4), i.e. B·N independent sampled requests. Each
request is seeded per candidate (T 0.7, top-p 0.8, top-k 20: the reference demo's settings, as
in the ``telltale-arith`` preset), with the norms and DeepConf confidence recorded as in
``vllm-lrs``. Its ratio is taken against ``vllm-sampled``: stock vLLM running the same B·N
requests with the same seeds and sampling settings. The N-fold sampling is therefore in both,
and the ratio is the cost of recording and scoring. The selection itself (an argmax per prompt,
in the driver) is negligible and not timed. On the CPU engine both run with chunked prefill off
(``max_num_batched_tokens = max(max_model_len, max_num_seqs)``). ``vllm-lrs`` needs this for seeded requests on
vLLM 0.32's CPU runner, and stock vLLM fails the same way without it.

**Ratio** = median decode tokens/s of the method ÷ median decode tokens/s of its stock baseline
at the same batch size (``--engine hf`` cells time one ``generate`` call, prefill included, and
their ratios are end-to-end). The per-repeat paired ratios are in the JSON. The telltale types also bring their
own engine settings (``engine_kwargs``: async scheduling off, the V1 model runner, and on GPU
piecewise CUDA graphs split at the telltale ops). Stock ``vllm`` keeps vLLM's defaults,
so on GPU the ratio includes what those settings cost. To give stock the same settings, pass
``--engine-args '{"async_scheduling": false}'`` and set ``VLLM_USE_V2_MODEL_RUNNER=0`` in the
environment. Each cell's effective settings are recorded in the JSON.

**ALRR's compute limit.** The re-run pushes rows through a patched layer a second time.
``Alrr.summary()`` counts the rows re-run in the timed call: every token row of a step with at
least one candidate, or of every step with ``skip_sync=false``. The limit is
stock tokens/s × L / (L + re-run rows per generated token), where L is the model's number of
layers. This is the throughput ALRR would reach if the extra layer passes were its only cost. It
counts layer passes over generated tokens only and ignores the prompt's.

**Knobs.** The defaults make the methods act on a random model: ``warmup=8`` for every method
(τ exists early), ALRR ``growth_eps=0``, ERSS ``low_k=4, cooldown=8, bank_k=8`` (the
``telltale-arith`` preset's values) and LRS ``n_candidates=4``. ``--knobs`` overrides them per
method (``{"alrr": {"growth_eps": 0.2}, "common": {"warmup": 64}}``).

**``--engine hf``** measures the ``hf-*`` types on transformers the same way: a cell loads the
model with ``from_pretrained`` (``--engine-args``: ``device`` and ``from_pretrained`` arguments),
the telltale methods generate with the hf adapter's loop (:mod:`lm_eval_telltale.hf.runtime`) and
the stock cells with transformers' own ``model.generate`` (``hf``, and ``hf-sampled`` for LRS),
``min_new_tokens`` = ``max_new_tokens`` in place of ``ignore_eos``. ``--eager`` does not apply.

Output: ``<out>/<model-name>.md`` (the exact command line at the top), ``.json`` (every cell)
and ``.png`` (the ratio to stock against batch size, one line per method, with a 1.0 line and
ALRR's compute limit). ``--plan`` checks every argument and prints the cells without starting
an engine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import select
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
STOCK = "vllm"
SAMPLED_STOCK = "vllm-sampled"  # stock vLLM with LRS's request shape (B prompts × N sampled candidates)
BENCH_METHODS = ("vllm", "norms", "suppress", "alrr", "erss", "lrs")
DEFAULTS = {"methods": ",".join(BENCH_METHODS), "batch_sizes": "1,8,32,64", "max_tokens": 256, "repeats": 3,
            "prompt_len": 64}
#: --quick: a smoke run (tests; checking a command line before the real run)
QUICK = {"batch_sizes": "2", "max_tokens": 16, "repeats": 1, "prompt_len": 16}
#: knobs that make every method act on a random model (docs above); --knobs overrides per key
DEFAULT_KNOBS: dict[str, dict[str, Any]] = {
    "common": {"warmup": 8},
    "alrr": {"growth_eps": 0.0},
    "erss": {"low_k": 4, "cooldown": 8, "bank_k": 8},
    "lrs": {"n_candidates": 4},
}
#: LRS's candidates and their stock comparator: the reference demo's sampling (telltale-arith preset)
LRS_SAMPLING = {"temperature": 0.7, "top_p": 0.8, "top_k": 20}
WARMUP_TOKENS = 16
#: --tiny-mid: a mid-size random model (Qwen3 layout, head_dim 64, GQA 4:1)
TINY_MID = {"num_layers": 16, "hidden": 1024, "heads": 16, "kv_heads": 4, "intermediate": 3072}
DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
#: intervention events shown per method (per 1k generated tokens)
SHOWN_EVENTS = {"norms": ("above_tau",), "lrs": ("above_tau",), "suppress": ("suppressed", "above_tau"),
                "alrr": ("recursed", "accepted"), "erss": ("injected", "banked")}


def label(method: str, engine: str = "vllm") -> str:
    """The model type a cell measures (``engine``: ``vllm`` or ``hf``, ``--engine``)."""
    return {STOCK: engine, SAMPLED_STOCK: f"{engine} (sampled, LRS's requests)"}.get(method, f"{engine}-{method}")


def stock_name(engine: str) -> str:
    return "transformers' generate" if engine == "hf" else "vLLM"


def baseline_of(method: str) -> str | None:
    """The stock cell a method's ratio is taken against (None for the stock cells themselves)."""
    if method in (STOCK, SAMPLED_STOCK):
        return None
    return SAMPLED_STOCK if method == "lrs" else STOCK


# -- argument checks (no engine) -----------------------------------------------------------------

def parse_methods(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise ValueError(f"no method names in {text!r}")
    bad = [m for m in names if m not in BENCH_METHODS]
    if bad:
        hint = " (model types are named without 'vllm-')" if any(m.startswith("vllm-") for m in bad) else ""
        raise ValueError(f"unknown method(s) {', '.join(map(repr, bad))}; one of {','.join(BENCH_METHODS)}{hint}")
    dup = sorted({m for m in names if names.count(m) > 1})
    if dup:
        raise ValueError(f"{', '.join(dup)} given twice")
    return names


def parse_batches(text: str) -> list[int]:
    out = []
    for tok in text.split(","):
        tok = tok.strip()
        if not tok:
            continue
        if not re.fullmatch(r"\d+", tok) or int(tok) < 1:
            raise ValueError(f"{tok!r} is not a positive integer (e.g. --batch-sizes 1,8,32,64)")
        out.append(int(tok))
    if not out:
        raise ValueError(f"no batch sizes in {text!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"a batch size is given twice in {text!r}")
    return sorted(out)


def cell_methods(methods: list[str]) -> tuple[list[str], list[str]]:
    """The methods that get cells (stock baselines added where a ratio needs them, vllm-sampled
    right after lrs) and the names added."""
    out, added = list(methods), []
    if STOCK not in out and any(m not in (STOCK, "lrs") for m in out):
        out.insert(0, STOCK)
        added.append(STOCK)
    if "lrs" in out:
        out.insert(out.index("lrs") + 1, SAMPLED_STOCK)
        added.append(SAMPLED_STOCK)
    return out, added


def json_object(text: str | None, flag: str) -> dict:
    if text is None:
        return {}
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag}: malformed JSON {text!r}: {e.msg} at column {e.colno}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{flag}: expected a JSON object {{...}}, got {text!r}")
    return obj


def method_args(knobs: dict, layers: str) -> dict[str, dict]:
    """The telltale settings of every method: defaults, then ``--knobs`` (``common`` first, then
    the method's own block), then ``--layers``."""
    for k, v in knobs.items():
        if k != "common" and k not in BENCH_METHODS[1:]:
            raise ValueError(f"--knobs: unknown block {k!r}; use 'common' or one of {', '.join(BENCH_METHODS[1:])}")
        if not isinstance(v, dict):
            raise ValueError(f"--knobs: block {k!r} must be a JSON object of knobs, got {v!r}")
    if "layers" in knobs.get("common", {}) or any("layers" in b for b in knobs.values()):
        raise ValueError("--knobs: give the layers with --layers")
    out = {}
    for m in BENCH_METHODS[1:]:
        out[m] = {"layers": layers, **DEFAULT_KNOBS["common"], **DEFAULT_KNOBS.get(m, {}),
                  **knobs.get("common", {}), **knobs.get(m, {})}
    return out


def kv_bytes_per_token(config: dict) -> int:
    """KV-cache bytes per token (float32 upper bound) from a model's config.json."""
    c = config.get("text_config") or config
    layers = int(c.get("num_hidden_layers") or 0)
    heads = int(c.get("num_attention_heads") or 1)
    kv = int(c.get("num_key_value_heads") or heads)
    head_dim = int(c.get("head_dim") or (int(c.get("hidden_size") or 0) // max(1, heads)))
    return 2 * layers * kv * head_dim * 4


def model_dtype(config: dict | None) -> str:
    """The dtype in the model's config.json ("auto" when it has none). vLLM's own "auto" is not
    the model's dtype everywhere: the CPU engine downcasts float32 checkpoints to bfloat16."""
    c = config or {}
    d = c.get("torch_dtype") or c.get("dtype") or (c.get("text_config") or {}).get("torch_dtype")
    return str(d).replace("torch.", "") if isinstance(d, str) and d else "auto"


def model_label(model: str) -> str:
    p = Path(model).expanduser()
    name = p.name if p.exists() else model.replace("/", "_")
    return re.sub(r"[^\w.+-]+", "_", name) or "model"


def build_prompts(tokenizer, n: int, length: int, tag: str) -> list[list[int]]:
    """``n`` distinct prompts of exactly ``length`` tokens: the request's number first (so no two
    share a prefix-cache block), then arithmetic word problems with their answers."""
    from ..tasksupport.localtask import ROWS

    out = []
    for i in range(n):
        ids = list(tokenizer(f"{i}. {tag}\n", add_special_tokens=False)["input_ids"])
        j = i
        while len(ids) < length:
            q, a = ROWS[j % len(ROWS)]
            j += 1
            ids += tokenizer(f"Question: {q}\nAnswer: {a}\n", add_special_tokens=False)["input_ids"]
        out.append([int(t) for t in ids[:length]])
    if len({tuple(p) for p in out}) != n:
        raise ValueError("the prompts are not distinct (prompt length too short?)")
    return out


# -- the report (pure: tested on crafted cells) -----------------------------------------------------

def _stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"median": None, "min": None, "max": None, "values": []}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": list(values)}


def build_report(cells: list[dict], meta: dict) -> dict:
    """One row per (method, batch size) from the cells (each: method, batch, repeat, ok, tps,
    generated_tokens, and for telltale methods ``interventions`` and ALRR's ``alrr`` counters);
    ``meta`` needs ``num_layers`` (L) and gives the method order and batch sizes."""
    L = int(meta["num_layers"])
    engine = meta.get("engine", "vllm")
    methods = meta.get("cell_methods") or list(dict.fromkeys(c["method"] for c in cells))
    batches = meta.get("batch_sizes") or sorted({c["batch"] for c in cells})
    ok = [c for c in cells if c.get("ok")]
    # the ratios' basis: decode tokens/s where every cell timed its decode apart (vLLM cells),
    # else end-to-end tokens/s (prefill included)
    key = "decode_tps" if ok and all(c.get("decode_tps") for c in ok) else "tps"
    meta = {**meta, "rate": "decode" if key == "decode_tps" else "end-to-end"}
    by = {}
    for c in ok:
        by.setdefault((c["method"], c["batch"]), []).append(c)
    rows = []
    for m in methods:
        for b in batches:
            cs = sorted(by.get((m, b), []), key=lambda c: c["repeat"])
            failed = [c for c in cells if c["method"] == m and c["batch"] == b and not c.get("ok")]
            row: dict[str, Any] = {"method": m, "label": label(m, engine), "batch": b, "repeats": len(cs),
                                   "failed": len(failed), "requests": cs[0]["requests"] if cs else None,
                                   "tps": _stats([c[key] for c in cs]),
                                   "e2e_tps": _stats([c["tps"] for c in cs]),
                                   "startup_s": _stats([c["startup_s"] for c in cs if c.get("startup_s") is not None]),
                                   "warmup_s": _stats([c["warmup_s"] for c in cs if c.get("warmup_s") is not None])}
            base = baseline_of(m)
            row["baseline"] = base
            row["ratio"] = row["paired_ratios"] = row["e2e_ratio"] = None
            if base is not None:
                bcs = {c["repeat"]: c for c in by.get((base, b), [])}
                bmed = _stats([c[key] for c in bcs.values()])["median"]
                if bmed and row["tps"]["median"] is not None:
                    row["ratio"] = row["tps"]["median"] / bmed
                row["paired_ratios"] = [c[key] / bcs[c["repeat"]][key] for c in cs
                                        if c["repeat"] in bcs and bcs[c["repeat"]][key]]
                row["baseline_tps"] = bmed
                be2e = _stats([c["tps"] for c in bcs.values()])["median"]
                if be2e and row["e2e_tps"]["median"] is not None:
                    row["e2e_ratio"] = row["e2e_tps"]["median"] / be2e
            events: dict[str, list[float]] = {}
            for c in cs:
                for name, v in (c.get("interventions") or {}).items():
                    events.setdefault(name, []).append(v)
            row["interventions_per_1k"] = {k: statistics.median(v) for k, v in events.items()}
            hooks = [c["hooks"] for c in cs if (c.get("hooks") or {}).get("ms_per_step") is not None]
            row["hook_ms_per_step"] = _stats([h["ms_per_step"] for h in hooks])["median"]
            row["hook_share"] = _stats([h["share"] for h in hooks if h.get("share") is not None])["median"]
            if m == "alrr":
                rr = [c["alrr"]["rerun_rows"] / c["generated_tokens"] for c in cs
                      if c.get("alrr") and c.get("generated_tokens")]
                row["rerun_rows_per_token"] = statistics.median(rr) if rr else None
                row["rerun_calls"] = [c["alrr"]["rerun_calls"] for c in cs if c.get("alrr")]
                if row["rerun_rows_per_token"] is not None:
                    lim = L / (L + row["rerun_rows_per_token"])
                    row["compute_limit_ratio"] = lim
                    bt = row.get("baseline_tps")
                    row["compute_limit_tps"] = bt * lim if bt else None
            rows.append(row)
    return {"meta": meta, "rows": rows, "cells": cells}


def _f(v, fmt: str = ".1f", dash: str = "–") -> str:
    return dash if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def _compilation_line(per_method: dict) -> str | None:
    """``mode X, cudagraph_mode Y`` with the methods that ran that way (one group when all agree)."""
    groups: dict[str, list[str]] = {}
    for m, c in per_method.items():
        if c:
            groups.setdefault(", ".join(f"{k} {v}" for k, v in c.items()), []).append(m)
    if len(groups) == 1:
        return f"{next(iter(groups))} (every method)"
    return "; ".join(f"{k} ({', '.join(ms)})" for k, ms in groups.items()) or None


def _kernels_of(cells: list[dict], engine: str) -> dict[str, dict[str, bool | None]]:
    """Per method (label): whether its core kernels ran compiled in every finished cell (``kernels``
    of :func:`_kernels`; a cell without them, a stock or hf one, is left out)."""
    out: dict[str, dict[str, bool | None]] = {}
    for c in cells:
        k = c.get("kernels") if c.get("ok") else None
        if not k:
            continue
        o = out.setdefault(label(c["method"], engine), {"core": True, "method": k.get("method")})
        o["core"] = o["core"] and bool(k.get("core"))
        if k.get("method") is not None:
            o["method"] = bool(o["method"]) and bool(k["method"])
    return out


def _kernels_line(per_method: dict) -> str | None:
    """How the telltale core's per-step work ran, per method: compiled (the threshold update, and
    the method's layer step where it has one), plain operations, or partly (a compile that failed
    and fell back)."""
    groups: dict[str, list[str]] = {}
    for m, k in per_method.items():
        core, meth = k.get("core"), k.get("method")
        if core and meth is not False:
            word = "compiled"
        elif not core and not meth:
            word = "plain operations"
        else:
            word = f"partly compiled (threshold update {'compiled' if core else 'plain'}, " \
                   f"layer step {'compiled' if meth else 'plain'})"
        groups.setdefault(word, []).append(m)
    if len(groups) == 1 and len(per_method) > 1:
        return f"{next(iter(groups))} (every telltale method)"
    return "; ".join(f"{w} ({', '.join(ms)})" for w, ms in groups.items()) or None


def render_markdown(rep: dict) -> str:
    meta, rows = rep["meta"], rep["rows"]
    out = [f"# telltale bench: {meta.get('model_name', '')}", "", "```", meta.get("command", ""), "```", ""]
    eng = meta.get("engine_info") or {}
    engine = meta.get("engine", "vllm")
    stock = stock_name(engine)
    versions = meta.get("versions", {})
    facts = [
        ("model", f"`{meta.get('model')}` ({meta.get('architecture')}, {meta.get('num_layers')} layers)"),
        ("device", eng.get("device")),
        ("vLLM / torch", f"{versions.get('vllm')} / {versions.get('torch')}") if engine == "vllm" else
        ("transformers / torch", f"{versions.get('transformers')} / {versions.get('torch')}"),
        ("dtype", eng.get("dtype")),
        ("compilation", _compilation_line(meta.get("compilation") or {})),
        ("telltale's per-step kernels", _kernels_line(meta.get("kernels") or {})),
        ("requests", f"B distinct prompts × {meta.get('prompt_len')} tokens, {meta.get('max_tokens')} generated tokens "
                     f"each (ignore_eos), greedy; LRS: B prompts × {meta.get('n_candidates')} sampled candidates "
                     f"({', '.join(f'{k} {v}' for k, v in (meta.get('lrs_sampling') or {}).items())})"),
        ("repeats", (f"{meta.get('repeats')} rounds of alternating timed runs: per batch size one engine per method, "
                     "all alive at once; each round times every method once, the order rotated"
                     if meta.get("alternate") else
                     f"{meta.get('repeats')}, interleaved across methods; a fresh engine per cell")
                    + (" (in-process engine core)" if meta.get("inprocess") and engine == "vllm" else "")),
        ("engine flags (every method)", f"`{json.dumps(meta.get('common_engine_args') or {})}`"),
        ("telltale settings", "; ".join(f"{m}: `{json.dumps(v, sort_keys=True)}`"
                                        for m, v in (meta.get("method_args") or {}).items()
                                        if m in (meta.get("cell_methods") or []))),
        ("patched layers", ", ".join(f"{m} {v}" for m, v in (meta.get("telltale_layers") or {}).items()) or None),
        ("finished", meta.get("finished")),
    ]
    out += [f"- {k}: {v}" for k, v in facts if v not in (None, "", "None / None")]
    if meta.get("status") and meta["status"] != "complete":
        out.append(f"- **status: {meta['status']}**")
    decode = meta.get("rate") == "decode"
    out += ["", f"| method | batch | requests | {'decode ' if decode else ''}tok/s median | min | max | ratio to stock | "
                + ("end-to-end tok/s (ratio) | " if decode else "")
                + "interventions /1k tokens | telltale hooks ms/step (share of run) | re-run rows / token | "
                  "ALRR compute limit | start-up s |",
            "|---|--:|--:|--:|--:|--:|--:|" + ("--:|" if decode else "") + "---|--:|--:|--:|--:|"]
    for r in rows:
        t = r["tps"]
        ratio = _f(r["ratio"], ".3f") if r["baseline"] else "(baseline)"
        if r.get("paired_ratios") and len(r["paired_ratios"]) > 1:
            ratio += f" ({min(r['paired_ratios']):.3f}–{max(r['paired_ratios']):.3f})"
        shown = SHOWN_EVENTS.get(r["method"], ())
        ev = ", ".join(f"{k.replace('_', ' ')} {r['interventions_per_1k'][k]:.1f}" for k in shown
                       if k in r["interventions_per_1k"]) or "–"
        lim = "–"
        if r.get("compute_limit_ratio") is not None:
            lim = f"{r['compute_limit_ratio']:.3f} ({_f(r.get('compute_limit_tps'))} tok/s)"
        fail = f" ({r['failed']} failed)" if r["failed"] else ""
        hook = _f(r.get("hook_ms_per_step"), ".2f")
        if r.get("hook_share") is not None:
            hook += f" ({100 * r['hook_share']:.1f}%)"
        e2e = ""
        if decode:
            e2e = f"{_f((r.get('e2e_tps') or {}).get('median'))}"
            if r["baseline"]:
                e2e += f" ({_f(r.get('e2e_ratio'), '.3f')})"
            e2e += " | "
        out.append(f"| {r['label']}{fail} | {r['batch']} | {_f(r['requests'], 'd')} | {_f(t['median'])} | "
                   f"{_f(t['min'])} | {_f(t['max'])} | {ratio} | {e2e}{ev} | {hook} | "
                   f"{_f(r.get('rerun_rows_per_token'), '.2f')} | {lim} | {_f(r['startup_s']['median'])} |")
    rate_note = (
        "- decode tok/s: the tokens generated after every request of the cell had its first token ÷ the time after "
        "that moment, in one timed run of all the cell's requests (the engine stepped, each step's new tokens "
        "reported): "
        "throughput without the prompts' prefill. Engine start-up, compilation and a warm-up call are excluded "
        "(start-up shown apart); median, min and max over the repeats. End-to-end tok/s: all generated tokens ÷ "
        "the whole run, prefill included (in parentheses: its ratio to stock)."
        if decode else
        f"- tok/s: generated tokens ÷ wall time of one `{'LLM.' if engine == 'vllm' else ''}generate` call of all "
        "the cell's requests (their prefill included; engine start-up, compilation and a warm-up call excluded, "
        "start-up shown apart); median, min and max over the repeats.")
    out += ["", rate_note,
            f"- ratio to stock: median {'decode ' if decode else ''}tok/s ÷ the same of stock {stock} at the same "
            "batch size with the same "
            f"prompts and engine flags (in parentheses: the range of the per-repeat paired ratios). {engine}-lrs is "
            f"compared with stock {stock} running the same B × N seeded sampled requests, so the ratio is the cost of "
            "recording and scoring, not of sampling N candidates.",
            "- interventions: events per 1,000 generated tokens, summed over the patched layers (median over repeats).",
            "- telltale hooks: the host time spent in the telltale hooks' bodies (the step's map and τ, each patched "
            "layer's norm and method — ALRR's re-runs included —, the threshold update and the step's rows; LRS's "
            "logits) per engine step, and its share of the timed run's wall time (median over repeats): telltale's "
            "own cost, read without the run-to-run noise of the throughput ratio. It leaves out the custom op's "
            "dispatch and the engine settings the types change. On an accelerator it includes the one wait for the "
            "device at each step's end (the selection of the step's rows), so there it bounds the cost from above."
            if engine == "vllm" else None,
            f"- ALRR compute limit: stock tok/s × L / (L + re-run rows per generated token), L = "
            f"{meta.get('num_layers')}: the throughput if the re-run's extra layer passes were ALRR's only cost "
            "(a re-run pushes every token row of its step through the layer again).",
            "- the telltale types run with their own engine settings (async scheduling off, the V1 model runner; on "
            "GPU piecewise CUDA graphs split at the telltale ops); stock vLLM keeps its defaults unless "
            "--engine-args / the environment say otherwise. Each cell's effective settings are in the JSON."
            if engine == "vllm" else
            "- the hf-* types generate with the hf adapter's own loop (the patched layers' hooks, a DynamicCache, "
            "finished rows leaving the batch); stock is transformers' model.generate on the same batch."]
    return "\n".join(line for line in out if line is not None) + "\n"


def plot_report(rep: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import save_figure

    rows = rep["rows"]
    meta = rep["meta"]
    engine = meta.get("engine", "vllm")
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    methods = [m for m in (meta.get("cell_methods") or []) if baseline_of(m)]
    for m in methods:
        pts = [(r["batch"], r["ratio"], r.get("paired_ratios") or []) for r in rows
               if r["method"] == m and r["ratio"] is not None]
        if not pts:
            continue
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        lo = [max(0.0, y - min(pr)) if pr else 0.0 for _x, y, pr in pts]
        hi = [max(0.0, max(pr) - y) if pr else 0.0 for _x, y, pr in pts]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=label(m, engine))
    lim = [(r["batch"], r["compute_limit_ratio"]) for r in rows
           if r["method"] == "alrr" and r.get("compute_limit_ratio") is not None]
    if lim:
        ax.plot([p[0] for p in lim], [p[1] for p in lim], ls="--", color="grey", marker="x",
                label="ALRR compute limit L/(L + re-run rows/token)")
    ax.axhline(1.0, color="black", lw=0.8, ls=":", label=f"stock {stock_name(engine)}")
    batches = meta.get("batch_sizes") or sorted({r["batch"] for r in rows})
    if len(batches) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xticks(batches)
    ax.set_xticklabels([str(b) for b in batches])
    ax.set_xlabel("batch size (requests; LRS: prompts, each × N candidates)")
    ax.set_ylabel(f"{'decode ' if meta.get('rate') == 'decode' else ''}tokens/s ÷ stock {stock_name(engine)}")
    ax.set_title(f"telltale bench: {meta.get('model_name')} (median of {meta.get('repeats')}, range: paired repeats)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def write_report(rep: dict, out_dir: Path, name: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / f"{name}.md", "json": out_dir / f"{name}.json", "png": out_dir / f"{name}.png"}
    paths["md"].write_text(render_markdown(rep))
    paths["json"].write_text(json.dumps(rep, indent=1, default=str) + "\n")
    plot_report(rep, paths["png"])
    return paths


# -- the driver --------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="telltale bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Details: the module docstring of lm_eval_telltale/tools/bench.py.")
    ap.add_argument("--model", help="model directory or Hugging Face id")
    ap.add_argument("--tiny-mid", metavar="DIR", help="build (or reuse) a mid-size random model in DIR (Qwen3 layout, "
                    f"{TINY_MID['num_layers']} layers, hidden {TINY_MID['hidden']}, {TINY_MID['heads']} heads, "
                    f"{TINY_MID['kv_heads']} KV heads, intermediate {TINY_MID['intermediate']}) and benchmark it")
    ap.add_argument("--model-name", help="label of the report and its file names (default: the model directory's name)")
    ap.add_argument("--methods", help=f"comma-separated, of {','.join(BENCH_METHODS)} (default: all); the stock "
                                      "baselines the ratios need are added")
    ap.add_argument("--batch-sizes", help=f"comma-separated (default {DEFAULTS['batch_sizes']})")
    ap.add_argument("--max-tokens", type=int, help=f"generated tokens per request (default {DEFAULTS['max_tokens']})")
    ap.add_argument("--prompt-len", type=int, help=f"prompt tokens per request (default {DEFAULTS['prompt_len']})")
    ap.add_argument("--repeats", type=int, help=f"cells per (method, batch) (default {DEFAULTS['repeats']})")
    ap.add_argument("--engine", default="vllm", choices=["vllm", "hf"],
                    help="vllm (default): the vllm-* types vs stock vLLM; hf: the hf-* types on transformers vs "
                         "transformers' generate (--engine-args: device and from_pretrained arguments)")
    ap.add_argument("--eager", action="store_true", help="enforce_eager=True for every method (no compilation)")
    ap.add_argument("--dtype", default=None, choices=DTYPES, help="model dtype (default: the one in the model's config.json; "
                    "vLLM's 'auto' downcasts float32 to bfloat16 on the CPU engine)")
    ap.add_argument("--layers", default="auto", help="telltale patched layers (default auto)")
    ap.add_argument("--knobs", help="JSON: per-method knobs over the defaults, e.g. "
                                    "'{\"alrr\": {\"growth_eps\": 0.2}, \"common\": {\"warmup\": 64}}'")
    ap.add_argument("--engine-args", help="JSON: more LLM(...) arguments, the same for every method")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="CPU threads per engine: OMP_NUM_THREADS, and VLLM_CPU_OMP_THREADS_BIND="
                                                "nobind unless set (vLLM's CPU default binds one thread to every core, "
                                                "which collapses when other processes share the cores)")
    ap.add_argument("--inprocess", action="store_true", help="run the engine core inside the cell's process "
                    "(VLLM_ENABLE_V1_MULTIPROCESSING=0: faster start-up; default: vLLM's multiprocess engine)")
    ap.add_argument("--alternate", action="store_true", help="keep one engine per method alive at each batch size "
                    "and alternate their timed runs: each of --repeats rounds times every method once, the order "
                    "rotated (drift between runs cancels; every method's engine is in memory at once)")
    ap.add_argument("--cell-timeout", type=float, default=1800.0, help="seconds per cell (default 1800; with "
                    "--alternate per engine start and per timed run)")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench"), help="report directory (default results/bench)")
    ap.add_argument("--work", default=str(ROOT / ".cache" / "bench"), help="cell specs, results and logs")
    ap.add_argument("--quick", action="store_true", help="smoke run: batch 2, 16 tokens, 16-token prompts, 1 repeat, "
                                                         "in-process engine, 1 thread (explicit flags still win)")
    ap.add_argument("--plan", action="store_true", help="check every argument, print the cells, start no engine")
    return ap


def _validate(ap: argparse.ArgumentParser, a: argparse.Namespace) -> dict[str, Any]:
    """Every check that needs no engine (``ap.error``: exit 2 naming the flag)."""
    for k, v in DEFAULTS.items():
        if getattr(a, k) is None:
            setattr(a, k, QUICK.get(k, v) if a.quick else v)
    if a.quick:
        a.inprocess = True
        if a.threads is None:  # vLLM's default binding spins every core: a disaster on a shared machine
            a.threads = 1
    if a.engine == "hf":  # the stock cell is transformers' generate, named "hf" there
        a.methods = ",".join("vllm" if m.strip() == "hf" else m for m in a.methods.split(","))
    try:
        methods = parse_methods(a.methods)
    except ValueError as e:
        ap.error(f"--methods: {e}")
    try:
        batches = parse_batches(a.batch_sizes)
    except ValueError as e:
        ap.error(f"--batch-sizes: {e}")
    for flag, v, lo in (("--max-tokens", a.max_tokens, 1), ("--prompt-len", a.prompt_len, 1),
                        ("--repeats", a.repeats, 1), ("--threads", a.threads, 1)):
        if v is not None and v < lo:
            ap.error(f"{flag} must be >= {lo}, got {v}")
    if not a.cell_timeout > 0:
        ap.error(f"--cell-timeout must be > 0, got {a.cell_timeout}")
    if a.engine == "hf" and a.eager:
        ap.error("--eager is a vLLM setting; --engine hf runs transformers eagerly")
    if a.engine == "hf" and a.alternate:
        ap.error("--alternate drives vLLM engines; --engine hf times one generate call per cell")
    try:
        knobs = json_object(a.knobs, "--knobs")
        engine_args = json_object(a.engine_args, "--engine-args")
        margs = method_args(knobs, a.layers)
    except ValueError as e:
        ap.error(str(e))
    if "model" in engine_args:
        ap.error("--engine-args: give the model with --model")
    if a.engine == "vllm":  # --engine hf: device and any from_pretrained argument
        from .checks import unknown_engine_args

        why = unknown_engine_args(engine_args)
        if why:
            ap.error(f"--engine-args: {why}")
    if (a.model is None) == (a.tiny_mid is None):
        ap.error("give exactly one of --model PATH and --tiny-mid DIR")
    out = Path(a.out).expanduser()
    if out.exists() and not out.is_dir():
        ap.error(f"--out {a.out}: exists and is not a directory")
    build_mid = False
    if a.tiny_mid is not None:
        d = Path(a.tiny_mid).expanduser()
        if d.exists() and not d.is_dir():
            ap.error(f"--tiny-mid {a.tiny_mid}: exists and is not a directory")
        a.model = str(d)
        if a.model_name is None:
            a.model_name = f"tiny-mid-{TINY_MID['num_layers']}L-{TINY_MID['hidden']}h"
        build_mid = not (d / "config.json").is_file()  # built after every other check passed
    from ..config import ConfigError, resolve
    from ..vllm import UnsupportedModelError, inspect_model

    if build_mid:  # the config the build will write, as far as the checks need it
        arch, n_layers = "Qwen3ForCausalLM", TINY_MID["num_layers"]
        config = {"num_hidden_layers": n_layers, "hidden_size": TINY_MID["hidden"], "head_dim": 64,
                  "num_attention_heads": TINY_MID["heads"], "num_key_value_heads": TINY_MID["kv_heads"],
                  "dtype": "float32", "max_position_embeddings": 4096}
    else:
        try:
            arch, n_layers = inspect_model(a.model)
        except UnsupportedModelError as e:
            ap.error(f"--model: {e}")
        f = Path(a.model).expanduser() / "config.json"
        if f.is_file():
            config = json.loads(f.read_text())
        else:  # a Hugging Face id (inspect_model read it already: from the cache, or the Hub)
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(a.model).to_dict()
    cells_m, added = cell_methods(methods)
    cfgs = {}
    for m in dict.fromkeys(x for x in cells_m if x in margs):
        try:
            cfgs[m] = resolve(m, dict(margs[m]), n_layers, seed=a.seed)
        except ConfigError as e:
            ap.error(f"--knobs/--layers for {m}: {e}")
    n_cand = cfgs["lrs"].params["n_candidates"] if "lrs" in cfgs else int(margs["lrs"]["n_candidates"])
    max_len = a.prompt_len + a.max_tokens
    mpe = (config or {}).get("max_position_embeddings") or ((config or {}).get("text_config") or {}).get(
        "max_position_embeddings")
    if mpe and max_len > int(mpe) and "max_model_len" not in engine_args:
        ap.error(f"--prompt-len + --max-tokens = {max_len} exceeds the model's max_position_embeddings {mpe}")
    name = a.model_name or model_label(a.model)
    if not re.fullmatch(r"[\w.+-]+", name):
        ap.error(f"--model-name {name!r}: use letters, digits, '.', '_', '+', '-' (it names the report files)")
    if build_mid and not a.plan:
        from .tiny import build_tiny_model

        print(f"[bench] building the mid-size random model in {a.model} ({TINY_MID})", flush=True)
        build_tiny_model(a.model, "qwen3", **TINY_MID)
    return {"methods": methods, "cell_methods": cells_m, "added": added, "batches": batches, "knobs": knobs,
            "engine_args": engine_args, "method_args": {m: margs[m] for m in cfgs}, "cfgs": cfgs, "arch": arch,
            "num_layers": n_layers, "n_candidates": n_cand, "config": config, "name": name, "max_len": max_len}


def requests_of(method: str, batch: int, n_candidates: int) -> int:
    return batch * n_candidates if method in ("lrs", SAMPLED_STOCK) else batch


def common_engine_args(a, chk: dict, batch: int) -> tuple[dict, int]:
    """(LLM kwargs shared by every method at this batch size, the CPU engine's KV-cache bytes)."""
    most = max(requests_of(m, batch, chk["n_candidates"]) for m in chk["cell_methods"])
    kw: dict[str, Any] = {"model": a.model, "seed": a.seed, "dtype": a.dtype or model_dtype(chk["config"]),
                          "max_model_len": chk["max_len"], "max_num_seqs": most}
    if a.eager:
        kw["enforce_eager"] = True
    kw.update(chk["engine_args"])
    per_tok = kv_bytes_per_token(chk["config"] or {}) or 64 * 1024
    blocks = most * (math.ceil(int(kw["max_model_len"]) / 16) + 1) * 16
    kv = max(32 << 20, int(per_tok * blocks * 1.2) + (16 << 20))
    return kw, kv


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in ("vllm", "torch", "transformers"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out


def _tail(path: Path, n: int = 25) -> str:
    try:
        return "".join(path.read_text(errors="replace").splitlines(True)[-n:])
    except OSError:
        return ""


def run_cell(cmd: list[str], log: Path, env: dict, timeout: float) -> int | str:
    """One cell's process, in its own process group: on a timeout or Ctrl-C the whole group goes
    (a multiprocess engine's core process with it). Returns the exit status or "timeout"."""
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except BaseException as e:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            if isinstance(e, subprocess.TimeoutExpired):
                return "timeout"
            raise


class LiveCell:
    """``--alternate``: one cell's engine process kept up for several timed runs, driven through its
    stdin (``run K``, ``quit``) and answering on a pipe of its own (``ready``, ``done K``), so that
    vLLM's output on stdout/stderr can go to the log. Its own process group, as :func:`run_cell`."""

    def __init__(self, spec: dict, spec_path: Path, log: Path, env: dict):
        rfd, wfd = os.pipe()
        spec_path.write_text(json.dumps({**spec, "control_fd": wfd}))
        self.log = log
        with log.open("wb") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "lm_eval_telltale.tools.bench", "--worker", str(spec_path)],
                                         stdin=subprocess.PIPE, stdout=f, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True, pass_fds=(wfd,))
        os.close(wfd)
        self.rfd = rfd
        self.buf = b""

    def send(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def expect(self, word: str, timeout: float) -> bool:
        """Wait for the line ``word``; False if the process ended or went silent for ``timeout`` s."""
        end = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self.rfd], [], [], left)[0]:
                return False
            chunk = os.read(self.rfd, 4096)
            if not chunk:
                return False
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode().strip() == word

    def close(self, timeout: float = 60.0) -> None:
        try:
            if self.proc.poll() is None:
                self.send("quit")
            self.proc.wait(timeout=timeout)
        except (OSError, subprocess.TimeoutExpired):
            pass
        finally:
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
            os.close(self.rfd)


def rotated(methods: list[str], r: int) -> list[str]:
    """``--alternate``: the order of round ``r`` (rotated by one per round)."""
    k = r % len(methods)
    return methods[k:] + methods[:k]


def _run_alternating(a, batches: list[int], cms: list[str], spec_of, work: Path, env: dict, cells: list) -> str:
    """``--alternate``: per batch size, start one engine per method (one after another, each until
    its warm-up is done), then ``--repeats`` rounds; a round times one run of every method, the
    order rotated by one each round. Appends a cell per (round, method) to ``cells``; returns the
    status."""
    status = "complete"
    for b in batches:
        live: dict[str, LiveCell] = {}
        results: dict[str, str] = {}  # per method: its result file, "{k}" standing for the round
        try:
            for m in cms:
                stem = f"b{b}-{m}"
                spec = spec_of(None, b, m, stem + ".r{k}")
                results[m] = spec["result_path"]
                head = f"[bench] batch {b}, {label(m, a.engine)}"
                print(f"{head}: starting the engine ...", flush=True)
                t0 = time.time()
                cell = LiveCell(spec, work / f"{stem}.spec.json", work / f"{stem}.log", env)
                if cell.expect("ready", a.cell_timeout):
                    live[m] = cell
                    print(f"{head}: ready ({time.time() - t0:.0f} s)", flush=True)
                else:
                    print(f"{head}: FAILED to start; last lines of {cell.log}:\n{_tail(cell.log)}", file=sys.stderr,
                          flush=True)
                    cell.close(timeout=5)
            for r in range(a.repeats):
                for m in rotated(cms, r):
                    cell = {"method": m, "batch": b, "repeat": r, "ok": False, "log": str(work / f"b{b}-{m}.log")}
                    cells.append(cell)
                    lc = live.get(m)
                    if lc is None:
                        cell["error"] = "engine not running"
                        status = "some cells failed"
                        continue
                    res_path = Path(results[m].replace("{k}", str(r)))
                    res_path.unlink(missing_ok=True)
                    head = f"[bench] round {r + 1}/{a.repeats}, batch {b}, {label(m, a.engine)}"
                    try:
                        lc.send(f"run {r}")
                        ok = lc.expect(f"done {r}", a.cell_timeout) and res_path.is_file()
                    except OSError:
                        ok = False
                    if ok:
                        cell.update(json.loads(res_path.read_text()))
                        cell["ok"] = True
                        print(f"{head}: {cell['tps']:.1f} tok/s ({cell['generated_tokens']} tokens in "
                              f"{cell['wall_s']:.2f} s)", flush=True)
                    else:
                        cell["error"] = "the engine stopped or timed out"
                        print(f"{head}: FAILED ({cell['error']}); last lines of {lc.log}:\n{_tail(lc.log)}",
                              file=sys.stderr, flush=True)
                        status = "some cells failed"
                        lc.close(timeout=5)
                        live.pop(m)
        finally:
            for lc in live.values():
                lc.close()
    return status


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1:])
    ap = _parser()
    a = ap.parse_args(argv)
    chk = _validate(ap, a)
    command = shlex.join(["telltale", "bench", *argv])
    batches, cms, R = chk["batches"], chk["cell_methods"], a.repeats
    plan = ([(r, b, m) for b in batches for r in range(R) for m in rotated(cms, r)] if a.alternate else
            [(r, b, m) for r in range(R) for b in batches for m in cms])
    if chk["added"]:
        print(f"[bench] added the stock baseline cell(s) the ratios need: {', '.join(chk['added'])}")
    print(f"[bench] {a.model} ({chk['arch']}, {chk['num_layers']} layers): {len(plan)} cells = {R} repeat(s) × "
          f"batch {','.join(map(str, batches))} × {','.join(cms)}; {a.prompt_len}-token prompts, {a.max_tokens} tokens "
          f"per request" + (f"; LRS: {chk['n_candidates']} candidates per prompt" if "lrs" in cms else ""), flush=True)
    for b in batches:
        kw, kv = common_engine_args(a, chk, b)
        print(f"[bench]   batch {b}: engine flags {json.dumps(kw)} (+ CPU engine: kv_cache_memory_bytes={kv} "
              f"unless given)")
    for m, v in chk["method_args"].items():
        print(f"[bench]   {m}: {json.dumps(v, sort_keys=True)} → layers {chk['cfgs'][m].layers}")
    if a.alternate:
        print(f"[bench] --alternate: at each batch size {len(cms)} engines (one per method) stay up together for "
              f"{R} round(s) of timed runs", flush=True)
    if a.plan:
        for i, (r, b, m) in enumerate(plan, 1):
            print(f"[bench]   cell {i}: repeat {r + 1}, batch {b}, {label(m, a.engine)} "
                  f"({requests_of(m, b, chk['n_candidates'])} "
                  "requests)")
        print(f"[bench] --plan: would write {Path(a.out) / chk['name']}.md/.json/.png; no engine started")
        return 0

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.model)
    nmax = max(batches)
    prompts = build_prompts(tok, nmax, a.prompt_len, "Benchmark request")
    warm = build_prompts(tok, nmax, a.prompt_len, "Warm-up request")
    work = Path(a.work).expanduser() / chk["name"]
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if a.inprocess:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    else:
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    if a.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(a.threads)
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    started = time.strftime("%Y-%m-%d %H:%M:%S")

    def spec_of(r: int | None, b: int, m: str, stem: str) -> dict[str, Any]:
        kw, kv = common_engine_args(a, chk, b)
        return {"method": m, "engine_kind": a.engine, "batch": b, "repeat": r, "arch": chk["arch"],
                "num_layers": chk["num_layers"],
                "engine": kw, "cpu_kv_bytes": kv, "user_engine_keys": sorted(chk["engine_args"]),
                "tt_args": chk["method_args"].get(m), "seed": a.seed, "threads": a.threads,
                "prompts": prompts[:b], "warm_prompts": warm[:b], "max_tokens": a.max_tokens,
                "warm_tokens": min(a.max_tokens, WARMUP_TOKENS),
                "n_candidates": chk["n_candidates"] if m in ("lrs", SAMPLED_STOCK) else 1,
                "sampling": LRS_SAMPLING if m in ("lrs", SAMPLED_STOCK) else None,
                "result_path": str(work / f"{stem}.result.json")}

    cells: list[dict] = []
    status = "complete"
    try:
        if a.alternate:
            status = _run_alternating(a, batches, cms, spec_of, work, env, cells)
        for i, (r, b, m) in enumerate([] if a.alternate else plan, 1):
            stem = f"r{r + 1}-b{b}-{m}"
            spec = spec_of(r, b, m, stem)
            spec_path = work / f"{stem}.spec.json"
            spec_path.write_text(json.dumps(spec))
            res_path = Path(spec["result_path"])
            res_path.unlink(missing_ok=True)
            log = work / f"{stem}.log"
            head = f"[bench] ({i}/{len(plan)}) repeat {r + 1}/{R}, batch {b}, {label(m, a.engine)}"
            print(f"{head} ...", flush=True)
            t0 = time.time()
            rc = run_cell([sys.executable, "-m", "lm_eval_telltale.tools.bench", "--worker", str(spec_path)], log, env,
                          a.cell_timeout)
            cell = {"method": m, "batch": b, "repeat": r, "ok": False, "log": str(log)}
            if rc == 0 and res_path.is_file():
                cell.update(json.loads(res_path.read_text()))
                cell["ok"] = True
                print(f"{head}: {cell['tps']:.1f} tok/s ({cell['generated_tokens']} tokens in {cell['wall_s']:.2f} s; "
                      f"start-up {cell['startup_s']:.1f} s, cell {time.time() - t0:.0f} s)", flush=True)
            else:
                cell["error"] = f"exit {rc}" + ("" if res_path.is_file() else ", no result")
                print(f"{head}: FAILED ({cell['error']}); last lines of {log}:\n{_tail(log)}", file=sys.stderr, flush=True)
                status = "some cells failed"
            cells.append(cell)
    except KeyboardInterrupt:
        status = "interrupted"
        print("\n[bench] interrupted: reporting the cells done so far", file=sys.stderr)
    first = next((c for c in cells if c.get("ok")), {})
    meta = {
        "command": command, "engine": a.engine, "model": a.model, "model_name": chk["name"], "architecture": chk["arch"],
        "num_layers": chk["num_layers"], "methods": chk["methods"], "cell_methods": cms, "batch_sizes": batches,
        "prompt_len": a.prompt_len, "max_tokens": a.max_tokens, "repeats": R, "alternate": a.alternate,
        "eager": a.eager, "dtype": a.dtype,
        "seed": a.seed, "threads": a.threads, "inprocess": a.inprocess, "engine_args": chk["engine_args"],
        "common_engine_args": {k: v for k, v in common_engine_args(a, chk, batches[0])[0].items()
                               if k not in ("max_num_seqs", "model")},
        "method_args": chk["method_args"], "n_candidates": chk["n_candidates"],
        "lrs_sampling": LRS_SAMPLING if "lrs" in cms else None,
        "telltale_layers": {m: c.layers for m, c in chk["cfgs"].items()},
        "engine_info": first.get("engine"),
        "compilation": {label(m, a.engine): (c.get("engine") or {}).get("compilation")
                        for m in cms for c in cells if c.get("ok") and c["method"] == m and c["repeat"] == 0
                        and c["batch"] == batches[0]},
        "kernels": _kernels_of(cells, a.engine),
        "versions": _versions(), "started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "status": status,
    }
    if not cells:
        print("[bench] no cell finished; nothing to report", file=sys.stderr)
        return 130 if status == "interrupted" else 1
    rep = build_report(cells, meta)
    paths = write_report(rep, Path(a.out).expanduser(), chk["name"])
    print("\n" + render_markdown(rep))
    print(f"[bench] wrote {paths['md']}, {paths['json'].name}, {paths['png'].name}; cell logs in {work}")
    return 0 if status == "complete" else (130 if status == "interrupted" else 1)


# -- one cell (in its own process) -------------------------------------------------------------

def _engine_info(llm) -> dict[str, Any]:
    info: dict[str, Any] = {}
    try:
        vc = llm.llm_engine.vllm_config
        cc, sc, mc = vc.compilation_config, vc.scheduler_config, vc.model_config
        info["compilation"] = {k: getattr(v, "name", str(v)) for k in ("mode", "cudagraph_mode")
                               for v in [getattr(cc, k, None)]}
        info["enforce_eager"] = bool(getattr(mc, "enforce_eager", False))
        info["dtype"] = str(mc.dtype).replace("torch.", "")
        info["async_scheduling"] = getattr(sc, "async_scheduling", None)
        info["max_num_seqs"] = getattr(sc, "max_num_seqs", None)
        info["max_num_batched_tokens"] = getattr(sc, "max_num_batched_tokens", None)
        info["enable_chunked_prefill"] = getattr(sc, "enable_chunked_prefill", None)
        info["enable_prefix_caching"] = getattr(vc.cache_config, "enable_prefix_caching", None)
        info["use_v2_model_runner"] = getattr(vc, "use_v2_model_runner", None)
    except Exception as e:  # noqa: BLE001 — informational only
        info["error"] = repr(e)
    try:
        import torch
        from vllm.platforms import current_platform

        info["device"] = (f"cpu ({torch.get_num_threads()} threads)" if current_platform.is_cpu()
                          else torch.cuda.get_device_name(0))
    except Exception:  # noqa: BLE001
        pass
    return info


def _engine_total(states: list, read, tp: int) -> float:
    """A figure of the workers' ``telltale_state`` over the engine: ``read(state)`` summed over the
    workers (pipeline stages own different layers) and divided by the tensor-parallel size (its
    ranks all run, and count, the same work)."""
    return sum(read(st) for st in states or [] if st) / max(1, tp)


def _method_total(states: list, key: str, tp: int) -> int:
    """A counter of the method's ``summary()`` over the engine (:func:`_engine_total`)."""
    return int(_engine_total(states, lambda st: int((st.get("method") or {}).get(key, 0)), tp))


def _kernels(states: list) -> dict[str, bool | None]:
    """Whether the telltale core's own per-step work ran compiled on every worker, from their
    ``telltale_state``: ``core`` the threshold update, ``method`` the method's layer step (None for
    a method without one). A kernel whose compile failed falls back for good, so the state after a
    run says how that run ran."""
    sts = [st for st in states or [] if st]
    mf = [st.get("method_fused") for st in sts]
    return {"core": bool(sts) and all(bool(st.get("fused")) for st in sts),
            "method": None if all(m is None for m in mf) else all(bool(m) for m in mf)}


def _hook_time(states0: list, states1: list, wall_s: float, tp: int = 1) -> dict[str, float | None]:
    """The host time telltale's hooks took in a run (``hook_s`` of the workers' ``telltale_state``
    before and after, over the engine as :func:`_engine_total` counts: a stage's tensor-parallel
    ranks run their hooks at the same time, a pipeline's stages one after another): ``ms_per_step``
    per engine step and ``share`` of the run's wall time."""
    before = next((st for st in states0 or [] if st), None)
    after = next((st for st in states1 or [] if st), None)
    if before is None or after is None:  # without both readings the time would include the warm-up's
        return {"ms_per_step": None, "share": None}

    def hook(st):
        return float(st.get("hook_s", 0.0))

    s = _engine_total(states1, hook, tp) - _engine_total(states0, hook, tp)
    steps = int(after.get("steps", 0)) - int(before.get("steps", 0))
    return {"ms_per_step": 1e3 * s / steps if steps > 0 else None, "share": s / wall_s if wall_s > 0 else None}


def timed_run(llm, prompts: list[dict], params: list, tags: list[str]) -> tuple[list[int], list, dict[str, Any]]:
    """Generate ``prompts`` by stepping ``llm``'s engine and time it. ``LLM.generate`` asks for the
    final outputs only; this loop asks for each step's new tokens (``DELTA``: one small output per
    running request and step, no cumulative copies), which is what it needs to see the moment
    every request had its first token. Timing: ``wall_s`` from the first request added to the last
    token; ``first_s`` when every request had its first token (its prompt's prefill done, chunks
    included); ``decode_tokens`` generated after that and ``decode_tps`` = ``decode_tokens`` ÷
    the time after that — the decode throughput, without the prefill.
    Returns the tokens generated and the finish reason per request (in ``tags`` order), and the
    timing."""
    from vllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    ntok = dict.fromkeys(tags, 0)  # tokens so far, per request
    finish: dict[str, Any] = {}
    started = 0
    t_first = gen_first = None
    t0 = time.perf_counter()
    for tag, p, sp in zip(tags, prompts, params):
        sp.output_kind = RequestOutputKind.DELTA
        engine.add_request(tag, p, sp)
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.outputs:
                n = len(o.outputs[0].token_ids)
                if n and not ntok[o.request_id]:
                    started += 1
                ntok[o.request_id] += n
                if o.finished:
                    finish[o.request_id] = o.outputs[0].finish_reason
        if t_first is None and started == len(tags):
            t_first = time.perf_counter()
            gen_first = sum(ntok.values())
    t_end = time.perf_counter()
    missing = [t for t in tags if t not in finish]
    if missing:
        raise RuntimeError(f"bench: {len(missing)} requests did not finish (e.g. {missing[0]})")
    lengths = [ntok[t] for t in tags]
    timing: dict[str, Any] = {"wall_s": t_end - t0, "first_s": None, "decode_tokens": None, "decode_tps": None}
    if t_first is not None:
        timing["first_s"] = t_first - t0
        timing["decode_tokens"] = sum(lengths) - gen_first
        if timing["decode_tokens"] > 0 and t_end > t_first:
            timing["decode_tps"] = timing["decode_tokens"] / (t_end - t_first)
    return lengths, [finish[t] for t in tags], timing


def worker_main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    if spec.get("threads"):
        import torch

        torch.set_num_threads(int(spec["threads"]))
    if spec.get("engine_kind") == "hf":
        return hf_worker(spec)
    from vllm import LLM, SamplingParams
    from vllm.platforms import current_platform

    from ..config import resolve
    from ..core.rng import seed_from
    from ..core.stats import EVENT_NAMES
    from ..sidecar import RunSummary
    from ..vllm import assemble_engine_args, modifies_kv, whole_prompt_budget
    from ..vllm.driver import collect

    method = spec["method"]
    telltale = method not in (STOCK, SAMPLED_STOCK)
    kw = dict(spec["engine"])
    user = set(spec["user_engine_keys"])
    cfg = None
    if telltale:
        cfg = resolve(method, dict(spec["tt_args"]), spec["num_layers"], seed=int(kw.get("seed") or 0))
        # as the lm-eval model types assemble it (the user's explicit choices win where they may)
        kw = assemble_engine_args(cfg, spec["arch"], kw, salted_requests=True, explicit=user)
    if current_platform.is_cpu():
        if "kv_cache_memory_bytes" not in kw:
            kw["kv_cache_memory_bytes"] = int(spec["cpu_kv_bytes"])
        if spec.get("sampling") and "enable_chunked_prefill" not in user:
            # vllm-lrs's CPU setting (harness/lrs.py): vLLM 0.32's CPU runner cannot resume a seeded
            # request whose prompt was split by chunked prefill; its stock comparator needs the same
            kw["enable_chunked_prefill"] = False
            if "max_num_batched_tokens" not in user:
                kw["max_num_batched_tokens"] = whole_prompt_budget(kw)
    salt = telltale and modifies_kv(cfg)
    n_cand = int(spec["n_candidates"])

    def requests(prompts, max_tokens, prefix):
        ps, sps, tags = [], [], []
        for i, ids in enumerate(prompts):
            for k in range(n_cand):
                tag = f"{prefix}{i}.{k}"
                if spec.get("sampling"):
                    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, seed=seed_from(spec["seed"], i, k),
                                        **spec["sampling"])
                else:
                    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
                p = {"prompt_token_ids": list(ids)}
                if telltale:
                    sp.extra_args = {"telltale_tag": tag, "telltale_seed": seed_from(spec["seed"], i, k)}
                    if salt:  # as the lm-eval model types: a request reuses only blocks it cached itself
                        p["cache_salt"] = tag
                ps.append(p)
                sps.append(sp)
                tags.append(tag)
        return ps, sps, tags

    t0 = time.perf_counter()
    llm = LLM(**kw)
    startup = time.perf_counter() - t0
    try:
        ps, sps, tags = requests(spec["warm_prompts"], int(spec["warm_tokens"]), "w")
        t0 = time.perf_counter()
        outs = llm.generate(ps, sps, use_tqdm=False)
        warmup = time.perf_counter() - t0
        if telltale:
            collect(llm, tags, [len(o.outputs[0].token_ids) for o in outs])

        def measure(prefix: str) -> dict[str, Any]:
            """One timed run of the cell's requests, its counters and the requests' statistics."""
            if telltale:
                state0 = llm.collective_rpc("telltale_state")
            ps, sps, tags = requests(spec["prompts"], int(spec["max_tokens"]), prefix)
            lengths, finish, timing = timed_run(llm, ps, sps, tags)
            gen, wall = sum(lengths), timing["wall_s"]
            res: dict[str, Any] = {
                "requests": len(ps), "prompt_tokens": sum(len(p["prompt_token_ids"]) for p in ps),
                "generated_tokens": gen, "tps": gen / wall if wall > 0 else None, **timing,
                "startup_s": startup, "warmup_s": warmup, "engine": _engine_info(llm), "engine_kwargs": {
                    k: v for k, v in kw.items() if k != "hf_overrides"},
            }
            if telltale:
                t0 = time.perf_counter()
                recs = collect(llm, tags, lengths)
                res["collect_s"] = time.perf_counter() - t0
                state1 = llm.collective_rpc("telltale_state")
                summ = RunSummary(cfg)
                for tag, n, why in zip(tags, lengths, finish):
                    r = recs.get(tag) or {}
                    summ.add({"n_generated_tokens": n, "finish_reason": why,
                              "n_decode_tokens": r.get("n_decode_tokens", 0), "layers": r.get("layers", {})})
                s = summ.to_dict()
                inter = {k: 0.0 for k in EVENT_NAMES if k != "above_tau"}  # the summary lists events that happened
                inter.update({k: v["per_1k_tokens"] for k, v in s.items() if isinstance(v, dict) and "per_1k_tokens" in v})
                above = s.get("above_tau_per_1k") or {}
                inter["above_tau"] = float(sum(above.values()))
                res["interventions"] = inter
                res["collected"] = len(recs)
                res["telltale_layers"] = cfg.layers
                res["kernels"] = _kernels(state1)
                tp = int(getattr(llm.llm_engine.vllm_config.parallel_config, "tensor_parallel_size", 1) or 1)
                res["hooks"] = _hook_time(state0, state1, res["wall_s"], tp)
                if method == "alrr":
                    res["alrr"] = {k: _method_total(state1, k, tp) - _method_total(state0, k, tp)
                                   for k in ("rerun_calls", "rerun_rows")}
            return res

        if spec.get("control_fd") is None:
            Path(spec["result_path"]).write_text(json.dumps(measure("t"), default=str))
        else:
            _serve(spec, measure)
    finally:
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001
            pass
    return 0


def _serve(spec: dict, measure) -> None:
    """``--alternate``: the cell's engine stays up. It says ``ready`` on its control pipe, then for
    each ``run K`` read from stdin times one run, writes its result to ``result_path`` with ``{k}``
    replaced by K and says ``done K``; ``quit`` (or the end of stdin) ends it."""
    with os.fdopen(int(spec["control_fd"]), "w", buffering=1) as ctl:
        ctl.write("ready\n")
        for line in sys.stdin:
            cmd = line.split()
            if not cmd or cmd[0] == "quit":
                break
            k = int(cmd[1])
            res = measure(f"t{k}.")
            Path(spec["result_path"].replace("{k}", str(k))).write_text(json.dumps(res, default=str))
            ctl.write(f"done {k}\n")


#: --dtype → transformers' dtype
HF_DTYPES = {"auto": "auto", "half": "float16", "float16": "float16", "bfloat16": "bfloat16", "float": "float32",
             "float32": "float32"}


def hf_worker(spec: dict) -> int:
    """One cell on transformers: a telltale method generates with the hf adapter's loop, the stock
    cells with ``model.generate``; the same prompts, timing, counters and result file as a vLLM cell."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..config import resolve
    from ..core.rng import seed_from
    from ..core.stats import EVENT_NAMES
    from ..hf.runtime import GenRequest, HFRuntime
    from ..sidecar import RunSummary

    method = spec["method"]
    telltale = method not in (STOCK, SAMPLED_STOCK)
    kw = dict(spec["engine"])
    user = {k: kw[k] for k in spec["user_engine_keys"] if k in kw}
    device = user.pop("device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    seed = int(spec["seed"])
    sampling = spec.get("sampling")
    n_cand = int(spec["n_candidates"])
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(kw["model"], dtype=HF_DTYPES.get(str(kw.get("dtype")), "auto"),
                                                 **user).to(device).eval()
    cfg = rt = None
    if telltale:
        cfg = resolve(method, dict(spec["tt_args"]), spec["num_layers"], seed=seed)
        rt = HFRuntime(model, cfg, engine_seed=seed)
    startup = time.perf_counter() - t0
    gc = model.generation_config
    pad = gc.pad_token_id if gc.pad_token_id is not None else (gc.eos_token_id if isinstance(gc.eos_token_id, int)
                                                               else 0)

    def run(prompts, max_tokens, prefix):
        """Generated tokens per request (and the hf adapter's results for a telltale method)."""
        if rt is not None:
            reqs = [GenRequest(list(ids), max_tokens, tag=f"{prefix}{i}.{k}", identity=seed_from(seed, i, k),
                               sampling_seed=seed_from(seed, i, k) if sampling else None, ignore_eos=True,
                               **(sampling or {}))
                    for i, ids in enumerate(prompts) for k in range(n_cand)]
            res = rt.generate(reqs)
            return [len(r.token_ids) for r in res], res
        ids = torch.tensor([list(p) for p in prompts for _ in range(n_cand)], device=device)
        extra = dict(do_sample=True, **sampling) if sampling else dict(do_sample=False)
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, pad_token_id=pad, **extra)
        return [int(out.shape[1] - ids.shape[1])] * ids.shape[0], None

    t0 = time.perf_counter()
    run(spec["warm_prompts"], int(spec["warm_tokens"]), "w")
    warmup = time.perf_counter() - t0
    state0 = rt.method.summary() if rt is not None else {}
    t0 = time.perf_counter()
    lengths, results = run(spec["prompts"], int(spec["max_tokens"]), "t")
    wall = time.perf_counter() - t0
    gen = sum(lengths)
    res: dict[str, Any] = {
        "requests": len(lengths), "prompt_tokens": sum(len(p) for p in spec["prompts"]) * n_cand,
        "generated_tokens": gen, "wall_s": wall, "tps": gen / wall if wall > 0 else None,
        "startup_s": startup, "warmup_s": warmup,
        "engine": {"engine": "hf", "device": f"{device} ({torch.get_num_threads()} threads)",
                   "dtype": str(model.dtype).replace("torch.", ""), "compilation": None},
        "engine_kwargs": {"device": device, **{k: v for k, v in kw.items() if k in ("model", "dtype", "seed")}, **user},
    }
    if rt is not None:
        summ = RunSummary(cfg)
        for r in results:
            summ.add({"n_generated_tokens": len(r.token_ids), "finish_reason": r.finish_reason,
                      "n_decode_tokens": r.stats.get("n_decode_tokens", 0), "layers": r.stats.get("layers", {})})
        s = summ.to_dict()
        inter = {k: 0.0 for k in EVENT_NAMES if k != "above_tau"}
        inter.update({k: v["per_1k_tokens"] for k, v in s.items() if isinstance(v, dict) and "per_1k_tokens" in v})
        inter["above_tau"] = float(sum((s.get("above_tau_per_1k") or {}).values()))
        res.update(interventions=inter, collected=len(results), telltale_layers=cfg.layers)
        if method == "alrr":
            state1 = rt.method.summary()
            res["alrr"] = {k: int(state1.get(k, 0)) - int(state0.get(k, 0)) for k in ("rerun_calls", "rerun_rows")}
    Path(spec["result_path"]).write_text(json.dumps(res, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
