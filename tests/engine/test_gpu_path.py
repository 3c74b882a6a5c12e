"""The GPU path, made safe on the CPU engine: async scheduling's extra step, the KV-write guard for
ALRR, the GPU worker's imports, and the engine settings the model types force."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import rpc, worker
from vllm import SamplingParams

from lm_eval_telltale.config import resolve
from lm_eval_telltale.core.step import build_step
from lm_eval_telltale.vllm import UnsupportedModelError, engine_kwargs

LAYERS = "4-6"


def _sp(n, tag):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, extra_args={"telltale_tag": tag})


def _extra_forward(rt, slot: int, position: int, hidden: int) -> None:
    """What async scheduling does after a request sampled its stop token: one more decode row for
    it, fed with that token (position prompt_len + n_out − 1), through every patched layer — by the
    in-graph step where the engine runs it (vllm/graph.py), else by the core's step."""
    core, graph = rt.core, rt.graph
    if graph is not None:
        core.reserve(1)
        with torch.inference_mode():  # as vLLM's forward
            graph.begin(torch.tensor([slot]))
            for j in range(len(rt.cfg.layers)):
                graph.step(j, torch.tensor([position]), torch.full((1,), 50.0))
            graph.end(True)
        return
    step = build_step(rt.table, torch.tensor([0, 1]), torch.tensor([slot]), torch.tensor([position]))
    core.begin(step)
    for j in range(len(rt.cfg.layers)):
        core.layer(j, torch.full((1, hidden), 3.0), torch.ones(1, hidden))
    rt.end_step()


@pytest.mark.engine
@pytest.mark.parametrize("method,knobs", [("norms", {}), ("alrr", {"skip_sync": True, "tau_mode": "fixed", "tau": 1e6})],
                         ids=["in-graph", "ops"])
def test_a_forward_after_the_answer_ended_changes_no_statistic(engines, tiny_model_dir, method, knobs):
    llm = engines.make(tiny_model_dir, method, {"layers": LAYERS, "warmup": 4, **knobs})
    assert (worker(llm)._tt.graph is not None) == (not knobs)
    prompt = {"prompt_token_ids": list(range(5, 25))}
    llm.generate([prompt], _sp(12, "ref"), use_tqdm=False)
    ref = rpc(llm, "telltale_collect", ["ref"], [12])[0]
    out = llm.generate([prompt], _sp(12, "a"), use_tqdm=False)[0]
    n_out = len(out.outputs[0].token_ids)
    rt = worker(llm)._tt
    info = next(i for i in rt._infos.values() if i.tag == "a")
    assert info.key in rt.table.by_key  # the engine has not reported it finished yet (in-process lag)
    _extra_forward(rt, info.slot, 20 + n_out - 1, 128)
    got = rpc(llm, "telltale_collect", ["a"], [n_out])[0]
    assert got["n_decode_tokens"] == n_out - 1 == ref["n_decode_tokens"]
    assert got["layers"] == ref["layers"]  # same prompt, greedy: the extra row left no trace
    assert rpc(llm, "telltale_state")["dropped_after_end"] == 1
    # control: without the answer's length the extra row would be counted
    llm.generate([prompt], _sp(12, "b"), use_tqdm=False)
    info = next(i for i in rt._infos.values() if i.tag == "b")
    _extra_forward(rt, info.slot, 20 + n_out - 1, 128)
    assert rpc(llm, "telltale_collect", ["b"])[0]["n_decode_tokens"] == n_out
    engines.close(llm)


