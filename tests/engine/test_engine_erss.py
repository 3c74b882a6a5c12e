"""vllm-erss on the real vLLM CPU engine (in-process), tiny Qwen3.

The tiny random model's norms vary little, so the knobs make it trigger: τ = Q3 of the request's
own norms (iqr_k=0, request mode, warm-up 4), short streaks (low_k=3), p_inject=0.5 (the draws
matter), any cosine (cos_min=-1), a small bank (bank_k=4: eviction happens).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import rpc, worker

from lm_eval_telltale.core.stats import EV_BANKED, EV_INJECTED

pytestmark = pytest.mark.engine

LAYERS = "4-6"
KNOBS = {"layers": LAYERS, "warmup": 4, "iqr_k": 0.0, "low_k": 3, "p_inject": 0.5, "cos_min": -1.0,
         "cooldown": 2, "bank_k": 4, "record_tokens": True}
BUDGET = 40


def _sp(max_tokens, tag, **extra):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, extra_args={"telltale_tag": tag, **extra})


def _prompts(n, base=5):
    return [{"prompt_token_ids": [(base + 11 * i + 5 * j) % 250 + 1 for j in range(6 + 3 * i)]} for i in range(n)]


def run(llm, prompts, prefix, **extra):
    tags = [f"{prefix}{i}" for i in range(len(prompts))]
    outs = llm.generate(prompts, [_sp(BUDGET, t, **extra) for t in tags], use_tqdm=False)
    recs = {r["tag"]: r for r in rpc(llm, "telltale_collect", tags)}
    return [list(o.outputs[0].token_ids) for o in outs], [recs[t] for t in tags]


def injections(rec):
    return {l: (st["inject_positions"], st["inject_cos"], st["inject_vnorm"]) for l, st in rec["layers"].items()}


@pytest.fixture(scope="module", params=["eager", "compiled"])
def erss_engine(engines, tiny_model_dir, request):
    # a small token budget with chunked prefill mixes prefill chunks and decode tokens in one step
    # (32 tokens, more than the 16 slots: the gathered path too); compiled, the per-layer step runs
    # as one compiled kernel
    llm = engines.make(tiny_model_dir, "erss", KNOBS, max_num_seqs=8, max_num_batched_tokens=32,
                       enable_chunked_prefill=True, compiled=request.param == "compiled")
    yield llm
    engines.close(llm)


@pytest.fixture(scope="module")
def batch8(erss_engine):
    return run(erss_engine, _prompts(8), "b")


def test_injections_change_the_stream_exactly_where_recorded(erss_engine, batch8):
    outs, recs = batch8
    off_outs, off_recs = run(erss_engine, _prompts(8), "off", telltale_enable=False)
    total = 0
    for i, (rec, off) in enumerate(zip(recs, off_recs)):
        tok = rec["tokens"]
        ev = np.array(tok["event"])
        norm, norm_out = np.array(tok["norm"]), np.array(tok["norm_out"])
        inj = (ev & EV_INJECTED) != 0
        total += int(inj.sum())
        # the residual stream changed at exactly the injected (token, layer) pairs
        assert np.all(norm_out[inj] != norm[inj]) and np.array_equal(norm_out[~inj], norm[~inj])
        for j, l in enumerate(["4", "5", "6"]):
            st = rec["layers"][l]
            assert st.get("injected", 0) == int(inj[:, j].sum()) == len(st["inject_positions"])
            assert st["inject_positions"] == [p for p, m in zip(tok["position"], inj[:, j]) if m]
            assert st["banked"] == int(((ev[:, j] & EV_BANKED) != 0).sum())
            assert 0 < st["bank_max"] <= 4 and len(st["inject_cos"]) == len(st["inject_vnorm"])
            assert all(-1.0 <= c <= 1.0 for c in st["inject_cos"])
            # every chosen vector's norm is the norm of a token this request banked at this layer
            banked = norm[(ev[:, j] & EV_BANKED) != 0, j]
            assert all(np.abs(banked - v).min() < 1e-3 for v in st["inject_vnorm"])
        # opted out: nothing recorded, nothing changed
        assert all(st.get("injected", 0) == 0 and st["bank_max"] == 0 for st in off["layers"].values())
        if not inj.any():
            assert outs[i] == off_outs[i]
    assert total >= 20
    assert sum(a != b for a, b in zip(outs, off_outs)) >= 4  # the injections change what is generated


def test_injections_are_the_same_alone_and_in_a_batch_of_8(erss_engine, batch8):
    outs, recs = batch8
    for i, p in enumerate(_prompts(8)):
        solo_out, (solo,) = run(erss_engine, [p], f"solo{i}-")
        assert solo_out[0] == outs[i]
        assert injections(solo) == injections(recs[i])
        assert solo["tokens"]["event"] == recs[i]["tokens"]["event"]
        assert solo["tokens"]["norm"] == recs[i]["tokens"]["norm"]


def test_a_compiled_engine_runs_the_fused_layer_step(erss_engine, batch8, request):
    """vLLM compiling the model ⇒ ERSS's per-layer step ran as a compiled kernel through every step
    of the batch (a compile failure in a step falls back to the plain operations, and says so)."""
    compiled = request.node.callspec.params["erss_engine"] == "compiled"
    state = rpc(erss_engine, "telltale_state")
    assert state["method_fused"] is compiled and state["fused"] is compiled
    assert state["in_graph"]  # ERSS's step runs inside the model's forward (vllm/graph.py)


def test_concurrent_banks_hold_only_their_own_vectors(erss_engine):
    llm = erss_engine
    eng = llm.llm_engine
    table = worker(llm)._tt.table
    prompts = _prompts(2, base=17)
    for i, p in enumerate(prompts):
        eng.add_request(f"pair{i}", p, _sp(BUDGET, f"pair{i}"))
    snaps = {"pair0": [], "pair1": []}
    steps_together = 0
    while eng.has_unfinished_requests():
        eng.step()
        live = {info.tag: info.slot for info in table.by_key.values() if info.tag in snaps}
        steps_together += len(live) == 2
        for tag, slot in live.items():
            bn = table.t["erss_bank_norm"][slot, :, :-1].clone()
            vecs = table.t["erss_bank"][slot, :, :-1].clone()
            snaps[tag].append((bn, vecs))
    recs = {r["tag"]: r for r in rpc(llm, "telltale_collect", list(snaps))}
    assert steps_together >= 20
    own = {}
    for tag, rec in recs.items():
        ev, norm = np.array(rec["tokens"]["event"]), np.array(rec["tokens"]["norm"])
        own[tag] = [norm[(ev[:, j] & EV_BANKED) != 0, j] for j in range(3)]
    for tag in snaps:
        seen = 0
        for bn, vecs in snaps[tag]:
            for j in range(3):
                filled = np.isfinite(bn[j].numpy())
                for v, vec in zip(bn[j].numpy()[filled], vecs[j][filled]):
                    seen += 1
                    assert abs(float(vec.norm()) - v) < 1e-3 * v  # the stored copy is intact
                    assert np.abs(own[tag][j] - v).min() < 1e-4, f"{tag} layer {j}: {v} is not its own"
        assert seen > 0
    # the check has teeth: the two requests banked different norms (no value is in both)
    for j in range(3):
        a, b = own["pair0"][j], own["pair1"][j]
        assert len(a) and len(b) and np.abs(a[:, None] - b[None, :]).min() > 1e-3


def test_state_is_freed_after_300_requests_with_aborts_and_preemption(engines, tiny_model_dir):
    # 2 MiB of float32 KV = 4 blocks of 128 tokens: requests crossing a block boundary get preempted
    llm = engines.make(tiny_model_dir, "erss", {**KNOBS, "record_tokens": False, "p_inject": 1.0, "low_k": 2},
                       kv_cache_memory_bytes=2 << 20, max_num_seqs=32, max_model_len=256)
    eng = llm.llm_engine
    ids = [f"q{i}" for i in range(300)]
    for i, rid in enumerate(ids):
        n = 120 + i % 7 if i % 3 == 0 else 16 + i % 7  # a third of the requests cross a block boundary
        eng.add_request(rid, {"prompt_token_ids": [(i * 7 + j) % 250 + 1 for j in range(n)]}, _sp(10 + i % 5, rid))
    aborted = set(ids[::4])
    steps, peak = 0, 0
    while eng.has_unfinished_requests():
        eng.step()
        steps += 1
        if steps == 5:
            eng.abort_request(sorted(aborted))
        if steps % 10 == 0:
            peak = max(peak, rpc(llm, "telltale_state")["method"]["live_with_state"])
    # in-process engines learn about the last finishes with the next step: flush with one request
    llm.generate([{"prompt_token_ids": [1, 2, 3]}], [_sp(2, "flush")], use_tqdm=False)
    rpc(llm, "telltale_collect", ["flush"])  # the driver collecting a request also frees it
    recs = {r["tag"]: r for r in rpc(llm, "telltale_collect", None)}
    assert set(recs) >= set(ids) - aborted
    state = rpc(llm, "telltale_state")
    assert state["live_requests"] == 0 and state["method"]["live_with_state"] == 0, state
    assert state["resumed_after_preemption"] > 0 and peak > 0
    injected = sum(st.get("injected", 0) for r in recs.values() for st in r["layers"].values())
    assert injected > 0
    rpc(llm, "telltale_discard")
    assert rpc(llm, "telltale_state")["uncollected"] == 0
    engines.close(llm)
