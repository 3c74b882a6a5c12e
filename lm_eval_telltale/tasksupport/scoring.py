"""Answer extraction and verdicts for the packaged ``telltale_*`` lm-eval tasks.

Pure functions, engine-agnostic and import-light (``math_verify`` is imported lazily). The task
YAMLs in ``tasks/`` reference the ``process_results_*`` entry points with
``process_results: !function lm_eval_telltale.tasksupport.scoring.<name>``.

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

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
import threading
from collections import Counter
from fractions import Fraction
from typing import Any, Iterable, Sequence

from ..spec import parse_bool

__all__ = [
    "LETTERS",
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
    "extract_label",
    "is_abstention",
    "bbh_options",
    "math_equal",
    "math_gold",
    "score_math",
    "score_choice",
    "score_bbh",
    "BBH_KINDS",
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

_log = logging.getLogger("lm_eval_telltale")

# --------------------------------------------------------------------------------------------
# 1. thinking
# --------------------------------------------------------------------------------------------


def _think_tags() -> tuple[str, str]:
    return (
        os.environ.get("TELLTALE_THINK_START", "<think>"),
        os.environ.get("TELLTALE_THINK_END", "</think>"),
    )



#: the decision a model class set explicitly (:func:`set_prompt_opens_think`); None = not set
_PROMPT_OPENS_THINK: bool | None = None


def set_prompt_opens_think(value: bool | None) -> None:
    """Tell the scorer whether the prompts of this process end inside an open think block.

    For API (non-CLI) use, where :func:`auto_require_think_end` cannot read the model from
    ``sys.argv``: a model class that knows its chat template calls this once (True for
    DeepSeek-R1-style templates). ``None`` clears it. ``TELLTALE_REQUIRE_THINK_END`` still wins.
    """
    global _PROMPT_OPENS_THINK
    _PROMPT_OPENS_THINK = None if value is None else bool(value)


def prompt_opens_think(tokenizer: Any, **template_kwargs: Any) -> bool:
    """Does ``tokenizer``'s chat template end the generation prompt inside an open think block?

    Renders a one-message user conversation with ``add_generation_prompt=True`` and compares the
    positions of the last think-start and think-end tags: True for DeepSeek-R1-distill templates
    (the prompt ends with ``<think>\\n``), False for Qwen3 (the model writes ``<think>`` itself;
    ``enable_thinking=False`` closes an empty block inside the prompt) and for plain templates.
    ``template_kwargs`` go to ``apply_chat_template`` (e.g. ``enable_thinking``). Errors of the
    template propagate.
    """
    start, end = _think_tags()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 1 + 1?"}], tokenize=False, add_generation_prompt=True,
        **template_kwargs,
    )
    if not isinstance(text, str):
        text = str(text)
    return bool(start) and text.rfind(start) > (text.rfind(end) if end else -1)


def _argv_model_args(argv: Sequence[str]) -> dict[str, Any] | None:
    """The ``--model_args`` of an lm-eval command line (``k=v,k=v``, ``k=v k=v`` or JSON, also
    repeated), merged; None when the command line does not apply a chat template."""
    if not any(a == "--apply_chat_template" or a.startswith("--apply_chat_template=") for a in argv):
        return None
    values: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("--model_args", "-a"):
            i += 1
            while i < len(argv) and not argv[i].startswith("-"):
                values.append(argv[i])
                i += 1
            continue
        if a.startswith("--model_args="):
            values.append(a.split("=", 1)[1])
        i += 1
    out: dict[str, Any] = {}
    for v in values:
        v = v.strip()
        if v.startswith("{"):
            try:
                d = json.loads(v)
            except ValueError:
                continue
            if isinstance(d, dict):
                out.update({str(k): x for k, x in d.items()})
            continue
        for part in v.split(","):
            if "=" in part:
                k, x = part.split("=", 1)
                out[k.strip()] = x.strip()
    return out


def auto_require_think_end() -> bool | None:
    """Whether this process's prompts end inside an open think block, detected once.

    The value given to :func:`set_prompt_opens_think` when there is one; else, when the process
    is an ``lm_eval ... --apply_chat_template`` run, the chat template of the ``tokenizer=`` (or
    ``pretrained=``) of ``--model_args``, loaded from local files only (the run has already
    downloaded it). None when it cannot tell (no chat template applied, no tokenizer, any error)
    and when a ``think_end_token`` model arg (or preset value) makes lm-eval strip the thinking
    itself: every response then lacks ``</think>`` and requiring it would call all of them
    truncated (a warning says so). Cached; ``auto_require_think_end.cache_clear()`` forgets it.
    """
    if _PROMPT_OPENS_THINK is not None:
        return _PROMPT_OPENS_THINK
    return _detect_from_argv()


@functools.lru_cache(maxsize=1)
def _detect_from_argv() -> bool | None:
    args: dict[str, Any] | None = None
    try:
        args = _argv_model_args(sys.argv)
        if not args:
            return None
        if args.get("config"):  # a telltale preset: explicit model_args win over its values
            try:
                from lm_eval_telltale.config import load_preset

                preset = load_preset(str(args["config"]))
                args = {**{k: preset[k] for k in ("think_end_token", "enable_thinking") if k in preset}, **args}
            except Exception:
                pass
        name = args.get("tokenizer") or args.get("pretrained")
        if not name:
            return None
        from transformers import AutoTokenizer

        kw: dict[str, Any] = {"local_files_only": True}
        if args.get("revision") and not args.get("tokenizer"):
            kw["revision"] = str(args["revision"])
        if parse_bool(args.get("trust_remote_code", False)):
            kw["trust_remote_code"] = True
        tok = AutoTokenizer.from_pretrained(str(name), **kw)
        tkw: dict[str, Any] = {}
        thinking = parse_bool(args["enable_thinking"]) if "enable_thinking" in args else None
        if thinking is not None:
            tkw["enable_thinking"] = thinking
        opens = prompt_opens_think(tok, **tkw)
    except Exception as e:  # never let the detection break scoring
        _log.debug("telltale: think-block detection failed: %s", e)
        return None
    if opens and str(args.get("think_end_token") or "").strip():
        _log.warning(
            "telltale: the chat template of %s opens <think> in the prompt, but think_end_token=%s "
            "strips the thinking from every response, so truncated reasoning cannot be detected. "
            "Drop think_end_token to let the scorer see %s (or set TELLTALE_REQUIRE_THINK_END).",
            name, args.get("think_end_token"), _think_tags()[1],
        )
        return None
    return opens


auto_require_think_end.cache_clear = _detect_from_argv.cache_clear  # type: ignore[attr-defined]


def _require_think_end() -> bool:
    """``TELLTALE_REQUIRE_THINK_END`` when set (both ways), else :func:`auto_require_think_end`,
    else False."""
    env = parse_bool(os.environ.get("TELLTALE_REQUIRE_THINK_END", ""))
    if env is not None:
        return env
    return bool(auto_require_think_end())


def split_thinking(response: str) -> tuple[str, bool]:
    """Return ``(answer_text, truncated)``.

    ``answer_text`` is the text after the last think-end token (the whole response when there is
    none). ``truncated`` is True when a thinking block was opened and never closed: a start tag
    with no end tag after it, or -- when the prompt itself opened the block (the chat template
    detected by :func:`auto_require_think_end`, or ``TELLTALE_REQUIRE_THINK_END=1``) -- no end
    tag at all.
    A truncated response has no answer text.
    """
    if response is None:
        return "", False
    text = str(response)
    start, end = _think_tags()
    if end and end in text:
        after = text.rsplit(end, 1)[1]
        if start and start in after:  # a new thinking block opened after the last close
            return "", True
        return after.strip(), False
    if (start and start in text) or _require_think_end():
        return "", True
    return text.strip(), False


# --------------------------------------------------------------------------------------------
# 2. final answer strings
# --------------------------------------------------------------------------------------------

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*(\{)?")


def _balanced(text: str, open_idx: int) -> str | None:
    """Content of the brace group whose ``{`` is at ``open_idx`` (None if never closed)."""
    depth = 0
    for i in range(open_idx, len(text)):
        c = text[i]
        if c == "{" and (i == 0 or text[i - 1] != "\\"):
            depth += 1
        elif c == "}" and (i == 0 or text[i - 1] != "\\"):
            depth -= 1
            if depth == 0:
                return text[open_idx + 1 : i]
    return None


def all_boxed(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}`` / ``\\fbox{...}`` (also ``\\boxed 5``), in order."""
    out: list[str] = []
    for m in _BOXED_RE.finditer(text or ""):
        if m.group(1):
            inner = _balanced(text, m.end() - 1)
            if inner is not None:
                out.append(inner.strip())
        else:  # "\boxed 5"
            m2 = re.match(r"\s*([^\s$]+)", text[m.end() :])
            if m2:
                out.append(m2.group(1))
    return out


def last_boxed(text: str) -> str | None:
    boxes = [b for b in all_boxed(text) if b.strip()]
    return boxes[-1] if boxes else None


_MD_RE = re.compile(r"\*\*|__|(?<!\w)\*(?!\s)|(?<!\s)\*(?!\w)|`|^#+\s*", re.M)

_PHRASE_RE = re.compile(
    r"\b(?:final\s+answer|correct\s+(?:answer|option|choice)|best\s+(?:answer|option|choice)|"
    r"right\s+(?:answer|option|choice)|answer)"
    r"\s*(?:\([^)]{0,20}\))?"  # "Answer (letter): C"
    r"\s*(?:is\s*:?|:|=|would\s+be|should\s+be|must\s+be|will\s+be|choice\s*:|option\s*:)\s*",
    re.I,
)


#: a ``$...$`` / ``$$...$$`` math span. ``\$`` inside is an escaped dollar sign, never a delimiter;
#: as in Pandoc, the span opens before and closes after a non-space character and the closing
#: ``$`` is not followed by a digit, so money (``$18. That is 2 more than $16``) is no span.
_MATH_SPAN_RE = re.compile(r"(?<!\\)(\$\$?)(?=[^\s$])((?:\\.|[^\\$])+?)(?<=\S)\1(?!\d)", re.S)

#: an introductory phrase ending in a comma ("After 3 days, ...", "Therefore, ..."): not the answer
_INTRO_RE = re.compile(
    r"(?:(?:after|in|on|for|over|by|within|at|during|with|altogether|overall|in\s+total|in\s+the\s+end)\b[^,.;:\n]{0,40}"
    r"|therefore|thus|so|hence|finally|then|overall|altogether|in\s+total|in\s+the\s+end|in\s+summary)"
    r",\s+(?=\S)",
    re.I,
)


def _math_span_at_start(s: str) -> str | None:
    m = _MATH_SPAN_RE.match(s)
    if m and not (m.group(1) == "$" and "\n" in m.group(2)):
        return m.group(0)
    m = re.match(r"\\\((.+?)\\\)", s, re.S)
    return m.group(0) if m else None


def _cut_clause(s: str, lists: bool = False) -> str:
    """Cut an answer phrase's capture at the end of its clause (``lists=True``: at the end of
    its line or sentence only, keeping ", " inside, for word lists and option texts)."""
    s = s.strip()
    if not lists:  # "After 3 days, she has 18" -> "she has 18"
        m = _INTRO_RE.match(s)
        if m:
            s = s[m.end() :]
    # a $...$ / \(...\) span at the start is kept whole (it may contain ". " or ", ")
    span = _math_span_at_start(s)
    if span:
        return span
    s = s.split("\n", 1)[0]
    if lists:
        return re.split(r"(?<!\d)\.(?:\s|$)|\.(?=\s+[A-Z])", s, maxsplit=1)[0].strip()
    s = re.split(r"(?<!\d)\.(?:\s|$)|\.(?=\s+[A-Z])|;|,\s|\s+(?:because|since|as|which|so|but)\s", s, maxsplit=1)[0]
    return s.strip()


def answer_phrase(text: str, lists: bool = False) -> str | None:
    """The clause after the last answer phrase ("The answer is X", "**Answer:** X", ...)."""
    if not text:
        return None
    plain = _MD_RE.sub("", text)
    for m in reversed(list(_PHRASE_RE.finditer(plain))):  # the last phrase with a non-empty clause
        cand = _cut_clause(plain[m.end() :], lists)
        if cand:
            return cand
    return None


def clean_answer(s: str) -> str:
    """Drop LaTeX wrappers, math delimiters, Markdown and trailing punctuation."""
    s = s.strip()
    for _ in range(3):
        s = re.sub(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname|emph)\s*\{([^{}]*)\}", r"\1", s)
        s = re.sub(r"\\(?:boxed|fbox)\s*\{([^{}]*)\}", r"\1", s)
    s = s.replace("\\(", "").replace("\\)", "").replace("\\[", "").replace("\\]", "")
    s = s.replace("\\$", "").replace("$", "").replace("**", "").replace("`", "")
    # thousands separators written as "70{,}000", "70\,000" or a thin space -> "70,000"
    s = re.sub(r"(?<=\d)(?:\{,\}|\\,|\\ |[\u2009\u202f])(?=\d{3}(?!\d))", ",", s)
    s = re.sub(r"\\[,;!: ]", " ", s)
    s = re.sub(r"\\([&%_#])", r"\1", s)  # LaTeX escapes of text characters: "\&" -> "&"
    s = s.strip().strip("*_").strip()
    s = re.sub(r"[.。!;:]+$", "", s).strip()
    return " ".join(s.split())


def final_answer_string(answer_text: str, lists: bool = False) -> str | None:
    """Step 2 of the rules: the last boxed content, else the last answer phrase (cleaned)."""
    b = last_boxed(answer_text)
    if b is not None:
        return clean_answer(b)
    p = answer_phrase(answer_text, lists)
    if p is not None:
        return clean_answer(p)
    return None


# --------------------------------------------------------------------------------------------
# 3. math
# --------------------------------------------------------------------------------------------

# a number token: an integer fraction ("1/2"), a decimal, an integer (after _num_text)
_NUM_RE = re.compile(r"-?\d+/\d+(?![\d.])|-?\d+(?:\.\d+)?|-?\.\d+")
_THOUSANDS_RE = re.compile(r"(?<![\d.])(\d{1,3}(?:,\d{3})+)(?![\d])")
_UNIT_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen".split()
)
_TENS_WORDS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_WORD_NUMBERS: dict[str, int] = {
    **{w: i for i, w in enumerate(_UNIT_WORDS)},
    **{w: 20 + 10 * i for i, w in enumerate(_TENS_WORDS)},
}
_SCALE_WORDS = {"hundred": 100, "thousand": 1000, "million": 10**6}
_NUMWORD = "|".join(sorted([*_WORD_NUMBERS, *_SCALE_WORDS], key=len, reverse=True))
#: a run of number words: "eighteen", "twenty-five", "one hundred and twenty"
_NUMWORD_RUN_RE = re.compile(rf"(?<![\w'-])(?:{_NUMWORD})(?:(?:\s+and\s+|\s+|-)(?:{_NUMWORD}))*(?![\w'-])", re.I)
#: a number word after a determiner names things already counted ("the two methods", "the last
#: one", "no one"), it is no count; "one" is also a pronoun before these words ("one of them",
#: "only one is rotten")
_WORD_BEFORE_RE = re.compile(
    r"\b(?:the|this|that|these|those|both|all|each|every|any|no|which|another|last|first|right|correct|wrong|same|other|a)\s+$",
    re.I,
)
_ONE_AFTER_RE = re.compile(
    r"^\s*(?:of|another|by|who|which|that|'s|is|was|has|had|does|did|can|could|will|would|should|must|may|might)\b", re.I
)
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{\s*(-?\d+)\s*\}\s*\{\s*(\d+)\s*\}")


