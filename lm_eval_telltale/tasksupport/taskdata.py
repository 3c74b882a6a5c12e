"""Datasets and prompts of the packaged ``telltale_*`` lm-eval tasks.

**Loading.** Every task YAML in ``tasks/`` names its real Hugging Face dataset in
``dataset_kwargs`` and loads it through ``custom_dataset: !function
lm_eval_telltale.tasksupport.taskdata.load``. By default :func:`load` calls ``datasets.load_dataset`` on that
id/config/split. When a *local data directory* is given, it reads the same dataset from files
instead, laid out as::

    <DATA_DIR>/<hf_path>/<hf_name or "default">/<split>.jsonl      (or .json / .parquet)
    e.g.  <DATA_DIR>/openai/gsm8k/main/test.jsonl
          <DATA_DIR>/SaylorTwift/bbh/boolean_expressions/test.jsonl

The directory comes from (first wins) the lm-eval metadata key ``telltale_data_dir``
(``lm_eval --metadata '{"telltale_data_dir": "/data"}'`` or ``TaskManager(metadata=...)``) or the
environment variable ``TELLTALE_DATA_DIR``. With a directory set, a missing file is an error
(never a silent download). ``python -m lm_eval_telltale.tasksupport.taskdata mirror DIR`` writes a full local
mirror of the real datasets in this layout (needs network once);
``python -m lm_eval_telltale.tasksupport.taskdata write-fixtures DIR`` writes the tiny synthetic fixtures the
tests use, in each dataset's exact schema.

**Prompts.** Zero-shot, one user turn: the problem plus an instruction to reason and to put the
final answer in ``\\boxed{}`` (the option letter for multiple choice). See ``tasks/README.md``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import sys
from pathlib import Path
from typing import Any, Iterable

# --------------------------------------------------------------------------------------------
# dataset registry (the real datasets)
# --------------------------------------------------------------------------------------------

GSM_PLUS_TYPES: dict[str, str] = {
    # subtask suffix -> value of the `perturbation_type` field
    "numerical_substitution": "numerical substitution",
    "digit_expansion": "digit expansion",
    "integer_decimal_fraction_conversion": "integer-decimal-fraction conversion",
    "adding_operation": "adding operation",
    "reversing_operation": "reversing operation",
    "problem_understanding": "problem understanding",
    "distraction_insertion": "distraction insertion",
    "critical_thinking": "critical thinking",
}

MMLU_PRO_SUBJECTS: dict[str, str] = {
    # subtask suffix -> value of the `category` field
    "biology": "biology",
    "business": "business",
    "chemistry": "chemistry",
    "computer_science": "computer science",
    "economics": "economics",
    "engineering": "engineering",
    "health": "health",
    "history": "history",
    "law": "law",
    "math": "math",
    "other": "other",
    "philosophy": "philosophy",
    "physics": "physics",
    "psychology": "psychology",
}


def _bbh_subtasks() -> list[str]:
    from lm_eval_telltale.tasksupport.scoring import BBH_KINDS

    return list(BBH_KINDS)


#: (hf_path, hf_name, splits) of every dataset the tasks read
def datasets_used() -> list[tuple[str, str | None, tuple[str, ...]]]:
    return [
        ("openai/gsm8k", "main", ("test",)),
        ("qintongli/GSM-Plus", None, ("test", "testmini")),
        ("Maxwell-Jia/AIME_2024", None, ("train",)),
        *[("SaylorTwift/bbh", name, ("test",)) for name in _bbh_subtasks()],
        ("TIGER-Lab/MMLU-Pro", None, ("test",)),
    ]


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------

_EXTS = (".jsonl", ".json", ".parquet")


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The local data directory in force (metadata ``telltale_data_dir`` > ``TELLTALE_DATA_DIR``)."""
    d = explicit or os.environ.get("TELLTALE_DATA_DIR") or None
    return Path(d).expanduser() if d else None


def local_file(root: Path, hf_path: str, hf_name: str | None, split: str) -> Path:
    """Where the local copy of one split lives (the first existing extension, else ``.jsonl``)."""
    base = Path(root) / hf_path / (hf_name or "default") / split
    for ext in _EXTS:
        if base.with_suffix(ext).is_file():
            return base.with_suffix(ext)
    return base.with_suffix(".jsonl")


