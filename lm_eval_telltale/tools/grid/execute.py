"""Running a grid's cells: on this machine (packed onto its GPUs, or ``--jobs`` at a time on CPU) or
as Ray tasks on a cluster. Each cell is one ``lm_eval`` process; its state is written to its
directory before it starts and after it ends (:mod:`.cells`), so a rerun knows what is left."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...files import tail
from ...spec import MODEL_TYPES
from .cells import cell_dir, complete, mark, prepare, sidecar_of, state_of
from .spec import Cell, Grid, lm_eval_command, shown

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """The cell's process ends when the grid's does (even on SIGKILL): no orphan keeps writing."""
    os.setpgrp()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def visible_gpus() -> list[str]:
    """This machine's GPUs as ``CUDA_VISIBLE_DEVICES`` entries ([] on CPU)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    except Exception:  # noqa: BLE001
        return []


def with_env(base: dict[str, str], extra: dict[str, str | None]) -> dict[str, str]:
    """``base`` with the grid's ``env`` applied (a None value unsets the variable)."""
    env = dict(base)
    for k, v in (extra or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = str(v)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def cell_env(cell: Cell, gpus: list[str] | None) -> dict[str, str]:
    env = with_env(dict(os.environ), cell.settings.get("env") or {})
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    return env


def use_cache_args(cell: Cell, d: Path) -> list[str]:
    """lm-eval's request cache for a stock cell (a rerun of an interrupted cell skips the requests
    it already answered). Not for the telltale types: their sidecar must see every request."""
    if cell.model_type in MODEL_TYPES:
        return []
    return ["--use_cache", str(d / "cache" / "lm")]


def command_of(grid: Grid, cell: Cell) -> list[str]:
    d = cell_dir(grid.output, cell)
    sidecars = {}
    for dep in cell.depends:
        sc = sidecar_of(cell_dir(grid.output, grid.by_id[dep]))
        if sc is not None:
            sidecars[dep] = sc
    return lm_eval_command(cell, d / "out", sidecars) + use_cache_args(cell, d)


@dataclass
class Outcome:
    done: list[Cell] = field(default_factory=list)
    failed: list[tuple[Cell, str]] = field(default_factory=list)  # (cell, why)
    interrupted: bool = False


def _finish(grid: Grid, cell: Cell, rc: int, out: Outcome, ended: dict[str, str]) -> str:
    """Record how a cell's process ended: ``done`` or ``failed`` (also in ``ended``)."""
    d = cell_dir(grid.output, cell)
    if rc == 0 and complete(d, cell):
        mark(d, "done", rc=0)
        out.done.append(cell)
    else:
        why = f"exit {rc}" if rc != 0 else "lm_eval ended without a complete results file" + (
            " and sidecar" if cell.model_type in MODEL_TYPES else "")
        mark(d, "failed", rc=rc, why=why)
        out.failed.append((cell, why))
    ended[cell.id] = "done" if rc == 0 and out.done and out.done[-1] is cell else "failed"
    return ended[cell.id]


def deps_state(grid: Grid, cell: Cell, ended: dict[str, str]) -> str:
    """``ready`` (every cell it reads is done), ``failed`` (one failed) or ``wait``."""
    states = [ended.get(dep) or state_of(grid.output, grid.by_id[dep])[0] for dep in cell.depends]
    return "failed" if "failed" in states else "ready" if all(s == "done" for s in states) else "wait"


def fail_unstarted(grid: Grid, cell: Cell, why: str, out: Outcome, ended: dict[str, str], bar) -> None:
    """A cell that cannot start (a dependency failed, too few GPUs): failed, with the reason."""
    mark(prepare(grid.output, cell, command_of(grid, cell)), "failed", rc=None, why=why)
    out.failed.append((cell, why))
    ended[cell.id] = "failed"
    bar.update(1)


class Runner:
    """Starts ready cells while there is room, one process per cell, until every cell ended."""

    def __init__(self, grid: Grid, todo: list[Cell], jobs: int | None, bar, log=print):
        self.grid, self.todo, self.bar, self.log = grid, list(todo), bar, log
        self.gpus = visible_gpus()
        # with GPUs the cells are packed onto them (as many at once as fit); on CPU one at a time
        self.jobs = max(1, jobs if jobs is not None else (len(self.gpus) or 1))
        self.free = list(self.gpus)
        self.procs: dict[str, tuple[Cell, subprocess.Popen, list[str], float]] = {}
        self.ended: dict[str, str] = {}  # cell id -> done / failed

    def _need(self, cell: Cell) -> int:
        return max(1, cell.gpus) if self.gpus else 0

    def _start(self, cell: Cell) -> None:
        n = self._need(cell)
        gpus = [self.free.pop(0) for _ in range(n)] if n else None
        cmd = command_of(self.grid, cell)
        d = prepare(self.grid.output, cell, cmd)
        with (d / "log.txt").open("wb") as f:
            f.write(("$ " + shown(cmd) + "\n").encode())
            f.flush()
            p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=cell_env(cell, gpus),
                                 preexec_fn=_die_with_parent)
        mark(d, "running", pid=p.pid, grid_pid=os.getpid(), gpus=gpus)
        self.procs[cell.id] = (cell, p, gpus or [], time.time())
        self.log(f"[grid] start {cell.label}" + (f" on GPU {','.join(gpus)}" if gpus else "") + f"\n    {shown(cmd)}")

    def run(self, out: Outcome) -> None:
        try:
            while self.todo or self.procs:
                for cid, (cell, p, gpus, t0) in list(self.procs.items()):
                    rc = p.poll()
                    if rc is None:
                        continue
                    del self.procs[cid]
                    self.free += gpus
                    d = cell_dir(self.grid.output, cell)
                    if _finish(self.grid, cell, rc, out, self.ended) == "failed":
                        self.log(f"[grid] FAILED {cell.label} ({out.failed[-1][1]}); log {d / 'log.txt'}:\n"
                                 f"{tail(d / 'log.txt', 8)}")
                    else:
                        self.log(f"[grid] done  {cell.label} ({time.time() - t0:.0f} s)")
                    self.bar.update(1)
                for cell in list(self.todo):
                    ds = deps_state(self.grid, cell, self.ended)
                    why = "a cell it depends on failed" if ds == "failed" else (
                        f"needs {self._need(cell)} GPUs, this machine has {len(self.gpus)}"
                        if self.gpus and self._need(cell) > len(self.gpus) else None)
                    if why:
                        self.todo.remove(cell)
                        fail_unstarted(self.grid, cell, why, out, self.ended, self.bar)
                        continue
                    if ds == "wait" or len(self.procs) >= self.jobs or (self.gpus and len(self.free) < self._need(cell)):
                        continue
                    self.todo.remove(cell)
                    self._start(cell)
                self.bar.set_postfix_str(f"running {len(self.procs)}", refresh=True)
                time.sleep(0.5)
        except KeyboardInterrupt:
            out.interrupted = True
            for cell, p, _, _ in self.procs.values():
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                p.wait()
                mark(cell_dir(self.grid.output, cell), "interrupted", rc=None)


