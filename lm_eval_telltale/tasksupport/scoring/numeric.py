"""Math answers: numbers in text (digits, fractions, number words, thousands separators), the
comparison with the gold (exact, rounded golds, math-verify for expressions), abstentions for
unanswerable items, and the math verdict."""

from __future__ import annotations

import re
import threading
from fractions import Fraction
from typing import Any

from .text import _MD_RE, ThinkRule, clean_answer, final_answer_string, split_thinking

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


def score_math(response: str, gold: str | int | None, rule: ThinkRule | None = None) -> dict:
    """Verdict for one math response. ``gold=None`` (or "None") means the question is
    unanswerable (GSM-Plus critical thinking): right only if the final answer says so."""
    text, truncated = split_thinking(response, rule)
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

