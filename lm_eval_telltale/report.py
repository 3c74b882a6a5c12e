"""Minimal results table from lm-eval run directories (results JSON + telltale sidecar summary)."""

from __future__ import annotations

import json
from pathlib import Path


def latest_results(run_dir: str | Path) -> Path | None:
    files = sorted(Path(run_dir).rglob("results_*.json"), key=lambda p: p.name)
    return files[-1] if files else None


def _metrics(res: dict) -> dict[str, str]:
    out = {}
    for task, m in res.get("results", {}).items():
        for key, v in m.items():
            if "," not in key or "_stderr" in key or not isinstance(v, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            se = m.get(f"{metric}_stderr,{filt}")
            se_s = f" ± {100 * se:.1f}" if isinstance(se, (int, float)) else ""
            out[f"{task} {metric} ({filt})"] = f"{100 * v:.1f}{se_s}"
    return out


def results_table(run_dirs) -> str:
    rows = []
    cols: list[str] = []
    for d in run_dirs:
        f = latest_results(d)
        if f is None:
            continue
        res = json.loads(f.read_text())
        cfg = res.get("config", {})
        met = _metrics(res)
        for c in met:
            if c not in cols:
                cols.append(c)
        tt = cfg.get("telltale") or {}
        summ = tt.get("summary") or {}
        mean_norm = summ.get("mean_norm") or {}
        norm_s = ", ".join(f"L{l}: {v:.2f}" for l, v in mean_norm.items()) if mean_norm else "–"
        rows.append((cfg.get("model", "?"), met, summ.get("generated_tokens", "–"), norm_s))
    head = ["model type", *cols, "generated tokens", "mean ‖h‖ per layer"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, met, toks, norm_s in rows:
        lines.append("| " + " | ".join([model, *(met.get(c, "–") for c in cols), str(toks), norm_s]) + " |")
    return "\n".join(lines)
