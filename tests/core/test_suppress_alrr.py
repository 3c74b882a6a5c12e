"""Suppression and ALRR as tensor operations on crafted steps (no engine)."""

from __future__ import annotations

import pytest
import torch
from conftest import begin_step, end_step

from lm_eval_telltale.config import ConfigError, resolve
from lm_eval_telltale.core.engine import build_core, residual_norm
from lm_eval_telltale.core.stats import EV_ACCEPTED, EV_CANDIDATE, EV_SUPPRESSED


def make_core(method, args, tau=5.0, prompt_len=2, n_req=1, enabled=None):
    cfg = resolve(method, {"layers": "3", "tau_mode": "fixed", "tau": tau, **args}, 8)
    core = build_core(cfg, 4)
    tab = core.table
    infos = [tab.acquire(f"r{i}", prompt_len=prompt_len, seed=100 + i,
                         enabled=True if enabled is None else enabled[i]) for i in range(n_req)]
    return core, tab, infos


H = torch.tensor([[3.0, 0.0], [6.0, 0.0], [1.0, 0.0], [0.0, 7.0]])
R = torch.tensor([[0.0, 4.0], [0.0, 1.0], [0.0, 0.0], [1.0, 0.0]])  # norms 5, √37≈6.08, 1, √50≈7.07


def test_suppress_high_scales_only_tokens_above_tau():
    core, tab, infos = make_core("suppress", {})
    begin_step(core, infos, [[1, 2, 3, 4]])  # position 1 is a prompt token (prompt_len 2)
    h2, r2 = core.layer(0, H.clone(), R.clone())
    rec = end_step(core)
    x, x2 = H + R, h2 + r2
    # token 0 is a prompt token, token 2 is below τ: bit-identical; tokens 1 and 3 are above τ
    assert torch.equal(h2[[0, 2]], H[[0, 2]]) and torch.equal(r2[[0, 2]], R[[0, 2]])
    assert torch.allclose(x2[[1, 3]], 0.1 * x[[1, 3]])     # h' + r' = 0.1·x
    sup = [bool(e & EV_SUPPRESSED) for e in rec["event"][:, 0].tolist()]
    assert sup == [True, False, True]  # rows of generated tokens (positions 2, 3, 4)
    ratio = rec["norm_out"][:, 0] / rec["norm"][:, 0]
    assert ratio.tolist() == pytest.approx([0.1, 1.0, 0.1], rel=1e-6)


def test_prompt_tokens_are_never_suppressed():
    core, tab, infos = make_core("suppress", {}, prompt_len=10)
    begin_step(core, infos, [[1, 2, 3, 4]])
    h2, r2 = core.layer(0, H.clone(), R.clone())
    assert torch.equal(h2, H) and torch.equal(r2, R)


def test_suppress_clamp_bounds_the_norm():
    core, tab, infos = make_core("suppress", {"action": "clamp", "clamp_div": 4.0}, tau=4.0)
    begin_step(core, infos, [[2, 3, 4, 5]])
    h2, r2 = core.layer(0, H.clone(), R.clone())
    n2 = residual_norm(h2, r2)[1]
    assert n2[2] == 1.0                               # below τ: untouched
    assert torch.allclose(n2[[0, 1, 3]], torch.full((3,), 1.0))  # clamped to τ/4


def test_random_suppression_is_seeded_per_request_and_batch_independent():
    core, tab, infos = make_core("suppress", {"suppress_mode": "random", "p": 0.3}, n_req=2)
    pos = list(range(2, 2002))
    begin_step(core, infos, [pos, pos])
    x = torch.randn(4000, 8) + 1
    core.layer(0, x.clone(), torch.zeros_like(x))
    ev = end_step(core)["event"][:, 0]
    m0, m1 = (ev[:2000] & EV_SUPPRESSED) != 0, (ev[2000:] & EV_SUPPRESSED) != 0
    assert abs(m0.float().mean().item() - 0.3) < 0.04
    assert not torch.equal(m0, m1)  # different requests draw differently
    solo, stab, sinfos = make_core("suppress", {"suppress_mode": "random", "p": 0.3}, n_req=2)
    begin_step(solo, sinfos[1:], [pos])  # request 1 alone
    solo.layer(0, x[2000:].clone(), torch.zeros(2000, 8))
    assert torch.equal((end_step(solo)["event"][:, 0] & EV_SUPPRESSED) != 0, m1)


def test_opted_out_request_is_untouched():
    core, tab, infos = make_core("suppress", {}, n_req=2, enabled=[True, False])
    begin_step(core, infos, [[3, 4], [3, 4]])
    h = torch.tensor([[9.0, 0.0], [9.0, 0.0], [9.0, 0.0], [9.0, 0.0]])
    h2, _ = core.layer(0, h.clone(), torch.zeros_like(h))
    assert torch.equal(h2[2:], h[2:]) and torch.allclose(h2[:2], 0.1 * h[:2])