# -- Ray -----------------------------------------------------------------------------------------------

def _ray_cell(cmd: list[str], env_extra: dict[str, str | None], d: str) -> int:  # pragma: no cover - on a Ray worker
    """One cell on a Ray worker: the same ``lm_eval`` process, its log and outputs under ``d`` (a
    path every node sees). Ray sets ``CUDA_VISIBLE_DEVICES`` to the task's GPUs."""
    env = with_env(dict(os.environ), env_extra)
    with open(Path(d) / "log.txt", "ab") as f:
        return subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)


def run_ray(grid: Grid, todo: list[Cell], address: str, bar, log=print) -> Outcome:
    """Every cell a Ray task (``num_gpus`` = the cell's GPUs, 1 CPU), started as soon as the cells it
    depends on are done. The output root must be a path every node sees (a shared file system):
    the tasks write there directly, nothing is shipped back."""
    import ray

    out = Outcome()
    if address == "local":
        ray.init(num_cpus=max(1, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    remote = ray.remote(_ray_cell)
    pending = list(todo)
    running: dict[Any, Cell] = {}
    ended: dict[str, str] = {}
    try:
        while pending or running:
            for cell in list(pending):
                ds = deps_state(grid, cell, ended)
                if ds == "failed":
                    pending.remove(cell)
                    fail_unstarted(grid, cell, "a cell it depends on failed", out, ended, bar)
                    continue
                if ds == "wait":
                    continue
                pending.remove(cell)
                cmd = command_of(grid, cell)
                d = prepare(grid.output, cell, cmd)
                (d / "log.txt").write_text("$ " + shown(cmd) + "\n")
                mark(d, "running", pid=0, grid_pid=os.getpid(), ray=address)
                env_extra = dict(cell.settings.get("env") or {})
                ref = remote.options(num_gpus=cell.gpus, num_cpus=1).remote(cmd, env_extra, str(d))
                running[ref] = cell
                log(f"[grid] ray task {cell.label} ({cell.gpus} GPU)\n    {shown(cmd)}")
            if not running:
                if pending:  # waiting on nothing that runs: the dependencies cannot finish
                    time.sleep(0.2)
                continue
            ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for ref in ready:
                cell = running.pop(ref)
                try:
                    rc = int(ray.get(ref))
                except Exception as e:  # noqa: BLE001 - a lost node, a killed task
                    rc = -1
                    log(f"[grid] ray task of {cell.label} failed: {e}")
                _finish(grid, cell, rc, out, ended)
                bar.update(1)
    except KeyboardInterrupt:
        out.interrupted = True
        for ref, cell in running.items():
            ray.cancel(ref, force=True)
            mark(cell_dir(grid.output, cell), "interrupted", rc=None)
    finally:
        ray.shutdown()
    return out


def run_cells(grid: Grid, todo: list[Cell], *, jobs: int | None = None, ray_address: str | None = None,
              quiet: bool = False) -> Outcome:
    from tqdm.auto import tqdm

    log = (lambda m: None) if quiet else (lambda m: tqdm.write(m, file=sys.stderr))
    with tqdm(total=len(todo), desc="telltale grid", unit="cell", disable=None, file=sys.stderr) as bar:
        if ray_address:
            return run_ray(grid, todo, ray_address, bar, log)
        out = Outcome()
        Runner(grid, todo, jobs, bar, log).run(out)
        return out
