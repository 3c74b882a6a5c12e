"""``make eval``: the main job on the embedded default, offline.

The shipped tiny reasoning model (:func:`lm_eval_telltale.arith.model_dir`, trained by
:mod:`lm_eval_telltale.arith.train`) on ``telltale_arith`` (the generator's held-out split, 4
difficulty levels, generated in process), through the real ``lm_eval`` console script:

1. ``vllm`` — stock lm-eval vLLM, the baseline;
2. ``vllm-norms`` — observation only (must equal the baseline);
3. ``vllm-alrr``, 4. ``vllm-erss``, 5. ``vllm-lrs`` — the methods;
6. ``vllm-suppress`` (high-norm tokens) and 7. ``vllm-suppress`` at the same per-layer rate on
   random tokens (``suppress_mode=matched`` with ``match_stats=`` the sidecar of run 6) — the
   paper's causal ablation;

all with the model's preset ``config=telltale-arith`` (``model_configs/telltale-arith.yaml``: the
methods' token-count knobs scaled to ~60-token answers). Then ``telltale table`` → printed, and
written to ``results/arith.md`` (+ ``arith.json``, the Δ plot ``arith.png``) with the
suppression ablation's verdict. Greedy decoding (LRS samples with the preset's settings) and
fixed seeds: rerunning gives the same table on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .plots import plot_deltas
from .render import render
from .runs import find_sidecar, results_files
from .table import build_table

ROOT = Path(__file__).resolve().parents[2]
TASK = "telltale_arith"
PRESET = "telltale-arith"
#: (run name, model type, extra model_args)
RUNS = [
    ("vllm", "vllm", ""),
    ("norms", "vllm-norms", ""),
    ("alrr", "vllm-alrr", ""),
    ("erss", "vllm-erss", ""),
    ("lrs", "vllm-lrs", ""),
    ("suppress-high", "vllm-suppress", ""),
    ("suppress-matched", "vllm-suppress", "suppress_mode=matched,match_stats={high_sidecar}"),
]


def _stream(cmd: list[str], env: dict, log: Path, prefix: str) -> int:
    """Run ``cmd`` with its output in ``log``; lm-eval's / vLLM's progress bars are echoed on one
    terminal line."""
    tty = sys.stdout.isatty()
    with log.open("wb") as f:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        buf = b""
        last = 0.0
        assert p.stdout is not None
        while True:
            chunk = p.stdout.read1(65536) if hasattr(p.stdout, "read1") else p.stdout.read(4096)
            if not chunk:
                break
            f.write(chunk)
            buf = (buf + chunk)[-4096:]
            segs = re.split(rb"[\r\n]", buf)
            bars = [s for s in segs if b"%|" in s]
            now = time.time()
            if bars and (now - last > (0.5 if tty else 15.0)):
                bar = bars[-1].decode("utf-8", "replace").strip()[:110]
                print(f"\r{prefix}{bar}" + ("\033[K" if tty else ""), end="" if tty else "\n", flush=True)
                last = now
        rc = p.wait()
    if tty:
        print("\r\033[K", end="", flush=True)
    return rc


def _latest(run_dir: Path) -> tuple[Path, dict] | None:
    """(path, parsed) of the newest lm-eval results file under ``run_dir``."""
    files = results_files(run_dir) if run_dir.exists() else []
    return (files[-1], json.loads(files[-1].read_text())) if files else None


def _counters(run_dir: Path) -> dict:
    latest = _latest(run_dir)
    tt = ((latest[1].get("config") or {}).get("telltale") or {}) if latest else {}
    return (tt.get("summary") or {}) if isinstance(tt, dict) else {}


def _sidecar(run_dir: Path) -> Path | None:
    latest = _latest(run_dir)
    return find_sidecar(*latest) if latest else None


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


def main(argv=None) -> int:
    from ..arith import model_dir

    ap = argparse.ArgumentParser(prog="make eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=str(ROOT / ".cache" / "eval"), help="run directories and logs")
    ap.add_argument("--results", default=str(ROOT / "results"), help="where arith.md / .json / .png go")
    ap.add_argument("--model", default=str(model_dir()), help="model directory (default: the shipped one)")
    ap.add_argument("--limit", type=int, default=None, help="problems per level (default: all 75)")
    ap.add_argument("--only", default=None, help="comma-separated run names to do (default: all: "
                    + ",".join(r[0] for r in RUNS) + ")")
    ap.add_argument("--inprocess", action="store_true",
                    help="run each lm_eval's vLLM engine core in its process (VLLM_ENABLE_V1_MULTIPROCESSING=0: "
                         "~3 s instead of ~20 s to start; the regression tests use it)")
    a = ap.parse_args(argv)
    model = Path(a.model)
    if not (model / "config.json").is_file():
        ap.error(f"no model at {model} (config.json missing)")
    runs = RUNS
    if a.only:
        want = [x.strip() for x in a.only.split(",") if x.strip()]
        unknown = sorted(set(want) - {r[0] for r in RUNS})
        if unknown:
            ap.error(f"--only: unknown run(s) {unknown}; known: {[r[0] for r in RUNS]}")
        runs = [r for r in RUNS if r[0] in want]
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false",
           # lm_eval indexes the telltale tasks only, not its ~14,750 built-in ones (~15 s per run)
           "TELLTALE_TASKS_ONLY": "1"}
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    if a.inprocess:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # eager: seven short engine lifetimes on a few cores; compiling each costs more than it saves
    base = (f"pretrained={model},dtype=float32,max_model_len=512,kv_cache_memory_bytes=268435456,"
            "enforce_eager=True,think_end_token=</think>")
    lm_eval = str(Path(sys.executable).parent / "lm_eval")
    print(f"[eval] model {model}\n[eval] task {TASK} ({'all' if not a.limit else a.limit} problems per level), "
          f"{len(runs)} runs through {lm_eval}; logs and run directories in {work}", flush=True)
    t_all = time.time()
    dirs = []
    for i, (name, mtype, extra) in enumerate(runs, 1):
        out = work / "runs" / name
        if out.exists():  # one run per configuration: the table shows this invocation's results only
            shutil.rmtree(out)
        margs = base if mtype == "vllm" else f"{base},config={PRESET}"
        if extra:
            if "{high_sidecar}" in extra:
                high_sidecar = _sidecar(work / "runs" / "suppress-high")
                if high_sidecar is None:
                    print("[eval] suppress-matched needs the sidecar of suppress-high: run it first", file=sys.stderr)
                    return 2
                extra = extra.format(high_sidecar=high_sidecar)
            margs += "," + extra
        cmd = [lm_eval, "--model", mtype, "--model_args", margs, "--tasks", TASK, "--apply_chat_template",
               "--batch_size", "auto", "--output_path", str(out), "--log_samples"]
        if a.limit:
            cmd += ["--limit", str(a.limit)]
        print(f"[eval] ({i}/{len(runs)}) {name}: {' '.join(cmd)}", flush=True)
        t = time.time()
        log = work / f"{name}.log"
        rc = _stream(cmd, env, log, prefix=f"[eval]     {name}: ")
        if rc != 0:
            print(f"[eval] {name} failed (exit {rc}); last lines of {log}:", file=sys.stderr)
            print("".join(log.read_text(errors="replace").splitlines(True)[-30:]), file=sys.stderr)
            return rc
        s = _counters(out)
        extra_info = ", ".join(f"{k}: {v['per_1k_tokens']:.1f}/1k tokens" for k, v in s.items()
                               if isinstance(v, dict) and "per_1k_tokens" in v)
        print(f"[eval]     {name} done in {time.time() - t:.0f} s" + (f" ({extra_info})" if extra_info else ""),
              flush=True)
        dirs.append(out)
    # subtasks: the difficulty levels get their own columns (the group score stays the first one)
    t = build_table(dirs, baseline="vllm", subtasks=True, progress=False,
                    warn=lambda m: print(f"[eval] warning: {m}", file=sys.stderr))
    table = render(t, "md")
    verdict = ablation_verdict(t)
    res = Path(a.results)
    res.mkdir(parents=True, exist_ok=True)
    head = (f"<!-- written by `make eval` ({len(runs)} runs, {'full split' if not a.limit else f'--limit {a.limit}'}); "
            f"rerun to reproduce -->\n")
    (res / "arith.md").write_text(head + table + "\n" + verdict + "\n")
    (res / "arith.json").write_text(json.dumps(t.to_dict(), indent=2, default=str) + "\n")
    png = plot_deltas(t, res / "arith.png")
    print("\n" + table + "\n" + verdict)
    print(f"[eval] {len(runs)} runs in {(time.time() - t_all) / 60:.1f} min; table written to {res / 'arith.md'} "
          f"(+ arith.json), plot to {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
