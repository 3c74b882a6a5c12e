"""``telltale table``: golden files on real tiny runs and on hand-made edge cases.

Inputs live in ``tests/data/table/`` (see its README): ``real/`` was produced ONCE by
``make_fixtures.py`` (real ``lm_eval`` runs of the stock baseline and every telltale model type on
a tiny random Qwen3); ``edge/`` is hand-made. Golden outputs are in ``tests/data/table/golden/``;
``TELLTALE_UPDATE_GOLDEN=1`` rewrites them (review the diff).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lm_eval_telltale.tools.plots import plot_deltas
from lm_eval_telltale.tools.render import render
from lm_eval_telltale.tools.table import NoResultsError, build_table

DATA = Path(__file__).resolve().parents[1] / "data" / "table"
GOLDEN = DATA / "golden"
UPDATE = os.environ.get("TELLTALE_UPDATE_GOLDEN") == "1"
REAL = ["baseline", "norms", "alrr", "suppress", "erss", "lrs"]
EDGE = ["baseline", "alrr", "suppress", "corrupt", "lrs"]
EXT = {"md": "md", "csv": "csv", "latex": "tex", "json": "json"}


def _norm(text: str) -> str:
    return text.replace(str(DATA), "<DATA>")


def check_golden(name: str, text: str) -> None:
    p = GOLDEN / name
    if UPDATE:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
        return
    assert p.is_file(), f"missing golden file {p}; create it with TELLTALE_UPDATE_GOLDEN=1"
    assert text == p.read_text(encoding="utf-8"), f"{name} differs from the golden file (TELLTALE_UPDATE_GOLDEN=1)"


def real_table(**kw):
    return build_table([DATA / "real" / n for n in REAL], progress=False, **kw)


def edge_table(**kw):
    return build_table([DATA / "edge" / n for n in EDGE], progress=False, **kw)


def _row(t, label_start: str):
    rows = [r for r in t.rows if r.label.startswith(label_start)]
    assert len(rows) == 1, [r.label for r in t.rows]
    return rows[0]


# -- real tiny runs ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["md", "csv", "latex", "json"])
def test_real_runs_golden(fmt):
    check_golden(f"real.{EXT[fmt]}", _norm(render(real_table(), fmt)))


def test_real_runs_subtasks_golden():
    check_golden("real_subtasks.md", _norm(render(real_table(subtasks=True), "md")))


def test_real_runs_content():
    t = real_table()
    assert [c.name for c in t.columns] == ["telltale_gsm8k", "telltale_gsm_plus_mini"]
    assert {c.metric for c in t.columns} == {"exact_match,none"}  # not `truncated` (higher_is_better false)
    base = _row(t, "vllm")
    assert base.is_baseline and t.rows[0] is base
    methods = {r.method for r in t.rows}
    assert methods == {"vllm", "norms", "alrr", "suppress", "erss", "lrs"}
    # every method row has a Δ (0 here: a random model), the baseline has none
    for r in t.rows:
        for c in r.cells.values():
            assert (c.delta is None) == r.is_baseline
    # sidecar columns: the event each method causes, and none for the observer
    ex = {r.method: r.extras for r in t.rows if not r.selector}
    assert ex["alrr"]["accepted"] > 0 and ex["erss"]["injected"] > 0 and ex["suppress"]["suppressed"] > 0
    assert ex["norms"]["accepted"] == ex["norms"]["injected"] == ex["norms"]["suppressed"] == 0
    assert ex["norms"]["gen_tokens"] == 16.0 and ex["norms"]["truncated"] == 1.0
    assert ex["vllm"]["gen_tokens"] is None  # no sidecar for the stock baseline
    # LRS: one row per selector from the same traces, the returned one first
    lrs = [r for r in t.rows if r.method == "lrs"]
    assert [r.selector for r in lrs] == ["late_sum", "mean", "A", "B", "C", "D", "maj", "conf", "random", "first"]
    assert lrs[0].returned and not any(r.returned for r in lrs[1:])
    # knobs that differ from the defaults name the configuration; shared ones go to the notes
    assert _row(t, "alrr").label == "alrr (growth_eps=0)"
    assert _row(t, "erss").label == "erss (iqr_k=0, low_k=3, p_inject=1, cos_min=-1, cooldown=0)"
    assert any("layers=4-6" in n and "warmup=4" in n and "max_gen_toks=16" in n for n in t.notes)
    assert not t.warnings


# -- hand-made edge cases ------------------------------------------------------------------------

def test_edge_golden():
    t = edge_table()
    check_golden("edge.md", _norm(render(t, "md")))
    check_golden("edge.json", _norm(render(t, "json")))
    check_golden("edge_all.md", _norm(render(edge_table(keep_all=True), "md")))


def test_edge_na_stderr_and_string_model_args():
    t = edge_table()
    base = _row(t, "vllm")
    assert base.model == "org/model-x"  # from the "k=v,..." model_args string of an old results.json
    a = base.cells["task_a"]
    assert a.value == 50.0 and a.stderr is None  # "N/A"
    md = render(t, "md")
    assert "| org/model-x | vllm | 50.0 | 25.0 ± 10.0 | 37.5 |" in md
    alrr = _row(t, "alrr")
    assert alrr.label == "alrr (blowup=2)"
    assert alrr.cells["task_a"].delta == pytest.approx(25.0) and alrr.avg.delta == pytest.approx(15.0)
    # the metric of task_b is its first higher-is-better one (acc, not acc_norm)
    assert next(c.metric for c in t.columns if c.name == "task_b") == "acc,none"


def test_edge_corrupt_and_partial_files_are_skipped_with_a_warning():
    t = edge_table()
    w = "\n".join(t.warnings)
    assert "corrupt/org__model-x/results_2026-01-03T00-00-00.000000.json" in w and "partial JSON" in w
    assert "telltale_alrr_2026-01-01T00-00-00.000000.jsonl: skipped 1 unreadable or partial line" in w
    # the partial sidecar's good lines still count: 4 answers, 500 tokens, 3+5+0+2 + 4×1 accepted
    ex = _row(t, "alrr").extras
    assert ex["gen_tokens"] == 125.0 and ex["truncated"] == 0.25 and ex["accepted"] == pytest.approx(28.0)


def test_edge_duplicate_config_newest_wins_or_all():
    t = edge_table()
    sup = _row(t, "suppress")
    assert sup.cells["task_a"].value == pytest.approx(20.0)  # the 2026-01-02 run
    assert any("2 runs of the same configuration" in n and "older: 2026-01-01" in n for n in t.notes)
    # no sidecar anywhere: the run summary in the results JSON fills the sidecar columns
    assert sup.extras["suppressed"] == pytest.approx(50.0) and sup.extras["gen_tokens"] == 100.0
    ta = edge_table(keep_all=True)
    sups = [r for r in ta.rows if r.method == "suppress"]
    assert [r.cells["task_a"].value for r in sups] == pytest.approx([10.0, 20.0])
    assert all("@ 2026-01-0" in r.label for r in sups)


def test_edge_lrs_selectors_from_per_candidate_correctness():
    t = edge_table()
    acc = {r.selector: (r.cells["task_a"].value, r.cells["task_b"].value) for r in t.rows if r.method == "lrs"}
    # hand-computed from the picks and candidates' correctness in edge/lrs
    assert acc["late_sum"] == (100.0, 50.0)
    assert acc["maj"] == (75.0, 50.0)
    assert acc["first"] == (50.0, 25.0)
    assert acc["random"] == (25.0, 50.0)
    assert acc["A"] == (100.0, 75.0)
    first = next(r for r in t.rows if r.selector == "first")
    assert first.extras["gen_tokens"] == 100.0 and first.extras["truncated"] == 0.0


def test_no_results_is_a_clear_error(tmp_path):
    with pytest.raises(NoResultsError, match="no lm-eval results here"):
        build_table([DATA / "edge" / "empty"], progress=False)
    with pytest.raises(NoResultsError, match="no readable lm-eval results"):
        build_table([DATA / "edge" / "corrupt"], progress=False)


# -- the console command -------------------------------------------------------------------------

def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lm_eval_telltale", "table", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def test_cli_table_out_plot_and_errors(tmp_path):
    runs = [DATA / "edge" / n for n in EDGE]
    out, png = tmp_path / "t.md", tmp_path / "d.png"
    p = _cli(*runs, "--out", out, "--plot", png)
    assert p.returncode == 0, p.stderr
    assert out.read_text() == render(edge_table(), "md")
    assert "warning: skipping" in p.stderr and "corrupt" in p.stderr
    _check_png(png)
    # never overwrites an input
    victim = DATA / "edge" / "baseline" / "results.json"
    before = victim.read_bytes()
    p = _cli(*runs, "--out", victim)
    assert p.returncode == 2 and "refusing to overwrite" in p.stderr and victim.read_bytes() == before
    # a run dir without results
    p = _cli(DATA / "edge" / "empty")
    assert p.returncode == 2 and "no lm-eval results here" in p.stderr
    p = _cli(*runs, "--format", "json")
    assert p.returncode == 0 and json.loads(p.stdout)["rows"][0]["label"] == "vllm"


def _check_png(path: Path) -> None:
    import matplotlib.image as mpimg
    import numpy as np

    assert path.is_file() and path.stat().st_size > 5000
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert float(np.std(img[..., :3])) > 0.02  # not a blank canvas


def test_plot_real_runs(tmp_path):
    p = plot_deltas(edge_table(), tmp_path / "edge.png")
    _check_png(p)


def test_matched_suppression_label_is_stable_across_reruns(tmp_path):
    """A matched run's match_stats is a sidecar whose name carries the high run's timestamp; the
    label must not, or two runs of the same configuration give different tables."""
    src = next((DATA / "real" / "suppress").rglob("results_*.json"))
    labels = []
    for i, stamp in enumerate(["2026-11-22T08-57-04.847387", "2026-12-01T10-00-00.000001"]):
        res = json.loads(src.read_text())
        res["config"]["telltale"]["config"]["params"].update(
            suppress_mode="matched", match_rate=[0.01, 0.02, 0.03],
            match_stats=f"/somewhere/run{i}/telltale_suppress_{stamp}.jsonl")
        d = tmp_path / f"run{i}" / "m"
        d.mkdir(parents=True)
        (d / src.name).write_text(json.dumps(res))
        labels.append(_row(build_table([tmp_path / f"run{i}"], progress=False), "suppress").label)
    assert labels[0] == labels[1]
    assert "match_stats=telltale_suppress.jsonl" in labels[0] and "2026" not in labels[0]


# -- issue 14 item 2: runs of one configuration, one per task, make one row ------------------------

PERTASK = DATA / "pertask"


def test_per_task_runs_of_one_configuration_merge_into_one_row():
    """One output directory per task: every task of a configuration lands in its row; where two runs
    have a task, the newest wins for that task; sidecar columns and sources combine the runs."""
    t = build_table([PERTASK / n for n in ["vllm-a", "vllm-b", "alrr-old", "alrr-a", "alrr-b"]], progress=False)
    assert [c.name for c in t.columns] == ["task_a", "task_b", "grp"]
    assert [r.method for r in t.rows] == ["vllm", "alrr"]
    base, alrr = t.rows
    assert {k: c.value for k, c in base.cells.items()} == pytest.approx({"task_a": 50.0, "task_b": 40.0, "grp": 60.0})
    # task_a from alrr-a (2026-02-03), not alrr-old's 10.0; grp (a group) from alrr-old, the only run with it
    assert {k: c.value for k, c in alrr.cells.items()} == pytest.approx({"task_a": 60.0, "task_b": 50.0, "grp": 70.0})
    assert {k: c.delta for k, c in alrr.cells.items()} == pytest.approx({"task_a": 10.0, "task_b": 10.0, "grp": 10.0})
    assert alrr.avg.value == pytest.approx(60.0) and alrr.avg.delta == pytest.approx(10.0)
    assert not base.avg_partial and not alrr.avg_partial
    # the sidecars of the three runs, alrr-old's rows of task_a (superseded) left out:
    # tokens 50+150 (a) + 100+100 (b) + 80+120 (grp) over 6 answers, one truncated, 6 accepted
    assert alrr.extras["gen_tokens"] == pytest.approx(100.0)
    assert alrr.extras["truncated"] == pytest.approx(1 / 6)
    assert alrr.extras["accepted"] == pytest.approx(10.0)
    names = sorted(Path(s).parent.parent.name + "/" + Path(s).name.split("_")[0] for s in alrr.sources)
    assert names == ["alrr-a/results", "alrr-a/telltale", "alrr-b/results", "alrr-b/telltale",
                     "alrr-old/results", "alrr-old/telltale"]
    assert len(base.sources) == 2
    note = next(n for n in t.notes if "vllm-alrr: 3 runs of the same configuration" in n)
    assert "grp from 2026-02-02 00:10:00 UTC" in note and "task_a from 2026-02-03 00:10:00 UTC" in note
    assert "task_a of 2026-02-02 00:10:00 UTC" in note  # the older run's superseded task is named
    assert not t.warnings
    # --all: every run its own row, as before
    ta = build_table([PERTASK / n for n in ["vllm-a", "vllm-b", "alrr-old", "alrr-a", "alrr-b"]], progress=False,
                     keep_all=True)
    assert len(ta.rows) == 5 and all(" @ 2026-02-0" in r.label for r in ta.rows)


def test_per_task_merge_keeps_groups_consistent():
    """A newer run of one subtask of an older run's group: the group (score and subtasks) comes from
    one run only, so the older group is dropped, not mixed with the newer subtask."""
    t = build_table([PERTASK / "alrr-old", PERTASK / "alrr-x"], progress=False, subtasks=True)
    (row,) = t.rows
    assert {k: c.value for k, c in row.cells.items()} == pytest.approx({"task_a": 10.0, "grp_x": 90.0})
    assert "grp" not in [c.name for c in t.columns] and "grp_y" not in row.cells
    # alrr-old's rows of task_a (1000+1000 tokens, truncated) and alrr-x's grp_x row (100); not grp's
    assert row.extras["gen_tokens"] == pytest.approx(700.0) and row.extras["truncated"] == pytest.approx(2 / 3)
    assert any("grp of 2026-02-02 00:10:00 UTC" in n for n in t.notes)


# -- issue 14 item 4: --out/--plot never inside an input run directory nor onto an input ------------

def _main(capsys, *args):
    from lm_eval_telltale.tools.table import main

    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_cli_refuses_out_and_plot_inside_input_run_dirs(tmp_path, capsys):
    import shutil

    edge = tmp_path / "edge"
    shutil.copytree(DATA / "edge", edge)
    samples = edge / "alrr" / "org__model-x" / "samples_task_a_2026-01-01T00-10-00.000000.jsonl"
    samples.write_text('{"doc_id": 0}\n')
    runs = [edge / n for n in EDGE]
    before = _snapshot(tmp_path)
    fine = tmp_path / "out" / "t.md"
    victims = [
        samples,                                                                       # a samples file
        edge / "corrupt" / "org__model-x" / "results_2026-01-03T00-00-00.000000.json",  # a skipped damaged file
        edge / "suppress" / "org__model-x" / "results_2026-01-01T01-00-00.000000.json",  # an older duplicate
        edge / "alrr" / "table.md",                                                    # a new file in a run dir
        edge / "lrs" / "org__model-x" / "plots" / "t.md",                              # ... and deeper
    ]
    for v in victims:
        rc, err = _main(capsys, *runs, "--out", v)
        last = err.splitlines()[-1]
        assert rc == 2 and last.startswith("telltale table: error: --out: refusing") and str(v) in last, (v, err)
        assert _snapshot(tmp_path) == before, v
    # --plot as well, checked before --out is written
    rc, err = _main(capsys, *runs, "--out", fine, "--plot", edge / "baseline" / "d.png")
    assert rc == 2 and "inside the input run directory" in err and not fine.exists()
    assert _snapshot(tmp_path) == before
    # a results file given directly: its directory is an input run directory
    res = edge / "alrr" / "org__model-x" / "results_2026-01-01T00-10-00.000000.json"
    rc, err = _main(capsys, res, "--out", res.parent / "t.md")
    assert rc == 2 and "inside the input run directory" in err
    assert _snapshot(tmp_path) == before
    rc, err = _main(capsys, *runs, "--out", fine, "--plot", tmp_path / "out" / "d.png")
    assert rc == 0 and fine.read_text() == render(build_table(runs, progress=False), "md")


def test_cli_out_that_is_a_directory_is_a_clear_error(tmp_path, capsys):
    runs = [DATA / "edge" / n for n in EDGE]
    rc, err = _main(capsys, *runs, "--out", tmp_path)
    assert rc == 2 and err.startswith("telltale table: error: --out") and "is a directory" in err
    rc, err = _main(capsys, *runs, "--plot", tmp_path)
    assert rc == 2 and "--plot" in err and "is a directory" in err
    assert not any(tmp_path.iterdir())


# -- issue 14 item 5: an interrupted run directory is skipped, not fatal ----------------------------

def test_interrupted_run_dir_is_skipped_with_a_warning(capsys):
    interrupted = DATA / "edge" / "interrupted"
    t = build_table([DATA / "edge" / n for n in EDGE] + [interrupted, DATA / "edge" / "nowhere"], progress=False)
    assert render(t, "md") == render(edge_table(), "md")
    w = "\n".join(t.warnings)
    sidecar = interrupted / "org__model-x" / "telltale_alrr_2026-01-05T00-00-00.000000.jsonl"
    assert f"skipping {interrupted}: no lm-eval results here" in w
    assert f"an interrupted run? its sidecar {sidecar} holds 3 answers" in w  # the torn 4th line not counted
    assert f"skipping {DATA / 'edge' / 'nowhere'}: no such file or directory" in w
    rc, err = _main(capsys, DATA / "edge" / "baseline", interrupted, "--format", "json")
    assert rc == 0 and "telltale table: warning: skipping" in err and "interrupted run?" in err
    # nothing usable left: an error naming the inputs
    with pytest.raises(NoResultsError, match="no readable lm-eval results.*holds 3 answers"):
        build_table([interrupted], progress=False)
    rc, err = _main(capsys, interrupted, DATA / "edge" / "empty")
    assert rc == 2 and err.splitlines()[-1].startswith("telltale table: error: no readable lm-eval results")


# -- issue 14 item 13: the suppression ablation does not flatten the methods' Δ; error bars ----------

def test_delta_stderr_of_independent_runs():
    t = edge_table()
    alrr = _row(t, "alrr")
    assert alrr.cells["task_b"].delta_stderr == pytest.approx((5.0 ** 2 + 10.0 ** 2) ** 0.5)
    assert alrr.cells["task_a"].delta_stderr is None  # the stderr is "N/A"
    assert alrr.avg.delta_stderr is None
    assert _row(t, "vllm").cells["task_b"].delta_stderr is None
    t = build_table([DATA / "ablation"], progress=False, warn=None)
    e = _row(t, "erss")
    ea, eb = (2.0 ** 2 + 1.8 ** 2) ** 0.5, (5.2 ** 2 + 5.0 ** 2) ** 0.5
    assert e.cells["task_a"].delta_stderr == pytest.approx(ea)
    assert e.avg.delta_stderr == pytest.approx((ea ** 2 + eb ** 2) ** 0.5 / 2)


def test_plot_ablation_in_its_own_panel_with_error_bars(tmp_path, monkeypatch):
    from matplotlib.container import ErrorbarContainer

    from lm_eval_telltale.tools import plots

    figs = []
    save = plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: (figs.append(fig), save(fig, path))[1])
    t = build_table([DATA / "ablation"], progress=False)
    _check_png(plot_deltas(t, tmp_path / "d.png"))
    methods, ablation = figs[0].axes
    labels = lambda ax: [x.get_text().replace("\n", "") for x in ax.get_legend().get_texts()]  # noqa: E731
    assert labels(methods) == ["alrr (blowup=3)", "erss (p_inject=1)"]
    assert [lab.split(" ")[0] for lab in labels(ablation)] == ["suppress", "suppress"]
    # own scales: the methods' few points are not flattened by the ablation's −60 to −80
    lo, hi = methods.get_ylim()
    assert lo < 0 < hi and hi - lo < 30
    assert ablation.get_ylim()[0] < -75
    # error bars: ± the stderr of Δ on every bar (3 columns: task_a, task_b, avg)
    for ax, rows in ((methods, ["alrr", "erss"]), (ablation, ["suppress", "suppress"])):
        bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        assert len(bars) == len(rows)
    alrr = _row(t, "alrr")
    segs = next(c for c in methods.containers if isinstance(c, ErrorbarContainer)).lines[2][0].get_segments()
    want = [alrr.cells["task_a"], alrr.cells["task_b"], alrr.avg]
    assert [y for s in segs for y in (s[0][1], s[1][1])] == pytest.approx(
        [y for c in want for y in (c.delta - c.delta_stderr, c.delta + c.delta_stderr)])


def test_hf_rows_are_labelled_with_their_engine():
    """An hf-alrr row and a vllm-alrr row of the same knobs must not read the same."""
    from pathlib import Path as _P

    from lm_eval_telltale.tools.runs import Run
    from lm_eval_telltale.tools.table import _label

    def run(mt):
        return Run(path=_P("r.json"), res={}, model_type=mt, model="m", settings={"growth_eps": "0"},
                   tt_settings={"growth_eps"}, method="alrr", date=0.0)

    assert _label(run("vllm-alrr"), set()) == "alrr (growth_eps=0)"
    assert _label(run("hf-alrr"), set()) == "alrr [hf] (growth_eps=0)"


@pytest.mark.parametrize("mode,extra", [("request", {}), ("global", {}), ("fixed", {"tau": 3.0})])
@pytest.mark.parametrize("method", ["suppress", "erss"])
def test_labels_show_exactly_the_settings_that_differ_from_the_defaults(method, mode, extra):
    """The table's label of a run is what ``resolve`` did not default: a default run's warm-up is no
    label in any τ mode (a fixed-τ run was labelled ``warmup=0``), an explicit one that differs is
    (``warmup=500`` with a fixed τ read as the default)."""
    from lm_eval_telltale.config import resolve
    from lm_eval_telltale.tools.runs import telltale_knobs

    def label(**kw):
        cfg = resolve(method, {"layers": "4-6", "tau_mode": mode, **extra, **kw}, 8).to_dict()
        return telltale_knobs({"config": cfg, "method": method})

    base = label()
    assert "warmup" not in base and base.get("tau_mode", "request") == mode and base["layers"] == "4-6"
    # 500 is the global-mode default of suppress (decode steps), not of ERSS (200) nor of a fixed τ (0)
    assert label(warmup=500).get("warmup") == (None if (mode, method) == ("global", "suppress") else "500")
    assert label(warmup=7)["warmup"] == "7"


def test_online_lrs_rows_report_tokens_against_full_lrs(tmp_path):
    """A full and an online LRS run of one model: both rows carry the tokens generated per prompt
    over all candidates and the candidates stopped; the online one its fraction of full LRS's
    tokens and only its returned selector (its picks stay in the sidecar); the plot draws both."""
    import shutil

    from lm_eval_telltale.tools.plots import lrs_cost_rows, plot_lrs_cost

    def make(name, tokens, stopped, params):
        d = tmp_path / name
        shutil.copytree(DATA / "edge" / "lrs", d)
        res_f = next(d.rglob("results_*.json"))
        res = json.loads(res_f.read_text())
        res["config"]["telltale"]["config"]["params"].update(params)
        res_f.write_text(json.dumps(res))
        side = next(d.rglob("telltale_*.jsonl"))
        rows = [json.loads(x) for x in side.read_text().splitlines()]
        for r in rows:
            r["candidate_tokens"] = tokens
            if stopped is not None:
                r["online"] = {"signal": params["stop_signal"], "warmup": 2, "threshold": 1.0, "stopped": stopped}
        side.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return d

    full = make("full", 400, None, {"stop_window": 16})  # a knob full LRS leaves unused: not in its label
    online = make("online", 300, 1, {"stop_signal": "conf", "stop_percentile": 90.0})
    t = build_table([full, online], progress=False, baseline="none")
    lrs = [r for r in t.rows if r.method == "lrs"]
    on = [r for r in lrs if "stop_signal=conf" in r.label]
    assert len(on) == 1 and on[0].returned and on[0].selector == "late_sum"
    assert on[0].extras["cand_tokens"] == 300 and on[0].extras["stopped"] == 1 and on[0].extras["cand_frac"] == 0.75
    assert len(lrs) == 11 and all(r.extras["cand_frac"] == 1.0 and r.extras["stopped"] == 0 for r in lrs if r not in on)
    assert not any("stop_window" in r.label for r in lrs)
    md = render(t, "md")
    assert "| cand tok | × full | stopped/q |" in md.splitlines()[0] + " |"
    assert "| 300.0 | 0.75 | 1.00 |" in md
    assert len(lrs_cost_rows(t)) == 2  # the returned row of each run
    _check_png(plot_lrs_cost(t, tmp_path / "lrs.png", "task_a"))
