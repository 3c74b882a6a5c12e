"""The sync audit through the adapters: steady-state decode steps of every method under
``SyncAudit`` (the hf adapter's whole forward, counting the package's own operations; the vLLM
runtime's step begin, layer ops, in-graph step, step end and logits hook). Nothing there syncs
but ALRR's one decision with ``skip_sync=true``; the rows arrive on the host when the requests are collected."""

from __future__ import annotations

import collections
import functools
import traceback

import pytest
import torch
from conftest import worker

from lm_eval_telltale.config import resolve
from lm_eval_telltale.core.audit import SyncAudit

pytestmark = pytest.mark.engine

CASES = {
    "norms": ("norms", {}),
    "lrs": ("lrs", {}),
    "suppress": ("suppress", {"suppress_mode": "random", "p": 0.3}),
    "alrr": ("alrr", {"warmup": 2, "growth_eps": 0.0}),  # branch-free: the in-graph step, its re-run included
    "alrr-skip": ("alrr", {"warmup": 2, "growth_eps": 0.0, "skip_sync": True}),
    "erss": ("erss", {"warmup": 2, "low_k": 1, "cooldown": 1, "bank_k": 4, "p_inject": 1.0}),
    "lrs-online": ("lrs", {"stop_signal": "conf", "stop_window": 4}),
}


def _audited(fn, audit, active):
    @functools.wraps(fn)
    def run(*a, **kw):
        if not active():
            return fn(*a, **kw)
        with audit:
            return fn(*a, **kw)
    return run


def _check(audit, calls, case):
    if case == "alrr-skip":  # its one decision per patched layer: one host read each (bool(t) or .item())
        assert calls[0] > 0 and set(audit.syncs) <= {"aten::_local_scalar_dense", "aten::is_nonzero"}
        assert audit.total == calls[0], audit.syncs
    else:
        assert audit.total == 0, audit.syncs


def _eos(model_dir) -> int:
    import json

    return int(json.loads((model_dir / "config.json").read_text())["eos_token_id"])


def _count_any(core, active):
    """ALRR's host decisions taken in audited steps."""
    calls = [0]
    plain = core.any

    def counting(mask):
        calls[0] += bool(active())
        return plain(mask)

    core.any = counting
    return calls


class _OwnSyncs(SyncAudit):
    """Counts only the syncs the package's own code issues (the innermost frame outside torch is in
    ``lm_eval_telltale``): the hf adapter's forward also runs transformers' stock code, whose mask
    logic reads one value per step on the host (``_ignore_causal_mask_sdpa``) — not ours."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = self.total
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.total != before:
            frames = [f.filename for f in traceback.extract_stack()
                      if "/torch/" not in f.filename and not f.filename.endswith(("audit.py", __file__))]
            if not frames or "lm_eval_telltale" not in frames[-1]:
                self.syncs[func._schema.name] -= 1
                self.syncs += collections.Counter()  # drop zero counts
                self.stock += 1
        return out

    def __init__(self):
        super().__init__()
        self.stock = 0


@pytest.mark.parametrize("case", list(CASES))
def test_hf_adapter_steps_issue_no_sync(case, tiny_model_dir):
    """The whole forward of a decode step (the step map, the layer hooks, ALRR's re-run, the step's
    end, the logits hook) under the audit, after the prefill step (which checks the layer layout
    once); a padded batch, so that its prefill has left padding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lm_eval_telltale.hf.runtime import GenRequest, HFRuntime

    method, knobs = CASES[case]
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    rt = HFRuntime(model, resolve(method, {"layers": "4-6", **knobs}, 8, seed=0),
                   tokenizer=AutoTokenizer.from_pretrained(str(tiny_model_dir)))
    audit = _OwnSyncs()
    steady = lambda: rt.steps >= 1  # noqa: E731
    rt._forward = _audited(rt._forward, audit, steady)
    calls = _count_any(rt.core, steady)
    extra = {"telltale_stop_threshold": 1e9, "telltale_stop_token": _eos(tiny_model_dir)}
    reqs = [GenRequest([(5 * i + 3 * j) % 250 + 1 for j in range(4 + 3 * i)], 12, tag=f"r{i}", temperature=0.8,
                       sampling_seed=i, extra_args=extra if i else {}, ignore_eos=method != "lrs") for i in range(3)]
    res = rt.generate(reqs)
    _check(audit, calls, case)
    assert audit.stock > 0  # the audit did watch the forward (transformers' own read)
    assert all(r.stats["n_decode_tokens"] == len(r.token_ids) - 1 for r in res)  # drained at collection
    if case == "lrs-online":
        assert [r.stats["stopped_at"] for r in res] == [None, 4, 4]


@pytest.mark.parametrize("case", list(CASES))
def test_vllm_adapter_steps_issue_no_sync(case, engines, tiny_model_dir):
    from vllm import SamplingParams

    method, knobs = CASES[case]
    llm = engines.make(tiny_model_dir, method, {"layers": "4-6", **knobs}, max_num_seqs=4)
    rt = worker(llm)._tt
    audit = SyncAudit()
    steady = lambda: rt.steps >= 2  # noqa: E731
    for name in ("begin_step", "post_layer", "observe_layer", "end_step", "apply_logits", "_graph_begin", "graph_end"):
        setattr(rt, name, _audited(getattr(rt, name), audit, steady))
    # all but ALRR's skip decision run their step inside the model's forward (vllm/graph.py; ALRR's
    # re-run and online LRS's windows too); in this eager engine its operations run one by one and
    # are watched too
    assert (rt.graph is not None) == (case != "alrr-skip")
    if rt.graph is not None:
        rt.graph.layer = _audited(rt.graph.layer, audit, steady)
    calls = _count_any(rt.core, steady)
    extra = {"telltale_stop_threshold": 1e9, "telltale_stop_token": _eos(tiny_model_dir)}
    sps = [SamplingParams(max_tokens=12, temperature=0.8, seed=i, ignore_eos=method != "lrs",
                          extra_args={"telltale_tag": f"a{i}", **(extra if i else {})}) for i in range(3)]
    prompts = [{"prompt_token_ids": [(5 * i + 3 * j) % 250 + 1 for j in range(4 + 3 * i)]} for i in range(3)]
    outs = llm.generate(prompts, sps, use_tqdm=False)
    assert rt.steps >= 8
    _check(audit, calls, case)
    recs = {r["tag"]: r for r in llm.collective_rpc("telltale_collect", args=([f"a{i}" for i in range(3)],))[0]}
    for i, o in enumerate(outs):  # every fed generated token's row reached the host when collected
        assert recs[f"a{i}"]["n_decode_tokens"] == len(o.outputs[0].token_ids) - 1
    if case == "lrs-online":
        assert [recs[f"a{i}"]["stopped_at"] for i in range(3)] == [None, 4, 4]
    engines.close(llm)
