"""The text every answer kind shares: the think block (:func:`split_thinking`, under a
:class:`ThinkRule`) and the final answer string (the last box, else the last answer phrase)."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ThinkRule:
    """How a response's thinking is told from its answer: the tags, and whether a response must
    close a think block that the prompt opened (DeepSeek-R1-style chat templates). Built once per
    scoring call by :func:`~.process.think_rule`."""

    start: str = "<think>"
    end: str = "</think>"
    require_end: bool = False


#: how an answer was found, in the order the scorers try them (``option_text``: the answer named an
#: option by its text; ``fallback``: the answer kind's own search of the answer text)
RULES = ("boxed", "phrase", "option_text", "fallback", "none")


@dataclass(frozen=True)
class Found:
    """An extracted answer: its ``value`` (None: no answer), the ``rule`` that found it (one of
    :data:`RULES`), whether it was ``ambiguous`` (several different candidate answers, e.g. boxes
    with different values: the last is scored) and whether it is a ``hedge`` (the final answer
    offers several: "C or E", ``\\boxed{A, C}``, "3 or 4"), which is scored wrong."""

    value: str | None
    rule: str
    ambiguous: bool = False
    hedge: bool = False


def _rule(rule: ThinkRule | None) -> ThinkRule:
    """``rule``, or this process's (:func:`~.process.think_rule`) when None."""
    if rule is not None:
        return rule
    from .process import think_rule

    return think_rule()


def split_thinking(response: str, rule: ThinkRule | None = None) -> tuple[str, bool]:
    """Return ``(answer_text, truncated)``.

    ``answer_text`` is the text after the last think-end token (the whole response when there is
    none). ``truncated`` is True when a thinking block was opened and never closed: a start tag
    with no end tag after it, or -- when the prompt itself opened the block (``rule.require_end``:
    the chat template detected by :func:`~.process.auto_require_think_end`, or
    ``TELLTALE_REQUIRE_THINK_END=1``) -- no end tag at all.
    A truncated response has no answer text.
    """
    if response is None:
        return "", False
    text = str(response)
    rule = _rule(rule)
    start, end = rule.start, rule.end
    if end and end in text:
        after = text.rsplit(end, 1)[1]
        if start and start in after:  # a new thinking block opened after the last close
            return "", True
        return after.strip(), False
    if (start and start in text) or rule.require_end:
        return "", True
    return text.strip(), False



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


def final_answer_found(answer_text: str, lists: bool = False) -> Found | None:
    """Step 2 of the rules: the last boxed content (rule ``boxed``), else the last answer phrase
    (rule ``phrase``), cleaned; None when there is neither."""
    b = last_boxed(answer_text)
    if b is not None:
        return Found(clean_answer(b), "boxed")
    p = answer_phrase(answer_text, lists)
    if p is not None:
        return Found(clean_answer(p), "phrase")
    return None


def final_answer_string(answer_text: str, lists: bool = False) -> str | None:
    """The value of :func:`final_answer_found`."""
    f = final_answer_found(answer_text, lists)
    return None if f is None else f.value

