"""BBH: each subtask's answer kind (:data:`BBH_KINDS`) and its verdict: option letters, labels
(True/False, yes/no, valid/invalid), numbers, sorted word lists and Dyck bracket sequences."""

from __future__ import annotations

import re

from .choice import LETTERS, _norm_text, extract_choice
from .numeric import last_number, math_equal
from .text import _MD_RE, ThinkRule, answer_phrase, clean_answer, final_answer_string, last_boxed, split_thinking

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


def score_bbh(response: str, doc: dict, kind: str, rule: ThinkRule | None = None) -> dict:
    """Verdict for one BBH response; ``kind`` is one of the values of :data:`BBH_KINDS`."""
    text, truncated = split_thinking(response, rule)
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