@functools.lru_cache(maxsize=64)
def _read_local(path: str, mtime_ns: int):
    import datasets

    if path.endswith(".parquet"):
        return datasets.Dataset.from_parquet(path)
    with open(path, encoding="utf-8") as f:
        if path.endswith(".json"):
            data = json.load(f)
            rows = data if isinstance(data, list) else data.get("examples", data.get("data"))
        else:
            rows = [json.loads(line) for line in f if line.strip()]
    return datasets.Dataset.from_list(rows)


def _where(ds, where: dict[str, Any] | None):
    if not where:
        return ds
    keys = list(where)
    wanted = tuple(where[k] for k in keys)
    columns = [list(ds[k]) for k in keys]
    return ds.select([i for i, vals in enumerate(zip(*columns)) if tuple(vals) == wanted])


def load(
    hf_path: str,
    hf_name: str | None = None,
    splits: Iterable[str] = ("test",),
    where: dict[str, Any] | None = None,
    telltale_data_dir: str | None = None,
    **_ignored: Any,
):
    """``custom_dataset`` loader of every telltale task.

    ``hf_path``/``hf_name``/``splits`` name the real dataset; ``where`` keeps the rows whose
    fields equal the given values (``{perturbation_type: ...}``, ``{category: ...}``). lm-eval
    calls this as ``load(**metadata, **dataset_kwargs)``, so it also receives every model_arg and
    metadata key; everything it does not know is ignored.
    """
    import datasets

    if isinstance(splits, str):
        splits = [splits]
    root = data_dir(telltale_data_dir)
    out = {}
    for split in splits:
        if root is not None:
            path = local_file(root, hf_path, hf_name, split)
            if not path.is_file():
                raise FileNotFoundError(
                    f"telltale: local data directory {root} is set (telltale_data_dir / TELLTALE_DATA_DIR) "
                    f"but has no {path.relative_to(root).with_suffix('')}{{{','.join(_EXTS)}}} for "
                    f"{hf_path}{'/' + hf_name if hf_name else ''} split {split!r}. "
                    f"`python -m lm_eval_telltale.tasksupport.taskdata mirror {root}` writes it."
                )
            ds = _read_local(str(path), path.stat().st_mtime_ns)
        else:
            ds = datasets.load_dataset(hf_path, hf_name, split=split)
        out[split] = _where(ds, where)
    return datasets.DatasetDict(out)


# --------------------------------------------------------------------------------------------
# prompts (doc_to_text / doc_to_target)
# --------------------------------------------------------------------------------------------

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
NONE_INSTRUCTION = (
    "If the question cannot be answered because necessary information is missing, "
    "put \\boxed{None} instead of a number."
)


def _question(doc: dict) -> str:
    for key in ("question", "Problem", "problem", "input"):
        if key in doc and doc[key] is not None:
            return str(doc[key]).strip()
    raise KeyError(f"no question field in doc with keys {sorted(doc)}")


def doc_to_text_math(doc: dict) -> str:
    """GSM8K-schema, AIME: the problem, then the DeepSeek/Qwen math instruction."""
    return f"{_question(doc)}\n{BOXED_INSTRUCTION}"


def doc_to_text_gsm_plus(doc: dict) -> str:
    """GSM-Plus (every perturbation type alike): the math prompt plus how to say "unanswerable"."""
    return f"{_question(doc)}\n{BOXED_INSTRUCTION} {NONE_INSTRUCTION}"


def doc_to_target_math(doc: dict) -> str:
    from lm_eval_telltale.tasksupport.scoring import math_gold

    g = math_gold(doc)
    return "None" if g is None else g


def doc_to_text_mmlu_pro(doc: dict) -> str:
    from lm_eval_telltale.tasksupport.scoring import LETTERS

    options = [str(o).strip() for o in doc["options"]]
    lines = [str(doc["question"]).strip(), "", "Options:"]
    lines += [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]
    last = LETTERS[len(options) - 1]
    lines += [
        "",
        "Please reason step by step, and put the letter of the correct option "
        f"(one of A-{last}) within \\boxed{{}}.",
    ]
    return "\n".join(lines)


