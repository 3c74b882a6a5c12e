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
    assert set(spec.MODEL_TYPES) == {f"{e}-{m}" for e in ("vllm", "hf") for m in spec.METHODS}


def test_the_registry_names_each_class_by_its_own_model_type():
    """``spec.MODEL_TYPES`` is the one registry (the classes register nothing themselves): every
    ``module:Class`` it names is the class whose model type is that name."""
    import importlib

    for name, target in spec.MODEL_TYPES.items():
        module, cls_name = target.split(":")
        cls = getattr(importlib.import_module(module), cls_name)
        assert cls._tt_model_type() == name and cls.__name__ == cls_name and cls.__module__ == module


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


def test_one_true_false_reading():
    for v in (True, 1, "1", "true", "TRUE", " yes ", "on"):
        assert spec.parse_bool(v) is True, v
    for v in (False, 0, "0", "false", "No", "off"):
        assert spec.parse_bool(v) is False, v
    for v in (None, "", "maybe", 2, "2", 0.5):
        assert spec.parse_bool(v) is None, v


def test_common_settings_are_declared_once():
    """Every common setting is a field of one frozen declaration; the resolved config's defaults,
    the core's thresholds and ``resolve``'s defaults agree with it."""
    import inspect

    from lm_eval_telltale.config import COMMON_CHECKS, COMMON_KEYS, CommonParams, TelltaleConfig, resolve
    from lm_eval_telltale.core.thresholds import Thresholds

    assert CommonParams.__dataclass_params__.frozen
    assert COMMON_KEYS == {f.name: (f.default, f.metadata["help"]) for f in dataclasses.fields(CommonParams)}
    resolved = {f.name: f.default for f in dataclasses.fields(TelltaleConfig)}
    for k in ("iqr_k", "min_iqr", "tau_floor", "record_tokens", "batch_invariant", "stats_path"):
        assert resolved[k] == COMMON_KEYS[k][0], k
    thr = inspect.signature(Thresholds.__init__).parameters
    assert thr["iqr_k"].default == COMMON_KEYS["iqr_k"][0] and thr["min_iqr"].default == COMMON_KEYS["min_iqr"][0]
    cfg = resolve("norms", {}, 8)
    assert cfg.iqr_k == COMMON_KEYS["iqr_k"][0] and cfg.tau_mode == COMMON_KEYS["tau_mode"][0]
    assert cfg.warmup == resolved["warmup"] == spec.default_warmup("norms", "request")
    for k, check in COMMON_CHECKS.items():
        if COMMON_KEYS[k][0] is not None:
            assert check(COMMON_KEYS[k][0])[0], f"{k}: the default fails its own range check"


def test_readme_settings_tables_show_the_declared_knobs_and_defaults():
    """The README's settings table names every common setting, and its method-knob table every
    method knob as ``name=default`` — both from the one declaration of each."""
    from lm_eval_telltale.config import COMMON_KEYS

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("### Settings (`--model_args`)"):readme.index("### What you get")]
    first_cols = {c.strip("` ") for row in table.splitlines() if row.startswith("| `")
                  for c in row.split("|")[1].split(",")}
    assert set(COMMON_KEYS) <= first_cols, set(COMMON_KEYS) - first_cols
    for k in ("tau_mode", "layers"):
        row = next(r for r in table.splitlines() if r.startswith(f"| `{k}`"))
        assert f"`{COMMON_KEYS[k][0]}`" in row.split("|")[2]
    for method in spec.METHODS:
        for name, (default, _) in method_keys(method).items():
            m = re.search(rf"`{name}=([^`]*)`", table)
            assert m, f"{method}.{name} is not in the README's method-knob table"
            shown = m.group(1).split("\\|")[0]  # the first of `a\|b\|c` is the default
            if default is None:
                assert shown == "", f"{method}.{name}"
            elif isinstance(default, bool):
                assert shown == str(default).lower(), f"{method}.{name}"
            elif isinstance(default, (int, float)):
                assert float(shown) == default, f"{method}.{name}: README {shown}, declared {default}"
            else:
                assert shown == default, f"{method}.{name}: README {shown}, declared {default}"
