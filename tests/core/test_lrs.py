"""LRS scores and selectors on crafted statistics; the DeepConf tracker on crafted logits."""

from __future__ import annotations

import math

import pytest
import torch

from lm_eval_telltale.core.lrs import (
    ConfidenceTracker,
    SlidingLow,
    argmax_pick,
    majority_pick,
    pick_all,
    random_pick,
    score,
    token_confidence,
)
from lm_eval_telltale.core.state import SlotTable


def L(**per_layer):
    """{layer: stats} with defaults; per_layer values are dicts of overrides."""
    base = {"count": 10, "mean": 1.0, "A": 10.0, "B": 0.0, "C": 0, "D": 0.0, "late_sum": 3.0}
    return {l: {**base, **v} for l, v in per_layer.items()}


# candidate k is built to win exactly one score
CANDS = [
    {"layers": L(**{"20": {"late_sum": 9.0}, "21": {"late_sum": 9.0}})},                 # late_sum
    {"layers": L(**{"20": {"mean": 5.0}, "21": {"mean": 4.0}})},                         # mean
    {"layers": L(**{"20": {"A": 50.0}, "21": {"A": 40.0}})},                             # A
    {"layers": L(**{"20": {"B": 7.0}, "21": {"B": 1.0}})},                               # B
    {"layers": L(**{"20": {"C": 6}, "21": {"C": 5}})},                                   # C
    {"layers": L(**{"20": {"D": 3.0, "B": 3.0}, "21": {"D": 2.0, "B": 2.0}})},           # D (B = 5 < 8)
]


@pytest.mark.parametrize("name,expected", [("late_sum", 0), ("mean", 1), ("A", 2), ("B", 3), ("C", 4), ("D", 5)])
def test_each_score_picks_its_candidate(name, expected):
    assert argmax_pick([score(c["layers"], name) for c in CANDS]) == expected


def test_late_sum_sums_over_layers_and_mean_averages():
    assert score(CANDS[0]["layers"], "late_sum") == 18.0
    assert score(CANDS[1]["layers"], "mean") == 4.5


def test_prefer_complete_and_ties():
    assert argmax_pick([5.0, 9.0, 9.0], [True, False, True], True) == 2
    assert argmax_pick([5.0, 9.0, 9.0], [True, False, True], False) == 1  # ties → first
    assert argmax_pick([5.0, 9.0], [False, False], True) == 1          # none complete: plain argmax
    assert argmax_pick([float("nan"), 1.0]) == 1


def test_majority_vote_ties_go_to_the_answer_seen_first():
    assert majority_pick(["7", "8", "8", "7"]) == 0
    assert majority_pick(["7", "8", "8", None]) == 1
    assert majority_pick([None, None]) == 0
    assert majority_pick([None, "3"]) == 1


def test_pick_all_reports_every_selector():
    cands = [{**c, "complete": True, "answer": a, "conf": f} for c, a, f in
             zip(CANDS, ["1", "2", "2", "3", None, "1"], [0.5, 0.2, 0.9, 0.1, 0.3, 0.4])]
    picks = pick_all(cands, True, ("seed", "task", 3, 0))
    assert picks == {"late_sum": 0, "mean": 1, "A": 2, "B": 3, "C": 4, "D": 5, "maj": 0, "conf": 2,
                     "random": random_pick(6, "seed", "task", 3, 0), "first": 0}
    assert picks["random"] == pick_all(cands, True, ("seed", "task", 3, 0))["random"]
    assert len({random_pick(6, "seed", "task", d, 0) for d in range(40)}) > 1


