"""Synthetic multi-step arithmetic word problems: the generator behind ``telltale_arith`` and the
training data of the shipped tiny reasoning model (:mod:`lm_eval_telltale.arith.train`).

A problem is a short story about one person and one kind of item: a start count, then ``level``
operations, each one sentence (gain ``n``, lose ``n``, or double). All numbers stay in 0..99,
the operands ``n`` in 1..20. The worked solution reads the story sentence by sentence and writes
each operation's calculation after its sentence, so each step is one small-number calculation::

    Q: Ann has 7 apples. She buys 5 more. She gives away 3. How many apples does Ann have now?
    A: Ann has 7 apples.
       She buys 5 more. 7 + 5 = 12.
       She gives away 3. 12 - 3 = 9.
       #### 9

(Restating the sentence before its calculation is what makes the format learnable by a tiny
model in minutes: the next sentence to process is found by matching the last restated one —
an induction-head pattern — instead of counting sentences. With the bare calculations the same
model reached ~10 % after 10 CPU minutes, with the restatement 65 %.)

Docs are in the GSM8K schema (``question``, ``answer`` = worked solution + ``#### N``) plus
``level`` and ``id``. The model's target is the Qwen3-style thinking format::

    <think>\\nAnn has 7 apples.\\nShe buys 5 more. 7 + 5 = 12.\\n ... </think>\\n\\nThe answer is \\boxed{9}.<|im_end|>

Split: a problem belongs to the held-out set iff the first byte of the SHA-256 of its question
text is below :data:`TEST_HASH_CUTOFF` (10 %). The test split draws only such problems, training
only the others, so the two are disjoint by construction whatever their sizes and seeds.
The test split is fixed: :data:`TEST_PER_LEVEL` problems per level, drawn with seed
:data:`TEST_SEED` + level, deduplicated.

Pure Python (no torch); ``datasets`` is imported only by :func:`load`.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Iterator

#: the user-turn instruction after the question (training and the task use the same text)
INSTRUCTION = "Think step by step, then give the final answer in \\boxed{}."
LEVELS = (1, 2, 3, 4)
MAX_VALUE = 99
MAX_OPERAND = 20
TEST_PER_LEVEL = 75
TEST_SEED = 20260
TEST_HASH_CUTOFF = 26  # first SHA-256 byte < 26  <=>  ~10.2 % of all problems are test problems

# (name, pronoun, possessive)
PEOPLE = [
    ("Ann", "She", "her"), ("Ben", "He", "his"), ("Cal", "He", "his"), ("Dia", "She", "her"),
    ("Eva", "She", "her"), ("Finn", "He", "his"), ("Gus", "He", "his"), ("Ivy", "She", "her"),
    ("Jon", "He", "his"), ("Kim", "She", "her"), ("Leo", "He", "his"), ("Mia", "She", "her"),
]
ITEMS = ["apples", "books", "cards", "coins", "eggs", "pens", "rocks", "shells", "stamps", "toys"]
GAIN = ["{P} buys {n} more.", "{P} finds {n} more.", "{P} gets {n} more.", "{P} wins {n} more."]
LOSS = ["{P} gives away {n}.", "{P} loses {n}.", "{P} sells {n}.", "{P} uses {n}."]
DOUBLE = ["{P} doubles {p} {item}."]


def is_test_question(question: str) -> bool:
    """The fixed held-out criterion (hash of the question text)."""
    return hashlib.sha256(question.encode("utf-8")).digest()[0] < TEST_HASH_CUTOFF


def make_problem(rng: random.Random, level: int) -> dict:
    """One problem with ``level`` operations: {question, answer (GSM8K schema), level, steps}."""
    name, P, p = rng.choice(PEOPLE)
    item = rng.choice(ITEMS)
    cur = rng.randint(2, 20)
    sents = [f"{name} has {cur} {item}."]
    steps = []
    for _ in range(level):
        kinds = []
        if cur + 1 <= MAX_VALUE:
            kinds += ["add", "add"]
        if cur >= 1:
            kinds += ["sub", "sub"]
        if 1 <= cur <= MAX_VALUE // 2:
            kinds += ["mul"]
        kind = rng.choice(kinds)
        if kind == "add":
            n = rng.randint(1, min(MAX_OPERAND, MAX_VALUE - cur))
            new, line, tmpl = cur + n, f"{cur} + {n} = {cur + n}.", rng.choice(GAIN)
        elif kind == "sub":
            n = rng.randint(1, min(MAX_OPERAND, cur))
            new, line, tmpl = cur - n, f"{cur} - {n} = {cur - n}.", rng.choice(LOSS)
        else:
            n = 2
            new, line, tmpl = cur * 2, f"{cur} * 2 = {cur * 2}.", rng.choice(DOUBLE)
        sent = tmpl.format(P=P, p=p, n=n, item=item)
        sents.append(sent)
        steps.append(f"{sent} {line}")
        cur = new
    sents.append(f"How many {item} does {name} have now?")
    question = " ".join(sents)
    steps = [sents[0]] + steps
    answer = "\n".join(steps) + f"\n#### {cur}"
    return {"question": question, "answer": answer, "level": level, "steps": steps, "result": cur}


def doc_to_text(doc: dict) -> str:
    """The user turn (task prompt and training prompt alike)."""
    return f"{doc['question'].strip()}\n{INSTRUCTION}"


def target_text(doc: dict) -> str:
    """The assistant turn the model is trained to write (before the EOS token ``<|im_end|>``)."""
    steps = doc["answer"].rsplit("\n####", 1)[0]
    result = doc["answer"].rsplit("####", 1)[1].strip()
    return f"<think>\n{steps}\n</think>\n\nThe answer is \\boxed{{{result}}}."


def chat_prompt(doc: dict, tokenizer) -> str:
    """The chat-template prompt (with the generation prompt) for ``doc``, as lm-eval's
    ``--apply_chat_template`` renders it."""
    return tokenizer.apply_chat_template([{"role": "user", "content": doc_to_text(doc)}],
                                         tokenize=False, add_generation_prompt=True)


def training_text(doc: dict, tokenizer) -> tuple[str, str]:
    """(prompt, completion) strings of one training example; the loss is on the completion only.
    The completion ends with the EOS token ``<|im_end|>``."""
    return chat_prompt(doc, tokenizer), target_text(doc) + tokenizer.eos_token


def _gsm8k_doc(prob: dict, idx: str) -> dict:
    return {"id": idx, "level": prob["level"], "question": prob["question"], "answer": prob["answer"]}


def test_split(levels=LEVELS, per_level: int = TEST_PER_LEVEL) -> list[dict]:
    """The fixed held-out split: ``per_level`` distinct test problems per level, in order."""
    out = []
    for level in levels:
        rng = random.Random(TEST_SEED + level)
        seen: set[str] = set()
        while len(seen) < per_level:
            prob = make_problem(rng, level)
            q = prob["question"]
            if q in seen or not is_test_question(q):
                continue
            seen.add(q)
            out.append(_gsm8k_doc(prob, f"L{level}-{len(seen) - 1:03d}"))
    return out


def train_stream(seed: int = 0, levels=LEVELS) -> Iterator[dict]:
    """An endless seeded stream of training problems (never a held-out one), levels uniform."""
    rng = random.Random(seed)
    while True:
        prob = make_problem(rng, rng.choice(levels))
        if not is_test_question(prob["question"]):
            yield _gsm8k_doc(prob, "train")


def load(level: int | None = None, per_level: int = TEST_PER_LEVEL, **_ignored: Any):
    """``custom_dataset`` loader of the ``telltale_arith`` tasks: {"test": Dataset} with the
    held-out split (one level, or all). lm-eval calls it as ``load(**metadata,
    **dataset_kwargs)``; unknown keys are ignored. Nothing is downloaded."""
    import datasets

    docs = test_split(per_level=int(per_level))
    if level is not None:
        docs = [d for d in docs if d["level"] == int(level)]
    return {"test": datasets.Dataset.from_list(docs)}
