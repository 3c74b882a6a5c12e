"""Multiple-choice answers: the option letter a response names (box, answer phrase, option cue,
option text, the number an option's text is) and the verdict."""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Sequence

from .numeric import _as_fraction, _num_text, _number_in, verdict
from .text import _MD_RE, Found, ThinkRule, answer_phrase, clean_answer, last_boxed, split_thinking

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


#: LaTeX symbols an option's plain text writes as characters
_TEX_SYMBOLS = {"times": "×", "cdot": "·", "div": "÷", "pm": "±", "circ": "°", "degree": "°", "le": "≤", "leq": "≤",
                "ge": "≥", "geq": "≥", "ne": "≠", "neq": "≠", "approx": "≈", "pi": "π", "mu": "μ", "alpha": "α",
                "beta": "β", "gamma": "γ", "Omega": "Ω", "infty": "∞", "to": "→", "rightarrow": "→"}


def _norm_text(s: str) -> str:
    """An option's text (or an answer naming one) reduced for comparison: LaTeX symbols as the
    characters they stand for (``\\times`` is ``×``), other LaTeX commands, braces and
    punctuation dropped, "x" between numbers read as ``×``, lower case."""
    s = re.sub(r"\\([A-Za-z]+)(?![A-Za-z])", lambda m: _TEX_SYMBOLS.get(m.group(1), m.group(0)), s)
    s = clean_answer(s)
    s = re.sub(r"\\[A-Za-z]+", " ", s)
    s = re.sub(r"(?<=\d)\s*[x×*]\s*(?=\d)", " × ", s).lower()
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


def _hedge_letters(t: str, valid: str) -> list[str]:
    """The option letters of an answer string that is nothing but a list of them: "C or E",
    "A, C", "(B) and (D)", "either B or D", ``D \\text{ or } G``; [] for anything else."""
    cls = "[" + re.escape(valid) + "]"
    item = rf"[\(\[]?({cls})[\)\]]?"
    sep = r"\s*(?:,|/|&|;|\bor\b|\band\b|,\s*(?:or|and)\b)\s*"
    s = re.sub(r"^(?:either|both|options?|choices?)\s+", "", t.strip(), flags=re.I)
    s = re.sub(r"\b(?:options?|choices?)\s+", "", s, flags=re.I).rstrip(" .")
    if not re.fullmatch(rf"{item}(?:{sep}{item})+", s):
        return []
    return list(dict.fromkeys(re.findall(rf"(?<![A-Za-z])({cls})(?![A-Za-z])", s)))


def _letter_of(s: str, valid: str, options: Sequence[str] | None = None) -> Found | None:
    """Option letter named by a short answer string: ``C``, ``(C)``, ``C.``, ``C) 42``,
    ``Option C``, ``\\text{(C)}``; else the option whose text the string equals (rule
    ``option_text``); else an option cue inside it (``therefore option C``); else the one option
    whose text is the number the string names (``\\boxed{3}`` for an option ``three``, rule
    ``option_text``). A list of several letters ("C or E") is a hedge. The rule is left to the
    caller (``""``) where the string named the letter itself."""
    t = clean_answer(s)
    t = re.sub(r"^(?:option|choice|answer)\s*:?\s*", "", t, flags=re.I).strip()
    hedge = _hedge_letters(t, valid)
    if len(hedge) > 1:
        return Found(t, "", ambiguous=True, hedge=True)
    m = re.match(r"^[\(\[]?([A-Za-z])[\)\]]?(?=$|[\s.:,)\]])", t)
    if m:
        letter = m.group(1)
        if letter.upper() in valid and (letter.isupper() or len(t) <= 3):
            return Found(letter.upper(), "")
    if options:
        hit = _option_by_text(t, valid, options)
        if hit is not None:
            return Found(valid[hit], "option_text")
    cues = _option_cues(t, valid)
    if cues:
        return Found(cues[0].group(1) or cues[0].group(2), "")
    if options:
        n = _number_in(t)
        if n is not None:
            hits = [i for i, o in enumerate(options) if i < len(valid) and _option_number(o) == n]
            if len(hits) == 1:
                return Found(valid[hits[0]], "option_text")
    return None


