"""``scripts/gpu_core_check.py`` (issue #33 item 7), the GPU check that needs no vLLM, run as its CPU
dry run so that it does not rot before a device runs it: every method's step, the sync audit, the
hf adapter's generation and the hf bench's plan."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_core_check_dry_run_on_cpu(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_core_check.py"), "--device", "cpu", "--quick",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    res = json.loads((tmp_path / "gpu_core_check.json").read_text())["results"]
    checks = {r["check"]: r for r in res}
    for m in ("norms", "suppress", "alrr", "alrr-skip", "erss", "lrs"):
        assert checks[f"capture {m}"]["status"] == "PASS" and checks[f"capture {m}"]["rows_eager"] > 0
        assert checks[f"audit {m}"]["status"] == "PASS"
    assert checks["audit alrr"]["syncs"] == {}  # the default, branch-free: no host decision at all
    assert checks["audit alrr-skip"]["syncs"]  # skip_sync=true's decision, one host read per patched layer
    assert checks["hf bench (plan)"]["status"] == "PASS" and "--plan" in checks["hf bench (plan)"]["command"]
    assert all(r["status"] == "PASS" for r in res), [r["check"] for r in res if r["status"] != "PASS"]
