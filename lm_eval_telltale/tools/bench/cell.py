"""One ``telltale bench`` cell, in its own process (``python -m lm_eval_telltale.tools.bench.cell
SPEC``): build the engine as the lm-eval model types do, warm it up, time one run (or, with
``--alternate``, serve timed runs until told to quit) and write the result file."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .options import SAMPLED_STOCK, STOCK


def _engine_info(llm) -> dict[str, Any]:
    info: dict[str, Any] = {}
    try:
        vc = llm.llm_engine.vllm_config
        cc, sc, mc = vc.compilation_config, vc.scheduler_config, vc.model_config
        info["compilation"] = {k: getattr(v, "name", str(v)) for k in ("mode", "cudagraph_mode")
                               for v in [getattr(cc, k, None)]}
        info["enforce_eager"] = bool(getattr(mc, "enforce_eager", False))
        info["dtype"] = str(mc.dtype).replace("torch.", "")
        info["async_scheduling"] = getattr(sc, "async_scheduling", None)
        info["max_num_seqs"] = getattr(sc, "max_num_seqs", None)
        info["max_num_batched_tokens"] = getattr(sc, "max_num_batched_tokens", None)
        info["enable_chunked_prefill"] = getattr(sc, "enable_chunked_prefill", None)
        info["enable_prefix_caching"] = getattr(vc.cache_config, "enable_prefix_caching", None)
        info["use_v2_model_runner"] = getattr(vc, "use_v2_model_runner", None)
    except Exception as e:  # noqa: BLE001 — informational only
        info["error"] = repr(e)
    try:
        import torch
        from vllm.platforms import current_platform

        info["device"] = (f"cpu ({torch.get_num_threads()} threads)" if current_platform.is_cpu()
                          else torch.cuda.get_device_name(0))
    except Exception:  # noqa: BLE001
        pass
    return info


def _engine_total(states: list, read, tp: int) -> float:
    """A figure of the workers' ``telltale_state`` over the engine: ``read(state)`` summed over the
    workers (pipeline stages own different layers) and divided by the tensor-parallel size (its
    ranks all run, and count, the same work)."""
    return sum(read(st) for st in states or [] if st) / max(1, tp)


def _method_total(states: list, key: str, tp: int) -> int:
    """A counter of the method's ``summary()`` over the engine (:func:`_engine_total`)."""
    return int(_engine_total(states, lambda st: int((st.get("method") or {}).get(key, 0)), tp))


def _kernels(states: list) -> dict[str, bool | None]:
    """Whether the telltale core's own per-step work ran compiled on every worker, from their
    ``telltale_state``: ``core`` the threshold update, ``method`` the method's layer step (None for
    a method without one). A kernel whose compile failed falls back for good, so the state after a
    run says how that run ran."""
    sts = [st for st in states or [] if st]
    mf = [st.get("method_fused") for st in sts]
    out = {"core": bool(sts) and all(bool(st.get("fused")) for st in sts),
           "method": None if all(m is None for m in mf) else all(bool(m) for m in mf)}
    if any(st.get("in_graph") for st in sts):  # the in-graph step (vllm/graph.py) on every worker
        out["graph"] = all(bool(st.get("in_graph")) for st in sts)
    return out


def _hook_time(states0: list, states1: list, wall_s: float, tp: int = 1) -> dict[str, float | None]:
    """The host time telltale's hooks took in a run (``hook_s`` of the workers' ``telltale_state``
    before and after, over the engine as :func:`_engine_total` counts: a stage's tensor-parallel
    ranks run their hooks at the same time, a pipeline's stages one after another): ``ms_per_step``
    per engine step and ``share`` of the run's wall time."""
    before = next((st for st in states0 or [] if st), None)
    after = next((st for st in states1 or [] if st), None)
    if before is None or after is None:  # without both readings the time would include the warm-up's
        return {"ms_per_step": None, "share": None}

    def hook(st):
        return float(st.get("hook_s", 0.0))

    s = _engine_total(states1, hook, tp) - _engine_total(states0, hook, tp)
    steps = int(after.get("steps", 0)) - int(before.get("steps", 0))
    return {"ms_per_step": 1e3 * s / steps if steps > 0 else None, "share": s / wall_s if wall_s > 0 else None}


def audit_syncs(llm, reqs) -> dict[str, Any]:
    """The syncing operations telltale's hooks issue per engine step, counted by the workers'
    sync audit (``telltale_audit``) over one untimed run of ``reqs`` (the audit is slow): rank 0's
    steps; ``ops`` by operation, summed over the workers."""
    from ...vllm.driver import collect

    ps, sps, tags = reqs
    llm.collective_rpc("telltale_audit", args=(True,))
    try:
        outs = llm.generate(ps, sps, use_tqdm=False)
    finally:
        got = [g for g in llm.collective_rpc("telltale_audit", args=(False,)) if g]
    collect(llm, tags, [len(o.outputs[0].token_ids) for o in outs])
    ops: dict[str, int] = {}
    for g in got:
        for k, v in g["syncs"].items():
            ops[k] = ops.get(k, 0) + int(v)
    steps = got[0]["steps"] if got else 0
    return {"steps": steps, "ops": ops, "per_step": sum(ops.values()) / steps if steps else None}


