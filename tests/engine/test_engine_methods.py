"""vllm-suppress and vllm-alrr on the real vLLM CPU engine (in-process), tiny Qwen3."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import rpc

pytestmark = pytest.mark.engine

LAYERS = "4-6"


def _sp(max_tokens, tag, **extra):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, extra_args={"telltale_tag": tag, **extra})


def _prompts(n, base=5):
    return [{"prompt_token_ids": [(base + 11 * i + 5 * j) % 250 + 1 for j in range(6 + 3 * i)]} for i in range(n)]


def run(llm, prompts, budget, prefix, extra=None):
    tags = [f"{prefix}{i}" for i in range(len(prompts))]
    outs = llm.generate(prompts, [_sp(budget, t, **((extra or {}).get(i, {}))) for i, t in enumerate(tags)], use_tqdm=False)
    recs = {r["tag"]: r for r in rpc(llm, "telltale_collect", tags)}
    return [list(o.outputs[0].token_ids) for o in outs], [recs[t] for t in tags]


def count(recs, name):
    return sum(st.get(name, 0) for r in recs for st in r["layers"].values())


@pytest.fixture(scope="module")
def reference(engines, tiny_model_dir):
    """Outputs of vllm-norms (= stock vLLM, tested elsewhere) for the prompts used here."""
    llm = engines.make(tiny_model_dir, "norms", {"layers": LAYERS})
    ref = {n: run(llm, _prompts(8), n, "ref")[0] for n in (40,)}
    engines.close(llm)
    return ref


def test_suppress_high_scales_exactly_and_spares_an_opted_out_neighbour(engines, tiny_model_dir, reference):
    llm = engines.make(tiny_model_dir, "suppress", {"layers": LAYERS, "warmup": 4, "record_tokens": True})
    prompts = _prompts(8)
    # request 7 opts out: it shares every step with suppressed requests
    outs, recs = run(llm, prompts, 40, "s", extra={7: {"telltale_enable": False}})
    assert count(recs[:7], "suppressed") > 0 and count(recs[7:], "suppressed") == 0
    for r in recs:
        norm, out = np.array(r["tokens"]["norm"]), np.array(r["tokens"]["norm_out"])
        ev = np.array(r["tokens"]["event"])
        sup = (ev & 2) != 0
        assert np.allclose(out[sup] / norm[sup], 0.1, rtol=1e-5, atol=0)  # post/pre ratio = scale
        assert np.array_equal(out[~sup], norm[~sup])                       # nothing else changes
    assert outs[7] == reference[40][7]            # the opted-out neighbour = its unsteered run
    assert outs[:7] != reference[40][:7]          # suppression changed the steered outputs
    engines.close(llm)


def test_random_suppression_reproducible_by_seed(engines, tiny_model_dir):
    args = {"layers": LAYERS, "suppress_mode": "random", "p": 0.1, "warmup": 4}  # draws only past the warm-up
    picks = []
    for seed in (0, 0, 1):
        llm = engines.make(tiny_model_dir, "suppress", {**args, "record_tokens": True}, seed=seed)
        _, recs = run(llm, _prompts(3), 24, f"r{seed}")
        picks.append([np.array(r["tokens"]["event"]).tolist() for r in recs])
        engines.close(llm)
    assert picks[0] == picks[1]
    assert picks[0] != picks[2]


def test_matched_random_hits_the_high_rate(engines, tiny_model_dir, tmp_path):
    prompts = _prompts(8)
    llm = engines.make(tiny_model_dir, "suppress", {"layers": LAYERS, "warmup": 8})
    _, high = run(llm, prompts, 257, "h")  # 8 x 256 generated tokens
    engines.close(llm)
    side = tmp_path / "high.jsonl"
    side.write_text("".join(json.dumps({"task": "t", "doc_id": i, "layers": r["layers"]}) + "\n" for i, r in enumerate(high)))
    llm = engines.make(tiny_model_dir, "suppress", {"layers": LAYERS, "suppress_mode": "matched",
                                                    "match_stats": str(side)}, seed=3)
    _, matched = run(llm, prompts, 257, "m")
    engines.close(llm)
    n_tok = sum(r["n_decode_tokens"] for r in high) * 3
    assert n_tok >= 2000 * 3
    ref_rate, got_rate = count(high, "suppressed") / n_tok, count(matched, "suppressed") / n_tok
    assert ref_rate > 0.005
    assert abs(got_rate - ref_rate) <= 0.2 * ref_rate, (ref_rate, got_rate)


def test_alrr_with_unreachable_or_rejecting_thresholds_is_identical_to_norms(engines, tiny_model_dir, reference):
    llm = engines.make(tiny_model_dir, "alrr", {"layers": LAYERS, "tau_mode": "fixed", "tau": 1e6})
    outs, recs = run(llm, _prompts(8), 40, "a")
    assert outs == reference[40] and count(recs, "recursed") == 0
    engines.close(llm)
    # candidates exist and the re-run pass runs, but nothing is accepted: any leak through
    # in-place kernels or KV writes would change the outputs
    llm = engines.make(tiny_model_dir, "alrr", {"layers": LAYERS, "warmup": 4, "growth_eps": 1e9})
    outs, recs = run(llm, _prompts(8), 40, "b")
    assert count(recs, "recursed") > 0 and count(recs, "accepted") == 0
    assert outs == reference[40]
    engines.close(llm)


def _kv(attn):
    kv = attn.kv_cache
    kv = kv[0] if isinstance(kv, (list, tuple)) else kv
    return kv.clone()


# (guard, compiled, in_graph): the ops' path re-runs the layer in no_kv_write; the in-graph step
# (skip_sync=false) between the ops that call kvguard.suspend / resume, inside the compiled model
@pytest.mark.parametrize("guard,compiled,graph", [(True, False, False), (False, False, False), (True, True, False),
                                                  (True, True, True), (False, False, True)])
def test_alrr_rerun_leaves_the_kv_cache_as_pass0_wrote_it(engines, tiny_model_dir, reference, monkeypatch, guard,
                                                         compiled, graph):
    import contextlib

    import lm_eval_telltale.vllm.kvguard as kvguard
    import lm_eval_telltale.vllm.runtime as runtime

    checks = []
    if graph:
        attn = {}
        real_suspend, real_resume = kvguard.suspend, kvguard.resume

        def suspend(names):
            from vllm.forward_context import get_forward_context

            attn["m"] = get_forward_context().no_compile_layers[names[0]]
            attn["before"] = _kv(attn["m"])
            if guard:
                real_suspend(names)

        def resume(names):
            real_resume(names)
            checks.append(bool((_kv(attn["m"]) == attn["before"]).all()))

        monkeypatch.setattr(kvguard, "suspend", suspend)
        monkeypatch.setattr(kvguard, "resume", resume)
    else:
        real = runtime.no_kv_write

        @contextlib.contextmanager
        def snapshot(layer):
            attn = layer.self_attn.attn
            before = _kv(attn)
            with (real(layer) if guard else contextlib.nullcontext()):
                yield
            checks.append(bool((_kv(attn) == before).all()))

        monkeypatch.setattr(runtime, "no_kv_write", snapshot)
    llm = engines.make(tiny_model_dir, "alrr", {"layers": LAYERS, "warmup": 4, "growth_eps": 0.0,
                                                "skip_sync": not graph}, compiled=compiled)
    assert rpc(llm, "telltale_state")["in_graph"] is graph
    outs, recs = run(llm, _prompts(8), 40, "k")
    engines.close(llm)
    assert checks and count(recs, "accepted") > 0
    if guard:
        assert all(checks)       # the re-run wrote nothing: the cache is the pass-0 cache
        assert outs != reference[40]  # and the accepted re-runs changed the outputs
    else:
        assert not all(checks)   # control: without the guard the snapshot test does see writes


def test_alrr_in_graph_computes_what_the_ops_path_computes(engines, tiny_model_dir):
    """skip_sync=false runs ALRR inside the model's forward, its re-run traced with it (the ops'
    path: an eager call between graph pieces, skipped in a step without a candidate). Eager, both
    give the same tokens and the same per-token norms, output norms and events, bit for bit."""
    got = {}
    for graph in (False, True):
        llm = engines.make(tiny_model_dir, "alrr", {"layers": LAYERS, "warmup": 4, "growth_eps": 0.0,
                                                    "record_tokens": True, "skip_sync": not graph})
        assert rpc(llm, "telltale_state")["in_graph"] is graph
        got[graph] = run(llm, _prompts(8), 40, f"g{graph}")
        engines.close(llm)
    (o0, r0), (o1, r1) = got[False], got[True]
    assert o0 == o1 and count(r1, "accepted") > 0
    for a, b in zip(r0, r1):
        for k in ("norm", "norm_out", "event"):
            assert np.array_equal(np.array(a["tokens"][k]), np.array(b["tokens"][k])), k


@pytest.mark.parametrize("method,args,compiled", [
    ("alrr", {"warmup": 4, "growth_eps": 0.0}, False),
    ("suppress", {"warmup": 4}, False),
    ("suppress", {"suppress_mode": "random", "p": 0.1, "warmup": 4}, False),
    ("alrr", {"warmup": 4, "growth_eps": 0.0, "skip_sync": False}, True),  # the in-graph step, compiled
    # (compiled suppression runs the in-graph step, whose batch independence compiled is ERSS's test)
])
def test_decisions_are_per_request(engines, tiny_model_dir, method, args, compiled):
    llm = engines.make(tiny_model_dir, method, {"layers": LAYERS, **args}, compiled=compiled)
    prompts = _prompts(8)
    outs, recs = run(llm, prompts, 32, "batch")
    name = "accepted" if method == "alrr" else "suppressed"
    assert count(recs, name) > 0
    for i, p in enumerate(prompts):
        o, r = run(llm, [p], 32, f"solo{i}-")
        assert o[0] == outs[i]
        assert {l: st.get(name, 0) for l, st in r[0]["layers"].items()} == \
               {l: st.get(name, 0) for l, st in recs[i]["layers"].items()}
    engines.close(llm)


@pytest.mark.parametrize("mode", ["request", "global", "fixed", "calibrated"])
def test_methods_work_with_every_threshold_mode(engines, tiny_model_dir, tmp_path, mode):
    import yaml

    # a τ each mode can reach on the tiny model: from the norms the model actually produces
    llm = engines.make(tiny_model_dir, "norms", {"layers": LAYERS, "record_tokens": True})
    _, recs = run(llm, _prompts(4), 40, f"cal{mode}")
    engines.close(llm)
    norms = np.concatenate([np.array(r["tokens"]["norm"]) for r in recs])
    qs = {str(l): {f"p{q}": float(np.quantile(norms[:, j], q / 100)) for q in (50, 75, 90, 95, 99)}
          for j, l in enumerate((4, 5, 6))}
    args = {"layers": LAYERS, "tau_mode": mode, "warmup": 4}
    if mode == "fixed":
        args["tau"] = json.dumps({l: v["p90"] for l, v in qs.items()})
    elif mode == "calibrated":
        f = tmp_path / "cal.yaml"
        f.write_text(yaml.safe_dump({"calibration": {"quantiles": qs}}))
        args.update(tau_file=str(f), tau_q=0.9)
    for method, extra, counter in [("suppress", {}, "suppressed"), ("alrr", {"growth_eps": 0.0, "blowup": 3.0}, "recursed")]:
        llm = engines.make(tiny_model_dir, method, {**args, **extra})
        _, r = run(llm, _prompts(4), 40, f"{method}{mode}")
        engines.close(llm)
        assert count(r, counter) > 0, (method, mode)
        taus = [st["tau_last"] for x in r for st in x["layers"].values()]
        if mode in ("fixed", "calibrated"):
            # the engine used the file's τ (stored as float32)
            assert sorted(set(taus)) == pytest.approx(sorted({v["p90"] for v in qs.values()}), rel=1e-6)
