"""``telltale table``: one comparison table from lm-eval run directories and the telltale sidecars.

Inputs: run directories (searched recursively) or results files. Every ``results_*.json`` (and
lm-eval 0.4.0–0.4.2's ``results.json``) is one run; metric keys are ``"metric,filter"``, a stderr
may be ``"N/A"``, ``config.model_args`` may be a dict (0.4.13 CLI) or a ``"k=v,..."`` string. A
telltale run's sidecar is found through ``config.telltale.stats_path``: first the file of that
name next to the results JSON (a copied or moved run directory), then the recorded absolute path,
then the newest ``telltale_<method>_*.jsonl`` next to the results that is not newer than them.
Unreadable or partial files are skipped with a warning naming them; a run directory without any
results file is an error (:class:`NoResultsError`). Inputs are never written to.

Rows: one per model × method configuration. The configuration label is the model type's method
name plus the knobs that differ from their defaults (``TelltaleConfig`` after resolution, method
knobs from the method's ``KEYS``) and the ``--gen_kwargs``; knobs shared by every telltale row of
a model (and gen_kwargs shared by every row) are moved to the notes under the table. An ``vllm-lrs``
run gives one row per selector (the norm scores, ``maj``, ``conf``, ``random``, ``first``) from
the same traces: accuracy "if selector X had been used" = the mean over the sidecar rows of
``candidates[picks[X]]["correct"]`` (per document first, repeats averaged, as lm-eval does); the
selector the run returned keeps lm-eval's own numbers.

**Duplicates.** Two runs with the same model and configuration (model type, resolved knobs,
gen_kwargs): the newest (results ``date``) wins and the older ones are listed in the notes;
``keep_all=True`` (``--all``) shows every run, labelled with its date.

Columns: one per task and group (a group with an aggregated score stands for its subtasks unless
``subtasks=True``; subtasks of a group without one are shown), then ``avg`` — the unweighted mean
over those columns (``*``: the row lacks some of them) — then, from the sidecars: mean generated
tokens per answer, truncation rate (finish_reason == "length"), and per 1,000 generated tokens the
accepted recursions (ALRR), injections (ERSS) and suppressions (event counts summed over the
patched layers, so several per token are possible). Cells: metric × 100 (when the metric is a
fraction) ± stderr, and Δ in points vs the same model's baseline row (model type ``--baseline``,
default ``vllm``; its newest configuration when there are several). The metric of a column is
the first ``higher_is_better`` metric of the task (``exact_match,none`` for the telltale tasks)
unless ``metric=`` names one (``exact_match`` or ``exact_match,flexible-extract``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

EVENT_COLUMNS = (("accepted", "rec/1k"), ("injected", "inj/1k"), ("suppressed", "sup/1k"))
SELECTOR_ORDER = ("late_sum", "mean", "A", "B", "C", "D", "maj", "conf", "random", "first")
_SKIP_KNOBS = {"record_tokens", "stats_path", "seed", "num_layers", "method", "tau_file", "tau_values"}
_META_KEYS = {"name", "alias", "sample_len", "sample_count", " ", ""}


class NoResultsError(RuntimeError):
    """A run directory (or file) that holds no lm-eval results."""


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------

@dataclass
class Run:
    path: Path                      # the results JSON
    res: dict
    model_type: str
    model: str                      # display id of the checkpoint
    settings: dict[str, str]        # knobs differing from defaults + gen_kwargs (label material)
    tt_settings: set[str]           # which of ``settings`` are telltale knobs
    method: str
    date: float
    sidecar: Path | None = None
    rows: list[dict] | None = None
    selector: str | None = None     # LRS: the selector of this row (None: the run as returned)
    returned: bool = True           # LRS: this selector's pick is what lm-eval scored
    label: str = ""
    key: tuple = ()
    inputs: list[Path] = field(default_factory=list)
    order: int = 0                  # position among the inputs (row order)


def parse_model_args(v: Any) -> dict[str, Any]:
    if isinstance(v, dict):
        return dict(v)
    if not v:
        return {}
    out: dict[str, Any] = {}
    for part in str(v).split(","):
        if "=" in part:
            k, val = part.split("=", 1)
            out[k.strip()] = val.strip()
        elif out:  # a comma inside a value ("a=1,2"): glue it back
            last = next(reversed(out))
            out[last] = f"{out[last]},{part}"
    return out


def model_id(res: dict, margs: dict[str, Any]) -> str:
    for k in ("pretrained", "model", "path", "engine", "peft", "delta"):
        if margs.get(k):
            m = str(margs[k])
            break
    else:
        m = str(res.get("model_name") or "?")
    if m.startswith(("/", "./", "../", "~")) or "\\" in m:
        return Path(m.rstrip("/")).name or m
    return m


def _fmt_num(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return "[" + ",".join(_fmt_num(x) for x in v) + "]"
    return str(v)


def _fmt_layers(layers: list[int]) -> str:
    parts, i = [], 0
    while i < len(layers):
        j = i
        while j + 1 < len(layers) and layers[j + 1] == layers[j] + 1:
            j += 1
        parts.append(str(layers[i]) if i == j else f"{layers[i]}-{layers[j]}")
        i = j + 1
    return ";".join(parts)


def _method_defaults(method: str) -> dict[str, Any] | None:
    try:
        from .config import method_keys

        return {k: v[0] for k, v in method_keys(method).items()}
    except Exception:  # noqa: BLE001 - an unknown/foreign method: show every knob
        return None


def telltale_knobs(tt: dict) -> dict[str, str]:
    """The resolved settings of a telltale run that differ from their defaults."""
    from .config import COMMON_KEYS, default_layers

    cfg = tt.get("config") or {}
    out: dict[str, str] = {}
    n = cfg.get("num_layers")
    layers = cfg.get("layers")
    if layers and (not isinstance(n, int) or list(layers) != default_layers(n)):
        out["layers"] = _fmt_layers(sorted(int(x) for x in layers))
    mode = cfg.get("tau_mode", "request")
    if mode != "request":
        out["tau_mode"] = mode
    if mode == "calibrated":
        if cfg.get("tau_file"):
            out["tau_file"] = _file_label(cfg["tau_file"])
        if cfg.get("tau_q") is not None:
            out["tau_q"] = _fmt_num(cfg["tau_q"])
    if mode == "fixed" and cfg.get("tau_values"):
        vals = cfg["tau_values"]
        out["tau"] = _fmt_num(vals[0]) if len(set(vals)) == 1 else _short(_fmt_num(vals))
    for k in ("iqr_k", "min_iqr", "tau_floor"):
        if k in cfg and cfg[k] != COMMON_KEYS[k][0]:
            out[k] = _fmt_num(cfg[k])
    method = cfg.get("method") or tt.get("method") or "?"
    if "warmup" in cfg:
        dflt = 64 if mode == "request" else (200 if method == "erss" else 500)
        if cfg["warmup"] != dflt:
            out["warmup"] = _fmt_num(cfg["warmup"])
    defaults = _method_defaults(method)
    for k, v in (cfg.get("params") or {}).items():
        if k in _SKIP_KNOBS:
            continue
        if defaults is None or k not in defaults or defaults[k] != v:
            if isinstance(v, str) and ("/" in v or "\\" in v):
                v = _file_label(v)  # a file (e.g. suppress match_stats)
            out[k] = _short(json.dumps(v) if isinstance(v, dict) else _fmt_num(v))
    if tt.get("preset"):
        out["config"] = Path(str(tt["preset"])).stem
    return out


#: the timestamp lm-eval puts in its file names (results_2026-11-22T14-01-29.202304.json) and our
#: sidecars copy (telltale_suppress_2026-11-22T14-01-29.202304.jsonl)
_STAMP = r"\d{4}-\d\d-\d\dT\d\d[-:]\d\d[-:]\d\d(?:\.\d+)?"


def _file_label(path) -> str:
    """A file setting as a label shows: its name without the timestamp (a sidecar's name carries
    its run's time, which would make every rerun's table differ)."""
    return re.sub("_?" + _STAMP, "", Path(str(path)).name)


def _short(s: str, n: int = 40) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _timestamp_of(name: str) -> str:
    m = re.search(_STAMP, name)
    return m.group(0) if m else ""


def _date_of(path: Path, res: dict) -> float:
    d = res.get("date")
    if isinstance(d, (int, float)):
        return float(d)
    try:
        return float(d)
    except (TypeError, ValueError):
        pass
    ts = _timestamp_of(path.name)
    if ts:
        import datetime as dt

        try:
            return dt.datetime.strptime(ts, "%Y-%m-%dT%H-%M-%S.%f").timestamp()
        except ValueError:
            pass
    return path.stat().st_mtime


def results_files(target: str | Path) -> list[Path]:
    p = Path(target).expanduser()
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise NoResultsError(f"{p}: no such file or directory")
    files = sorted({*p.rglob("results_*.json"), *p.rglob("results.json")})
    if not files:
        raise NoResultsError(
            f"{p}: no lm-eval results here (no results_*.json below it). lm-eval writes that file only at the "
            f"end of a run — did the run finish, and was --output_path this directory?")
    return files


def find_sidecar(results_path: Path, res: dict) -> Path | None:
    tt = (res.get("config") or {}).get("telltale") or {}
    if not tt:
        return None
    sp = tt.get("stats_path") or (tt.get("config") or {}).get("stats_path")
    if sp:
        beside = results_path.parent / Path(sp).name
        if beside.is_file():
            return beside
        if Path(sp).is_file():
            return Path(sp)
    stamp = _timestamp_of(results_path.name)
    method = tt.get("method", "*")
    cands = sorted(results_path.parent.glob(f"telltale_{method}_*.jsonl"))
    cands = [c for c in cands if not stamp or _timestamp_of(c.name) <= stamp]
    return cands[-1] if cands else None


def read_sidecar_rows(path: Path, warn) -> list[dict] | None:
    rows, bad = [], []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        warn(f"skipping sidecar {path}: {e}")
        return None
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad.append(i)
            continue
        if isinstance(row, dict) and "task" in row and "doc_id" in row:
            rows.append(row)
        else:
            bad.append(i)
    if bad:
        warn(f"sidecar {path}: skipped {len(bad)} unreadable or partial line(s) ({', '.join(map(str, bad[:5]))}"
             f"{', ...' if len(bad) > 5 else ''})")
    if not rows:
        warn(f"sidecar {path}: no readable rows; its statistics are left out")
        return None
    return rows


def load_run(path: Path, warn) -> Run | None:
    try:
        res = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        warn(f"skipping {path}: unreadable or partial JSON ({e.__class__.__name__}: {e})")
        return None
    if not isinstance(res, dict) or not isinstance(res.get("results"), dict) or not res["results"]:
        warn(f"skipping {path}: not an lm-eval results file (no 'results' mapping)")
        return None
    cfg = res.get("config") if isinstance(res.get("config"), dict) else {}
    margs = parse_model_args(cfg.get("model_args"))
    model_type = str(cfg.get("model") or "?")
    tt = cfg.get("telltale") if isinstance(cfg.get("telltale"), dict) else None
    settings: dict[str, str] = {}
    tt_keys: set[str] = set()
    method = model_type
    if tt:
        method = str(tt.get("method") or model_type)
        try:
            settings = telltale_knobs(tt)
        except Exception as e:  # noqa: BLE001
            warn(f"{path}: cannot read config.telltale ({e}); its knobs are left out of the label")
        tt_keys = set(settings)
    for k in ("enable_thinking",):
        if k in margs:
            settings[k] = _fmt_num(margs[k])
    if "chat_template" in res:  # lm-eval >= 0.4.3 records whether --apply_chat_template was on
        settings["chat_template"] = "on" if res.get("chat_template") else "off"
    gk = cfg.get("gen_kwargs")
    gk = parse_model_args(gk) if gk else {}
    for k, v in gk.items():
        settings[k] = _fmt_num(v)
    run = Run(path=path, res=res, model_type=model_type, model=model_id(res, margs), settings=settings,
              tt_settings=tt_keys, method=method, date=_date_of(path, res), inputs=[path])
    if tt:
        sc = find_sidecar(path, res)
        if sc is None:
            warn(f"{path}: telltale run without its sidecar (stats_path {tt.get('stats_path')!r} not found); "
                 f"sidecar columns come from the run summary")
        else:
            run.sidecar = sc
            run.inputs.append(sc)
            run.rows = read_sidecar_rows(sc, warn)
    return run


def collect_runs(targets: Iterable[str | Path], warn, progress: bool = True) -> list[Run]:
    from tqdm.auto import tqdm

    files: list[Path] = []
    for t in targets:
        files.extend(results_files(t))
    seen, runs = set(), []
    for f in tqdm(files, desc="telltale table: reading runs", unit="run", disable=None if progress else True):
        rf = f.resolve()
        if rf in seen:
            continue
        seen.add(rf)
        r = load_run(f, warn)
        if r is not None:
            r.order = len(runs)
            runs.append(r)
    return runs


# --------------------------------------------------------------------------------------------
# the table model
# --------------------------------------------------------------------------------------------

@dataclass
class Cell:
    value: float | None = None
    stderr: float | None = None
    delta: float | None = None
    n: int | None = None


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

    # -- renderers -------------------------------------------------------------------------------
    def to_markdown(self) -> str:
        return render(self, "md")

    def to_dict(self) -> dict[str, Any]:
        def c(cell: Cell) -> dict[str, Any]:
            return {"value": cell.value, "stderr": cell.stderr, "delta": cell.delta, "n": cell.n}

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


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


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
    lab = run.method + (f" ({', '.join(parts)})" if parts else "")
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


def _lrs_selector_runs(run: Run, warn) -> list[Run]:
    """One pseudo-run per selector from an LRS run's sidecar rows (``candidates`` + ``picks``)."""
    rows = [r for r in (run.rows or []) if isinstance(r.get("picks"), dict) and isinstance(r.get("candidates"), list)]
    if not rows:
        return [run]
    chosen = next((r.get("chosen") for r in rows if r.get("chosen")), None)
    sels: list[str] = []
    for r in rows:
        for s in r["picks"]:
            if s not in sels:
                sels.append(s)
    order = {s: i for i, s in enumerate(SELECTOR_ORDER)}
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


