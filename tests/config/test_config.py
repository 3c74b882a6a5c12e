"""Settings: parsing, presets, and fail-fast validation before any engine starts."""

from __future__ import annotations

import json
import time

import pytest
import yaml

from lm_eval_telltale.config import ConfigError, default_layers, load_preset, parse_layers, resolve


def test_default_layer_rule():
    assert default_layers(28) == list(range(21, 27))  # Qwen3-1.7B
    assert default_layers(32) == list(range(24, 31))  # Llama-3.1-8B
    assert default_layers(8) == [6]


@pytest.mark.parametrize("value,expected", [
    ("auto", [6]), ("4-6", [4, 5, 6]), ("2;4;6", [2, 4, 6]), ("5", [5]), (5, [5]), ([6, 2], [2, 6]),
])
def test_parse_layers(value, expected):
    assert parse_layers(value, 8) == expected


@pytest.mark.parametrize("value", ["9", "3-12", "a-b", "-1", "4;4", []])
def test_parse_layers_errors_name_the_key(value):
    with pytest.raises(ConfigError) as e:
        parse_layers(value, 8)
    assert e.value.key == "layers"


def test_resolve_modes(tmp_path):
    cfg = resolve("norms", {"layers": "4-6"}, 8)
    assert cfg.tau_mode == "request" and cfg.warmup == 64 and cfg.layers == [4, 5, 6]
    assert resolve("norms", {"tau_mode": "global"}, 8).warmup == 500
    cfg = resolve("norms", {"layers": "4-5", "tau_mode": "fixed", "tau": '{"4": 3.5, "5": 4}'}, 8)
    assert cfg.tau_values == [3.5, 4.0]
    assert resolve("norms", {"layers": "4-5", "tau_mode": "fixed", "tau": 7}, 8).tau_values == [7.0, 7.0]
    f = tmp_path / "cal.yaml"
    f.write_text(yaml.safe_dump({"calibration": {"quantiles": {4: {"p50": 1.0, "p90": 2.0}, 5: {"p50": 3.0, "p90": 4.0}}}}))
    cfg = resolve("norms", {"layers": "4-5", "tau_mode": "calibrated", "tau_file": str(f), "tau_q": 0.9}, 8)
    assert cfg.tau_values == [2.0, 4.0]


@pytest.mark.parametrize("args,key", [
    ({"tau_mode": "fixed", "tau": "[1, 2"}, "tau"),             # malformed JSON
    ({"tau_mode": "fixed", "tau": "{'4': 1}"}, "tau"),          # single quotes
    ({"tau_mode": "fixed"}, "tau"),                             # missing
    ({"layers": "4-5", "tau_mode": "fixed", "tau": "[1]"}, "tau"),
    ({"tau_mode": "sometimes"}, "tau_mode"),
    ({"tau_mode": "calibrated"}, "tau_file"),
    ({"warmup": -3}, "warmup"),
    ({"iqr_k": "abc"}, "iqr_k"),
    ({"blowup": 2}, "blowup"),                                  # another method's knob
    ({"record_tokens": "maybe"}, "record_tokens"),
])
def test_resolve_errors_name_the_key(args, key):
    with pytest.raises(ConfigError) as e:
        resolve("norms", args, 8)
    assert e.value.key == key and repr(key) in str(e.value)


def test_calibration_missing_layer(tmp_path):
    f = tmp_path / "cal.json"
    f.write_text(json.dumps({"quantiles": {"4": {"0.9": 2.0}}}))
    with pytest.raises(ConfigError) as e:
        resolve("norms", {"layers": "4-5", "tau_mode": "calibrated", "tau_file": str(f), "tau_q": 0.9}, 8)
    assert e.value.key == "tau_file" and "layer 5" in str(e.value)


def test_presets_ship_for_the_paper_models():
    for name, n, layers in [("qwen3-1.7b", 28, "21-26"), ("qwen3-8b", 36, "27-34"), ("qwen3-32b", 64, "48-62"),
                            ("deepseek-r1-distill-llama-8b", 32, "24-30"), ("deepseek-r1-distill-qwen-7b", 28, "21-26")]:
        p = load_preset(name)
        assert p["num_layers"] == n and p["layers"] == layers
        # R1 templates open <think> in the prompt: without think_end_token the scorer sees the raw text
        # and counts an answer that never closes it as truncated; Qwen3's template does not open it
        assert p.get("think_end_token") == (None if name.startswith("deepseek-r1") else "</think>")
        assert parse_layers(p["layers"], n) == default_layers(n)
        assert p["sampling"]["temperature"] == 0.6
    with pytest.raises(ConfigError) as e:
        load_preset("qwen9-1b")
    assert e.value.key == "config" and "qwen3-8b" in str(e.value)


