"""The model types' checks of their model_args, made before any engine or model is built: an
existing sidecar is never appended to, an impossible ``stats_path`` names the key, and an unknown
model_arg gets the same error from ``hf-*`` as from ``vllm-*`` (not a ``TypeError`` from
transformers after the config was read). The engine's constructor is replaced by a tripwire."""

from __future__ import annotations

import pytest

from lm_eval_telltale.config import ConfigError


class Reached(Exception):
    """The engine's (or model's) constructor was reached: every check before it passed."""


@pytest.fixture
def tripwire(monkeypatch):
    import inspect

    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.vllm_causallms import VLLM

    for cls in (VLLM, HFLM):
        def stop(self, *a, **kw):
            raise Reached()

        stop.__signature__ = inspect.signature(cls.__init__)  # the checks read lm-eval's signatures
        monkeypatch.setattr(cls, "__init__", stop)


def _types():
    from lm_eval_telltale.harness.hf import HFLrs, HFNorms
    from lm_eval_telltale.harness.lrs import VLLMLrs
    from lm_eval_telltale.harness.models import VLLMNorms

    return {"vllm-norms": VLLMNorms, "vllm-lrs": VLLMLrs, "hf-norms": HFNorms, "hf-lrs": HFLrs}


@pytest.mark.parametrize("mtype", ["vllm-norms", "hf-norms", "vllm-lrs", "hf-lrs"])
def test_stats_path_of_an_earlier_run_is_refused(mtype, tiny_model_dir, tmp_path, tripwire):
    cls = _types()[mtype]
    side = tmp_path / "side.jsonl"
    side.write_text('{"task": "t", "doc_id": 0}\n')
    extra = {"n_candidates": 1} if mtype.endswith("lrs") else {}
    with pytest.raises(ConfigError, match="'stats_path'.*already exists") as e:
        cls(str(tiny_model_dir), layers="4-6", stats_path=str(side), **extra)
    assert "mixed" in str(e.value)
    assert side.read_text() == '{"task": "t", "doc_id": 0}\n'  # the earlier run's rows are untouched
    with pytest.raises(ConfigError, match="'stats_path'.*is a directory"):
        cls(str(tiny_model_dir), layers="4-6", stats_path=str(tmp_path), **extra)
    # a new path passes every check (the tripwire is the engine's constructor)
    with pytest.raises(Reached):
        cls(str(tiny_model_dir), layers="4-6", stats_path=str(tmp_path / "new" / "side.jsonl"), **extra)


@pytest.mark.parametrize("mtype", ["vllm-norms", "hf-norms"])
def test_unwritable_stats_path_names_the_key(mtype, tiny_model_dir, tmp_path, tripwire):
    cls = _types()[mtype]
    (tmp_path / "afile").write_text("x")
    for bad in ("/proc/nope/x.jsonl", str(tmp_path / "afile" / "x.jsonl")):
        with pytest.raises(ConfigError, match="'stats_path'.*cannot create"):
            cls(str(tiny_model_dir), layers="4-6", stats_path=bad)


@pytest.mark.parametrize("mtype", ["vllm-norms", "hf-norms"])
@pytest.mark.parametrize("arg", [{"foo": 1}, {"enforce_eager": True, "device": "cpu"}, {"max_num_seqs": 4}])
def test_unknown_model_arg_same_error_on_every_engine(mtype, arg, tiny_model_dir, tmp_path, tripwire):
    cls = _types()[mtype]
    engine_only = "enforce_eager" in arg or "max_num_seqs" in arg
    if mtype.startswith("vllm") and engine_only:
        with pytest.raises(Reached):  # a vLLM engine argument: fine for vllm-*
            cls(str(tiny_model_dir), layers="4-6", stats_path=str(tmp_path / "s.jsonl"), **arg)
        return
    key = next(k for k in arg if k != "device")
    with pytest.raises(ConfigError, match=rf"'{key}': unknown model_arg for {mtype} \(not a telltale key"):
        cls(str(tiny_model_dir), layers="4-6", stats_path=str(tmp_path / "s.jsonl"), **arg)


def test_hf_takes_from_pretrained_and_config_arguments(tiny_model_dir, tmp_path, tripwire):
    """What transformers takes is not refused: HFLM's own arguments, from_pretrained's keyword
    arguments, and fields of the model's config."""
    from lm_eval_telltale.harness.hf import HFNorms

    with pytest.raises(Reached):
        HFNorms(str(tiny_model_dir), layers="4-6", stats_path=str(tmp_path / "s.jsonl"), device="cpu",
                attn_implementation="eager", low_cpu_mem_usage=True, use_cache=True, rms_norm_eps=1e-5)


def test_every_engine_implements_the_adapter_protocol_with_its_signatures():
    """The engine's side of :class:`TelltaleLM` (``_tt_encode``, ``_tt_until``, ``_tt_unit``): every
    model type overrides each hook with the base's parameters (one signature per hook)."""
    import inspect

    from lm_eval_telltale.harness.common import TelltaleLM

    hooks = ("_tt_encode", "_tt_until", "_tt_unit")
    for mtype, cls in _types().items():
        for h in hooks:
            impl = getattr(cls, h)
            assert impl is not getattr(TelltaleLM, h), f"{mtype} does not implement {h}"
            assert list(inspect.signature(impl).parameters) == list(inspect.signature(getattr(TelltaleLM, h)).parameters), \
                f"{mtype}.{h}{inspect.signature(impl)} differs from the protocol"


def test_one_do_sample_reading_on_both_engines():
    """``do_sample`` is read by ``spec.parse_bool`` on both engines: the early greedy check (vLLM's
    rule) and the hf loop's decoding agree on every spelling."""
    from lm_eval_telltale.harness.common import greedy
    from lm_eval_telltale.harness.hf import Sampling

    for v in (False, "false", "False", 0, "0", "no"):
        assert greedy({"do_sample": v}), v
        assert Sampling.from_kwargs("hf-lrs", {"do_sample": v, "temperature": 0.8}).temperature == 0.0, v
    for v in (True, "true", None):
        assert not greedy({"do_sample": v} if v is not None else {})
        assert Sampling.from_kwargs("hf-lrs", {"do_sample": v, "temperature": 0.8}).temperature == 0.8


def test_online_lrs_settings_that_cannot_work_are_refused_before_the_engine(tiny_model_dir, tmp_path, tripwire):
    from lm_eval_telltale.harness.lrs import VLLMLrs

    base = dict(layers="4-6", stats_path=str(tmp_path / "s.jsonl"), n_candidates=4, stop_signal="norm")
    with pytest.raises(ConfigError, match="'stop_signal'.*data_parallel_size=1"):
        VLLMLrs(str(tiny_model_dir), data_parallel_size=2, **base)
    with pytest.raises(ConfigError, match="'stop_signal'.*pipeline"):
        VLLMLrs(str(tiny_model_dir), pipeline_parallel_size=2, **base)
    with pytest.raises(ConfigError, match="'warmup_candidates'.*below n_candidates"):
        VLLMLrs(str(tiny_model_dir), **{**base, "warmup_candidates": 4})
    with pytest.raises(Reached):  # confidence needs no layer's norm: pipeline stages are fine
        VLLMLrs(str(tiny_model_dir), pipeline_parallel_size=2, **{**base, "stop_signal": "conf"})
