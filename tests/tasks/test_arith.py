"""The embedded default: the synthetic generator, the ``telltale_arith`` task, the training script
and the shipped model files (no engine here; the regression bands are in test_arith_regression.py)."""

from __future__ import annotations

import json
import re

import pytest

from lm_eval_telltale.arith import data, model_dir

MODEL = model_dir()


def test_generator_is_deterministic_and_the_split_is_held_out():
    a, b = data.test_split(), data.test_split()
    assert a == b
    assert len(a) == data.TEST_PER_LEVEL * len(data.LEVELS)
    assert {d["level"] for d in a} == set(data.LEVELS)
    assert len({d["question"] for d in a}) == len(a)  # no duplicates
    assert all(data.is_test_question(d["question"]) for d in a)
    train = data.train_stream(0)
    seen = [next(train) for _ in range(5000)]
    assert not any(data.is_test_question(d["question"]) for d in seen)
    assert not {d["question"] for d in seen} & {d["question"] for d in a}
    # same seed -> same stream, another seed -> another
    s0, s1 = data.train_stream(0), data.train_stream(1)
    assert [next(s0)["question"] for _ in range(20)] == [d["question"] for d in seen[:20]]
    assert [next(s1)["question"] for _ in range(20)] != [d["question"] for d in seen[:20]]


@pytest.mark.parametrize("level", data.LEVELS)
def test_problems_are_consistent(level):
    import random

    rng = random.Random(level)
    for _ in range(300):
        p = data.make_problem(rng, level)
        # the GSM8K schema: worked solution + '#### N'; N is what the story computes
        body, ans = p["answer"].rsplit("\n#### ", 1)
        assert int(ans) == p["result"] and 0 <= p["result"] <= data.MAX_VALUE
        lines = body.split("\n")
        assert len(lines) == level + 1  # the start sentence, then one line per operation
        assert lines[0] in p["question"]
        cur = int(re.search(r"has (\d+)", lines[0]).group(1))
        for line in lines[1:]:
            sent, calc = line.rsplit(". ", 1)
            assert sent + "." in p["question"]
            m = re.fullmatch(r"(\d+) ([-+*]) (\d+) = (\d+)\.", calc)
            assert m, calc
            x, op, y, z = int(m[1]), m[2], int(m[3]), int(m[4])
            assert x == cur and z == {"+": x + y, "-": x - y, "*": x * y}[op]
            cur = z
        assert cur == p["result"]


def test_task_prompt_and_target_formats():
    doc = data.test_split(levels=(2,), per_level=1)[0]
    assert doc["id"] == "L2-000"
    assert data.doc_to_text(doc).endswith(data.INSTRUCTION)
    t = data.target_text(doc)
    assert t.startswith("<think>\n") and "\n</think>\n\nThe answer is \\boxed{" in t
    from lm_eval_telltale.tasksupport.scoring import process_results_math

    # the task's scorer accepts the training target (the shipped model's answer format)
    assert process_results_math(doc, [t])["exact_match"] == 1.0
    assert process_results_math(doc, [t.replace("boxed{", "boxed{1")])["exact_match"] == 0.0


def test_custom_dataset_loader_levels():
    ds = data.load(level=3, per_level=5, version=1.0)["test"]
    assert len(ds) == 5 and set(ds["level"]) == {3}
    assert set(ds.column_names) >= {"question", "answer", "level", "id"}
    all_ = data.load()["test"]
    assert len(all_) == data.TEST_PER_LEVEL * len(data.LEVELS)


def test_task_yamls_are_indexed():
    from lm_eval.tasks import TaskManager

    tm = TaskManager()
    names = set(tm.all_tasks)
    assert {"telltale_arith", *(f"telltale_arith_l{l}" for l in data.LEVELS)} <= names


def test_training_is_deterministic(tmp_path):
    """Two tiny runs with the same seed write identical weights; another seed does not."""
    from safetensors.torch import load_file

    from lm_eval_telltale.arith import train

    kw = dict(steps=3, batch_size=4, lr=1e-3, warmup=1, weight_decay=0.0, minutes=None, eval_every=0, eval_n=4,
              hidden=64, heads=1, kv_heads=1, intermediate=64, layers=2, eval_docs=4)
    r1 = train.train(tmp_path / "a", seed=0, **kw)
    train.train(tmp_path / "b", seed=0, **kw)
    train.train(tmp_path / "c", seed=1, **kw)
    a, b, c = (load_file(tmp_path / x / "model.safetensors") for x in "abc")
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a)
    assert any((a[k] != c[k]).any() for k in a)
    assert r1["steps"] == 3 and (tmp_path / "a" / "train_report.json").is_file()
    # what ships: tokenizer with the chat template, bf16 weights, float32 compute
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["head_dim"] == 64 and cfg["architectures"] == ["Qwen3ForCausalLM"]


def test_shipped_model_files():
    assert (MODEL / "config.json").is_file(), "the trained model is not in the package"
    size = sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file())
    assert size <= 15 * 2**20, size
    cfg = json.loads((MODEL / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["head_dim"] == 64
    card = (MODEL / "MODEL_CARD.md").read_text()
    rep = json.loads((MODEL / "train_report.json").read_text())
    # the card states the measured figures of the report
    assert f"{rep['test']['accuracy'] * 100:.1f}" in card
    assert rep["test"]["accuracy"] >= 0.60
    per = [rep["test"]["per_level"][f"L{l}"] for l in data.LEVELS]
    assert per[0] > per[-1], per  # a difficulty gradient
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL)
    doc = data.test_split(levels=(1,), per_level=1)[0]
    text = data.chat_prompt(doc, tok) + data.target_text(doc)
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    assert tok.eos_token == "<|im_end|>"


def test_shipped_preset_resolves():
    from lm_eval_telltale.config import load_preset, resolve

    p = load_preset("telltale-arith")
    assert p["num_layers"] == json.loads((MODEL / "config.json").read_text())["num_hidden_layers"]
    e = resolve("erss", {}, 8, preset=p)
    a = resolve("alrr", {}, 8, preset=p)
    assert e.params["low_k"] == 4 and e.warmup == 8 and e.layers == [4, 5, 6]
    assert a.warmup == 8 and "low_k" not in a.params  # other methods' blocks do not leak
    assert resolve("erss", {"low_k": 7}, 8, preset=p).params["low_k"] == 7  # explicit args win