def test_confidence_tracker_lowest_group_mean():
    tab = SlotTable(capacity=2)
    a = tab.acquire("a", prompt_len=1, seed=0)
    b = tab.acquire("b", prompt_len=1, seed=0)
    tr = ConfidenceTracker(tab, conf_topk=2, conf_window=3)
    vocab = 64

    def logits_with_conf(c):
        # two equal top logits with probability p each → −mean(top-2 log p) = −log p = c
        p = math.exp(-c)
        rest = (1 - 2 * p) / (vocab - 2)
        return torch.log(torch.tensor([p, p] + [rest] * (vocab - 2)))

    seq = [1.5, 1.6, 1.7, 1.3, 1.3, 1.3]  # windows: 1.6, 1.533, 1.433, 1.3 → lowest 1.3
    for c in seq:
        lg = torch.stack([logits_with_conf(c), logits_with_conf(2.0)])
        tr.win.update(torch.tensor([a.slot, b.slot]), token_confidence(lg, tr.conf_topk), torch.tensor([True, False]))
    ra, rb = (ConfidenceTracker.figures(tr.win.raw(x.slot)) for x in (a, b))
    assert ra["conf_tokens"] == 6 and ra["conf"] == pytest.approx(1.3, abs=1e-5)
    assert ra["conf_mean"] == pytest.approx(sum(seq) / 6, abs=1e-5)
    assert rb == {"conf": None, "conf_mean": None, "conf_tokens": 0}  # masked rows change nothing
    c = tab.acquire("c", prompt_len=1, seed=0)  # short trace: the mean over all its tokens
    tr.win.update(torch.tensor([c.slot]), token_confidence(logits_with_conf(1.4)[None], tr.conf_topk),
                  torch.tensor([True]))
    assert ConfidenceTracker.figures(tr.win.raw(c.slot))["conf"] == pytest.approx(1.4, abs=1e-5)


def test_greedy_with_several_candidates_is_a_clear_error_unless_a_preset_samples():
    from vllm import SamplingParams

    from lm_eval_telltale.config import ConfigError, resolve
    from lm_eval_telltale.harness.lrs import VLLMLrs

    m = object.__new__(VLLMLrs)  # no engine: only the sampling rule
    m.tt_cfg, m._tt_preset = resolve("lrs", {}, 8), None
    with pytest.raises(ConfigError) as e:
        m._tt_sampling(SamplingParams(temperature=0.0))
    assert "greedy" in str(e.value) and "--gen_kwargs" in str(e.value)
    m._tt_preset = {"sampling": {"temperature": 0.6, "top_p": 0.95, "top_k": 20}}
    sp = m._tt_sampling(SamplingParams(temperature=0.0))
    assert (sp.temperature, sp.top_p, sp.top_k) == (0.6, 0.95, 20)
    sp = SamplingParams(temperature=0.8)
    assert m._tt_sampling(sp) is sp  # the task's sampling wins
    m.tt_cfg = resolve("lrs", {"n_candidates": 1}, 8)
    m._tt_preset = None
    assert m._tt_sampling(SamplingParams(temperature=0.0)).temperature == 0.0


# -- online LRS ----------------------------------------------------------------------------------

def test_online_threshold_is_the_percentile_of_the_warmup_scores():
    from lm_eval_telltale.core.lrs import online_threshold

    assert online_threshold([1.0, 3.0], 10) == pytest.approx(1.2)      # numpy's linear rule
    assert online_threshold([4.0, 1.0, None, float("nan"), 2.0], 50) == 2.0  # no score: not counted
    assert math.isnan(online_threshold([None], 10))                     # nothing to stop on


def test_online_stop_marks_a_slot_once_its_full_window_falls_below_its_threshold():
    from lm_eval_telltale.core.lrs import OnlineStop

    table = SlotTable(4)
    stop = OnlineStop(table, window=3)
    warm = table.acquire("w", prompt_len=1, seed=0)                              # no threshold
    late = table.acquire("l", prompt_len=1, seed=0, values={"stop_thr": 2.0, "stop_tok": 7})
    slots = torch.tensor([warm.slot, late.slot])
    keep = torch.tensor([True, True])
    # windows of 3: [5, 1, 1] = 2.33 (not below 2), [1, 1, 1] = 1 (below) at the 4th value
    for v in (5.0, 1.0, 1.0, 1.0, 0.0):
        stop.update(slots, torch.tensor([v, v]), keep)
        if v == 1.0 and int(table.t["stop_n"][late.slot]) == 3:
            assert int(table.t["stop_at"][late.slot]) == -1
    assert int(table.t["stop_at"][warm.slot]) == -1
    assert int(table.t["stop_at"][late.slot]) == 4  # the first window below: after the 4th value, kept
    # the warm-up's score: its lowest full window ([1, 1, 0] = 2/3); a masked row changes nothing
    def read(slot):
        return OnlineStop.figures(stop.win.raw(slot), stop.stopped_at(slot))

    assert read(warm.slot) == {"online_score": pytest.approx(2 / 3), "stopped_at": None}
    stop.update(slots, torch.tensor([-9.0, -9.0]), torch.tensor([False, False]))
    assert read(warm.slot)["online_score"] == pytest.approx(2 / 3)
    # forcing: the stopped row can sample only its stop token, the other row is untouched
    logits = torch.randn(2, 10)
    before = logits.clone()
    stop.force(slots, logits)
    assert torch.equal(logits[0], before[0])
    assert logits[1].argmax() == 7 and torch.isinf(logits[1]).sum() == 9 and logits[1, 7] == before[1, 7]