def _words_value(words: list[str]) -> list[int]:
    """Values of a run of number words; a run that is not one number ("one two three") gives
    one value per well-formed group."""
    out: list[int] = []
    total = cur = 0
    prev = ""  # kind of the previous word: "unit" (< 10), "teen" (10-19), "tens", "scale"
    started = False
    for w in words:
        if w == "and":
            continue
        if w in _SCALE_WORDS:
            scale = _SCALE_WORDS[w]
            if scale == 100:
                cur = max(cur, 1) * 100
            else:
                total += max(cur, 1) * scale
                cur = 0
            prev, started = "scale", True
            continue
        v = _WORD_NUMBERS[w]
        kind = "unit" if v < 10 else "teen" if v < 20 else "tens"
        fits = not started or prev == "scale" or (prev == "tens" and kind == "unit")
        if not fits:
            out.append(total + cur)
            total = cur = 0
        cur += v
        prev, started = kind, True
    if started:
        out.append(total + cur)
    return out


def _words_to_digits(s: str, lone_one: bool = True) -> str:
    """Number words written as digits: "eighteen apples" -> "18 apples". ``lone_one=False``
    keeps a lone "one" (running text: "one more than last week", "for one pipe")."""

    def sub(m: re.Match) -> str:
        words = [w.lower() for w in re.split(r"[\s-]+", m.group(0)) if w]
        if _WORD_BEFORE_RE.search(s[max(0, m.start() - 40) : m.start()]) or (
            words == ["one"] and (not lone_one or _ONE_AFTER_RE.match(s[m.end() : m.end() + 40]))
        ):
            return m.group(0)
        return " ".join(str(v) for v in _words_value(words))

    return _NUMWORD_RUN_RE.sub(sub, s)


