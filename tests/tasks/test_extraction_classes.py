"""The extraction gap classes of issue #34, one table per class (positives and negatives of our
own), and the record of how each answer was found (rule, ambiguity) that every scorer returns."""

from __future__ import annotations

import pytest

from lm_eval_telltale.tasksupport import scoring as S

T = "<think>work</think>"
PLAIN = S.ThinkRule()  # no process state: the tables are pure


def math(response: str, gold, question: str | None = None) -> dict:
    return S.score_math(T + response, gold, PLAIN, question)


# -- 1. the unboxed fallback -------------------------------------------------------------------------

@pytest.mark.parametrize("response, gold, question, ok", [
    ("He spends $84 in all on the 12 notebooks.", "84", None, True),
    ("He spends $84 in all on the 12 notebooks.", "12", None, False),
    ("So the total is 18 (6 per box × 3 boxes).", "18", None, True),
    ("She gets 7 right out of 10.", "7", None, True),
    ("Each friend gets 6 cookies when they are divided by 4.", "6", None, True),
    ("Janet started with 16 eggs and now has 9.", "9", "Janet has 16 eggs. How many are left?", True),
    ("Janet started with 16 eggs and now has 9.", "16", "Janet has 16 eggs. How many are left?", False),
    ("She has 16 eggs.", "16", "Janet has 16 eggs. How many?", True),  # only restated numbers: the last
    ("He needs 20 - 2 = 18 more.", "18", None, True),
])
def test_unboxed_fallback_takes_the_found_quantity(response, gold, question, ok):
    v = math(response, gold, question)
    assert v["correct"] is ok and v["rule"] == "fallback"


# -- 2. mixed numbers ------------------------------------------------------------------------------

@pytest.mark.parametrize("response, gold, ok", [
    ("\\boxed{5\\frac{3}{4}}", "5.75", True),
    ("\\boxed{1\\tfrac{1}{3}}", "4/3", True),
    ("The answer is $2\\dfrac{1}{2}$ cups.", "2.5", True),
    ("She walks 4 1/4 miles.", "4.25", True),
    ("\\boxed{5\\frac{3}{4}}", "53/4", False),  # not the digits run together
    ("\\boxed{5\\frac{3}{4}}", "0.75", False),  # nor the fraction alone
    ("She walks 4 1/4 miles.", "0.25", False),
])
def test_mixed_numbers(response, gold, ok):
    assert math(response, gold)["correct"] is ok


# -- 3. thousands separated by a space -------------------------------------------------------------

@pytest.mark.parametrize("response, gold, ok", [
    ("The car costs $12 480 in total.", "12480", True),
    ("The car costs $12 480 in total.", "480", False),
    ("The population is 1 234 567 people.", "1234567", True),
    ("The answer is $12 480.", "12480", True),
    ("\\boxed{12\\,480}", "12480", True),
    ("He made €3 500 this month.", "3500", True),
    ("She bought 3 480-page books.", "3480", False),  # one group, no currency: two numbers
])
def test_thousands_separated_by_a_space(response, gold, ok):
    assert math(response, gold)["correct"] is ok


# -- 4. repeating decimals -------------------------------------------------------------------------

@pytest.mark.parametrize("response, gold, ok", [
    ("\\boxed{0.\\overline{6}}", "0.67", True),
    ("\\boxed{0.\\overline{6}}", "2/3", True),
    ("\\boxed{0.1\\overline{6}}", "1/6", True),
    ("\\boxed{0.666\\ldots}", "0.67", True),
    ("The answer is 0.333... of the cake.", "0.33", True),
    ("\\boxed{1.\\overline{3}}", "1.33", True),
    ("\\boxed{0.\\overline{6}}", "0.6", False),
    ("\\boxed{0.666\\ldots}", "0.66", False),
])
def test_repeating_decimals(response, gold, ok):
    assert math(response, gold)["correct"] is ok


# -- 5. signs in words, qualifiers in a box ----------------------------------------------------------

