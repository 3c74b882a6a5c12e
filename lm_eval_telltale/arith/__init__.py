"""The embedded default: a tiny trained reasoning model and the synthetic ``telltale_arith`` task.

* :mod:`lm_eval_telltale.arith.data` -- the seeded generator of arithmetic word problems (GSM8K
  schema) and the held-out split the ``telltale_arith`` task evaluates;
* :mod:`lm_eval_telltale.arith.train` -- the deterministic CPU training script;
* ``telltale-arith-tiny/`` -- the shipped weights, tokenizer, chat template and ``MODEL_CARD.md``.

Import-light (no torch here).
"""

from __future__ import annotations

from pathlib import Path


def model_dir() -> Path:
    """Directory of the shipped tiny reasoning model (pass it as ``pretrained=``)."""
    return Path(__file__).resolve().parent / "telltale-arith-tiny"
