"""``make eval``: the main job on the embedded default, offline.

Until the trained default model exists, this runs on a generated tiny random Qwen3 and a
bundled 12-question local task: the stock ``vllm`` baseline, ``vllm-norms``, ``vllm-alrr`` and ``vllm-suppress`` through the real
``lm_eval`` console script, then prints the comparison table of ``telltale table`` and writes it
to ``results/demo.md`` with the Δ-per-task plot ``results/demo.png``.
Accuracy of a random model is 0 by construction; the point is the full path and the norm
statistics next to lm-eval's output.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .localtask import write_local_task
from .report import build_table, plot_deltas, render

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="make eval")
    ap.add_argument("--work", default=str(ROOT / ".cache" / "demo"))
    ap.add_argument("--results", default=str(ROOT / "results"))
    ap.add_argument("--limit", type=int, default=None)
    a = ap.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)

    model = work / "tiny-qwen3"
    if not (model / "config.json").is_file():
        print(f"[eval] building the tiny default model in {model}", flush=True)
        from .tiny import build_tiny_model

        build_tiny_model(model, "qwen3")
    task_dir = write_local_task(work / "task")
    base = f"pretrained={model},kv_cache_memory_bytes=67108864,max_model_len=1024"
    runs = [
        ("vllm", base + ",enforce_eager=True"),
        ("vllm-norms", base + ",layers=auto,warmup=4"),
        ("vllm-alrr", base + ",layers=auto,warmup=4,growth_eps=0.0"),
        ("vllm-suppress", base + ",layers=auto,warmup=4"),
    ]
    lm_eval = str(Path(sys.executable).parent / "lm_eval")
    dirs = []
    for i, (mtype, margs) in enumerate(runs, 1):
        out = work / "runs" / mtype
        if out.exists():  # one run per configuration: the table shows this invocation's results only
            shutil.rmtree(out)
        cmd = [lm_eval, "--model", mtype, "--model_args", margs, "--tasks", "telltale_local",
               "--include_path", str(task_dir), "--batch_size", "auto", "--output_path", str(out), "--log_samples"]
        if a.limit:
            cmd += ["--limit", str(a.limit)]
        print(f"[eval] ({i}/{len(runs)}) {' '.join(cmd)}", flush=True)
        t = time.time()
        log = work / f"{mtype}.log"
        with log.open("w") as f:
            p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        if p.returncode != 0:
            print(f"[eval] {mtype} failed (exit {p.returncode}); last lines of {log}:", file=sys.stderr)
            print("".join(log.read_text().splitlines(True)[-30:]), file=sys.stderr)
            return p.returncode
        print(f"[eval]     done in {time.time() - t:.0f}s", flush=True)
        dirs.append(out)
    t = build_table(dirs, baseline="vllm", progress=False,
                    warn=lambda m: print(f"[eval] warning: {m}", file=sys.stderr))
    table = render(t, "md")
    res = Path(a.results)
    res.mkdir(parents=True, exist_ok=True)
    (res / "demo.md").write_text(table)
    png = plot_deltas(t, res / "demo.png")
    print("\n" + table)
    print(f"[eval] table written to {res / 'demo.md'}, plot to {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
