"""`lm_eval --model vllm-erss` end to end (a subprocess, as users run it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli import LM_EVAL, _samples, run


@pytest.mark.e2e
def test_lm_eval_vllm_erss_end_to_end(tiny_model_dir, local_task_dir, tmp_path):
    # knobs that make the tiny random model trigger: τ = Q3 of the request's norms, short streaks,
    # every armed token attempts, any cosine; the control run never attempts (p_inject=0)
    knobs = "layers=4-6,warmup=4,iqr_k=0,low_k=3,cooldown=0,cos_min=-1"
    margs = f"pretrained={tiny_model_dir},kv_cache_memory_bytes=33554432,max_model_len=512,{knobs}"
    common = ["--tasks", "telltale_local", "--include_path", str(local_task_dir), "--limit", "4",
              "--batch_size", "auto", "--log_samples"]
    on, off = tmp_path / "on", tmp_path / "off"
    p = run([LM_EVAL, "--model", "vllm-erss", "--model_args", margs + ",p_inject=1",
             "--output_path", str(on), *common])
    assert p.returncode == 0, p.stderr[-3000:]
    p2 = run([LM_EVAL, "--model", "vllm-erss", "--model_args", margs + ",p_inject=0",
              "--output_path", str(off), *common])
    assert p2.returncode == 0, p2.stderr[-3000:]

    res = json.loads(next(on.rglob("results_*.json")).read_text())
    tt = res["config"]["telltale"]
    assert tt["model_type"] == "vllm-erss" and tt["config"]["params"]["p_inject"] == 1.0
    assert tt["summary"]["answers"] == 4 and tt["summary"]["injected"]["total"] > 0
    rows = [json.loads(l) for l in Path(tt["stats_path"]).read_text().splitlines()]
    assert sorted(r["doc_id"] for r in rows) == [0, 1, 2, 3]
    n_inj = 0
    for r in rows:
        for st in r["layers"].values():
            assert st.get("injected", 0) == len(st["inject_positions"]) == len(st["inject_cos"]) == len(st["inject_vnorm"])
            assert 0 <= st["bank_max"] <= 32
            assert all(r["n_prompt_tokens"] <= p < r["n_prompt_tokens"] + r["n_generated_tokens"]
                       for p in st["inject_positions"])
            n_inj += st.get("injected", 0)
    assert n_inj == tt["summary"]["injected"]["total"] > 0

    # injection off: no injections, and the answers differ from the steered run
    res_off = json.loads(next(off.rglob("results_*.json")).read_text())
    assert "injected" not in res_off["config"]["telltale"]["summary"]
    s_on = {s["doc_id"]: s["resps"] for s in _samples(on, "telltale_local")}
    s_off = {s["doc_id"]: s["resps"] for s in _samples(off, "telltale_local")}
    assert s_on != s_off
