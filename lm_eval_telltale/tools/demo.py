"""``make eval``: the main job on the embedded default, offline.

The shipped tiny reasoning model (:func:`lm_eval_telltale.arith.model_dir`, trained by
:mod:`lm_eval_telltale.arith.train`) on ``telltale_arith`` (the generator's held-out split, 4
difficulty levels, generated in process), through the real ``lm_eval`` console script:

1. ``vllm`` — stock lm-eval vLLM, the baseline;
2. ``vllm-norms`` — observation only (must equal the baseline);
3. ``vllm-alrr``, 4. ``vllm-erss``, 5. ``vllm-lrs`` (8 candidates) — the methods; 6.–7. online
   LRS (``stop_signal=norm`` and ``conf``: weak candidates stopped early) beside it;
8. ``vllm-suppress`` (high-norm tokens) and 9. ``vllm-suppress`` at the same per-layer rate on
   random tokens (``suppress_mode=matched`` with ``match_stats=`` the sidecar of run 8) — the
   paper's causal ablation;

all with the model's preset ``config=telltale-arith`` (``model_configs/telltale-arith.yaml``: the
methods' token-count knobs scaled to ~60-token answers). The nine runs are the cells of
``grids/arith.yaml`` run by ``telltale grid`` (:mod:`lm_eval_telltale.tools.grid`), so a rerun only
does what is not done yet (an interrupted ``make eval`` resumes; a changed setting is a new cell).
Then ``telltale table`` → printed, and written to ``results/arith.md`` (+ ``arith.json``, the Δ plot
``arith.png``, LRS's accuracy against tokens ``arith-lrs.png``) with the suppression ablation's
verdict and online LRS's token savings. Greedy decoding (LRS samples with the
preset's settings) and fixed seeds: rerunning gives the same table on the same machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .plots import lrs_cost_rows, plot_deltas, plot_lrs_cost
from .render import render
from .runs import results_files
from .table import build_table, full_lrs_of

ROOT = Path(__file__).resolve().parents[2]
TASK = "telltale_arith"


def grid_file() -> Path:
    from .. import grids_dir

    return grids_dir() / "arith.yaml"


def run_names() -> list[str]:
    """The runs of ``make eval``: the methods of ``grids/arith.yaml``, in order."""
    import yaml

    return [m["name"] for m in yaml.safe_load(grid_file().read_text(encoding="utf-8"))["methods"]]


def eval_grid(work: Path, model: Path, limit: int | None, only: list[str] | None, inprocess: bool) -> Path:
    """``grids/arith.yaml`` with this invocation's settings, written to ``work`` (its output root
    there too); ``only`` keeps those runs and the runs they depend on."""
    import yaml

    from .grid.spec import SIDECAR_REF

    raw = yaml.safe_load(grid_file().read_text(encoding="utf-8"))
    raw["output"] = str(work / "grid")
    raw["models"][0]["pretrained"] = str(model)
    if limit:
        raw["limit"] = limit
    if only:
        keep = set(only)
        for m in raw["methods"]:  # a run's dependencies come along (suppress-matched reads suppress-high)
            if m["name"] in keep:
                keep.update(SIDECAR_REF.findall(json.dumps(m.get("model_args") or {})))
        raw["methods"] = [m for m in raw["methods"] if m["name"] in keep]
    # the caller's engine settings do not leak into the runs (null: unset for the cells)
    raw.setdefault("env", {}).update(VLLM_CPU_KVCACHE_SPACE=None, VLLM_ENABLE_V1_MULTIPROCESSING="0" if inprocess else None)
    path = work / "arith.grid.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def code_digest() -> str:
    """A digest of the package's code, tasks and presets: ``make eval`` reruns a cell after any
    change to them (an editable install keeps its version number while the code changes)."""
    import hashlib

    from .. import model_configs_dir, tasks_dir

    h = hashlib.sha1()
    pkg = Path(__file__).resolve().parents[1]
    for root, pats in ((pkg, ("*.py",)), (tasks_dir(), ("*.yaml", "*_yaml")), (model_configs_dir(), ("*.yaml",))):
        for f in sorted(x for pat in pats for x in root.rglob(pat)):
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def run_dirs(work: Path) -> dict[str, Path]:
    """The lm-eval output directory of each run (cell) of the last ``make eval`` in ``work``."""
    from .grid.cells import cell_dir
    from .grid.spec import load_grid

    grid = load_grid(work / "arith.grid.yaml", salt=code_digest())
    return {c.method: cell_dir(grid.output, c) / "out" for c in grid.cells}


def _latest(run_dir: Path) -> tuple[Path, dict] | None:
    """(path, parsed) of the newest lm-eval results file under ``run_dir``."""
    files = results_files(run_dir) if run_dir.exists() else []
    return (files[-1], json.loads(files[-1].read_text())) if files else None


def _counters(run_dir: Path) -> dict:
    latest = _latest(run_dir)
    tt = ((latest[1].get("config") or {}).get("telltale") or {}) if latest else {}
    return (tt.get("summary") or {}) if isinstance(tt, dict) else {}


def ablation_verdict(t, task: str = TASK) -> str:
    """One honest sentence on the paper's suppression pattern from the built table."""
    rows = {r.label: r for r in t.rows if r.model_type == "vllm-suppress"}
    base = next((r for r in t.rows if r.is_baseline), None)
    high = next((r for lbl, r in rows.items() if "matched" not in lbl), None)
    rand = next((r for lbl, r in rows.items() if "matched" in lbl), None)
    if not (base and high and rand):
        return "Suppression ablation: incomplete (missing runs)."

    def acc(r):
        c = r.cells.get(task)
        return None if c is None else c.value

    b, h, m = acc(base), acc(high), acc(rand)
    if None in (b, h, m):
        return "Suppression ablation: no accuracy for one of the runs."
    dh, dm = h - b, m - b  # cells are in points (accuracy × 100)
    shows = dh < dm
    return (f"Suppression ablation on {task}: high-norm suppression Δ = {dh:+.1f} points, rate-matched random "
            f"suppression Δ = {dm:+.1f} points vs the baseline — "
            + ("the paper's qualitative pattern (suppressing high-norm tokens hurts more than suppressing as many "
               "random tokens) holds here." if shows else
               "the paper's qualitative pattern (high-norm suppression hurting more than rate-matched random "
               "suppression) does NOT hold on this model and task."))