def _extras(run: Run) -> dict[str, float | None]:
    ex: dict[str, float | None] = {"gen_tokens": None, "truncated": None}
    for ev, _ in EVENT_COLUMNS:
        ex[ev] = None
    rows = run.rows
    if rows:
        if run.selector:
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
        gen = [r.get("n_generated_tokens") for r in rows if _is_num(r.get("n_generated_tokens"))]
        total = sum(gen)
        ex["gen_tokens"] = total / len(gen) if gen else None
        ex["truncated"] = sum(r.get("finish_reason") == "length" for r in rows) / len(rows)
        for ev, _ in EVENT_COLUMNS:
            cnt = sum(int(st.get(ev, 0) or 0) for r in rows for st in (r.get("layers") or {}).values()
                      if isinstance(st, dict))
            ex[ev] = 1000.0 * cnt / total if total else None
        return ex
    summ = (((run.res.get("config") or {}).get("telltale") or {}).get("summary")) or {}
    if summ.get("answers"):
        gen = summ.get("generated_tokens") or 0
        ex["gen_tokens"] = gen / summ["answers"]
        ex["truncated"] = summ.get("finish_length_rate")
        for ev, _ in EVENT_COLUMNS:
            tot = (summ.get(ev) or {}).get("total", 0) if isinstance(summ.get(ev), dict) else 0
            ex[ev] = 1000.0 * tot / gen if gen else None
    return ex


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

    runs = collect_runs(targets, _warn, progress)
    if not runs:
        raise NoResultsError("no readable lm-eval results among the inputs: " + "; ".join(warnings))
    notes: list[str] = []

    # duplicates: same model + configuration → newest wins (or all, labelled with their date)
    def ident(r: Run) -> tuple:
        return (r.model, r.model_type, tuple(sorted(r.settings.items())))

    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault(ident(r), []).append(r)
    kept: list[Run] = []
    for key, rs in groups.items():
        rs.sort(key=lambda r: r.date, reverse=True)
        if len(rs) > 1 and not keep_all:
            notes.append(f"{rs[0].model} {rs[0].model_type}: {len(rs)} runs of the same configuration; the newest "
                         f"({_date_str(rs[0].date)}) is shown, older: "
                         + ", ".join(_date_str(r.date) for r in rs[1:]))
            kept.append(rs[0])
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
            common = [n for n in top if n in r.cells and n in base.cells]
            if common:
                a1, a0 = _avg(r.cells, common), _avg(base.cells, common)
                if a1 is not None and a0 is not None:
                    r.avg.delta = a1 - a0

    # row order: model (first seen), its baseline first, then the runs in the order given; an LRS
    # run's selector rows stay together, the returned one first
    order_m = {m: i for i, m in enumerate(by_model)}
    sel_order = {s: i for i, s in enumerate(SELECTOR_ORDER)}
    rows.sort(key=lambda r: (order_m[r.model], not r.is_baseline, r.order, not r.returned,
                             sel_order.get(r.selector or "", len(sel_order)), r.selector or ""))
    extra_cols = ["gen_tokens", "truncated"] + [ev for ev, _ in EVENT_COLUMNS
                                                if any((r.extras.get(ev) or 0) > 0 for r in rows)]
    if not any(r.extras.get("gen_tokens") is not None for r in rows):
        extra_cols = [c for c in extra_cols if c not in ("gen_tokens", "truncated")]
    metrics = sorted({c.metric for c in cols})
    notes.insert(0, "cells: " + " / ".join(metrics) + (" × 100" if any(c.scale == 100 for c in cols) else "")
                 + " ± stderr (Δ vs the same model's " + baseline + " row, in points); avg: unweighted mean over "
                 + ", ".join(top) + ("; * = not all columns present" if any(r.avg_partial for r in rows) else ""))
    return Table(cols, rows, extra_cols, notes, warnings, baseline)


