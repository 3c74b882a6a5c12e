"""The transformers adapter on its own (no vLLM): left padding, what reaches the core, ALRR's KV
replay (with a control that sees the re-run's writes), sampling, stop strings, and the hf-*
model types' fail-fast settings."""

from __future__ import annotations

import contextlib
import time

import numpy as np
import pytest
import torch

from lm_eval_telltale.config import ConfigError, resolve

pytestmark = pytest.mark.engine

LAYERS = "4-6"


@pytest.fixture(scope="module")
def qwen3(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(tiny_model_dir))


def _rt(qwen3, method="norms", **knobs):
    from lm_eval_telltale.hf.runtime import HFRuntime

    model, tok = qwen3
    return HFRuntime(model, resolve(method, {"layers": LAYERS, "record_tokens": True, **knobs}, 8, seed=0),
                     tokenizer=tok)


def _prompts(lengths=(3, 17, 9, 30)):
    return [[(11 + 7 * i + 3 * j) % 250 + 1 for j in range(n)] for i, n in enumerate(lengths)]


def _gen(rt, prompts, budget=20, **kw):
    from lm_eval_telltale.hf.runtime import GenRequest

    return rt.generate([GenRequest(p, budget, tag=f"r{i}", **kw) for i, p in enumerate(prompts)])


def _count(res, name):
    return sum(st.get(name, 0) for r in res for st in r.stats["layers"].values())


@pytest.mark.parametrize("method,knobs", [("norms", {}), ("alrr", {"warmup": 4, "growth_eps": 0.0})])
def test_a_requests_trace_alone_equals_its_trace_in_a_padded_batch(qwen3, method, knobs):
    rt = _rt(qwen3, method, **knobs)
    prompts = _prompts()
    batch = _gen(rt, prompts)
    if method != "norms":
        assert _count(batch, "accepted") > 0
    for i, p in enumerate(prompts):
        solo = _gen(rt, [p])[0]
        b = batch[i]
        assert solo.token_ids == b.token_ids
        ts, tb = solo.stats["tokens"], b.stats["tokens"]
        assert ts["position"] == tb["position"] == list(range(len(p), len(p) + 19))
        assert ts["event"] == tb["event"]  # the same decisions
        # padding changes only the summation order of masked attention: float noise, no more
        np.testing.assert_allclose(np.array(ts["norm"]), np.array(tb["norm"]), rtol=1e-5)
        np.testing.assert_allclose(np.array(ts["tau"], dtype=float), np.array(tb["tau"], dtype=float), rtol=1e-5)


def test_padding_and_prompt_tokens_never_reach_a_decision(qwen3):
    """Every step's tokens are real tokens (no padding slot), prompt tokens are never ``decode``,
    and a method that suppresses every generated token (τ below every norm) still leaves each
    request's first token — sampled from the prompt's forward alone — as without it."""
    prompts = _prompts()
    steps = []
    rt = _rt(qwen3, "suppress", tau_mode="fixed", tau=1e-3)
    start = rt.core.start

    def spy(*args):
        step = start(*args)
        steps.append((step.slot.clone(), step.position.clone(), step.decode.clone()))
        return step

    rt.core.start = spy
    res = _gen(rt, prompts)
    slot0, pos0, dec0 = steps[0]  # the prefill: exactly the prompts' tokens, none generated
    assert slot0.numel() == sum(map(len, prompts)) and (slot0 >= 0).all() and not dec0.any()
    assert sorted(pos0.tolist()) == sorted(k for p in prompts for k in range(len(p)))
    plen = {int(s): int((slot0 == s).sum()) for s in slot0.unique()}  # slot -> its prompt's length
    for i, (slot, pos, dec) in enumerate(steps[1:]):  # decode steps: one generated token per request
        assert dec.all() and len(set(slot.tolist())) == slot.numel() == len(prompts)
        assert pos.tolist() == [plen[int(s)] + i for s in slot]  # fed token i sits at prompt length + i
    for r in res:
        assert r.stats["n_decode_tokens"] == len(r.token_ids) - 1 == 19
        assert all(st["suppressed"] == st["count"] == 19 for st in r.stats["layers"].values())
    plain = _gen(_rt(qwen3), prompts)
    assert [r.token_ids[0] for r in res] == [r.token_ids[0] for r in plain]  # prompts were not steered
    assert [r.token_ids for r in res] != [r.token_ids for r in plain]      # generated tokens were


