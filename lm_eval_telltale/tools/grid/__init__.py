"""``telltale grid``: a model × method × task grid of real ``lm_eval`` runs in one resumable
command, on this machine or on a Ray cluster, ending in one table.

::

    telltale grid run    GRID.yaml [--out DIR] [--limit N] [--jobs N] [--ray ADDRESS] [--dry-run]
    telltale grid status GRID.yaml [--out DIR]

**The grid file** (YAML; checked before anything starts, every error names its key)::

    output: results/grid/my-grid          # the output root (relative to the current directory)
    models:
      - name: qwen3-8b                    # letters, digits, . _ + -
        pretrained: Qwen/Qwen3-8B         # "{arith_model}": the shipped tiny model
        preset: qwen3-8b                  # config= for the telltale types (model_configs/)
        model_args: {max_model_len: 32768, gpu_memory_utilization: 0.9}   # every method gets them
        gpus: 1                           # GPUs per run (default: tensor × pipeline parallel size)
    methods:
      - {name: baseline, model: vllm}
      - {name: alrr, model: vllm-alrr, model_args: {tau_q: [0.85, 0.9, 0.95]}}   # a list sweeps
      - {name: rand, model: vllm-suppress,
         model_args: {suppress_mode: matched, match_stats: "{sidecar:high}"}}   # another cell's sidecar
    tasks: [telltale_gsm8k, telltale_aime24]
    gen_kwargs: {temperature: 0.6, top_p: 0.95, do_sample: true}   # optional
    limit: 100                            # optional
    seeds: [0]                            # optional: lm_eval --seed, one cell per seed
    apply_chat_template: true             # default true
    batch_size: auto                      # default auto
    include_path: null                    # optional ("{tasks_dir}": the packaged tasks)
    log_samples: true                     # default true
    lm_eval_args: []                      # more lm_eval flags
    env: {}                               # more environment for every cell (null: unset it)

A **cell** is one model × method point × task × seed: one ``lm_eval`` run (its command line is
printed, and kept in the cell's ``cell.json``) with its own output directory and log under
``<output>/cells/`` (:mod:`.cells`). Its name ends with a hash of everything that decides its
result — the settings and the installed versions of this package, lm-eval, vLLM, transformers and
torch — so a changed knob or an upgrade is a new cell and never a stale reuse. (``make eval`` also
hashes the package's code, so an edit in a development checkout reruns it.) A method's preset is the model's
``preset`` for the telltale types (``preset: false`` on a method leaves it out); ``{sidecar:M}`` in
a method's model_args is the sidecar of method ``M``'s cell of the same model, task and seed, which
then runs first.

**Running.** Cells are packed onto this machine's GPUs (``CUDA_VISIBLE_DEVICES`` or every visible
one; a cell takes ``gpus`` of them, as many cells at once as fit); without GPUs ``--jobs`` run at a
time (default 1).
``--ray ADDRESS`` (``local`` starts a one-machine cluster) runs each cell as a Ray task with the
cell's GPUs; the output root must then be a path every node sees (a shared file system): the
tasks write there, nothing is shipped back. A progress bar counts cells. ``--dry-run`` prints every
cell with its state and command line and starts nothing.

**Resume.** Rerunning the same command skips done cells (state ``done``, a complete results file
and, for a telltale type, its sidecar), reruns interrupted and failed ones (an earlier attempt's
files are moved to the cell's ``attempts/``, never mixed in) and gives the stock cells lm-eval's
``--use_cache`` (the telltale types' sidecar must see every request, so they run whole). A failing
cell does not stop the others; the end lists the failures with their logs and exits 1.

**Report.** At the end, ``<output>/table`` as Markdown, JSON and PNG (``telltale table``
of every done cell) and ``<output>/index.html`` (:mod:`.report`).
"""

from __future__ import annotations

import argparse
import sys

