"""lm-eval's entry points (``process_results``) of the packaged tasks, and the answer keys that
LRS's ``maj`` selector votes with. Each entry point reads this process's think rule once
(:func:`~.process.think_rule`) and hands it to the pure scorers.

Every entry point returns ``exact_match`` and ``truncated`` (means over the responses of the
item) and ``extraction``: per response, how its answer was found (``rule``: boxed, phrase,
option_text, fallback, none), whether it was ``ambiguous`` and the ``answer`` read. lm-eval logs
it with each sample (``--log_samples``); its aggregate (:func:`extraction_share`, the YAMLs'
``aggregation``) is the share of responses whose answer was found unambiguously, so
``exact_match`` and ``truncated`` aggregate exactly as before."""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable

from .bbh import score_bbh
from .choice import LETTERS, score_choice
from .numeric import _number_in, is_abstention, math_gold, score_math
from .process import think_rule
from .text import clean_answer


def responses(results: Iterable[Any]) -> list[str]:
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
        "extraction": [{"rule": v["rule"], "ambiguous": v["ambiguous"], "answer": v["pred"]} for v in verdicts],
    }


def extraction_share(items: list) -> float:
    """lm-eval's aggregation of ``extraction``: the share of responses (over every item's list)
    whose answer was found (any rule but ``none``) and was not ambiguous."""
    recs = [r for it in items for r in (it if isinstance(it, list) else [it]) if isinstance(r, dict)]
    if not recs:
        return float("nan")
    return sum(r.get("rule") != "none" and not r.get("ambiguous") for r in recs) / len(recs)


def question_of(doc: dict) -> str | None:
    """The item's text, where a math doc has one (GSM8K, GSM-Plus: ``question``; AIME:
    ``Problem``): the unboxed fallback passes over numbers restated from it."""
    for k in ("question", "Question", "problem", "Problem"):
        if isinstance(doc.get(k), str):
            return doc[k]
    return None


def process_results_math(doc: dict, results: list) -> dict:
    """Math word problems with one numeric gold: GSM8K-schema docs (``answer`` ending in
    ``#### N``), GSM-Plus (``answer``, "None" = unanswerable) and AIME (``Answer``)."""
    gold, rule, q = math_gold(doc), think_rule(), question_of(doc)
    return _mean([score_math(r, gold, rule, q) for r in responses(results)])


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
    gold, rule, q = math_gold(doc), think_rule(), question_of(doc)
    verdicts = [score_math(r, gold, rule, q) for r in responses(results)]
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
    n, rule = len(options) or 10, think_rule()
    return _mean([score_choice(r, gold, n, options, rule) for r in responses(results)])


def _bbh(kind: str):
    def process_results(doc: dict, results: list) -> dict:
        rule = think_rule()
        return _mean([score_bbh(r, doc, kind, rule) for r in responses(results)])

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


process_results_math.telltale_extract = _extractor(lambda d, r: score_math(r, math_gold(d), question=question_of(d)))
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
