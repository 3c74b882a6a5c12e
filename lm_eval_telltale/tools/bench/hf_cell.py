"""One ``telltale bench --engine hf`` cell: the telltale methods on the hf adapter's loop, the stock
cells on transformers' ``generate``; the same prompts, timing, counters and result file as a
vLLM cell (:mod:`.cell`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .cell import interventions
from .options import SAMPLED_STOCK, STOCK

HF_DTYPES = {"auto": "auto", "half": "float16", "float16": "float16", "bfloat16": "bfloat16", "float": "float32",
             "float32": "float32"}


def hf_worker(spec: dict) -> int:
    """One cell on transformers: a telltale method generates with the hf adapter's loop, the stock
    cells with ``model.generate``; the same prompts, timing, counters and result file as a vLLM cell."""
    import torch
    from transformers import AutoModelForCausalLM

    from ...config import resolve
    from ...core.rng import seed_from
    from ...hf.runtime import GenRequest, HFRuntime
    from ...sidecar import RunSummary

    method = spec["method"]
    telltale = method not in (STOCK, SAMPLED_STOCK)
    kw = dict(spec["engine"])
    user = {k: kw[k] for k in spec["user_engine_keys"] if k in kw}
    device = user.pop("device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    seed = int(spec["seed"])
    sampling = spec.get("sampling")
    n_cand = int(spec["n_candidates"])
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(kw["model"], dtype=HF_DTYPES.get(str(kw.get("dtype")), "auto"),
                                                 **user).to(device).eval()
    cfg = rt = None
    if telltale:
        cfg = resolve(method, dict(spec["tt_args"]), spec["num_layers"], seed=seed)
        rt = HFRuntime(model, cfg, engine_seed=seed)
    startup = time.perf_counter() - t0
    gc = model.generation_config
    pad = gc.pad_token_id if gc.pad_token_id is not None else (gc.eos_token_id if isinstance(gc.eos_token_id, int)
                                                               else 0)

    def run(prompts, max_tokens, prefix):
        """Generated tokens per request (and the hf adapter's results for a telltale method)."""
        if rt is not None:
            reqs = [GenRequest(list(ids), max_tokens, tag=f"{prefix}{i}.{k}", identity=seed_from(seed, i, k),
                               sampling_seed=seed_from(seed, i, k) if sampling else None, ignore_eos=True,
                               **(sampling or {}))
                    for i, ids in enumerate(prompts) for k in range(n_cand)]
            res = rt.generate(reqs)
            return [len(r.token_ids) for r in res], res
        ids = torch.tensor([list(p) for p in prompts for _ in range(n_cand)], device=device)
        extra = dict(do_sample=True, **sampling) if sampling else dict(do_sample=False)
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, pad_token_id=pad, **extra)
        return [int(out.shape[1] - ids.shape[1])] * ids.shape[0], None

    t0 = time.perf_counter()
    run(spec["warm_prompts"], int(spec["warm_tokens"]), "w")
    warmup = time.perf_counter() - t0
    state0 = rt.method.summary() if rt is not None else {}
    t0 = time.perf_counter()
    lengths, results = run(spec["prompts"], int(spec["max_tokens"]), "t")
    wall = time.perf_counter() - t0
    gen = sum(lengths)
    res: dict[str, Any] = {
        "requests": len(lengths), "prompt_tokens": sum(len(p) for p in spec["prompts"]) * n_cand,
        "generated_tokens": gen, "wall_s": wall, "tps": gen / wall if wall > 0 else None,
        "startup_s": startup, "warmup_s": warmup,
        "engine": {"engine": "hf", "device": f"{device} ({torch.get_num_threads()} threads)",
                   "dtype": str(model.dtype).replace("torch.", ""), "compilation": None},
        "engine_kwargs": {"device": device, **{k: v for k, v in kw.items() if k in ("model", "dtype", "seed")}, **user},
    }
    if rt is not None:
        summ = RunSummary(cfg)
        for r in results:
            summ.add({"n_generated_tokens": len(r.token_ids), "finish_reason": r.finish_reason,
                      "n_decode_tokens": r.stats.get("n_decode_tokens", 0), "layers": r.stats.get("layers", {})})
        res.update(interventions=interventions(summ.to_dict()), collected=len(results), telltale_layers=cfg.layers)
        if method == "alrr":
            state1 = rt.method.summary()
            res["alrr"] = {k: int(state1.get(k, 0)) - int(state0.get(k, 0)) for k in ("rerun_calls", "rerun_rows")}
    Path(spec["result_path"]).write_text(json.dumps(res, default=str))
    return 0
