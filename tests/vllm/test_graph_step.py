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
from lm_eval_telltale.core.stats import EV_ACCEPTED, EV_INJECTED, EV_SUPPRESSED
from lm_eval_telltale.core.step import sampling_rows
from lm_eval_telltale.vllm.graph import GraphStep

L, MAX_ROWS, MAX_TOKENS, HIDDEN = 3, 6, 64, 8
MODES = {"request": {"warmup": 5}, "global": {"tau_mode": "global", "warmup": 3},
         "fixed": {"tau_mode": "fixed", "tau": 30.0, "warmup": 2}, "fixed-no-warmup": {"tau_mode": "fixed", "tau": 30.0},
         # a method that changes (h, r): suppress in each mode (matched online: engine-wide state tensors)
         "suppress-high": ("suppress", {"warmup": 5}),
         "suppress-random-clamp": ("suppress", {"suppress_mode": "random", "p": 0.3, "action": "clamp", "warmup": 3}),
         "suppress-matched": ("suppress", {"suppress_mode": "matched", "tau_mode": "global", "warmup": 3}),
         "suppress-matched-rates": ("suppress", {"suppress_mode": "matched", "match_rate": "[0.2, 0.5, 0.9]",
                                                 "warmup": 3}),
         # ERSS: its bank, streak and cooldown tables; a step longer than the table (its gathered form)
         "erss": ("erss", {"warmup": 3, "low_k": 1, "cooldown": 1, "bank_k": 3, "p_inject": 0.7, "gamma": 1.3,
                           "cos_min": -1.0}),
         # ALRR without its skip decision: every step through the re-run (RERUN), the accepted take it
         "alrr": ("alrr", {"warmup": 3, "skip_sync": False, "growth_eps": 0.0}),
         # online LRS: its per-step work (step_op) reads the fed token ids; requests 0 and 1 carry a
         # stop threshold, request 1 closes its thinking at position 8 (THINK_END), request 2 is a
         # warm-up candidate
         "lrs-online-norm": ("lrs", {"stop_signal": "norm", "stop_window": 2, "warmup": 3}),
         # LRS's confidence (and online LRS's conf signal) from each step's sampling logits: folded
         # into the windows by the next forward, in the graph (GraphStep.defer), the last by flush
         "lrs": ("lrs", {"conf_window": 3, "warmup": 3}),
         "lrs-online-conf": ("lrs", {"stop_signal": "conf", "stop_window": 2, "conf_window": 2, "warmup": 3})}
VOCAB = 16
THINK_END = 3
EXTRA = [{"telltale_stop_threshold": 26.0, "telltale_stop_token": 1, "telltale_think_end_token": THINK_END}] * 2 + \
    [{"telltale_think_end_token": THINK_END}]


def _tokens(rows):
    """The step's fed token ids (request 1 feeds THINK_END at position 8)."""
    return torch.tensor([THINK_END if (i == 1 and q == 8) else 10 + i for i, p in rows for q in p])


def RERUN(h, r):
    """A stand-in for ALRR's re-run of the layer: exact on whole numbers (a norm ~25 % higher)."""
    return h * 1.25 + 1.0, r


def _steps(seed: int = 0):
    """(per row: (slot's request index, positions)) per step: three requests, prompts 4/6/10 tokens,
    one chunked, then decode with a request joining late and one leaving; the third step's 12 tokens
    are more than the slot table holds (8)."""
    g = torch.Generator().manual_seed(seed)
    plan = [[(0, range(0, 4)), (1, range(0, 3))], [(1, range(3, 6)), (0, [4])], [(0, [5]), (1, [6]), (2, range(0, 10))]]
    pos = {0: 6, 1: 7, 2: 10}
    for t in range(14):
        rows = [(i, [pos[i]]) for i in (2, 0, 1) if not (i == 1 and t > 9)]  # request 1 ends; row order changes
        for i, p in rows:
            pos[i] = p[0] + 1
        plan.append(rows)
    out = []
    for rows in plan:
        n = sum(len(p) for _, p in rows)
        # per layer: (h, r) [n, HIDDEN] of whole numbers, so that ‖h + r‖ is exact in any summation
        # order (eager and compiled agree), spread over ~5…45 (above and below τ)
        hr = [((torch.randn(n, HIDDEN, generator=g) * (torch.rand(n, 1, generator=g) * 12 + 2)).round(),
               torch.randint(-3, 4, (n, HIDDEN), generator=g).float()) for _ in range(L)]
        out.append((rows, hr))
    return out


