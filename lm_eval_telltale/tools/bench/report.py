"""``telltale bench``'s report from the cells' results: the figures per (method, batch size), the
Markdown page, the plot and the files. Pure (tested on crafted cells)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from .options import SHOWN_EVENTS, baseline_of, label, stock_name


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
            sy = [c["syncs"]["per_step"] for c in cs if (c.get("syncs") or {}).get("per_step") is not None]
            row["syncs_per_step"] = statistics.median(sy) if sy else None
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
        if "graph" in k:
            o["graph"] = o.get("graph", True) and bool(k["graph"])
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
        if k.get("graph"):
            word = f"in the model's {'compiled ' if core else ''}graph"
        elif core and meth is not False:
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
                + "interventions /1k tokens | telltale hooks ms/step (share of run) | syncs / step | "
                  "re-run rows / token | ALRR compute limit | start-up s |",
            "|---|--:|--:|--:|--:|--:|--:|" + ("--:|" if decode else "") + "---|--:|--:|--:|--:|--:|"]
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
                   f"{_f(t['min'])} | {_f(t['max'])} | {ratio} | {e2e}{ev} | {hook} | {_f(r.get('syncs_per_step'), '.2f')} | "
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
            "dispatch and the engine settings the types change."
            if engine == "vllm" else None,
            "- syncs / step: the operations in telltale's hooks that would make the host wait for an accelerator "
            "(a value read on the host, a data-dependent output size, a copy to the host), counted by the workers' "
            "sync audit (`core/audit.py`) over one untimed run of the warm-up requests, per engine step. 0 but for "
            "ALRR's skip-the-re-run decision with `skip_sync=true` (one per patched layer and step); the "
            "rows of generated tokens reach the host when the requests are collected."
            if engine == "vllm" else None,
            f"- ALRR compute limit: stock tok/s × L / (L + re-run rows per generated token), L = "
            f"{meta.get('num_layers')}: the throughput if the re-run's extra layer passes were ALRR's only cost "
            "(a re-run pushes every token row of its step through the layer again).",
            "- the telltale types run with their own engine settings (the V1 model runner; async scheduling off and, "
            "on GPU, piecewise CUDA graphs split at the telltale ops, but for the types whose step runs in the "
            "model's graph (the per-step kernels line above), which call no op but ALRR's KV-write pair and keep "
            "vLLM's async scheduling where their statistics stay exact); stock vLLM keeps its defaults unless "
            "--engine-args / the environment say otherwise. Each cell's effective settings are in the JSON."
            if engine == "vllm" else
            "- the hf-* types generate with the hf adapter's own loop (the patched layers' hooks, a DynamicCache, "
            "finished rows leaving the batch); stock is transformers' model.generate on the same batch."]
    return "\n".join(line for line in out if line is not None) + "\n"


def plot_report(rep: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plots import save_figure

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