_BBH_HINTS = {
    "mc": "put the letter of the correct option within \\boxed{}.",
    "bool": "put your final answer (True or False) within \\boxed{}.",
    "yesno": "put your final answer (Yes or No) within \\boxed{}.",
    "valid": "put your final answer (valid or invalid) within \\boxed{}.",
    "number": "put your final answer (a number) within \\boxed{}.",
    "words": "put the sorted words, separated by spaces, within \\boxed{}.",
    # a bare "}" inside \boxed{} breaks LaTeX, so Dyck answers go on an "Answer:" line
    "dyck": 'end your response with a line of the form "Answer: <the closing brackets, separated by spaces>".',
}


def _bbh_text(kind: str):
    hint = _BBH_HINTS[kind]

    def doc_to_text(doc: dict) -> str:
        return f"{str(doc['input']).strip()}\n\nPlease reason step by step, and {hint}"

    doc_to_text.__name__ = doc_to_text.__qualname__ = f"doc_to_text_bbh_{kind}"
    return doc_to_text


doc_to_text_bbh_mc = _bbh_text("mc")
doc_to_text_bbh_bool = _bbh_text("bool")
doc_to_text_bbh_yesno = _bbh_text("yesno")
doc_to_text_bbh_valid = _bbh_text("valid")
doc_to_text_bbh_number = _bbh_text("number")
doc_to_text_bbh_words = _bbh_text("words")
doc_to_text_bbh_dyck = _bbh_text("dyck")


# --------------------------------------------------------------------------------------------
# fixtures (tiny synthetic rows in each dataset's exact schema) and mirroring
# --------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _gsm8k_rows() -> list[dict]:
    return [
        {
            "question": "Ann has 3 boxes with 6 apples each. How many apples does she have?",
            "answer": "She has 3 * 6 = <<3*6=18>>18 apples.\n#### 18",
        },
        {
            "question": "A pen costs $2 and a book costs $7. How much do 2 pens and 1 book cost?",
            "answer": "2 pens cost 2 * 2 = <<2*2=4>>4 dollars.\nTogether 4 + 7 = <<4+7=11>>11 dollars.\n#### 11",
        },
        {
            "question": "A farm has 1,200 chickens and sells 250. How many are left?",
            "answer": "1200 - 250 = <<1200-250=950>>950 chickens are left.\n#### 950",
        },
        {
            "question": "Tom reads 12 pages a day. How many days does he need for 60 pages?",
            "answer": "60 / 12 = <<60/12=5>>5 days.\n#### 5",
        },
    ]


def _gsm_plus_rows(n_per_type: int) -> list[dict]:
    seed_q = "Three of the women at the party wear 4 inch heels and three wear 2 inch heels. What is the average heel height?"
    seed_sol = "3 * 4 = <<3*4=12>>12\n3 * 2 = <<3*2=6>>6\n(12 + 6) / 6 = <<18/6=3>>3\n#### 3"
    per_type = {
        "numerical substitution": ("Four women wear 5 inch heels and two wear 3 inch heels. What is the average heel height?", "4 * 5 = 20, 2 * 3 = 6, 26 / 6 = 4.33\n#### 4.33", "4.33"),
        "digit expansion": ("Thirty women wear 40 inch stilts and thirty wear 20 inch stilts. What is the average height?", "(1200 + 600) / 60 = 30\n#### 30", "30"),
        "integer-decimal-fraction conversion": ("Three women wear 4.5 inch heels and three wear 2.5 inch heels. What is the average heel height?", "(13.5 + 7.5) / 6 = 3.5\n#### 3.5", "3.5"),
        "adding operation": ("Three women wear 4 inch heels and three wear 2 inch heels. Each heel loses half an inch. What is the average heel height?", "3 - 0.5 = 2.5\n#### 2.5", "2.5"),
        "reversing operation": ("Some women wear 4 inch heels and three wear 2 inch heels. The average is 3 inches and there are 6 women. What fraction wear 4 inch heels?", "3 of 6 women\n#### 1/2", "1/2"),
        "problem understanding": ("At a party, half of six women have 4-inch heels, the rest 2-inch heels. Find the mean heel height.", "(12 + 6) / 6 = 3\n#### 3", "3"),
        "distraction insertion": ("Three women wear 4 inch heels and three wear 2 inch heels. The party started at 8 pm. What is the average heel height?", "(12 + 6) / 6 = 3\n#### 3", "3"),
        "critical thinking": ("Three women wear 4 inch heels and three wear other-inch heels. What is the average heel height?", "We don't know the height of the other heels. \n#### None", "None"),
    }
    rows = []
    for ptype, (q, sol, ans) in per_type.items():
        for i in range(n_per_type):
            rows.append(
                {
                    "question": q if i == 0 else q.replace("women", "guests"),
                    "solution": sol,
                    "answer": ans,
                    "perturbation_type": ptype,
                    "seed_question": seed_q,
                    "seed_solution": seed_sol,
                    "seed_answer": "3",
                }
            )
    return rows