def online_lrs_summary(t, task: str = TASK) -> list[str]:
    """One line per online-LRS row: its tokens per prompt against full LRS's and its accuracy change
    (with the stderr of the difference, the runs being treated as independent)."""
    full_of = full_lrs_of(t.rows)
    out = []
    for r in t.rows:
        full = full_of.get(id(r))
        if not r.returned or full is None or full is r or r.extras.get("cand_frac") is None:
            continue
        c, f = r.cells.get(task), full.cells.get(task)
        if c is None or f is None or c.value is None or f.value is None:
            continue
        se = (c.stderr ** 2 + f.stderr ** 2) ** 0.5 if c.stderr is not None and f.stderr is not None else None
        saved = 1.0 - r.extras["cand_frac"]
        out.append(f"Online LRS ({r.settings.get('stop_signal')}) on {task}: {r.extras['cand_tokens']:.0f} tokens per "
                   f"prompt vs {full.extras['cand_tokens']:.0f} for full LRS ({100 * saved:.0f} % fewer), "
                   f"{r.extras.get('stopped') or 0:.2f} candidates stopped per prompt; accuracy {c.value:.1f} vs "
                   f"{f.value:.1f} ({c.value - f.value:+.1f} points" + (f", stderr {se:.1f})" if se is not None else ")"))
    return out