def test_matched_control_draws_only_where_the_high_rule_could_fire():
    """matched mode: the same population as the high rule (τ defined, i.e. past warm-up)."""
    cfg = resolve("suppress", {"layers": "3", "suppress_mode": "matched", "match_rate": 1.0, "warmup": 8}, 8)
    core = build_core(cfg, 2)
    tab = core.table
    info = tab.acquire("r0", prompt_len=2, seed=7, enabled=True)
    sup = []
    for pos in range(2, 22):  # 20 decode steps, one token each
        begin_step(core, [info], [[pos]])
        core.layer(0, torch.tensor([[1.0 + pos % 3, 0.0]]), torch.zeros(1, 2))
        sup.append(bool(end_step(core)["event"][0, 0] & EV_SUPPRESSED))
    assert not any(sup[:8]) and all(sup[9:]), sup  # warm-up tokens never; afterwards at rate 1


def test_matched_rates_from_sidecar(tmp_path):
    f = tmp_path / "side.jsonl"
    f.write_text('{"task": "t", "doc_id": 0, "layers": {"3": {"count": 100, "suppressed": 5}}}\n'
                 '{"task": "t", "doc_id": 1, "layers": {"3": {"count": 300, "suppressed": 15}}}\n')
    cfg = resolve("suppress", {"layers": "3", "suppress_mode": "matched", "match_stats": str(f)}, 8)
    assert cfg.params["match_rate"] == [0.05]
    # the rate is per token with a τ (tau_ready) when the sidecar records it
    f.write_text('{"task": "t", "doc_id": 0, "layers": {"3": {"count": 100, "tau_ready": 50, "suppressed": 5}}}\n')
    cfg = resolve("suppress", {"layers": "3", "suppress_mode": "matched", "match_stats": str(f)}, 8)
    assert cfg.params["match_rate"] == [0.1]
    with pytest.raises(ConfigError) as e:
        resolve("suppress", {"layers": "3", "match_rate": 0.1}, 8)
    assert e.value.key == "match_rate"
    with pytest.raises(ConfigError) as e:
        resolve("suppress", {"layers": "3-4", "suppress_mode": "matched", "match_rate": "[0.1]"}, 8)
    assert e.value.key == "match_rate"


def grow_rerun(factor, calls):
    def rerun(h, r):
        calls.append((h.data_ptr(), r.data_ptr()))
        h.mul_(100.0)  # an in-place kernel scribbling over its inputs
        r.mul_(100.0)
        return h / 100.0 * factor, r / 100.0 * factor
    return rerun


def test_alrr_accepts_growth_and_keeps_everything_else_bit_identical():
    core, tab, infos = make_core("alrr", {"growth_eps": 0.2, "blowup": 1.6}, tau=4.0)
    begin_step(core, infos, [[2, 3, 4, 5]])
    calls = []
    h, r = H.clone(), R.clone()
    h2, r2 = core.layer(0, h, r, grow_rerun(1.25, calls))
    ev = end_step(core)["event"][:, 0].tolist()
    # norms 5 and 6.08 are candidates (4 < n < 6.4); 1 is below τ; 7.07 is above blowup·τ.
    # Re-run norms 6.25 (accepted) and 7.6 (> blowup·τ: rejected)
    assert [bool(e & EV_CANDIDATE) for e in ev] == [True, True, False, False]
    assert [bool(e & EV_ACCEPTED) for e in ev] == [True, False, False, False]
    assert torch.allclose(h2[0], 1.25 * H[0]) and torch.allclose(r2[0], 1.25 * R[0])
    assert torch.equal(h2[1:], H[1:]) and torch.equal(r2[1:], R[1:])
    assert torch.equal(h, H) and torch.equal(r, R)  # the re-run got copies
    assert calls and calls[0] != (h.data_ptr(), r.data_ptr())


def test_alrr_rejects_insufficient_growth_and_blowup():
    for factor in (1.1, 1.6):  # growth < 0.2; n2 = 8 > blowup·τ
        core, tab, infos = make_core("alrr", {}, tau=4.0)
        begin_step(core, infos, [[2, 3, 4, 5]])
        h2, r2 = core.layer(0, H.clone(), R.clone(), grow_rerun(factor, []))
        ev = end_step(core)["event"][:, 0].tolist()
        assert torch.equal(h2, H) and torch.equal(r2, R)
        assert ev[0] & EV_CANDIDATE and not ev[0] & EV_ACCEPTED


def test_alrr_skips_the_rerun_without_candidates():
    core, tab, infos = make_core("alrr", {"skip_sync": True}, tau=100.0)
    begin_step(core, infos, [[2, 3, 4, 5]])
    calls = []
    core.layer(0, H.clone(), R.clone(), grow_rerun(1.25, calls))
    assert calls == []


