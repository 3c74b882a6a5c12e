"""Cross-engine parity: the SAME core driven by vLLM (in-process CPU engine) and by transformers
(the hf adapter's generation loop), float32, greedy, on tiny random Qwen3 and Llama models.

For every method the two engines must agree token for token where their inputs agree: per-token
norm traces at the patched layers (relative error ≤ 1e-4) along each prompt's shared generated
prefix, identical sets of (token, layer) decisions (every event bit) there, identical generations
for ≥ 95 % of the prompts (the figure is printed); LRS's scores on teacher-forced candidates.

τ is fixed per layer and chosen from the model's observed norms (the middle of the widest gap
between neighbouring norms near the chosen quantile), so that each method acts and no norm sits
within float noise of a threshold.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import rpc

from lm_eval_telltale.core.rng import request_identity

pytestmark = pytest.mark.engine

ARCHS = ("qwen3", "llama")
LAYERS = "4-6"
BUDGET = 24
N_PROMPTS = 6
#: method runs: (name, method, knobs, the τ quantile, the event the method must produce)
RUNS = [
    ("norms", "norms", {}, None, None),
    ("suppress-high", "suppress", {}, 0.9, "suppressed"),
    ("suppress-random", "suppress", {"suppress_mode": "random", "p": 0.15}, 0.9, "suppressed"),
    ("alrr", "alrr", {"growth_eps": 0.0, "blowup": 3.0}, 0.6, "accepted"),
    ("erss", "erss", {"low_k": 2, "cooldown": 2, "bank_k": 4, "p_inject": 0.5, "cos_min": -1.0}, 0.5, "injected"),
]
EV_NAMES = ("suppressed", "recursed", "accepted", "injected", "banked")


def _prompts():
    return [[(7 + 13 * i + 5 * j + (j * j) % 7) % 250 + 1 for j in range(5 + 5 * i)] for i in range(N_PROMPTS)]


def _vllm(engines, model_dir, method, args, prompts, **kw):
    from vllm import SamplingParams

    llm = engines.make(model_dir, method, {"layers": LAYERS, "record_tokens": True, **args}, **kw)
    tags = [f"v{i}" for i in range(len(prompts))]
    sps = [SamplingParams(max_tokens=BUDGET, temperature=0.0,
                          extra_args={"telltale_tag": t, "telltale_seed": request_identity(p, 0)})
           for t, p in zip(tags, prompts)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sps, use_tqdm=False)
    recs = {r["tag"]: r for r in rpc(llm, "telltale_collect", tags)}
    engines.close(llm)
    return [(list(o.outputs[0].token_ids), recs[t]) for o, t in zip(outs, tags)]


def _hf(model, tok, method, args, prompts):
    from lm_eval_telltale.config import resolve
    from lm_eval_telltale.hf.runtime import GenRequest, HFRuntime

    cfg = resolve(method, {"layers": LAYERS, "record_tokens": True, **args}, 8, seed=0)
    rt = HFRuntime(model, cfg, engine_seed=0, tokenizer=tok)
    res = rt.generate([GenRequest(p, BUDGET, tag=f"h{i}", identity=request_identity(p, 0))
                       for i, p in enumerate(prompts)])
    return [(r.token_ids, r.stats) for r in res]


def _tau_between(norms: np.ndarray, q: float) -> float:
    """A τ near the q-quantile of ``norms``, in the middle of the widest gap between neighbours."""
    s = np.sort(norms)
    i0, i1 = int((q - 0.08) * len(s)), int((q + 0.08) * len(s))
    gaps = s[i0 + 1:i1 + 1] - s[i0:i1]
    k = i0 + int(np.argmax(gaps))
    return float((s[k] + s[k + 1]) / 2)


def _shared(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _compare(pairs, prompts):
    """(identical generations, max relative norm error, {decision: count}, mismatched decisions)
    over the prompts; rows compared where both engines fed the same tokens."""
    same, err, counts, diff = 0, 0.0, {}, []
    for i, ((tv, rv), (th, rh)) in enumerate(pairs):
        same += tv == th
        n = _shared(tv, th)
        plen = len(prompts[i])
        tv_, th_ = rv["tokens"], rh["tokens"]
        # trace row at position p is the forward of generated token p - plen: same input while < n
        kv = [k for k, p in enumerate(tv_["position"]) if p - plen < n]
        kh = [k for k, p in enumerate(th_["position"]) if p - plen < n]
        assert [tv_["position"][k] for k in kv] == [th_["position"][k] for k in kh]
        for col in ("norm", "norm_out"):
            if col in tv_:
                a, b = np.array(tv_[col])[kv], np.array(th_[col])[kh]
                if a.size:
                    err = max(err, float(np.max(np.abs(a - b) / np.abs(a))))
        dv = {(tv_["position"][k], j, e) for k in kv for j, e in enumerate(tv_["event"][k]) if e}
        dh = {(th_["position"][k], j, e) for k in kh for j, e in enumerate(th_["event"][k]) if e}
        diff += [(i, d) for d in dv ^ dh]
        for name in EV_NAMES:
            counts[name] = counts.get(name, 0) + sum(rv["layers"][l].get(name, 0) for l in rv["layers"])
    return same, err, counts, diff


@pytest.fixture(scope="module")
def parity(engines, tiny_models):
    """Every method on both engines and both architectures (one vLLM engine per run)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = _prompts()
    out = {}
    for arch in ARCHS:
        d = tiny_models[arch]
        model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(str(d))
        taus = None
        for name, method, knobs, q, _ev in RUNS:
            args = dict(knobs)
            if q is not None:
                args.update(tau_mode="fixed", tau=str([_tau_between(taus[:, j], q) for j in range(3)]))
            pairs = list(zip(_vllm(engines, d, method, args, prompts), _hf(model, tok, method, args, prompts)))
            out[(arch, name)] = _compare(pairs, prompts)
            if name == "norms":  # the τ of the methods: from the norms the model produces
                taus = np.concatenate([np.array(r["tokens"]["norm"]) for (_t, r), _ in pairs])
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", [r[0] for r in RUNS])
def test_norm_traces_and_decisions_agree(parity, arch, name):
    same, err, counts, diff = parity[(arch, name)]
    ev = next(r[4] for r in RUNS if r[0] == name)
    print(f"\n{arch} {name}: {same}/{N_PROMPTS} identical generations, max relative norm error {err:.2e}, events {counts}")
    assert err <= 1e-4
    assert not diff, f"decisions that differ between the engines: {diff[:10]}"
    if ev is not None:
        assert counts[ev] > 0, f"{name} never acted: choose another τ"


