"""A finished lm-eval run as a ``telltale signals`` collection: its logged prompts and generations,
teacher-forced later (``--run DIR``).

Per logged sample (lm-eval's ``samples_<task>_*.jsonl``, from ``--log_samples``): the prompt is
the logged context (``arguments.gen_args_0.arg_0``, chat template applied as the run sent it),
tokenized without added special tokens as lm-eval's vLLM model sends it; the generation is, in
order of preference, the telltale sidecar's ``token_ids`` (``record_tokens=true``: the exact
tokens, and its norm trace for the engine-agreement check), its ``raw_output`` text (thinking
included), or lm-eval's first response, tokenized. Where the sidecar gives ``n_prompt_tokens`` and
the tokenized prompt differs in length, the sample's trace is not compared (a warning says so).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np


def collection_from_run(target: str | Path, *, model: str | None, limit: int | None, tasks: list[str] | None,
                        warn: Callable[[str], None], trust_remote_code: bool = False) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from ...cmdline import parse_args_string
    from ..runs import load_run, read_samples, results_files, samples_path

    files = results_files(target)
    runs = [r for r in (load_run(f, warn) for f in files) if r is not None]
    if not runs:
        raise ValueError(f"{target}: no readable lm-eval results file")
    margs = parse_args_string(((runs[0].res.get("config") or {}).get("model_args")))
    model = model or margs.get("pretrained") or margs.get("model")
    if not model:
        raise ValueError(f"{target}: the run does not say its model (model_args pretrained=); pass --model")
    tok = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    samples, seen, fell_back = [], set(), False
    for run in runs:
        rows = {(r.get("task"), r.get("doc_id"), r.get("repeat", 0)): r for r in (run.rows or [])}
        think = parse_args_string((run.res.get("config") or {}).get("model_args")).get("enable_thinking")
        mode = "default" if think is None else ("thinking" if str(think).lower() in ("true", "1") else "non-thinking")
        for task in sorted(run.res.get("configs") or run.res["results"]):
            if tasks and task not in tasks:
                continue
            sp = samples_path(run.path, task)
            if sp is None:
                continue
            logged = sorted(read_samples(sp), key=lambda s: s.get("doc_id", 0))
            for s in logged[:limit] if limit else logged:
                key = (mode, task, s.get("doc_id"))
                if key in seen:
                    continue
                seen.add(key)
                try:
                    prompt = s["arguments"]["gen_args_0"]["arg_0"]
                except (KeyError, TypeError):
                    warn(f"{sp}: doc {s.get('doc_id')}: no generation context logged; skipped")
                    continue
                p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
                row = rows.get((task, s.get("doc_id"), 0)) or {}
                if row.get("token_ids"):
                    g_ids, source = [int(t) for t in row["token_ids"]], "sidecar token_ids"
                else:
                    text = row.get("raw_output")
                    if text is None:
                        resps = s.get("resps") or [[""]]
                        text = resps[0][0] if isinstance(resps[0], list) else resps[0]
                        if not fell_back:
                            warn(f"{sp}: no sidecar text for the generations: lm-eval's logged responses are "
                                 "teacher-forced, and lm-eval may have cut the thinking out of them "
                                 "(think_end_token); a telltale model type's sidecar keeps it")
                            fell_back = True
                    g_ids, source = tok(str(text), add_special_tokens=False)["input_ids"], "text"
                trace = row.get("tokens") or {}
                n_p = row.get("n_prompt_tokens")
                if trace and n_p is not None and int(n_p) != len(p_ids):
                    warn(f"{task} doc {s.get('doc_id')}: the logged prompt tokenizes to {len(p_ids)} tokens, the run "
                         f"sent {n_p}; its norm trace is not compared")
                    trace = {}
                samples.append({"mode": mode, "task": task, "doc_id": s.get("doc_id"), "n_prompt_tokens": len(p_ids),
                                "prompt_ids": list(p_ids), "token_ids": list(g_ids), "generation_source": source,
                                "position": list(trace.get("position") or []),
                                "norm": np.asarray(trace.get("norm") or np.zeros((0, 0)), dtype=np.float64)})
    if not samples:
        raise ValueError(f"{target}: no logged samples (run lm-eval with --log_samples)")
    cfg = (runs[0].res.get("config") or {}).get("telltale") or {}
    n_layers = _num_layers(model, trust_remote_code)
    trace_layers = (cfg.get("config") or {}).get("layers")
    meta = {"model": model, "engine": f"run {Path(target)}", "num_layers": n_layers,
            "tasks": sorted({s["task"] for s in samples}), "limit": limit,
            "modes": sorted({s["mode"] for s in samples}), "trace_layers": trace_layers,
            "engine_settings": {"dtype": margs.get("dtype")} if margs.get("dtype") else {}}
    return {"meta": meta, "samples": samples}


def _num_layers(model: str, trust_remote_code: bool) -> int:
    from ...vllm import inspect_model

    return inspect_model(model, trust_remote_code=trust_remote_code)[1]