def _strip_thousands(s: str) -> str:
    s = s.replace("\u2212", "-")  # unicode minus
    return _THOUSANDS_RE.sub(lambda m: m.group(1).replace(",", ""), s)


def _num_text(s: str, lone_one: bool = True) -> str:
    """Text prepared for number search: ``\\frac{1}{2}`` -> ``1/2``, number words as digits,
    ``{,}`` / ``\\,`` / thousands separators removed."""
    s = _FRAC_RE.sub(r"\1/\2", s or "")
    s = re.sub(r"(?<=\d)(?:\{,\}|\\,)(?=\d{3}(?!\d))", ",", s)
    return _strip_thousands(_words_to_digits(s, lone_one))


def _as_fraction(s: str) -> Fraction | None:
    """A plain number (``-18``, ``18.00``, ``033``, ``3/4``, ``1,000``, ``25%``), else None."""
    if s is None:
        return None
    t = clean_answer(str(s))
    t = _strip_thousands(t).replace(" ", "")
    t = re.sub(r"^\\?\$|^(?:usd|rs\.?)", "", t, flags=re.I)
    t = t.rstrip("%")
    t = t.replace("\\!", "").replace("{,}", "")
    m = re.fullmatch(r"\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}", t)
    if m:
        t = f"{m.group(1)}/{m.group(2)}"
    t = re.sub(r"^\\?-", "-", t).replace("\u2212", "-")
    if re.fullmatch(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)", t):
        return Fraction(t)
    m = re.fullmatch(r"([+-]?\d+)/([+-]?\d+)", t)
    if m and int(m.group(2)) != 0:
        return Fraction(int(m.group(1)), int(m.group(2)))
    return None


