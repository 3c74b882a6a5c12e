"""``telltale bench``'s orchestration: the plan, each cell's process (or, with ``--alternate``, the
engines kept up and driven round by round), and the report at the end, also after a failed or
interrupted cell."""

from __future__ import annotations

import json
import math
import os
import select
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ...files import tail
from .options import LRS_SAMPLING, SAMPLED_STOCK, WARMUP_TOKENS, Checked, check, kv_bytes_per_token, label, model_dtype, parser
from .report import _kernels_of, build_report, render_markdown, write_report

#: a cell's process: ``python -m`` this module with the cell's spec file
CELL = [sys.executable, "-m", "lm_eval_telltale.tools.bench.cell"]

def build_prompts(tokenizer, n: int, length: int, tag: str) -> list[list[int]]:
    """``n`` distinct prompts of exactly ``length`` tokens: the request's number first (so no two
    share a prefix-cache block), then arithmetic word problems with their answers."""
    from ...tasksupport.localtask import ROWS

    out = []
    for i in range(n):
        ids = list(tokenizer(f"{i}. {tag}\n", add_special_tokens=False)["input_ids"])
        j = i
        while len(ids) < length:
            q, a = ROWS[j % len(ROWS)]
            j += 1
            ids += tokenizer(f"Question: {q}\nAnswer: {a}\n", add_special_tokens=False)["input_ids"]
        out.append([int(t) for t in ids[:length]])
    if len({tuple(p) for p in out}) != n:
        raise ValueError("the prompts are not distinct (prompt length too short?)")
    return out




def requests_of(method: str, batch: int, n_candidates: int) -> int:
    return batch * n_candidates if method in ("lrs", SAMPLED_STOCK) else batch


def common_engine_args(a, chk: Checked, batch: int) -> tuple[dict, int]:
    """(LLM kwargs shared by every method at this batch size, the CPU engine's KV-cache bytes)."""
    most = max(requests_of(m, batch, chk.n_candidates) for m in chk.cell_methods)
    kw: dict[str, Any] = {"model": a.model, "seed": a.seed, "dtype": a.dtype or model_dtype(chk.config),
                          "max_model_len": chk.max_len, "max_num_seqs": most}
    if a.eager:
        kw["enforce_eager"] = True
    kw.update(chk.engine_args)
    per_tok = kv_bytes_per_token(chk.config or {}) or 64 * 1024
    blocks = most * (math.ceil(int(kw["max_model_len"]) / 16) + 1) * 16
    kv = max(32 << 20, int(per_tok * blocks * 1.2) + (16 << 20))
    return kw, kv


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in ("vllm", "torch", "transformers"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out




def run_cell(cmd: list[str], log: Path, env: dict, timeout: float) -> int | str:
    """One cell's process, in its own process group: on a timeout or Ctrl-C the whole group goes
    (a multiprocess engine's core process with it). Returns the exit status or "timeout"."""
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except BaseException as e:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            if isinstance(e, subprocess.TimeoutExpired):
                return "timeout"
            raise


class LiveCell:
    """``--alternate``: one cell's engine process kept up for several timed runs, driven through its
    stdin (``run K``, ``quit``) and answering on a pipe of its own (``ready``, ``done K``), so that
    vLLM's output on stdout/stderr can go to the log. Its own process group, as :func:`run_cell`."""

    def __init__(self, spec: dict, spec_path: Path, log: Path, env: dict):
        rfd, wfd = os.pipe()
        spec_path.write_text(json.dumps({**spec, "control_fd": wfd}))
        self.log = log
        with log.open("wb") as f:
            self.proc = subprocess.Popen([*CELL, str(spec_path)],
                                         stdin=subprocess.PIPE, stdout=f, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True, pass_fds=(wfd,))
        os.close(wfd)
        self.rfd = rfd
        self.buf = b""

    def send(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def expect(self, word: str, timeout: float) -> bool:
        """Wait for the line ``word``; False if the process ended or went silent for ``timeout`` s."""
        end = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self.rfd], [], [], left)[0]:
                return False
            chunk = os.read(self.rfd, 4096)
            if not chunk:
                return False
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode().strip() == word

    def close(self, timeout: float = 60.0) -> None:
        try:
            if self.proc.poll() is None:
                self.send("quit")
            self.proc.wait(timeout=timeout)
        except (OSError, subprocess.TimeoutExpired):
            pass
        finally:
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
            os.close(self.rfd)


def rotated(methods: list[str], r: int) -> list[str]:
    """``--alternate``: the order of round ``r`` (rotated by one per round)."""
    k = r % len(methods)
    return methods[k:] + methods[:k]


