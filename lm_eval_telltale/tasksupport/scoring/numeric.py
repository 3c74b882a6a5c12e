"""Math answers: numbers in text (digits, fractions, number words, thousands separators), the
comparison with the gold (exact, rounded golds, math-verify for expressions), abstentions for
unanswerable items, and the math verdict."""

from __future__ import annotations

import re
import threading
from fractions import Fraction
from typing import Any

from .text import _MD_RE, Found, ThinkRule, all_boxed, clean_answer, final_answer_found, split_thinking

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


#: a mixed number: ``5\\frac{3}{4}``, ``1\\tfrac{1}{3}`` (LaTeX) or ``4 1/4`` (prose)
_MIXED_TEX_RE = re.compile(r"(?<![\d.])(\d+)\s*\\[dt]?frac\s*\{\s*(\d+)\s*\}\s*\{\s*(\d+)\s*\}")
_MIXED_PROSE_RE = re.compile(r"(?<![\d.,/])(\d+)[ \u00a0]+(\d+)/(\d+)(?![\d/]|\.\d)")
#: thousands separated by a space: after a currency sign ("$12 480"), or two groups or more ("1 234 567")
_SPACE_THOUSANDS_RE = re.compile(
    r"(?<=[$€£])(\d{1,3}(?:[ \u00a0\u202f\u2009]\d{3})+)(?![\d]|[.,]\d)"
    r"|(?<![\d.,])(\d{1,3}(?:[ \u00a0\u202f\u2009]\d{3}){2,})(?![\d]|[.,]\d)"
)
#: a repeating decimal: ``0.\\overline{6}``, ``0.1\\overline{6}``, ``0.666\\ldots``, ``0.666...``
_REPEAT_TEX_RE = re.compile(r"(\d*)\.(\d*)\\overline\s*\{(\d+)\}")
_REPEAT_DOTS_RE = re.compile(r"(\d*)\.(\d+)(?:\\[lc]?dots|\.{3}|…)")
#: a sign in words: "minus 40", "negative 3" (not "7 minus 3", an expression)
_SIGN_WORD_RE = re.compile(r"\b(?:minus|negative)\s+(?=\d)", re.I)
#: a trailing qualifier that is no part of the value: ``\\pmod{1000}``, ``\\bmod 7``, ``(mod 1000)``
_QUALIFIER_RE = re.compile(
    r"\\pmod\s*\{[^{}]*\}|\\pmod\s*\d+|\\(?:bmod|mod)\s*\{?\s*\d+\s*\}?"
    r"|\(\s*(?:\\text\s*\{\s*)?(?:\\)?mod\s*\}?\s*\d+\s*\)|\\text\s*\{\s*\(?\s*mod\s+\d+\s*\)?\s*\}",
    re.I,
)


def _frac_text(f: Fraction) -> str:
    return str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"


def _mixed(m: re.Match) -> str:
    whole, a, b = int(m.group(1)), int(m.group(2)), int(m.group(3))
    if b == 0 or a >= b:  # "2 3/2" is no mixed number
        return m.group(0)
    return _frac_text(whole + Fraction(a, b))


def _repeating_value(whole: str, fixed: str, period: str) -> Fraction:
    """``whole.fixed(period)(period)...`` exactly."""
    v = Fraction(int(whole or 0)) + (Fraction(int(fixed), 10 ** len(fixed)) if fixed else 0)
    return v + Fraction(int(period), (10 ** len(period) - 1) * 10 ** len(fixed))


def _repeat_dots(m: re.Match) -> str:
    """``0.1666...``: the shortest period (1-3 digits) the digits end with twice; without one,
    the digits as written."""
    whole, digits = m.group(1), m.group(2)
    for p in (1, 2, 3):
        per = digits[-p:]
        if len(digits) >= 2 * p and digits.endswith(per * 2):
            fixed = digits
            while fixed.endswith(per):
                fixed = fixed[: -p]
            return _frac_text(_repeating_value(whole, fixed, per))
    return f"{whole or 0}.{digits}"