def test_explicit_args_win_over_preset(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("num_layers: 8\nlayers: 4-6\ntelltale:\n  iqr_k: 2.0\n  warmup: 10\n")
    cfg = resolve("norms", {"warmup": 3}, 8, preset=load_preset(str(f)))
    assert cfg.layers == [4, 5, 6] and cfg.iqr_k == 2.0 and cfg.warmup == 3
    with pytest.raises(ConfigError, match="is for a 8-layer model, this model has 12"):  # every caller: one check
        resolve("norms", {}, 12, preset=load_preset(str(f)))


@pytest.mark.parametrize("extra,key", [
    ({"layers": "99"}, "layers"),
    ({"tau_mode": "fixed", "tau": "{bad json"}, "tau"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"config": "no-such-preset"}, "config"),
    ({"speculative_config": {"method": "ngram"}}, "speculative_config"),  # (compiled mode is fine: not here)
])
def test_model_type_fails_fast_without_engine(tiny_model_dir, extra, key):
    from lm_eval_telltale.harness.models import VLLMNorms

    t = time.time()
    with pytest.raises(ConfigError) as e:
        VLLMNorms(pretrained=str(tiny_model_dir), **extra)
    assert e.value.key == key
    assert time.time() - t < 10


def test_unsupported_architecture_names_supported(tmp_path):
    from lm_eval_telltale.harness.models import VLLMNorms
    from lm_eval_telltale.vllm import UnsupportedModelError

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_layer": 2}))
    with pytest.raises(UnsupportedModelError) as e:
        VLLMNorms(pretrained=str(tmp_path))
    assert "Qwen3ForCausalLM" in str(e.value) and "LlamaForCausalLM" in str(e.value)


# -- issue 14 item 6: settings that were silently ignored ------------------------------------------

def _calib_file(tmp_path, quantiles=None):
    f = tmp_path / "cal.yaml"
    f.write_text(yaml.safe_dump({"calibration": {"quantiles": quantiles or {4: {"p50": 1.0, "p90": 2.0},
                                                                              5: {"p50": 3.0, "p90": 4.0}}}}))
    return f


def test_tau_file_alone_implies_calibrated(tmp_path):
    f = _calib_file(tmp_path)
    cfg = resolve("norms", {"layers": "4-5", "tau_file": str(f)}, 8)
    assert cfg.tau_mode == "calibrated" and cfg.tau_values == [2.0, 4.0] and cfg.tau_q == 0.9
    assert resolve("norms", {"layers": "4-5", "tau_file": str(f), "tau_q": 0.5}, 8).tau_values == [1.0, 3.0]


@pytest.mark.parametrize("args,key", [
    ({"tau_mode": "request", "tau_file": "CAL"}, "tau_file"),
    ({"tau_mode": "global", "tau_file": "CAL", "tau_q": 0.5}, "tau_file"),
    ({"tau_mode": "fixed", "tau": 3, "tau_file": "CAL"}, "tau_file"),
    ({"tau_q": 0.5}, "tau_q"),                                   # request mode by default
    ({"tau_mode": "fixed", "tau": 3, "tau_q": 0.5}, "tau_q"),
    ({"tau_file": "CAL", "tau": 3}, "tau"),                      # tau_file implies calibrated: tau is not used
    ({"tau": 3}, "tau"),
])
def test_tau_settings_of_another_mode_are_errors(tmp_path, args, key):
    f = _calib_file(tmp_path)
    args = {k: (str(f) if v == "CAL" else v) for k, v in {"layers": "4-5", **args}.items()}
    with pytest.raises(ConfigError) as e:
        resolve("norms", args, 8)
    assert e.value.key == key and "given but tau_mode=" in str(e.value)


def test_preset_tau_settings_yield_to_an_explicit_mode(tmp_path):
    """A calibration file used as a preset carries tau_mode/tau_q; tau_mode= in model_args overrides both."""
    f = tmp_path / "cal.yaml"
    f.write_text(yaml.safe_dump({"num_layers": 8, "telltale": {"tau_mode": "calibrated", "tau_q": 0.9},
                                 "calibration": {"quantiles": {6: {"p90": 2.0}}}}))
    assert resolve("norms", {}, 8, preset=load_preset(str(f))).tau_values == [2.0]
    cfg = resolve("norms", {"tau_mode": "request"}, 8, preset=load_preset(str(f)))
    assert cfg.tau_mode == "request" and cfg.tau_q is None and cfg.tau_values is None


@pytest.mark.parametrize("tau,msg", [
    ('{"4": 1, "5": 2, "40": 3}', "layer 40 does not exist: the model has 8 layers"),
    ('{"4": 1, "5": 2, "-1": 3}', "layer -1 does not exist"),
    ('{"4": 1, "5": 2, "6": 3}', "layer 6 is not patched (patched: [4, 5]); remove it or add it to layers="),
    ('{"4": 1, "5": -2}', "τ for layer 5 must be > 0"),
    ('{"4": 1, "5": 0}', "τ for layer 5 must be > 0"),
    ("[1, -2]", "τ for layer 5 must be > 0"),
    ("-3", "must be > 0"),
    (0, "must be > 0"),
    ("nan", "not finite"),
    ('{"4": 1, "5": "inf"}', "not finite"),
])
def test_fixed_tau_unknown_layers_and_non_positive_values(tau, msg):
    with pytest.raises(ConfigError) as e:
        resolve("norms", {"layers": "4-5", "tau_mode": "fixed", "tau": tau}, 8)
    assert e.value.key == "tau" and msg in str(e.value)