def _cfg(mode):
    method, knobs = MODES[mode] if isinstance(MODES[mode], tuple) else ("norms", MODES[mode])
    return resolve(method, {"layers": "4-6", **knobs}, 8)


def _core(mode):
    core = build_core(_cfg(mode), capacity=8)
    infos = [core.table.acquire(f"r{i}", prompt_len=n, seed=i, values=core.method.slot_values(EXTRA[i]))
             for i, n in enumerate((4, 6, 10))]
    return core, infos


def _state(core):
    """Copies of the slot table and the method's state, without ERSS's scratch bank entry (where the
    tokens that store nothing write)."""
    out = {**{f"m_{k}": v for k, v in core.method.graph_state().items()}, **core.table.t}
    out = {k: (v[:, :, :-1] if k in ("erss_bank", "erss_bank_norm", "m_bank", "m_bank_norm") else v).clone()
           for k, v in out.items()}
    return out


def _logits(steps):
    """Each step's sampling logits [rows, VOCAB] (a method that reads them: LRS)."""
    g = torch.Generator().manual_seed(7)
    return [torch.randn(len(rows), VOCAB, generator=g) * 3 for rows, _ in steps]


def _reference(mode, steps):
    """The core's own step (the ops' path), each step's logits observed at once after it; returns
    the core and every layer's (h', r')."""
    core, infos = _core(mode)
    outs = []
    for (rows, hr), logits in zip(steps, _logits(steps)):
        qsl = torch.tensor([0] + list(torch.tensor([len(p) for _, p in rows]).cumsum(0)))
        slots, positions = torch.tensor([infos[i].slot for i, _ in rows]), torch.tensor([q for _, p in rows for q in p])
        core.start(qsl, slots, positions, _tokens(rows))
        outs.append([core.layer(j, h, r, RERUN) for j, (h, r) in enumerate(hr)])
        core.end()
        if core.method.wants_logits:
            keep, last = sampling_rows(positions, qsl, slots, core.table.t["prompt_len"])
            core.method.observe_logits(slots, logits.clone(), keep, last)
    return core, outs


# compiling: ~17 s a case (global: its sample is summed in the graph); a compiled in-graph
# suppression and ERSS run in the engine tests
CASES = [(m, False) for m in MODES] + [("global", True), ("lrs-online-conf", True)]


