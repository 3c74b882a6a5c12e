"""Reading lm-eval run directories: results files, the telltale sidecar of a run, and the settings
that label a run (the knobs that differ from their defaults, gen_kwargs).

Inputs: run directories (searched recursively) or results files. Every ``results_*.json`` (and
lm-eval 0.4.0–0.4.2's ``results.json``) is one run; ``config.model_args`` may be a dict (0.4.13
CLI) or a ``"k=v,..."`` string. A telltale run's sidecar is found through
``config.telltale.stats_path``: first the file of that name next to the results JSON (a copied or
moved run directory), then the recorded absolute path, then the newest
``telltale_<method>_*.jsonl`` next to the results that is not newer than them. Unreadable or
partial files, and run directories without any results file (an interrupted run), are skipped
with a warning naming them. Inputs are never written to: :class:`Inputs` records every directory
and file read or listed, so that a caller can refuse to write there.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..cmdline import parse_args_string

#: settings a run's label leaves out: bookkeeping, and how a step runs rather than what it computes
#: (ALRR's ``skip_sync``: the same decisions with or without the skip)
_SKIP_KNOBS = {"record_tokens", "stats_path", "seed", "num_layers", "method", "tau_file", "tau_values", "skip_sync"}


class NoResultsError(RuntimeError):
    """A run directory (or file) that holds no lm-eval results."""


@dataclass
class Inputs:
    """Everything a table was made from: the input run directories (those given, and each results
    file's directory) and every file read or listed (results files, damaged ones included, and
    sidecars), resolved. Nothing may be written inside or over them."""

    dirs: set[Path] = field(default_factory=set)
    files: set[Path] = field(default_factory=set)

    def conflict(self, dest: str | Path) -> str | None:
        """Why ``dest`` must not be written (None: it may be)."""
        d = Path(dest).expanduser().resolve()
        if d in self.files:
            return f"refusing to overwrite the input {dest}"
        for run_dir in sorted(self.dirs):
            if d == run_dir or d.is_relative_to(run_dir):
                return (f"refusing to write {dest} inside the input run directory {run_dir} "
                        f"(inputs are never written to)")
        return None


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
    #: the runs a merged row is made of (runs of one configuration, one per task, say): (run, the
    #: task and group names it gives, or None: all of its results)
    parts: list[tuple[Run, set[str] | None]] = field(default_factory=list)


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
        from ..config import method_keys

        return {k: v[0] for k, v in method_keys(method).items()}
    except Exception:  # noqa: BLE001 - an unknown/foreign method: show every knob
        return None


def telltale_knobs(tt: dict) -> dict[str, str]:
    """The resolved settings of a telltale run that differ from their defaults."""
    from ..config import COMMON_KEYS, default_layers
    from ..spec import default_warmup

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
    if "warmup" in cfg and cfg["warmup"] != default_warmup(method, mode):  # the one warm-up rule
        out["warmup"] = _fmt_num(cfg["warmup"])
    defaults = _method_defaults(method)
    params = cfg.get("params") or {}
    unused = _unused_knobs(method, params)
    for k, v in params.items():
        if k in _SKIP_KNOBS or k in unused:
            continue
        if defaults is None or k not in defaults or defaults[k] != v:
            if isinstance(v, str) and ("/" in v or "\\" in v):
                v = _file_label(v)  # a file (e.g. suppress match_stats)
            out[k] = _short(json.dumps(v) if isinstance(v, dict) else _fmt_num(v))
    if tt.get("preset"):
        out["config"] = Path(str(tt["preset"])).stem
    return out


def _unused_knobs(method: str, params: dict) -> set[str]:
    """Knobs the run's other settings leave unused (the method module's ``unused_knobs``): a label
    does not show them."""
    from ..core.methods import method_module

    try:
        fn = getattr(method_module(method), "unused_knobs", None)
    except ValueError:
        return set()
    return set(fn(params)) if fn is not None else set()


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
        sidecars = sorted(p.rglob("telltale_*.jsonl"))
        if sidecars:  # lm-eval died (or was stopped) before writing its results: the sidecar has the answers so far
            held = "; ".join(f"{sc} holds {_count_answers(sc)} answers" for sc in sidecars[:3])
            raise NoResultsError(
                f"{p}: no lm-eval results here (no results_*.json below it) — an interrupted run? its sidecar "
                f"{held}{'; ...' if len(sidecars) > 3 else ''}. lm-eval writes the results file only at the end of a run")
        raise NoResultsError(
            f"{p}: no lm-eval results here (no results_*.json below it). lm-eval writes that file only at the "
            f"end of a run — did the run finish, and was --output_path this directory?")
    return files


def samples_path(res_path: Path, task: str) -> Path | None:
    """lm-eval's logged samples of ``task`` for the run of ``res_path`` (``samples_<task>_<stamp>.jsonl``
    of the same timestamp, else the newest of that task's), None when there are none."""
    stamp = res_path.stem[len("results_"):] if res_path.stem.startswith("results_") else ""
    pat = re.compile(rf"^samples_{re.escape(task)}_\d{{4}}-\d\d-\d\dT.*\.jsonl$")  # not another task's prefix
    cands = sorted(res_path.parent.glob(f"samples_{glob_escape(task)}_{stamp}.jsonl")) or sorted(
        f for f in res_path.parent.glob(f"samples_{glob_escape(task)}_*.jsonl") if pat.match(f.name))
    return cands[-1] if cands else None


def glob_escape(s: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", s)


def read_samples(path: Path) -> list[dict]:
    """The samples of an lm-eval ``samples_*.jsonl`` (unreadable lines skipped)."""
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            s = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(s, dict):
            out.append(s)
    return out


def _count_answers(sidecar: Path) -> int | str:
    from ..sidecar import read_sidecar

    try:
        return len(read_sidecar(sidecar, lambda msg: None))
    except OSError:
        return "?"


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
    """A run's sidecar rows (:func:`lm_eval_telltale.sidecar.read_sidecar`); None when nothing in it
    is readable."""
    from ..sidecar import read_sidecar

    try:
        rows = read_sidecar(path, warn)
    except OSError as e:
        warn(f"skipping sidecar {path}: {e}")
        return None
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
    margs = parse_args_string(cfg.get("model_args"))
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
    gk = parse_args_string(gk) if gk else {}
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


def collect_runs(targets: Iterable[str | Path], warn, progress: bool = True,
                 inputs: Inputs | None = None) -> list[Run]:
    """The readable runs of ``targets``; a target without results (an interrupted run, a wrong
    path) and unreadable files are skipped with a warning. ``inputs`` collects what was read or
    listed."""
    from tqdm.auto import tqdm

    inputs = inputs if inputs is not None else Inputs()
    files: list[Path] = []
    for t in targets:
        p = Path(t).expanduser()
        (inputs.files if p.is_file() else inputs.dirs).add(p.resolve())
        try:
            found = results_files(p)
        except NoResultsError as e:
            warn(f"skipping {e}")
            continue
        for f in found:
            inputs.files.add(f.resolve())
            inputs.dirs.add(f.parent.resolve())
        files.extend(found)
    seen, runs = set(), []
    for f in tqdm(files, desc="telltale table: reading runs", unit="run", disable=None if progress else True):
        rf = f.resolve()
        if rf in seen:
            continue
        seen.add(rf)
        r = load_run(f, warn)
        if r is not None:
            inputs.files.update(x.resolve() for x in r.inputs)
            r.order = len(runs)
            runs.append(r)
    return runs


def is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