def _date_str(ts: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------

EXTRA_HEAD = {"gen_tokens": "gen tok", "truncated": "trunc %", **{ev: h for ev, h in EVENT_COLUMNS}}


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
    if name == "gen_tokens":
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


def results_table(run_dirs, fmt: str = "md", **kw) -> str:
    """The table of ``run_dirs`` rendered as ``fmt`` (Markdown by default); see :func:`build_table`."""
    return render(build_table(run_dirs, **kw), fmt)


# --------------------------------------------------------------------------------------------
# plot
# --------------------------------------------------------------------------------------------

def plot_deltas(t: Table, path: str | Path) -> Path:
    """Grouped bars: Δ (points) vs the baseline per column (and avg), one bar per non-baseline row,
    one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = []
    for r in t.rows:
        if r.model not in models:
            models.append(r.model)
    cols = [c.name for c in t.columns] + ["avg"]
    nmax = max([sum(1 for r in t.rows if r.model == m and not r.is_baseline) for m in models] + [1])
    cmap = plt.get_cmap("tab10" if nmax <= 10 else "tab20")
    fig, axes = plt.subplots(len(models), 1, figsize=(min(14.0, max(5.0, 0.22 * nmax * len(cols) + 2.5)) + 4.0,
                                                      max(3.2, 0.9 + 0.22 * nmax) * len(models)), squeeze=False)
    for ax, m in zip(axes[:, 0], models):
        rows = [r for r in t.rows if r.model == m and not r.is_baseline]
        width = 0.8 / max(1, len(rows))
        for i, r in enumerate(rows):
            ys = [(r.cells.get(c).delta if r.cells.get(c) else None) for c in cols[:-1]] + [r.avg.delta]
            xs = [k + (i - (len(rows) - 1) / 2) * width for k in range(len(cols))]
            color = cmap(i % cmap.N)
            ax.bar(xs, [y if y is not None else 0.0 for y in ys], width=width * 0.92, label=r.label, color=color)
            # a dot on every value, so a Δ of exactly 0 is still visible
            ax.scatter([x for x, y in zip(xs, ys) if y is not None], [y for y in ys if y is not None],
                       s=10, color=color, zorder=3, edgecolors="black", linewidths=0.3)
        ax.axhline(0.0, color="black", linewidth=0.8)
        for k in range(1, len(cols)):
            ax.axvline(k - 0.5, color="#dddddd", linewidth=0.6)
        ax.set_xticks(range(len(cols)))
        ax.set_xticklabels([c.replace("telltale_", "") for c in cols], rotation=20, ha="right", fontsize=8)
        ax.set_xlim(-0.5, len(cols) - 0.5)
        lo, hi = ax.get_ylim()
        if hi - lo < 2.0:  # all Δ ≈ 0: keep a readable ±1 point scale
            ax.set_ylim(min(lo, -1.0), max(hi, 1.0))
        ax.set_ylabel(f"Δ vs {t.baseline} (points)")
        ax.set_title(m if rows else f"{m} (no rows to compare)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        if rows:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return save_figure(fig, path)


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
    ap.add_argument("--out", help="write the table here (default: stdout); never one of the inputs")
    ap.add_argument("--plot", help="also draw Δ per task per method into this PNG")
    ap.add_argument("--metric", help="metric of every column: NAME or NAME,FILTER (default: the task's first "
                                     "higher-is-better metric)")
    ap.add_argument("--subtasks", action="store_true", help="show the subtasks of groups that have a group score")
    ap.add_argument("--all", action="store_true", dest="keep_all",
                    help="show every run of a repeated configuration (default: the newest wins)")
    a = ap.parse_args(argv)

    def warn(msg: str) -> None:
        print(f"telltale table: warning: {msg}", file=sys.stderr)

    try:
        t = build_table(a.runs, baseline=a.baseline, metric=a.metric, subtasks=a.subtasks, keep_all=a.keep_all,
                        warn=warn)
    except NoResultsError as e:
        print(f"telltale table: error: {e}", file=sys.stderr)
        return 2
    inputs = {Path(s).resolve() for r in t.rows for s in r.sources}
    for dest in (a.out, a.plot):
        if dest and Path(dest).resolve() in inputs:
            print(f"telltale table: error: refusing to overwrite the input {dest}", file=sys.stderr)
            return 2
    text = render(t, a.format)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text, encoding="utf-8")
        print(f"telltale table: wrote {a.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    if a.plot:
        plot_deltas(t, a.plot)
        print(f"telltale table: wrote {a.plot}", file=sys.stderr)
    return 0


def save_figure(fig, path: str | Path) -> Path:
    """Lay out, write (PNG, 120 dpi, parent dirs created) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