def _aime_rows() -> list[dict]:
    return [
        {"ID": "2024-I-1", "Problem": "Find the remainder when $7^{10}$ is divided by $1000$.", "Solution": "$7^{10} = 282475249$, so the remainder is $\\boxed{249}$.", "Answer": 249},
        {"ID": "2024-I-2", "Problem": "How many positive divisors does $2^{4}\\cdot 3^{2}$ have?", "Solution": "$(4+1)(2+1) = \\boxed{015}$.", "Answer": 15},
        {"ID": "2024-II-1", "Problem": "Find $a+b$ if $\\frac{a}{b}=\\frac{6}{8}$ in lowest terms.", "Solution": "$\\frac{3}{4}$, so $\\boxed{7}$.", "Answer": 7},
    ]


#: number of options of the BBH multiple-choice subtasks whose count is not in their name
_BBH_N_OPTIONS = {
    "date_understanding": 6,
    "disambiguation_qa": 3,
    "geometric_shapes": 11,
    "hyperbaton": 2,
    "movie_recommendation": 5,
    "penguins_in_a_table": 5,
    "reasoning_about_colored_objects": 18,
    "ruin_names": 4,
    "salient_translation_error_detection": 6,
    "snarks": 2,
    "temporal_sequences": 4,
}


def _bbh_rows(name: str, kind: str, n: int, rng: random.Random) -> list[dict]:
    rows = []
    for i in range(n):
        if kind == "bool":
            a, b = rng.choice([True, False]), rng.choice([True, False])
            rows.append({"input": f"not ( {a} ) and ( {b} ) is", "target": str((not a) and b)})
        elif kind == "yesno":
            gold = rng.choice(["Yes", "No"])
            if name == "sports_understanding":
                rows.append({"input": 'Is the following sentence plausible? "Joao Moutinho caught the screen pass in the NFC championship."', "target": gold.lower()})
            elif name == "web_of_lies":
                rows.append({"input": "Question: Fidel lies. Fletcher says Fidel tells the truth. Does Fletcher tell the truth?", "target": gold})
            else:
                rows.append({"input": f"Question {i}: is this statement supported?\nOptions:\n- Yes\n- No", "target": gold})
        elif kind == "valid":
            rows.append({"input": '"Every F is G. x is F. Therefore x is G."\nIs the argument, given the explicitly stated premises, deductively valid or invalid?\nOptions:\n- valid \n- invalid', "target": rng.choice(["valid", "invalid"])})
        elif kind == "number":
            if name == "multistep_arithmetic_two":
                a, b, c, d = (rng.randint(-9, 9) for _ in range(4))
                rows.append({"input": f"(({a} + {b}) * ({c} - {d})) =", "target": str((a + b) * (c - d))})
            else:
                k = rng.randint(2, 5)
                rows.append({"input": f"I have a piano, a flute, and {k} violins. How many musical instruments do I have?", "target": str(k + 2)})
        elif kind == "words":
            words = rng.sample(["syndrome", "therefrom", "apple", "zebra", "mango", "kiwi", "delta", "omega"], 4)
            rows.append({"input": "Sort the following words alphabetically: List: " + " ".join(words), "target": " ".join(sorted(words))})
        elif kind == "dyck":
            rows.append({"input": "Complete the rest of the sequence, making sure that the parentheses are closed properly. Input: [ { (", "target": ") } ]"})
        else:  # mc
            k = _BBH_N_OPTIONS.get(name, 3 if "three" in name else 5 if "five" in name else 7 if "seven" in name else 5)
            opts = [f"option text {j}" for j in range(k)]
            gold = rng.randrange(k)
            body = "\n".join(f"({chr(65 + j)}) {o}" for j, o in enumerate(opts))
            rows.append({"input": f"Question {i} about {name.replace('_', ' ')}?\nOptions:\n{body}", "target": f"({chr(65 + gold)})"})
    return rows


