"""Driving a Telltale engine from the driver process: queue tagged requests, step the engine, and
hand every finished request — its output and its statistics — to a callback while generation goes
on. The lm-eval model types use it in their process; with lm-eval's data parallelism each replica
runs it in its own ray task (:func:`run_replica`).

Statistics of several workers are merged here: ``collective_rpc`` returns one list per worker in
global-rank order; tensor-parallel ranks other than 0 record nothing (their steps are checked to
agree with rank 0's), and each pipeline stage returns the patched layers it owns, so the records of
one tag are merged layer by layer.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

logger = logging.getLogger("lm_eval_telltale")

#: finished requests are collected from the workers at most this often (seconds; the interval
#: grows when a collection takes long, so that it stays a small share of the run)
FLUSH_S = 0.5

Finished = list[tuple[str, Any, dict | None]]  # (tag, RequestOutput, statistics)


def merge_worker_records(per_worker: Sequence[Sequence[dict]]) -> dict[str, dict]:
    """One record per tag from the workers' ``telltale_collect`` lists (pipeline stages merged)."""
    out: dict[str, dict] = {}
    for recs in per_worker:
        for r in recs or []:
            cur = out.get(r["tag"])
            if cur is None:
                out[r["tag"]] = {**r, "layers": dict(r.get("layers") or {})}
                continue
            if cur.get("n_decode_tokens") != r.get("n_decode_tokens"):
                raise RuntimeError(f"telltale: pipeline stages disagree on request {r['tag']}: "
                                   f"{cur.get('n_decode_tokens')} vs {r.get('n_decode_tokens')} generated tokens")
            cur["layers"].update(r.get("layers") or {})
            for k, v in r.items():  # values only one stage has (e.g. LRS confidence: the last stage)
                if k != "layers" and cur.get(k) is None and v is not None:
                    cur[k] = v
    return out


def collect(llm, tags: list[str], lengths: list[int] | None, timeout: float | None = None) -> dict[str, dict]:
    """The statistics of these finished requests, from every worker, merged by tag."""
    return merge_worker_records(llm.collective_rpc("telltale_collect", timeout=timeout, args=(tags, lengths)))


def drive(llm, requests: Sequence[tuple[str, list[int], Any]],
          on_finished: Callable[[Finished], Sequence[tuple[str, list[int], Any]] | None], *,
          salt: bool, lora_request=None, progress: Callable[[int], None] | None = None) -> None:
    """Queue ``requests`` ((tag, prompt token ids, SamplingParams); the tag is the request id),
    step ``llm``'s engine until all are finished, and call ``on_finished`` with each batch of
    finished requests and their statistics (at most every FLUSH_S seconds, and at the end; after
    an interruption, with a short timeout, what had finished). ``on_finished`` may return more
    requests, queued at once (online LRS's later candidates). ``salt``: every request gets its own
    ``cache_salt`` (no prefix-cache block is shared between requests)."""
    from vllm import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine

    def add(reqs) -> None:
        added: list[str] = []
        try:
            for tag, prompt_ids, sp in reqs or ():
                sp.output_kind = RequestOutputKind.FINAL_ONLY
                prompt = TokensPrompt(prompt_token_ids=list(prompt_ids))
                if salt:
                    prompt["cache_salt"] = tag
                engine.add_request(tag, prompt, sp, lora_request=lora_request)
                added.append(tag)
        except Exception:
            if added:
                engine.abort_request(added)
            raise

    add(requests)

    def finish(outs: list, timeout: float | None = None):
        stats = collect(llm, [o.request_id for o in outs], [len(o.outputs[0].token_ids) for o in outs], timeout)
        more = on_finished([(o.request_id, o, stats.get(o.request_id)) for o in outs])
        if progress is not None:
            progress(len(outs))
        return more

    done: list = []
    last, interval = time.monotonic(), FLUSH_S
    finished_cleanly = False
    try:
        while True:
            if not engine.has_unfinished_requests():
                if not done:
                    break
                add(finish(done))  # the last ones may release more requests
                done, last = [], time.monotonic()
                continue
            done.extend(o for o in engine.step() if o.finished)
            if done and time.monotonic() - last >= interval:
                t0 = time.monotonic()
                more = finish(done)
                done, last = [], time.monotonic()
                add(more)
                # collecting costs O(rows held by the workers): keep it under ~2 % of the run
                interval = max(FLUSH_S, 50.0 * (last - t0))
        finished_cleanly = True
    finally:
        if done:
            try:  # after an interrupt, still save what finished (a short timeout: never hang)
                finish(done, timeout=None if finished_cleanly else 10.0)
            except Exception as e:  # noqa: BLE001
                if finished_cleanly:
                    raise
                logger.warning("telltale: %d finished answers could not be saved after the interruption: %s",
                               len(done), e)


def output_record(tag: str, output, stats: dict | None) -> dict[str, Any]:
    """A finished request as one JSON-able line (a data-parallel replica's part file)."""
    o = output.outputs[0]
    return {"tag": tag, "text": o.text, "token_ids": list(o.token_ids), "finish_reason": o.finish_reason,
            "stats": stats}


def run_replica(model_args: dict, requests: list[tuple[str, list[int], Any]], part_path: str | None, index: int,
                n_replicas: int, salt: bool) -> list[tuple[str, Any, dict | None]]:
    """One data-parallel replica (runs in a ray task): its own engine over its share of the
    requests. Each finished request is appended at once to ``part_path`` (crash-safe: whole
    lines, the replica's raw outputs and statistics by tag); the finished list is returned."""
    for k in ("VLLM_DP_RANK", "VLLM_DP_RANK_LOCAL", "VLLM_DP_SIZE", "VLLM_DP_MASTER_IP", "VLLM_DP_MASTER_PORT"):
        os.environ.pop(k, None)
    model_args = {k: v for k, v in model_args.items() if k != "distributed_executor_backend"}
    from vllm import LLM
    from vllm.platforms import current_platform

    if current_platform.is_cpu() and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        # give each replica its own cores (vLLM binds its threads to the cores it is told)
        cpus = sorted(os.sched_getaffinity(0))
        tp = int(model_args.get("tensor_parallel_size", 1) or 1) * int(model_args.get("pipeline_parallel_size", 1) or 1)
        share = max(1, len(cpus) // n_replicas)
        mine = cpus[index * share:(index + 1) * share] or cpus[-1:]
        per_rank = max(1, len(mine) // tp)
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(
            ",".join(map(str, mine[r * per_rank:(r + 1) * per_rank] or mine[-1:])) for r in range(tp))
    llm = LLM(**model_args)
    finished: Finished = []
    part = Path(part_path) if part_path else None

    def keep(batch: Finished) -> None:
        finished.extend(batch)
        if part is not None:
            from ..sidecar import append_lines

            append_lines(part, [output_record(t, o, s) for t, o, s in batch])

    drive(llm, requests, keep, salt=salt)
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001
        pass
    return finished

