"""The sync audit (``core/audit.py``): a steady-state step of every method issues no operation
that needs a device→host sync, except ALRR's one host decision (``CoreEngine.any``) — through the
core on crafted tensors here, through the hf and vLLM adapters' hooks in
``tests/engine/test_sync_audit_adapters.py``. The rows of generated tokens reach the host only
when drained."""

from __future__ import annotations

import pytest
import torch

from lm_eval_telltale.config import resolve
from lm_eval_telltale.core.audit import SyncAudit
from lm_eval_telltale.core.engine import build_core
from lm_eval_telltale.core.step import build_step

#: (method, knobs): every method, the suppression modes, the τ modes, online LRS
CASES = {
    "norms": ("norms", {}),
    "norms-global": ("norms", {"tau_mode": "global"}),
    "norms-fixed": ("norms", {"tau_mode": "fixed", "tau": 3.0}),
    "suppress": ("suppress", {}),
    "suppress-random": ("suppress", {"suppress_mode": "random", "p": 0.3}),
    "suppress-matched": ("suppress", {"suppress_mode": "matched", "match_rate": 0.2}),
    "alrr": ("alrr", {"growth_eps": 0.0}),  # branch-free: no decision
    "alrr-skip": ("alrr", {"growth_eps": 0.0, "skip_sync": True}),
    "erss": ("erss", {"low_k": 1, "cooldown": 1, "bank_k": 4, "p_inject": 1.0, "cos_min": -1.0}),
    "lrs": ("lrs", {}),
    "lrs-online-norm": ("lrs", {"stop_signal": "norm", "stop_window": 2}),
    "lrs-online-conf": ("lrs", {"stop_signal": "conf", "stop_window": 2}),
}


def test_the_audit_sees_every_kind_of_sync():
    t = torch.arange(6.0)
    with SyncAudit() as quiet:
        u = t + 1
        u.index_put_((torch.tensor([0, 2]),), torch.tensor([5.0, 6.0]))
        torch.where(u > 2, u, 0.0).cumsum(0)
    assert quiet.total == 0
    checks = {
        "item": lambda: t.sum().item(),
        "bool": lambda: bool(t.any()),
        "nonzero": lambda: t.nonzero(),
        "mask index": lambda: t[t > 2],
        "mask write": lambda: t.clone().__setitem__(t > 3, 0.0),
        "masked_select": lambda: t.masked_select(t > 1),
        "equal": lambda: torch.equal(t, t),
    }
    for what, fn in checks.items():
        with SyncAudit() as a:
            fn()
        assert a.total >= 1, what


@pytest.mark.parametrize("case", list(CASES))
def test_steady_state_steps_issue_no_sync(case):
    method, knobs = CASES[case]
    cfg = resolve(method, {"layers": "1-2", "warmup": 2, **knobs}, 4, seed=3)
    core = build_core(cfg, capacity=8)
    extra = {"telltale_stop_threshold": 1e9, "telltale_stop_token": 1, "telltale_think_end_token": 7}
    infos = [core.table.acquire(f"r{i}", prompt_len=p, seed=i, values=core.method.slot_values(extra if i else {}))
             for i, p in enumerate((3, 5, 2))]
    calls = 0
    plain_any = core.any

    def counting_any(mask):
        nonlocal calls
        calls += 1
        return plain_any(mask)

    core.any = counting_any
    gen = torch.Generator().manual_seed(0)
    audit = SyncAudit()
    decode_tokens = 0
    for step in range(14):
        if step == 0:
            pos = [list(range(p)) for p in (3, 5, 2)]
        else:
            pos = [[p - 1 + step] for p in (3, 5, 2)]
        qsl = torch.tensor([0] + list(torch.tensor([len(x) for x in pos]).cumsum(0).tolist()))
        toks = torch.randint(0, 50, (int(qsl[-1]),), generator=gen)
        if step == 4:
            calls = 0  # ALRR's decisions counted from the first audited step
        ctx = audit if step >= 4 else _Nothing()
        with ctx:
            core.begin(build_step(core.table, qsl, torch.tensor([i.slot for i in infos]),
                                  torch.tensor([x for p in pos for x in p]), toks))
            n = core.step.num_tokens
            for j in range(2):
                scale = 1.0 + 3.0 * torch.rand(n, 1, generator=gen)
                h = torch.randn(n, 16, generator=gen) * scale
                r = torch.randn(n, 16, generator=gen)
                core.layer(j, h, r, lambda hi, ri: (hi * 1.1, ri))
            core.end()
            if core.method.wants_logits:
                core.method.observe_logits(torch.tensor([i.slot for i in infos]), torch.randn(3, 50, generator=gen),
                                           torch.ones(3, dtype=torch.bool))
        decode_tokens += 3 if step else 0
    if case == "alrr-skip":
        assert calls > 0 and set(audit.syncs) <= {"aten::_local_scalar_dense", "aten::is_nonzero"}
        assert audit.total == calls, audit.syncs  # one host read per decision
    else:
        assert audit.total == 0, audit.syncs
    # the drain (the collection path) brings every generated token's row to the host
    rows = core.drain()
    assert sum(int(r["serial"].numel()) for r in rows) == decode_tokens


def test_step_rows_drain_before_the_buffer_could_overflow():
    from lm_eval_telltale.core.collect import StepRows

    buf = StepRows(["norm"], 2, capacity=5)
    total = 0
    for step in range(7):  # 3 requests per step, 2 of them with a new token: bound 3 per step
        new = torch.tensor([True, False, True, False])
        ints = torch.tensor([[step, 10 * step + k, 0, 0] for k in range(4)])
        buf.append(ints, torch.full((4, 2), float(step)), new, 3)
        total += 2
        assert buf.bound <= buf.capacity
    rows = buf.drain()
    assert len(rows) > 1  # it drained itself before overflowing
    pos = torch.cat([r["position"] for r in rows]).tolist()
    assert pos == [10 * s + k for s in range(7) for k in (0, 2)] and len(pos) == total
    assert buf.drain() == []


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_an_audit_leaves_the_compiled_kernels_compiled():
    """A step run under the audit takes the plain operations (a compiled call cannot run under a
    dispatch mode); the compiled threshold update must stay on for the steps after it (an audit in
    `telltale bench` once switched it off for the timed runs), with the same numbers."""
    from lm_eval_telltale.core.thresholds import Thresholds

    eager, fused = (Thresholds("request", num_layers=2, capacity=4, warmup=2) for _ in range(2))
    fused.fuse()
    g = torch.Generator().manual_seed(1)
    for t in range(12):
        slot, norms = torch.arange(3), torch.rand(3, 2, generator=g) * 5
        mask = torch.ones(3, dtype=torch.bool)
        with torch.inference_mode():
            for thr in (eager, fused):
                if t == 6:
                    with SyncAudit() as audit:
                        thr.update(slot, norms, mask)
                    assert audit.total == 0
                else:
                    thr.update(slot, norms, mask)
        assert torch.equal(fused.tau_slots().nan_to_num(-1.0), eager.tau_slots().nan_to_num(-1.0))
    assert fused.fused and torch.isfinite(fused.tau_slots()[:3]).all()
