"""The stock `lm_eval` console script with the telltale model types (subprocesses, as users run it).

One parametrised end-to-end test covers every model type: a run on the local task, the results
JSON's ``config.telltale``, one sidecar row per document joined to lm-eval's doc ids, the method's
intervention counter, and — where a method could silently do nothing — a control run that must
differ (or, for ``vllm-norms``, must equal stock ``vllm``). These runs use vLLM's default on this
CPU, compiled (torch.compile with inductor), except where a case says ``enforce_eager=True``. The
``vllm-norms`` equality is compiled on both sides, in bfloat16 (vLLM's default dtype on this CPU).
It needs the observe-only hook (README, "Compiled like stock vLLM"): when the telltale op read (h, r)
instead of the norm, inductor had to store the residual stream in bfloat16 where stock's kernels keep
it in float32, and one of the four greedy answers parted from stock's at a near-tie. ``vllm-alrr``
runs at ``tensor_parallel_size=2`` (a rank that also wrote rows would duplicate every document).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import LM_EVAL, run, samples

from lm_eval_telltale.spec import LRS_SELECTORS, MODEL_TYPES


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


def _check_lrs(rows, res, run_dir):
    tt = res["config"]["telltale"]
    by_doc = {s["doc_id"]: s for s in samples(run_dir, "telltale_local")}
    for r in rows:
        assert len(r["candidates"]) == 4 and r["chosen"] == "late_sum"
        assert set(r["picks"]) == set(LRS_SELECTORS)
        best = max(range(4), key=lambda k: (r["candidates"][k]["complete"], r["candidates"][k]["scores"]["late_sum"]))
        assert r["picks"]["late_sum"] == best
        # lm-eval scored the response the sidecar says late_sum picked
        assert by_doc[r["doc_id"]]["resps"][0][0] == r["candidates"][best]["response"] == r["response"]
        assert all(c["correct"] in (0.0, 1.0) for c in r["candidates"])  # the task's own scorer ran
        assert len({c["text"] for c in r["candidates"]}) > 1
    assert set(tt["summary"]["lrs_selectors"]) >= {"late_sum", "maj", "conf", "random", "first"}


def _check_erss(rows, res, run_dir):
    tt = res["config"]["telltale"]
    assert tt["config"]["params"]["p_inject"] == 1.0
    n_inj = 0
    for r in rows:
        for st in r["layers"].values():
            assert st.get("injected", 0) == len(st["inject_positions"]) == len(st["inject_cos"]) == len(st["inject_vnorm"])
            assert 0 <= st["bank_max"] <= 32
            assert all(r["n_prompt_tokens"] <= p < r["n_prompt_tokens"] + r["n_generated_tokens"]
                       for p in st["inject_positions"])
            n_inj += st.get("injected", 0)
    assert n_inj == tt["summary"]["injected"]["total"] > 0


def _check_norms(rows, res, run_dir):
    assert res["config"]["telltale"]["config"]["layers"] == [4, 5, 6]
    assert all(r["n_decode_tokens"] == r["n_generated_tokens"] - 1 for r in rows)
    assert all(r["layers"]["5"]["count"] > 0 and r["layers"]["5"]["mean"] > 0 for r in rows)
    # the sidecar is joined to the right documents: its response is the one lm-eval scored
    by_doc = {s["doc_id"]: s["resps"][0][0] for s in samples(run_dir, "telltale_local")}
    assert {r["doc_id"]: r["response"] for r in rows} == by_doc


# ERSS knobs that make the tiny random model trigger: τ = Q3 of the request's norms, short streaks,
# every armed token attempts, any cosine
_ERSS = "layers=4-6,warmup=4,iqr_k=0,low_k=3,cooldown=0,cos_min=-1"

#: model type → (model_args, gen_kwargs, --limit, intervention counter, control run, extra check).
#: control: (model type, model_args, "equal" | "differ"): the control's responses must equal /
#: differ from the method's (a method that silently did nothing fails "differ"). The method runs
#: compiled (vLLM's default) but for ERSS and ALRR; a "differ" control may run eagerly (it computes
#: the same thing, faster to start), the "equal" one is stock compiled vLLM.
CASES = {
    # compiled on both sides (vLLM's default, bfloat16 on this CPU): the residual stream must be
    # computed by stock's own kernels (see the module's docstring)
    "vllm-norms": ("layers=4-6,warmup=4", None, 4, None, ("vllm", "", "equal"), _check_norms),
    "vllm-suppress": ("layers=4-6,warmup=4", None, 4, "suppressed", ("vllm", "enforce_eager=True", "differ"), None),
    # tensor parallel through lm_eval: two ranks, one core each, eager like the engine TP tests;
    # rows must come once per document
    "vllm-alrr": ("layers=4-6,warmup=4,growth_eps=0.0,tensor_parallel_size=2,distributed_executor_backend=mp,"
                  "enforce_eager=True", None, 4,
                  "accepted", None, None),
    # eager: compiled, its in-graph step adds ~1 minute of compiling to this run (the compiled engine
    # is tests/engine/test_engine_erss.py's, in-graph and batch-invariant)
    "vllm-erss": (_ERSS + ",p_inject=1,enforce_eager=True", None, 4, "injected",
                  ("vllm-erss", _ERSS + ",p_inject=0,enforce_eager=True", "differ"), _check_erss),
    "vllm-lrs": ("layers=4-6,n_candidates=4", "temperature=0.8,do_sample=True", 3, None, None, _check_lrs),
}


def test_cases_cover_every_model_type():
    assert set(CASES) == {t for t in MODEL_TYPES if t.startswith("vllm-")}  # hf-*: tests/e2e/test_hf_cli.py


#: the engine in lm_eval's own process (seconds to start instead of ~20 s; vLLM's default
#: multiprocess engine runs in the vllm-alrr case and in tests/e2e/test_parallel_cli.py)
INPROCESS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
#: per model type: the environment of its runs (default INPROCESS)
CASE_ENV = {"vllm-alrr": {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}}


def _lm_eval(mtype, margs, out, *, gen=None, limit=4, local_task_dir, env=None):
    cmd = [LM_EVAL, "--model", mtype, "--model_args", margs, "--tasks", "telltale_local", "--include_path",
           str(local_task_dir), "--limit", str(limit), "--batch_size", "auto", "--log_samples",
           "--output_path", str(out)]
    if gen:
        cmd += ["--gen_kwargs", gen]
    p = run(cmd, env)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(next(out.rglob("results_*.json")).read_text())


@pytest.mark.e2e
@pytest.mark.parametrize("mtype", list(CASES))
def test_lm_eval_end_to_end(mtype, tiny_model_dir, local_task_dir, tmp_path):
    args, gen, limit, counter, control, check = CASES[mtype]
    base = f"pretrained={tiny_model_dir},kv_cache_memory_bytes=33554432,max_model_len=512"
    env = CASE_ENV.get(mtype, INPROCESS)
    res = _lm_eval(mtype, f"{base},{args}", tmp_path / "run", gen=gen, limit=limit, local_task_dir=local_task_dir,
                   env=env)
    tt = res["config"]["telltale"]
    assert res["config"]["model"] == mtype and tt["model_type"] == mtype
    side = Path(tt["stats_path"])
    assert side.is_file() and side.parent == next((tmp_path / "run").rglob("results_*.json")).parent
    rows = [json.loads(l) for l in side.read_text().splitlines()]
    # one row per document, joined to lm-eval's doc ids
    assert sorted(r["doc_id"] for r in rows) == list(range(limit))
    assert all(r["task"] == "telltale_local" and set(r["layers"]) == {"4", "5", "6"} for r in rows)
    assert tt["summary"]["answers"] == limit
    if counter:
        assert tt["summary"][counter]["total"] > 0
        assert sum(st.get(counter, 0) for r in rows for st in r["layers"].values()) == tt["summary"][counter]["total"]
    if check:
        check(rows, res, tmp_path / "run")
    if control:
        ctype, cargs, relation = control
        _lm_eval(ctype, f"{base},{cargs}".rstrip(","), tmp_path / "control", limit=limit, local_task_dir=local_task_dir,
                 env=env)
        mine = {s["doc_id"]: s["resps"] for s in samples(tmp_path / "run", "telltale_local")}
        theirs = {s["doc_id"]: s["resps"] for s in samples(tmp_path / "control", "telltale_local")}
        assert (mine == theirs) == (relation == "equal")


# -- crash safety and joins ------------------------------------------------------------------------

def _tail(log, n: int = 3000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else "(no log)"


def _long_task(tmp_path):
    from lm_eval_telltale.tasksupport.localtask import ROWS, write_local_task

    return write_local_task(tmp_path / "task", name="telltale_long", max_gen_toks=160, rows=ROWS * 3)


@pytest.mark.e2e
@pytest.mark.parametrize("sig", ["SIGINT", "SIGKILL"])
def test_interrupted_run_keeps_every_finished_answer(sig, tiny_model_dir, tmp_path):
    """A run interrupted mid-generation (Ctrl-C, or killed) leaves every answer finished before the
    signal as a valid sidecar line: rows are written as answers finish, not at the end. Its engine's
    processes (vLLM's default multiprocess engine: ``VLLM::EngineCore`` and its worker) end with it
    within 15 s — after a SIGKILL too, where vLLM's own shutdown never runs."""
    import os
    import signal
    import subprocess
    import time

    import psutil

    task = _long_task(tmp_path)
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    margs = (f"pretrained={tiny_model_dir},kv_cache_memory_bytes=33554432,max_model_len=512,max_num_seqs=2,"
             "enforce_eager=True,layers=4-6,warmup=4,stats_path=" + str(out / "side.jsonl"))
    log = (tmp_path / "stderr.log").open("w")
    proc = subprocess.Popen([LM_EVAL, "--model", "vllm-norms", "--model_args", margs, "--tasks", "telltale_long",
                             "--include_path", str(task), "--batch_size", "auto", "--output_path", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
                            # Ctrl-C as a terminal delivers it: a suite started in the background by a
                            # non-interactive shell (nohup, `cmd &`) ignores SIGINT, and lm_eval would inherit that
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    side = out / "side.jsonl"
    seen, deadline, engine = 0, time.monotonic() + 400, []
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if side.exists():
                seen = sum(1 for line in side.read_text().splitlines() if line.endswith("}"))
                if seen >= 3:
                    break
            time.sleep(0.2)
        assert proc.poll() is None and seen >= 3, \
            f"the run ended or wrote nothing before the signal ({seen} rows): {_tail(tmp_path / 'stderr.log')}"
        engine = psutil.Process(proc.pid).children(recursive=True)
        assert any("VLLM" in p.name() for p in engine), [p.name() for p in engine]
        proc.send_signal(getattr(signal, sig))  # to lm_eval only, as a kill of its pid would
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"lm_eval did not exit within 120 s of {sig}: {_tail(tmp_path / 'stderr.log')}") from None
        _, alive = psutil.wait_procs(engine, timeout=15)
        assert not alive, f"engine processes left behind: {[(p.pid, p.name()) for p in alive]}, of " \
                          f"{[(p.pid, p.name()) for p in engine]}: {_tail(tmp_path / 'stderr.log')}"
    finally:
        log.close()
        for p in engine:
            try:
                p.kill()
            except psutil.Error:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not list(out.rglob("results_*.json")), "the run was meant to be interrupted before it finished"
    lines = [line for line in side.read_text().splitlines() if line.strip()]
    rows = [json.loads(line) for line in lines]  # every line is a whole, valid row
    assert len(rows) >= seen >= 3
    if sig == "SIGINT":  # the progress bar's last word is what was saved (lm-eval's own bar reads 0)
        import re

        bars = re.findall(r"vllm-norms: answers:[^|]*\|[^|]*\| *(\d+)/36", (tmp_path / "stderr.log").read_text())
        assert bars and int(bars[-1]) == len(rows), (bars[-3:], len(rows), _tail(tmp_path / "stderr.log"))
    ids = [r["doc_id"] for r in rows]
    assert len(set(ids)) == len(ids) and all(0 <= i < 36 for i in ids)
    for r in rows:
        assert r["task"] == "telltale_long" and r["n_decode_tokens"] == r["n_generated_tokens"] - 1
        assert set(r["layers"]) == {"4", "5", "6"} and r["layers"]["5"]["count"] == r["n_decode_tokens"]
    # the tools read what is there: `telltale table` skips the interrupted directory with a warning
    from lm_eval_telltale.sidecar import read_sidecar

    assert len(read_sidecar(side)) == len(rows)




@pytest.mark.e2e
def test_samples_flag_keeps_the_true_doc_ids(tiny_model_dir, local_task_dir, tmp_path):
    """With --samples, lm-eval renumbers the selected docs internally but writes the true ids in its
    samples file; the sidecar carries the same ids and lm-eval's doc_hash, so both joins hold."""
    margs = f"pretrained={tiny_model_dir},kv_cache_memory_bytes=33554432,max_model_len=512,enforce_eager=True,layers=4-6"
    p = run([LM_EVAL, "--model", "vllm-norms", "--model_args", margs, "--tasks", "telltale_local",
             "--include_path", str(local_task_dir), "--samples", '{"telltale_local": [3, 7, 10]}',
             "--batch_size", "auto", "--log_samples", "--output_path", str(tmp_path)], INPROCESS)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(next(tmp_path.rglob("results_*.json")).read_text())
    rows = [json.loads(line) for line in Path(res["config"]["telltale"]["stats_path"]).read_text().splitlines()]
    smp = {s["doc_id"]: s for s in samples(tmp_path, "telltale_local")}
    assert sorted(smp) == [3, 7, 10]
    assert sorted(r["doc_id"] for r in rows) == [3, 7, 10]
    for r in rows:
        assert r["doc_hash"] == smp[r["doc_id"]]["doc_hash"]
        assert r["response"] == smp[r["doc_id"]]["resps"][0][0]


def test_lrs_with_greedy_tasks_fails_before_the_engine(tiny_model_dir, local_task_dir):
    """n_candidates > 1 with tasks that decode greedily (and no sampling preset) is refused while the
    model is being constructed — not after minutes of engine start-up."""
    margs = f"pretrained={tiny_model_dir},kv_cache_memory_bytes=33554432,max_model_len=512,n_candidates=4"
    p = run([LM_EVAL, "--model", "vllm-lrs", "--model_args", margs, "--tasks", "telltale_local",
             "--include_path", str(local_task_dir), "--batch_size", "auto"], timeout=300)
    assert p.returncode != 0 and "'n_candidates'" in p.stderr and "greedy" in p.stderr
    assert "EngineCore" not in p.stderr and "Initializing a V1 LLM engine" not in p.stderr
    # the same tasks with sampling from the command line are accepted (checked without an engine)
    from lm_eval_telltale.harness.lrs import greedy

    assert greedy({"do_sample": False}) and greedy({"temperature": 0}) and not greedy({"temperature": 0.6})
    assert not greedy({})  # vLLM's default temperature is 1


@pytest.mark.e2e
def test_lrs_repeats_split_over_batches_draw_new_candidates(tiny_model_dir, tmp_path):
    """A task with ``repeats: 4`` and a numeric ``--batch_size 2``: lm-eval generates each document's
    repeats in two ``_model_generate`` calls. The occurrence of a prompt is counted over the whole
    ``generate_until`` call, so every repeat gets its own candidate seeds — with a per-call count,
    repeat 2 equalled repeat 0 and repeat 3 repeat 1, candidate for candidate."""
    from lm_eval_telltale.tasksupport.localtask import write_local_task

    task = write_local_task(tmp_path / "task", name="telltale_rep", repeats=4)
    out = tmp_path / "run"
    margs = (f"pretrained={tiny_model_dir},kv_cache_memory_bytes=33554432,max_model_len=512,enforce_eager=True,"
             "layers=4-6,n_candidates=2")
    p = run([LM_EVAL, "--model", "vllm-lrs", "--model_args", margs, "--tasks", "telltale_rep", "--include_path",
             str(task), "--limit", "1", "--batch_size", "2", "--gen_kwargs", "temperature=0.8,do_sample=True",
             "--log_samples", "--output_path", str(out)], INPROCESS)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(next(out.rglob("results_*.json")).read_text())
    rows = [json.loads(line) for line in Path(res["config"]["telltale"]["stats_path"]).read_text().splitlines()]
    assert sorted(r["repeat"] for r in rows) == [0, 1, 2, 3] and {r["doc_id"] for r in rows} == {0}
    cands = {r["repeat"]: tuple(c["text"] for c in r["candidates"]) for r in rows}
    assert len(set(cands.values())) == 4, cands  # no repeat is a copy of another
    # lm-eval scored, repeat by repeat, what the sidecar says LRS returned
    (smp,) = samples(out, "telltale_rep")  # one Instance, its 4 responses in repeat order
    assert smp["resps"][0] == [r["response"] for r in sorted(rows, key=lambda r: r["repeat"])]