def main(argv=None) -> int:
    from ..arith import model_dir

    ap = argparse.ArgumentParser(prog="make eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=str(ROOT / ".cache" / "eval"), help="run directories and logs")
    ap.add_argument("--results", default=str(ROOT / "results"), help="where arith.md / .json / .png go")
    ap.add_argument("--model", default=str(model_dir()), help="model directory (default: the shipped one)")
    ap.add_argument("--limit", type=int, default=None, help="problems per level (default: all 75)")
    ap.add_argument("--only", default=None, help="comma-separated run names to do (default: all: "
                    + ",".join(run_names()) + ")")
    ap.add_argument("--inprocess", action="store_true",
                    help="run each lm_eval's vLLM engine core in its process (VLLM_ENABLE_V1_MULTIPROCESSING=0: "
                         "~3 s instead of ~20 s to start; the regression tests use it)")
    a = ap.parse_args(argv)
    model = Path(a.model)
    if not (model / "config.json").is_file():
        ap.error(f"no model at {model} (config.json missing)")
    runs = run_names()
    if a.only:
        want = [x.strip() for x in a.only.split(",") if x.strip()]
        unknown = sorted(set(want) - set(runs))
        if unknown:
            ap.error(f"--only: unknown run(s) {unknown}; known: {runs}")
        runs = [r for r in runs if r in want]
    work = Path(a.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    from .grid.cells import cell_dir
    from .grid.cells import state_of as cell_state
    from .grid.execute import run_cells
    from .grid.spec import GridError, load_grid

    try:
        grid = load_grid(eval_grid(work, model.absolute(), a.limit, runs if a.only else None, a.inprocess),
                         salt=code_digest())
    except GridError as e:
        print(f"[eval] {e}", file=sys.stderr)
        return 2
    todo = [c for c in grid.cells if cell_state(grid.output, c)[0] != "done"]
    print(f"[eval] model {model}\n[eval] task {TASK} ({'all' if not a.limit else a.limit} problems per level): "
          f"{len(grid.cells)} runs of grids/{grid_file().name}, {len(grid.cells) - len(todo)} done already; "
          f"run directories and logs in {grid.output / 'cells'}", flush=True)
    t_all = time.time()
    outcome = run_cells(grid, todo)
    if outcome.failed or outcome.interrupted:
        return 130 if outcome.interrupted else 1
    dirs = []
    for c in grid.cells:
        out = cell_dir(grid.output, c) / "out"
        s = _counters(out)
        extra_info = ", ".join(f"{k}: {v['per_1k_tokens']:.1f}/1k tokens" for k, v in s.items()
                               if isinstance(v, dict) and "per_1k_tokens" in v)
        print(f"[eval]     {c.method}" + (f" ({extra_info})" if extra_info else ""), flush=True)
        dirs.append(out)
    # subtasks: the difficulty levels get their own columns (the group score stays the first one)
    t = build_table(dirs, baseline="vllm", subtasks=True, progress=False,
                    warn=lambda m: print(f"[eval] warning: {m}", file=sys.stderr))
    table = render(t, "md")
    verdict = "\n".join([ablation_verdict(t)] + online_lrs_summary(t))
    res = Path(a.results)
    res.mkdir(parents=True, exist_ok=True)
    head = (f"<!-- written by `make eval` ({len(grid.cells)} runs, {'full split' if not a.limit else f'--limit {a.limit}'}); "
            f"rerun to reproduce -->\n")
    (res / "arith.md").write_text(head + table + "\n" + verdict + "\n")
    (res / "arith.json").write_text(json.dumps(t.to_dict(), indent=2, default=str) + "\n")
    png = plot_deltas(t, res / "arith.png")
    if lrs_cost_rows(t):
        plot_lrs_cost(t, res / "arith-lrs.png", TASK)
    print("\n" + table + "\n" + verdict)
    print(f"[eval] {len(todo)} runs in {(time.time() - t_all) / 60:.1f} min; table written to {res / 'arith.md'} "
          f"(+ arith.json), plot to {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
