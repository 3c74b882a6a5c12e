"""One assembly of a telltale engine's ``LLM(...)`` arguments (:func:`lm_eval_telltale.vllm.assemble_engine_args`)
and its callers: the lm-eval model types, ``telltale profile``/``calibrate`` and ``telltale bench`` hand
the user's explicit engine settings to it, and the user's ``async_scheduling`` / ``enable_prefix_caching``
reach vLLM. No engine is started: ``LLM`` is replaced by a recorder that stops the caller."""

from __future__ import annotations

import json

import pytest

from lm_eval_telltale.config import ConfigError, resolve
from lm_eval_telltale.vllm import USER_MAY_SET, assemble_engine_args, engine_kwargs, inspect_model


class Built(Exception):
    """Raised by the recording ``LLM``: the caller got as far as building the engine."""


@pytest.fixture
def recorder(monkeypatch):
    import vllm

    seen: dict = {}

    def fake_llm(*args, **kw):
        seen.update(kw)
        raise Built()

    monkeypatch.setattr(vllm, "LLM", fake_llm)
    return seen


def _cfg(model_dir, method="erss", **knobs):
    arch, n = inspect_model(str(model_dir))
    return resolve(method, {"layers": "4-6", **knobs}, n), arch


def test_assembly_user_settings_win_where_they_may(tiny_model_dir):
    cfg, arch = _cfg(tiny_model_dir, "alrr", skip_sync=True)  # settings that turn both off (ops' path, unsalted)
    base = engine_kwargs(cfg, arch)
    assert base["async_scheduling"] is False and base["enable_prefix_caching"] is False
    kw = assemble_engine_args(cfg, arch, {"async_scheduling": True, "enable_prefix_caching": True, "seed": 3,
                                          "hf_overrides": json.dumps({"rope_theta": 5.0})}, salted_requests=False)
    assert kw["async_scheduling"] is True and kw["enable_prefix_caching"] is True and kw["seed"] == 3
    assert kw["hf_overrides"]["rope_theta"] == 5.0 and kw["hf_overrides"]["telltale"] == cfg.to_dict()
    assert kw["hf_overrides"]["architectures"] == base["hf_overrides"]["architectures"]
    assert kw["worker_cls"] == base["worker_cls"] and kw["logits_processors"] == base["logits_processors"]
    # the method's own settings cannot be overridden; unset (None) or unnamed keys do not win
    kw = assemble_engine_args(cfg, arch, {"worker_cls": "x.Y", "async_scheduling": None}, salted_requests=False)
    assert kw["worker_cls"] == base["worker_cls"] and kw["async_scheduling"] is False
    kw = assemble_engine_args(cfg, arch, {"async_scheduling": True}, salted_requests=False, explicit=())
    assert kw["async_scheduling"] is False
    assert set(USER_MAY_SET) == {"async_scheduling", "enable_prefix_caching"}
    with pytest.raises(ConfigError, match="'compilation_config'"):
        assemble_engine_args(cfg, arch, {"compilation_config": "{nope"}, salted_requests=False)


def test_lm_eval_model_type_assembles_with_the_users_settings(tiny_model_dir, monkeypatch, tmp_path):
    from lm_eval.models.vllm_causallms import VLLM

    from lm_eval_telltale.harness.models import VLLMAlrr

    seen = {}

    def fake_init(self, pretrained, **kw):
        seen.update(kw)
        raise Built()

    monkeypatch.setattr(VLLM, "__init__", fake_init)
    with pytest.raises(Built):
        VLLMAlrr(str(tiny_model_dir), layers="4-6", async_scheduling=True, enable_prefix_caching=False,
                 stats_path=str(tmp_path / "s.jsonl"))
    assert seen["async_scheduling"] is True and seen["enable_prefix_caching"] is False
    assert seen["hf_overrides"]["telltale"]["method"] == "alrr"
    seen.clear()
    with pytest.raises(Built):
        VLLMAlrr(str(tiny_model_dir), layers="4-6", skip_sync=True, stats_path=str(tmp_path / "t.jsonl"))
    assert seen["async_scheduling"] is False  # the method's setting (ops' path: exact statistics)


def test_profile_assembles_with_the_users_settings(tiny_model_dir, recorder):
    from lm_eval_telltale.tools.profile import _generate_vllm

    cfg, arch = _cfg(tiny_model_dir, "norms")
    used: dict = {}
    with pytest.raises(Built):
        _generate_vllm(str(tiny_model_dir), cfg, arch, None, [], [], [], {"async_scheduling": True,
                       "enable_prefix_caching": False, "max_num_seqs": 4}, 0, False, used)
    assert recorder["async_scheduling"] is True and recorder["enable_prefix_caching"] is False
    assert recorder["max_num_seqs"] == 4 and recorder["hf_overrides"]["telltale"]["method"] == "norms"
    # what profile.json records as the engine's settings
    assert used["async_scheduling"] is True and used["worker_cls"] == recorder["worker_cls"]


def test_bench_cell_assembles_with_the_users_settings(tiny_model_dir, recorder, tmp_path):
    from lm_eval_telltale.tools.bench.cell import worker_main

    arch, n = inspect_model(str(tiny_model_dir))
    spec = {"method": "erss", "engine": {"model": str(tiny_model_dir), "seed": 0, "async_scheduling": True},
            "user_engine_keys": ["async_scheduling"], "tt_args": {"layers": "4-6"}, "num_layers": n, "arch": arch,
            "cpu_kv_bytes": 1 << 25, "n_candidates": 1, "seed": 0}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(Built):
        worker_main([str(tmp_path / "spec.json")])
    assert recorder["async_scheduling"] is True
    # salted requests (the bench salts every request, as the model types do): prefix caching stays vLLM's
    assert recorder["hf_overrides"]["telltale"]["method"] == "erss" and "enable_prefix_caching" not in recorder
