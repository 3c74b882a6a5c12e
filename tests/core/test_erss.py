"""ERSS (docs/methods.md §3) as tensor operations on crafted steps (no engine)."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
from conftest import begin_step, end_step

from lm_eval_telltale.config import ConfigError, resolve
from lm_eval_telltale.core.engine import build_core
from lm_eval_telltale.core.stats import EV_BANKED, EV_INJECTED

D = 4
R0 = torch.tensor([0.5, -0.25, 0.0, 1.0])  # the residual part of every crafted token


def make(args=None, tau=5.0, n_req=1, capacity=4, layers="3", prompt_len=2):
    base = {"layers": layers, "tau_mode": "fixed", "tau": tau, "p_inject": 1.0, "cos_min": -1.0,
            "cooldown": 0, "low_k": 3}
    cfg = resolve("erss", {**base, **(args or {})}, 8)
    core = build_core(cfg, capacity)
    tab = core.table
    infos = [tab.acquire(f"r{i}", prompt_len=prompt_len, seed=100 + i) for i in range(n_req)]
    return core, tab, infos


def step(core, tab, infos, positions, x, r=R0, j=0, dtype=torch.float32):
    """One forward step: request i feeds tokens at ``positions[i]``; ``x``: [N, D] residual
    streams (h = x − r). Returns (h_in, h_out, r_out, record)."""
    begin_step(core, infos, positions)
    x = torch.as_tensor(x, dtype=torch.float32)
    rr = None if r is None else torch.as_tensor(r, dtype=torch.float32).expand_as(x).to(dtype)
    h = (x if rr is None else x - rr.float()).to(dtype)
    h_in = h.clone()
    h2, r2 = core.layer(j, h, rr)
    rec = end_step(core)
    return h_in, h2, r2, rec


def vec(norm, *direction):
    d = torch.tensor(direction + (0.0,) * (D - len(direction)), dtype=torch.float32)
    return norm * d / d.norm()


def feed(core, tab, info, xs, start=2):
    """One token per step for one request; returns per-token (event, cos, vnorm, bank, h_in, h_out)."""
    out = []
    for i, x in enumerate(xs):
        h_in, h2, _r, rec = step(core, tab, [info], [[start + i]], x[None])
        out.append(dict(ev=int(rec["event"][0, 0]), cos=float(rec["erss_cos"][0, 0]),
                        vnorm=float(rec["erss_vnorm"][0, 0]), bank=float(rec["erss_bank"][0, 0]),
                        h_in=h_in[0], h_out=h2[0]))
    return out


HIGH = vec(10.0, 1.0, 1.0)
LOW = vec(1.0, 1.0, 0.5)


def injected(out):
    return [bool(o["ev"] & EV_INJECTED) for o in out]


def test_exactly_low_k_low_tokens_trigger():
    core, tab, (info,) = make({"low_k": 5})
    out = feed(core, tab, info, [HIGH] + [LOW] * 5)
    assert out[0]["ev"] & EV_BANKED and not out[0]["ev"] & EV_INJECTED
    assert injected(out) == [False] * 5 + [True]  # the 5th low token completes the streak


def test_low_k_minus_one_low_tokens_do_not_trigger():
    core, tab, (info,) = make({"low_k": 5})
    mid = vec(5.0, 0.0, 1.0)  # n = τ: neither low (n < γτ) nor banked (n > τ): resets the streak
    out = feed(core, tab, info, [HIGH] + [LOW] * 4 + [mid] + [LOW] * 4 + [HIGH] + [LOW] * 4)
    assert not any(injected(out))
    # control: one more low token completes the last run of 4: it injects
    out2 = feed(core, tab, info, [LOW], start=2 + len(out))
    assert injected(out2) == [True]


def test_cooldown_blocks_exactly_cooldown_tokens():
    core, tab, (info,) = make({"low_k": 1, "cooldown": 3})
    out = feed(core, tab, info, [HIGH] + [LOW] * 12)
    # armed at every low token; after an injection exactly 3 tokens are blocked
    assert injected(out)[1:] == [True, False, False, False] * 3
    core, tab, (info,) = make({"low_k": 1, "cooldown": 0})
    assert all(injected(feed(core, tab, info, [HIGH] + [LOW] * 4))[1:])


def test_streak_resets_after_injection():
    core, tab, (info,) = make({"low_k": 3, "cooldown": 0})
    out = feed(core, tab, info, [HIGH] + [LOW] * 9)
    assert injected(out)[1:] == [False, False, True] * 3


def test_chosen_vector_is_the_max_cosine_one_and_x_moves_by_beta_v_minus_r():
    core, tab, (info,) = make({"low_k": 1, "beta": 0.5})
    bank = [vec(12.0, 1.0, 0.0, 1.0), vec(8.0, 0.0, 1.0), vec(10.0, 1.0), vec(9.0, 0.0, 0.0, 0.0, 1.0)]
    x = vec(1.0, 0.2, 1.0, 0.1, 0.0)  # closest in direction to the 8-norm vector, not the largest
    out = feed(core, tab, info, bank + [x])
    assert [bool(o["ev"] & EV_BANKED) for o in out] == [True] * 4 + [False]
    last = out[-1]
    assert last["ev"] & EV_INJECTED
    cos = [float(torch.dot(v, x) / (v.norm() * x.norm())) for v in bank]
    assert last["cos"] == pytest.approx(max(cos), abs=1e-5) and int(np.argmax(cos)) == 1
    assert last["vnorm"] == pytest.approx(8.0, rel=1e-6)
    assert last["bank"] == 4
    delta = last["h_out"] - last["h_in"]  # r is returned unchanged, so x' − x = h' − h
    assert torch.allclose(delta, 0.5 * (bank[1] - R0), atol=1e-6)


def test_residual_is_unchanged_and_model_dtype_is_kept():
    core, tab, (info,) = make({"low_k": 1, "beta": 0.5})
    step(core, tab, [info], [[2]], HIGH[None], dtype=torch.bfloat16)
    h_in, h2, r2, rec = step(core, tab, [info], [[3]], LOW[None], dtype=torch.bfloat16)
    assert rec["event"][0, 0] & EV_INJECTED
    assert h2.dtype == torch.bfloat16 and torch.equal(r2, R0.to(torch.bfloat16)[None])
    # the bank holds the float32 x = h + r of the bf16 inputs
    x_banked = (HIGH - R0).to(torch.bfloat16).float() + R0.to(torch.bfloat16).float()
    want = h_in.float() + 0.5 * (x_banked - R0.to(torch.bfloat16).float())
    assert torch.equal(h2, want.to(torch.bfloat16))


def test_without_residual_the_injection_adds_beta_v():
    core, tab, (info,) = make({"low_k": 1, "beta": 0.25})
    step(core, tab, [info], [[2]], HIGH[None], r=None)
    h_in, h2, r2, rec = step(core, tab, [info], [[3]], LOW[None], r=None)
    assert r2 is None and rec["event"][0, 0] & EV_INJECTED
    assert torch.allclose(h2[0], LOW + 0.25 * HIGH, atol=1e-6)


def test_below_cos_min_nothing_happens_and_the_streak_stays_armed():
    core, tab, (info,) = make({"low_k": 2, "cos_min": 0.5})
    far = vec(1.0, -1.0, 0.2, 0.3)  # cos with HIGH < 0
    out = feed(core, tab, info, [HIGH, far, far, far, LOW])
    assert injected(out) == [False, False, False, False, True]
    for o in out[1:4]:
        assert torch.equal(o["h_out"], o["h_in"])  # bit-identical
    assert out[2]["cos"] < 0.5 and math.isnan(out[1]["cos"])  # attempt recorded (only when armed)
    assert out[4]["cos"] >= 0.5


def test_empty_bank_never_injects():
    core, tab, (info,) = make({"low_k": 1})
    out = feed(core, tab, info, [LOW] * 5)
    assert not any(injected(out)) and all(o["bank"] == 0 for o in out)
    assert all(torch.equal(o["h_out"], o["h_in"]) for o in out)


def test_p_inject_zero_and_draws_are_seeded_per_request():
    core, tab, (info,) = make({"low_k": 1, "p_inject": 0.0})
    assert not any(injected(feed(core, tab, info, [HIGH] + [LOW] * 20)))
    core, tab, infos = make({"low_k": 1, "p_inject": 0.5}, n_req=2)
    T = 200
    evs = [[], []]
    step(core, tab, infos, [[2], [2]], torch.stack([HIGH, HIGH]))
    for t in range(T):
        _, _, _, rec = step(core, tab, infos, [[3 + t], [3 + t]], torch.stack([LOW, LOW]))
        for i in range(2):
            evs[i].append(bool(rec["event"][i, 0] & EV_INJECTED))
    rate = np.mean(evs[0])
    assert 0.35 < rate < 0.65 and evs[0] != evs[1]
    # request 1 alone, in another table, with the rows in another order: the same draws
    solo, stab, sinfos = make({"low_k": 1, "p_inject": 0.5}, n_req=2)
    stab.release("r0")
    step(solo, stab, [sinfos[1]], [[2]], HIGH[None])
    alone = [bool(step(solo, stab, [sinfos[1]], [[3 + t]], LOW[None])[3]["event"][0, 0] & EV_INJECTED)
             for t in range(T)]
    assert alone == evs[1]


def test_bank_keeps_the_top_k_by_norm_as_copies():
    core, tab, (info,) = make({"bank_k": 2, "low_k": 100})
    xs = [vec(6.0, 1.0), vec(8.0, 0.0, 1.0), vec(7.0, 1.0, 1.0), vec(9.0, 0.0, 0.0, 1.0), vec(5.5, 1.0)]
    out = feed(core, tab, info, xs)
    assert [bool(o["ev"] & EV_BANKED) for o in out] == [True, True, True, True, False]
    norms = tab.t["erss_bank_norm"][info.slot, 0, :2]
    vecs = tab.t["erss_bank"][info.slot, 0, :2]
    order = torch.argsort(norms)
    assert norms[order].tolist() == pytest.approx([8.0, 9.0])
    assert torch.allclose(vecs[order], torch.stack([xs[1], xs[3]]), atol=1e-6)
    assert [o["bank"] for o in out] == [1, 2, 2, 2, 2]


def test_banks_streaks_and_cooldowns_are_per_request_and_survive_reordering():
    core, tab, infos = make({"low_k": 2, "cooldown": 1}, n_req=2)
    a, b = vec(10.0, 1.0), vec(10.0, 0.0, 1.0)
    # step 1: both bank their own vector; later steps: rows swap order every step
    step(core, tab, infos, [[2], [2]], torch.stack([a, b]))
    evs = []
    for t in range(6):
        order = [0, 1] if t % 2 == 0 else [1, 0]
        xs = torch.stack([vec(1.0, 1.0, 1.0)] * 2)
        h_in, h2, _r, rec = step(core, tab, [infos[i] for i in order], [[3 + t], [3 + t]], xs)
        for row, i in enumerate(order):
            if rec["event"][row, 0] & EV_INJECTED:
                evs.append((t, i))
                want = a if i == 0 else b
                assert torch.allclose(h2[row] - h_in[row], 0.5 * (want - R0), atol=1e-6)
    assert sorted(evs) == [(1, 0), (1, 1), (3, 0), (3, 1), (5, 0), (5, 1)]
    for info, v in zip(infos, (a, b)):
        filled = torch.isfinite(tab.t["erss_bank_norm"][info.slot, 0, :-1])
        assert filled.sum() == 1 and torch.allclose(tab.t["erss_bank"][info.slot, 0, :-1][filled][0], v)


def test_only_new_generated_tokens_count():
    core, tab, (info,) = make({"low_k": 2}, prompt_len=4)
    # prompt tokens (positions 0..3) with high and low norms: no bank, no streak
    step(core, tab, [info], [[0, 1, 2, 3]], torch.stack([HIGH, LOW, LOW, LOW]))
    assert tab.t["erss_streak"][info.slot, 0] == 0 and not torch.isfinite(tab.t["erss_bank_norm"][info.slot]).any()
    out = feed(core, tab, info, [HIGH, LOW], start=4)
    assert tab.t["erss_streak"][info.slot, 0] == 1 and not any(injected(out))
    # recomputation after preemption re-feeds positions 0..5 plus the new token 6: only 6 counts
    xs = torch.stack([HIGH, LOW, LOW, LOW, LOW, LOW, LOW])
    h_in, h2, _r, rec = step(core, tab, [info], [list(range(7))], xs)
    assert rec["position"].tolist() == [6] and rec["event"][0, 0] & EV_INJECTED
    assert torch.equal(h2[:6], h_in[:6])


def test_mixed_step_with_a_prefill_chunk_larger_than_the_table():
    core, tab, infos = make({"low_k": 1}, n_req=2, capacity=2)
    step(core, tab, [infos[0]], [[2]], HIGH[None])
    infos[1] = tab.acquire("long", prompt_len=40, seed=7)  # reuses nothing: slot 1
    # one step: a 20-token prefill chunk of request 1, then request 0's decode token
    xs = torch.cat([torch.stack([HIGH] * 20), LOW[None]])
    h_in, h2, _r, rec = step(core, tab, [infos[1], infos[0]], [list(range(20)), [3]], xs)
    assert rec["position"].tolist() == [3] and rec["event"][0, 0] & EV_INJECTED
    assert torch.equal(h2[:20], h_in[:20]) and not torch.equal(h2[20], h_in[20])


def test_state_is_reset_on_acquire_and_grows_with_the_table():
    core, tab, (info,) = make({"low_k": 3}, capacity=1)
    feed(core, tab, info, [HIGH, LOW])
    assert tab.t["erss_streak"][info.slot, 0] == 1
    tab.release("r0")
    again = tab.acquire("r9", prompt_len=2, seed=1)
    assert again.slot == info.slot and tab.t["erss_streak"][again.slot, 0] == 0
    assert not torch.isfinite(tab.t["erss_bank_norm"][again.slot]).any()
    more = [tab.acquire(f"g{i}", prompt_len=2, seed=i) for i in range(3)]  # capacity 1 → 4
    assert tab.capacity == 4 and tab.t["erss_bank"].shape[0] == 4
    step(core, tab, more, [[2]] * 3, torch.stack([HIGH] * 3))
    assert torch.isfinite(tab.t["erss_bank_norm"][[m.slot for m in more], 0]).sum() == 3
    assert core.method.summary()["live_with_state"] == 3


def test_warmup_nan_tau_changes_no_state():
    cfg = resolve("erss", {"layers": "3", "warmup": 5, "low_k": 1, "p_inject": 1.0, "cos_min": -1.0}, 8)
    core = build_core(cfg, 2)
    tab = core.table
    info = tab.acquire("r", prompt_len=2, seed=1)
    out = feed(core, tab, info, [HIGH, LOW, HIGH, LOW])
    assert not any(o["ev"] for o in out) and all(math.isnan(o["bank"]) for o in out)


def test_gamma_above_one_may_choose_the_vector_banked_this_step():
    # documented order: bank update before the trigger. n = 6 > τ = 5 and < γτ = 12: banked AND low
    core, tab, (info,) = make({"low_k": 1, "gamma": 2.0})
    x = vec(6.0, 1.0, 1.0)
    out = feed(core, tab, info, [x])
    assert out[0]["ev"] & EV_BANKED and out[0]["ev"] & EV_INJECTED
    assert out[0]["cos"] == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(out[0]["h_out"] - out[0]["h_in"], 0.5 * (x - R0), atol=1e-6)


def test_beta_zero_is_a_no_op_that_keeps_the_bookkeeping():
    core, tab, (info,) = make({"low_k": 1, "beta": 0.0})
    out = feed(core, tab, info, [HIGH, LOW, LOW])
    assert injected(out) == [False, True, True]
    assert all(torch.equal(o["h_out"], o["h_in"]) for o in out)


def test_summarize_columns():
    core, tab, (info,) = make({"low_k": 2, "cos_min": 0.5})
    far = vec(1.0, -1.0, 0.2)
    out = feed(core, tab, info, [HIGH, LOW, far, LOW, LOW])
    T = len(out)
    cols = {c: np.array([[o[k]] for o in out], dtype=np.float32)
            for c, k in (("erss_cos", "cos"), ("erss_vnorm", "vnorm"), ("erss_bank", "bank"))}
    ev = np.array([[o["ev"]] for o in out], dtype=np.int16)
    s = core.method.summarize_columns(np.arange(2, 2 + T), cols, ev, [3])["3"]
    assert injected(out) == [False, False, False, True, False]
    assert s["inject_positions"] == [5] and s["inject_vnorm"] == [pytest.approx(10.0, rel=1e-5)]
    assert s["inject_cos"][0] > 0.5 and s["inject_rejected"] == 1  # the far token at position 4
    assert s["bank_max"] == 1 and s["bank_last"] == 1
    empty = core.method.summarize_columns(np.zeros(0, np.int64), {c: np.zeros((0, 1), np.float32) for c in cols},
                                          np.zeros((0, 1), np.int16), [3])["3"]
    assert empty == {"inject_positions": [], "inject_cos": [], "inject_vnorm": [], "inject_rejected": 0,
                     "bank_max": 0, "bank_last": 0}


def test_defaults_and_checks():
    cfg = resolve("erss", {}, 28)
    assert cfg.params == {"bank_k": 32, "gamma": 1.0, "low_k": 40, "p_inject": 0.2, "cos_min": 0.5,
                          "cooldown": 32, "beta": 0.5}
    assert cfg.warmup == 64  # request mode; global mode counts 200 decode steps
    assert resolve("erss", {"tau_mode": "global"}, 28).warmup == 200
    for key, bad in (("p_inject", 1.5), ("cos_min", -2), ("bank_k", 0), ("low_k", 0), ("gamma", 0),
                     ("cooldown", -1), ("beta", -0.1)):
        with pytest.raises(ConfigError) as e:
            resolve("erss", {key: bad}, 28)
        assert e.value.key == key
    with pytest.raises(ConfigError) as e:
        resolve("erss", {"bank_k": 2.5}, 28)
    assert e.value.key == "bank_k"
    # knobs from a preset; explicit model_args win
    cfg = resolve("erss", {"beta": 0.25}, 28, preset={"telltale": {"low_k": 10, "beta": 0.1}})
    assert cfg.params["low_k"] == 10 and cfg.params["beta"] == 0.25


def _same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_layer_step_is_bit_identical_to_eager(dtype):
    """The compiled per-layer step (what a compiled vLLM engine runs) gives the plain operations'
    numbers bit for bit over a random stream: several requests in request-τ mode, decode steps with
    prefill chunks and a preempted request's re-fed positions mixed in, requests that end and are
    replaced (slots reset), a table that grows and a step with more tokens than slots (the gathered
    path); the inputs made in inference mode (as vLLM's) or not. And it does something: tokens are
    banked and injected, so a step that silently did nothing would differ."""
    from torch._dynamo.utils import counters

    H, layers = 64, "5;6"
    args = {"layers": layers, "tau_mode": "request", "warmup": 5, "low_k": 2, "p_inject": 0.5, "cos_min": 0.0,
            "cooldown": 2, "bank_k": 3, "gamma": 1.0, "beta": 0.5}
    cores = [build_core(resolve("erss", args, 8), 4) for _ in range(2)]
    eager, fused = cores
    fused.fuse()
    assert fused.method.fused and not eager.method.fused and eager.method_fused is False
    g = torch.Generator().manual_seed(11)
    pos: dict[str, int] = {}
    live: list[str] = []
    serial = 0

    def admit(prompt_len):
        nonlocal serial
        key = f"q{serial}"
        serial += 1
        with torch.inference_mode():  # as in vLLM (a table written in inference mode stays so)
            for c in cores:
                c.table.acquire(key, prompt_len=prompt_len, seed=serial)
        pos[key] = 0
        live.append(key)
        return key

    for _ in range(3):
        admit(3)
    banked = injected = 0
    graphs = None
    for t in range(140):
        if t == 40:
            for _ in range(3):
                admit(3)  # 6 live requests: the table grows from 4 to 8 slots
        if t % 23 == 22:  # a request ends; a new one comes
            gone = live.pop(int(torch.randint(0, len(live), (1,), generator=g)))
            with torch.inference_mode():
                for c in cores:
                    c.table.release(gone)
            admit(2 + t % 3)
        plan = []  # (key, positions)
        for key in live:
            p0 = pos[key]
            plen = cores[0].table.t["prompt_len"][cores[0].table.by_key[key].slot].item()
            if p0 == 0:  # its prefill, then its first generated token
                plan.append((key, list(range(plen + 1))))
            elif t % 29 == 5 and key == live[0]:  # preempted and resumed: old positions re-fed + a new one
                plan.append((key, list(range(p0 + 1))))
            else:
                plan.append((key, [p0]))
        if t == 100:  # a long prefill chunk: more tokens than slots (the gathered path)
            key = admit(12)
            plan.append((key, list(range(13))))
        n = sum(len(ps) for _k, ps in plan)
        ctx = torch.inference_mode() if t % 2 else contextlib.nullcontext()
        with ctx:  # the step's inputs made in inference mode (as vLLM's) or not
            xs = torch.randn(n, H, generator=g) * torch.exp(0.3 * torch.randn(n, 1, generator=g))
            rs = torch.randn(n, H, generator=g)
            hr = [((xs - rs).to(dtype) + j, rs.to(dtype)) for j in range(2)]
        outs = []
        with torch.inference_mode():  # vLLM's steps run in it
            for c in cores:
                infos = [c.table.by_key[k] for k, _ in plan]
                begin_step(c, infos, [ps for _k, ps in plan])
                hs = [c.layer(j, *hr[j]) for j in range(2)]
                outs.append((hs, end_step(c)))
        (hs_e, rec_e), (hs_f, rec_f) = outs
        for (a, ra), (b, rb) in zip(hs_e, hs_f):
            _same(b, a)
            _same(rb, ra)
        assert rec_e.keys() == rec_f.keys()
        for k in rec_e:
            _same(rec_f[k], rec_e[k])
        banked += int(((rec_e["event"] & EV_BANKED) != 0).sum())
        injected += int(((rec_e["event"] & EV_INJECTED) != 0).sum())
        for key, ps in plan:
            pos[key] = max(pos[key], ps[-1] + 1)
        if t == 120:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs  # compiled early on, not step after step
    assert eager.table.capacity == fused.table.capacity == 8
    for name in ("erss_bank", "erss_bank_norm", "erss_streak", "erss_cooldown"):
        _same(fused.table.t[name], eager.table.t[name])
    assert banked > 20 and injected > 10, (banked, injected)
    assert fused.method.fused  # compiled throughout: a failure would have fallen back to the plain operations


def test_a_failing_compiled_layer_step_falls_back_to_the_same_numbers(caplog, monkeypatch):
    import lm_eval_telltale.core.fuse as F

    def broken(*a):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(F, "compiled", lambda fn, dynamic=False: broken)
    (core, tab, (info,)), (ref, rtab, (rinfo,)) = make({"low_k": 2}), make({"low_k": 2})
    core.fuse()
    assert core.method_fused
    with caplog.at_level("WARNING", logger="lm_eval_telltale"):
        out, want = feed(core, tab, info, [HIGH, LOW, LOW, LOW]), feed(ref, rtab, rinfo, [HIGH, LOW, LOW, LOW])
    assert core.method_fused is False
    assert "no compiler here" in caplog.text and caplog.text.count("compiled erss_layer failed") == 1
    assert injected(out) == injected(want) == [False, False, True, False]
    for a, b in zip(out, want):
        assert a["ev"] == b["ev"] and torch.equal(a["h_out"], b["h_out"])


def test_bank_dots_of_a_token_do_not_depend_on_its_step():
    """The cosines' dot products of a token are the same bits alone and among 15 others (a batched
    matrix product's were not, with these shapes: the same request alone and in a batch recorded
    cosines a bit apart), and equal the exact ones up to rounding; any hidden size (padded to a
    power of two)."""
    from lm_eval_telltale.core.erss import bank_dots

    g = torch.Generator().manual_seed(3)
    for hidden in (128, 100, 1):
        bank, x = torch.randn(16, 32, hidden, generator=g), torch.randn(16, hidden, generator=g)
        full = bank_dots(bank, x)
        for m in (0, 7, 15):
            assert torch.equal(bank_dots(bank[m:m + 1], x[m:m + 1])[0], full[m])
        assert torch.allclose(full, torch.einsum("mkh,mh->mk", bank.double(), x.double()).float(), rtol=1e-5, atol=1e-5)


def test_new_first_is_the_stable_order_live_tokens_first():
    """The gathered form's token order (the in-graph step takes its first min(N, S)): every live
    token first, then the rest, each group in token order — a stable sort of ``~live``."""
    from lm_eval_telltale.core.erss import new_first

    g = torch.Generator().manual_seed(5)
    masks = [torch.zeros(0, dtype=torch.bool), torch.ones(7, dtype=torch.bool), torch.zeros(7, dtype=torch.bool),
             *(torch.rand(n, generator=g) < p for n in (1, 2, 33, 600) for p in (0.1, 0.5, 0.9))]
    for live in masks:
        want = torch.argsort((~live).to(torch.int8), stable=True)
        assert torch.equal(new_first(live), want), live
