"""Scorer tables for the telltale_* tasks (lm_eval_telltale.tasksupport.scoring): no engine, no lm-eval run."""

from __future__ import annotations

import pytest

from lm_eval_telltale.tasksupport import scoring as S
from lm_eval_telltale.tasksupport.scoring import numeric

# A closed thinking block in front of an answer, as a raw response (no think_end_token stripping).
T = "<think>\nLet me work it out. 6 * 3 = 18. Maybe 20? No, 18.\n</think>\n\n"

# --------------------------------------------------------------------------------------------
# thinking / truncation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response, text, truncated",
    [
        ("The answer is 5.", "The answer is 5.", False),
        ("<think>a</think>The answer is 5.", "The answer is 5.", False),
        ("<think>a</think>b</think> c", "c", False),  # after the LAST think-end
        ("<think>still going", "", True),
        ("<think>a</think> then <think>again", "", True),
        ("reasoning that was stripped </think> 7", "7", False),  # template put <think> in prompt
        ("", "", False),
    ],
)
def test_split_thinking(response, text, truncated):
    assert S.split_thinking(response) == (text, truncated)


def test_require_think_end(monkeypatch):
    monkeypatch.setenv("TELLTALE_REQUIRE_THINK_END", "1")
    assert S.split_thinking("no tags at all, 5") == ("", True)
    assert S.split_thinking("thinking</think>5") == ("5", False)


def test_custom_think_tags(monkeypatch):
    monkeypatch.setenv("TELLTALE_THINK_START", "<reasoning>")
    monkeypatch.setenv("TELLTALE_THINK_END", "</reasoning>")
    assert S.split_thinking("<reasoning>x</reasoning>\\boxed{4}") == ("\\boxed{4}", False)
    assert S.split_thinking("<reasoning>x") == ("", True)


# --------------------------------------------------------------------------------------------
# GSM8K-schema math (gold 18), verdict = (correct, truncated)
# --------------------------------------------------------------------------------------------

GSM8K_GOLD = "She buys 3 * 6 = <<3*6=18>>18 apples.\n#### 18"

GSM8K_TABLE = [
    # boxed
    (T + "So she has \\boxed{18} apples.", (True, False)),
    (T + "$\\boxed{18}$", (True, False)),
    (T + "\\boxed{18.00}", (True, False)),
    (T + "\\boxed{\\$18}", (True, False)),
    (T + "\\boxed{18 \\text{ apples}}", (True, False)),
    (T + "\\boxed{\\frac{36}{2}}", (True, False)),
    (T + "\\boxed{\\dfrac{54}{3}}", (True, False)),
    (T + "\\boxed{\\text{18}}", (True, False)),
    # plain phrases
    (T + "The answer is 18.", (True, False)),
    (T + "The final answer is $18$. I hope it is correct.", (True, False)),
    (T + "Final answer: 18 apples", (True, False)),
    (T + "The answer is \\$18.00.", (True, False)),
    # R1-style bold
    (T + "**Answer:** 18", (True, False)),
    (T + "**Final Answer**\n\\[\n\\boxed{18}\n\\]", (True, False)),
    (T + "**Answer: 18**", (True, False)),
    # last number fallback
    (T + "She has 3 boxes of 6, that is 18", (True, False)),
    # wrong answers that contain 18 earlier
    (T + "First I thought 18, but the answer is \\boxed{20}.", (False, False)),
    (T + "The answer is 180, not 18.", (False, False)),
    (T + "18 apples were bought, 2 eaten, so 16 remain.", (False, False)),
    (T + "\\boxed{17.99}", (False, False)),
    # answer only inside the thinking
    ("<think>\\boxed{18}</think>I am not sure.", (False, False)),
    ("<think>The answer is 18.</think>\n", (False, False)),
    # truncated thinking (even if it contains the right answer)
    ("<think>The answer is \\boxed{18} ... let me double-check", (False, True)),
    ("<think>", (False, True)),
    # answers in units
    (T + "\\boxed{18\\text{ dollars}}", (True, False)),
    (T + "\\boxed{18 \\mathrm{cm}}", (True, False)),
]


