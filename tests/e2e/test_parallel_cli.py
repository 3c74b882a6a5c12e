"""lm-eval's data parallelism with a telltale model type: `data_parallel_size=2` runs two replicas
(ray tasks, one core each) and keeps every statistic — one sidecar row per document, joined to
lm-eval's samples exactly as with one replica (LRS: a unit's candidates stay in one replica)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import LM_EVAL, run, samples

pytestmark = pytest.mark.e2e


def _rows(out: Path) -> tuple[dict, list[dict]]:
    res = json.loads(next(out.rglob("results_*.json")).read_text())
    side = Path(res["config"]["telltale"]["stats_path"])
    return res, [json.loads(line) for line in side.read_text().splitlines() if line.strip()]


def test_data_parallel_keeps_every_statistic(tiny_model_dir, local_task_dir, tmp_path):
    margs = (f"pretrained={tiny_model_dir},kv_cache_memory_bytes=33554432,max_model_len=512,enforce_eager=True,"
             "layers=4-6,n_candidates=3")
    common = ["--tasks", "telltale_local", "--include_path", str(local_task_dir), "--limit", "6", "--batch_size",
              "auto", "--log_samples", "--gen_kwargs", "temperature=0.8,do_sample=True"]
    dp = tmp_path / "dp2"
    p = run([LM_EVAL, "--model", "vllm-lrs", "--model_args", margs + ",data_parallel_size=2",
             "--output_path", str(dp), *common], timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    res2, rows2 = _rows(dp)
    # one row per document, none lost, none twice, each joined to lm-eval's samples as with one replica
    assert sorted(r["doc_id"] for r in rows2) == list(range(6))
    by_doc = {s["doc_id"]: s for s in samples(dp, "telltale_local")}
    for r in rows2:
        assert r["response"] == by_doc[r["doc_id"]]["resps"][0][0] and r["doc_hash"] == by_doc[r["doc_id"]]["doc_hash"]
        assert len(r["candidates"]) == 3
        assert all(c["layers"]["5"]["count"] == c["n_tokens"] - 1 for c in r["candidates"])
    assert res2["config"]["telltale"]["summary"]["answers"] == 6
    assert not list(dp.rglob("*.part.jsonl"))  # the replicas' part files were merged and removed
