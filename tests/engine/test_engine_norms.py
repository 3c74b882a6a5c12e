"""vllm-norms on the real vLLM CPU engine (in-process), tiny models."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import rpc, worker

pytestmark = pytest.mark.engine


def _sp(max_tokens, tag=None, **kw):
    from vllm import SamplingParams

    extra = {"telltale_tag": tag} if tag else None
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, extra_args=extra, **kw)


def _prompts(lengths, base=3):
    return [{"prompt_token_ids": [(base + 7 * i + 3 * j) % 250 + 1 for j in range(n)]} for i, n in enumerate(lengths)]


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_norms_outputs_identical_to_stock_vllm(engines, tiny_models, arch):
    prompts = _prompts([5, 17, 30])
    stock = engines.make(tiny_models[arch], method=None)
    ref = [o.outputs[0].token_ids for o in stock.generate(prompts, [_sp(16)] * 3, use_tqdm=False)]
    engines.close(stock)
    llm = engines.make(tiny_models[arch], "norms", {"layers": "4-6"})
    outs = llm.generate(prompts, [_sp(16, f"r{i}") for i in range(3)], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == ref
    recs = {r["tag"]: r for r in rpc(llm, "telltale_collect", ["r0", "r1", "r2"])}
    assert set(recs) == {"r0", "r1", "r2"}
    for r in recs.values():
        assert r["n_decode_tokens"] == 15  # 16 generated, the last one is never fed back
        assert set(r["layers"]) == {"4", "5", "6"}
        assert all(v["count"] == 15 and v["mean"] > 0 for v in r["layers"].values())
    engines.close(llm)


LENGTHS = [5, 23, 40, 61, 12, 33, 47]
BUDGETS = [12, 4, 9, 6, 10, 3, 14]


def _traces(llm, prompts, budgets, tags):
    llm.generate(prompts, [_sp(b, t) for b, t in zip(budgets, tags)], use_tqdm=False)
    recs = {r["tag"]: r for r in rpc(llm, "telltale_collect", tags)}
    return {t: (np.array(recs[t]["tokens"]["position"]), np.array(recs[t]["tokens"]["norm"]),
                np.array(recs[t]["tokens"]["tau"], dtype=float)) for t in tags}


@pytest.fixture(scope="module", params=["eager", "compiled"])
def mixed_engine(engines, tiny_model_dir, request):
    # chunked prefill with a small token budget forces mixed prefill+decode steps; fewer seqs
    # than requests makes requests join and leave (rows condensed and reordered); in eager mode and
    # compiled (torch.compile + inductor, vLLM's default here: the hooks are opaque custom ops)
    llm = engines.make(tiny_model_dir, "norms", {"layers": "3;5;6", "warmup": 3, "record_tokens": True},
                       max_num_seqs=4, max_num_batched_tokens=32, enable_chunked_prefill=True,
                       compiled=request.param == "compiled")
    yield llm
    engines.close(llm)


def _solo(llm):
    prompts = _prompts(LENGTHS)
    return {f"s{i}": v for i, (p, b) in enumerate(zip(prompts, BUDGETS))
            for v in [_traces(llm, [p], [b], [f"s{i}"])[f"s{i}"]]}


#: per engine mode: each request's first recorded row (its first generated token's norms, which
#: depend only on the prompt and that token)
_FIRST_ROWS: dict[str, dict] = {}


def test_attribution_concurrent_equals_solo(mixed_engine, request):
    solo = _solo(mixed_engine)
    # the norms are the residual stream's, not an all-equal stand-in (solo = concurrent would
    # hold for zeros too): positive, and the compiled engine's (the norm computed inside its graph,
    # handed to the observe-only op) equal to the eager engine's up to float32 rounding
    assert all((v[1] > 0).all() for v in solo.values())
    mode = request.node.callspec.params["mixed_engine"]
    _FIRST_ROWS[mode] = {k: (v[0][0], v[1][0]) for k, v in solo.items()}
    if len(_FIRST_ROWS) == 2:
        for k, (pos, norm) in _FIRST_ROWS["eager"].items():
            pos_c, norm_c = _FIRST_ROWS["compiled"][k]
            assert pos == pos_c
            np.testing.assert_allclose(norm_c, norm, rtol=1e-4, err_msg=k)
    conc = _traces(mixed_engine, _prompts(LENGTHS), BUDGETS, [f"c{i}" for i in range(len(LENGTHS))])
    for i, b in enumerate(BUDGETS):
        pos_s, norm_s, tau_s = solo[f"s{i}"]
        pos_c, norm_c, tau_c = conc[f"c{i}"]
        assert len(pos_c) == b - 1
        assert np.array_equal(pos_s, pos_c)
        assert np.array_equal(norm_s, norm_c), f"request {i}: max diff {np.abs(norm_s - norm_c).max()}"
        assert np.array_equal(tau_s, tau_c, equal_nan=True)  # request-mode τ ignores the batch


def test_a_compiled_engine_runs_the_fused_threshold_update(mixed_engine, request):
    """vLLM compiling the model ⇒ the per-step threshold update runs as one compiled kernel
    (bit-identical to the eager operations: tests/core/test_core.py); enforce_eager ⇒ nothing is
    compiled."""
    compiled = request.node.callspec.params["mixed_engine"] == "compiled"
    pos, norm, tau = _traces(mixed_engine, _prompts([9]), [14], ["f0"])["f0"]
    assert np.isnan(tau[:5]).all() and np.isfinite(tau[5:]).all()  # estimates from the 6th generated token on
    # after those steps: still compiled (a compile failure during a step falls back and says fused=False)
    assert rpc(mixed_engine, "telltale_state")["fused"] is compiled


def test_attribution_test_detects_a_wrong_row_order(mixed_engine, monkeypatch):
    from lm_eval_telltale.core.engine import CoreEngine
    from lm_eval_telltale.vllm.graph import GraphStep

    solo = _solo(mixed_engine)
    assert rpc(mixed_engine, "telltale_state")["in_graph"]  # the row → slot map the engine uses
    real, real_g = CoreEngine.start, GraphStep.begin
    monkeypatch.setattr(CoreEngine, "start",
                        lambda self, qsl, row_slot, pos, *tok: real(self, qsl, row_slot.flip(0), pos, *tok))
    monkeypatch.setattr(GraphStep, "begin", lambda self, row_slot, **kw: real_g(self, row_slot[::-1], **kw))  # (numpy)
    conc = _traces(mixed_engine, _prompts(LENGTHS), BUDGETS, [f"w{i}" for i in range(len(LENGTHS))])
    differs = [not (len(solo[f"s{i}"][1]) == len(conc[f"w{i}"][1]) and np.array_equal(solo[f"s{i}"][1], conc[f"w{i}"][1]))
               for i in range(len(LENGTHS))]
    assert any(differs)


def test_state_is_freed_after_200_requests_with_aborts_and_preemption(engines, tiny_model_dir):
    from vllm import SamplingParams

    # 2 MiB of float32 KV = 4 blocks of 128 tokens: requests crossing a block boundary get preempted
    llm = engines.make(tiny_model_dir, "norms", {"layers": "5-6"}, kv_cache_memory_bytes=2 << 20,
                       max_num_seqs=32, max_model_len=256)
    eng = llm.llm_engine
    ids = [f"q{i}" for i in range(200)]
    for i, rid in enumerate(ids):
        eng.add_request(rid, {"prompt_token_ids": [(i * 7 + j) % 250 + 1 for j in range(118 + i % 9)]},
                        SamplingParams(max_tokens=12 + i % 7, temperature=0.0, extra_args={"telltale_tag": rid}))
    aborted = set(ids[::4])
    finished = {}
    steps = 0
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                finished[o.request_id] = o
        steps += 1
        if steps == 5:
            eng.abort_request(sorted(aborted))
    w = worker(llm)
    assert w._tt is not None
    # in-process engines learn about the last finishes with the next step: flush with one request
    llm.generate([{"prompt_token_ids": [1, 2, 3]}], [_sp(2, "flush")], use_tqdm=False)
    rpc(llm, "telltale_collect", ["flush"])  # the driver collecting a request also frees it
    state = rpc(llm, "telltale_state")
    assert state["live_requests"] == 0, state
    assert state["resumed_after_preemption"] > 0  # the scenario really preempted requests
    done = [r for r in ids if r not in aborted]
    recs = {r["tag"]: r for r in rpc(llm, "telltale_collect", done)}
    for rid in done:  # preempted requests were neither lost nor counted twice
        assert recs[rid]["n_decode_tokens"] == len(finished[rid].outputs[0].token_ids) - 1
    rpc(llm, "telltale_collect", None)
    rpc(llm, "telltale_discard")
    state = rpc(llm, "telltale_state")
    assert state == {**state, "live_requests": 0, "uncollected": 0, "log_rows": 0}
    engines.close(llm)


def test_a_hook_that_does_not_fire_is_caught(engines, tiny_model_dir):
    from lm_eval_telltale.vllm.runtime import HookWiringError

    llm = engines.make(tiny_model_dir, "norms", {"layers": "4-6"})
    model = worker(llm).model_runner.get_model()
    model._tt_handles[1].remove()  # as if torch.compile had traced the hook away
    # the in-graph step counts its layers' calls on the device and checks them when the rows are
    # drained (no host read in a step): before any statistic of the request is made
    with pytest.raises(Exception) as e:
        llm.generate(_prompts([8]), [_sp(4, "x")], use_tqdm=False)
        rpc(llm, "telltale_collect", ["x"])
    chain = [e.value, e.value.__cause__, e.value.__context__]
    assert any(isinstance(x, HookWiringError) or "did not fire" in str(x) for x in chain if x is not None)
    engines.close(llm)


def test_a_hook_traced_away_by_torch_compile_is_caught(engines, tiny_model_dir, monkeypatch):
    """The hook as plain Python that reads process state (TELLTALE_DEBUG_PLAIN_HOOKS=1) works eagerly
    but is traced away by torch.compile: the per-step check must fail loudly, not record nothing."""
    from lm_eval_telltale.vllm.runtime import HookWiringError

    monkeypatch.setenv("TELLTALE_DEBUG_PLAIN_HOOKS", "1")
    llm = engines.make(tiny_model_dir, "norms", {"layers": "4-6"})  # eager: the plain hooks run
    llm.generate(_prompts([8]), [_sp(4, "e")], use_tqdm=False)
    assert rpc(llm, "telltale_collect", ["e"])[0]["n_decode_tokens"] == 3
    engines.close(llm)
    llm = engines.make(tiny_model_dir, "norms", {"layers": "4-6"}, compiled=True)
    with pytest.raises(Exception) as e:
        llm.generate(_prompts([8]), [_sp(4, "c")], use_tqdm=False)
    chain = [e.value, e.value.__cause__, e.value.__context__]
    assert any(isinstance(x, HookWiringError) or "did not fire" in str(x) for x in chain if x is not None)
    engines.close(llm)


def test_telltale_architecture_without_telltale_worker_fails_at_start(engines, tiny_model_dir):
    from lm_eval_telltale.config import resolve
    from lm_eval_telltale.vllm import engine_kwargs

    kw = engine_kwargs(resolve("norms", {}, 8), "Qwen3ForCausalLM")
    kw.pop("worker_cls")
    with pytest.raises(Exception) as e:
        engines.make(tiny_model_dir, method=None, **kw)
    assert "worker_cls" in str(e.value) or "worker_cls" in repr(e.value.__cause__)
