"""``telltale bench``: its argument checks (before any engine), the report built from crafted cell
results, and one quick real run (three cells, each a fresh engine in its own process)."""

from __future__ import annotations

import json
import subprocess

import pytest

from lm_eval_telltale.tools import bench
from lm_eval_telltale.tools.bench import cell, report


@pytest.fixture
def no_engine(monkeypatch):
    """Fail the test if the bench would start a cell (an engine)."""
    def boom(*a, **k):
        raise AssertionError(f"a cell was started: {a[:1]}")
    monkeypatch.setattr(subprocess, "Popen", boom)


@pytest.mark.parametrize("args, message", [
    (["--methods", "vllm,bogus"], "--methods: unknown method(s) 'bogus'"),
    (["--methods", "vllm-alrr"], "named without 'vllm-'"),
    (["--methods", "alrr,alrr"], "alrr given twice"),
    (["--batch-sizes", "1,x"], "--batch-sizes: 'x' is not a positive integer"),
    (["--batch-sizes", "0,8"], "'0' is not a positive integer"),
    (["--batch-sizes", "8,8"], "given twice"),
    (["--max-tokens", "0"], "--max-tokens must be >= 1"),
    (["--knobs", '{"alrr": {"growth_eps": "lots"}}'], "growth_eps"),
    (["--knobs", '{"bogus": {}}'], "--knobs: unknown block 'bogus'"),
    (["--knobs", '{"alrr": {"blowup": 0.5}}'], "blowup"),
    (["--layers", "99"], "--knobs/--layers"),
    (["--engine-args", "[1]"], "--engine-args: expected a JSON object"),
    (["--engine-args", "{bad"], "--engine-args: malformed JSON"),
    (["--model-name", "a b"], "--model-name"),
])
def test_bad_arguments_fail_before_any_engine(tiny_model_dir, no_engine, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        bench.main(["--model", str(tiny_model_dir), *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_model_is_required_and_must_exist(tmp_path, no_engine, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--methods", "vllm"])
    assert "give exactly one of --model PATH and --tiny-mid DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--model", str(tmp_path / "nope")])
    assert "--model: telltale: pretrained=" in capsys.readouterr().err


def test_plan_interleaves_repeats_and_adds_the_baselines(tiny_model_dir, tmp_path, no_engine, capsys):
    rc = bench.main(["--model", str(tiny_model_dir), "--methods", "alrr,lrs", "--batch-sizes", "4,1", "--repeats", "2",
                     "--out", str(tmp_path / "out"), "--plan"])
    out = capsys.readouterr().out
    assert rc == 0 and not (tmp_path / "out").exists()
    assert "added the stock baseline cell(s) the ratios need: vllm, vllm-sampled" in out
    cells = [l.split(": ", 1)[1] for l in out.splitlines() if "   cell " in l]
    expect = [f"repeat {r}, batch {b}, {m}" for r in (1, 2) for b in (1, 4)
              for m in ("vllm", "vllm-alrr", "vllm-lrs", "vllm (sampled, LRS's requests)")]
    assert [c.rsplit(" (", 1)[0] for c in cells] == expect  # without "(N requests)"
    assert "vllm-lrs (16 requests)" in out  # batch 4 × 4 candidates
    # the same engine flags for every method at a batch size; max_num_seqs covers LRS's B × N requests
    assert '"max_num_seqs": 16' in out and '"dtype": "float32"' in out and '"max_model_len": 320' in out


def _cell(method, batch, repeat, tps, **kw):
    return {"method": method, "batch": batch, "repeat": repeat, "ok": True, "tps": tps, "requests": batch,
            "generated_tokens": 1000, "startup_s": 5.0, "warmup_s": 1.0, **kw}


def test_report_ratio_spread_and_alrr_compute_limit(tmp_path):
    cells = []
    for r, (s, a, n, lrs, samp) in enumerate([(100, 80, 99, 45, 50), (110, 85, 108, 44, 40), (90, 75, 91, 40, 50)]):
        cells += [_cell("vllm", 8, r, s), _cell("norms", 8, r, n, interventions={"above_tau": 10.0 + r}),
                  _cell("alrr", 8, r, a, interventions={"recursed": 30.0, "accepted": 20.0 + r},
                        alrr={"rerun_calls": 100, "rerun_rows": 2000 + 100 * r}),
                  _cell("lrs", 8, r, lrs), _cell("vllm-sampled", 8, r, samp)]
    cells.append({"method": "norms", "batch": 8, "repeat": 3, "ok": False, "error": "exit 1"})
    meta = {"num_layers": 8, "cell_methods": ["vllm", "norms", "alrr", "lrs", "vllm-sampled"], "batch_sizes": [8],
            "command": "telltale bench --model M", "model_name": "m", "repeats": 3}
    rep = report.build_report(cells, meta)
    row = {r["method"]: r for r in rep["rows"]}
    assert row["vllm"]["tps"] == {"median": 100, "min": 90, "max": 110, "values": [100, 110, 90]}
    assert row["vllm"]["ratio"] is None and row["vllm"]["baseline"] is None
    assert row["alrr"]["ratio"] == pytest.approx(80 / 100)
    assert row["alrr"]["paired_ratios"] == pytest.approx([0.8, 85 / 110, 75 / 90])
    # re-run rows per generated token: median(2.0, 2.1, 2.2) = 2.1 → limit = 8 / (8 + 2.1) of stock's median
    assert row["alrr"]["rerun_rows_per_token"] == pytest.approx(2.1)
    assert row["alrr"]["compute_limit_ratio"] == pytest.approx(8 / 10.1)
    assert row["alrr"]["compute_limit_tps"] == pytest.approx(100 * 8 / 10.1)
    assert row["alrr"]["interventions_per_1k"] == {"recursed": 30.0, "accepted": 21.0}
    assert row["norms"]["repeats"] == 3 and row["norms"]["failed"] == 1
    assert row["norms"]["ratio"] == pytest.approx(99 / 100)
    assert row["lrs"]["baseline"] == "vllm-sampled" and row["lrs"]["ratio"] == pytest.approx(44 / 50)
    md = report.render_markdown(rep)
    assert md.splitlines()[2:5] == ["```", "telltale bench --model M", "```"]
    alrr_line = next(l for l in md.splitlines() if l.startswith("| vllm-alrr |"))
    assert "| 0.800 (0.773–0.833) |" in alrr_line and "recursed 30.0, accepted 21.0" in alrr_line
    assert "| 2.10 | 0.792 (79.2 tok/s) |" in alrr_line
    assert "| vllm-norms (1 failed) | 8 |" in md
    paths = report.write_report(rep, tmp_path / "out", "m")
    assert paths["png"].stat().st_size > 1000
    assert json.loads(paths["json"].read_text())["rows"][2]["compute_limit_ratio"] == pytest.approx(8 / 10.1)


def test_report_compares_decode_throughput_where_every_cell_timed_it():
    """vLLM cells time their decode apart: the ratios compare decode tokens/s, and the end-to-end
    figures (prefill included) are kept beside them; one cell without it → end-to-end for all."""
    cells = [_cell("vllm", 4, 0, 50, decode_tps=100), _cell("norms", 4, 0, 48, decode_tps=90),
             _cell("alrr", 4, 0, 40, decode_tps=80, alrr={"rerun_calls": 10, "rerun_rows": 1000})]
    meta = {"num_layers": 8, "cell_methods": ["vllm", "norms", "alrr"], "batch_sizes": [4], "repeats": 1}
    rep = report.build_report(cells, meta)
    row = {r["method"]: r for r in rep["rows"]}
    assert rep["meta"]["rate"] == "decode"
    assert row["norms"]["ratio"] == pytest.approx(0.9) and row["norms"]["e2e_ratio"] == pytest.approx(48 / 50)
    assert row["alrr"]["compute_limit_tps"] == pytest.approx(100 * 8 / 9)  # from stock's decode rate
    md = report.render_markdown(rep)
    assert "| decode tok/s median |" in md and "| end-to-end tok/s (ratio) |" in md
    assert "| vllm-norms | 4 | 4 | 90.0 | 90.0 | 90.0 | 0.900 | 48.0 (0.960) |" in md
    mixed = report.build_report(cells[:2] + [_cell("alrr", 4, 0, 40)], meta)
    assert mixed["meta"]["rate"] == "end-to-end"
    assert {r["method"]: r for r in mixed["rows"]}["norms"]["ratio"] == pytest.approx(48 / 50)
    assert "decode tok/s" not in report.render_markdown(mixed)


@pytest.mark.engine
def test_quick_run_writes_the_report(tiny_model_dir, tmp_path, capsys):
    """Two real cells (stock, ALRR) on the tiny model: every cell generated what it was asked for,
    the ratio and ALRR's re-run counters reached the report, md/json/png written."""
    out = tmp_path / "out"
    rc = bench.main(["--model", str(tiny_model_dir), "--model-name", "tiny", "--methods", "vllm,alrr", "--quick",
                     "--eager", "--layers", "4-6", "--out", str(out), "--work", str(tmp_path / "w"),
                     # τ = Q3 after 4 tokens and a wide band: ALRR has candidates within 16 tokens of a random
                     # model; its skip decision, so that the sync audit has decisions to count
                     "--knobs", '{"common": {"warmup": 4, "iqr_k": 0}, "alrr": {"blowup": 10, "skip_sync": true}}'])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((out / "tiny.json").read_text())
    cells = {c["method"]: c for c in rep["cells"]}
    assert all(c["ok"] and c["generated_tokens"] == 2 * 16 and c["requests"] == 2 for c in cells.values())
    # the decode is timed apart from the prefill: both 16-token prompts fit one step, so the decode
    # is every token after each request's first, at the rate of the time after that moment
    for c in cells.values():
        assert 0 < c["first_s"] < c["wall_s"] and c["decode_tokens"] == 2 * 15
        assert c["decode_tps"] == pytest.approx(30 / (c["wall_s"] - c["first_s"]))
    assert rep["meta"]["rate"] == "decode"
    assert cells["alrr"]["engine"]["enforce_eager"] and cells["alrr"]["engine"]["dtype"] == "float32"
    assert cells["alrr"]["alrr"]["rerun_calls"] > 0 and cells["alrr"]["alrr"]["rerun_rows"] > 0
    # --eager: the core's per-step work ran as plain operations, and the report says so
    assert cells["alrr"]["kernels"] == {"core": False, "method": None} and "kernels" not in cells["vllm"]
    assert cells["alrr"]["interventions"]["above_tau"] >= 0
    # telltale's own host time: measured in its hooks (ALRR's re-runs among them), a part of the run
    hooks = cells["alrr"]["hooks"]
    assert hooks["ms_per_step"] > 0 and 0 < hooks["share"] < 1 and "hooks" not in cells["vllm"]
    # the sync audit of an untimed run: ALRR's one host decision per patched layer and step, nothing else
    syncs = cells["alrr"]["syncs"]
    assert syncs["steps"] > 0 and syncs["per_step"] == 3.0 and "syncs" not in cells["vllm"]
    assert set(syncs["ops"]) <= {"aten::_local_scalar_dense", "aten::is_nonzero"}
    rows = {r["method"]: r for r in rep["rows"]}
    assert rows["alrr"]["ratio"] > 0
    assert 0 < rows["alrr"]["compute_limit_ratio"] < 1
    md = (out / "tiny.md").read_text()
    assert "telltale bench --model" in md and "| vllm-alrr | 2 | 2 |" in md
    assert "- telltale's per-step kernels: plain operations (vllm-alrr)" in md
    assert (out / "tiny.png").stat().st_size > 1000


@pytest.mark.engine
def test_quick_alternating_run_keeps_one_engine_per_method(tiny_model_dir, tmp_path, capsys):
    """--alternate: one engine per method stays up; two rounds time every method once each, the
    order rotated; each round's requests are collected on their own."""
    out = tmp_path / "out"
    rc = bench.main(["--model", str(tiny_model_dir), "--model-name", "alt", "--methods", "norms", "--quick", "--eager",
                     "--repeats", "2", "--alternate", "--layers", "4-6", "--out", str(out), "--work", str(tmp_path / "w"),
                     "--knobs", '{"common": {"warmup": 4, "iqr_k": 0}}'])
    err = capsys.readouterr()
    assert rc == 0, err.err
    rep = json.loads((out / "alt.json").read_text())
    cells = rep["cells"]
    assert [(c["repeat"], c["method"]) for c in cells] == [(0, "vllm"), (0, "norms"), (1, "norms"), (1, "vllm")]
    assert all(c["ok"] and c["generated_tokens"] == 2 * 16 and c["decode_tokens"] == 2 * 15 for c in cells)
    for m in ("vllm", "norms"):  # one engine each: started once, timed twice
        first, second = [c for c in cells if c["method"] == m]
        assert first["startup_s"] == second["startup_s"] and first["wall_s"] != second["wall_s"]
    assert err.out.count("starting the engine") == 2
    for c in cells:
        if c["method"] == "norms":
            assert c["collected"] == 2 and c["interventions"]["above_tau"] > 0
    assert rep["meta"]["alternate"] is True
    row = {r["method"]: r for r in rep["rows"]}["norms"]
    assert row["ratio"] > 0
    assert "rounds of alternating timed runs" in (out / "alt.md").read_text()


def test_alternate_is_refused_for_the_hf_engine(tiny_model_dir, no_engine, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--model", str(tiny_model_dir), "--engine", "hf", "--alternate", "--plan"])
    assert e.value.code == 2 and "--alternate drives vLLM engines" in capsys.readouterr().err


def test_method_counters_are_summed_over_stages_once_per_tp_group():
    """Pipeline stages count their own layers' re-runs (summed); tensor-parallel ranks count the same
    re-runs (not double-counted). (Records are merged by ``driver.merge_worker_records``.)"""
    states = [{"method": {"rerun_rows": 40}}, {"method": {"rerun_rows": 40}}, None]
    assert cell._method_total(states, "rerun_rows", tp=2) == 40
    assert cell._method_total(states, "rerun_rows", tp=1) == 80


def test_report_says_whether_each_methods_kernels_ran_compiled():
    """The workers' ``telltale_state`` → a cell's ``kernels`` → one line per report: a method is
    "compiled" only if every cell (and every worker) ran compiled; one fallback shows."""
    assert cell._kernels([{"fused": True, "method_fused": None}, {"fused": True, "method_fused": None}]) == \
        {"core": True, "method": None}
    assert cell._kernels([{"fused": True, "method_fused": True}, {"fused": True, "method_fused": False}]) == \
        {"core": True, "method": False}
    assert cell._kernels([None]) == {"core": False, "method": None}

    def result(m, core, meth, ok=True, repeat=0):
        return {"method": m, "ok": ok, "repeat": repeat, "kernels": {"core": core, "method": meth}}

    cells = [result("norms", True, None), result("norms", True, None, repeat=1),
             result("erss", True, True), result("erss", True, False, repeat=1),
             result("suppress", False, None, ok=False), {"method": "vllm", "ok": True, "repeat": 0}]
    per = report._kernels_of(cells, "vllm")
    assert per == {"vllm-norms": {"core": True, "method": None}, "vllm-erss": {"core": True, "method": False}}
    line = report._kernels_line(per)
    assert line == ("compiled (vllm-norms); partly compiled (threshold update compiled, layer step plain) "
                    "(vllm-erss)")
    per["vllm-erss"]["method"] = True
    assert report._kernels_line(per) == "compiled (every telltale method)"
    # the in-graph step (vllm/graph.py): named as such
    assert cell._kernels([{"fused": True, "method_fused": None, "in_graph": True}]) == \
        {"core": True, "method": None, "graph": True}
    per = report._kernels_of([{"method": "norms", "ok": True, "repeat": 0, "kernels": {"core": True, "method": None,
                                                                                        "graph": True}}], "vllm")
    assert report._kernels_line(per) == "in the model's compiled graph (vllm-norms)"
    assert report._kernels_line({}) is None


def test_hook_time_is_telltales_host_time_per_step_and_share_of_the_run():
    """The workers' ``hook_s`` before and after a run → ms per step and share of the run's wall time
    (tensor-parallel ranks run theirs at once; pipeline stages add up) → the report's column."""
    before = [{"hook_s": 1.0, "steps": 10}, {"hook_s": 1.0, "steps": 10}]
    after = [{"hook_s": 1.2, "steps": 110}, {"hook_s": 1.2, "steps": 110}]
    assert cell._hook_time(before, after, wall_s=4.0, tp=2) == pytest.approx({"ms_per_step": 2.0, "share": 0.05})
    assert cell._hook_time(before, after, wall_s=4.0, tp=1) == pytest.approx({"ms_per_step": 4.0, "share": 0.1})
    assert cell._hook_time([None], [None], wall_s=4.0) == {"ms_per_step": None, "share": None}
    assert cell._hook_time([None, None], after, wall_s=4.0) == {"ms_per_step": None, "share": None}
    cells = [_cell("vllm", 1, r, 20 + r) for r in range(3)]
    cells += [{**_cell("norms", 1, r, 19 + r), "hooks": {"ms_per_step": 1.0 + r, "share": 0.02 + 0.01 * r},
               "syncs": {"steps": 40, "ops": {}, "per_step": 0.0}} for r in range(3)]
    rep = report.build_report(cells, {"num_layers": 8, "cell_methods": ["vllm", "norms"], "batch_sizes": [1],
                                     "repeats": 3})
    row = {r["method"]: r for r in rep["rows"]}
    assert row["norms"]["hook_ms_per_step"] == 2.0 and row["norms"]["hook_share"] == pytest.approx(0.03)
    assert row["vllm"]["hook_ms_per_step"] is None
    md = report.render_markdown(rep)
    assert "| telltale hooks ms/step (share of run) |" in md
    assert "| 2.00 (3.0%) | 0.00 |" in next(l for l in md.splitlines() if l.startswith("| vllm-norms |"))
    assert row["norms"]["syncs_per_step"] == 0.0 and row["vllm"]["syncs_per_step"] is None
    assert "- telltale hooks: the host time" in md