@pytest.mark.parametrize("response, gold, ok", [
    ("The temperature is minus 40 degrees.", "-40", True),
    ("The temperature is minus 40 degrees.", "40", False),
    ("The final balance is negative 15 dollars.", "-15", True),
    ("It fell from 7, and 7 minus 3 is 4.", "4", True),  # an expression, no sign
    ("\\boxed{42 \\pmod{1000}}", "42", True),
    ("\\boxed{n \\equiv 17 \\pmod{1000}}", "17", True),
    ("\\boxed{42 \\pmod{1000}}", "1000", False),
    ("\\boxed{301 \\ (\\text{mod } 1000)}", "301", True),
])
def test_signs_in_words_and_box_qualifiers(response, gold, ok):
    assert math(response, gold)["correct"] is ok


# -- 6. hedged answers get no credit ----------------------------------------------------------------

OPTS = ["3 m", "4 m", "5 m", "6 m", "7 m", "8 m", "9 m", "10 m", "11 m", "12 m"]


@pytest.mark.parametrize("response, gold", [
    ("The answer is C or E.", "C"),
    ("\\boxed{A, C}", "A"),
    ("\\boxed{D \\text{ or } G}", "D"),
    ("The answer is (B) or (D).", "B"),
    ("\\boxed{B/D}", "B"),
    ("Answer: either A or F", "A"),
    ("Both are possible.\nEither B or D", "B"),
])
def test_hedged_choice_is_wrong_and_ambiguous(response, gold):
    v = S.score_choice(T + response, gold, 10, OPTS, PLAIN)
    assert v["correct"] is False and v["ambiguous"] is True


@pytest.mark.parametrize("response, gold", [
    ("The answer is C.", "C"), ("\\boxed{C}", "C"), ("The answer is (C), not (E).", "C"),
    ("\\boxed{\\text{(D)}}", "D"),
])
def test_a_single_choice_is_no_hedge(response, gold):
    v = S.score_choice(T + response, gold, 10, OPTS, PLAIN)
    assert v["correct"] is True and v["ambiguous"] is False


@pytest.mark.parametrize("response, gold, ok", [
    ("\\boxed{3 \\text{ or } 4}", "3", False),
    ("The answer is 12 or 15.", "15", False),
    ("\\boxed{18}", "18", True),
    ("The answer is 18 or eighteen.", "18", True),  # one value, written twice
])
def test_a_math_hedge_is_wrong(response, gold, ok):
    v = math(response, gold)
    assert v["correct"] is ok and v["ambiguous"] is (not ok)


def test_label_hedge_is_wrong():
    doc = {"target": "valid", "input": "..."}
    v = S.score_bbh(T + "The answer is valid or invalid.", doc, "valid", PLAIN)
    assert v["correct"] is False and v["ambiguous"] is True
    assert S.score_bbh(T + "The answer is valid.", doc, "valid", PLAIN)["correct"] is True


# -- 7. the letter fallback reads the verdict, not the explanation --------------------------------------

@pytest.mark.parametrize("response, gold, ok", [
    ("G is correct because the forces balance. Options B and E would need more energy.", "G", True),
    ("Statement B is the sarcastic one.", "B", True),
    ("B is wrong. D is the best answer since the rest fail.", "D", True),
    ("A is the least likely; C is correct.", "C", True),
    ("(F) is the right choice, whereas A and C ignore friction.", "F", True),
    ("Option A is incorrect and B would be wrong as well. So E.", "A", False),
    ("B is not correct. Neither is C.", "B", False),
])
def test_letter_fallback_reads_the_verdict(response, gold, ok):
    v = S.score_choice(T + response, gold, 10, OPTS, PLAIN)
    assert v["correct"] is ok and v["rule"] == "fallback"


# -- 8. option text written in LaTeX --------------------------------------------------------------------

SCI = ["4.5 × 10^-2 s", "4.5 × 10^-3 s", "45 × 10^-2 s", "2 μm", "3 × 10^8 m/s", "90°"]


