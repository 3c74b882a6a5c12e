"""``telltale`` console command.

Subcommands:
  tiny-model   build a deterministic tiny model directory (tests, demo); an existing model needs --force
  run          alias of lm-eval's CLI with the telltale model types registered
               (``python -m lm_eval_telltale ...`` is the same, flags identical to ``lm_eval``)
  tasks-path   print the packaged task directory (for ``--include_path``)
  table        results table from lm-eval run directories + sidecars (md/csv/latex/json, --plot PNG)
  profile      per-layer norm distributions of generated tokens (thinking on/off), JSON + PNG plots
  signals      the ℓ2 norm vs SAE reasoning features and entropy signals per layer, thinking vs answering
  calibrate    per-layer norm quantiles as a file for ``tau_mode=calibrated`` / ``config=``
  view         self-contained HTML page: generated tokens shaded by the norm, τ crossings, interventions
  bench        decode throughput of each model type vs stock vLLM (tokens/s, ratio, ALRR's compute limit)
  grid         a model × method × task grid of lm_eval runs: resumable, local or Ray, one table at the end
  rescore      score finished runs' logged samples again with the current scorer (new files beside the old)
  audit        how the answers of finished runs were extracted: rule counts, ambiguous/unanswered samples
"""

from __future__ import annotations

import argparse
import sys


def _tiny(argv):
    ap = argparse.ArgumentParser(prog="telltale tiny-model", description="Build a deterministic tiny model directory.")
    ap.add_argument("--arch", default="qwen3", choices=["qwen3", "qwen2", "llama"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="replace the model in an --out directory that holds one "
                                                         "(its config.json and weights; other files stay)")
    a = ap.parse_args(argv)
    from .files import unwritable
    from .tools.tiny import build_tiny_model, model_files

    why = unwritable(a.out, is_dir=True)
    if why:
        ap.error(f"--out {a.out}: {why}")
    held = model_files(a.out)
    if held and not a.force:
        ap.error(f"--out {a.out}: already holds a model ({', '.join(f.name for f in held[:4])}"
                 f"{', ...' if len(held) > 4 else ''}); give an empty or new directory, or --force to replace it")
    try:
        p = build_tiny_model(a.out, a.arch, num_layers=a.layers, seed=a.seed)
    except OSError as e:
        ap.error(f"--out {a.out}: cannot write it: {e.strerror or e}")
    print(p)
    return 0


def run_lm_eval(argv) -> int:
    """lm-eval's own CLI, after registering our model types (fallback when the .pth hook is off)."""
    from ._lmeval_hook import install, register_models

    install(force=True)
    register_models()
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0


COMMANDS = {
    "tiny-model": _tiny,
    "run": run_lm_eval,
    "tasks-path": lambda argv: print(__import__("lm_eval_telltale").tasks_dir()) or 0,
    "table": lambda argv: __import__("lm_eval_telltale.tools.table", fromlist=["main"]).main(argv),
    "profile": lambda argv: __import__("lm_eval_telltale.tools.profile", fromlist=["main"]).main_profile(argv),
    "signals": lambda argv: __import__("lm_eval_telltale.tools.signals", fromlist=["main"]).main(argv),
    "calibrate": lambda argv: __import__("lm_eval_telltale.tools.profile", fromlist=["main"]).main_calibrate(argv),
    "view": lambda argv: __import__("lm_eval_telltale.tools.view", fromlist=["main"]).main(argv),
    "bench": lambda argv: __import__("lm_eval_telltale.tools.bench", fromlist=["main"]).main(argv),
    "grid": lambda argv: __import__("lm_eval_telltale.tools.grid", fromlist=["main"]).main(argv),
    "rescore": lambda argv: __import__("lm_eval_telltale.tools.rescore", fromlist=["main"]).main_rescore(argv),
    "audit": lambda argv: __import__("lm_eval_telltale.tools.rescore", fromlist=["main"]).main_audit(argv),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    cmd = argv[0]
    if cmd not in COMMANDS:
        print(f"telltale: unknown command {cmd!r}; one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return COMMANDS[cmd](argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