@pytest.mark.parametrize("response, expected", GSM8K_TABLE)
def test_gsm8k_table(response, expected):
    out = S.process_results_gsm8k({"question": "q", "answer": GSM8K_GOLD}, [response])
    assert (out["exact_match"] == 1.0, out["truncated"] == 1.0) == expected, response


def test_gsm8k_table_size():
    assert len(GSM8K_TABLE) >= 15


@pytest.mark.parametrize(
    "gold, response, ok",
    [
        ("#### 1,000", "\\boxed{1000}", True),
        ("#### 1000", "The answer is 1,000.", True),
        ("#### -5", "\\boxed{-5}", True),
        ("#### 5", "\\boxed{-5}", False),
        ("#### 0.5", "\\boxed{\\frac{1}{2}}", True),
        ("#### 25", "\\boxed{25\\%}", True),
        ("#### -5", "The total change is \u22125", True),  # unicode minus
        ("#### 3", "Steps 1,2,3", True),  # a list is not a thousands separator
        ("#### 1234567", "The answer is 1,234,567.", True),
    ],
)
def test_gsm8k_number_formats(gold, response, ok):
    assert S.process_results_math({"answer": gold}, [response])["exact_match"] == float(ok)


# --------------------------------------------------------------------------------------------
# GSM-Plus (string `answer`; "None" for critical thinking)
# --------------------------------------------------------------------------------------------

GSM_PLUS_TABLE = [
    # numeric golds, GSM-Plus formats
    ("4.33", T + "26 / 6 = 4.33, so \\boxed{4.33}", (True, False)),
    ("4.33", T + "\\boxed{\\frac{13}{3}}", (True, False)),  # exact value of a rounded gold
    ("4.33", T + "\\boxed{4.333}", (True, False)),
    ("4.33", T + "\\boxed{4.3}", (False, False)),
    ("1/2", T + "\\boxed{\\frac{1}{2}}", (True, False)),
    ("1/2", T + "The answer is 0.5", (True, False)),
    ("1/2", T + "\\boxed{1/2}", (True, False)),
    ("3.5", T + "**Answer:** 3.50 inches", (True, False)),
    ("30", T + "\\boxed{30}", (True, False)),
    ("30", T + "Each is 3 and 30 in total... the answer is \\boxed{3}", (False, False)),
    # critical thinking: gold "None"
    ("None", T + "The number of red cars is not given, so \\boxed{None}.", (True, False)),
    ("None", T + "\\boxed{\\text{None}}", (True, False)),
    ("None", T + "\\boxed{\\text{Cannot be determined}}", (True, False)),
    ("None", T + "**Answer:** None - the price of the other heels is missing.", (True, False)),
    ("None", T + "The question does not give the height of the other heels, so it cannot be determined.", (True, False)),
    ("None", T + "There is not enough information to answer.", (True, False)),
    ("None", T + "Assuming 2-inch heels, \\boxed{3}", (False, False)),
    ("None", T + "The answer is 3.", (False, False)),
    ("None", T + "Let the unknown height be x. Then x = 5.", (False, False)),
    ("None", "<think>\\boxed{None}</think>\\boxed{3}", (False, False)),  # None only in thinking
    ("None", "<think>The question lacks information, so None", (False, True)),  # truncated
    # a numeric gold is never matched by an abstention
    ("3", T + "\\boxed{None}", (False, False)),
]


def _plus_doc(answer: str, ptype: str = "numerical substitution") -> dict:
    return {
        "question": "q",
        "solution": f"...\n#### {answer}",
        "answer": answer,
        "perturbation_type": ptype,
        "seed_question": "sq",
        "seed_solution": "...\n#### 3",
        "seed_answer": "3",
    }


@pytest.mark.parametrize("gold, response, expected", GSM_PLUS_TABLE)
def test_gsm_plus_table(gold, response, expected):
    ptype = "critical thinking" if gold == "None" else "numerical substitution"
    out = S.process_results_gsm_plus(_plus_doc(gold, ptype), [response])
    assert (out["exact_match"] == 1.0, out["truncated"] == 1.0) == expected, response


def test_gsm_plus_table_size():
    assert len(GSM_PLUS_TABLE) >= 15


# --------------------------------------------------------------------------------------------
# AIME (int `Answer`)
# --------------------------------------------------------------------------------------------

