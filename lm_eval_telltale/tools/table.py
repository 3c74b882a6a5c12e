"""``telltale table``: one comparison table from lm-eval run directories and the telltale sidecars.

Inputs: run directories (searched recursively) or results files. Every ``results_*.json`` (and
lm-eval 0.4.0–0.4.2's ``results.json``) is one run; metric keys are ``"metric,filter"``, a stderr
may be ``"N/A"``, ``config.model_args`` may be a dict (0.4.13 CLI) or a ``"k=v,..."`` string. A
telltale run's sidecar is found through ``config.telltale.stats_path``: first the file of that
name next to the results JSON (a copied or moved run directory), then the recorded absolute path,
then the newest ``telltale_<method>_*.jsonl`` next to the results that is not newer than them.
Unreadable or partial files, and a run directory without any results file (an interrupted run:
the warning says how many answers its sidecar holds), are skipped with a warning naming them;
only when no readable run is left is it an error (:class:`NoResultsError`). Inputs are never
written to: ``--out``/``--plot`` inside an input run directory or onto a file read or listed is
refused before anything is written.

Rows: one per model × method configuration. The configuration label is the model type's method
name plus the knobs that differ from their defaults (``TelltaleConfig`` after resolution, method
knobs from the method's ``KEYS``) and the ``--gen_kwargs``; knobs shared by every telltale row of
a model (and gen_kwargs shared by every row) are moved to the notes under the table. An ``vllm-lrs``
run gives one row per selector (the norm scores, ``maj``, ``conf``, ``random``, ``first``) from
the same traces: accuracy "if selector X had been used" = the mean over the sidecar rows of
``candidates[picks[X]]["correct"]`` (per document first, repeats averaged, as lm-eval does); the
selector the run returned keeps lm-eval's own numbers.

**Several runs of one configuration** (same model, model type, resolved knobs, gen_kwargs) make
one row: one output directory per task is a common way to work. Each run contributes its tasks
(a group together with all its subtasks, so a group score and its subtasks' always come from one
run); where two runs have the same task (or overlapping groups), the newest (results ``date``)
wins for that task and the older run's part is listed in the notes. The row's sidecar columns and
LRS selector rows combine the sidecar rows of the tasks each run contributed; ``sources`` lists
every contributing file. ``keep_all=True`` (``--all``) shows every run as its own row, labelled
with its date.

Columns: one per task and group (a group with an aggregated score stands for its subtasks unless
``subtasks=True``; subtasks of a group without one are shown), then ``avg`` — the unweighted mean
over those columns (``*``: the row lacks some of them) — then, from the sidecars: mean generated
tokens per answer, truncation rate (finish_reason == "length"), and per 1,000 generated tokens the
accepted recursions (ALRR), injections (ERSS) and suppressions (event counts summed over the
patched layers, so several per token are possible). Cells: metric × 100 (when the metric is a
fraction) ± stderr, and Δ in points vs the same model's baseline row (model type ``--baseline``,
default ``vllm``; its newest configuration when there are several); the stderr of Δ (JSON
``delta_stderr``, the plot's error bars) is sqrt(se² + se_baseline²), the runs being independent.
The metric of a column is
the first ``higher_is_better`` metric of the task (``exact_match,none`` for the telltale tasks)
unless ``metric=`` names one (``exact_match`` or ``exact_match,flexible-extract``).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..core.lrs import KEYS as _LRS_KEYS
from ..core.lrs import SELECTORS
from ..files import unwritable
from .runs import Inputs, NoResultsError, Run, collect_runs
from .runs import is_num as _is_num

EVENT_COLUMNS = (("accepted", "rec/1k"), ("injected", "inj/1k"), ("suppressed", "sup/1k"))
#: LRS's cost columns: tokens per prompt over all candidates, that as a fraction of full LRS with as
#: many candidates, candidates stopped early per prompt (online LRS)
LRS_COLUMNS = (("cand_tokens", "cand tok"), ("cand_frac", "× full"), ("stopped", "stopped/q"))
_META_KEYS = {"name", "alias", "sample_len", "sample_count", " ", ""}
#: the top-level keys of a results JSON that are keyed by task/group name (merged per task)
_PER_TASK_KEYS = ("results", "groups", "group_subtasks", "higher_is_better", "n-samples", "versions", "n-shot",
                  "configs", "task_hashes")


# --------------------------------------------------------------------------------------------
# the table model
# --------------------------------------------------------------------------------------------

@dataclass
class Cell:
    value: float | None = None
    stderr: float | None = None
    delta: float | None = None
    n: int | None = None
    delta_stderr: float | None = None   # stderr of Δ: sqrt(stderr² + baseline stderr²)


@dataclass
class Column:
    name: str
    metric: str            # "metric,filter"
    kind: str              # "task" | "group" | "subtask"
    scale: float = 100.0
    top: bool = True       # counted in the average


@dataclass
class Row:
    model: str
    label: str
    model_type: str
    method: str
    settings: dict[str, str]
    selector: str | None
    returned: bool
    is_baseline: bool
    cells: dict[str, Cell]
    avg: Cell
    avg_partial: bool
    extras: dict[str, float | None]
    sources: list[str]
    date: float
    order: int = 0


@dataclass
class Table:
    columns: list[Column]
    rows: list[Row]
    extra_columns: list[str]
    notes: list[str]
    warnings: list[str]
    baseline: str
    #: the input run directories and every file read or listed (never written to)
    inputs: Inputs = field(default_factory=Inputs)

    def to_dict(self) -> dict[str, Any]:
        def c(cell: Cell) -> dict[str, Any]:
            return {"value": cell.value, "stderr": cell.stderr, "delta": cell.delta,
                    "delta_stderr": cell.delta_stderr, "n": cell.n}

        return {
            "baseline": self.baseline,
            "columns": [{"name": col.name, "metric": col.metric, "kind": col.kind, "scale": col.scale,
                         "in_average": col.top} for col in self.columns],
            "extra_columns": self.extra_columns,
            "rows": [{"model": r.model, "label": r.label, "model_type": r.model_type, "method": r.method,
                      "settings": r.settings, "selector": r.selector, "returned": r.returned,
                      "baseline": r.is_baseline, "cells": {k: c(v) for k, v in r.cells.items()},
                      "average": c(r.avg), "average_partial": r.avg_partial, "extras": r.extras,
                      "sources": r.sources} for r in self.rows],
            "notes": self.notes,
            "warnings": self.warnings,
        }


def _metric_keys(entry: dict) -> list[str]:
    return [k for k, v in entry.items() if k not in _META_KEYS and "," in k and "_stderr," not in k and _is_num(v)]


def _stderr(entry: dict, key: str) -> float | None:
    m, f = key.split(",", 1)
    v = entry.get(f"{m}_stderr,{f}")
    return float(v) if _is_num(v) else None


def _entries(res: dict) -> dict[str, dict]:
    out = {k: v for k, v in (res.get("results") or {}).items() if isinstance(v, dict)}
    for k, v in (res.get("groups") or {}).items():
        if isinstance(v, dict):
            out[k] = {**v, **out.get(k, {})}
    return out


def _choose_metric(name: str, runs: list[Run], want: str | None) -> str | None:
    for r in runs:
        e = _entries(r.res).get(name)
        if not e:
            continue
        keys = _metric_keys(e)
        if want:
            if "," in want:
                if want in keys:
                    return want
            else:
                hit = [k for k in keys if k.split(",", 1)[0] == want]
                if hit:
                    return hit[0]
            continue
        hib = (r.res.get("higher_is_better") or {}).get(name) or {}
        good = [k for k in keys if hib.get(k.split(",", 1)[0]) is not False]
        if good or keys:
            return (good or keys)[0]
    return None


def _columns(runs: list[Run], subtasks: bool, metric: str | None) -> list[Column]:
    names: list[str] = []
    children: dict[str, list[str]] = {}
    for r in runs:
        for k in _entries(r.res):
            if k not in names:
                names.append(k)
        for g, subs in (r.res.get("group_subtasks") or {}).items():
            if isinstance(subs, list):
                cur = children.setdefault(g, [])
                cur.extend(s for s in subs if s not in cur)
            if g not in names:
                names.append(g)
    is_child = {s for subs in children.values() for s in subs}
    metrics = {n: _choose_metric(n, runs, metric) for n in names}
    cols: list[Column] = []

    def add(name: str, top: bool, depth: int) -> None:
        subs = children.get(name) or []
        has_score = metrics.get(name) is not None
        kind = "group" if subs else ("subtask" if depth else "task")
        if has_score:
            cols.append(Column(name, metrics[name], kind, top=top))
        for s in subs:
            if has_score:
                if subtasks:
                    add(s, False, depth + 1)
            else:
                add(s, top, depth + 1)

    for n in names:
        if n not in is_child:
            add(n, True, 0)
    for col in cols:
        vals = [e[col.metric] for r in runs for e in [_entries(r.res).get(col.name) or {}] if _is_num(e.get(col.metric))]
        col.scale = 100.0 if vals and all(0.0 <= v <= 1.0 for v in vals) else 1.0
    return cols


def _label(run: Run, hidden: set[str]) -> str:
    parts = [f"{k}={v}" for k, v in run.settings.items() if f"{k}={v}" not in hidden]
    engine = " [hf]" if run.model_type.startswith("hf-") else ""  # the transformers engine, beside vllm-*
    lab = run.method + engine + (f" ({', '.join(parts)})" if parts else "")
    if run.selector:
        lab += f" → {run.selector}" + (" (returned)" if run.returned else "")
    return lab


def _mean_stderr(xs: list[float]) -> tuple[float | None, float | None]:
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
    return m, math.sqrt(var) / math.sqrt(len(xs))


def _online(run: Run) -> bool:
    """Whether an LRS run stopped candidates early (online LRS: its sidecar rows carry ``online``)."""
    return any(isinstance(r.get("online"), dict) for r in run.rows or [])


def _lrs_selector_runs(run: Run, warn) -> list[Run]:
    """One pseudo-run per selector from an LRS run's sidecar rows (``candidates`` + ``picks``); an
    online LRS run keeps its returned selector only (every pick stays in its sidecar)."""
    rows = [r for r in (run.rows or []) if isinstance(r.get("picks"), dict) and isinstance(r.get("candidates"), list)]
    if not rows:
        return [run]
    if _online(run):
        run.selector = next((r.get("chosen") for r in rows if r.get("chosen")), None)
        run.returned = True
        return [run]
    chosen = next((r.get("chosen") for r in rows if r.get("chosen")), None)
    sels: list[str] = []
    for r in rows:
        for s in r["picks"]:
            if s not in sels:
                sels.append(s)
    order = {s: i for i, s in enumerate(SELECTORS)}
    sels.sort(key=lambda s: (s != chosen, order.get(s, len(order)), s))
    if not any(c.get("correct") is not None for r in rows for c in r["candidates"] if isinstance(c, dict)):
        warn(f"{run.sidecar}: LRS candidates carry no correctness; only the returned selector is shown")
        run.selector, run.returned = chosen, True
        return [run]
    out = []
    for s in sels:
        sub = Run(**{**run.__dict__})
        sub.selector, sub.returned = s, s == chosen
        sub.settings = dict(run.settings)
        out.append(sub)
    return out


def _selector_cells(run: Run, cols: list[Column], children: dict[str, list[str]]) -> dict[str, Cell]:
    per_task: dict[str, dict[Any, list[float]]] = {}
    for r in run.rows or []:
        picks, cands = r.get("picks") or {}, r.get("candidates") or []
        idx = picks.get(run.selector)
        if not isinstance(idx, int) or not 0 <= idx < len(cands):
            continue
        ok = cands[idx].get("correct") if isinstance(cands[idx], dict) else None
        if ok is None:
            continue
        per_task.setdefault(r["task"], {}).setdefault(r["doc_id"], []).append(float(ok))
    cells: dict[str, Cell] = {}

    def docs_of(name: str) -> list[float]:
        if name in per_task:
            return [sum(v) / len(v) for v in per_task[name].values()]
        out: list[float] = []
        for s in children.get(name, []):
            out.extend(docs_of(s))
        return out

    for col in cols:
        xs = docs_of(col.name)
        if xs:
            m, se = _mean_stderr(xs)
            cells[col.name] = Cell(m * col.scale if m is not None else None,
                                   se * col.scale if se is not None else None, None, len(xs))
    return cells


def _official_cells(run: Run, cols: list[Column]) -> dict[str, Cell]:
    ents = _entries(run.res)
    ns = run.res.get("n-samples") or {}
    cells = {}
    for col in cols:
        e = ents.get(col.name)
        if not e or not _is_num(e.get(col.metric)):
            continue
        se = _stderr(e, col.metric)
        n = (ns.get(col.name) or {}).get("effective") if isinstance(ns.get(col.name), dict) else None
        if n is None:
            sc = e.get("sample_count")
            n = sc.get(col.metric) if isinstance(sc, dict) else e.get("sample_len")
        cells[col.name] = Cell(float(e[col.metric]) * col.scale, se * col.scale if se is not None else None,
                               None, n if isinstance(n, int) else None)
    return cells


def _part_totals(run: Run, names: set[str] | None) -> dict[str, Any] | None:
    """The sidecar totals of one run (only the rows of the tasks ``names`` when given); from the
    run summary in the results JSON when there is no sidecar; None when neither is there."""
    rows = run.rows
    if rows:
        if names is not None:
            rows = [r for r in rows if r.get("task") in names]
        gen = [r.get("n_generated_tokens") for r in rows if _is_num(r.get("n_generated_tokens"))]
        total = sum(gen)
        return {"answers": len(rows), "counted": len(gen), "tokens": total,
                "gen_tokens": total / len(gen) if gen else None,
                "truncated": sum(r.get("finish_reason") == "length" for r in rows) / len(rows) if rows else None,
                "events": {ev: sum(int(st.get(ev, 0) or 0) for r in rows for st in (r.get("layers") or {}).values()
                                   if isinstance(st, dict)) for ev, _ in EVENT_COLUMNS}}
    summ = (((run.res.get("config") or {}).get("telltale") or {}).get("summary")) or {}
    if summ.get("answers") and names is None:  # a summary covers the whole run, not some of its tasks
        gen = summ.get("generated_tokens") or 0
        return {"answers": summ["answers"], "counted": summ["answers"], "tokens": gen,
                "gen_tokens": gen / summ["answers"], "truncated": summ.get("finish_length_rate"),
                "events": {ev: (summ.get(ev) or {}).get("total", 0) if isinstance(summ.get(ev), dict) else 0
                           for ev, _ in EVENT_COLUMNS}}
    return None


def _lrs_extras(run: Run) -> dict[str, float | None]:
    """An LRS run's cost: tokens generated per prompt over all its candidates (``cand_tokens``) and
    candidates stopped early per prompt (``stopped``, online LRS; 0 for full LRS)."""
    rows = [r for r in run.rows or [] if _is_num(r.get("candidate_tokens"))]
    if not rows:
        return {}
    return {"cand_tokens": sum(r["candidate_tokens"] for r in rows) / len(rows),
            "stopped": sum(int((r.get("online") or {}).get("stopped") or 0) for r in rows) / len(rows)}


def _extras(run: Run) -> dict[str, float | None]:
    ex: dict[str, float | None] = {"gen_tokens": None, "truncated": None}
    for ev, _ in EVENT_COLUMNS:
        ex[ev] = None
    if run.method == "lrs":
        ex.update(_lrs_extras(run))
    rows = run.rows
    if rows and run.selector:  # an LRS selector row: what the selector's picks generated
        picked = []
        for r in rows:
            c = (r.get("candidates") or [])
            i = (r.get("picks") or {}).get(run.selector)
            if isinstance(i, int) and 0 <= i < len(c):
                picked.append((c[i].get("n_tokens"), c[i].get("finish_reason")))
        toks = [t for t, _ in picked if _is_num(t)]
        ex["gen_tokens"] = sum(toks) / len(toks) if toks else None
        ex["truncated"] = sum(f == "length" for _, f in picked) / len(picked) if picked else None
        return ex
    # a merged row: every contributing run's share (a run whose statistics are unknown leaves them unknown)
    parts = [_part_totals(r, names) for r, names in (run.parts or [(run, None)])]
    if not parts or any(p is None for p in parts):
        return ex
    if len(parts) == 1:
        p = parts[0]
        ex["gen_tokens"], ex["truncated"] = p["gen_tokens"], p["truncated"]
    else:
        counted, answers = sum(p["counted"] for p in parts), sum(p["answers"] for p in parts)
        ex["gen_tokens"] = sum(p["tokens"] for p in parts) / counted if counted else None
        if answers and all(p["truncated"] is not None for p in parts):
            ex["truncated"] = sum(p["truncated"] * p["answers"] for p in parts) / answers
    total = sum(p["tokens"] for p in parts)
    for ev, _ in EVENT_COLUMNS:
        ex[ev] = 1000.0 * sum(p["events"][ev] for p in parts) / total if total else None
    return ex


def _units(res: dict) -> list[tuple[str, set[str]]]:
    """The independent parts of a run's results: each top-level task, and each top-level group
    with all its subtasks (recursively), as (name, every name in it)."""
    children = {g: list(subs) for g, subs in (res.get("group_subtasks") or {}).items() if isinstance(subs, list)}
    names = list(_entries(res)) + [g for g in children if g not in _entries(res)]
    is_child = {s for subs in children.values() for s in subs}

    def below(name: str, seen: set[str]) -> set[str]:
        seen.add(name)
        for s in children.get(name, []):
            if s not in seen:
                below(s, seen)
        return seen

    return [(n, below(n, set())) for n in names if n not in is_child]


def _merge_runs(rs: list[Run]) -> tuple[Run, str]:
    """One row from several runs of one configuration (``rs``, newest first) and the note saying
    where its tasks come from: each run gives its tasks (a group with all its subtasks, so that a
    group score and its subtasks' come from one run) that no newer run has."""
    taken: set[str] = set()
    contrib: list[tuple[Run, list[str], set[str]]] = []    # (run, its top-level names given, all names given)
    lost: list[tuple[Run, list[str]]] = []                  # (older run, its names a newer run has)
    for r in rs:
        mine, gone, names = [], [], set()
        for top, unit in _units(r.res):
            if unit & taken:
                gone.append(top)
            else:
                mine.append(top)
                names |= unit
        taken |= names  # after the run: its own groups may share a subtask
        if mine:
            contrib.append((r, mine, names))
        if gone:
            lost.append((r, gone))
    newest = rs[0]
    head = f"{newest.model} {newest.model_type}: {len(rs)} runs of the same configuration"
    if len(contrib) == 1:  # the newest has every task of the older ones
        return newest, (f"{head}; the newest ({_date_str(newest.date)}) is shown, older: "
                        + ", ".join(_date_str(r.date) for r in rs[1:]))
    whole = {id(r) for r in rs if not any(x is r for x, _ in lost)}
    contrib.sort(key=lambda c: c[0].order)  # columns and sources in the order the runs were given
    res = {k: v for k, v in newest.res.items() if k not in _PER_TASK_KEYS}
    for key in _PER_TASK_KEYS:
        res[key] = {}
    rows: list[dict] = []
    inputs: list[Path] = []
    for r, _, names in contrib:
        for key in _PER_TASK_KEYS:
            src = r.res.get(key)
            if isinstance(src, dict):
                res[key].update({k: v for k, v in src.items() if k in names})
        if r.rows:
            rows.extend(r.rows if id(r) in whole else [x for x in r.rows if x.get("task") in names])
        inputs.extend(r.inputs)
    merged = Run(path=newest.path, res=res, model_type=newest.model_type, model=newest.model,
                 settings=dict(newest.settings), tt_settings=set(newest.tt_settings), method=newest.method,
                 date=newest.date, sidecar=next((r.sidecar for r in rs if r.sidecar is not None), None),
                 rows=rows or None, inputs=inputs, order=min(r.order for r, _, _ in contrib),
                 parts=[(r, None if id(r) in whole else names) for r, _, names in contrib])
    note = (f"{head} make one row: " + "; ".join(f"{', '.join(mine)} from {_date_str(r.date)}"
                                                 for r, mine, _ in contrib))
    if lost:
        note += ("; not shown, a newer run has them: "
                 + "; ".join(f"{', '.join(gone)} of {_date_str(r.date)}" for r, gone in lost))
    return merged, note


def _avg(cells: dict[str, Cell], names: list[str]) -> float | None:
    vals = [cells[n].value for n in names if n in cells and cells[n].value is not None]
    return sum(vals) / len(vals) if vals else None


def build_table(targets: Iterable[str | Path], *, baseline: str = "vllm", metric: str | None = None,
                subtasks: bool = False, keep_all: bool = False, progress: bool = True,
                warn=None) -> Table:
    warnings: list[str] = []

    def _warn(msg: str) -> None:
        warnings.append(msg)
        if warn is not None:
            warn(msg)

    inputs = Inputs()
    runs = collect_runs(targets, _warn, progress, inputs)
    if not runs:
        raise NoResultsError("no readable lm-eval results among the inputs: " + "; ".join(warnings))
    notes: list[str] = []

    # runs of one model + configuration → one row of their tasks, the newest run winning a task that
    # several have (or all, labelled with their date)
    def ident(r: Run) -> tuple:
        return (r.model, r.model_type, tuple(sorted(r.settings.items())))

    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault(ident(r), []).append(r)
    kept: list[Run] = []
    for rs in groups.values():
        rs.sort(key=lambda r: r.date, reverse=True)
        if len(rs) > 1 and not keep_all:
            merged, note = _merge_runs(rs)
            notes.append(note)
            kept.append(merged)
        else:
            kept.extend(rs)
    dated = {ident(r) for r in kept if len(groups[ident(r)]) > 1} if keep_all else set()

    # hide label parts shared by all rows of a model
    by_model: dict[str, list[Run]] = {}
    for r in kept:
        by_model.setdefault(r.model, []).append(r)
    hidden: dict[str, set[str]] = {}
    for m, rs in by_model.items():
        h: set[str] = set()
        tts = [r for r in rs if r.tt_settings]
        if len(tts) > 1:
            common = set.intersection(*({f"{k}={r.settings[k]}" for k in r.tt_settings} for r in tts))
            h |= common
        if len(rs) > 1:
            gen = [{f"{k}={v}" for k, v in r.settings.items() if k not in r.tt_settings} for r in rs]
            h |= set.intersection(*gen)
        hidden[m] = h
        if h:
            notes.append(f"{m}: common settings not repeated in the labels: {', '.join(sorted(h))}")

    # expand LRS runs into selector rows
    expanded: list[Run] = []
    for r in kept:
        expanded.extend(_lrs_selector_runs(r, _warn) if r.method == "lrs" and r.rows else [r])

    cols = _columns(kept, subtasks, metric)
    if not cols:
        raise NoResultsError(f"no task in the results has the metric {metric!r}" if metric
                             else "the results files hold no numeric metrics")
    children: dict[str, list[str]] = {}
    for r in kept:
        for g, subs in (r.res.get("group_subtasks") or {}).items():
            if isinstance(subs, list):
                children.setdefault(g, [])
                children[g].extend(s for s in subs if s not in children[g])
    top = [c.name for c in cols if c.top]

    rows: list[Row] = []
    for r in expanded:
        if r.selector and not r.returned:
            cells = _selector_cells(r, cols, children)
        else:
            cells = _official_cells(r, cols)
            if r.selector:
                check = _selector_cells(r, cols, children)
                for name, c in check.items():
                    if name in cells and c.value is not None and abs(c.value - cells[name].value) > 1e-6:
                        _warn(f"{r.path}: {name}: lm-eval's {cols[[x.name for x in cols].index(name)].metric} = "
                              f"{cells[name].value:.2f} but the sidecar's per-candidate correctness of the returned "
                              f"selector gives {c.value:.2f} (the task scorer and the metric differ)")
        label = _label(r, hidden.get(r.model, set()))
        if ident(r) in dated:
            label += f" @ {_date_str(r.date)}"
        avg = _avg(cells, top)
        rows.append(Row(model=r.model, label=label, model_type=r.model_type, method=r.method,
                        settings=dict(r.settings), selector=r.selector, returned=r.returned,
                        is_baseline=r.model_type == baseline and not r.selector, cells=cells,
                        avg=Cell(avg), avg_partial=False, extras=_extras(r),
                        sources=[str(p) for p in r.inputs], date=r.date, order=r.order))

    # Δ vs the same model's baseline; "partial" average: a column another row of the model has
    for m in by_model:
        mrows = [r for r in rows if r.model == m]
        have = {n for r in mrows for n in r.cells if n in top}
        for r in mrows:
            r.avg_partial = any(n not in r.cells for n in have)
        bases = sorted((r for r in mrows if r.is_baseline), key=lambda r: r.date, reverse=True)
        if not bases:
            if any(not r.is_baseline for r in mrows) and baseline.lower() != "none":
                notes.append(f"{m}: no {baseline} baseline run; no Δ")
            continue
        base = bases[0]
        if len(bases) > 1:
            notes.append(f"{m}: several {baseline} baseline configurations; Δ is relative to {base.label!r}")
        for r in mrows:
            if r is base:
                continue
            for name, c in r.cells.items():
                b = base.cells.get(name)
                if b is not None and b.value is not None and c.value is not None:
                    c.delta = c.value - b.value
                    if c.stderr is not None and b.stderr is not None:  # independent runs
                        c.delta_stderr = math.hypot(c.stderr, b.stderr)
            common = [n for n in top if n in r.cells and n in base.cells]
            if common:
                a1, a0 = _avg(r.cells, common), _avg(base.cells, common)
                if a1 is not None and a0 is not None:
                    r.avg.delta = a1 - a0
                    ses = [r.cells[n].delta_stderr for n in common]
                    if all(se is not None for se in ses):  # the mean of independent Δs
                        r.avg.delta_stderr = math.sqrt(sum(se * se for se in ses)) / len(ses)

    # row order: model (first seen), its baseline first, then the runs in the order given; an LRS
    # run's selector rows stay together, the returned one first
    order_m = {m: i for i, m in enumerate(by_model)}
    sel_order = {s: i for i, s in enumerate(SELECTORS)}
    rows.sort(key=lambda r: (order_m[r.model], not r.is_baseline, r.order, not r.returned,
                             sel_order.get(r.selector or "", len(sel_order)), r.selector or ""))
    _full_lrs_fraction(rows)
    extra_cols = ["gen_tokens", "truncated"] + [ev for ev, _ in EVENT_COLUMNS
                                                if any((r.extras.get(ev) or 0) > 0 for r in rows)]
    extra_cols += [c for c, _ in LRS_COLUMNS if any(r.extras.get(c) is not None for r in rows)]
    if not any(r.extras.get("gen_tokens") is not None for r in rows):
        extra_cols = [c for c in extra_cols if c not in ("gen_tokens", "truncated")]
    metrics = sorted({c.metric for c in cols})
    delta = "" if baseline.lower() == "none" else f" (Δ vs the same model's {baseline} row, in points)"
    notes.insert(0, "cells: " + " / ".join(metrics) + (" × 100" if any(c.scale == 100 for c in cols) else "")
                 + " ± stderr" + delta + "; avg: unweighted mean over "
                 + ", ".join(top) + ("; * = not all columns present" if any(r.avg_partial for r in rows) else ""))
    return Table(cols, rows, extra_cols, notes, warnings, baseline, inputs)


_LRS_DEFAULTS = {k: str(v[0]) for k, v in _LRS_KEYS.items()}


def full_lrs_of(rows: list[Row]) -> dict[int, Row]:
    """Each LRS row's full-LRS row (``id(row)`` → row): the same model's returned full-LRS row
    (``stop_signal`` none; its newest run) with as many candidates — the one pairing rule of the
    ``× full`` column and ``make eval``'s online-LRS lines."""
    def n_of(r: Row) -> str:
        return r.settings.get("n_candidates", _LRS_DEFAULTS["n_candidates"])

    full = {}
    for r in sorted(rows, key=lambda r: r.date):
        if r.method == "lrs" and r.returned and r.settings.get("stop_signal", "none") == "none" \
                and r.extras.get("cand_tokens"):
            full[(r.model, n_of(r))] = r
    return {id(r): full[(r.model, n_of(r))] for r in rows if r.method == "lrs" and (r.model, n_of(r)) in full}


def _full_lrs_fraction(rows: list[Row]) -> None:
    """``cand_frac``: an LRS row's tokens per prompt as a fraction of its full-LRS row's."""
    full = full_lrs_of(rows)
    for r in rows:
        base = full.get(id(r))
        if base is not None and r.extras.get("cand_tokens") is not None:
            r.extras["cand_frac"] = r.extras["cand_tokens"] / base.extras["cand_tokens"]


def _date_str(ts: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="telltale table", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR", help="lm-eval --output_path directories or results files")
    ap.add_argument("--baseline", default="vllm", help="model type of the baseline rows (default vllm; 'none': no Δ)")
    ap.add_argument("--format", default="md", choices=["md", "csv", "latex", "json"])
    ap.add_argument("--out", help="write the table to this file (default: stdout); never an input file nor a "
                                  "path inside an input run directory")
    ap.add_argument("--plot", help="also draw Δ per task per method into this PNG (same rule as --out)")
    ap.add_argument("--metric", help="metric of every column: NAME or NAME,FILTER (default: the task's first "
                                     "higher-is-better metric)")
    ap.add_argument("--subtasks", action="store_true", help="show the subtasks of groups that have a group score")
    ap.add_argument("--all", action="store_true", dest="keep_all",
                    help="show every run of a configuration as its own row (default: one row per configuration "
                         "with the tasks of all its runs, the newest run winning a task that several have)")
    a = ap.parse_args(argv)

    def warn(msg: str) -> None:
        print(f"telltale table: warning: {msg}", file=sys.stderr)

    def error(msg: str) -> int:
        print(f"telltale table: error: {msg}", file=sys.stderr)
        return 2

    dests = [(opt, d) for opt, d in (("--out", a.out), ("--plot", a.plot)) if d]
    for opt, dest in dests:
        if Path(dest).expanduser().is_dir():
            return error(f"{opt} {dest} is a directory; give the path of a file to write")
        why = unwritable(dest)
        if why:
            return error(f"{opt} {dest}: {why}")
    if a.out and a.plot and Path(a.out).expanduser().resolve() == Path(a.plot).expanduser().resolve():
        return error(f"--out and --plot are the same file {a.out}")
    try:
        t = build_table(a.runs, baseline=a.baseline, metric=a.metric, subtasks=a.subtasks, keep_all=a.keep_all,
                        warn=warn)
    except NoResultsError as e:
        return error(str(e))
    # inputs are never written to: checked for every destination before anything is written
    for opt, dest in dests:
        why = t.inputs.conflict(dest)
        if why:
            return error(f"{opt}: {why}")
    from .plots import plot_deltas
    from .render import render

    text = render(t, a.format)

    def cannot(opt: str, dest: str, e: OSError) -> int:
        return error(f"{opt} {dest}: cannot write it: {e.strerror or e}" + (f" ({e.filename})" if e.filename else ""))

    # the checks above cannot see everything (a root process passes every permission check): every
    # directory is made first, so that nothing is written when one cannot be
    for opt, dest in dests:
        try:
            Path(dest).expanduser().parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return cannot(opt, dest, e)
    if a.out:
        try:
            Path(a.out).expanduser().write_text(text, encoding="utf-8")
        except OSError as e:
            return cannot("--out", a.out, e)
        print(f"telltale table: wrote {a.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    if a.plot:
        try:
            plot_deltas(t, Path(a.plot).expanduser())
        except OSError as e:
            return cannot("--plot", a.plot, e)
        print(f"telltale table: wrote {a.plot}", file=sys.stderr)
    return 0


