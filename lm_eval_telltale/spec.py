"""Names and rules that several layers of the package share, each defined once here.

Import-light (no torch, vLLM or lm-eval): the start-up hook, the ``telltale`` tools and the
engine-side core all import from this module. The method specification behind these names is
``docs/methods.md``.
"""

from __future__ import annotations

from typing import Any, Sequence

#: the methods, in the order the documentation and the tables list them
METHODS: tuple[str, ...] = ("norms", "suppress", "alrr", "erss", "lrs")

#: lm-eval model type → "module:Class" (registered lazily; nothing is imported until lm-eval
#: resolves the name). pyproject.toml's ``lm_eval.models`` entry points list the same pairs.
MODEL_TYPES: dict[str, str] = {
    "vllm-norms": "lm_eval_telltale.harness.models:VLLMNorms",
    "vllm-suppress": "lm_eval_telltale.harness.models:VLLMSuppress",
    "vllm-alrr": "lm_eval_telltale.harness.models:VLLMAlrr",
    "vllm-erss": "lm_eval_telltale.harness.models:VLLMErss",
    "vllm-lrs": "lm_eval_telltale.harness.lrs:VLLMLrs",
    # the same methods on transformers (lm-eval's hf model; docs/architecture.md §5)
    "hf-norms": "lm_eval_telltale.hf.harness:HFNorms",
    "hf-suppress": "lm_eval_telltale.hf.harness:HFSuppress",
    "hf-alrr": "lm_eval_telltale.hf.harness:HFAlrr",
    "hf-erss": "lm_eval_telltale.hf.harness:HFErss",
    "hf-lrs": "lm_eval_telltale.hf.harness:HFLrs",
}


def method_of_model_type(model_type: str) -> str | None:
    """``vllm-alrr`` (or ``hf-alrr``) → ``alrr``; None for a model type that is not ours."""
    if model_type not in MODEL_TYPES:
        return None
    return model_type.split("-", 1)[1]


#: threshold modes (docs/methods.md §1)
TAU_MODES: tuple[str, ...] = ("request", "global", "fixed", "calibrated")

#: LRS norm scores (docs/methods.md §4) and every selector compared on the same candidates
LRS_SCORES: tuple[str, ...] = ("late_sum", "mean", "A", "B", "C", "D")
LRS_SELECTORS: tuple[str, ...] = (*LRS_SCORES, "maj", "conf", "random", "first")


def default_warmup(method: str, tau_mode: str) -> int:
    """The warm-up before any decision when ``warmup=`` is not given: 64 of the request's own
    generated tokens in ``request`` mode; in ``global`` mode decode steps, as the reference code
    counts them: 200 for ERSS, 500 for the others; none with a given τ (``fixed``/``calibrated``,
    where a ``warmup=`` counts the request's own generated tokens)."""
    if tau_mode == "request":
        return 64
    if tau_mode == "global":
        return 200 if method == "erss" else 500
    return 0


def majority_index(answers: Sequence[Any]) -> int | None:
    """The majority-vote rule used everywhere (LRS's ``maj`` selector, the tasks' ``maj@k``):
    the index of the first occurrence of the most frequent answer; ``None`` and ``""`` abstain;
    ties go to the answer seen first; None when every answer abstains."""
    counts: dict[Any, int] = {}
    first: dict[Any, int] = {}
    for i, a in enumerate(answers):
        if a is None or a == "":
            continue
        counts[a] = counts.get(a, 0) + 1
        first.setdefault(a, i)
    if not counts:
        return None
    top = max(counts.values())
    return min(first[a] for a, c in counts.items() if c == top)