#: a number after one of these words is a circumstance ("after 3 days", "for 3 people",
#: "18 out of 20", "2 more than 16"), not the quantity asked for
_PREP_BEFORE_RE = re.compile(
    r"\b(?:after|in|for|over|per|within|out\s+of|from|at|by|on|during|every|than|with|among|between)\s+\$?$",
    re.I,
)
_EXPR_RE = re.compile(r"[\^*+×÷]|\d\s*-\s*\d|\d\s+/|/\s+\d")


def _number_in(s: str) -> Fraction | None:
    """The number a short answer names: ``18 apples``, ``$18.00 per hour``, ``eighteen``,
    ``1/2 of them``, ``a - b = 70,000`` (the right-hand side of an equation), ``after 3 days she
    has 18`` (of several numbers the last one that is not a circumstance). None for an expression
    (math-verify compares those) or no number."""
    f = _as_fraction(s)
    if f is not None:
        return f
    t = _num_text(clean_answer(s))
    f = _as_fraction(t)
    if f is not None:
        return f
    parts = re.split(r"=|\\approx|≈", t)
    if len(parts) > 1:  # an equation or approximation: its right-hand side
        return _number_in(parts[-1]) if parts[-1].strip() else None
    t = re.sub(r"\([^()]*\)", " ", t)  # "(6 per box × 3 boxes)": the working, not the answer
    if "\\" in t or _EXPR_RE.search(t):
        return None  # an expression: leave it to math-verify
    nums = list(_NUM_RE.finditer(t))
    if len(nums) > 1:
        nums = [m for m in nums if not _PREP_BEFORE_RE.search(t[max(0, m.start() - 40) : m.start()])] or nums
    return _as_fraction(nums[-1].group()) if nums else None


def last_number(text: str) -> str | None:
    """The last number of a text (fractions such as ``1/2`` and number words count, except a
    lone "one", which running text mostly uses as a pronoun or an aside)."""
    nums = _NUM_RE.findall(_num_text(text or "", lone_one=False))
    return nums[-1] if nums else None


def extract_math_answer(answer_text: str) -> str | None:
    """Final answer string of a math response (boxed > answer phrase > last number)."""
    s = final_answer_string(answer_text)
    if s:
        return s
    return last_number(answer_text)


def _decimals(s: str) -> int:
    m = re.fullmatch(r"\s*-?\d*\.(\d+)\s*", s or "")
    return len(m.group(1)) if m else 0


def _math_verify_equal(pred: str, gold: str) -> bool:
    try:
        from math_verify import parse, verify
    except ImportError:  # pragma: no cover - math-verify is a dependency
        return False
    main = threading.current_thread() is threading.main_thread()
    t = 5 if main else None  # math-verify's timeout uses SIGALRM: main thread only

    def _p(x: str):
        x = x.strip()
        if not x.startswith("$"):
            x = f"${x}$"
        return parse(x, parsing_timeout=t)

    try:
        g, p = _p(gold), _p(pred)
        if not g or not p:
            return False
        return bool(verify(g, p, timeout_seconds=t))
    except Exception:
        return False


