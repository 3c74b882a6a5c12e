"""LRS scores and selectors on crafted statistics; the DeepConf tracker on crafted logits."""

from __future__ import annotations

import math

import pytest
import torch

from lm_eval_telltale.core.lrs import ConfidenceTracker, argmax_pick, majority_pick, pick_all, random_pick, score
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
        tr.update(torch.tensor([a.slot, b.slot]), lg, torch.tensor([True, False]))
    ra, rb = tr.read(a.slot), tr.read(b.slot)
    assert ra["conf_tokens"] == 6 and ra["conf"] == pytest.approx(1.3, abs=1e-5)
    assert ra["conf_mean"] == pytest.approx(sum(seq) / 6, abs=1e-5)
    assert rb == {"conf": None, "conf_mean": None, "conf_tokens": 0}  # masked rows change nothing
    c = tab.acquire("c", prompt_len=1, seed=0)  # short trace: the mean over all its tokens
    tr.update(torch.tensor([c.slot]), logits_with_conf(1.4)[None], torch.tensor([True]))
    assert tr.read(c.slot)["conf"] == pytest.approx(1.4, abs=1e-5)


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