def test_norms_outputs_equal_transformers_generate(qwen3):
    """hf-norms observes only: its greedy tokens are those of transformers' own generate on the
    same left-padded batch."""
    model, tok = qwen3
    prompts = _prompts()
    res = _gen(_rt(qwen3), prompts, budget=16)
    T = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    assert [r.token_ids for r in res] == out[:, T:].tolist()


def _kv(cache, idx):
    layer = cache.layers[idx]
    return layer.keys.clone(), layer.values.clone()


@pytest.mark.parametrize("guard", [True, False])
def test_alrr_rerun_leaves_the_kv_cache_as_pass0_wrote_it(qwen3, monkeypatch, guard):
    import lm_eval_telltale.hf.runtime as runtime

    real = runtime.kv_replay
    checks, reads = [], []

    @contextlib.contextmanager
    def snapshot(cache, idx):
        before = _kv(cache, idx)
        seen = cache._seen[idx]
        with (real(cache, idx) if guard else contextlib.nullcontext()):
            upd = cache.update

            def spy(k, v, layer_idx, *a, **kw):
                out = upd(k, v, layer_idx, *a, **kw)
                if layer_idx == idx:  # what the re-run's attention reads
                    reads.append(out[0] is seen[0] and out[1] is seen[1])
                return out

            cache.update = spy
            try:
                yield
            except RuntimeError:
                # the control: the re-run appended its K/V, so its own attention no longer matches the
                # mask (transformers' cache grows where vLLM's would be overwritten); seen, then dropped
                if guard:
                    raise
            finally:
                del cache.update
        after = _kv(cache, idx)
        checks.append(after[0].shape == before[0].shape and all(torch.equal(a, b) for a, b in zip(after, before)))
        if not guard:  # the control wrote into the cache: put pass 0's entry back so generation goes on
            cache.layers[idx].keys, cache.layers[idx].values = before

    monkeypatch.setattr(runtime, "kv_replay", snapshot)
    res = _gen(_rt(qwen3, "alrr", warmup=4, growth_eps=0.0), _prompts())
    assert checks and _count(res, "accepted") > 0
    if guard:
        assert all(checks)  # the re-run wrote nothing: the cache is the pass-0 cache
        assert all(reads)   # and its query attended to pass 0's keys/values, its own token's included
        plain = _gen(_rt(qwen3), _prompts())
        assert [r.token_ids for r in res] != [r.token_ids for r in plain]  # accepted re-runs changed outputs
    else:
        assert not any(checks) and not any(reads)  # control: without the guard the snapshot sees writes


def test_lrs_confidence_and_seeded_sampling(qwen3):
    rt = _rt(qwen3, "lrs", warmup=4)
    prompts = _prompts()[:2]
    a = _gen(rt, prompts, temperature=0.9, top_p=0.95, top_k=50, sampling_seed=7)
    b = _gen(rt, prompts, temperature=0.9, top_p=0.95, top_k=50, sampling_seed=7)
    c = _gen(rt, prompts, temperature=0.9, top_p=0.95, top_k=50, sampling_seed=8)
    assert [r.token_ids for r in a] == [r.token_ids for r in b] != [r.token_ids for r in c]
    for r in a:
        assert r.stats["conf_tokens"] == len(r.token_ids) and r.stats["conf"] > 0


def test_stop_string_ends_only_its_own_row(qwen3):
    model, tok = qwen3
    prompts = _prompts()
    free = _gen(_rt(qwen3), prompts)
    stop = tok.decode(free[1].token_ids[4:6], skip_special_tokens=False)
    res = _gen(_rt(qwen3), prompts, stop=[stop])
    assert res[1].finish_reason == "stop" and res[1].stop_str == stop and len(res[1].token_ids) <= 6
    assert res[1].token_ids == free[1].token_ids[:len(res[1].token_ids)]
    for r, f in zip(res, free):
        assert r.token_ids == f.token_ids[:len(r.token_ids)]
        assert r.stats["n_decode_tokens"] == len(r.token_ids) - 1