@pytest.mark.parametrize("response, gold, ok", [
    ("\\boxed{4.5 \\times 10^{-2}\\ \\text{s}}", "A", True),
    ("\\boxed{4.5 \\times 10^{-3}\\,\\text{s}}", "B", True),
    ("The answer is $4.5 \\times 10^{-2}$ s.", "A", True),
    ("\\boxed{3 \\times 10^{8}\\ \\text{m/s}}", "E", True),
    ("\\boxed{2\\ \\mu\\text{m}}", "D", True),
    ("\\boxed{4.5 \\times 10^{-2}\\ \\text{s}}", "C", False),
    ("\\boxed{4.5 \\times 10^{-4}\\ \\text{s}}", "A", False),
])
def test_option_text_in_latex(response, gold, ok):
    v = S.score_choice(T + response, gold, len(SCI), SCI, PLAIN)
    assert v["correct"] is ok
    if ok:
        assert v["rule"] == "option_text"


# -- 9. BBH list formats ----------------------------------------------------------------------------

DYCK = {"input": "Complete the rest of the sequence. Input: [ ( {", "target": "} ) ]"}


@pytest.mark.parametrize("response, ok", [
    ("The answer is: } ) ]\n\nThis closes the { first, then the ( and finally the [.", True),
    ("Answer: } ) ] — closing the ( and [ in order", True),
    ("So the sequence ends with } ) ] (closing the innermost first).", True),
    ("\\boxed{\\} ) ]}", True),
    ("The answer is: } ] )\n\nThis closes the ( first.", False),
    ("Answer: } ) — then the [ stays open", False),
])
def test_dyck_ignores_brackets_of_the_explanation(response, ok):
    assert S.score_bbh(T + response, DYCK, "dyck", PLAIN)["correct"] is ok


WORDS = {"input": "Sort the following words alphabetically: List: pear apple banana", "target": "apple banana pear"}


@pytest.mark.parametrize("response, ok", [
    ("\\boxed{\\begin{array}{l} apple \\\\ banana \\\\ pear \\end{array}}", True),
    ("The sorted list is: 1. apple 2. banana 3. pear", True),
    ("The answer is apple, banana, and pear.", True),
    ("The answer is apple, banana and pear.", True),
    ("Sorted list:\n1. apple\n2. banana\n3. pear", True),
    ("The answer is: 1. banana 2. apple 3. pear", False),
    ("\\boxed{\\begin{array}{l} pear \\\\ banana \\\\ apple \\end{array}}", False),
])
def test_word_sorting_list_formats(response, ok):
    assert S.score_bbh(T + response, WORDS, "words", PLAIN)["correct"] is ok


# -- how each answer was found ----------------------------------------------------------------------

@pytest.mark.parametrize("response, rule", [
    ("\\boxed{18}", "boxed"),
    ("The answer is 18.", "phrase"),
    ("She has 18 apples now.", "fallback"),
    ("I do not know.", "none"),
    ("<think>never closed", "none"),
])
def test_every_verdict_says_how_its_answer_was_found(response, rule):
    v = S.score_math(response if response.startswith("<think>") else T + response, "18", PLAIN)
    assert v["rule"] == rule and v["rule"] in S.RULES


def test_extraction_is_logged_per_response_and_aggregates_to_the_clear_share():
    out = S.process_results_math_sampled({"answer": "#### 18"}, [[T + "\\boxed{18}", T + "\\boxed{3 \\text{ or } 4}",
                                                                  "<think>x", T + "so 18"]])
    recs = out["extraction"]
    assert [r["rule"] for r in recs] == ["boxed", "boxed", "none", "fallback"]
    assert [r["ambiguous"] for r in recs] == [False, True, False, False]
    assert recs[0]["answer"] == "18" and out["exact_match"] == 0.5
    assert S.extraction_share([recs, [{"rule": "phrase", "ambiguous": False, "answer": "C"}]]) == pytest.approx(3 / 5)
