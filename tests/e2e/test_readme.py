"""The README's command lines parse: every ``lm_eval`` / ``python -m lm_eval_telltale`` line through
lm-eval's own argument parser (the console script's ``HarnessCLI``) and our ``--model_args``
validation (:func:`config.resolve`, the layer count from the preset), every ``telltale`` line
through its subcommand's parser. Nothing runs: no engine, no evaluation."""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path
from unittest import mock

import pytest

from lm_eval_telltale.config import PRESET_PASSTHROUGH, ConfigError, all_keys, load_preset, resolve

README = Path(__file__).resolve().parents[2] / "README.md"
SHELL_LANGS = {"", "sh", "bash", "shell", "console"}


def fenced_commands(md: str) -> list[list[str]]:
    """Commands (shell tokens) of the fenced shell blocks that start with lm_eval, telltale or
    ``python -m lm_eval_telltale``; backslash continuations joined, comments dropped."""
    out = []
    for lang, body in re.findall(r"^```([\w-]*)[ \t]*\n(.*?)^```", md, flags=re.M | re.S):
        if lang.lower() not in SHELL_LANGS:
            continue
        for line in re.sub(r"\\\n", " ", body).splitlines():
            line = line.strip().removeprefix("$ ")
            if re.match(r"(lm_eval|lm-eval|telltale|python -m lm_eval_telltale)(\s|$)", line):
                out.append(shlex.split(line, comments=True))
    return out


class _Parsed(Exception):
    def __init__(self, ns: argparse.Namespace):
        super().__init__("parsed")
        self.ns = ns


def parse_lm_eval(argv: list[str]) -> argparse.Namespace:
    """lm-eval's own CLI parser on ``argv`` (without the program name); raises on a rejected line."""
    from lm_eval._cli import HarnessCLI

    with mock.patch.object(sys, "argv", ["lm_eval", *argv]):
        return HarnessCLI().parse_args()


def parse_telltale(argv: list[str]) -> argparse.Namespace | None:
    """The ``telltale`` subcommand's argparse result; the command itself never runs."""
    from lm_eval_telltale.cli import COMMANDS, main

    assert argv and argv[0] in COMMANDS, f"unknown telltale command {argv[:1]}"
    orig = argparse.ArgumentParser.parse_args

    def stop_after_parsing(self, args=None, namespace=None):
        raise _Parsed(orig(self, args, namespace))

    with mock.patch.object(argparse.ArgumentParser, "parse_args", stop_after_parsing):
        try:
            main(argv)
        except _Parsed as p:
            return p.ns
    assert argv[0] == "tasks-path", f"telltale {argv[0]} ran without parsing arguments"
    return None


def check_model_args(model: str, model_args: dict):
    """Our model types' validation of ``--model_args`` (what their constructor does before any engine)."""
    if not (model or "").startswith("vllm-"):
        return None
    method = model[len("vllm-"):]
    tt = {k: v for k, v in model_args.items() if k in all_keys(method)}
    rest = sorted(set(model_args) - set(tt) - set(PRESET_PASSTHROUGH))
    if rest:  # the others must be lm-eval VLLM or vLLM engine arguments (imports vLLM, builds nothing)
        import dataclasses
        import inspect

        from lm_eval.models.vllm_causallms import VLLM
        from vllm.engine.arg_utils import EngineArgs

        known = set(inspect.signature(VLLM.__init__).parameters) | {f.name for f in dataclasses.fields(EngineArgs)}
        unknown = [k for k in rest if k not in known | {"device", "batch_size", "max_batch_size"}]
        if unknown:
            raise ConfigError(unknown[0], f"unknown model_arg for {model}: not a telltale key, nor an lm-eval/vLLM "
                                          "engine argument")
    preset = load_preset(str(tt.pop("config"))) if tt.get("config") is not None else None
    assert preset and preset.get("num_layers"), f"{model_args}: give config= so the layer count is known"
    if preset.get("model") and model_args.get("pretrained"):
        assert model_args["pretrained"] == preset["model"], (model_args, preset["_path"])
    return resolve(method, tt, int(preset["num_layers"]), preset=preset)


def check_command(toks: list[str]):
    if toks[0] == "telltale":
        return parse_telltale(toks[1:])
    argv = toks[3:] if toks[0] == "python" else toks[1:]
    from lm_eval_telltale.cli import COMMANDS

    if toks[0] == "python" and argv and argv[0] in COMMANDS:
        return parse_telltale(argv)
    ns = parse_lm_eval(argv)
    return check_model_args(ns.model, ns.model_args or {})


def test_readme_command_lines_parse():
    cmds = fenced_commands(README.read_text(encoding="utf-8"))
    assert any(c[0] == "lm_eval" for c in cmds), "the README shows no lm_eval command line"
    for toks in cmds:
        check_command(toks)


