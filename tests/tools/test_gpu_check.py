"""``scripts/gpu_check.sh --dry-run`` on CPU: the GPU check cannot run here (no GPU with vLLM), so
the dry run keeps it from rotting — every command is printed, every tool exists, the composed
``lm_eval`` lines pass lm-eval's parser and our model_args validation, and ``telltale bench``
accepts its arguments (``--plan``). No model runs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
# the in-graph types twice: the second run with FULL CUDA graphs (their in-graph step allows them);
# LRS twice: the second with async scheduling off
TYPES = ["vllm", "vllm-norms", "vllm-norms", "vllm-alrr", "vllm-alrr", "vllm-erss", "vllm-erss", "vllm-lrs",
         "vllm-lrs", "vllm-suppress", "vllm-suppress"]


def dry_run(tmp_path, **env):
    e = {**os.environ, "WORK": str(tmp_path / "work"), **env}
    return subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=e, capture_output=True, text=True,
                          timeout=300)


def test_dry_run_prints_and_checks_every_command(tmp_path):
    p = dry_run(tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    cmds = [l[2:] for l in p.stdout.splitlines() if l.startswith("+ ")]
    assert cmds[0] == "make setup"
    evals = [c for c in cmds if c.startswith(".venv/bin/lm_eval ")]
    assert [c.split()[2] for c in evals] == TYPES
    for c in evals:  # compiled, CUDA graphs on: nothing turns vLLM's default compilation off
        assert "enforce_eager" not in c and "--tasks telltale_local" in c and "--log_samples" in c
    assert "async_scheduling=False" in evals[0]  # stock with the telltale types' scheduling
    for i, t in ((2, "norms"), (4, "alrr"), (6, "erss"), (10, "suppress")):  # the same knobs as the piecewise run, as JSON
        assert '"cudagraph_mode": "FULL_AND_PIECEWISE"' in evals[i] and f"runs/vllm-{t}-full" in evals[i]
        assert '"warmup": 8' in evals[i] and "cudagraph_mode" not in evals[i - 1]
    assert '"low_k": 4, "cooldown": 8, "bank_k": 8' in evals[6] and '"growth_eps": 0' in evals[4]
    for i in (7, 8):  # LRS with vLLM's async scheduling, then with it off
        assert "--gen_kwargs temperature=0.7,top_p=0.8,top_k=20,do_sample=True" in evals[i]
    assert "async_scheduling" not in evals[7] and "async_scheduling=False" in evals[8] and "runs/vllm-lrs-sync" in evals[8]
    assert "assert torch.cuda.is_available()" in p.stdout  # the CUDA build of vLLM is checked first
    assert cmds[-1].startswith(".venv/bin/telltale bench --model ") and "--batch-sizes 1,64" in cmds[-1]
    parsed = [l.split("--model ")[1].split()[0] for l in p.stdout.splitlines() if "parsed: lm_eval" in l]
    assert parsed == TYPES
    assert "nothing was run" in p.stdout
    assert not (tmp_path / "work").exists()  # a dry run writes nothing


def test_dry_run_fails_on_a_bad_setting(tmp_path):
    p = dry_run(tmp_path, LAYERS="99")
    assert p.returncode != 0 and "layers" in (p.stdout + p.stderr)
