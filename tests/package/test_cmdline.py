"""``lm_eval_telltale.cmdline``: the lm_eval command line read as lm-eval's own CLI reads it (its
``nargs="+"`` options included), and the one parser of ``key=value`` argument strings."""

from __future__ import annotations

import argparse
import json

import pytest

from lm_eval_telltale import cmdline


def _lm_eval_reads(flag: str, argv: list[str]) -> dict:
    """What lm-eval 0.4's own argparse action makes of a dict option."""
    from lm_eval._cli.utils import MergeDictAction

    ap = argparse.ArgumentParser()
    ap.add_argument(flag, nargs="+", action=MergeDictAction, default=None)
    ap.add_argument("--tasks", nargs="+")
    ap.add_argument("--apply_chat_template", nargs="?", const=True)
    ns, _ = ap.parse_known_args(argv)
    return getattr(ns, flag.lstrip("-")) or {}


@pytest.mark.parametrize("argv", [
    ["--model_args", "pretrained=m,max_model_len=4096"],
    ["--model_args", "pretrained=m", "max_model_len=4096", "--tasks", "t"],  # nargs="+"
    ["--model_args", "pretrained=m", "--model_args", "dtype=float32"],  # repeated
    ["--model_args", json.dumps({"pretrained": "m", "chat_template_args": {"enable_thinking": False}})],
    ["--model_args", 'pretrained=m,stop=["a,b","c"],seed=1'],  # commas inside brackets/quotes
    ["--model_args=pretrained=m,seed=3"],
])
def test_model_args_have_lm_evals_keys(argv):
    ours = cmdline.model_args(["lm_eval", *argv])
    theirs = _lm_eval_reads("--model_args", argv)
    assert set(ours) == set(theirs) and ours
    assert str(ours["pretrained"]) == "m"


def test_every_value_of_a_multi_value_option_is_read():
    argv = ["lm_eval", "--model", "vllm-lrs", "--gen_kwargs", "temperature=0.6", "top_p=0.95", "--tasks",
            "telltale_gsm8k,telltale_aime24", "telltale_arith", "--output_path", "out", "--apply_chat_template"]
    assert cmdline.gen_kwargs(argv) == {"temperature": "0.6", "top_p": "0.95"}
    assert cmdline.tasks(argv) == ["telltale_gsm8k", "telltale_aime24", "telltale_arith"]
    assert cmdline.output_path(argv) == "out" and cmdline.applies_chat_template(argv)
    assert not cmdline.applies_chat_template(["lm_eval", "--tasks", "t"])
    assert cmdline.option_value("--seed", argv=["x", "--seed", "-1"]) == "-1"  # a negative value is a value
    assert cmdline.gen_kwargs(["lm_eval"]) == {} and cmdline.tasks(["lm_eval"]) == []


@pytest.mark.parametrize("value, expected", [
    (None, {}), ("", {}), ({"a": 1}, {"a": 1}),
    ("pretrained=m,dtype=auto", {"pretrained": "m", "dtype": "auto"}),
    ('{"temperature": 0.6, "do_sample": true}', {"temperature": 0.6, "do_sample": True}),
    ("until=a,b", {"until": "a,b"}),  # a part without '=' belongs to the value before it
    ('stop=["x", "y"],temperature=0', {"stop": '["x", "y"]', "temperature": "0"}),
    (["a=1", "b=2"], {"a": "1", "b": "2"}),
    ("{not json", {}),
])
def test_one_parser_for_argument_strings(value, expected):
    assert cmdline.parse_args_string(value) == expected