@pytest.mark.engine
def test_a_forward_after_the_answer_ended_leaves_lrs_confidence_as_it_was(engines, tiny_model_dir):
    """LRS under async scheduling (or a stop string found late): the extra forward's logits reach
    the candidate's confidence window; collection with the answer's length takes them back by
    position, to the very figures of a run without that forward."""
    llm = engines.make(tiny_model_dir, "lrs", {"layers": LAYERS, "warmup": 4, "conf_window": 4})
    rt = worker(llm)._tt
    assert rt.graph is not None
    prompt = {"prompt_token_ids": list(range(5, 25))}
    llm.generate([prompt], _sp(12, "ref"), use_tqdm=False)
    ref = rpc(llm, "telltale_collect", ["ref"], [12])[0]
    assert ref["conf_tokens"] == 12 and ref["conf"] is not None

    def generate_with_extra_forward(tag):
        out = llm.generate([prompt], _sp(12, tag), use_tqdm=False)[0]
        n_out = len(out.outputs[0].token_ids)
        info = next(i for i in rt._infos.values() if i.tag == tag)
        assert info.key in rt.table.by_key  # not reported finished yet (in-process lag)
        pos = 20 + n_out - 1
        _extra_forward(rt, info.slot, pos, 128)
        keep, last = rt.graph.sampling(1)  # the extra forward's sampling row, made in the graph
        assert keep.tolist() == [True] and last.tolist() == [pos]
        rt._sampling_rows = (torch.tensor([info.slot]), keep, last)
        with torch.inference_mode():  # its logits, as the sampler hands them to the row mirror
            rt.apply_logits(torch.randn(1, 448) * 5)
        return n_out

    n_out = generate_with_extra_forward("a")
    got = rpc(llm, "telltale_collect", ["a"], [n_out])[0]
    assert (got["conf"], got["conf_mean"], got["conf_tokens"]) == (ref["conf"], ref["conf_mean"], 12)
    assert "_windows" not in got
    # control: without the answer's length the extra forward's confidence counts
    generate_with_extra_forward("b")
    bad = rpc(llm, "telltale_collect", ["b"])[0]
    assert bad["conf_tokens"] == 13 and bad["conf_mean"] != ref["conf_mean"]
    engines.close(llm)


def test_engine_settings_forced_by_the_model_types():
    cfg = resolve("norms", {"layers": LAYERS}, 8)
    kw = engine_kwargs(cfg, "Qwen3ForCausalLM")
    # async scheduling: vLLM's default where the in-graph step runs with per-request τ (exact under
    # it: LRS's windows take the extra forward back at collection); off for ALRR's skip decision
    # (outside the graph), for global τ, for online matched suppression (engine-wide rates) and for
    # tensor parallelism
    assert "async_scheduling" not in kw
    for same in (resolve("suppress", {"layers": LAYERS}, 8), resolve("erss", {"layers": LAYERS}, 8),
                 resolve("alrr", {"layers": LAYERS}, 8),
                 resolve("suppress", {"layers": LAYERS, "suppress_mode": "matched", "match_rate": 0.1}, 8),
                 resolve("lrs", {"layers": LAYERS}, 8), resolve("lrs", {"layers": LAYERS, "stop_signal": "conf"}, 8)):
        assert "async_scheduling" not in engine_kwargs(same, "Qwen3ForCausalLM")
    for other in (resolve("norms", {"layers": LAYERS, "tau_mode": "global"}, 8),
                  resolve("alrr", {"layers": LAYERS, "skip_sync": True}, 8),
                  resolve("suppress", {"layers": LAYERS, "suppress_mode": "matched"}, 8)):
        assert engine_kwargs(other, "Qwen3ForCausalLM")["async_scheduling"] is False
    assert engine_kwargs(cfg, "Qwen3ForCausalLM", parallel=(2, 1))["async_scheduling"] is False
    assert kw["worker_cls"] == "lm_eval_telltale.vllm.worker_cpu.TelltaleCPUWorker"
    # the V1 runner: a user's VLLM_USE_V2_MODEL_RUNNER=1 is a clear error, not an obscure one later
    import os

    old = os.environ["VLLM_USE_V2_MODEL_RUNNER"]
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"
    try:
        with pytest.raises(UnsupportedModelError, match="V1 model runner"):
            engine_kwargs(cfg, "Qwen3ForCausalLM")
    finally:
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = old
    # vLLM's batch-invariant kernels need Triton: refused on the CPU engine, with the reason
    with pytest.raises(UnsupportedModelError, match="batch_invariant"):
        engine_kwargs(resolve("norms", {"layers": LAYERS, "batch_invariant": True}, 8), "Qwen3ForCausalLM")