def _run_alternating(a, batches: list[int], cms: list[str], spec_of, work: Path, env: dict, cells: list) -> str:
    """``--alternate``: per batch size, start one engine per method (one after another, each until
    its warm-up is done), then ``--repeats`` rounds; a round times one run of every method, the
    order rotated by one each round. Appends a cell per (round, method) to ``cells``; returns the
    status."""
    status = "complete"
    for b in batches:
        live: dict[str, LiveCell] = {}
        results: dict[str, str] = {}  # per method: its result file, "{k}" standing for the round
        try:
            for m in cms:
                stem = f"b{b}-{m}"
                spec = spec_of(None, b, m, stem + ".r{k}")
                results[m] = spec["result_path"]
                head = f"[bench] batch {b}, {label(m, a.engine)}"
                print(f"{head}: starting the engine ...", flush=True)
                t0 = time.time()
                cell = LiveCell(spec, work / f"{stem}.spec.json", work / f"{stem}.log", env)
                if cell.expect("ready", a.cell_timeout):
                    live[m] = cell
                    print(f"{head}: ready ({time.time() - t0:.0f} s)", flush=True)
                else:
                    print(f"{head}: FAILED to start; last lines of {cell.log}:\n{tail(cell.log)}", file=sys.stderr,
                          flush=True)
                    cell.close(timeout=5)
            for r in range(a.repeats):
                for m in rotated(cms, r):
                    cell = {"method": m, "batch": b, "repeat": r, "ok": False, "log": str(work / f"b{b}-{m}.log")}
                    cells.append(cell)
                    lc = live.get(m)
                    if lc is None:
                        cell["error"] = "engine not running"
                        status = "some cells failed"
                        continue
                    res_path = Path(results[m].replace("{k}", str(r)))
                    res_path.unlink(missing_ok=True)
                    head = f"[bench] round {r + 1}/{a.repeats}, batch {b}, {label(m, a.engine)}"
                    try:
                        lc.send(f"run {r}")
                        ok = lc.expect(f"done {r}", a.cell_timeout) and res_path.is_file()
                    except OSError:
                        ok = False
                    if ok:
                        cell.update(json.loads(res_path.read_text()))
                        cell["ok"] = True
                        print(f"{head}: {cell['tps']:.1f} tok/s ({cell['generated_tokens']} tokens in "
                              f"{cell['wall_s']:.2f} s)", flush=True)
                    else:
                        cell["error"] = "the engine stopped or timed out"
                        print(f"{head}: FAILED ({cell['error']}); last lines of {lc.log}:\n{tail(lc.log)}",
                              file=sys.stderr, flush=True)
                        status = "some cells failed"
                        lc.close(timeout=5)
                        live.pop(m)
        finally:
            for lc in live.values():
                lc.close()
    return status


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = parser()
    a = ap.parse_args(argv)
    chk = check(ap, a)
    command = shlex.join(["telltale", "bench", *argv])
    batches, cms, R = chk.batches, chk.cell_methods, a.repeats
    plan = ([(r, b, m) for b in batches for r in range(R) for m in rotated(cms, r)] if a.alternate else
            [(r, b, m) for r in range(R) for b in batches for m in cms])
    if chk.added:
        print(f"[bench] added the stock baseline cell(s) the ratios need: {', '.join(chk.added)}")
    print(f"[bench] {a.model} ({chk.arch}, {chk.num_layers} layers): {len(plan)} cells = {R} repeat(s) × "
          f"batch {','.join(map(str, batches))} × {','.join(cms)}; {a.prompt_len}-token prompts, {a.max_tokens} tokens "
          f"per request" + (f"; LRS: {chk.n_candidates} candidates per prompt" if "lrs" in cms else ""), flush=True)
    for b in batches:
        kw, kv = common_engine_args(a, chk, b)
        print(f"[bench]   batch {b}: engine flags {json.dumps(kw)} (+ CPU engine: kv_cache_memory_bytes={kv} "
              f"unless given)")
    for m, v in chk.method_args.items():
        print(f"[bench]   {m}: {json.dumps(v, sort_keys=True)} → layers {chk.cfgs[m].layers}")
    if a.alternate:
        print(f"[bench] --alternate: at each batch size {len(cms)} engines (one per method) stay up together for "
              f"{R} round(s) of timed runs", flush=True)
    if a.plan:
        for i, (r, b, m) in enumerate(plan, 1):
            print(f"[bench]   cell {i}: repeat {r + 1}, batch {b}, {label(m, a.engine)} "
                  f"({requests_of(m, b, chk.n_candidates)} "
                  "requests)")
        print(f"[bench] --plan: would write {Path(a.out) / chk.name}.md/.json/.png; no engine started")
        return 0

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.model)
    nmax = max(batches)
    prompts = build_prompts(tok, nmax, a.prompt_len, "Benchmark request")
    warm = build_prompts(tok, nmax, a.prompt_len, "Warm-up request")
    work = Path(a.work).expanduser() / chk.name
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if a.inprocess:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    else:
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    if a.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(a.threads)
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    started = time.strftime("%Y-%m-%d %H:%M:%S")

    def spec_of(r: int | None, b: int, m: str, stem: str) -> dict[str, Any]:
        kw, kv = common_engine_args(a, chk, b)
        return {"method": m, "engine_kind": a.engine, "batch": b, "repeat": r, "arch": chk.arch,
                "num_layers": chk.num_layers,
                "engine": kw, "cpu_kv_bytes": kv, "user_engine_keys": sorted(chk.engine_args),
                "tt_args": chk.method_args.get(m), "seed": a.seed, "threads": a.threads,
                "prompts": prompts[:b], "warm_prompts": warm[:b], "max_tokens": a.max_tokens,
                "warm_tokens": min(a.max_tokens, WARMUP_TOKENS),
                "n_candidates": chk.n_candidates if m in ("lrs", SAMPLED_STOCK) else 1,
                "sampling": LRS_SAMPLING if m in ("lrs", SAMPLED_STOCK) else None,
                "result_path": str(work / f"{stem}.result.json")}

    cells: list[dict] = []
    status = "complete"
    try:
        if a.alternate:
            status = _run_alternating(a, batches, cms, spec_of, work, env, cells)
        for i, (r, b, m) in enumerate([] if a.alternate else plan, 1):
            stem = f"r{r + 1}-b{b}-{m}"
            spec = spec_of(r, b, m, stem)
            spec_path = work / f"{stem}.spec.json"
            spec_path.write_text(json.dumps(spec))
            res_path = Path(spec["result_path"])
            res_path.unlink(missing_ok=True)
            log = work / f"{stem}.log"
            head = f"[bench] ({i}/{len(plan)}) repeat {r + 1}/{R}, batch {b}, {label(m, a.engine)}"
            print(f"{head} ...", flush=True)
            t0 = time.time()
            rc = run_cell([*CELL, str(spec_path)], log, env,
                          a.cell_timeout)
            cell = {"method": m, "batch": b, "repeat": r, "ok": False, "log": str(log)}
            if rc == 0 and res_path.is_file():
                cell.update(json.loads(res_path.read_text()))
                cell["ok"] = True
                print(f"{head}: {cell['tps']:.1f} tok/s ({cell['generated_tokens']} tokens in {cell['wall_s']:.2f} s; "
                      f"start-up {cell['startup_s']:.1f} s, cell {time.time() - t0:.0f} s)", flush=True)
            else:
                cell["error"] = f"exit {rc}" + ("" if res_path.is_file() else ", no result")
                print(f"{head}: FAILED ({cell['error']}); last lines of {log}:\n{tail(log)}", file=sys.stderr, flush=True)
                status = "some cells failed"
            cells.append(cell)
    except KeyboardInterrupt:
        status = "interrupted"
        print("\n[bench] interrupted: reporting the cells done so far", file=sys.stderr)
    first = next((c for c in cells if c.get("ok")), {})
    meta = {
        "command": command, "engine": a.engine, "model": a.model, "model_name": chk.name, "architecture": chk.arch,
        "num_layers": chk.num_layers, "methods": chk.methods, "cell_methods": cms, "batch_sizes": batches,
        "prompt_len": a.prompt_len, "max_tokens": a.max_tokens, "repeats": R, "alternate": a.alternate,
        "eager": a.eager, "dtype": a.dtype,
        "seed": a.seed, "threads": a.threads, "inprocess": a.inprocess, "engine_args": chk.engine_args,
        "common_engine_args": {k: v for k, v in common_engine_args(a, chk, batches[0])[0].items()
                               if k not in ("max_num_seqs", "model")},
        "method_args": chk.method_args, "n_candidates": chk.n_candidates,
        "lrs_sampling": LRS_SAMPLING if "lrs" in cms else None,
        "telltale_layers": {m: c.layers for m, c in chk.cfgs.items()},
        "engine_info": first.get("engine"),
        "compilation": {label(m, a.engine): (c.get("engine") or {}).get("compilation")
                        for m in cms for c in cells if c.get("ok") and c["method"] == m and c["repeat"] == 0
                        and c["batch"] == batches[0]},
        "kernels": _kernels_of(cells, a.engine),
        "versions": _versions(), "started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "status": status,
    }
    if not cells:
        print("[bench] no cell finished; nothing to report", file=sys.stderr)
        return 130 if status == "interrupted" else 1
    rep = build_report(cells, meta)
    paths = write_report(rep, Path(a.out).expanduser(), chk.name)
    print("\n" + render_markdown(rep))
    print(f"[bench] wrote {paths['md']}, {paths['json'].name}, {paths['png'].name}; cell logs in {work}")
    return 0 if status == "complete" else (130 if status == "interrupted" else 1)