def test_online_stop_per_token_values_ignore_prompt_tokens_and_padding():
    """A forward step with a prefill chunk, a decode token of another request and padding: only the
    new generated token counts, once, for its own slot."""
    from conftest import begin_step

    from lm_eval_telltale.config import resolve
    from lm_eval_telltale.core.engine import build_core

    cfg = resolve("lrs", {"layers": "1-2", "stop_signal": "norm", "stop_window": 2, "warmup": 0}, 4)
    core = build_core(cfg, capacity=4)
    a = core.table.acquire("a", prompt_len=4, seed=1)
    b = core.table.acquire("b", prompt_len=2, seed=2, values={"stop_thr": 100.0, "stop_tok": 3})
    for step, (pa, pb) in enumerate((([0, 1, 2], [0, 1]), ([3], [2]), ([4], [3]))):
        begin_step(core, [a, b], [pa, pb])
        n = core.step.num_tokens
        for j in range(2):
            h = torch.full((n, 8), float(step + 1))
            core.layer(j, h, torch.zeros_like(h))
        core.end()
    # a: positions 0-3 are its prompt, 4 its first generated token; b: 2 and 3 generated
    assert int(core.table.t["stop_n"][a.slot]) == 1 and int(core.table.t["stop_n"][b.slot]) == 2
    # b's window [‖2·1‖, ‖3·1‖] over 8 dims: mean of 2√8 and 3√8 < 100 → stopped after 2 tokens
    assert int(core.table.t["stop_at"][b.slot]) == 2 and int(core.table.t["stop_at"][a.slot]) == -1
    assert core.method.read_slot(b.slot)["online_score"] == pytest.approx(2.5 * math.sqrt(8), rel=1e-6)


@pytest.mark.parametrize("score_name,expected", [("late_sum", [2.0, 4.0]), ("B", [0.5, 0.0]), ("C", [0.5, 0.0])])
def test_online_norm_signal_follows_the_selected_score(score_name, expected):
    from lm_eval_telltale.core.lrs import token_signal

    norm = torch.tensor([[1.0, 3.0], [4.0, 4.0]])
    tau = torch.tensor([[2.0, 2.0], [float("nan"), 5.0]])
    assert token_signal(score_name, norm, tau).tolist() == pytest.approx(expected)


def test_online_settings_are_checked_together():
    from lm_eval_telltale.config import ConfigError, resolve

    resolve("lrs", {"stop_signal": "conf", "n_candidates": 8, "warmup_candidates": 2}, 8)
    with pytest.raises(ConfigError, match="warmup_candidates.*below n_candidates"):
        resolve("lrs", {"stop_signal": "norm", "n_candidates": 4, "warmup_candidates": 4}, 8)
    resolve("lrs", {"n_candidates": 4, "warmup_candidates": 4}, 8)  # full LRS: the knob is unused
    with pytest.raises(ConfigError, match="stop_signal"):
        resolve("lrs", {"stop_signal": "entropy"}, 8)