def _value_text(s: str) -> str:
    """Numbers written in ways a number search cannot read, rewritten: mixed numbers, repeating
    decimals, ``\\frac{1}{2}`` -> ``1/2``, space-separated thousands, trailing ``\\pmod``
    qualifiers dropped."""
    s = _QUALIFIER_RE.sub(" ", s or "")
    s = _REPEAT_TEX_RE.sub(lambda m: _frac_text(_repeating_value(m.group(1), m.group(2), m.group(3))), s)
    s = _REPEAT_DOTS_RE.sub(_repeat_dots, s)
    s = _MIXED_TEX_RE.sub(_mixed, s)
    s = _FRAC_RE.sub(r"\1/\2", s)
    s = _MIXED_PROSE_RE.sub(_mixed, s)
    return _SPACE_THOUSANDS_RE.sub(lambda m: re.sub(r"\s", "", m.group(0)), s)


def _signs_in_words(s: str) -> str:
    """"minus 40" -> "-40", unless a number or a closing bracket comes before (an expression)."""
    return _SIGN_WORD_RE.sub(lambda m: m.group(0) if re.search(r"[\d)]\s*$", s[: m.start()]) else "-", s)


def _num_text(s: str, lone_one: bool = True) -> str:
    """Text prepared for number search: ``\\frac{1}{2}`` -> ``1/2``, mixed numbers and repeating
    decimals as fractions, number words as digits, signs in words, ``{,}`` / ``\\,`` / thousands
    separators removed."""
    s = _value_text(s)
    s = re.sub(r"(?<=\d)(?:\{,\}|\\,)(?=\d{3}(?!\d))", ",", s)
    return _strip_thousands(_signs_in_words(_words_to_digits(s, lone_one)))


def _as_fraction(s: str) -> Fraction | None:
    """A plain number (``-18``, ``18.00``, ``033``, ``3/4``, ``1,000``, ``25%``), else None."""
    if s is None:
        return None
    t = _value_text(clean_answer(str(s)))
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
    parts = re.split(r"=|\\approx|\\equiv|≈|≡", t)
    if len(parts) > 1:  # an equation or approximation: its right-hand side
        return _number_in(parts[-1]) if parts[-1].strip() else None
    t = re.sub(r"\([^()]*\)", " ", t)  # "(6 per box × 3 boxes)": the working, not the answer
    if "\\" in t or _EXPR_RE.search(t):
        return None  # an expression: leave it to math-verify
    nums = list(_NUM_RE.finditer(t))
    if len(nums) > 1:
        nums = [m for m in nums if not _PREP_BEFORE_RE.search(t[max(0, m.start() - 40) : m.start()])] or nums
    return _as_fraction(nums[-1].group()) if nums else None


#: in the unboxed fallback, a number after one of these is a circumstance ("on the 12 notebooks",
#: "out of 20", "divided by 4", "for 3 days"), not the quantity found
_FALLBACK_PREP_RE = re.compile(
    r"\b(?:after|in|for|per|within|out\s+of|divided\s+by|from|on|during|every|than|among|between|each\s+of)"
    r"\s+(?:(?:the|a|an|all|each|his|her|their|its|these|those)\s+)?\$?$",
    re.I,
)
_SENTENCE_END_RE = re.compile(r"(?<=[.!?])\s+|\n+")


def _values(text: str) -> set[Fraction]:
    out = set()
    for n in _NUM_RE.findall(_num_text(text or "", lone_one=False)):
        f = _as_fraction(n)
        if f is not None:
            out.add(f)
    return out


def last_number(text: str, question: str | None = None) -> str | None:
    """The number an unboxed answer ends on: in the last sentence that has a number (fractions
    such as ``1/2``, mixed numbers and number words count, except a lone "one", which running text
    mostly uses as a pronoun or an aside), leaving out the numbers inside parentheses (a
    breakdown), after a circumstance ("on the 12 notebooks", "out of 20", "divided by 4") and
    those restated from ``question`` — unless that leaves none — the last one."""
    t = _num_text(text or "", lone_one=False)
    asked = _values(question) if question else set()
    for sentence in reversed(_SENTENCE_END_RE.split(re.sub(r"\([^()]*\)", " ", t))):
        found = list(_NUM_RE.finditer(sentence))
        if not found:
            continue
        keep = [m for m in found if not _FALLBACK_PREP_RE.search(sentence[max(0, m.start() - 40) : m.start()])]
        if asked:
            keep = [m for m in keep if _as_fraction(m.group()) not in asked] or keep
        return (keep or found)[-1].group()
    nums = _NUM_RE.findall(t)  # numbers inside parentheses only
    return nums[-1] if nums else None