AIME_TABLE = [
    (T + "\\boxed{204}", (True, False)),
    (T + "\\boxed{0204}", (True, False)),  # leading zero
    (T + "The answer is 204.", (True, False)),
    (T + "Final answer: 204", (True, False)),
    (T + "**Answer:** $204$", (True, False)),
    (T + "\\boxed{\\text{204}}", (True, False)),
    (T + "$a=1$, and the sum is **204**", (True, False)),
    (T + "\\boxed{\\frac{408}{2}}", (True, False)),
    (T + "\\boxed{204.0}", (True, False)),
    (T + "So $m+n = 204$, i.e. \\boxed{m+n=204}", (True, False)),
    (T + "\\boxed{2 0 4}", (True, False)),
    (T + "\\boxed{024}", (False, False)),
    (T + "We get 204 for one case but the answer is \\boxed{402}.", (False, False)),
    (T + "\\boxed{204} is wrong; the answer is \\boxed{205}", (False, False)),
    ("<think>m + n = 204, so \\boxed{204}</think>", (False, False)),
    ("<think>\\boxed{204}", (False, True)),
    ("<think>So far 204", (False, True)),
]


@pytest.mark.parametrize("response, expected", AIME_TABLE)
def test_aime_table(response, expected):
    doc = {"ID": "2024-I-1", "Problem": "p", "Solution": "s", "Answer": 204}
    out = S.process_results_aime(doc, [response])
    assert (out["exact_match"] == 1.0, out["truncated"] == 1.0) == expected, response


def test_aime_table_size():
    assert len(AIME_TABLE) >= 15


def test_aime_k_samples():
    doc = {"ID": "2024-I-1", "Problem": "p", "Solution": "s", "Answer": 33}
    samples = [
        T + "\\boxed{033}",
        T + "\\boxed{34}",
        T + "\\boxed{33}",
        "<think>never closed",
        T + "\\boxed{34}",
        T + "\\boxed{34}",
        T + "The answer is 33.",
        T + "\\boxed{12}",
    ]
    out = S.process_results_math_sampled(doc, [samples])  # lm-eval passes [filtered_resps]
    assert out["exact_match"] == pytest.approx(3 / 8)
    assert out["truncated"] == pytest.approx(1 / 8)
    assert out["pass_at_k"] == 1.0
    assert out["maj_at_k"] == 1.0  # 33 ("033", "33", "33") ties with 34 (x3); 33 came first
    samples[7] = T + "\\boxed{34}"
    out = S.process_results_math_sampled(doc, [samples])
    assert out["maj_at_k"] == 0.0  # 34 (x4) is now the majority


def test_aime_k_samples_majority_tie_is_earliest():
    doc = {"Answer": 5}
    out = S.process_results_math_sampled(doc, [[T + "\\boxed{7}", T + "\\boxed{5}"]])
    assert out["maj_at_k"] == 0.0 and out["pass_at_k"] == 1.0 and out["exact_match"] == 0.5
    none = S.process_results_math_sampled(doc, [["<think>a", "<think>b"]])
    assert none.pop("extraction") == [{"rule": "none", "ambiguous": False, "answer": None}] * 2
    assert none == {"exact_match": 0.0, "truncated": 1.0, "pass_at_k": 0.0, "maj_at_k": 0.0}


# --------------------------------------------------------------------------------------------
# MMLU-Pro letters
# --------------------------------------------------------------------------------------------

MMLU_DOC = {
    "question_id": 70,
    "question": "q",
    "options": ["10 kg", "20 kg", "42 kg", "7 kg", "x", "y", "z", "w", "q", "r"],
    "answer": "C",
    "answer_index": 2,
    "cot_content": "",
    "category": "physics",
    "src": "ori_mmlu-high_school_physics",
}