def _tau_row() -> str:
    rows = [l for l in README.read_text(encoding="utf-8").splitlines() if l.startswith("| `tau` |")]
    assert len(rows) == 1
    return rows[0]


def test_readme_tau_row_shows_a_form_lm_eval_accepts():
    spans = re.findall(r"`(--model_args [^`]+)`", _tau_row())
    assert spans, "the tau row shows no --model_args example with per-layer τ"
    for span in spans:
        ns = parse_lm_eval(["--model", "vllm-norms", "--tasks", "telltale_gsm8k", *shlex.split(span)])
        cfg = check_model_args(ns.model, ns.model_args)
        tau = ns.model_args["tau"]
        assert isinstance(tau, dict) and cfg.tau_mode == "fixed"
        assert cfg.tau_values == [float(tau[str(l)]) for l in cfg.layers]


def test_readme_tau_file_form(tmp_path):
    """``tau=taus.json`` (the row's other per-layer form) with the mapping of the row's inline example."""
    span = re.findall(r"`(--model_args [^`]+)`", _tau_row())[0]
    inline = parse_lm_eval(["--model", "vllm-norms", "--tasks", "t", *shlex.split(span)]).model_args
    f = tmp_path / "taus.json"
    f.write_text(__import__("json").dumps(inline["tau"]))
    margs = ",".join(f"{k}={f if k == 'tau' else v}" for k, v in inline.items())
    ns = parse_lm_eval(["--model", "vllm-norms", "--tasks", "t", "--model_args", margs])
    assert check_model_args(ns.model, ns.model_args).tau_values == [float(v) for v in inline["tau"].values()]


def test_lm_eval_rejects_inline_json_inside_key_value_model_args():
    """The README's reason for the JSON-object form: lm-eval reads a first --model_args token that
    contains '{' as JSON (this test notices when a newer lm-eval changes that)."""
    for argv in (['pretrained=x,tau_mode=fixed,tau={"21": 310.5}'], ['tau={"21": 310.5}', "pretrained=x"]):
        with pytest.raises((ValueError, SystemExit)):
            parse_lm_eval(["--model", "vllm-norms", "--tasks", "t", "--model_args", *argv])


def test_the_checker_catches_bad_lines():
    md = ("```\nlm_eval --model vllm-alrr \\\n  --model_args pretrained=Qwen/Qwen3-1.7B,config=qwen3-1.7b,blowup=2.0 \\\n"
          "  --tasks telltale_gsm8k --batch_size auto   # a comment\n"
          "telltale calibrate --model M --tasks T --out F.yaml --tau-q 0.95\n"
          "python -m lm_eval_telltale view runs/x --out page.html\nmake eval\n```\n"
          "```python\nlm_eval = 1\n```\n")
    cmds = fenced_commands(md)
    assert [c[:2] for c in cmds] == [["lm_eval", "--model"], ["telltale", "calibrate"], ["python", "-m"]]
    assert check_command(cmds[0]).params["blowup"] == 2.0
    assert check_command(cmds[1]).tau_q == 0.95
    assert check_command(cmds[2]).out == "page.html"
    with pytest.raises(ConfigError):  # a knob of another method
        check_command(["lm_eval", "--model", "vllm-norms", "--model_args", "config=qwen3-1.7b,blowup=2", "--tasks", "t"])
    with pytest.raises(SystemExit):  # an unknown flag
        check_command(["telltale", "calibrate", "--model", "M", "--tasks", "T", "--out", "F", "--bogus"])
    with pytest.raises(SystemExit):
        check_command(["lm_eval", "--model", "vllm-norms", "--frobnicate"])


def test_readme_python_snippet_names_exist():
    """The README's Python example: its imports resolve, the configuration it resolves is valid, and
    the calls it makes have the signatures it uses (no engine: that path is the engine tests')."""
    import ast
    import inspect

    blocks = re.findall(r"^```python[ \t]*\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.M | re.S)
    snippet = next(b for b in blocks if "engine_kwargs" in b)
    tree = ast.parse(snippet)
    ns: dict = {}
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)) and not (
                isinstance(node, ast.ImportFrom) and node.module == "vllm"):
            exec(compile(ast.Module([node], []), "README", "exec"), ns)
    assert {"resolve", "engine_kwargs", "inspect_model", "collect"} <= set(ns)
    calls = {n.func.id: n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    for name in ("resolve", "engine_kwargs", "collect"):
        call = calls[name]
        inspect.signature(ns[name]).bind(*[None] * len(call.args), **{k.arg: None for k in call.keywords})
    cfg = ns["resolve"]("alrr", {"layers": "auto"}, 28)
    assert cfg.layers == list(range(21, 27))
