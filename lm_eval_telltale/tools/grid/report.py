"""The grid's report under its output root: ``table`` as Markdown, JSON and PNG (the
``telltale table`` of every done cell) and ``index.html``, one page for the whole grid: the
table, the plot, and per cell its state, settings, command line, log and samples (with its
``telltale view`` pages when the cell recorded per-token traces)."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

from .cells import cell_dir, results_of, state_of
from .spec import Grid, shown


def write_table(grid: Grid, subtasks: bool = False, baseline: str = "vllm", warn=None):
    """The table of the done cells (None when no cell is done) and the files written."""
    from ..plots import plot_deltas
    from ..render import render
    from ..table import build_table

    dirs = [cell_dir(grid.output, c) / "out" for c in grid.cells if state_of(grid.output, c)[0] == "done"]
    if not dirs:
        return None, {}
    t = build_table(dirs, baseline=baseline, subtasks=subtasks, progress=False, warn=warn)
    paths = {ext: grid.output / f"table.{ext}" for ext in ("md", "json", "png")}
    paths["md"].write_text(render(t, "md"), encoding="utf-8")
    paths["json"].write_text(render(t, "json"), encoding="utf-8")
    try:
        plot_deltas(t, paths["png"])
    except Exception as e:  # noqa: BLE001 - e.g. no baseline row to take a Δ against
        paths.pop("png").unlink(missing_ok=True)
        if warn:
            warn(f"no plot ({e})")
    return t, paths


def _md_table_html(md: str) -> str:
    """A Markdown pipe table (and the notes after it) as HTML."""
    out, rows = [], []
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if all(set(c) <= set("-: ") for c in cells):
                continue
            rows.append(cells)
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    if not rows:
        return "".join(out)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table class='t'><tr>{head}</tr>{body}</table>" + "".join(out)


def _rel(p: Path, root: Path) -> str:
    return html.escape(os.path.relpath(p, root))


def _view_pages(d: Path) -> Path | None:
    """``telltale view`` pages of a done cell that recorded traces (made once, kept in ``view/``)."""
    from ..view import main as view_main

    idx = d / "view" / "index.html"
    if idx.is_file():
        return idx
    res = results_of(d)
    if res is None:
        return None
    tt = (json.loads(res.read_text()).get("config") or {}).get("telltale") or {}
    if not (tt.get("config") or {}).get("record_tokens"):
        return None
    try:
        rc = view_main([str(d / "out"), "--out", str(d / "view")])
    except SystemExit:
        rc = 2
    return idx if rc == 0 and idx.is_file() else None


def write_page(grid: Grid, table_md: str | None, paths: dict) -> Path:
    root = grid.output
    counts: dict[str, int] = {}
    rows = []
    for c in grid.cells:
        st, info = state_of(root, c)
        counts[st] = counts.get(st, 0) + 1
        d = cell_dir(root, c)
        links = []
        if (d / "log.txt").is_file():
            links.append(f"<a href='{_rel(d / 'log.txt', root)}'>log</a>")
        res = results_of(d) if st == "done" else None
        if res is not None:
            links.append(f"<a href='{_rel(res, root)}'>results</a>")
            links += [f"<a href='{_rel(s, root)}'>samples</a>" for s in sorted(res.parent.glob("samples_*.jsonl"))[:1]]
            view = _view_pages(d)
            links.append(f"<a href='{_rel(view, root)}'>telltale view</a>" if view else
                         f"<span title='record_tokens=true gives per-token pages'>telltale view {_rel(d / 'out', root)}</span>")
        cmd = (json.loads((d / "cell.json").read_text()).get("command") if (d / "cell.json").is_file() else None)
        settings = ", ".join(f"{k}={v}" for k, v in c.model_args.items() if k != "pretrained")
        rows.append(f"<tr class='{st}'><td>{html.escape(c.label)}</td><td>{st}"
                    f"{(' — ' + html.escape(str(info.get('why')))) if info.get('why') else ''}</td>"
                    f"<td><code>{html.escape(c.model_type)}</code> {html.escape(settings)}</td><td>{' · '.join(links)}</td>"
                    f"<td><details><summary>command</summary><code>{html.escape(shown(cmd or []))}</code></details></td>"
                    f"</tr>")
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    img = f"<img src='{_rel(paths['png'], root)}' alt='Δ vs the baseline'>" if paths.get("png") else ""
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>telltale grid</title><style>"
        "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:.25em .5em;font-size:13px;vertical-align:top}"
        "tr.done td:nth-child(2){color:#060}tr.failed td:nth-child(2){color:#a00}img{max-width:100%}"
        "code{font-size:12px}</style></head><body>"
        f"<h1>{html.escape(grid.path.name)}</h1><p>{len(grid.cells)} cells: {html.escape(summary)}</p>"
        + ("<h2>Table</h2>" + _md_table_html(table_md) if table_md else "<p>No cell is done yet.</p>")
        + img + "<h2>Cells</h2><table><tr><th>cell</th><th>state</th><th>settings</th><th>files</th>"
        "<th>lm_eval</th></tr>" + "".join(rows) + "</table></body></html>\n")
    p = root / "index.html"
    p.write_text(page, encoding="utf-8")
    return p