def timed_run(llm, prompts: list[dict], params: list, tags: list[str]) -> tuple[list[int], list, dict[str, Any]]:
    """Generate ``prompts`` by stepping ``llm``'s engine and time it. ``LLM.generate`` asks for the
    final outputs only; this loop asks for each step's new tokens (``DELTA``: one small output per
    running request and step, no cumulative copies), which is what it needs to see the moment
    every request had its first token. Timing: ``wall_s`` from the first request added to the last
    token; ``first_s`` when every request had its first token (its prompt's prefill done, chunks
    included); ``decode_tokens`` generated after that and ``decode_tps`` = ``decode_tokens`` ÷
    the time after that — the decode throughput, without the prefill.
    Returns the tokens generated and the finish reason per request (in ``tags`` order), and the
    timing."""
    from vllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    ntok = dict.fromkeys(tags, 0)  # tokens so far, per request
    finish: dict[str, Any] = {}
    started = 0
    t_first = gen_first = None
    t0 = time.perf_counter()
    for tag, p, sp in zip(tags, prompts, params):
        sp.output_kind = RequestOutputKind.DELTA
        engine.add_request(tag, p, sp)
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.outputs:
                n = len(o.outputs[0].token_ids)
                if n and not ntok[o.request_id]:
                    started += 1
                ntok[o.request_id] += n
                if o.finished:
                    finish[o.request_id] = o.outputs[0].finish_reason
        if t_first is None and started == len(tags):
            t_first = time.perf_counter()
            gen_first = sum(ntok.values())
    t_end = time.perf_counter()
    missing = [t for t in tags if t not in finish]
    if missing:
        raise RuntimeError(f"bench: {len(missing)} requests did not finish (e.g. {missing[0]})")
    lengths = [ntok[t] for t in tags]
    timing: dict[str, Any] = {"wall_s": t_end - t0, "first_s": None, "decode_tokens": None, "decode_tps": None}
    if t_first is not None:
        timing["first_s"] = t_first - t0
        timing["decode_tokens"] = sum(lengths) - gen_first
        if timing["decode_tokens"] > 0 and t_end > t_first:
            timing["decode_tps"] = timing["decode_tokens"] / (t_end - t_first)
    return lengths, [finish[t] for t in tags], timing