MMLU_TABLE = [
    (T + "\\boxed{C}", (True, False)),
    (T + "\\boxed{\\text{C}}", (True, False)),
    (T + "\\boxed{(C)}", (True, False)),
    (T + "\\boxed{C. 42 kg}", (True, False)),
    (T + "The answer is (C).", (True, False)),
    (T + "the answer is C because the mass doubles", (True, False)),
    (T + "Answer: C", (True, False)),
    (T + "**Answer:** C", (True, False)),
    (T + "**Answer: (C) 42 kg**", (True, False)),
    (T + "Final Answer: $\\boxed{C}$", (True, False)),
    (T + "Therefore, the correct option is C.", (True, False)),
    (T + "C", (True, False)),
    (T + "Options A and B are too small; D is too light.\n(C)", (True, False)),
    (T + "\\boxed{42 kg}", (True, False)),  # option text instead of the letter
    (T + "A careful check shows C.\nI am confident.", (True, False)),  # "A"/"I" are words here
    (T + "C looks right at first, but the answer is \\boxed{D}.", (False, False)),
    (T + "The answer is (D), not C.", (False, False)),
    (T + "\\boxed{K}", (False, False)),  # not an option
    ("<think>The answer is C.</think>I cannot decide.", (False, False)),
    ("<think>The answer is (C)", (False, True)),
]


@pytest.mark.parametrize("response, expected", MMLU_TABLE)
def test_mmlu_pro_table(response, expected):
    out = S.process_results_mmlu_pro(MMLU_DOC, [response])
    assert (out["exact_match"] == 1.0, out["truncated"] == 1.0) == expected, response


def test_mmlu_pro_table_size():
    assert len(MMLU_TABLE) >= 15


def test_mmlu_pro_fewer_options_and_answer_index():
    doc = dict(MMLU_DOC, options=["a", "b", "c", "d"], answer="D", answer_index=3)
    assert S.process_results_mmlu_pro(doc, [T + "\\boxed{D}"])["exact_match"] == 1.0
    assert S.process_results_mmlu_pro(doc, [T + "\\boxed{E}"])["exact_match"] == 0.0
    doc2 = dict(doc, answer=None)
    assert S.process_results_mmlu_pro(doc2, [T + "Answer: D"])["exact_match"] == 1.0


# --------------------------------------------------------------------------------------------
# BBH: per-subtask normalisation
# --------------------------------------------------------------------------------------------

COLORED = (
    "On the floor, there are three grey cat toys. How many grey objects remain?\nOptions:\n"
    + "\n".join(
        f"({chr(65 + i)}) {w}"
        for i, w in enumerate(
            "zero one two three four five six seven eight nine ten eleven twelve thirteen "
            "fourteen fifteen sixteen".split()
        )
    )
)
DYCK = "Complete the rest of the sequence, making sure that the parentheses are closed properly. Input: [ { ("
WORDS = "Sort the following words alphabetically: List: syndrome therefrom apple mango"

