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
        assert p["num_layers"] == n and p["layers"] == layers and p["think_end_token"] == "</think>"
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


@pytest.mark.parametrize("extra,key", [
    ({"layers": "99"}, "layers"),
    ({"tau_mode": "fixed", "tau": "{bad json"}, "tau"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"config": "no-such-preset"}, "config"),
    ({"enforce_eager": False}, "enforce_eager"),
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