def _mmlu_pro_rows(n_per_subject: int) -> list[dict]:
    rows = []
    qid = 70
    for cat in MMLU_PRO_SUBJECTS.values():
        for i in range(n_per_subject):
            n_opts = 10 if i == 0 else 4
            options = [f"{cat} choice {j}" for j in range(n_opts)]
            gold = (qid * 7) % n_opts
            rows.append(
                {
                    "question_id": qid,
                    "question": f"Which statement about {cat} is correct (item {i})?",
                    "options": options,
                    "answer": chr(65 + gold),
                    "answer_index": gold,
                    "cot_content": "",
                    "category": cat,
                    "src": f"ori_mmlu-{cat.replace(' ', '_')}",
                }
            )
            qid += 1
    return rows


def write_fixtures(root: str | os.PathLike, n: int = 2) -> Path:
    """Write tiny synthetic copies of every dataset the tasks use under ``root`` in the local
    layout (``n`` rows per subtask). Same field names and value formats as the real data."""
    from lm_eval_telltale.tasksupport.scoring import BBH_KINDS

    root = Path(root)
    rng = random.Random(1234)
    _write_jsonl(local_file(root, "openai/gsm8k", "main", "test"), _gsm8k_rows())
    plus = _gsm_plus_rows(n)
    _write_jsonl(local_file(root, "qintongli/GSM-Plus", None, "test"), plus)
    _write_jsonl(local_file(root, "qintongli/GSM-Plus", None, "testmini"), plus)
    _write_jsonl(local_file(root, "Maxwell-Jia/AIME_2024", None, "train"), _aime_rows())
    for name, kind in BBH_KINDS.items():
        _write_jsonl(local_file(root, "SaylorTwift/bbh", name, "test"), _bbh_rows(name, kind, n, rng))
    _write_jsonl(local_file(root, "TIGER-Lab/MMLU-Pro", None, "test"), _mmlu_pro_rows(n))
    return root


def mirror(root: str | os.PathLike) -> Path:
    """Download every dataset the tasks use and write it under ``root`` in the local layout."""
    import datasets

    root = Path(root)
    for hf_path, hf_name, splits in datasets_used():
        for split in splits:
            ds = datasets.load_dataset(hf_path, hf_name, split=split)
            path = local_file(root, hf_path, hf_name, split)
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.to_json(str(path), lines=True, force_ascii=False)
            print(f"{hf_path} {hf_name or ''} {split}: {len(ds)} rows -> {path}")
    return root


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lm_eval_telltale.tasksupport.taskdata", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("write-fixtures", help="write tiny synthetic datasets (tests) into DIR")
    p.add_argument("dir")
    p.add_argument("-n", type=int, default=2, help="rows per subtask (default 2)")
    p = sub.add_parser("mirror", help="download the real datasets into DIR (local mirror)")
    p.add_argument("dir")
    sub.add_parser("list", help="print the datasets the tasks use")
    args = ap.parse_args(argv)
    if args.cmd == "write-fixtures":
        print(write_fixtures(args.dir, args.n))
    elif args.cmd == "mirror":
        mirror(args.dir)
    else:
        for hf_path, hf_name, splits in datasets_used():
            print(hf_path, hf_name or "-", ",".join(splits))
    return 0


if __name__ == "__main__":
    sys.exit(main())
