"""LRS's candidate ↔ statistics mapping on the real engine: every candidate's recorded norms and
confidence equal those of re-running exactly that candidate alone (same prompt, same seed)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import rpc

pytestmark = pytest.mark.engine


def _sp(seed, tag):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=24, temperature=0.8, top_p=0.95, seed=seed, extra_args={"telltale_tag": tag})


def test_candidate_statistics_are_exactly_the_candidates(engines, tiny_model_dir):
    # (no forced chunked prefill here: vLLM 0.32's CPU runner cannot rewind a seeded request's
    # generator after a discarded partial-prefill sample — "CPU Generator does not use offset")
    llm = engines.make(tiny_model_dir, "lrs", {"layers": "4-6", "record_tokens": True, "conf_window": 8},
                       max_num_seqs=6)
    prompts = [{"prompt_token_ids": [(7 * i + 3 * j) % 250 + 1 for j in range(9 + 20 * i)]} for i in range(2)]
    jobs = [(p, 100 + 10 * i + k, f"c{i}-{k}") for i, p in enumerate(prompts) for k in range(4)]
    outs = llm.generate([p for p, _, _ in jobs], [_sp(s, t) for _, s, t in jobs], use_tqdm=False)
    recs = {r["tag"]: r for r in rpc(llm, "telltale_collect", [t for _, _, t in jobs])}
    toks = {t: list(o.outputs[0].token_ids) for (_, _, t), o in zip(jobs, outs)}
    assert len({tuple(v) for v in toks.values()}) == len(jobs)  # sampling made the candidates differ

    solo = {}
    for p, s, t in jobs:
        o = llm.generate([p], [_sp(s, "solo-" + t)], use_tqdm=False)[0]
        assert list(o.outputs[0].token_ids) == toks[t]
        solo[t] = rpc(llm, "telltale_collect", ["solo-" + t])[0]

    def same(a, b):
        return (np.array_equal(np.array(a["tokens"]["norm"]), np.array(b["tokens"]["norm"]))
                and a["conf"] == pytest.approx(b["conf"], rel=1e-6))

    tags = [t for _, _, t in jobs]
    for t in tags:
        assert recs[t]["conf_tokens"] == 24 and recs[t]["conf"] > 0
        assert same(recs[t], solo[t]), t
    # the check is sensitive to the mapping: a swapped candidate <-> statistics mapping fails it
    swapped = tags[1:] + tags[:1]
    assert not any(same(recs[t], solo[u]) for t, u in zip(tags, swapped))
    engines.close(llm)


def test_many_long_seeded_candidates_run_on_the_cpu_engine(engines, tiny_model_dir):
    """vllm-lrs's engine settings keep seeded candidates away from vLLM's CPU partial-prefill
    generator bug (24 seeded requests of 150-200 tokens with a small token budget)."""
    from vllm import SamplingParams

    from lm_eval_telltale.config import resolve
    from lm_eval_telltale.harness.lrs import VLLMLrs

    kw = {"max_model_len": 512}
    VLLMLrs._tt_configure(object.__new__(VLLMLrs), resolve("lrs", {}, 8), kw)
    assert kw == {"max_model_len": 512, "enable_chunked_prefill": False, "max_num_batched_tokens": 512}
    # vLLM refuses a token budget below max_num_seqs (its CPU default: 256 per rank)
    for extra, budget in (({}, 256), ({"tensor_parallel_size": 2}, 512), ({"max_num_seqs": 300}, 300)):
        small = {"max_model_len": 128, **extra}
        VLLMLrs._tt_configure(object.__new__(VLLMLrs), resolve("lrs", {}, 8), small)
        assert small["max_num_batched_tokens"] == budget
    llm = engines.make(tiny_model_dir, "lrs", {"layers": "4-6"}, max_num_seqs=8, **kw)
    ps = [{"prompt_token_ids": [(i * 7 + j) % 250 + 1 for j in range(150 + 10 * i)]} for i in range(6) for _ in range(4)]
    sps = [SamplingParams(max_tokens=8, temperature=0.8, seed=100 + i, extra_args={"telltale_tag": f"t{i}"})
           for i in range(24)]
    assert len(llm.generate(ps, sps, use_tqdm=False)) == 24
    assert len(rpc(llm, "telltale_collect", [f"t{i}" for i in range(24)])) == 24
    engines.close(llm)


def test_online_stop_ends_a_candidate_inside_the_engine(engines, tiny_model_dir):
    """Online LRS (stop_signal=norm, then conf) on the real engine, against the same candidates
    run in full: a candidate whose window falls below its threshold samples its stop token in the
    very step its window was full and nothing after; its tokens and norms up to there are the full
    run's; a warm-up candidate (no threshold) and a candidate whose threshold is never reached
    equal the full run token for token."""
    import json
    import math

    from lm_eval_telltale.core.lrs import STOP_THRESHOLD_KEY, STOP_TOKEN_KEY

    eos = json.loads((tiny_model_dir / "config.json").read_text())["eos_token_id"]
    W = 5
    prompts = [{"prompt_token_ids": [(7 * i + 3 * j) % 250 + 1 for j in range(9 + 11 * i)]} for i in range(3)]
    for signal in ("norm", "conf"):
        llm = engines.make(tiny_model_dir, "lrs", {"layers": "4-6", "record_tokens": True, "stop_signal": signal,
                                                   "stop_window": W, "n_candidates": 4}, max_num_seqs=8)

        def run(thr, tag, llm=llm):
            extra = {} if thr is None else {STOP_THRESHOLD_KEY: thr, STOP_TOKEN_KEY: eos}
            sps = [_sp(200 + i, f"{tag}{i}") for i in range(len(prompts))]
            for sp in sps:
                sp.extra_args.update(extra)
                sp.max_tokens = 20
                sp.ignore_eos = False
            outs = llm.generate(prompts, sps, use_tqdm=False)
            recs = {r["tag"]: r for r in rpc(llm, "telltale_collect", [f"{tag}{i}" for i in range(len(prompts))])}
            return [(list(o.outputs[0].token_ids), o.outputs[0].finish_reason, recs[f"{tag}{i}"])
                    for i, o in enumerate(outs)]

        full = run(None, "full")          # a warm-up candidate: no threshold
        never = run(-math.inf, "never")   # nothing is below -inf
        always = run(math.inf, "always")  # every full window is below +inf
        for (ft, fr, frec), (nt, nr, nrec), (at, ar, arec) in zip(full, never, always):
            assert frec["stopped_at"] is None and nrec["stopped_at"] is None
            assert nt == ft and nr == fr and nrec["tokens"]["norm"] == frec["tokens"]["norm"]
            assert len(ft) > W + 1  # long enough to be stopped
            # stopped once W generated tokens were fed: the next sampled token is the stop token, the last
            assert arec["stopped_at"] == W and at == ft[:W] + [eos] and ar == "stop"
            assert arec["n_decode_tokens"] == W and arec["tokens"]["norm"] == frec["tokens"]["norm"][:W]
            assert frec["online_score"] is not None and math.isfinite(frec["online_score"])
        engines.close(llm)
