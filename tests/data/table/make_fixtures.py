"""Regenerate the real-run fixtures of ``tests/test_table.py`` (``tests/data/table/real/``).

Runs the real ``lm_eval`` console script ONCE per configuration on the deterministic tiny random
Qwen3 (``telltale tiny-model``, seed 0) and the packaged ``telltale_gsm8k`` task plus the
``telltale_gsm_plus_mini`` group (8 subtasks) on the synthetic fixture data
(``taskdata.write_fixtures``), ``--limit 2``, 16 new tokens, chat template on. Then it copies
each run's results JSON and telltale sidecar into ``real/<name>/tiny-qwen3/`` with the machine-
specific parts anonymised (temporary paths → ``/anon/...``, the model path → ``tiny-qwen3``,
``pretty_env_info`` and git hashes dropped, task configs trimmed). The sidecars' ``stats_path`` then points nowhere,
which is what ``telltale table`` must cope with anyway (it falls back to the file of the same name
next to the results JSON).

Usage (about 7 minutes on 2 CPU cores)::

    .venv/bin/python tests/data/table/make_fixtures.py            # all runs
    .venv/bin/python tests/data/table/make_fixtures.py lrs erss   # only these

then regenerate the golden outputs: ``TELLTALE_UPDATE_GOLDEN=1 .venv/bin/python -m pytest
tests/test_table.py`` and review the diff.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "real"
BIN = Path(sys.executable).parent
COMMON_ARGS = "kv_cache_memory_bytes=33554432,max_model_len=1024,think_end_token=</think>"
KNOBS = "layers=4-6,warmup=4"

#: name -> (model type, extra model_args, extra lm_eval flags)
RUNS: dict[str, tuple[str, str, list[str]]] = {
    "baseline": ("vllm", "enforce_eager=True", []),
    "norms": ("vllm-norms", KNOBS, []),
    "alrr": ("vllm-alrr", KNOBS + ",growth_eps=0.0", []),
    "suppress": ("vllm-suppress", KNOBS, []),
    "erss": ("vllm-erss", KNOBS + ",iqr_k=0,low_k=3,cooldown=0,cos_min=-1,p_inject=1", []),
    # max_num_batched_tokens: no chunked prefill — vLLM 0.32's CPU runner cannot rewind the seeded
    # per-request generator of a partially prefilled request ("CPU Generator does not use offset")
    "lrs": ("vllm-lrs", KNOBS + ",n_candidates=4,max_num_batched_tokens=16384",
            ["--gen_kwargs", "max_gen_toks=16,temperature=0.8,do_sample=True"]),
}
TASKS = "telltale_gsm8k,telltale_gsm_plus_mini"


def _scrub(obj, repl: list[tuple[str, str]]):
    if isinstance(obj, dict):
        return {k: _scrub(v, repl) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_scrub(v, repl) for v in obj]
    if isinstance(obj, str):
        for a, b in repl:
            obj = obj.replace(a, b)
        return obj
    return obj


def trim_configs(configs: dict) -> dict:
    """Keep the informative part of each task config (the table never reads them; ~70 % of the size)."""
    keep = ("task", "tag", "dataset_kwargs", "test_split", "output_type", "generation_kwargs", "metric_list",
            "repeats", "metadata")
    return {t: {k: c[k] for k in keep if k in c} for t, c in configs.items()}


def main(names: list[str]) -> int:
    from lm_eval_telltale.tasksupport import taskdata
    from lm_eval_telltale.tools.tiny import build_tiny_model

    names = names or list(RUNS)
    tmp = Path(tempfile.mkdtemp(prefix="tt-table-"))
    model = build_tiny_model(tmp / "tiny-qwen3", "qwen3", seed=0)
    data = taskdata.write_fixtures(tmp / "data")
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TELLTALE_DATA_DIR=str(data))
    repl = [(str(model), "tiny-qwen3"), (str(tmp), "/anon"), (model.as_posix().replace("/", "__"), "tiny-qwen3")]
    for name in names:
        mtype, margs, extra = RUNS[name]
        out = tmp / "runs" / name
        gen = [] if "--gen_kwargs" in extra else ["--gen_kwargs", "max_gen_toks=16"]
        cmd = [str(BIN / "lm_eval"), "--model", mtype, "--model_args", f"pretrained={model},{COMMON_ARGS},{margs}",
               "--tasks", TASKS, "--apply_chat_template", "--limit", "2", "--batch_size", "auto",
               "--output_path", str(out), *gen, *extra]
        print("[fixtures]", " ".join(cmd), flush=True)
        p = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True)
        if p.returncode != 0:
            print(p.stderr[-5000:], file=sys.stderr)
            return p.returncode
        dest = OUT / name / "tiny-qwen3"
        if dest.parent.exists():
            shutil.rmtree(dest.parent)
        dest.mkdir(parents=True)
        for f in sorted(out.rglob("results_*.json")):
            res = json.loads(f.read_text())
            for k in ("pretty_env_info", "git_hash", "upper_git_hash"):
                res.pop(k, None)
            res["configs"] = trim_configs(res.get("configs") or {})
            (dest / f.name).write_text(json.dumps(_scrub(res, repl), indent=2, ensure_ascii=False) + "\n")
        for f in sorted(out.rglob("telltale_*.jsonl")):
            rows = [json.loads(l) for l in f.read_text().splitlines() if l.strip()]
            (dest / f.name).write_text("".join(json.dumps(_scrub(r, repl), ensure_ascii=False) + "\n" for r in rows))
        print(f"[fixtures] {name}: {sorted(p.name for p in dest.iterdir())}", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