def math_equal(pred: str | None, gold: str | int | float | None) -> bool:
    """Is ``pred`` (an extracted answer string) the same number/expression as ``gold``?"""
    if pred is None or gold is None:
        return False
    gold_s = str(gold).strip()
    g = _as_fraction(gold_s)
    p = _number_in(pred)
    if g is not None and p is not None:
        if p == g:
            return True
        # golds rounded to 2 decimals (GSM-Plus: 26/6 -> "4.33") accept a more precise answer
        if _decimals(gold_s) == 2 and abs(float(p) - float(g)) < 0.005 + 1e-9 and _decimals(str(float(p))) > 2:
            return True
        return False
    return _math_verify_equal(_strip_thousands(clean_answer(pred)), gold_s)


_ABSTAIN_RE = re.compile(
    r"\b(?:none|no\s+(?:valid\s+|numerical\s+|definite\s+|unique\s+)?(?:answer|solution)|"
    r"n/a|unanswerable|(?:is|are|remains?|stays?)\s+unknown|^\s*unknown\s*$|undetermined|undeterminable|indeterminate|not\s+determinable|"
    r"(?:can\s*not|can't|cannot)\s+(?:be\s+)?(?:determined|answered|calculated|computed|known|found|solved)|"
    r"(?:can\s*not|can't|cannot)\s+(?:determine|answer|calculate|compute|know|solve)|"
    r"(?:not|im)possible\s+to\s+(?:determine|calculate|compute|answer|know|solve)|"
    r"not\s+(?:enough|sufficient)\s+(?:information|info|data|details)|"
    r"(?:insufficient|missing|incomplete)\s+(?:information|info|data|details)|"
    r"information\s+is\s+(?:missing|insufficient|incomplete)|"
    r"(?:does|do)\s+not\s+(?:provide|give|specify|state)\s+enough)\b",
    re.I,
)


def is_abstention(s: str | None) -> bool:
    return bool(s) and bool(_ABSTAIN_RE.search(s)) and not re.search(r"\d", clean_answer(s))


def _is_none_gold(gold: Any) -> bool:
    return gold is None or str(gold).strip().lower() in {"none", "", "nan", "null"}


def math_gold(doc: dict) -> str | None:
    """Gold answer of a GSM8K-schema (``answer`` ending ``#### N``), GSM-Plus (``answer``) or
    AIME (``Answer``/``answer``) doc, as a string. ``None`` for GSM-Plus "None" golds, also when
    a mirror stores one as JSON ``null`` (the field is there, its value is None)."""
    keys = ("answer", "Answer", "target", "final_answer")
    for key in keys:
        if key in doc and doc[key] is not None:
            v = doc[key]
            if isinstance(v, str) and "####" in v:
                v = v.rsplit("####", 1)[1]
            v = str(v).strip()
            v = _strip_thousands(v)
            return None if _is_none_gold(v) else v
    if any(key in doc for key in keys):  # answer: null -- an unanswerable item, like "None"
        return None
    raise KeyError(f"no gold answer field in doc with keys {sorted(doc)}")


def score_math(response: str, gold: str | int | None) -> dict:
    """Verdict for one math response. ``gold=None`` (or "None") means the question is
    unanswerable (GSM-Plus critical thinking): right only if the final answer says so."""
    text, truncated = split_thinking(response)
    if truncated:
        return {"correct": False, "truncated": True, "pred": None}
    if _is_none_gold(gold):
        s = final_answer_string(text)
        if s is not None:
            return {"correct": is_abstention(s), "truncated": False, "pred": s}
        # no explicit final answer: an abstention in the closing lines counts
        tail = "\n".join([ln for ln in text.splitlines() if ln.strip()][-3:])
        ok = bool(_ABSTAIN_RE.search(_MD_RE.sub("", tail)))
        return {"correct": ok, "truncated": False, "pred": "None" if ok else last_number(text)}
    pred = extract_math_answer(text)
    return {"correct": math_equal(pred, gold), "truncated": False, "pred": pred}


# --------------------------------------------------------------------------------------------
# 4. multiple choice letters
# --------------------------------------------------------------------------------------------

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _norm_text(s: str) -> str:
    s = clean_answer(s).lower()
    s = re.sub(r"[^\w\s&]", " ", s)
    return " ".join(s.split())


def _option_cue_re(valid: str) -> re.Pattern:
    """``Option C``, ``option (C)``, ``choice C`` or ``(C)``: a letter named as an option."""
    cls = "[" + re.escape(valid) + "]"
    return re.compile(rf"(?:\b(?i:option|choice)\s*[\(\[]?({cls})(?![\w'])[\)\]]?|[\(\[]({cls})[\)\]])")


#: an option cue that rejects its option ("option C is incorrect", "not (C)")
_NEGATED_AFTER_RE = re.compile(
    r"^\s*(?:is|was|are|seems|would\s+be)?\s*(?:not\b|incorrect|wrong|false|invalid|eliminated|ruled\s+out|too\b)",
    re.I,
)
_NEGATED_BEFORE_RE = re.compile(r"\b(?:not|eliminate|rule\s+out|exclude|than)\s*$", re.I)


def _option_cues(text: str, valid: str) -> list[re.Match]:
    """The option cues of a text that do not reject their option, in order."""
    out = []
    for m in _option_cue_re(valid).finditer(text):
        if _NEGATED_AFTER_RE.match(text[m.end() : m.end() + 60]) or _NEGATED_BEFORE_RE.search(
            text[max(0, m.start() - 40) : m.start()]
        ):
            continue
        out.append(m)
    return out


def _option_number(text: str) -> Fraction | None:
    """The value of an option whose whole text is a number (``three``, ``42``), else None."""
    return _as_fraction(_num_text(clean_answer(str(text))))