BBH_TABLE = [
    # boolean_expressions: True/False
    ("boolean_expressions", "not ( True ) and ( True ) is", "False", T + "\\boxed{False}", (True, False)),
    ("boolean_expressions", "not ( True ) and ( True ) is", "False", T + "\\boxed{\\text{False}}", (True, False)),
    ("boolean_expressions", "not ( True ) and ( True ) is", "False", T + "So the expression is **false**.", (True, False)),
    ("boolean_expressions", "not ( True ) and ( True ) is", "False", T + "True and False gives False. Answer: True", (False, False)),
    # Yes/No subtasks (web_of_lies/navigate/causal_judgement: Yes/No; sports: yes/no)
    ("web_of_lies", "Question: ... Does Elanor tell the truth?", "No", T + "\\boxed{No}", (True, False)),
    ("web_of_lies", "Question: ... Does Elanor tell the truth?", "No", T + "Answer: No, Elanor lies.", (True, False)),
    ("navigate", "Take 1 step.\nOptions:\n- Yes\n- No", "Yes", T + "**Answer:** Yes", (True, False)),
    ("causal_judgement", "Did X cause Y?\nOptions:\n- Yes\n- No", "No", T + "\\boxed{Yes}", (False, False)),
    ("sports_understanding", 'Is the following sentence plausible? "x"', "no", T + "\\boxed{No}", (True, False)),
    ("sports_understanding", 'Is the following sentence plausible? "x"', "no", T + "The sentence is not plausible.", (True, False)),
    ("sports_understanding", 'Is the following sentence plausible? "x"', "yes", T + "\\boxed{plausible}", (True, False)),
    # formal_fallacies: valid/invalid ("invalid" contains "valid")
    ("formal_fallacies", "... valid or invalid?", "invalid", T + "\\boxed{invalid}", (True, False)),
    ("formal_fallacies", "... valid or invalid?", "invalid", T + "The argument is deductively invalid.", (True, False)),
    ("formal_fallacies", "... valid or invalid?", "invalid", T + "\\boxed{valid}", (False, False)),
    ("formal_fallacies", "... valid or invalid?", "valid", T + "The answer is: **valid**", (True, False)),
    # numbers
    ("multistep_arithmetic_two", "((-1 + 2) * 3) =", "-24", T + "\\boxed{-24}", (True, False)),
    ("multistep_arithmetic_two", "((-1 + 2) * 3) =", "-24", T + "\\boxed{24}", (False, False)),
    ("multistep_arithmetic_two", "((-1 + 2) * 3) =", "-24", T + "= -24", (True, False)),
    ("object_counting", "How many musical instruments do I have?", "8", T + "\\boxed{eight}", (True, False)),
    ("object_counting", "How many musical instruments do I have?", "8", T + "I have 8 instruments.", (True, False)),
    ("object_counting", "How many musical instruments do I have?", "8", T + "I count 8, plus a piano: 9 in total.", (False, False)),
    # multiple choice letters (18 options)
    ("reasoning_about_colored_objects", COLORED, "(D)", T + "\\boxed{D}", (True, False)),
    ("reasoning_about_colored_objects", COLORED, "(D)", T + "The answer is (D) three.", (True, False)),
    ("reasoning_about_colored_objects", COLORED, "(D)", T + "\\boxed{three}", (True, False)),
    ("reasoning_about_colored_objects", COLORED, "(D)", T + "\\boxed{Q}", (False, False)),
    ("reasoning_about_colored_objects", COLORED, "(D)", T + "**Answer: (D)**", (True, False)),
    # a few BBH items have the option text as target
    ("movie_recommendation", "Find:\nOptions:\n(A) Monsters\n(B) Inc", "Monsters, Inc", T + "\\boxed{Monsters, Inc}", (True, False)),
    # word lists
    ("word_sorting", WORDS, "apple mango syndrome therefrom", T + "\\boxed{apple mango syndrome therefrom}", (True, False)),
    ("word_sorting", WORDS, "apple mango syndrome therefrom", T + "The answer is: apple, mango, syndrome, therefrom", (True, False)),
    ("word_sorting", WORDS, "apple mango syndrome therefrom", T + "Sorted:\n1. apple\n2. mango\n3. syndrome\n4. therefrom", (True, False)),
    ("word_sorting", WORDS, "apple mango syndrome therefrom", T + "\\boxed{mango apple syndrome therefrom}", (False, False)),
    # Dyck
    ("dyck_languages", DYCK, ") } ]", T + "Answer: ) } ]", (True, False)),
    ("dyck_languages", DYCK, ") } ]", T + "\\boxed{) } ]}", (True, False)),  # unbalanced LaTeX box
    ("dyck_languages", DYCK, ") } ]", T + "\\boxed{) \\} ]}", (True, False)),
    ("dyck_languages", DYCK, ") } ]", T + "The full sequence is:\n[ { ( ) } ]", (True, False)),
    ("dyck_languages", DYCK, ") } ]", T + "Answer: ) ]", (False, False)),
    # answer only in the thinking / truncated
    ("boolean_expressions", "True and False is", "False", "<think>False</think>", (False, False)),
    ("web_of_lies", "Does Elanor tell the truth?", "No", "<think>Elanor lies, so No", (False, True)),
]


@pytest.mark.parametrize("subtask, inp, target, response, expected", BBH_TABLE)
def test_bbh_table(subtask, inp, target, response, expected):
    kind = S.BBH_KINDS[subtask]
    fn = getattr(S, f"process_results_bbh_{kind}")
    out = fn({"input": inp, "target": target}, [response])
    assert (out["exact_match"] == 1.0, out["truncated"] == 1.0) == expected, response


def test_bbh_table_size_and_kinds():
    assert len(BBH_TABLE) >= 15
    kinds = {S.BBH_KINDS[row[0]] for row in BBH_TABLE}
    assert kinds == set(S.BBH_KINDS.values())
    assert len(S.BBH_KINDS) == 27