def _option_by_text(t: str, valid: str, options: Sequence[str]) -> int | None:
    """The option whose text the answer string is (:func:`_norm_text`); else the one option that
    is the string followed by a unit of one or two words (``4.5 × 10^-2`` for ``4.5 × 10^-2 s``)."""
    nt = _norm_text(t)
    if not nt:
        return None
    texts = [_norm_text(str(o)) for o in options[: len(valid)]]
    if nt in texts:
        return texts.index(nt)
    if re.search(r"\d", nt):
        unit = [i for i, o in enumerate(texts)
                if o.startswith(nt + " ") and re.fullmatch(r"[^\W\d]+(?: [^\W\d]+)?", o[len(nt) + 1:])]
        if len(unit) == 1:
            return unit[0]
    return None


def _verdict_re(valid: str) -> re.Pattern:
    """A sentence that names the chosen option: "G is correct", "(B) is the best answer",
    "Statement B is the sarcastic one", "A is the most plausible" (not "B is wrong", "B is not
    correct", "C is the least likely")."""
    cls = "[" + re.escape(valid) + "]"
    return re.compile(
        rf"(?<![\w'\\])[\(\[]?({cls})[\)\]]?\s+(?i:is|must\s+be|should\s+be|would\s+be|(?:seems|appears)\s+to\s+be)\s+"
        r"(?:(?i:the|a|an)\s+)?(?!(?i:not|wrong|false|incorrect|least|worst|less|only\s+wrong)\b)"
        r"(?i:correct|right|best|true|answer|(?:more|most)\s+\w+|\w+\s+one|one)\b"
    )


def find_choice(answer_text: str, valid: str, options: Sequence[str] | None = None) -> Found:
    """Letter answer and how it was found: boxed > answer phrase > the fallback (the last
    sentence naming the chosen option, "G is correct"; else the last option cue, ``(C)``,
    ``Option C`` or a line that is just a letter; else the last standalone option letter). A hedge
    in the box or phrase ("C or E") is the answer, and wrong; the fallback does not look past it."""
    if not answer_text:
        return Found(None, "none")
    for rule, s in (("boxed", last_boxed(answer_text)), ("phrase", answer_phrase(answer_text))):
        if s is not None:
            f = _letter_of(s, valid, options)
            if f:
                return Found(f.value, f.rule or rule, f.ambiguous, f.hedge)
    plain = _MD_RE.sub("", answer_text)
    last = next((ln for ln in reversed(plain.splitlines()) if ln.strip()), "")
    if len(_hedge_letters(clean_answer(last), valid)) > 1:  # the response ends on "either B or D"
        return Found(clean_answer(last), "fallback", ambiguous=True, hedge=True)
    verdicts = [m.group(1) for m in _verdict_re(valid).finditer(plain)]
    if verdicts:
        return Found(verdicts[-1], "fallback", ambiguous=len(set(verdicts)) > 1)
    letter = _fallback_letter(plain, valid)
    return Found(letter, "fallback") if letter else Found(None, "none")


def extract_choice(answer_text: str, valid: str, options: Sequence[str] | None = None) -> str | None:
    """The letter of :func:`find_choice` (None for a hedge)."""
    f = find_choice(answer_text, valid, options)
    return None if f.hedge else f.value


def _fallback_letter(plain: str, valid: str) -> str | None:
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


def score_choice(response: str, gold_letter: str, n_options: int, options: Sequence[str] | None = None,
                 rule: ThinkRule | None = None) -> dict:
    text, truncated = split_thinking(response, rule)
    if truncated:
        return verdict(False, None, truncated=True)
    valid = LETTERS[: max(1, min(n_options, len(LETTERS)))]
    f = find_choice(text, valid, options)
    return verdict(f.value is not None and f.value == str(gold_letter).strip().upper(), f)