def test_fixed_tau_file_checked_like_inline(tmp_path):
    f = tmp_path / "taus.yaml"
    f.write_text("4: 1.5\n5: 2.5\n6: 3.5\n")
    with pytest.raises(ConfigError, match="layer 6 is not patched") as e:
        resolve("norms", {"layers": "4-5", "tau_mode": "fixed", "tau": str(f)}, 8)
    assert e.value.key == "tau"
    assert resolve("norms", {"layers": "4-6", "tau_mode": "fixed", "tau": str(f)}, 8).tau_values == [1.5, 2.5, 3.5]
    f.write_text("4: 1.5\n5: -2.5\n")
    with pytest.raises(ConfigError, match="layer 5 must be > 0"):
        resolve("norms", {"layers": "4-5", "tau_mode": "fixed", "tau": str(f)}, 8)


@pytest.mark.parametrize("value", [-1.0, 0.0, float("nan"), "x"])
def test_calibrated_tau_must_be_positive(tmp_path, value):
    f = _calib_file(tmp_path, {4: {"p90": 2.0}, 5: {"p90": value}})
    with pytest.raises(ConfigError) as e:
        resolve("norms", {"layers": "4-5", "tau_file": str(f)}, 8)
    assert e.value.key == "tau_file" and "layer 5" in str(e.value) and str(f) in str(e.value)


def test_calibration_with_numeric_quantile_keys(tmp_path):
    f = _calib_file(tmp_path, {4: {0.9: 2.0}, 5: {0.9: 4.0}})  # YAML float keys, not "p90"
    assert resolve("norms", {"layers": "4-5", "tau_file": str(f)}, 8).tau_values == [2.0, 4.0]


@pytest.mark.parametrize("value", [-1, "-0.5", "abc", "nan"])
def test_tau_floor_checked(value):
    with pytest.raises(ConfigError) as e:
        resolve("norms", {"tau_floor": value}, 8)
    assert e.value.key == "tau_floor"
    assert resolve("norms", {"tau_floor": "2.5"}, 8).tau_floor == 2.5


# -- issue 14 item 8: errors that name the path / value and what to do ----------------------------

def test_empty_layer_range_says_so():
    with pytest.raises(ConfigError) as e:
        parse_layers("5-2", 8)
    assert e.value.key == "layers" and "empty range 5-2: the first layer must not exceed the last" in str(e.value)
    assert parse_layers("2-5", 8) == [2, 3, 4, 5]
    with pytest.raises(ConfigError, match="cannot parse"):
        parse_layers("2-x", 8)


@pytest.mark.parametrize("pretrained", ["/nonexistent", "/nonexistent/model", "./no-such-model", "a/b/c", "~/no-such-dir-xyz"])
def test_inspect_model_missing_local_path(pretrained):
    from lm_eval_telltale.vllm import UnsupportedModelError, inspect_model

    with pytest.raises(UnsupportedModelError) as e:
        inspect_model(pretrained)
    msg = str(e.value)
    assert f"pretrained={pretrained!r}" in msg and "no such directory" in msg
    assert "alphanumeric" not in msg and "Repo id" not in msg


def test_inspect_model_hub_id_offline_says_what_was_tried(monkeypatch):
    from lm_eval_telltale.vllm import UnsupportedModelError, inspect_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UnsupportedModelError) as e:
        inspect_model("no-such-org/no-such-model-xyz")
    msg = str(e.value)
    assert "pretrained='no-such-org/no-such-model-xyz'" in msg and "not a local directory" in msg
    assert "Hugging Face cache" in msg


def test_inspect_model_malformed_config_json(tmp_path):
    from lm_eval_telltale.vllm import UnsupportedModelError, inspect_model

    (tmp_path / "config.json").write_text('{\n  "architectures": ["Qwen3ForCausalLM"],\n  "num_hidden_layers": 8,,\n}')
    with pytest.raises(UnsupportedModelError) as e:
        inspect_model(str(tmp_path))
    assert str(tmp_path / "config.json") in str(e.value) and "line 3 column" in str(e.value)
    (tmp_path / "config.json").unlink()
    with pytest.raises(UnsupportedModelError, match="has no config.json"):
        inspect_model(str(tmp_path))
    (tmp_path / "f").write_text("x")
    with pytest.raises(UnsupportedModelError, match="is a file, not a model directory"):
        inspect_model(str(tmp_path / "f"))


def test_inspect_model_reads_a_local_directory(tiny_model_dir):
    from lm_eval_telltale.vllm import inspect_model

    assert inspect_model(str(tiny_model_dir)) == ("Qwen3ForCausalLM", 8)