def _letter_of(s: str, valid: str, options: Sequence[str] | None = None) -> str | None:
    """Option letter named by a short answer string: ``C``, ``(C)``, ``C.``, ``C) 42``,
    ``Option C``, ``\\text{(C)}``; else the option whose text the string equals; else an option
    cue inside it (``therefore option C``); else the one option whose text is the number the
    string names (``\\boxed{3}`` for an option ``three``)."""
    t = clean_answer(s)
    t = re.sub(r"^(?:option|choice|answer)\s*:?\s*", "", t, flags=re.I).strip()
    m = re.match(r"^[\(\[]?([A-Za-z])[\)\]]?(?=$|[\s.:,)\]])", t)
    if m:
        letter = m.group(1)
        if letter.upper() in valid and (letter.isupper() or len(t) <= 3):
            return letter.upper()
    if options:
        nt = _norm_text(t)
        for i, o in enumerate(options):
            if i < len(valid) and nt and nt == _norm_text(str(o)):
                return valid[i]
    cues = _option_cues(t, valid)
    if cues:
        return cues[0].group(1) or cues[0].group(2)
    if options:
        n = _number_in(t)
        if n is not None:
            hits = [i for i, o in enumerate(options) if i < len(valid) and _option_number(o) == n]
            if len(hits) == 1:
                return valid[hits[0]]
    return None


def extract_choice(answer_text: str, valid: str, options: Sequence[str] | None = None) -> str | None:
    """Letter answer: boxed > answer phrase > last standalone option letter."""
    if not answer_text:
        return None
    b = last_boxed(answer_text)
    if b is not None:
        letter = _letter_of(b, valid, options)
        if letter:
            return letter
    p = answer_phrase(answer_text)
    if p is not None:
        letter = _letter_of(p, valid, options)
        if letter:
            return letter
    plain = _MD_RE.sub("", answer_text)
    cls = "[" + re.escape(valid) + "]"
    # (C) / [C] / Option C / a line that is just "C" or "C." / "C)" at a line start
    strong = [(m.start(), m.group(1) or m.group(2)) for m in _option_cues(plain, valid)]
    strong += [
        (m.start(), m.group(1) or m.group(2))
        for m in re.finditer(rf"^\s*({cls})\s*[.):]?\s*$|^\s*({cls})[.)]\s", plain, re.M)
    ]
    if strong:
        return max(strong)[1]
    # bare capital letter, but not the article "A" / pronoun "I" starting a phrase
    weak = [
        m
        for m in re.finditer(rf"(?<![\w'\\])({cls})(?![\w'])", plain)
        if not (m.group(1) in "AI" and re.match(r"\s+[a-z]", plain[m.end() :]))
    ]
    if weak:
        return weak[-1].group(1)
    return None


def score_choice(response: str, gold_letter: str, n_options: int, options: Sequence[str] | None = None) -> dict:
    text, truncated = split_thinking(response)
    if truncated:
        return {"correct": False, "truncated": True, "pred": None}
    valid = LETTERS[: max(1, min(n_options, len(LETTERS)))]
    pred = extract_choice(text, valid, options)
    return {"correct": pred is not None and pred == str(gold_letter).strip().upper(), "truncated": False, "pred": pred}


# --------------------------------------------------------------------------------------------
# 5. BBH
# --------------------------------------------------------------------------------------------

#: subtask -> answer kind
BBH_KINDS: dict[str, str] = {
    "boolean_expressions": "bool",
    "causal_judgement": "yesno",
    "date_understanding": "mc",
    "disambiguation_qa": "mc",
    "dyck_languages": "dyck",
    "formal_fallacies": "valid",
    "geometric_shapes": "mc",
    "hyperbaton": "mc",
    "logical_deduction_five_objects": "mc",
    "logical_deduction_seven_objects": "mc",
    "logical_deduction_three_objects": "mc",
    "movie_recommendation": "mc",
    "multistep_arithmetic_two": "number",
    "navigate": "yesno",
    "object_counting": "number",
    "penguins_in_a_table": "mc",
    "reasoning_about_colored_objects": "mc",
    "ruin_names": "mc",
    "salient_translation_error_detection": "mc",
    "snarks": "mc",
    "sports_understanding": "yesno",
    "temporal_sequences": "mc",
    "tracking_shuffled_objects_five_objects": "mc",
    "tracking_shuffled_objects_seven_objects": "mc",
    "tracking_shuffled_objects_three_objects": "mc",
    "web_of_lies": "yesno",
    "word_sorting": "words",
}

#: label kinds: canonical label -> synonyms (lower case)
_LABELS: dict[str, dict[str, tuple[str, ...]]] = {
    "bool": {"true": ("true",), "false": ("false",)},
    "yesno": {
        "yes": ("yes", "plausible"),
        "no": ("no", "not plausible", "implausible"),
    },
    "valid": {"valid": ("valid", "deductively valid"), "invalid": ("invalid", "not valid", "deductively invalid")},
}


def _label_hits(s: str, kind: str) -> list[tuple[int, str]]:
    syn = sorted(((w, lab) for lab, ws in _LABELS[kind].items() for w in ws), key=lambda x: -len(x[0]))
    pat = re.compile(r"(?<![\w-])(" + "|".join(re.escape(w).replace(r"\ ", r"\s+") for w, _ in syn) + r")(?![\w-])", re.I)
    lookup = {w: lab for w, lab in syn}
    return [(m.start(), lookup[" ".join(m.group(1).lower().split())]) for m in pat.finditer(s)]


def extract_label(answer_text: str, kind: str) -> str | None:
    """True/False, yes/no or valid/invalid: boxed > answer phrase (first label in them) > the
    last label word of the answer text."""
    if not answer_text:
        return None
    for cand in (last_boxed(answer_text), answer_phrase(answer_text)):
        if cand is not None:
            hits = _label_hits(clean_answer(cand), kind)
            if hits:
                return hits[0][1]
    hits = _label_hits(_MD_RE.sub("", answer_text), kind)
    return hits[-1][1] if hits else None


