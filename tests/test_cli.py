"""The stock `lm_eval` console script with the telltale model types (subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BIN

LM_EVAL = str(BIN / "lm_eval")


def run(args, env_extra=None, timeout=600):
    env = {**os.environ, **(env_extra or {})}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the CLI runs vLLM as users do
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)


def test_registration_keeps_stock_models():
    code = (
        "from lm_eval.api.registry import get_model, model_registry\n"
        "import lm_eval.models.vllm_causallms as v, lm_eval.models.dummy as d\n"
        "assert get_model('vllm') is v.VLLM and get_model('dummy') is d.DummyLM\n"
        "assert {'hf', 'steered', 'sglang'} <= set(model_registry.keys())\n"
        "m = get_model('vllm-norms'); print(m.__module__ + ':' + m.__name__)\n"
    )
    p = run([sys.executable, "-c", code])
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "lm_eval_telltale.harness.models:VLLMNorms"


def test_module_fallback_has_identical_flags(tiny_model_dir, local_task_dir):
    # with the start-up hook off, `python -m lm_eval_telltale` still knows vllm-norms: it fails on
    # our own validation (layer 99), not on an unknown model name
    p = run([sys.executable, "-m", "lm_eval_telltale", "--model", "vllm-norms", "--model_args",
             f"pretrained={tiny_model_dir},layers=99", "--tasks", "telltale_local",
             "--include_path", str(local_task_dir)], {"TELLTALE_NO_HOOK": "1"}, 120)
    assert p.returncode != 0
    assert "'layers'" in p.stderr and "out of range" in p.stderr


def _samples(d: Path, task: str) -> list[dict]:
    f = next(d.rglob(f"samples_{task}_*.jsonl"))
    return [json.loads(l) for l in f.read_text().splitlines() if l.strip()]


@pytest.mark.e2e
def test_lm_eval_vllm_norms_end_to_end(tiny_model_dir, local_task_dir, tmp_path):
    common = ["--tasks", "telltale_local", "--include_path", str(local_task_dir), "--limit", "4",
              "--batch_size", "auto", "--log_samples"]
    margs = f"pretrained={tiny_model_dir},kv_cache_memory_bytes=33554432,max_model_len=512"
    out_n, out_v = tmp_path / "norms", tmp_path / "vllm"
    p = run([LM_EVAL, "--model", "vllm-norms", "--model_args", margs + ",layers=4-6,warmup=4",
             "--output_path", str(out_n), *common])
    assert p.returncode == 0, p.stderr[-3000:]
    p2 = run([LM_EVAL, "--model", "vllm", "--model_args", margs + ",enforce_eager=True",
              "--output_path", str(out_v), *common])
    assert p2.returncode == 0, p2.stderr[-3000:]

    res = json.loads(next(out_n.rglob("results_*.json")).read_text())
    tt = res["config"]["telltale"]
    assert res["config"]["model"] == "vllm-norms" and tt["config"]["layers"] == [4, 5, 6]
    side = Path(tt["stats_path"])
    assert side.is_file() and side.parent == next(out_n.rglob("results_*.json")).parent
    rows = [json.loads(l) for l in side.read_text().splitlines()]
    assert sorted(r["doc_id"] for r in rows) == [0, 1, 2, 3]
    assert all(r["task"] == "telltale_local" and r["n_decode_tokens"] == r["n_generated_tokens"] - 1 for r in rows)
    assert all(set(r["layers"]) == {"4", "5", "6"} and r["layers"]["5"]["count"] > 0 for r in rows)
    assert tt["summary"]["answers"] == 4

    # the responses are the stock backend's, and the sidecar is joined to the right documents
    sn = {s["doc_id"]: s["resps"] for s in _samples(out_n, "telltale_local")}
    sv = {s["doc_id"]: s["resps"] for s in _samples(out_v, "telltale_local")}
    assert sn == sv
    assert {r["doc_id"]: r["response"] for r in rows} == {d: v[0][0] for d, v in sn.items()}


@pytest.mark.e2e
@pytest.mark.parametrize("mtype,args,counter", [
    ("vllm-suppress", "layers=4-6,warmup=4", "suppressed"),
    ("vllm-alrr", "layers=4-6,warmup=4,growth_eps=0.0", "accepted"),
])
def test_lm_eval_method_end_to_end(tiny_model_dir, local_task_dir, tmp_path, mtype, args, counter):
    margs = f"pretrained={tiny_model_dir},kv_cache_memory_bytes=33554432,max_model_len=512,{args}"
    p = run([LM_EVAL, "--model", mtype, "--model_args", margs, "--tasks", "telltale_local", "--include_path",
             str(local_task_dir), "--limit", "4", "--batch_size", "auto", "--output_path", str(tmp_path)])
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(next(tmp_path.rglob("results_*.json")).read_text())
    tt = res["config"]["telltale"]
    assert tt["model_type"] == mtype and tt["summary"][counter]["total"] > 0
    rows = [json.loads(l) for l in Path(tt["stats_path"]).read_text().splitlines()]
    assert len(rows) == 4 and sum(st.get(counter, 0) for r in rows for st in r["layers"].values()) > 0


@pytest.mark.e2e
def test_lm_eval_vllm_lrs_end_to_end(tiny_model_dir, local_task_dir, tmp_path):
    margs = f"pretrained={tiny_model_dir},kv_cache_memory_bytes=33554432,max_model_len=512,layers=4-6,n_candidates=4"
    p = run([LM_EVAL, "--model", "vllm-lrs", "--model_args", margs, "--gen_kwargs", "temperature=0.8,do_sample=True",
             "--tasks", "telltale_local", "--include_path", str(local_task_dir), "--limit", "3", "--batch_size", "auto",
             "--output_path", str(tmp_path), "--log_samples"])
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(next(tmp_path.rglob("results_*.json")).read_text())
    tt = res["config"]["telltale"]
    rows = {r["doc_id"]: r for r in map(json.loads, Path(tt["stats_path"]).read_text().splitlines())}
    samples = {s["doc_id"]: s for s in _samples(tmp_path, "telltale_local")}
    assert sorted(rows) == sorted(samples) == [0, 1, 2]
    for d, r in rows.items():
        assert len(r["candidates"]) == 4 and r["chosen"] == "late_sum"
        assert set(r["picks"]) == {"late_sum", "mean", "A", "B", "C", "D", "maj", "conf", "random", "first"}
        best = max(range(4), key=lambda k: (r["candidates"][k]["complete"], r["candidates"][k]["scores"]["late_sum"]))
        assert r["picks"]["late_sum"] == best
        # lm-eval scored the response the sidecar says late_sum picked
        assert samples[d]["resps"][0][0] == r["candidates"][best]["response"] == r["response"]
        assert all(c["correct"] in (0.0, 1.0) for c in r["candidates"])  # the task's own scorer ran
        assert len({c["text"] for c in r["candidates"]}) > 1
    assert set(tt["summary"]["lrs_selectors"]) >= {"late_sum", "maj", "conf", "random", "first"}
