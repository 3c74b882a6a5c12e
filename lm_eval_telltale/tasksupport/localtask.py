"""A tiny self-contained lm-eval task written at run time (tests and the demo before the
trained default model exists): GSM8K-schema rows in a JSONL file and a YAML that points at it
with an absolute path (lm-eval resolves relative ``data_files`` against the CWD)."""

from __future__ import annotations

import json
from pathlib import Path

ROWS = [
    ("Tom has 3 apples and buys 4 more. How many apples does he have?", 7),
    ("A box holds 6 eggs. How many eggs are in 5 boxes?", 30),
    ("Sara had 20 coins and spent 8. How many coins are left?", 12),
    ("There are 9 birds and 7 more arrive. How many birds are there?", 16),
    ("A pen costs 3 dollars. How much do 6 pens cost?", 18),
    ("Ben reads 12 pages a day for 3 days. How many pages does he read?", 36),
    ("A class has 28 students split into 4 equal teams. How big is each team?", 7),
    ("Mia has 15 stickers and gives away 9. How many stickers remain?", 6),
    ("A farmer has 4 rows of 11 plants. How many plants?", 44),
    ("Lee walks 2 km each morning and 3 km each evening. How far per day?", 5),
    ("A bag has 50 marbles; 23 are red. How many are not red?", 27),
    ("Each car has 4 wheels. How many wheels on 9 cars?", 36),
]

YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer.split('#### ')[-1]}}}}"
generation_kwargs:
  until: []
  max_gen_toks: {max_gen_toks}
  do_sample: false
filter_list:
  - name: last-number
    filter:
      - function: regex
        regex_pattern: "(-?[0-9]+)"
        group_select: -1
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
{extra}"""


def write_local_task(directory: str | Path, name: str = "telltale_local", max_gen_toks: int = 24,
                     rows=ROWS, repeats: int = 1) -> Path:
    """The task ``name`` in ``directory``; ``repeats`` > 1 asks lm-eval for that many answers per
    document (lm-eval's ``repeats``)."""
    d = Path(directory).resolve()
    d.mkdir(parents=True, exist_ok=True)
    data = d / f"{name}.jsonl"
    with data.open("w") as f:
        for q, a in rows:
            f.write(json.dumps({"question": q, "answer": f"#### {a}"}) + "\n")
    (d / f"{name}.yaml").write_text(YAML.format(name=name, data=json.dumps(str(data)), max_gen_toks=max_gen_toks,
                                                   extra=f"repeats: {int(repeats)}\n" if repeats > 1 else ""))
    return d
