"""The outputs of ``telltale signals``: ``signals.json`` (every number), ``signals.md`` (the report),
``signals_corr.png`` (per-layer Spearman ρ with the reasoning-feature score, 95 % intervals),
``signals_think.png`` (per-layer Cohen's d, thinking vs answering) and ``tokens.npz`` (per row:
generation, label, relative position, every signal and the feature score at every layer)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..plots import save_figure
from .analysis import AGREE_TOL, BOUND_TOL

TITLES = {"norm": "‖h‖₂", "hidden_entropy": "hidden entropy", "lens_entropy": "logit-lens entropy",
          "attn_entropy": "attention entropy", "output_entropy": "output entropy", "feature_score": "SAE features"}


def _num(v: Any, fmt: str = "+.2f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, fmt)


def _ci(ci) -> str:
    return "" if not ci or ci[0] is None else f" [{ci[0]:+.2f}, {ci[1]:+.2f}]"


def markdown(res: dict, command: str | None = None) -> str:
    m, pl, names = res["meta"], res["per_layer"], res["signals"]
    c = res["counts"]
    lines = [f"# Signal study: {Path(str(m['model'])).name}", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += [f"Tasks {', '.join(m['tasks'])} (limit {m.get('limit')}), thinking modes {', '.join(m['modes'])}; "
              f"generated with {m['engine']}, signals from a teacher-forced transformers pass (float32, eager "
              f"attention). {c['generations']} generations, {c['rows']} token rows: {c['thinking']} thinking, "
              f"{c['answering']} answering, {c['think tag']} think-tag rows. Intervals: 95 %, bootstrap over "
              f"generations ({res['settings']['bootstrap']} draws). "
              + ("Reasoning features chosen on the even-numbered generations, every statistic over the "
                 f"{c['evaluated_generations']} odd-numbered ones (--held-out). " if res["settings"].get("held_out")
                 else "")
              + "Definitions: `docs/methods.md` §9.", "",
              "## Verdicts", ""]
    for v in res["verdicts"]:
        lines.append(f"- **{v['verdict']}**: {v['claim']} ({v['evidence']})")
    lines += [""]
    rows = [l for l in map(str, res["layers"]) if "correlation" in pl[l]]
    if rows:
        margin = any("norm_margin" in pl[l] for l in rows)
        lines += ["## Correlation with the SAE reasoning-feature score (Spearman ρ [95 %]; Pearson r)", "",
                  "| layer | " + " | ".join(TITLES[s] for s in names) + (" | ρ_norm − max \\|ρ_entropy\\| |" if margin
                                                                         else " |"),
                  "|--:|" + "--:|" * (len(names) + margin)]
        for l in rows:
            cc = pl[l]["correlation"]
            m = pl[l].get("norm_margin")
            lines.append(f"| {l} | " + " | ".join(f"{_num(cc[s]['spearman'])}{_ci(cc[s]['spearman_ci'])}; "
                                                 f"{_num(cc[s]['pearson'])}" for s in names)
                         + (f" | {_num(m['spearman'])}{_ci(m['spearman_ci'])} |" if m else (" | |" if margin else " |")))
        lines += ["", "## The SAEs", "", "| layer | source | d_sae | features | their firing share (thinking) | "
                  "zero scores | L0 (rows) | train FVU | train L0 | dead | largest bound ratio |",
                  "|--:|--|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for l in rows:
            s = pl[l]["sae"]
            t = s.get("train") or {}
            lines.append(f"| {l} | {s['source'].split(':')[0]} | {s['d_sae']} | {s['n_features']} | "
                         f"{_num(s.get('feature_think_freq'), '.1%')} | {_num(s.get('zero_score_share'), '.0%')} | "
                         f"{s['l0']:.1f} | {_num(t.get('fvu'), '.3f')} | {_num(t.get('l0'), '.1f')} | "
                         f"{_num(t.get('dead_fraction'), '.0%')} | {pl[l]['bound_ratio']:.4f} |")
        lines += [""]
    cols = names + (["feature_score"] if rows else [])
    lines += ["## Thinking vs answering (Cohen's d [95 %]; AUC = P(thinking row > answering row))", "",
              "| layer | " + " | ".join(TITLES[s] for s in cols) + " |", "|--:|" + "--:|" * len(cols)]
    for l in map(str, res["layers"]):
        cc = pl[l]["contrast"]
        lines.append(f"| {l} | " + " | ".join(f"{_num(cc[s]['d'])}{_ci(cc[s]['d_ci'])}; {_num(cc[s]['auc'], '.2f')}"
                                             if s in cc else "" for s in cols) + " |")
    ag = res.get("agreement")
    lines += ["", "## Reading", "",
              "- The reasoning features are the top "
              f"{res['settings']['top_features']} by (thinking − answering)/(answering + ε) mean activation, among "
              "those more active while thinking and firing on ≥ 1 % of the thinking rows"
              + (", chosen on the other half of the generations (--held-out)." if res["settings"].get("held_out") else
                 ", chosen on the rows they are scored on (as the paper does; --held-out separates the two): the "
                 "feature score's own thinking-vs-answering contrast is large by construction and no evidence."),
              "- A sparse SAE leaves many rows with a feature score of exactly 0 (the SAE table's \"zero scores\"); "
              "Spearman ρ then compares mostly tied ranks.",
              f"- The bound check passes when the largest ratio is ≤ 1 (+{BOUND_TOL:g} for float32 rounding); it is "
              "a property of any ReLU-family encoder, so a failure means the activations are not the encoder's.",
              "- Output entropy is one value per token (the same at every layer).",
              f"- Engine agreement: {'not measured (no engine trace in the collection)' if ag is None else ''}"
              + ("" if ag is None else f"the {res['meta']['engine']} trace's norms vs the teacher-forced pass: largest "
                 f"relative difference {ag['max_rel_diff']:.2e} over {ag['rows']} rows (bar {AGREE_TOL:g})."), ""]
    return "\n".join(lines)


def _plot(res: dict, path: Path, key: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pl = res["per_layer"]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    names = list(res["signals"]) + (["feature_score"] if key == "d" else [])
    for s in names:
        ls = [l for l in res["layers"] if (pl[str(l)].get("correlation" if key == "spearman" else "contrast") or {})
              .get(s) is not None]
        if not ls:
            continue
        get = (lambda l, s=s: pl[str(l)]["correlation"][s]) if key == "spearman" else \
            (lambda l, s=s: pl[str(l)]["contrast"][s])
        y = [get(l)[key] for l in ls]
        ci = [get(l)[key + "_ci"] for l in ls]
        lo = [np.nan if c[0] is None else c[0] for c in ci]
        hi = [np.nan if c[1] is None else c[1] for c in ci]
        line, = ax.plot(ls, y, marker="o", markersize=3, label=TITLES[s])
        ax.fill_between(ls, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.set_xlabel("layer")
    ax.set_ylabel("Spearman ρ with the reasoning-feature score" if key == "spearman"
                  else "Cohen's d, thinking − answering")
    ax.set_title(f"{Path(str(res['meta']['model'])).name}: "
                 + ("signals vs SAE reasoning features" if key == "spearman" else "thinking vs answering"), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def write(res: dict, out: Path, command: str | None = None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    body = {k: v for k, v in res.items() if k != "tokens"}
    paths = [out / "signals.json", out / "signals.md", out / "tokens.npz"]
    paths[0].write_text(json.dumps(body, indent=1, default=float) + "\n")
    paths[1].write_text(markdown(res, command))
    with open(paths[2], "wb") as f:
        np.savez_compressed(f, **res["tokens"])
    if any("correlation" in res["per_layer"][str(l)] for l in res["layers"]):
        paths.append(_plot(res, out / "signals_corr.png", "spearman"))
    paths.append(_plot(res, out / "signals_think.png", "d"))
    return paths