#: a hedge between values: "3 or 4", "either 12 or 15"
_OR_RE = re.compile(r"\s+or\s+|\s*\\(?:text|mbox)\s*\{\s*or\s*\}\s*", re.I)


def is_hedge(s: str | None) -> bool:
    """Does a final answer string offer several different numbers ("3 or 4", ``\\boxed{12 \\text{ or } 15}``)?
    Two ways of writing one value ("30 minutes or 0.5 hours" is not caught: the numbers differ
    only with units, so such an answer is a hedge too) are not told apart."""
    if not s:
        return False
    parts = [p for p in _OR_RE.split(re.sub(r"^\s*either\s+", "", clean_answer(s), flags=re.I)) if p.strip()]
    if len(parts) < 2:
        return False
    vals = [_number_in(p) for p in parts]
    return all(v is not None for v in vals) and len(set(vals)) > 1


def find_math_answer(answer_text: str, question: str | None = None) -> Found:
    """The final answer of a math response and how it was found: the last box, else the last
    answer phrase, else the unboxed fallback (:func:`last_number`). A hedge between numbers is
    wrong; boxes with different values are ambiguous (the last one is scored)."""
    f = final_answer_found(answer_text)
    if f is not None:
        amb = False
        if f.rule == "boxed":
            vals = {_number_in(b) for b in all_boxed(answer_text) if b.strip()}
            amb = len(vals - {None}) > 1
        return Found(f.value, f.rule, ambiguous=amb, hedge=is_hedge(f.value))
    n = last_number(answer_text, question)
    return Found(n, "fallback") if n is not None else Found(None, "none")


def extract_math_answer(answer_text: str, question: str | None = None) -> str | None:
    """Final answer string of a math response (boxed > answer phrase > last number)."""
    return find_math_answer(answer_text, question).value


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


def verdict(correct: bool, found: Found | None, truncated: bool = False) -> dict:
    """A scorer's verdict: ``correct``, ``truncated``, ``pred`` (the extracted answer), ``rule``
    (how it was found: boxed, phrase, option_text, fallback, none) and ``ambiguous`` (several
    candidate answers, or a hedge; a hedge is never correct)."""
    if truncated or found is None:
        return {"correct": False, "truncated": bool(truncated), "pred": None, "rule": "none", "ambiguous": False}
    return {"correct": bool(correct) and not found.hedge, "truncated": False, "pred": found.value,
            "rule": found.rule, "ambiguous": found.ambiguous or found.hedge}


def score_math(response: str, gold: str | int | None, rule: ThinkRule | None = None,
               question: str | None = None) -> dict:
    """Verdict for one math response (:func:`verdict`). ``gold=None`` (or "None") means the
    question is unanswerable (GSM-Plus critical thinking): right only if the final answer says
    so. ``question`` (the item's text) lets the unboxed fallback pass over restated numbers. A
    hedge ("3 or 4") is wrong."""
    text, truncated = split_thinking(response, rule)
    if truncated:
        return verdict(False, None, truncated=True)
    if _is_none_gold(gold):
        f = final_answer_found(text)
        if f is not None:
            return verdict(is_abstention(f.value), f)
        # no explicit final answer: an abstention in the closing lines counts
        tail = "\n".join([ln for ln in text.splitlines() if ln.strip()][-3:])
        if _ABSTAIN_RE.search(_MD_RE.sub("", tail)):
            return verdict(True, Found("None", "fallback"))
        n = last_number(text, question)
        return verdict(False, Found(n, "fallback") if n is not None else Found(None, "none"))
    f = find_math_answer(text, question)
    return verdict(math_equal(f.value, gold), f)

