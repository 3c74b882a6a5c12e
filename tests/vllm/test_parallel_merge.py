"""Merging the workers' statistics (lm_eval_telltale.vllm.driver.merge_worker_records) on crafted
per-rank and per-stage records: one record per answer, every patched layer once."""

from __future__ import annotations

import pytest

from lm_eval_telltale.vllm.driver import merge_worker_records


def _rec(tag, layers, n=5, **extra):
    return {"tag": tag, "n_decode_tokens": n, "layers": {str(l): {"count": n, "A": float(l)} for l in layers}, **extra}


def test_tensor_parallel_ranks_beyond_zero_add_nothing():
    merged = merge_worker_records([[_rec("a", [4, 5]), _rec("b", [4, 5])], []])
    assert sorted(merged) == ["a", "b"] and sorted(merged["a"]["layers"]) == ["4", "5"]


def test_pipeline_stages_merge_layer_by_layer():
    # PP=2 × TP=2 in global-rank order: stage 0 ranks 0, 1; stage 1 ranks 2, 3
    per_worker = [[_rec("a", [2, 3], conf=None)], [], [_rec("a", [4, 5, 6], conf=0.7)], []]
    merged = merge_worker_records(per_worker)
    assert sorted(merged["a"]["layers"]) == ["2", "3", "4", "5", "6"]
    assert merged["a"]["conf"] == 0.7  # the logits live on the last stage
    assert merged["a"]["layers"]["5"]["A"] == 5.0


def test_stages_that_disagree_on_an_answer_are_an_error():
    with pytest.raises(RuntimeError, match="disagree"):
        merge_worker_records([[_rec("a", [2], n=5)], [_rec("a", [4], n=6)]])
