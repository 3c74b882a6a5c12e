"""Core behaviour on crafted tensors (no engine)."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch

from lm_eval_telltale.core.engine import CoreEngine, Method, residual_norm
from lm_eval_telltale.core.rng import seed_from, uniform
from lm_eval_telltale.core.state import SlotTable
from lm_eval_telltale.core.stats import EV_ABOVE, summarize
from lm_eval_telltale.core.step import build_step, finish_step
from lm_eval_telltale.core.thresholds import P2Quartiles, Thresholds, iqr_tau, p2_tau, sort5


def test_p2_tracks_exact_quartiles_per_stream():
    g = torch.Generator().manual_seed(0)
    S, T = 6, 3000
    # streams with different scales: estimators must not mix
    scale = torch.arange(1, S + 1, dtype=torch.float32)
    data = torch.randn(T, S, generator=g).abs() * scale + 10 * scale
    p2 = P2Quartiles((S,))
    for t in range(T):
        p2.update(data[t], torch.ones(S, dtype=torch.bool))
    q1, q3 = p2.quartiles()
    ex1 = torch.quantile(data, 0.25, dim=0)
    ex3 = torch.quantile(data, 0.75, dim=0)
    assert torch.allclose(q1, ex1, rtol=0.01), (q1, ex1)
    assert torch.allclose(q3, ex3, rtol=0.01), (q3, ex3)


def test_sort5_sorts_as_torch_sort():
    """The P² start's sorting network gives torch.sort's values: every ordering of five distinct
    values, ties, infinities and NaN (last)."""
    import itertools

    perms = torch.tensor(list(itertools.permutations(range(5))), dtype=torch.float32)
    assert torch.equal(sort5(perms), torch.sort(perms, -1).values)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 4, (4000, 5), generator=g).to(torch.float32)
    special = torch.tensor([float("nan"), float("inf"), -float("inf")])
    pick = torch.rand(4000, 5, generator=g) < 0.15
    x = torch.where(pick, special[torch.randint(0, 3, (4000, 5), generator=g)], x)
    got, want = sort5(x.view(40, 100, 5)).view(4000, 5), torch.sort(x, -1).values
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(torch.nan_to_num(got, nan=7.0), torch.nan_to_num(want, nan=7.0))


def test_p2_mask_and_warmup_nan():
    p2 = P2Quartiles((2,))
    for t in range(4):
        p2.update(torch.tensor([float(t), 100.0]), torch.tensor([True, False]))
    q1, q3 = p2.quartiles()
    assert math.isnan(q1[0]) and math.isnan(q3[1])  # < 5 samples: no estimate
    assert p2.count.tolist() == [4, 0]
    p2.update(torch.tensor([4.0, 0.0]), torch.tensor([True, False]))
    q1, q3 = p2.quartiles()
    # P² starts every marker set from the five sorted samples: the middle marker is their median
    assert q1[0] == 2.0 and q3[0] == 2.0 and math.isnan(q1[1])


def test_iqr_rule():
    tau = iqr_tau(torch.tensor([1.0, 5.0]), torch.tensor([3.0, 5.0]), 1.5, 1e-3, None)
    assert tau.tolist() == pytest.approx([3.0 + 1.5 * 2.0, 5.0 + 1.5e-3])
    tau = iqr_tau(torch.tensor([1.0]), torch.tensor([3.0]), 1.5, 1e-3, 10.0)
    assert tau.tolist() == [10.0]


def test_request_thresholds_are_per_request_and_respect_warmup():
    thr = Thresholds("request", num_layers=2, capacity=4, warmup=10)
    slot = torch.tensor([0, 1, 2])
    for t in range(9):
        thr.update(slot, torch.tensor([[1.0 + t, 2.0], [100.0 + t, 200.0], [5.0, 5.0]]), torch.tensor([True, True, False]))
    assert torch.isnan(thr.tau_slots()).all()  # 9 < warmup
    thr.update(slot, torch.tensor([[10.0, 2.0], [109.0, 200.0], [5.0, 5.0]]), torch.tensor([True, True, False]))
    tau = thr.tau_slots()
    assert torch.isfinite(tau[:2]).all() and torch.isnan(tau[2:]).all()
    assert tau[1, 0] > 100 > tau[0, 0]  # request 1's τ comes from request 1's norms only
    thr.reset_slot(1)
    assert torch.isnan(thr.tau_slots()[1]).all()


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "compiled"])
def test_request_step_writes_only_its_slots_rows_in_place(fused):
    """Request mode updates, in place, only the rows of the slots with a new generated token in the
    step — what a full-table P² update of the same samples gives, bit for bit — with prefill tokens
    sharing a slot with its new token, tokens without a slot (-1), slots reset mid-stream, and
    steps in inference mode (vLLM's) or not, in any order (a τ table made in one, written in the
    other)."""

    g = torch.Generator().manual_seed(5)
    S, L = 6, 2
    thr = Thresholds("request", num_layers=L, capacity=S, warmup=5)
    if fused:
        thr.fuse()
    ref = P2Quartiles((S, L))
    thr.tau_slots()
    ptrs = [t.data_ptr() for t in (thr.p2.q, thr.p2.n, thr.p2.np_, thr.p2.count)]
    for t in range(120):
        with torch.inference_mode() if t % 3 else contextlib.nullcontext():
            k = 1 + t % 3
            new = torch.randperm(S, generator=g)[:k]  # distinct slots with a new generated token
            others = torch.cat([new[:1].repeat(t % 2), torch.tensor([-1] * (t % 3 == 0))])  # a prefill token, a slotless one
            slot = torch.cat([others, new])
            mask = torch.cat([torch.zeros(len(others), dtype=torch.bool), torch.ones(k, dtype=torch.bool)])
            norms = torch.randn(len(slot), L, generator=g).abs() * (1 + slot.clamp(min=0)[:, None])
            thr.update(slot, norms, mask)
            x, has = torch.zeros(S, L), torch.zeros(S, L, dtype=torch.bool)
            x[new], has[new] = norms[mask], True
            ref.update(x, has)
            if t % 20 == 19:
                thr.reset_slot(int(new[0]))
                ref.reset(int(new[0]))
            _same(thr.tau_slots(), p2_tau(ref.q, ref.count, *thr._consts))
            _same(thr.p2.q[:S], ref.q)
            _same(thr.p2.count[:S], ref.count)
    assert torch.isfinite(thr.tau_slots()).any() and thr.fused == fused
    assert thr.tau_slots().shape == (S, L)
    # the state was written in place, never made again
    assert [t.data_ptr() for t in (thr.p2.q, thr.p2.n, thr.p2.np_, thr.p2.count)] == ptrs


def test_global_thresholds_feed_one_batch_mean_per_step():
    thr = Thresholds("global", num_layers=1, capacity=4, warmup=5)
    for t in range(5):
        thr.update(torch.tensor([0, 1, 2]), torch.tensor([[t], [t + 2.0], [99.0]]), torch.tensor([True, True, False]))
    assert thr.p2.count.tolist() == [5]  # one sample per step
    assert thr.p2.q[0, 0, 2].item() == pytest.approx(3.0)  # median of step means 1..5
    assert thr.tau_slots().shape == (1, 1)


def _same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("mode", ["request", "global"])
def test_fused_threshold_update_is_bit_identical_to_eager(mode):
    """The compiled threshold step (what a compiled vLLM engine runs: in request mode the scatter of
    the step's tokens to their slots, the P² update and the next step's τ) gives the eager
    operations' numbers bit for bit: streams with ties, masked-out estimators, token counts from 1
    up with other tokens mixed in, slots reset mid-stream and a table that grows (a new shape:
    compiled again)."""
    from torch._dynamo.utils import counters

    g = torch.Generator().manual_seed(3)
    L = 3
    eager = Thresholds(mode, num_layers=L, capacity=4, warmup=6)
    fused = Thresholds(mode, num_layers=L, capacity=4, warmup=6)
    fused.fuse()
    assert fused.fused and not eager.fused
    graphs = counters["stats"]["unique_graphs"]
    for t in range(160):
        if t == 80:
            for thr in (eager, fused):
                thr.resize(8)
            graphs = counters["stats"]["unique_graphs"]
        if t in (79, 159):  # compiled at fuse() / resize(), never during a step (in inference mode or not)
            assert counters["stats"]["unique_graphs"] == graphs
        ctx = torch.inference_mode() if t % 2 else contextlib.nullcontext()  # vLLM steps run in it
        S = eager.capacity if mode == "request" else 8
        with ctx:  # the inputs too: made in inference mode, as in vLLM, or not
            # 1 .. S-1 new generated tokens (distinct slots), then 0-2 other tokens (a prefill's) on any slot
            k = 1 + t % (S - 1)
            extra = torch.randint(0, S, (t % 3,), generator=g)
            slot = torch.cat([torch.randperm(S, generator=g)[:k], extra])
            # values on a coarse grid (ties with the markers) mixed with continuous ones
            norms = torch.where(torch.rand(len(slot), L, generator=g) < 0.3,
                                torch.randint(0, 4, (len(slot), L), generator=g).float(),
                                torch.randn(len(slot), L, generator=g).abs() * (1 + slot[:, None]))
            mask = torch.cat([torch.rand(k, generator=g) < 0.8, torch.zeros(len(extra), dtype=torch.bool)])
            for thr in (eager, fused):
                thr.update(slot, norms, mask)
            if mode == "request" and t % 37 == 36:
                for thr in (eager, fused):
                    thr.reset_slot(int(slot[0]))
        _same(fused.tau_slots(), eager.tau_slots())
        # τ kept up to date (written by the step, by a reset, by a resize) = τ of the state now
        now = p2_tau(eager.p2.q, eager.p2.count, *eager._consts)
        _same(eager.tau_slots(), now[: eager.capacity] if mode == "request" else now[None, :])
    rows = slice(0, eager.capacity) if mode == "request" else slice(None)  # not request mode's dump row
    for a, b in ((fused.p2.q, eager.p2.q), (fused.p2.n, eager.p2.n), (fused.p2.np_, eager.p2.np_),
                 (fused.p2.count, eager.p2.count)):
        _same(a[rows], b[rows])
    assert torch.isfinite(eager.tau_slots()).any()  # the streams did reach the main phase
    assert fused.fused  # the compiled step ran throughout (a failure would have fallen back to eager)


def test_a_failing_compiled_update_falls_back_to_the_same_numbers(caplog, monkeypatch):
    import lm_eval_telltale.core.fuse as F

    def broken(*a):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(F, "compiled", lambda fn, dynamic=False: broken)
    thr, ref = Thresholds("request", num_layers=2, capacity=4), Thresholds("request", num_layers=2, capacity=4)
    thr.p2.fuse()  # as if warmed: the failure comes in a step
    assert thr.fused
    slot, mask = torch.tensor([0, 2]), torch.tensor([True, True])
    with caplog.at_level("WARNING", logger="lm_eval_telltale"):
        for t in range(7):
            for x in (thr, ref):
                x.update(slot, torch.tensor([[t, 2.0 * t], [3.0, t * t]]), mask)
    assert not thr.fused
    assert "no compiler here" in caplog.text and caplog.text.count("failed") == 1
    _same(thr.tau_slots(), ref.tau_slots())
    assert torch.isfinite(ref.tau_slots()[0]).all()
    caplog.clear()
    with caplog.at_level("WARNING", logger="lm_eval_telltale"):  # failing when warmed at fuse(): the same
        other = Thresholds("global", num_layers=2, capacity=4)
        other.fuse()
    assert not other.fused and caplog.text.count("failed") == 1


def test_fixed_thresholds():
    thr = Thresholds("fixed", num_layers=2, capacity=4, tau_values=[3.0, 4.0])
    assert thr.tau_slots().tolist() == [[3.0, 4.0]]
    with pytest.raises(ValueError):
        Thresholds("fixed", num_layers=2, capacity=4, tau_values=[3.0])


def test_slot_table_lifecycle_and_growth():
    tab = SlotTable(capacity=2)
    a = tab.acquire("a", prompt_len=5, seed=1)
    b = tab.acquire("b", prompt_len=7, seed=2)
    assert tab.acquire("a", prompt_len=99, seed=9) is a  # resume after preemption keeps the slot
    c = tab.acquire("c", prompt_len=3, seed=3)  # grows
    assert tab.capacity == 4 and len({a.slot, b.slot, c.slot}) == 3
    assert tab.t["prompt_len"][[a.slot, b.slot, c.slot]].tolist() == [5, 7, 3]
    assert tab.release("b") is b and tab.release("b") is None
    d = tab.acquire("d", prompt_len=1, seed=4)
    assert d.slot == b.slot and d.serial != b.serial and tab.t["last_pos"][d.slot] == -1
    assert len(tab) == 3


def test_step_map_decides_decode_per_token():
    tab = SlotTable(capacity=4)
    r0 = tab.acquire("r0", prompt_len=33, seed=0)  # prompt of 33: a 1-token prefill chunk at pos 32
    r1 = tab.acquire("r1", prompt_len=4, seed=0)
    r2 = tab.acquire("r2", prompt_len=10, seed=0)
    # rows: r1 decoding (pos 6), r0 last prompt chunk (pos 32, q=1), r2 prefill chunk 8..11 crosses into decode? no:
    qsl = torch.tensor([0, 1, 2, 6])
    row_slot = torch.tensor([r1.slot, r0.slot, r2.slot])
    positions = torch.tensor([6, 32, 8, 9, 10, 11, 0, 0])  # two padding tokens at the end
    st = build_step(tab, qsl, row_slot, positions)
    assert st.slot.tolist() == [r1.slot, r0.slot, r2.slot, r2.slot, r2.slot, r2.slot, -1, -1]
    assert st.decode.tolist() == [True, False, False, False, True, True, False, False]
    assert st.new.tolist() == st.decode.tolist()
    finish_step(tab, st)
    assert tab.t["last_pos"][r2.slot] == 11 and tab.t["last_pos"][r1.slot] == 6
    # recomputation of old positions (after preemption) is decode but not new
    st2 = build_step(tab, torch.tensor([0, 3]), torch.tensor([r2.slot]), torch.tensor([10, 11, 12]))
    assert st2.decode.tolist() == [True, True, True] and st2.new.tolist() == [False, False, True]


def test_sampling_rows_keep_a_rows_token_once_its_prompt_ended():
    """Each row's last fed position, and whether its sampled token is kept: a decoding row and the
    prompt's last chunk yes, an earlier chunk no; rows past the step's (as the in-graph step sees
    its fixed-size buffers: query_start_loc padded with the token count, slot -1) give values and
    no error."""
    from lm_eval_telltale.core.step import sampling_rows

    prompt_len = torch.tensor([33, 4, 40, 7])
    positions = torch.tensor([6, 32, 8, 9, 10, 11, 0, 0])  # rows: slot 1 decoding, slot 0's last chunk, slot 2's chunk
    keep, last = sampling_rows(positions, torch.tensor([0, 1, 2, 6, 8, 8]), torch.tensor([1, 0, 2, -1, -1]), prompt_len)
    assert last[:3].tolist() == [6, 32, 11] and keep[:3].tolist() == [True, True, False]
    assert keep.shape == last.shape == (5,) and last.dtype == torch.int64


@pytest.mark.parametrize("path", ["layer", "observe"])
def test_core_engine_observe_records_norms_and_events(path):
    """The observe-only path (the adapter computes ‖h + r‖ in its graph and hands over the norm)
    records what ``layer`` records from (h, r)."""
    tab = SlotTable(capacity=4)
    a = tab.acquire("a", prompt_len=2, seed=0)
    thr = Thresholds("fixed", num_layers=1, capacity=4, tau_values=[5.0])
    core = CoreEngine([3], Method(None, tab, 1), thr, tab)
    core.begin(build_step(tab, torch.tensor([0, 3]), torch.tensor([a.slot]), torch.tensor([1, 2, 3])))
    h = torch.tensor([[3.0, 0.0], [6.0, 0.0], [1.0, 0.0]])
    r = torch.tensor([[0.0, 4.0], [0.0, 0.0], [0.0, 0.0]])
    if path == "layer":
        h2, r2 = core.layer(0, h, r)
        assert h2 is h and r2 is r  # observing changes nothing
    else:
        core.observe(0, residual_norm(h, r)[1])
    assert core.layer_calls == 1  # the per-step "every hook fired" check counts both paths
    core.end()
    (rec,) = core.drain()  # the step's rows stay on the device until drained
    assert rec["position"].tolist() == [2, 3]  # position 1 is a prompt token
    assert rec["norm"][:, 0].tolist() == [6.0, 1.0]
    assert rec["event"][:, 0].tolist() == [EV_ABOVE, 0]
    assert residual_norm(h, r)[1].tolist() == [5.0, 6.0, 1.0]


def test_only_observing_methods_take_the_norm_only_path():
    """norms and lrs never change (h, r): their vLLM hooks hand the core only the norm (so a compiled
    model keeps stock vLLM's kernels); every method that intervenes gets (h, r)."""
    from lm_eval_telltale.core.methods import method_module
    from lm_eval_telltale.spec import METHODS

    only = {m for m in METHODS if method_module(m).METHOD.observes_only()}
    assert only == {"norms", "lrs"}

    class Sneaky(Method):  # overrides apply without declaring modifies: not observe-only
        def apply(self, core, j, h, r, x, n, tau, rerun):
            return h * 0, r, None

    assert not Sneaky.observes_only()


def test_summarize_statistics():
    n = np.array([[1.0], [2.0], [3.0], [4.0], [10.0], [6.0], [7.0], [8.0], [9.0], [20.0]])
    tau = np.array([[np.nan]] * 2 + [[5.0]] * 8)
    ev = np.zeros((10, 1), dtype=np.int16)
    s = summarize(n, tau, ev, [7])["7"]
    assert s["count"] == 10 and s["A"] == pytest.approx(70.0) and s["max"] == 20.0
    assert s["B"] == pytest.approx(5 + 1 + 2 + 3 + 4 + 15)
    assert s["C"] == 6
    assert s["D"] == pytest.approx(3 + 4 + 15)        # last 30 %: t >= 7
    assert s["late_sum"] == pytest.approx(7 + 8 + 9 + 20)  # last third: t >= 6 (= 2*10//3)
    assert s["tau_ready"] == 8 and s["tau_first"] == 5.0


def test_counter_based_draws_are_reproducible_and_independent():
    seed = torch.tensor([seed_from(1234, "a")] * 4 + [seed_from(1234, "b")] * 4)
    pos = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    u = uniform(seed, pos, layer=5)
    assert torch.equal(u, uniform(seed, pos, layer=5))
    assert not torch.equal(u[:4], u[4:])  # different request
    assert not torch.equal(u, uniform(seed, pos, layer=6))
    # a request's draw does not depend on who else is in the batch
    assert torch.equal(uniform(seed[4:], pos[4:], 5), u[4:])
    big = uniform(torch.full((20000,), 7), torch.arange(20000), 1)
    assert 0.0 <= big.min() and big.max() < 1.0 and abs(big.mean().item() - 0.5) < 0.01