def test_gpu_compilation_splits_the_graph_at_every_telltale_op(monkeypatch):
    """On GPU the telltale ops are splitting points of piecewise CUDA graphs (a captured op would
    replay without running its Python); vLLM's own splitting ops stay; FULL graphs are refused."""
    from vllm.platforms import current_platform

    from lm_eval_telltale.vllm import compilation_config
    from lm_eval_telltale.vllm.ops import OP_NAMES

    assert compilation_config({"x": 1}) == {"x": 1}  # CPU: vLLM's defaults as they are
    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    cc = compilation_config(None)
    assert set(OP_NAMES) == {"telltale::post_layer", "telltale::observe_norm", "telltale::kv_write_off",
                             "telltale::kv_write_on"} <= set(cc["splitting_ops"])
    assert "vllm::unified_attention_with_output" in cc["splitting_ops"] and cc["cudagraph_mode"] == "PIECEWISE"
    mine = compilation_config({"splitting_ops": ["my::op", "telltale::post_layer"]})["splitting_ops"]
    assert mine == ["my::op", "telltale::post_layer", "telltale::observe_norm", "telltale::kv_write_off",
                    "telltale::kv_write_on"]
    with pytest.raises(UnsupportedModelError, match="FULL"):
        compilation_config({"cudagraph_mode": "FULL_AND_PIECEWISE"})
    # the in-graph step runs no Python in the forward: FULL graphs allowed (the model types ask for
    # them through engine_kwargs, which knows the method)
    assert compilation_config({"cudagraph_mode": "FULL_AND_PIECEWISE"}, full_graphs=True)["cudagraph_mode"] == \
        "FULL_AND_PIECEWISE"
    full = {"cudagraph_mode": "FULL_AND_PIECEWISE"}
    for name in ("norms", "suppress", "erss", "alrr"):
        cfg = resolve(name, {"layers": LAYERS}, 8)
        assert engine_kwargs(cfg, "Qwen3ForCausalLM", compilation=full)["compilation_config"]["cudagraph_mode"] == \
            "FULL_AND_PIECEWISE"
    with pytest.raises(UnsupportedModelError, match="FULL"):
        engine_kwargs(resolve("alrr", {"layers": LAYERS, "skip_sync": True}, 8), "Qwen3ForCausalLM", compilation=full)


