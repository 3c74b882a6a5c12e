"""Answer extraction and verdicts for the packaged ``telltale_*`` lm-eval tasks.

Engine-agnostic and import-light (``math_verify`` is imported lazily). The task YAMLs in
``tasks/`` reference the ``process_results_*`` entry points with
``process_results: !function lm_eval_telltale.tasksupport.scoring.<name>``.

The package, by job: :mod:`.text` (the think block and the final answer string: boxes, answer
phrases), :mod:`.numeric` (math answers), :mod:`.choice` (option letters), :mod:`.bbh` (BBH's
answer kinds), :mod:`.entry` (lm-eval's ``process_results`` entry points and the answer keys of
LRS's ``maj`` vote) and :mod:`.process` — the one module that reads the process's state (the
environment, the ``lm_eval`` command line, a preset, a tokenizer) to decide the think rule. The
entry points read that rule once per call and hand it down; every other function is pure and
takes it as an argument (``rule=None``: this process's rule).

Every ``process_results_*`` returns the same two metrics so that group aggregates work across
all tasks (they all use lm-eval's default filter name ``none``):

* ``exact_match`` -- 1.0 if the final answer is right (mean over samples when a task draws
  several samples per item with ``repeats``),
* ``truncated``   -- 1.0 if the reasoning never closed (see :func:`split_thinking`); such a
  response is always scored wrong.

Rules, in order:

1. Thinking. Extraction only ever looks at the text after the last think-end token
   (``</think>``). A response that opened a thinking block (``<think>``) and never closed it is
   *truncated*: wrong, and counted in ``truncated``. lm-eval's vLLM backend with
   ``think_end_token=</think>`` has already cut everything up to the last ``</think>``; when the
   token never appeared it passes the whole trace on, which still starts with ``<think>`` for
   chat templates where the model itself emits the opening tag (Qwen3). Templates that put
   ``<think>`` into the *prompt* (DeepSeek-R1 distills) leave no opening tag in the response;
   for those a response without ``</think>`` is truncated. The scorer finds out which kind of
   template is in use by itself (:func:`auto_require_think_end`: the chat template of the
   ``lm_eval --apply_chat_template`` run's tokenizer, or :func:`set_prompt_opens_think`);
   ``TELLTALE_REQUIRE_THINK_END=1`` / ``=0`` overrides that decision. Such runs need the raw
   response: without ``think_end_token`` (the scorer strips the thinking itself).
   ``TELLTALE_THINK_START`` / ``TELLTALE_THINK_END`` change the tags.
2. Final answer string: the last ``\\boxed{...}`` (or ``\\fbox``), else the last answer phrase
   ("The answer is X", "Answer: X", "**Final Answer:** X", "the correct option is (X)", ...),
   cut at the end of its clause; Markdown emphasis and ``$`` delimiters are ignored (``$``
   followed by a number is money unless it closes like math; ``\\$`` is never a delimiter).
3. Task-specific fallback when there is no such string: the last number (math; ``1/2`` and
   number words such as ``eighteen`` count), the last strong option cue (``(C)``, ``Option C``)
   or else standalone option letter (multiple choice), the last label word (True/False, Yes/No,
   valid/invalid), the list after the last "sorted"/"answer" cue or else the trailing words
   (word sorting), or the last bracket line (Dyck).
4. Comparison: numbers exactly (``18.00 == 18``, ``033 == 33``, ``1,000 == 1000``,
   ``a - b = 70,000 == 70000``, ``after 3 days she has 18 == 18``, ``\\frac{36}{2} == 18``
   through math-verify), letters by letter (or by the option's text, or by the number an
   option's text is), labels case-insensitively, word lists and bracket sequences token by
   token (LaTeX escapes such as ``\\&`` undone).
"""


from .bbh import BBH_KINDS, bbh_options, extract_label, find_label, score_bbh
from .choice import LETTERS, extract_choice, find_choice, score_choice
from .entry import (
    extraction_share,
    process_results_aime,
    process_results_bbh_bool,
    process_results_bbh_dyck,
    process_results_bbh_mc,
    process_results_bbh_number,
    process_results_bbh_valid,
    process_results_bbh_words,
    process_results_bbh_yesno,
    process_results_gsm8k,
    process_results_gsm_plus,
    process_results_math,
    process_results_math_sampled,
    process_results_mmlu_pro,
)
from .numeric import (
    extract_math_answer,
    find_math_answer,
    is_abstention,
    is_hedge,
    last_number,
    math_equal,
    math_gold,
    score_math,
)
from .process import auto_require_think_end, prompt_opens_think, set_prompt_opens_think, think_rule
from .text import (
    RULES,
    Found,
    ThinkRule,
    all_boxed,
    answer_phrase,
    clean_answer,
    final_answer_string,
    last_boxed,
    split_thinking,
)

__all__ = [
    "LETTERS",
    "RULES",
    "Found",
    "ThinkRule",
    "think_rule",
    "split_thinking",
    "prompt_opens_think",
    "auto_require_think_end",
    "set_prompt_opens_think",
    "all_boxed",
    "last_boxed",
    "answer_phrase",
    "clean_answer",
    "final_answer_string",
    "last_number",
    "extract_math_answer",
    "extract_choice",
    "find_choice",
    "find_label",
    "find_math_answer",
    "is_hedge",
    "extract_label",
    "is_abstention",
    "bbh_options",
    "math_equal",
    "math_gold",
    "score_math",
    "score_choice",
    "score_bbh",
    "BBH_KINDS",
    "extraction_share",
    "process_results_math",
    "process_results_math_sampled",
    "process_results_gsm8k",
    "process_results_gsm_plus",
    "process_results_aime",
    "process_results_mmlu_pro",
    "process_results_bbh_mc",
    "process_results_bbh_bool",
    "process_results_bbh_yesno",
    "process_results_bbh_valid",
    "process_results_bbh_number",
    "process_results_bbh_words",
    "process_results_bbh_dyck",
]