@pytest.mark.parametrize("mode,compiled", CASES, ids=[f"{m}-{'compiled' if c else 'eager'}" for m, c in CASES])
def test_the_in_graph_step_equals_the_cores_step(mode, compiled):
    steps = _steps()
    ref, ref_out = _reference(mode, steps)
    core, infos = _core(mode)
    qsl_buf = torch.zeros(MAX_ROWS + 1, dtype=torch.int32)  # the runner's: int32, padded with the token count
    ids_buf = torch.zeros(MAX_TOKENS, dtype=torch.int32)  # the runner's input_ids
    g = GraphStep(core, qsl_buf, MAX_TOKENS, HIDDEN, ids_buf)

    def forward(positions, hr):
        return [g.layer(j, positions, h, r, RERUN) for j, (h, r) in enumerate(hr)]

    if compiled:  # a graph of its own (vLLM compiles each engine's model apart; here one code object serves every case)
        torch._dynamo.reset()
    fwd = torch.compile(forward, fullgraph=True, dynamic=True) if compiled else forward
    pad = lambda t: torch.cat([t, torch.full((2, HIDDEN), 9.0)])  # noqa: E731
    with torch.inference_mode():  # as vLLM's forward
        for (rows, hr), want, logits in zip(steps, ref_out, _logits(steps)):
            n = sum(len(p) for _, p in rows)
            qsl = [0] + list(torch.tensor([len(p) for _, p in rows]).cumsum(0).tolist())
            qsl_buf.copy_(torch.tensor(qsl + [n] * (MAX_ROWS + 1 - len(qsl)), dtype=torch.int32))
            core.reserve(len(rows))
            slots = torch.tensor([infos[i].slot for i, _ in rows])
            g.begin(slots)
            ids_buf[:n] = _tokens(rows)
            # a padded forward (CUDA-graph sizes): two tokens past the last row
            pos = torch.tensor([q for _, p in rows for q in p] + [0, 0])
            got = fwd(pos, [(pad(h), pad(r)) for h, r in hr])
            for (h2, r2), (h1, r1), (h0, r0) in zip(got, want, hr):  # the method's (h', r'); padding untouched
                assert torch.equal(h2[:n], h1) and torch.equal(r2[:n], r1)
                assert torch.equal(h2[n:], pad(h0)[n:]) and torch.equal(r2[n:], pad(r0)[n:])
            g.end(True)
            if core.method.wants_logits:  # the sampler's logits: deferred to the next forward
                before = _state(core)
                g.defer(slots, core.method.logits_values(slots, logits.clone()))
                assert all(torch.equal(v.nan_to_num(-1.0), before[k].nan_to_num(-1.0)) for k, v in _state(core).items())
        g.flush()  # the last step's values: folded on the host (no forward comes)
        # a forward with no step running (vLLM's dummy runs): changes nothing
        before = _state(core)
        hr = [(torch.full((5, HIDDEN), 7.0), torch.ones(5, HIDDEN))] * L
        got = fwd(torch.arange(5), hr)
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(got, hr))
        assert all(torch.equal(v.nan_to_num(-1.0), before[k].nan_to_num(-1.0)) for k, v in _state(core).items())
    g.check()  # every layer ran in every step
    got, want = core.drain(), ref.drain()
    cat = lambda parts: {k: torch.cat([p[k] for p in parts]) for k in parts[0]}  # noqa: E731
    got, want = cat(got), cat(want)
    for k in want:
        if compiled and k == "norm_out":  # the norm of a changed stream: the compiler's summation order
            assert torch.allclose(got[k], want[k], rtol=1e-6, atol=0), k
        else:
            assert torch.equal(got[k].nan_to_num(-1.0), want[k].nan_to_num(-1.0)), k
    assert (got["event"] != 0).any()  # the events are set (a step that did nothing would fail here)
    if mode == "lrs-online-norm":  # a candidate stopped, one closed its thinking, the warm-up one never stops
        at = core.table.t["stop_at"][[i.slot for i in infos]]
        assert (at[:2] >= 0).any() and at[2] < 0 and core.table.t["stop_answering"][infos[1].slot]
    if core.method.wants_logits:  # every request's sampled tokens counted (a fold that did nothing fails here)
        assert (core.table.t["conf_n"][[i.slot for i in infos]] > 0).all()
    if mode == "lrs-online-conf":  # the confidence windows stopped a candidate with a threshold, never the warm-up one
        at = core.table.t["stop_at"][[i.slot for i in infos]]
        assert (at[:2] >= 0).any() and at[2] < 0
    if core.method.modifies:  # the method acted on some tokens and not on others
        acted = (got["event"] & (EV_SUPPRESSED | EV_INJECTED | EV_ACCEPTED)) != 0
        assert acted.any() and not acted.all()
    got, want = _state(core), _state(ref)
    for name in want:
        assert torch.equal(got[name].nan_to_num(-1.0), want[name].nan_to_num(-1.0)), name
    if ref.thr.update_parts()[2]:
        for a, b in zip(core.thr.update_parts()[2], ref.thr.update_parts()[2]):
            assert torch.equal(a.nan_to_num(-1.0), b.nan_to_num(-1.0))


def test_a_layer_that_did_not_run_is_caught_when_drained():
    core, infos = _core("request")
    g = GraphStep(core, torch.tensor([0, 1, 1, 1, 1, 1, 1], dtype=torch.int32), MAX_TOKENS, HIDDEN)
    with torch.inference_mode():
        g.begin(torch.tensor([infos[0].slot]))
        for j in (0, 2):  # layer 1's hook skipped
            g.step(j, torch.tensor([4]), torch.tensor([20.0]))
        g.end(True)
    with pytest.raises(RuntimeError, match=r"ran \[1, 0, 1\] times in 1 steps"):
        g.check()