def test_gpu_worker_never_imports_the_cpu_worker():
    """Importing vLLM's CPU worker replaces torch.cuda streams/events process-wide; the GPU
    worker_cls module must not pull it in."""
    code = ("import sys, torch\n"
            "import lm_eval_telltale.vllm.worker_gpu as w\n"
            "assert 'vllm.v1.worker.cpu_worker' not in sys.modules, 'cpu worker imported'\n"
            "assert torch.cuda.Stream.__name__ == 'Stream', torch.cuda.Stream\n"
            "print(w.TelltaleGPUWorker.__mro__[1].__name__)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "TelltaleWorkerMixin"


class _Backend:
    forward_includes_kv_cache_update = True

    @staticmethod
    def get_name():
        return "WRITES_IN_FORWARD"


class _Attn(torch.nn.Module):
    def __init__(self, backend, shared=None):
        super().__init__()
        self.layer_name, self.kv_cache, self.attn_backend = "model.layers.3.self_attn.attn", torch.tensor([]), backend
        self.kv_sharing_target_layer_name = shared


def test_kv_guard_refuses_a_backend_that_writes_in_its_forward():
    from lm_eval_telltale.vllm.kvguard import check_separable_kv_write

    layer = torch.nn.Sequential(_Attn(_Backend))
    with pytest.raises(ValueError, match="WRITES_IN_FORWARD") as e:
        check_separable_kv_write(layer, "model.layers.3")
    assert "attention_backend=" in str(e.value)
    _Backend.forward_includes_kv_cache_update = False
    try:
        check_separable_kv_write(layer, "model.layers.3")  # a separate KV-write op: fine
    finally:
        _Backend.forward_includes_kv_cache_update = True
    check_separable_kv_write(torch.nn.Sequential(_Attn(_Backend, shared="model.layers.1.self_attn.attn")), "x")


@pytest.mark.engine
def test_alrr_engine_is_refused_on_such_a_backend(engines, tiny_model_dir, monkeypatch):
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    monkeypatch.setattr(CPUAttentionBackend, "forward_includes_kv_cache_update", True)
    with pytest.raises(Exception) as e:
        engines.make(tiny_model_dir, "alrr", {"layers": LAYERS})
    assert "writes K/V inside its" in str(e.value) or "writes K/V inside its" in repr(e.value.__cause__)



def _same_prompt_requests(llm, prompt, tags, salts=None, seeds=(11, 12, 13, 14)):
    from vllm import TokensPrompt

    ps = []
    for i, _t in enumerate(tags):
        p = TokensPrompt(prompt_token_ids=prompt)
        if salts:
            p["cache_salt"] = salts[i]
        ps.append(p)
    sps = [SamplingParams(max_tokens=24, temperature=0.8, seed=s, ignore_eos=True, extra_args={"telltale_tag": t})
           for s, t in zip(seeds, tags)]
    outs = llm.generate(ps, sps, use_tqdm=False)
    stats = {r["tag"]: r["layers"] for r in rpc(llm, "telltale_collect", tags)}
    return outs, [o.outputs[0].token_ids for o in outs], [stats[t] for t in tags]


@pytest.mark.engine
def test_lrs_candidates_share_the_prompt_through_the_prefix_cache(engines, tiny_model_dir):
    """An observing method leaves prefix caching on: 4 candidates of one prompt compute it once, and
    tokens and statistics equal a run without the cache (norms to float32 rounding)."""
    prompt = [(7 * j) % 250 + 3 for j in range(300)]
    tags = ["c0", "c1", "c2", "c3"]
    llm = engines.make(tiny_model_dir, "lrs", {"layers": LAYERS, "warmup": 4}, enable_chunked_prefill=False,
                       max_num_batched_tokens=1024)
    assert llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
    outs, toks, stats = _same_prompt_requests(llm, prompt, tags)
    engines.close(llm)
    cached = [o.num_cached_tokens for o in outs]
    assert cached[0] == 0 and all(c >= 256 for c in cached[1:]), cached  # the prompt computed once
    llm = engines.make(tiny_model_dir, "lrs", {"layers": LAYERS, "warmup": 4}, enable_chunked_prefill=False,
                       max_num_batched_tokens=1024, enable_prefix_caching=False)
    outs2, toks2, stats2 = _same_prompt_requests(llm, prompt, tags)
    engines.close(llm)
    assert all(o.num_cached_tokens == 0 for o in outs2)
    assert toks == toks2
    # the prompt's K/V is the same computation, but over a different number of query rows (a cache
    # hit leaves only the last partial block to compute), which changes float32 summation order
    for a, b in zip(stats, stats2):
        for layer in a:
            for k in ("count", "C", "tau_ready"):
                assert a[layer][k] == b[layer][k]
            for k in ("mean", "max", "A", "late_sum"):
                assert a[layer][k] == pytest.approx(b[layer][k], rel=1e-5)


@pytest.mark.engine
def test_salted_requests_never_share_blocks_of_a_modifying_method(engines, tiny_model_dir):
    """A method that changes hidden states runs with prefix caching only when every request has its
    own cache_salt (the lm-eval model types salt each request with its tag): no block crosses."""
    from lm_eval_telltale.vllm import engine_kwargs

    cfg = resolve("suppress", {"layers": LAYERS}, 8)
    assert engine_kwargs(cfg, "Qwen3ForCausalLM")["enable_prefix_caching"] is False  # unsalted callers
    assert "enable_prefix_caching" not in engine_kwargs(cfg, "Qwen3ForCausalLM", salted_requests=True)
    prompt = [(5 * j) % 250 + 3 for j in range(300)]
    llm = engines.make(tiny_model_dir, "suppress", {"layers": LAYERS, "warmup": 4}, enable_prefix_caching=True)
    outs, _, _ = _same_prompt_requests(llm, prompt, ["s0", "s1"], salts=["s0", "s1"], seeds=(1, 2))
    assert [o.num_cached_tokens for o in outs] == [0, 0]
    outs, _, _ = _same_prompt_requests(llm, prompt, ["u0", "u1"], seeds=(1, 2))  # control: unsalted share
    assert outs[1].num_cached_tokens >= 256
    engines.close(llm)
