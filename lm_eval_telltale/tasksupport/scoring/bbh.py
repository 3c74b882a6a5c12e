"""BBH: each subtask's answer kind (:data:`BBH_KINDS`) and its verdict: option letters, labels
(True/False, yes/no, valid/invalid), numbers, sorted word lists and Dyck bracket sequences."""

from __future__ import annotations

import re

from .choice import LETTERS, _norm_text, find_choice
from .numeric import find_math_answer, math_equal, verdict
from .text import _MD_RE, Found, ThinkRule, answer_phrase, clean_answer, final_answer_found, last_boxed, split_thinking

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


def find_label(answer_text: str, kind: str) -> Found:
    """True/False, yes/no or valid/invalid and how it was found: boxed > answer phrase (the first
    label in them; both labels joined by "or" is a hedge) > the last label word of the answer text."""
    if not answer_text:
        return Found(None, "none")
    for rule, cand in (("boxed", last_boxed(answer_text)), ("phrase", answer_phrase(answer_text))):
        if cand is not None:
            c = clean_answer(cand)
            hits = _label_hits(c, kind)
            if hits:
                hedge = len({lab for _, lab in hits}) > 1 and bool(re.search(r"\bor\b", c, re.I))
                return Found(hits[0][1], rule, ambiguous=hedge, hedge=hedge)
    hits = _label_hits(_MD_RE.sub("", answer_text), kind)
    return Found(hits[-1][1], "fallback") if hits else Found(None, "none")


def extract_label(answer_text: str, kind: str) -> str | None:
    """The label of :func:`find_label` (None for a hedge)."""
    f = find_label(answer_text, kind)
    return None if f.hedge else f.value


_BBH_OPTION_RE = re.compile(r"^\(([A-Z])\)\s*(.*)$", re.M)


def bbh_options(input_text: str) -> tuple[str, list[str]]:
    """(letters, option texts) listed as ``(A) ...`` lines in a BBH input."""
    found = _BBH_OPTION_RE.findall(input_text or "")
    return "".join(letter for letter, _ in found), [t.strip() for _, t in found]


def _word_tokens(s: str) -> list[str]:
    """The words of a written list: one per line, comma-separated ("a, b, and c"), numbered
    ("1. apple 2. banana", also on one line), bulleted, or a LaTeX ``array``/``tabular``."""
    s = re.sub(r"\\begin\s*\{[^{}]*\}(?:\s*\{[^{}]*\})?|\\end\s*\{[^{}]*\}|\\hline", " ", s or "")
    s = s.replace("\\\\", "\n").replace("&", " ")
    s = re.sub(r"^\s*(?:\d+[.)]|[-*•])\s+", " ", s, flags=re.M)  # list markers
    s = re.sub(r"(?<!\S)\d+[.)](?=\s)", " ", s)  # numbered items on one line
    s = re.sub(r",\s*and\s+", ", ", s, flags=re.I)  # "a, b, and c"
    s = clean_answer(s)
    return re.findall(r"[a-z0-9][a-z0-9'.\-]*", s.lower().replace(",", " "))


def _same_words(words: list[str], gold: list[str]) -> bool:
    """A word list equals the gold, also when "and" joined its last two words ("a, b and c")."""
    return words == gold or ("and" not in gold and [w for w in words if w != "and"] == gold)


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


#: a bracket of an answer sequence: any, but an opening "(" that starts a parenthetical remark
_BRACKET_TOKEN = r"(?:\((?!\s*[A-Za-z])|[)\[\]{}<>])"
_BRACKET_RUN_RE = re.compile(rf"{_BRACKET_TOKEN}(?:[\s,]*{_BRACKET_TOKEN})*")


def _bracket_run(s: str) -> str:
    """The first run of brackets in an answer string (spaces and commas between them allowed):
    ``) ] }`` of "Answer: ) ] } — this closes the ( and [", not the brackets of the explanation."""
    s = (s or "").replace("\\rangle", ">").replace("\\langle", "<").replace("\\{", "{").replace("\\}", "}")
    s = re.sub(r"\\(?:left|right|big|Big)\b", "", s)
    m = _BRACKET_RUN_RE.search(s)
    return _brackets(m.group(0)) if m else ""


def _dyck_prefix(input_text: str) -> str:
    m = re.search(r"Input:\s*(.*)$", input_text or "", re.S)
    return _brackets(m.group(1)) if m else ""


def score_bbh(response: str, doc: dict, kind: str, rule: ThinkRule | None = None) -> dict:
    """Verdict for one BBH response (:func:`~.numeric.verdict`); ``kind`` is one of the values
    of :data:`BBH_KINDS`."""
    text, truncated = split_thinking(response, rule)
    if truncated:
        return verdict(False, None, truncated=True)
    target = str(doc["target"]).strip()
    if kind == "mc":
        valid, options = bbh_options(doc.get("input", ""))
        m = re.fullmatch(r"\(([A-Z])\)", target)
        if m:
            valid = valid or LETTERS[: LETTERS.index(m.group(1)) + 1]
            f = find_choice(text, valid, options)
            return verdict(f.value == m.group(1), f)
        # a few items have the option text as target ("Monsters, Inc")
        f = final_answer_found(text, lists=True) or Found(None, "none")
        return verdict(f.value is not None and _norm_text(f.value) == _norm_text(target), f)
    if kind in _LABELS:
        f = find_label(text, kind)
        gold = _label_hits(target, kind)
        return verdict(f.value is not None and bool(gold) and f.value == gold[0][1], f)
    if kind == "number":
        f = find_math_answer(text)
        return verdict(math_equal(f.value, target), f)
    if kind == "words":
        gold = _word_tokens(target)
        f = final_answer_found(text, lists=True)
        if f is not None:
            return verdict(_same_words(_word_tokens(f.value), gold), f)
        listed = _listed_words(text)
        if listed is not None:  # "Sorted list: ..."
            return verdict(_same_words(listed, gold), Found(" ".join(listed), "fallback"))
        toks = _word_tokens(text)  # the answer text ends with the sorted list
        if not toks:
            return verdict(False, Found(None, "none"))
        tail = toks[-len(gold):] if gold else []
        return verdict(bool(gold) and tail == gold, Found(" ".join(tail), "fallback"))
    if kind == "dyck":
        gold = _brackets(target)
        prefix = _dyck_prefix(doc.get("input", ""))
        # raw strings (clean_answer would take "\\]" for a math delimiter); a bare "}" inside
        # \boxed{...} unbalances it, so the box runs to the last "}" of its line
        f = None
        starts = list(re.finditer(r"\\(?:boxed|fbox)\s*\{", text))
        if starts:
            line = text[starts[-1].end() :].split("\n", 1)[0]
            f = Found(line[: line.rfind("}")] if "}" in line else line, "boxed")
        if f is None and (p := answer_phrase(text, lists=True)) is not None:
            f = Found(p, "phrase")
        if f is None:
            lines = [ln for ln in text.splitlines() if _bracket_run(ln)]
            f = Found(lines[-1], "fallback") if lines else Found(None, "none")
        b = _bracket_run(f.value or "")
        return verdict(bool(gold) and (b == gold or (bool(prefix) and b == prefix + gold)), f)
    raise ValueError(f"unknown BBH answer kind {kind!r}")
