"""End to end: the real ``lm_eval`` console script, stock ``vllm`` model type, every telltale task
family in ONE invocation, on the local fixture data, with a tiny random Qwen3.

The model is random, so the numbers mean nothing; the test checks that every task and group
writes ``exact_match`` and ``truncated`` (and the k-sample metrics of ``telltale_aime24_k8``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import GROUPS, LEAVES, TOP_LEVEL

from lm_eval_telltale.tasksupport import taskdata

BIN = Path(sys.executable).parent


@pytest.mark.e2e
def test_lm_eval_cli_runs_every_telltale_task(tmp_path, tiny_model_dir):
    data = taskdata.write_fixtures(tmp_path / "data")
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    # the engine in lm_eval's own process (the tasks are the subject; the multiprocess engine is
    # covered by tests/e2e/test_cli.py)
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    env.pop("TELLTALE_DATA_DIR", None)  # the override comes through --metadata here
    model_args = ",".join(
        [
            f"pretrained={tiny_model_dir}",
            "enforce_eager=True",
            "max_model_len=2048",
            "kv_cache_memory_bytes=67108864",
            "think_end_token=</think>",
        ]
    )
    cmd = [
        str(BIN / "lm_eval"),
        "--model", "vllm",
        "--model_args", model_args,
        "--tasks", ",".join(TOP_LEVEL),
        "--apply_chat_template",
        "--batch_size", "auto",
        "--limit", "2",
        "--gen_kwargs", "max_gen_toks=12",
        "--metadata", json.dumps({"telltale_data_dir": str(data)}),
        "--output_path", str(out),
        "--log_samples",
    ]  # fmt: skip
    r = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-8000:])

    files = sorted(out.rglob("results_*.json"))
    assert len(files) == 1, files
    res = json.loads(files[0].read_text())

    for name in [*LEAVES, *GROUPS]:
        entry = res["results"][name]
        for metric in ("exact_match", "truncated"):
            v = entry[f"{metric},none"]
            assert isinstance(v, float) and 0.0 <= v <= 1.0, (name, metric, v)
    for g in GROUPS:
        assert set(res["groups"][g]) >= {"exact_match,none", "truncated,none"}
        assert sorted(res["group_subtasks"][g]) == sorted(GROUPS[g])
    k8 = res["results"]["telltale_aime24_k8"]
    assert {"pass_at_k,none", "maj_at_k,none"} <= set(k8)
    for name in LEAVES:
        assert res["n-samples"][name]["effective"] == 2, name
        assert res["configs"][name]["generation_kwargs"]["max_gen_toks"] == 12
        assert res["configs"][name]["generation_kwargs"]["until"] == []
        assert res["higher_is_better"][name]["truncated"] is False

    # 8 samples per AIME problem reach the scorer
    samples = sorted(out.rglob("samples_telltale_aime24_k8_*.jsonl"))
    assert samples, list(out.rglob("*"))
    lines = [json.loads(x) for x in samples[0].read_text().splitlines()]
    assert len(lines) == 2 and all(len(s["filtered_resps"][0]) == 8 for s in lines)
    # prompts went through the chat template and carry the \boxed{} instruction
    gsm = json.loads(next(out.rglob("samples_telltale_gsm8k_*.jsonl")).read_text().splitlines()[0])
    prompt = gsm["arguments"]["gen_args_0"]["arg_0"]
    assert "<|im_start|>user" in prompt and "\\boxed{}" in prompt