from .spec import GridError, load_grid, shown

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="telltale grid", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="The grid file's keys: the docstring of lm_eval_telltale/tools/grid/__init__.py.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run every cell that is not done, then write the table and the page")
    s = sub.add_parser("status", help="each cell's state: done / running / failed / interrupted / pending")
    for p in (r, s):
        p.add_argument("grid", metavar="GRID.yaml")
        p.add_argument("--out", help="output root (default: the grid file's 'output')")
        p.add_argument("--limit", type=float, default=None, help="override the grid file's 'limit'")
    r.add_argument("--jobs", type=int, default=None, help="cells at a time at most (default: as many as fit on "
                                                          "this machine's GPUs; without GPUs 1)")
    r.add_argument("--ray", metavar="ADDRESS", help="run the cells as Ray tasks on this cluster ('local': a "
                                                     "one-machine cluster); the output root must be shared")
    r.add_argument("--dry-run", action="store_true", help="print every cell with its state and command; start nothing")
    r.add_argument("--subtasks", action="store_true", help="the table's columns include each group's subtasks")
    r.add_argument("--baseline", default="vllm", help="the table's baseline model type (default vllm)")
    return ap


def _limit(v: float | None):
    if v is None:
        return None
    return int(v) if float(v).is_integer() and v >= 1 else v


def main(argv=None) -> int:
    ap = _parser()
    a = ap.parse_args(argv)
    try:
        grid = load_grid(a.grid, output=a.out, limit=_limit(a.limit))
    except GridError as e:
        print(f"telltale grid: error: {e}", file=sys.stderr)
        return 2
    from ...files import tail, unwritable
    from .cells import cell_dir, state_of
    from .execute import command_of, run_cells

    states = {c.id: state_of(grid.output, c)[0] for c in grid.cells}
    if a.cmd == "status":
        for c in grid.cells:
            print(f"{states[c.id]:<11} {c.label}  ({cell_dir(grid.output, c)})")
        counts = {s: list(states.values()).count(s) for s in dict.fromkeys(states.values())}
        print(f"telltale grid: {len(grid.cells)} cells: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
        return 0
    if a.jobs is not None and a.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {a.jobs}")
    why = unwritable(grid.output, is_dir=True)
    if why:
        ap.error(f"output {grid.output}: {why}")
    if a.ray and not a.dry_run:
        try:
            import ray  # noqa: F401
        except ImportError:
            ap.error("--ray needs Ray: pip install 'lm-eval-telltale[distributed]'")
    todo = [c for c in grid.cells if states[c.id] not in ("done", "running")]
    print(f"telltale grid: {len(grid.cells)} cells in {grid.output}: {len(grid.cells) - len(todo)} done or running "
          f"elsewhere, {len(todo)} to run" + (f" as Ray tasks on {a.ray}" if a.ray else ""), file=sys.stderr)
    if a.dry_run:
        for c in grid.cells:
            print(f"[{states[c.id]}] {c.label}\n    {shown(command_of(grid, c))}")
        return 0
    out = run_cells(grid, todo, jobs=a.jobs, ray_address=a.ray)
    from .report import write_page, write_table

    t, paths = write_table(grid, subtasks=a.subtasks, baseline=a.baseline,
                           warn=lambda m: print(f"telltale grid: warning: {m}", file=sys.stderr))
    from ..render import render

    md = render(t, "md") if t is not None else None
    page = write_page(grid, md, paths)
    if md:
        print(md)
    print(f"telltale grid: {len(out.done)} cell(s) run now, {len(out.failed)} failed; table {paths.get('md')}, "
          f"page {page}", file=sys.stderr)
    for cell, why in out.failed:
        d = cell_dir(grid.output, cell)
        print(f"telltale grid: FAILED {cell.label}: {why}; log {d / 'log.txt'}\n{tail(d / 'log.txt', 5)}", file=sys.stderr)
    if out.interrupted:
        print("telltale grid: interrupted; rerun the same command to finish the grid", file=sys.stderr)
        return 130
    return 1 if out.failed else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
