"""The hf-* model types through the stock ``lm_eval`` console script (``--device cpu``), and
``telltale table`` over an HF run next to a vLLM run of the same configuration."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import LM_EVAL, run, samples

pytestmark = pytest.mark.e2e


def _lm_eval(mtype, margs, task, out, *, limit, include_path=None, extra=(), env=None):
    cmd = [LM_EVAL, "--model", mtype, "--model_args", margs, "--tasks", task, "--limit", str(limit),
           "--log_samples", "--output_path", str(out), *extra]
    if include_path:
        cmd += ["--include_path", str(include_path)]
    p = run(cmd, env)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(next(out.rglob("results_*.json")).read_text())
    tt = res["config"]["telltale"]
    assert res["config"]["model"] == tt["model_type"] == mtype
    rows = [json.loads(l) for l in Path(tt["stats_path"]).read_text().splitlines()]
    return res, rows


def test_registration_resolves_hf_types_without_vllm():
    code = ("import sys\nfrom lm_eval.api.registry import get_model\n"
            "m = get_model('hf-alrr'); print(m.__module__ + ':' + m.__name__)\n"
            "assert 'vllm' not in sys.modules, 'the hf-* types imported vLLM'\n")
    p = run([sys.executable, "-c", code])
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "lm_eval_telltale.harness.hf:HFAlrr"


def test_hf_alrr_end_to_end(tiny_model_dir, local_task_dir, tmp_path):
    res, rows = _lm_eval("hf-alrr", f"pretrained={tiny_model_dir},layers=4-6,warmup=4,growth_eps=0.0",
                         "telltale_local", tmp_path / "run", limit=4, include_path=local_task_dir,
                         extra=("--device", "cpu", "--batch_size", "4"))
    tt = res["config"]["telltale"]
    assert tt["config"]["method"] == "alrr" and tt["config"]["layers"] == [4, 5, 6]
    assert sorted(r["doc_id"] for r in rows) == [0, 1, 2, 3] and tt["summary"]["answers"] == 4
    accepted = sum(st.get("accepted", 0) for r in rows for st in r["layers"].values())
    assert accepted == tt["summary"]["accepted"]["total"] > 0
    assert all(r["n_decode_tokens"] == r["n_generated_tokens"] - 1 and r["layers"]["5"]["count"] > 0 for r in rows)
    # the sidecar is joined to the right documents: its response is the one lm-eval scored
    by_doc = {s["doc_id"]: s["resps"][0][0] for s in samples(tmp_path / "run", "telltale_local")}
    assert {r["doc_id"]: r["response"] for r in rows} == by_doc


def test_hf_lrs_end_to_end(tiny_model_dir, tmp_path):
    """N sampled candidates per answer through the hf loop, LRS's pick returned, every selector's pick
    and the candidates in the row (the selection is the vllm-lrs code: harness/common.py). The task
    asks for 3 repeats per document and ``--batch_size 2`` splits a document's repeats over two
    ``_model_generate`` calls: every repeat still draws its own candidates, and lm-eval scores, repeat
    by repeat, the response the sidecar records."""
    from lm_eval_telltale.spec import LRS_SELECTORS
    from lm_eval_telltale.tasksupport.localtask import write_local_task

    task = write_local_task(tmp_path / "task", name="telltale_rep", repeats=3)
    res, rows = _lm_eval("hf-lrs", f"pretrained={tiny_model_dir},layers=4-6,n_candidates=2", "telltale_rep",
                         tmp_path / "run", limit=2, include_path=task,
                         extra=("--device", "cpu", "--batch_size", "2", "--gen_kwargs", "temperature=0.8,do_sample=True"))
    assert sorted((r["doc_id"], r["repeat"]) for r in rows) == [(d, k) for d in range(2) for k in range(3)]
    smp = {s["doc_id"]: s["resps"][0] for s in samples(tmp_path / "run", "telltale_rep")}
    for r in rows:
        cands = r["candidates"]
        assert len(cands) == 2 and set(r["picks"]) == set(LRS_SELECTORS) and len({c["text"] for c in cands}) > 1
        assert r["picks"]["late_sum"] == r["chosen_index"]
        assert smp[r["doc_id"]][r["repeat"]] == cands[r["chosen_index"]]["response"] == r["response"]
        assert all(c["conf"] is not None and c["correct"] in (0.0, 1.0) for c in cands)
    texts = [tuple(c["text"] for c in r["candidates"]) for r in rows]
    assert len(set(texts)) == len(texts)  # no repeat is a copy of another
    assert set(res["config"]["telltale"]["summary"]["lrs_selectors"]) >= {"late_sum", "maj", "conf", "random"}


def test_hf_online_lrs_stops_later_candidates_and_never_selects_them(tmp_path):
    """hf-lrs online (stop_signal=conf, DeepConf-low's aggressive percentile) on the shipped model:
    the warm-up candidates run to the end, later ones are stopped inside the generation loop (their
    stop token right after ``stopped_at`` tokens), and no selector picks a stopped one."""
    from lm_eval_telltale.arith import model_dir

    margs = (f"pretrained={model_dir()},config=telltale-arith,n_candidates=4,stop_signal=conf,stop_window=4,"
             "stop_percentile=90")
    res, rows = _lm_eval("hf-lrs", margs, "telltale_arith_l3", tmp_path / "run", limit=3,
                         extra=("--device", "cpu", "--batch_size", "3", "--apply_chat_template"))
    assert len(rows) == 3
    stopped = 0
    for r in rows:
        cands = r["candidates"]
        assert r["online"]["signal"] == "conf" and r["online"]["warmup"] == 2 and r["online"]["threshold"] is not None
        assert [c["warmup"] for c in cands] == [True, True, False, False]
        assert not any(c["stopped"] for c in cands[:2])
        for c in cands:
            if c["stopped"]:
                stopped += 1
                assert c["n_tokens"] == c["stopped_at"] + 1 and c["finish_reason"] == "stop" and c["stopped_at"] >= 4
        assert not any(cands[i]["stopped"] for i in r["picks"].values())
        assert r["online"]["stopped"] == sum(c["stopped"] for c in cands)
        assert r["candidate_tokens"] == sum(c["n_tokens"] for c in cands)
    assert stopped > 0


def test_hf_and_vllm_runs_of_one_configuration_give_the_same_table(tmp_path):
    """hf-norms and vllm-norms on the shipped tiny reasoning model (``config=telltale-arith``,
    chat template, greedy) with a budget of 60 tokens, which some answers finish within and others
    not: the same texts, think markers included (the tokenizer marks ``<think>`` special: a decode
    that drops special tokens makes an unfinished thinking block read as an answer), the same
    verdicts — truncated ones too — and ``telltale table`` shows the same accuracy."""
    from lm_eval_telltale.arith import model_dir

    base = f"pretrained={model_dir()},config=telltale-arith"
    common = ("--apply_chat_template", "--gen_kwargs", "max_gen_toks=60")
    _, hf_rows = _lm_eval("hf-norms", base, "telltale_arith", tmp_path / "hf", limit=2,
                          extra=(*common, "--device", "cpu", "--batch_size", "16"))
    _, v_rows = _lm_eval("vllm-norms", f"{base},enforce_eager=True,kv_cache_memory_bytes=33554432",
                         "telltale_arith", tmp_path / "vllm", limit=2, extra=(*common, "--batch_size", "auto"),
                         env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    key = lambda r: (r["task"], r["doc_id"])  # noqa: E731
    assert len(hf_rows) == len(v_rows) == 8
    hf, v = {key(r): r for r in hf_rows}, {key(r): r for r in v_rows}
    assert {k: r["n_generated_tokens"] for k, r in hf.items()} == {k: r["n_generated_tokens"] for k, r in v.items()}
    finished = {k for k, r in v.items() if "</think>" in r["raw_output"]}
    assert 0 < len(finished) < len(v)  # the budget cuts some answers and not others
    for k in v:
        assert hf[k]["raw_output"].startswith("<think>") and v[k]["raw_output"].startswith("<think>")
        assert ("</think>" in hf[k]["raw_output"]) == (k in finished)
    # the answers (the thinking of the tiny model has near-ties between engines: words, not lengths)
    assert {k: hf[k]["response"] for k in finished} == {k: v[k]["response"] for k in finished}

    def verdicts(run):
        return {(t, s["doc_id"]): (s["exact_match"], s["truncated"])
                for t in sorted({k[0] for k in v}) for s in samples(run, t)}

    assert verdicts(tmp_path / "hf") == verdicts(tmp_path / "vllm")
    assert sum(tr for _, tr in verdicts(tmp_path / "hf").values()) == len(v) - len(finished)
    p = run([sys.executable, "-m", "lm_eval_telltale.cli", "table", str(tmp_path / "hf"), str(tmp_path / "vllm"),
             "--format", "json", "--baseline", "none"])
    assert p.returncode == 0, p.stderr[-2000:]
    t = json.loads(p.stdout)
    rows = {r["model_type"]: r for r in t["rows"]}
    assert set(rows) == {"hf-norms", "vllm-norms"}
    cells = {m: {c: (x["value"], x["n"]) for c, x in r["cells"].items()} for m, r in rows.items()}
    print("\n" + "\n".join(f"{m}: {c}" for m, c in cells.items()))
    assert cells["hf-norms"] == cells["vllm-norms"] and cells["hf-norms"]["telltale_arith"][0] is not None
