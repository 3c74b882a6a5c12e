"""Rendering a :class:`~lm_eval_telltale.tools.table.Table` as Markdown, CSV, LaTeX or JSON."""

from __future__ import annotations

import csv
import io
import json

from .table import EVENT_COLUMNS, LRS_COLUMNS, Cell, Table

EXTRA_HEAD = {"gen_tokens": "gen tok", "truncated": "trunc %", **{ev: h for ev, h in EVENT_COLUMNS},
              **{c: h for c, h in LRS_COLUMNS}}


def _cell_text(c: Cell | None, *, latex: bool = False, delta: bool = True) -> str:
    if c is None or c.value is None:
        return "–"
    pm = " $\\pm$ " if latex else " ± "
    s = f"{c.value:.1f}"
    if c.stderr is not None:
        s += f"{pm}{c.stderr:.1f}"
    if delta and c.delta is not None:
        s += f" ({c.delta:+.1f})"
    return s


def _extra_text(name: str, v: float | None) -> str:
    if v is None:
        return "–"
    if name == "truncated":
        return f"{100 * v:.0f}"
    if name in ("gen_tokens", "cand_tokens"):
        return f"{v:.1f}"
    return f"{v:.2f}"


def _tex(s: str) -> str:
    rep = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
           "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}", "→": r"$\rightarrow$", "Δ": r"$\Delta$",
           "–": "--", "±": r"$\pm$", "τ": r"$\tau$"}
    return "".join(rep.get(ch, ch) for ch in s)


def render(t: Table, fmt: str = "md") -> str:
    if fmt == "json":
        return json.dumps(t.to_dict(), indent=2, ensure_ascii=False) + "\n"
    head = ["model", "method"] + [c.name for c in t.columns] + ["avg"] + [EXTRA_HEAD[e] for e in t.extra_columns]
    body = []
    for r in t.rows:
        avg = _cell_text(r.avg, latex=fmt == "latex")
        if r.avg_partial and r.avg.value is not None:
            avg += "*"
        body.append([r.model, r.label] + [_cell_text(r.cells.get(c.name), latex=fmt == "latex") for c in t.columns]
                    + [avg] + [_extra_text(e, r.extras.get(e)) for e in t.extra_columns])
    if fmt == "md":
        esc = lambda s: s.replace("|", "\\|")  # noqa: E731
        lines = ["| " + " | ".join(esc(h) for h in head) + " |",
                 "|" + "|".join(["---", "---"] + ["--:"] * (len(head) - 2)) + "|"]
        lines += ["| " + " | ".join(esc(x) for x in row) + " |" for row in body]
        if t.notes:
            lines.append("")
            lines += [f"- {n}" for n in t.notes]
        return "\n".join(lines) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        h = ["model", "method", "model_type", "selector", "baseline"]
        for c in t.columns:
            h += [c.name, f"{c.name} stderr", f"{c.name} delta"]
        h += ["avg", "avg delta", "avg partial"] + list(t.extra_columns)
        w.writerow(h)
        f = lambda v: "" if v is None else f"{v:.6g}"  # noqa: E731
        for r in t.rows:
            line = [r.model, r.label, r.model_type, r.selector or "", int(r.is_baseline)]
            for c in t.columns:
                cell = r.cells.get(c.name) or Cell()
                line += [f(cell.value), f(cell.stderr), f(cell.delta)]
            line += [f(r.avg.value), f(r.avg.delta), int(r.avg_partial)] + [f(r.extras.get(e)) for e in t.extra_columns]
            w.writerow(line)
        return buf.getvalue()
    if fmt == "latex":
        lines = ["\\begin{tabular}{ll" + "r" * (len(head) - 2) + "}", "\\toprule",
                 " & ".join(_tex(h) for h in head) + " \\\\", "\\midrule"]
        prev = None
        for r, row in zip(t.rows, body):
            if prev is not None and r.model != prev:
                lines.append("\\midrule")
            prev = r.model
            lines.append(" & ".join(x if "$\\pm$" in x else _tex(x) for x in row) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}"]
        if t.notes:
            lines += ["% " + n for n in t.notes]
        return "\n".join(lines) + "\n"
    raise ValueError(f"unknown format {fmt!r} (md, csv, latex, json)")