# --------------------------------------------------------------------------------------------
# issue 14 item 10: answers a careful grader accepts (Qwen3 / DeepSeek-R1 answer formats)
# --------------------------------------------------------------------------------------------

R1 = "<think>\nOkay, so I need to find the answer. Let me compute step by step.\n</think>\n\n"

# (gold, response, (correct, truncated)); golds as GSM-Plus strings
MATH_ISSUE14_TABLE = [
    # money written with "$" outside math mode; an escaped "\$" inside a $...$ span
    ("18", T + "The answer is $18. That is 2 more than yesterday's $16.", (True, False)),
    ("18", T + "**Final Answer:** $18, which is 3 more than the $15 she made on Monday.", (True, False)),
    ("18", R1 + "She sells 9 eggs at $2 each to get $18.\n\nThe answer is $\\$18$, which is $2 more than $16$.", (True, False)),
    ("18", R1 + "So she has $\\$18$ and pays $\\$2$ in tax.\n\nThe answer is $\\$18$ and her change is 2.", (True, False)),
    ("16", T + "The answer is $18. That is 2 more than yesterday's $16.", (False, False)),
    # thousands separators in a boxed equation or text
    ("70000", R1 + "**Final Answer**\n\\[\n\\boxed{a - b = 70,000}\n\\]", (True, False)),
    ("70000", T + "### Final Answer\n$$\n\\boxed{70{,}000 \\text{ dollars}}\n$$", (True, False)),
    ("70000", T + "The profit is $70\\,000$ dollars, i.e. \\boxed{\\text{profit} = \\$70{,}000}", (True, False)),
    ("1250", T + "\\boxed{x = 1,250}", (True, False)),
    ("70000", T + "\\boxed{a - b = 7,000}", (False, False)),
    # a plain fraction without a box
    ("1/2", R1 + "Half of the six women wear 4-inch heels, so the share is 3/6 = 1/2", (True, False)),
    ("1/2", T + "The answer is 1/2 of the women.", (True, False)),
    ("1/2", T + "So the fraction of guests is $\\frac{1}{2}$ of the total.", (True, False)),
    ("2", T + "So the share of the guests is 1/2", (False, False)),
    # several numbers in the answer clause: the final one (not a circumstance) is the answer
    ("18", T + "The final answer is: after 3 days she has 18 apples.", (True, False)),
    ("18", T + "**Answer:** In 2 weeks, Ann collects 18 apples.", (True, False)),
    ("18", T + "**Answer:** Janet makes $18 every day at the farmers' market (9 eggs × $2).", (True, False)),
    ("18", T + "The answer is 18 apples for 3 people.", (True, False)),
    ("18", T + "The answer is 18 out of 20.", (True, False)),
    ("3", T + "The final answer is: after 3 days she has 18 apples.", (False, False)),
    # number words in running text
    ("18", T + "She has eighteen apples left.", (True, False)),
    ("18", T + "The answer is eighteen apples.", (True, False)),
    ("25", R1 + "In total there are twenty-five guests at the party.", (True, False)),
    ("120", T + "**Answer:** one hundred and twenty cookies", (True, False)),
    ("40", T + "Together they need 40 cups. That's one more than last week.", (True, False)),
    ("1", T + "Together they need 40 cups. That's one more than last week.", (False, False)),
]


@pytest.mark.parametrize("gold, response, expected", MATH_ISSUE14_TABLE)
def test_math_issue14_table(gold, response, expected):
    out = S.process_results_math({"question": "q", "answer": gold}, [response])
    assert (out["exact_match"] == 1.0, out["truncated"] == 1.0) == expected, response


MMLU_J_DOC = dict(MMLU_DOC, options=["10 J", "20 J", "42 J", "7 J", "x", "y", "z", "w", "q", "r"])

