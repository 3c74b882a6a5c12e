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
    "hf-norms": "lm_eval_telltale.harness.hf:HFNorms",
    "hf-suppress": "lm_eval_telltale.harness.hf:HFSuppress",
    "hf-alrr": "lm_eval_telltale.harness.hf:HFAlrr",
    "hf-erss": "lm_eval_telltale.harness.hf:HFErss",
    "hf-lrs": "lm_eval_telltale.harness.hf:HFLrs",
}


#: threshold modes (docs/methods.md §1)
TAU_MODES: tuple[str, ...] = ("request", "global", "fixed", "calibrated")

#: the τ rule's defaults (docs/methods.md §1): τ = Q3 + IQR_K · max(IQR, MIN_IQR); the quantile a
#: calibration file is read at. The config's declaration and the core's thresholds read these.
IQR_K: float = 1.5
MIN_IQR: float = 1e-3
TAU_Q: float = 0.9

#: LRS norm scores (docs/methods.md §4) and every selector compared on the same candidates
LRS_SCORES: tuple[str, ...] = ("late_sum", "mean", "A", "B", "C", "D")
LRS_SELECTORS: tuple[str, ...] = (*LRS_SCORES, "maj", "conf", "random", "first")


#: the words a true/false setting may be written as (any case): model_args, environment switches
TRUE_WORDS: tuple[str, ...] = ("1", "true", "yes", "on")
FALSE_WORDS: tuple[str, ...] = ("0", "false", "no", "off")


def parse_bool(v: Any) -> bool | None:
    """The one true/false reading: a bool, an integer 0/1, or one of :data:`TRUE_WORDS` /
    :data:`FALSE_WORDS` (any case, surrounding spaces ignored); None for anything else (the caller
    decides whether that is an error or "unset")."""
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    s = str(v).strip().lower() if v is not None else ""
    return True if s in TRUE_WORDS else False if s in FALSE_WORDS else None


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


#: the special tokens and the chat template of the project's tiny models (the random ones of
#: :mod:`lm_eval_telltale.tools.tiny` and the trained reasoning model of :mod:`lm_eval_telltale.arith`)
TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

TINY_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)