_BBH_OPTION_RE = re.compile(r"^\(([A-Z])\)\s*(.*)$", re.M)


def bbh_options(input_text: str) -> tuple[str, list[str]]:
    """(letters, option texts) listed as ``(A) ...`` lines in a BBH input."""
    found = _BBH_OPTION_RE.findall(input_text or "")
    return "".join(letter for letter, _ in found), [t.strip() for _, t in found]


def _word_tokens(s: str) -> list[str]:
    s = re.sub(r"^\s*(?:\d+[.)]|[-*•])\s+", " ", s or "", flags=re.M)  # list markers
    s = clean_answer(s)
    return re.findall(r"[a-z0-9][a-z0-9&'.\-]*", s.lower().replace(",", " "))


#: where a word-sorting response announces its list: "Sorted list:", "In alphabetical order:",
#: "The words sorted alphabetically are", "Final list:", "**Answer**"
_LIST_CUE_RE = re.compile(r"\b(?:sorted|alphabetical(?:ly)?|answer|(?:final|resulting|correct)\s+(?:list|order))\b", re.I)
_LIST_INTRO_RE = re.compile(r"\b(?:is|are)\b")


def _listed_words(text: str) -> list[str] | None:
    """The word list after the last "sorted" / "alphabetical" / "answer" cue that announces one:
    the rest of the cue's line after its ":" (or "is"/"are"), or, when that is empty, the block
    of lines that follows (up to a blank line). None when no cue announces a list."""
    plain = _MD_RE.sub("", text or "")
    for m in reversed(list(_LIST_CUE_RE.finditer(plain))):
        line_start = plain.rfind("\n", 0, m.start()) + 1
        line_end = plain.find("\n", m.end())
        line_end = len(plain) if line_end == -1 else line_end
        rest = plain[m.end() : line_end]
        intro = _LIST_INTRO_RE.search(rest)
        if ":" in rest:  # "Sorted list: ...", "The sorted list is as follows:"
            after = rest.split(":", 1)[1]
        elif intro:  # "The words sorted alphabetically are apple, ..."
            after = rest[intro.end() :]
        elif len(plain[line_start : m.start()].split()) <= 3 and len(rest.strip(" :.#").split()) <= 2:
            after = ""  # a heading such as "Sorted list" / "Final Answer"
        else:
            continue
        after = re.split(r"(?<!\d)\.(?:\s|$)", after, maxsplit=1)[0]
        words = _word_tokens(after)
        if not words and not after.strip():  # the list is on the following lines
            block: list[str] = []
            for ln in plain[line_end:].split("\n"):
                if not ln.strip():
                    if block:
                        break
                    continue
                block.append(re.split(r"(?<!\d)\.(?:\s|$)", ln, maxsplit=1)[0])
            words = _word_tokens("\n".join(block))
        if words:
            return words
    return None


_BRACKETS = "()[]{}<>"


def _brackets(s: str) -> str:
    s = (s or "").replace("\\rangle", ">").replace("\\langle", "<")
    return "".join(c for c in (s or "") if c in _BRACKETS)


def _dyck_prefix(input_text: str) -> str:
    m = re.search(r"Input:\s*(.*)$", input_text or "", re.S)
    return _brackets(m.group(1)) if m else ""


def score_bbh(response: str, doc: dict, kind: str) -> dict:
    """Verdict for one BBH response; ``kind`` is one of the values of :data:`BBH_KINDS`."""
    text, truncated = split_thinking(response)
    if truncated:
        return {"correct": False, "truncated": True, "pred": None}
    target = str(doc["target"]).strip()
    pred: str | None
    if kind == "mc":
        valid, options = bbh_options(doc.get("input", ""))
        m = re.fullmatch(r"\(([A-Z])\)", target)
        if m:
            valid = valid or LETTERS[: LETTERS.index(m.group(1)) + 1]
            pred = extract_choice(text, valid, options)
            ok = pred == m.group(1)
        else:  # a few items have the option text as target ("Monsters, Inc")
            pred = final_answer_string(text, lists=True)
            ok = pred is not None and _norm_text(pred) == _norm_text(target)
    elif kind in _LABELS:
        pred = extract_label(text, kind)
        gold = _label_hits(target, kind)
        ok = pred is not None and bool(gold) and pred == gold[0][1]
    elif kind == "number":
        s = final_answer_string(text)
        pred = s if s else last_number(text)
        ok = math_equal(pred, target)
    elif kind == "words":
        gold = _word_tokens(target)
        s = final_answer_string(text, lists=True)
        if s is not None:
            pred = s
            ok = _word_tokens(s) == gold
        elif (listed := _listed_words(text)) is not None:  # "Sorted list: ..."
            pred = " ".join(listed)
            ok = listed == gold
        else:  # the answer text ends with the sorted list
            toks = _word_tokens(text)
            pred = " ".join(toks[-len(gold) :]) if gold else ""
            ok = bool(gold) and toks[-len(gold) :] == gold
    elif kind == "dyck":
        gold = _brackets(target)
        prefix = _dyck_prefix(doc.get("input", ""))
        # raw strings (clean_answer would take "\\]" for a math delimiter); a bare "}" inside
        # \boxed{...} unbalances it, so the box runs to the last "}" of its line
        s = None
        starts = list(re.finditer(r"\\(?:boxed|fbox)\s*\{", text))
        if starts:
            line = text[starts[-1].end() :].split("\n", 1)[0]
            s = line[: line.rfind("}")] if "}" in line else line
        if s is None:
            s = answer_phrase(text, lists=True)
        if s is None:
            lines = [ln for ln in text.splitlines() if _brackets(ln)]
            s = lines[-1] if lines else None
        pred = s
        b = _brackets(s or "")
        ok = bool(gold) and (b == gold or (bool(prefix) and b == prefix + gold))
    else:
        raise ValueError(f"unknown BBH answer kind {kind!r}")
    return {"correct": bool(ok), "truncated": False, "pred": pred}