# "Option C" / "option (C)" is a strong cue (the unit "J" and the article rule no longer win);
# a rejected option ("option C is wrong") is no cue
MMLU_ISSUE14_TABLE = [
    ("C", T + "Comparing the values, option C matches: the work done is 42 J.", (True, False)),
    ("C", R1 + "The correct answer is therefore option C, since W = 42 J.", (True, False)),
    ("A", T + "Option A is correct: the energy is 10 J.", (True, False)),
    ("B", T + "**Answer:** After checking the units, it is option (B), 20 J.", (True, False)),
    ("D", R1 + "42 J is too large, so option C is wrong. The work is 7 J, which is option D.", (True, False)),
    ("C", T + "Comparing the values, option C matches: the work done is 42 J.\n\nUnits: J", (True, False)),
    ("J", T + "Comparing the values, option C matches: the work done is 42 J.", (False, False)),
    ("C", R1 + "The energy is 7 J. Option C is incorrect because it gives 42 J; option D is right.", (False, False)),
]


@pytest.mark.parametrize("gold, response, expected", MMLU_ISSUE14_TABLE)
def test_mmlu_pro_issue14_table(gold, response, expected):
    doc = dict(MMLU_J_DOC, answer=gold, answer_index=S.LETTERS.index(gold))
    out = S.process_results_mmlu_pro(doc, [response])
    assert (out["exact_match"] == 1.0, out["truncated"] == 1.0) == expected, response


OWLS = "Which is leftmost?\nOptions:\n(A) The owl is the leftmost\n(B) The robin is the leftmost\n(C) The cat is the leftmost"
SORT_ANY = "Sort the following words alphabetically: List: therefrom mango syndrome apple"
SORTED = "apple mango syndrome therefrom"

BBH_ISSUE14_TABLE = [
    # digits for options whose text is a number word (reasoning_about_colored_objects)
    ("reasoning_about_colored_objects", COLORED, "(D)", T + "\\boxed{3}", (True, False)),
    ("reasoning_about_colored_objects", COLORED, "(D)", R1 + "Three grey objects remain.\n\nThe answer is 3.", (True, False)),
    ("reasoning_about_colored_objects", COLORED, "(D)", T + "### Final Answer\n$$\n\\boxed{3}\n$$", (True, False)),
    ("reasoning_about_colored_objects", COLORED, "(D)", T + "\\boxed{2}", (False, False)),
    # number words in running text (object_counting)
    ("object_counting", "How many musical instruments do I have?", "8", T + "I have eight musical instruments in total.", (True, False)),
    ("object_counting", "How many vegetables do I have?", "12", R1 + "Adding them up: twelve vegetables.", (True, False)),
    # "Option A" as a strong cue (the article rule used to drop it)
    ("logical_deduction_three_objects", OWLS, "(A)", T + "Option A is correct, since the owl is the leftmost.", (True, False)),
    ("logical_deduction_three_objects", OWLS, "(A)", R1 + "So the owl is leftmost. The answer is therefore option (A).", (True, False)),
    # LaTeX escapes in boxed text
    ("word_sorting", "Sort: b&w apple", "apple b&w", T + "\\boxed{apple b\\&w}", (True, False)),
    ("word_sorting", "Sort: b&w apple", "apple b&w", T + "\\boxed{\\text{apple, b\\&w}}", (True, False)),
    ("word_sorting", "Sort: b&w apple", "apple b&w", T + "\\boxed{b\\&w apple}", (False, False)),
    # word_sorting without a box: the list after the last "sorted"/"answer" cue
    ("word_sorting", SORT_ANY, SORTED, T + "**Sorted list:** apple mango syndrome therefrom\n\nAll four words are now in alphabetical order.", (True, False)),
    ("word_sorting", SORT_ANY, SORTED, R1 + "Here are the words sorted alphabetically:\n\n1. apple\n2. mango\n3. syndrome\n4. therefrom\n\nEach word was compared letter by letter.", (True, False)),
    ("word_sorting", SORT_ANY, SORTED, T + "In alphabetical order: apple, mango, syndrome, therefrom. Done!", (True, False)),
    ("word_sorting", SORT_ANY, SORTED, T + "### Final Sorted List\napple mango syndrome therefrom\n\nThis ordering follows the dictionary.", (True, False)),
    ("word_sorting", SORT_ANY, SORTED, T + "The words sorted alphabetically are: zebra apple mango syndrome therefrom", (False, False)),
]


