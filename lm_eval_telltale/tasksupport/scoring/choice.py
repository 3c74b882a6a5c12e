"""Multiple-choice answers: the option letter a response names (box, answer phrase, option cue,
option text, the number an option's text is) and the verdict."""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Sequence

from .numeric import _as_fraction, _num_text, _number_in
from .text import _MD_RE, ThinkRule, answer_phrase, clean_answer, last_boxed, split_thinking

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


def score_choice(response: str, gold_letter: str, n_options: int, options: Sequence[str] | None = None,
                 rule: ThinkRule | None = None) -> dict:
    text, truncated = split_thinking(response, rule)
    if truncated:
        return {"correct": False, "truncated": True, "pred": None}
    valid = LETTERS[: max(1, min(n_options, len(LETTERS)))]
    pred = extract_choice(text, valid, options)
    return {"correct": pred is not None and pred == str(gold_letter).strip().upper(), "truncated": False, "pred": pred}