def test_identical_generations_figure(parity):
    same = sum(v[0] for v in parity.values())
    total = N_PROMPTS * len(parity)
    err = max(v[1] for v in parity.values())
    print(f"\nHF vs vLLM: {same}/{total} = {100 * same / total:.1f} % identical generations; "
          f"max relative norm error {err:.2e}")
    assert same / total >= 0.95


def test_lrs_scores_agree_on_teacher_forced_candidates(engines, tiny_model_dir):
    """vllm-lrs samples the candidates; the hf adapter is fed the same tokens (teacher forcing) and
    must give the same statistics, scores and DeepConf confidence."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import SamplingParams

    from lm_eval_telltale.config import resolve
    from lm_eval_telltale.core.lrs import SCORES, score
    from lm_eval_telltale.hf.runtime import GenRequest, HFRuntime

    prompts = _prompts()[:4]
    knobs = {"layers": LAYERS, "warmup": 4, "conf_window": 8}
    llm = engines.make(tiny_model_dir, "lrs", knobs, enable_chunked_prefill=False, max_num_batched_tokens=1024)
    tags = [f"l{i}_{k}" for i in range(len(prompts)) for k in range(2)]
    sps = [SamplingParams(max_tokens=BUDGET, temperature=0.8, seed=100 + n, extra_args={"telltale_tag": t})
           for n, t in enumerate(tags)]
    outs = llm.generate([{"prompt_token_ids": prompts[n // 2]} for n in range(len(tags))], sps, use_tqdm=False)
    recs = {r["tag"]: r for r in rpc(llm, "telltale_collect", tags)}
    engines.close(llm)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    rt = HFRuntime(model, resolve("lrs", knobs, 8, seed=0), tokenizer=AutoTokenizer.from_pretrained(str(tiny_model_dir)))
    forced = [list(o.outputs[0].token_ids) for o in outs]
    res = rt.generate([GenRequest(prompts[n // 2], len(f), tag=tags[n], forced=f) for n, f in enumerate(forced)])
    assert len({tuple(f) for f in forced}) == len(forced)  # sampled: distinct candidates
    for r, f in zip(res, forced):
        v, h = recs[r.tag], r.stats
        assert r.token_ids == f and h["n_decode_tokens"] == v["n_decode_tokens"] == len(f) - 1
        for name in SCORES:
            assert score(h["layers"], name) == pytest.approx(score(v["layers"], name), rel=1e-4), name
        assert h["conf_tokens"] == v["conf_tokens"] == len(f)
        assert h["conf"] == pytest.approx(v["conf"], rel=1e-4) and h["conf_mean"] == pytest.approx(v["conf_mean"], rel=1e-4)