def worker_main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    if spec.get("threads"):
        import torch

        torch.set_num_threads(int(spec["threads"]))
    if spec.get("engine_kind") == "hf":
        from .hf_cell import hf_worker

        return hf_worker(spec)
    from vllm import LLM, SamplingParams
    from vllm.platforms import current_platform

    from ...config import resolve
    from ...core.rng import seed_from
    from ...sidecar import RunSummary
    from ...vllm import assemble_engine_args, modifies_kv, whole_prompt_budget
    from ...vllm.driver import collect

    method = spec["method"]
    telltale = method not in (STOCK, SAMPLED_STOCK)
    kw = dict(spec["engine"])
    user = set(spec["user_engine_keys"])
    cfg = None
    if telltale:
        cfg = resolve(method, dict(spec["tt_args"]), spec["num_layers"], seed=int(kw.get("seed") or 0))
        # as the lm-eval model types assemble it (the user's explicit choices win where they may)
        kw = assemble_engine_args(cfg, spec["arch"], kw, salted_requests=True, explicit=user)
    if current_platform.is_cpu():
        if "kv_cache_memory_bytes" not in kw:
            kw["kv_cache_memory_bytes"] = int(spec["cpu_kv_bytes"])
        if spec.get("sampling") and "enable_chunked_prefill" not in user:
            # vllm-lrs's CPU setting (harness/lrs.py): vLLM 0.32's CPU runner cannot resume a seeded
            # request whose prompt was split by chunked prefill; its stock comparator needs the same
            kw["enable_chunked_prefill"] = False
            if "max_num_batched_tokens" not in user:
                kw["max_num_batched_tokens"] = whole_prompt_budget(kw)
    salt = telltale and modifies_kv(cfg)
    n_cand = int(spec["n_candidates"])

    def requests(prompts, max_tokens, prefix):
        ps, sps, tags = [], [], []
        for i, ids in enumerate(prompts):
            for k in range(n_cand):
                tag = f"{prefix}{i}.{k}"
                if spec.get("sampling"):
                    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, seed=seed_from(spec["seed"], i, k),
                                        **spec["sampling"])
                else:
                    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
                p = {"prompt_token_ids": list(ids)}
                if telltale:
                    sp.extra_args = {"telltale_tag": tag, "telltale_seed": seed_from(spec["seed"], i, k)}
                    if salt:  # as the lm-eval model types: a request reuses only blocks it cached itself
                        p["cache_salt"] = tag
                ps.append(p)
                sps.append(sp)
                tags.append(tag)
        return ps, sps, tags

    t0 = time.perf_counter()
    llm = LLM(**kw)
    startup = time.perf_counter() - t0
    try:
        ps, sps, tags = requests(spec["warm_prompts"], int(spec["warm_tokens"]), "w")
        t0 = time.perf_counter()
        outs = llm.generate(ps, sps, use_tqdm=False)
        warmup = time.perf_counter() - t0
        if telltale:
            collect(llm, tags, [len(o.outputs[0].token_ids) for o in outs])
            syncs = audit_syncs(llm, requests(spec["warm_prompts"], int(spec["warm_tokens"]), "a"))

        def measure(prefix: str) -> dict[str, Any]:
            """One timed run of the cell's requests, its counters and the requests' statistics."""
            if telltale:
                state0 = llm.collective_rpc("telltale_state")
            ps, sps, tags = requests(spec["prompts"], int(spec["max_tokens"]), prefix)
            lengths, finish, timing = timed_run(llm, ps, sps, tags)
            gen, wall = sum(lengths), timing["wall_s"]
            res: dict[str, Any] = {
                "requests": len(ps), "prompt_tokens": sum(len(p["prompt_token_ids"]) for p in ps),
                "generated_tokens": gen, "tps": gen / wall if wall > 0 else None, **timing,
                "startup_s": startup, "warmup_s": warmup, "engine": _engine_info(llm), "engine_kwargs": {
                    k: v for k, v in kw.items() if k != "hf_overrides"},
            }
            if telltale:
                t0 = time.perf_counter()
                recs = collect(llm, tags, lengths)
                res["collect_s"] = time.perf_counter() - t0
                state1 = llm.collective_rpc("telltale_state")
                summ = RunSummary(cfg)
                for tag, n, why in zip(tags, lengths, finish):
                    r = recs.get(tag) or {}
                    summ.add({"n_generated_tokens": n, "finish_reason": why,
                              "n_decode_tokens": r.get("n_decode_tokens", 0), "layers": r.get("layers", {})})
                res["interventions"] = interventions(summ.to_dict())
                res["collected"] = len(recs)
                res["telltale_layers"] = cfg.layers
                res["kernels"] = _kernels(state1)
                tp = int(getattr(llm.llm_engine.vllm_config.parallel_config, "tensor_parallel_size", 1) or 1)
                res["hooks"] = _hook_time(state0, state1, res["wall_s"], tp)
                res["syncs"] = syncs
                if method == "alrr":
                    res["alrr"] = {k: _method_total(state1, k, tp) - _method_total(state0, k, tp)
                                   for k in ("rerun_calls", "rerun_rows")}
            return res

        if spec.get("control_fd") is None:
            Path(spec["result_path"]).write_text(json.dumps(measure("t"), default=str))
        else:
            _serve(spec, measure)
    finally:
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001
            pass
    return 0


def _serve(spec: dict, measure) -> None:
    """``--alternate``: the cell's engine stays up. It says ``ready`` on its control pipe, then for
    each ``run K`` read from stdin times one run, writes its result to ``result_path`` with ``{k}``
    replaced by K and says ``done K``; ``quit`` (or the end of stdin) ends it."""
    with os.fdopen(int(spec["control_fd"]), "w", buffering=1) as ctl:
        ctl.write("ready\n")
        for line in sys.stdin:
            cmd = line.split()
            if not cmd or cmd[0] == "quit":
                break
            k = int(cmd[1])
            res = measure(f"t{k}.")
            Path(spec["result_path"].replace("{k}", str(k))).write_text(json.dumps(res, default=str))
            ctl.write(f"done {k}\n")



def interventions(summary: dict) -> dict[str, float]:
    """Every event's rate per 1k generated tokens from a :class:`~lm_eval_telltale.sidecar.RunSummary`'s
    dict (0 for an event that never happened: the summary lists only those that did); ``above_tau``
    summed over the layers."""
    from ...core.stats import EVENT_NAMES

    out = {k: 0.0 for k in EVENT_NAMES if k != "above_tau"}
    out.update({k: v["per_1k_tokens"] for k, v in summary.items() if isinstance(v, dict) and "per_1k_tokens" in v})
    out["above_tau"] = float(sum((summary.get("above_tau_per_1k") or {}).values()))
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return worker_main(argv)


if __name__ == "__main__":
    sys.exit(main())