# --------------------------------------------------------------------------------------------
# 6. lm-eval entry points (process_results)
# --------------------------------------------------------------------------------------------


def _responses(results: Iterable[Any]) -> list[str]:
    """lm-eval passes ``[filtered_resps]``: a string per request after ``take_first``, or the
    list of all samples (``repeats: k`` with an identity filter)."""
    out: list[str] = []
    for r in results:
        if isinstance(r, (list, tuple)):
            out.extend("" if x is None else str(x) for x in r)
        else:
            out.append("" if r is None else str(r))
    return out or [""]


def _mean(verdicts: list[dict]) -> dict:
    n = len(verdicts)
    return {
        "exact_match": sum(float(v["correct"]) for v in verdicts) / n,
        "truncated": sum(float(v["truncated"]) for v in verdicts) / n,
    }


def process_results_math(doc: dict, results: list) -> dict:
    """Math word problems with one numeric gold: GSM8K-schema docs (``answer`` ending in
    ``#### N``), GSM-Plus (``answer``, "None" = unanswerable) and AIME (``Answer``)."""
    gold = math_gold(doc)
    return _mean([score_math(r, gold) for r in _responses(results)])


def _answer_key(pred: str | None) -> str | None:
    if pred is None:
        return None
    f = _number_in(pred)
    if f is not None:
        return str(f)
    if is_abstention(pred):
        return "None"
    return " ".join(clean_answer(pred).split())


def process_results_math_sampled(doc: dict, results: list) -> dict:
    """Like :func:`process_results_math` for k samples per item (``repeats: k``):
    ``exact_match`` = mean accuracy over the k samples (pass@1 estimate), ``truncated`` = share
    of truncated samples, ``pass_at_k`` = any sample right, ``maj_at_k`` = the most frequent
    extracted answer (truncated samples abstain; ties -> earliest) is right."""
    gold = math_gold(doc)
    verdicts = [score_math(r, gold) for r in _responses(results)]
    out = _mean(verdicts)
    out["pass_at_k"] = float(any(v["correct"] for v in verdicts))
    keys = [(_answer_key(v["pred"]), v) for v in verdicts if not v["truncated"] and v["pred"] is not None]
    if keys:
        counts = Counter(k for k, _ in keys)
        best = max(counts.values())
        winner = next(v for k, v in keys if counts[k] == best)
        out["maj_at_k"] = float(winner["correct"])
    else:
        out["maj_at_k"] = 0.0
    return out


# named aliases, so that each YAML says what it scores
process_results_gsm8k = process_results_math
process_results_gsm_plus = process_results_math
process_results_aime = process_results_math


def process_results_mmlu_pro(doc: dict, results: list) -> dict:
    options = list(doc.get("options") or [])
    gold = doc.get("answer")
    if not gold and doc.get("answer_index") is not None:
        gold = LETTERS[int(doc["answer_index"])]
    n = len(options) or 10
    return _mean([score_choice(r, gold, n, options) for r in _responses(results)])


def _bbh(kind: str):
    def process_results(doc: dict, results: list) -> dict:
        return _mean([score_bbh(r, doc, kind) for r in _responses(results)])

    process_results.__name__ = f"process_results_bbh_{kind}"
    process_results.__qualname__ = process_results.__name__
    process_results.__doc__ = f"BBH subtasks whose answers are of kind {kind!r} (see BBH_KINDS)."
    return process_results


process_results_bbh_mc = _bbh("mc")
process_results_bbh_bool = _bbh("bool")
process_results_bbh_yesno = _bbh("yesno")
process_results_bbh_valid = _bbh("valid")
process_results_bbh_number = _bbh("number")
process_results_bbh_words = _bbh("words")
process_results_bbh_dyck = _bbh("dyck")


# --------------------------------------------------------------------------------------------
# answer keys for majority voting over candidates (vllm-lrs's ``maj`` selector)
# --------------------------------------------------------------------------------------------
# lm-eval calls ``process_results``; the LRS model type additionally looks for a
# ``telltale_extract(doc, response) -> str | None`` attribute on it, so that votes use exactly the
# answer this scorer would grade. Truncated responses abstain (None).


def _extractor(score_one):
    def extract(doc: dict, response: str) -> str | None:
        v = score_one(doc, response)
        return None if v["truncated"] or v["pred"] is None else _answer_key(v["pred"])

    return extract


process_results_math.telltale_extract = _extractor(lambda d, r: score_math(r, math_gold(d)))
process_results_math_sampled.telltale_extract = process_results_math.telltale_extract


def _mmlu_one(doc: dict, r: str) -> dict:
    options = list(doc.get("options") or [])
    gold = doc.get("answer") or (LETTERS[int(doc["answer_index"])] if doc.get("answer_index") is not None else "")
    return score_choice(r, gold, len(options) or 10, options)


process_results_mmlu_pro.telltale_extract = _extractor(_mmlu_one)
for _kind, _fn in [("mc", process_results_bbh_mc), ("bool", process_results_bbh_bool),
                   ("yesno", process_results_bbh_yesno), ("valid", process_results_bbh_valid),
                   ("number", process_results_bbh_number), ("words", process_results_bbh_words),
                   ("dyck", process_results_bbh_dyck)]:
    _fn.telltale_extract = _extractor(lambda d, r, _k=_kind: score_bbh(r, d, _k))