def test_online_windows_count_thinking_tokens_only():
    """Once a candidate's end-of-thinking token is fed, its tokens no longer count and it is not
    stopped (its answer's lower norm would otherwise stop every candidate at its end)."""
    from lm_eval_telltale.config import resolve
    from lm_eval_telltale.core.engine import build_core
    from lm_eval_telltale.core.step import build_step

    cfg = resolve("lrs", {"layers": "1-2", "stop_signal": "norm", "stop_window": 2, "warmup": 0}, 4)
    core = build_core(cfg, capacity=4)
    extra = {"telltale_think_end_token": 4, "telltale_stop_threshold": 5.0, "telltale_stop_token": 3}
    a = core.table.acquire("a", prompt_len=1, seed=1, values=core.method.slot_values(extra))
    for pos, (tok, norm) in enumerate([(9, 9.0), (4, 9.0), (7, 1.0), (7, 1.0), (7, 1.0)], start=1):
        step = build_step(core.table, torch.tensor([0, 1]), torch.tensor([a.slot]), torch.tensor([pos]),
                          torch.tensor([tok]))
        core.begin(step)
        for j in range(2):
            h = torch.zeros(1, 4)
            h[0, 0] = norm
            core.layer(j, h, torch.zeros_like(h))
        core.end()
    t = core.table.t
    assert bool(t["stop_answering"][a.slot]) and int(t["stop_n"][a.slot]) == 1  # only the first token counted
    assert int(t["stop_at"][a.slot]) == -1                                        # low norms after </think>: no stop
    assert core.method.read_slot(a.slot)["online_score"] == pytest.approx(9.0)


@pytest.mark.parametrize("extra", [0, 1, 3, 15])
def test_a_window_takes_back_the_values_past_a_position(extra):
    """Values counted after the answer's end (by position) are taken back at collection: the
    figures equal, bit for bit, those of a window that never saw them; at most HISTORY − 1."""
    g = torch.Generator().manual_seed(extra)
    for n_kept in (0, 2, 5, 23):
        full, kept = SlotTable(4), SlotTable(4)
        wf, wk = SlidingLow(full, "x", 5), SlidingLow(kept, "x", 5)
        vals = torch.rand(n_kept + extra, generator=g) * 3
        for i, v in enumerate(vals.tolist()):
            args = (torch.tensor([1]), torch.tensor([v]), torch.tensor([True]))
            wf.update(*args, pos=torch.tensor([100 + i]))
            if i < n_kept:
                wk.update(*args, pos=torch.tensor([100 + i]))
            # a masked row (a prefill chunk's sample) changes no history
            wf.update(torch.tensor([1]), torch.tensor([99.0]), torch.tensor([False]), pos=torch.tensor([0]))
        last = 100 + n_kept - 1
        assert SlidingLow.resolve(wf.raw(1), last) == (*SlidingLow.resolve(wk.raw(1))[:3], True)
    # more than the history can take back: nothing is taken back, and the record says so
    over = SlotTable(2)
    w = SlidingLow(over, "x", 3)
    for i in range(40):
        w.update(torch.tensor([0]), torch.tensor([1.0 + i]), torch.tensor([True]), pos=torch.tensor([i]))
    assert SlidingLow.resolve(w.raw(0), 10) == (*SlidingLow.resolve(w.raw(0))[:3], False)
    assert SlidingLow.resolve(w.raw(0), 40 - SlidingLow.HISTORY)[3] is True
    assert ConfidenceTracker.figures(w.raw(0), 10)["conf_exact"] is False
    assert "conf_exact" not in ConfidenceTracker.figures(w.raw(0), 30)


def test_an_online_stop_decided_past_the_answers_end_is_no_stop():
    from lm_eval_telltale.core.lrs import OnlineStop

    table = SlotTable(2)
    stop = OnlineStop(table, window=2)
    a = table.acquire("a", prompt_len=1, seed=0, values={"stop_thr": 2.0, "stop_tok": 7})
    for i, v in enumerate((5.0, 5.0, 1.0, 0.0)):  # windows of 2: 5, 3, 0.5 — below 2 at the 4th value
        stop.update(torch.tensor([a.slot]), torch.tensor([v]), torch.tensor([True]), pos=torch.tensor([10 + i]))
    raw, at = stop.win.raw(a.slot), stop.stopped_at(a.slot)
    assert at == 4 and OnlineStop.figures(raw, at) == OnlineStop.figures(raw, at, 13) == {"online_score": 0.5, "stopped_at": 4}
    # the answer ended at position 12: the 4th value came from a forward after it
    assert OnlineStop.figures(raw, at, 12) == {"online_score": 3.0, "stopped_at": None}
