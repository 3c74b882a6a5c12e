"""The in-graph step (vllm/graph.py) against the core's own step, without an engine: the same
rows, thresholds and slot table, bit for bit — run eagerly and compiled as one whole graph
(``torch.compile(fullgraph=True)``: no graph break), with padded ``query_start_loc``/``row_slot``
as vLLM's runner gives them, tokens of several requests per step, prefill and decode, and rows
without a request."""

from __future__ import annotations

import pytest
import torch

from lm_eval_telltale.config import resolve
from lm_eval_telltale.core.engine import build_core
from lm_eval_telltale.vllm.graph import GraphStep

L, MAX_ROWS, MAX_TOKENS = 3, 6, 64
MODES = {"request": {"warmup": 5}, "global": {"tau_mode": "global", "warmup": 3},
         "fixed": {"tau_mode": "fixed", "tau": 30.0, "warmup": 2}, "fixed-no-warmup": {"tau_mode": "fixed", "tau": 30.0}}


def _steps(seed: int = 0):
    """(per row: (slot's request index, positions)) per step: three requests, prompts 4/6/3 tokens,
    one chunked, then decode with a request joining late and one leaving."""
    g = torch.Generator().manual_seed(seed)
    plan = [[(0, range(0, 4)), (1, range(0, 3))], [(1, range(3, 6)), (0, [4])], [(0, [5]), (1, [6]), (2, range(0, 3))]]
    pos = {0: 6, 1: 7, 2: 3}
    for t in range(14):
        rows = [(i, [pos[i]]) for i in (2, 0, 1) if not (i == 1 and t > 9)]  # request 1 ends; row order changes
        for i, p in rows:
            pos[i] = p[0] + 1
        plan.append(rows)
    return [(rows, [torch.rand(sum(len(p) for _, p in rows), generator=g) * 40 + 10 for _ in range(L)]) for rows in plan]


def _core(mode):
    cfg = resolve("norms", {"layers": "4-6", **MODES[mode]}, 8)
    core = build_core(cfg, capacity=8)
    infos = [core.table.acquire(f"r{i}", prompt_len=n, seed=i) for i, n in enumerate((4, 6, 3))]
    return core, infos


def _reference(mode, steps):
    core, infos = _core(mode)
    for rows, norms in steps:
        qsl = torch.tensor([0] + list(torch.tensor([len(p) for _, p in rows]).cumsum(0)))
        core.start(qsl, torch.tensor([infos[i].slot for i, _ in rows]),
                   torch.tensor([q for _, p in rows for q in p]))
        for j in range(L):
            core.observe(j, norms[j])
        core.end()
    return core


CASES = [(m, False) for m in MODES] + [("request", True), ("global", True)]  # compiling: ~17 s a case


@pytest.mark.parametrize("mode,compiled", CASES, ids=[f"{m}-{'compiled' if c else 'eager'}" for m, c in CASES])
def test_the_in_graph_step_equals_the_cores_step(mode, compiled):
    steps = _steps()
    ref = _reference(mode, steps)
    core, infos = _core(mode)
    qsl_buf = torch.zeros(MAX_ROWS + 1, dtype=torch.int32)  # the runner's: int32, padded with the token count
    g = GraphStep(core, qsl_buf, MAX_TOKENS)

    def forward(positions, norms):
        for j in range(L):
            g.layer(j, positions, norms[j])

    if compiled:  # a graph of its own (vLLM compiles each engine's model apart; here one code object serves every case)
        torch._dynamo.reset()
    fwd = torch.compile(forward, fullgraph=True, dynamic=True) if compiled else forward
    with torch.inference_mode():  # as vLLM's forward
        for rows, norms in steps:
            n = sum(len(p) for _, p in rows)
            qsl = [0] + list(torch.tensor([len(p) for _, p in rows]).cumsum(0).tolist())
            qsl_buf.copy_(torch.tensor(qsl + [n] * (MAX_ROWS + 1 - len(qsl)), dtype=torch.int32))
            core.reserve(len(rows))
            g.begin(torch.tensor([infos[i].slot for i, _ in rows]))
            # a padded forward (CUDA-graph sizes): two tokens past the last row
            pos = torch.tensor([q for _, p in rows for q in p] + [0, 0])
            fwd(pos, [torch.cat([x, torch.full((2,), 99.0)]) for x in norms])
            g.end(True)
        # a forward with no step running (vLLM's dummy runs): changes nothing
        before = {k: v.clone() for k, v in core.table.t.items()}
        fwd(torch.arange(5), [torch.full((5,), 77.0)] * L)
        assert all(torch.equal(before[k], core.table.t[k]) for k in before)
    g.check()  # every layer ran in every step
    got, want = core.drain(), ref.drain()
    cat = lambda parts: {k: torch.cat([p[k] for p in parts]) for k in parts[0]}  # noqa: E731
    got, want = cat(got), cat(want)
    for k in want:
        assert torch.equal(got[k].nan_to_num(-1.0), want[k].nan_to_num(-1.0)), k
    assert (got["event"] != 0).any()  # the events are set (a step that did nothing would fail here)
    for name in core.table.t:
        assert torch.equal(core.table.t[name], ref.table.t[name]), name
    if mode in ("request", "global"):
        for a, b in zip(core.thr.update_parts()[2], ref.thr.update_parts()[2]):
            assert torch.equal(a.nan_to_num(-1.0), b.nan_to_num(-1.0))


def test_a_layer_that_did_not_run_is_caught_when_drained():
    core, infos = _core("request")
    g = GraphStep(core, torch.tensor([0, 1, 1, 1, 1, 1, 1], dtype=torch.int32), MAX_TOKENS)
    with torch.inference_mode():
        g.begin(torch.tensor([infos[0].slot]))
        for j in (0, 2):  # layer 1's hook skipped
            g.layer(j, torch.tensor([4]), torch.tensor([20.0]))
        g.end(True)
    with pytest.raises(RuntimeError, match=r"ran \[1, 0, 1\] times in 1 steps"):
        g.check()
