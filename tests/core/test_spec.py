"""One source for each fact: the shared names in ``lm_eval_telltale.spec`` agree with pyproject's
entry points, the method modules and the documents the code cites."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from lm_eval_telltale import spec
from lm_eval_telltale.core.methods import MODULES, method_checks, method_keys, method_module

REPO = Path(__file__).resolve().parents[2]


def test_pyproject_entry_points_match_the_model_type_table():
    pp = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pp["project"]["entry-points"]["lm_eval.models"] == spec.MODEL_TYPES


def test_every_method_has_a_module_and_a_model_type():
    assert set(MODULES) == set(spec.METHODS)
    assert {spec.method_of_model_type(t) for t in spec.MODEL_TYPES if t.startswith("vllm-")} == set(spec.METHODS)
    assert {spec.method_of_model_type(t) for t in spec.MODEL_TYPES if t.startswith("hf-")} == set(spec.METHODS)
    assert set(spec.MODEL_TYPES) == {f"{e}-{m}" for e in ("vllm", "hf") for m in spec.METHODS}
    assert spec.method_of_model_type("vllm") is None


@pytest.mark.parametrize("method", spec.METHODS)
def test_method_knobs_are_a_frozen_parameter_object(method):
    mod = method_module(method)
    params = [v for v in vars(mod).values() if dataclasses.is_dataclass(v) and v.__name__.endswith("Params")]
    keys = method_keys(method)
    if not keys:  # norms: no knobs
        assert not params
        return
    assert len(params) == 1, f"{method}: one ...Params dataclass beside KEYS"
    cls = params[0]
    assert cls.__dataclass_params__.frozen
    assert keys == {f.name: (f.default, f.metadata["help"]) for f in dataclasses.fields(cls)}
    obj = cls()
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, dataclasses.fields(cls)[0].name, None)
    for name, check in method_checks(method).items():
        ok, _ = check(keys[name][0])
        assert ok, f"{method}.{name}: the default fails its own range check"


def test_majority_rule():
    assert spec.majority_index(["a", "b", "b", "a"]) == 0      # tie → the answer seen first
    assert spec.majority_index([None, "b", "c", "c"]) == 2
    assert spec.majority_index([None, ""]) is None             # everyone abstains


def test_default_warmup():
    assert spec.default_warmup("alrr", "request") == 64
    assert spec.default_warmup("erss", "global") == 200 and spec.default_warmup("suppress", "global") == 500
    assert spec.default_warmup("suppress", "fixed") == 0 == spec.default_warmup("alrr", "calibrated")


def test_every_cited_document_is_in_the_repository():
    """Every ``*.md`` the package, the tasks, the presets or the scripts name is a file of this
    repository (tests are left out: they name files they write)."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    docs = [t for t in tracked if t.endswith(".md")]
    pat = re.compile(r"[A-Za-z0-9_./-]*[A-Za-z0-9_-]{3,}\.md\b")
    missing = []
    for t in tracked:
        if not t.endswith((".py", ".yaml", ".sh")) or "telltale-arith-tiny" in t or t.startswith("tests/"):
            continue
        for cite in pat.findall((REPO / t).read_text(encoding="utf-8", errors="replace")):
            if not any(d == cite or d.endswith("/" + cite.lstrip("./")) for d in docs):
                missing.append(f"{t}: {cite}")
    assert not missing, missing
