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
   ``<think>`` into the *prompt* (DeepSeek-R1 distills) leave no trace of an unclosed block in a
   stripped response; for those, run without ``think_end_token`` (the scorer strips the thinking
   itself) and set ``TELLTALE_REQUIRE_THINK_END=1`` so that a response without ``</think>``
   counts as truncated. ``TELLTALE_THINK_START`` / ``TELLTALE_THINK_END`` change the tags.
2. Final answer string: the last ``\\boxed{...}`` (or ``\\fbox``), else the last answer phrase
   ("The answer is X", "Answer: X", "**Final Answer:** X", "the correct option is (X)", ...),
   cut at the end of its clause; Markdown emphasis and ``$`` delimiters are ignored.
3. Task-specific fallback when there is no such string: the last number (math), the last
   standalone option letter (multiple choice), the last label word (True/False, Yes/No,
   valid/invalid), the trailing words (word sorting) or the last bracket line (Dyck).
4. Comparison: numbers exactly (``18.00 == 18``, ``033 == 33``, ``1,000 == 1000``,
   ``\\frac{36}{2} == 18`` through math-verify), letters by letter (or by the option's text),
   labels case-insensitively, word lists and bracket sequences token by token.
"""

from __future__ import annotations

import os
import re
import threading
from collections import Counter
from fractions import Fraction
from typing import Any, Iterable, Sequence

__all__ = [
    "LETTERS",
    "split_thinking",
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

# --------------------------------------------------------------------------------------------
# 1. thinking
# --------------------------------------------------------------------------------------------


def _think_tags() -> tuple[str, str]:
    return (
        os.environ.get("TELLTALE_THINK_START", "<think>"),
        os.environ.get("TELLTALE_THINK_END", "</think>"),
    )


def _require_think_end() -> bool:
    return os.environ.get("TELLTALE_REQUIRE_THINK_END", "").strip().lower() in {"1", "true", "yes", "on"}


def split_thinking(response: str) -> tuple[str, bool]:
    """Return ``(answer_text, truncated)``.

    ``answer_text`` is the text after the last think-end token (the whole response when there is
    none). ``truncated`` is True when a thinking block was opened and never closed: a start tag
    with no end tag after it, or -- with ``TELLTALE_REQUIRE_THINK_END=1`` -- no end tag at all.
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


def _cut_clause(s: str, lists: bool = False) -> str:
    """Cut an answer phrase's capture at the end of its clause (``lists=True``: at the end of
    its line or sentence only, keeping ", " inside, for word lists and option texts)."""
    s = s.strip()
    # a $...$ / \(...\) span at the start is kept whole (it may contain ". " or ", ")
    m = re.match(r"(\$\$?)(.+?)\1", s, re.S) or re.match(r"\\\((.+?)\\\)", s, re.S)
    if m:
        return m.group(0)
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
    last = None
    for m in _PHRASE_RE.finditer(plain):
        rest = plain[m.end() :]
        cand = _cut_clause(rest, lists)
        if cand:
            last = cand
    return last


def clean_answer(s: str) -> str:
    """Drop LaTeX wrappers, math delimiters, Markdown and trailing punctuation."""
    s = s.strip()
    for _ in range(3):
        s = re.sub(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname|emph)\s*\{([^{}]*)\}", r"\1", s)
        s = re.sub(r"\\(?:boxed|fbox)\s*\{([^{}]*)\}", r"\1", s)
    s = s.replace("\\(", "").replace("\\)", "").replace("\\[", "").replace("\\]", "")
    s = s.replace("\\$", "").replace("$", "").replace("**", "").replace("`", "")
    s = re.sub(r"\\[,;!: ]", " ", s)
    s = re.sub(r"\\%", "%", s)
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

_NUM_RE = re.compile(r"-?\d+(?:\.\d+)?|-?\.\d+")  # applied after _strip_thousands
_THOUSANDS_RE = re.compile(r"(?<![\d.])(\d{1,3}(?:,\d{3})+)(?![\d])")
_WORD_NUMBERS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}


def _strip_thousands(s: str) -> str:
    s = s.replace("\u2212", "-")  # unicode minus
    return _THOUSANDS_RE.sub(lambda m: m.group(1).replace(",", ""), s)


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


def _number_in(s: str) -> Fraction | None:
    """The single number inside a short answer such as ``18 apples`` or ``$18.00 per hour``."""
    f = _as_fraction(s)
    if f is not None:
        return f
    t = clean_answer(s)
    low = t.lower()
    if low in _WORD_NUMBERS:
        return Fraction(_WORD_NUMBERS[low])
    if "\\" in t or re.search(r"[=^*/+×÷]|\d\s*-\s*\d", t):
        return None  # an expression: leave it to math-verify
    nums = _NUM_RE.findall(_strip_thousands(t))
    if len(nums) == 1:
        return _as_fraction(nums[0])
    return None


def last_number(text: str) -> str | None:
    nums = _NUM_RE.findall(_strip_thousands(text or ""))
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
    return _math_verify_equal(clean_answer(pred), gold_s)


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
    AIME (``Answer``/``answer``) doc, as a string. ``None`` for GSM-Plus "None" golds."""
    for key in ("answer", "Answer", "target", "final_answer"):
        if key in doc and doc[key] is not None:
            v = doc[key]
            if isinstance(v, str) and "####" in v:
                v = v.rsplit("####", 1)[1]
            v = str(v).strip()
            v = _strip_thousands(v)
            return None if _is_none_gold(v) else v
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


def _letter_of(s: str, valid: str, options: Sequence[str] | None = None) -> str | None:
    """Option letter named by a short answer string: ``C``, ``(C)``, ``C.``, ``C) 42``,
    ``Option C``, ``\\text{(C)}``; else the option whose text the string equals."""
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
    # (C) / [C] / a line that is just "C" or "C." / "C)" at a line start
    strong = list(
        re.finditer(
            rf"[\(\[]({cls})[\)\]]|^\s*({cls})\s*[.):]?\s*$|^\s*({cls})[.)]\s", plain, re.M
        )
    )
    if strong:
        m = strong[-1]
        return next(g for g in m.groups() if g)
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