def test_alrr_alpha_and_iterations():
    core, tab, infos = make_core("alrr", {"alpha": 0.5, "growth_eps": 0.05, "blowup": 3.0}, tau=4.0)
    begin_step(core, infos, [[2, 3, 4, 5]])
    h2, _ = core.layer(0, H.clone(), R.clone(), grow_rerun(1.25, []))
    assert torch.allclose(h2[0], 1.125 * H[0])
    core, tab, infos = make_core("alrr", {"max_extra_iters": 3, "growth_eps": 0.2, "blowup": 3.0}, tau=4.0)
    begin_step(core, infos, [[2, 3, 4, 5]])
    calls = []
    h2, _ = core.layer(0, H.clone(), R.clone(), grow_rerun(1.25, calls))
    # 5 → 6.25 → 7.8 → 9.8: three accepted iterations below blowup·τ = 12 for token 0
    assert len(calls) == 3 and torch.allclose(h2[0], 1.25 ** 3 * H[0])


def _suppressed_positions(method_args, positions, tau=0.5):
    """Feed one request token by token (positions from 2, prompt_len 2); the positions suppressed."""
    core, tab, infos = make_core("suppress", method_args, tau=tau)
    out = []
    for pos in positions:
        begin_step(core, infos, [[pos]])
        core.layer(0, H[1:2].clone(), R[1:2].clone())
        rec = end_step(core)
        if int(rec["event"][0, 0]) & EV_SUPPRESSED:
            out.append(pos)
    return out


def test_fixed_tau_warmup_counts_the_requests_own_tokens():
    """warmup= with a fixed τ is applied (it was silently ignored): no decision before the
    request's warmup-th generated token; the default with a given τ is no warm-up."""
    assert resolve("suppress", {"layers": "3", "tau_mode": "fixed", "tau": 1.0}, 8).warmup == 0
    assert _suppressed_positions({}, range(2, 8)) == list(range(2, 8))
    assert _suppressed_positions({"warmup": 3}, range(2, 8)) == list(range(5, 8))


def test_random_control_waits_out_the_warmup_and_honours_clamp():
    """random mode draws only among tokens past the warm-up (the high rule's population, as in the
    reference code), and action=clamp applies to the controls too (it was silently ignored)."""
    assert _suppressed_positions({"suppress_mode": "random", "p": 1.0, "warmup": 4}, range(2, 10)) == list(range(6, 10))
    core, tab, infos = make_core("suppress", {"suppress_mode": "random", "p": 1.0, "action": "clamp",
                                              "clamp_div": 4.0}, tau=4.0)
    begin_step(core, infos, [[2]])
    h2, r2 = core.layer(0, H[1:2].clone(), R[1:2].clone())
    assert torch.linalg.vector_norm(h2 + r2).item() == pytest.approx(1.0, rel=1e-5)  # τ/4, not 0.1·x


def test_alrr_counts_its_rerun_work_for_the_compute_limit():
    """``summary()`` (``telltale_state``'s ``method``) counts (step, layer) re-run calls and the token
    rows pushed through the layer again — every row of the step, not only the candidates (by
    default every step; with ``skip_sync=true`` a step with a candidate)."""
    def step(core, tab, infos, rerun=True):
        begin_step(core, infos, [[2, 3, 4, 5]])
        core.layer(0, H.clone(), R.clone(), grow_rerun(1.25, []) if rerun else None)
        core.end()

    core, tab, infos = make_core("alrr", {"skip_sync": True}, tau=4.0)
    assert core.method.summary() == {"rerun_calls": 0, "rerun_rows": 0}
    step(core, tab, infos)                      # two candidates: one re-run of all 4 rows
    step(core, tab, infos, rerun=False)         # no re-run function given: nothing run, nothing counted
    assert core.method.summary() == {"rerun_calls": 1, "rerun_rows": 4}
    core, tab, infos = make_core("alrr", {"skip_sync": True}, tau=100.0)
    step(core, tab, infos)                      # no candidate: skipped by the skip test
    assert core.method.summary() == {"rerun_calls": 0, "rerun_rows": 0}
    core, tab, infos = make_core("alrr", {}, tau=100.0)
    step(core, tab, infos)                      # the default, branch-free: always re-run, counted on the device
    assert core.method.summary() == {"rerun_calls": 1, "rerun_rows": 4}
    core, tab, infos = make_core("alrr", {"max_extra_iters": 3, "growth_eps": 0.2, "blowup": 3.0}, tau=4.0)
    step(core, tab, infos)                      # 3 accepted iterations (see test_alrr_alpha_and_iterations)
    assert core.method.summary() == {"rerun_calls": 3, "rerun_rows": 12}