@pytest.mark.parametrize("subtask, inp, target, response, expected", BBH_ISSUE14_TABLE)
def test_bbh_issue14_table(subtask, inp, target, response, expected):
    kind = S.BBH_KINDS[subtask]
    fn = getattr(S, f"process_results_bbh_{kind}")
    out = fn({"input": inp, "target": target}, [response])
    assert (out["exact_match"] == 1.0, out["truncated"] == 1.0) == expected, response


def test_issue14_tables_size():
    assert len(MATH_ISSUE14_TABLE) + len(MMLU_ISSUE14_TABLE) + len(BBH_ISSUE14_TABLE) >= 30


@pytest.mark.parametrize(
    "text, words",
    [
        ("eighteen", "18"),
        ("twenty-five apples", "25 apples"),
        ("one hundred and twenty", "120"),
        ("two thousand and five", "2005"),
        ("one two three", "1 2 3"),  # a list of numbers, not one number
        ("the last one", "the last one"),  # a pronoun
        ("one of them", "one of them"),
        ("the two methods agree", "the two methods agree"),
        ("often", "often"),
    ],
)
def test_number_words(text, words):
    assert numeric._words_to_digits(text) == words


# --------------------------------------------------------------------------------------------
# issue 14 item 11: a GSM-Plus mirror that stores the critical-thinking gold as JSON null
# --------------------------------------------------------------------------------------------


def test_gsm_plus_null_gold_is_an_abstention_gold():
    doc = dict(_plus_doc("None", "critical thinking"), answer=None)
    assert S.math_gold(doc) is None
    assert S.process_results_gsm_plus(doc, [T + "The height is not given, so \\boxed{None}."]) == {
        "exact_match": 1.0,
        "truncated": 0.0,
        "extraction": [{"rule": "boxed", "ambiguous": False, "answer": "None"}],
    }
    assert S.process_results_gsm_plus(doc, [T + "\\boxed{3}"])["exact_match"] == 0.0
    assert S.process_results_gsm_plus(doc, ["<think>no idea"]) == {
        "exact_match": 0.0, "truncated": 1.0, "extraction": [{"rule": "none", "ambiguous": False, "answer": None}]}
    assert S.process_results_math_sampled(doc, [[T + "\\boxed{None}", T + "\\boxed{3}"]])["exact_match"] == 0.5
    with pytest.raises(KeyError):  # a doc without any gold field is still an error
        S.math_gold({"question": "q"})


def test_gsm_plus_null_gold_through_a_local_mirror(tmp_path):
    import json

    from lm_eval_telltale.tasksupport import taskdata

    rows = [
        dict(_plus_doc("None", "critical thinking"), answer=None),
        dict(_plus_doc("3", "critical thinking"), answer="None"),
        _plus_doc("4.33"),
    ]
    path = taskdata.local_file(tmp_path, "qintongli/GSM-Plus", None, "testmini")
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = taskdata.load("qintongli/GSM-Plus", None, ["testmini"], where={"perturbation_type": "critical thinking"},
                       telltale_data_dir=str(tmp_path))
    docs = list(ds["testmini"])
    assert [d["answer"] for d in docs] == [None, "None"]
    for doc in docs:
        assert taskdata.doc_to_target_math(doc) == "None"
        assert S.process_results_gsm_plus(doc, [T + "\\boxed{None}"])["exact_match"] == 1.0


# --------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------


def test_every_entry_point_returns_the_shared_metrics():
    names = [n for n in S.__all__ if n.startswith("process_results_")]
    for name in names:
        fn = getattr(S, name)
        if name.startswith("process_results_bbh"):
            doc = {"input": "x\nOptions:\n(A) a\n(B) b", "target": "(A)"}
        elif name == "process_results_mmlu_pro":
            doc = MMLU_DOC
        else:
            doc = {"answer": "#### 1"}
        out = fn(doc, ["<think>x"])
        assert {"exact_match", "truncated"} <= set(out), name
        assert out["exact_match"] == 0.0 and out["truncated"] == 1.0, name


def test_results_shapes():
    doc = {"answer": "#### 7"}
    assert S.process_results_math(doc, ["\\boxed{7}"])["exact_match"] == 1.0
    assert S.process_results_math(doc, [["\\boxed{7}", "\\boxed{8}"]])["exact_match"] == 0.5
    assert S.process_results_math(doc, [None])["exact_match"] == 0.0