@pytest.mark.parametrize("cls,extra,key", [
    ("HFNorms", {"layers": "99"}, "layers"),
    ("HFNorms", {"growth_eps": 0.1}, "growth_eps"),  # another method's knob: not silently a config attribute
    ("HFAlrr", {"tau_mode": "fixed"}, "tau"),
    ("HFLrs", {"config": "no-such-preset"}, "config"),
    ("HFNorms", {"batch_invariant": True}, "batch_invariant"),  # a vLLM setting: refused, not ignored
])
def test_hf_model_types_fail_fast_before_loading(tiny_model_dir, cls, extra, key):
    import lm_eval_telltale.harness.hf as harness

    t = time.time()
    with pytest.raises(ConfigError) as e:
        getattr(harness, cls)(pretrained=str(tiny_model_dir), device="cpu", **extra)
    assert e.value.key == key and time.time() - t < 10
    if key == "growth_eps":
        assert "hf-norms" in str(e.value)  # the model type the user typed, not a vllm-* name


def test_calibrate_with_engine_hf(tiny_model_dir, local_task_dir, tmp_path):
    """``telltale calibrate --engine hf`` (``profile`` shares the collection): the hf adapter generates,
    and the collection has the vLLM engine's format."""
    import yaml

    from lm_eval_telltale.tools.profile import load_collection, main_calibrate

    out = tmp_path / "cal.yaml"
    assert main_calibrate(["--engine", "hf", "--model", str(tiny_model_dir), "--tasks", "telltale_local", "--limit",
                           "2", "--include_path", str(local_task_dir), "--max-tokens", "12", "--warmup", "4",
                           "--engine-args", '{"device": "cpu", "dtype": "float32"}', "--out", str(out)]) == 0
    q = yaml.safe_load(out.read_text())["calibration"]["quantiles"]
    assert sorted(q) == list(range(8)) and q[5]["p50"] <= q[5]["p90"]
    col = load_collection(tmp_path / "cal.collection.npz")
    assert col["meta"]["engine"] == "hf" and len(col["samples"]) == 2
    for s in col["samples"]:
        assert s["norm"].shape == (11, 8) and (s["norm"] > 0).all() and len(s["token_ids"]) == 12
        assert np.isnan(s["tau"][:4]).all() and np.isfinite(s["tau"][5:]).all()


def test_bench_with_engine_hf(tiny_model_dir, tmp_path):
    """``telltale bench --engine hf``: stock transformers' generate and hf-alrr cells (each in its own
    process), the ratio and ALRR's re-run counters in the report."""
    import json

    from lm_eval_telltale.tools import bench

    out = tmp_path / "out"
    rc = bench.main(["--engine", "hf", "--model", str(tiny_model_dir), "--model-name", "tiny", "--methods", "hf,alrr",
                     "--quick", "--layers", "4-6", "--out", str(out), "--work", str(tmp_path / "w"),
                     "--knobs", '{"common": {"warmup": 4, "iqr_k": 0}, "alrr": {"blowup": 10}}'])
    assert rc == 0
    rep = json.loads((out / "tiny.json").read_text())
    cells = {c["method"]: c for c in rep["cells"]}
    assert set(cells) == {"vllm", "alrr"} and rep["meta"]["engine"] == "hf"
    assert all(c["ok"] and c["generated_tokens"] == 2 * 16 and c["requests"] == 2 for c in cells.values())
    assert cells["alrr"]["alrr"]["rerun_calls"] > 0 and cells["alrr"]["engine"]["engine"] == "hf"
    rows = {r["method"]: r for r in rep["rows"]}
    assert rows["alrr"]["ratio"] > 0 and 0 < rows["alrr"]["compute_limit_ratio"] < 1
    md = (out / "tiny.md").read_text()
    assert "| hf-alrr | 2 | 2 |" in md and "| hf | 2 | 2 |" in md and "transformers / torch" in md
