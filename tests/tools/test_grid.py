"""``telltale grid``: the grid file's checks (before anything starts), cells and their identity, and
real grids on CPU with the shipped model — killed with SIGKILL in the middle and resumed, a failing
cell, and the same grid through a local Ray cluster giving the same table."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lm_eval_telltale.tools import grid as G
from lm_eval_telltale.tools.grid.spec import GridError, load_grid

MODELS = [{"name": "tiny", "pretrained": "{arith_model}", "preset": "telltale-arith", "gpus": 0,
           "model_args": {"dtype": "float32", "max_model_len": 512, "kv_cache_memory_bytes": 67108864,
                          "enforce_eager": True, "think_end_token": "</think>"}}]
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TELLTALE_TASKS_ONLY": "1",
       "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def _grid(tmp_path: Path, name: str = "g.yaml", **over) -> Path:
    g = {"output": str(tmp_path / "out"), "models": MODELS,
         "methods": [{"name": "vllm", "model": "vllm"}, {"name": "norms", "model": "vllm-norms"}],
         "tasks": ["telltale_arith_l1", "telltale_arith_l2"], "limit": 3, "env": ENV}
    g.update(over)
    p = tmp_path / name
    p.write_text(yaml.safe_dump(g, sort_keys=False))
    return p


# -- the grid file ----------------------------------------------------------------------------------

@pytest.mark.parametrize("over, key", [
    ({"bogus": 1}, "bogus: unknown key"),
    ({"methods": [{"name": "a", "model": "vllm-bogus"}]}, "methods[0].model: unknown model type 'vllm-bogus'"),
    ({"methods": [{"name": "a", "model": "vllm-alrr", "model_args": {"growth_eps": "lots"}}]},
     "methods[0].model_args.growth_eps"),
    ({"methods": [{"name": "a", "model": "vllm-alrr", "model_args": {"layers": "99"}}]}, "methods[0].model_args.layers"),
    ({"methods": [{"name": "a", "model": "vllm-alrr", "model_args": {"tau_q": []}}]}, "an empty sweep"),
    ({"methods": [{"name": "a", "model": "vllm-suppress", "model_args": {"match_stats": "{sidecar:nope}"}}]},
     "{sidecar:nope} names no method"),
    ({"methods": [{"name": "a", "model": "vllm"}, {"name": "a", "model": "vllm"}]}, "methods[1].name: 'a' is used twice"),
    ({"models": [{"name": "m"}]}, "models[0].pretrained"),
    ({"tasks": []}, "tasks: give a non-empty list"),
    ({"limit": -1}, "limit: expected a positive number"),
    ({"lm_eval_args": ["--model_args", "x=1"]}, "lm_eval_args: --model_args is set by the grid"),
])
def test_bad_grid_files_name_the_key(tmp_path, over, key):
    with pytest.raises(GridError) as e:
        load_grid(_grid(tmp_path, **over))
    assert key in str(e.value)


def test_bad_grid_is_exit_2_before_anything_starts(tmp_path, capsys):
    assert G.main(["run", str(_grid(tmp_path, bogus=1))]) == 2
    assert "bogus: unknown key" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_cells_sweeps_and_identity(tmp_path):
    p = _grid(tmp_path, methods=[{"name": "vllm", "model": "vllm"},
                                 {"name": "alrr", "model": "vllm-alrr", "model_args": {"growth_eps": [0.0, 0.1]}}])
    g = load_grid(p)
    assert len(g.cells) == 2 * (1 + 2)  # tasks × (1 + a sweep of 2)
    assert sorted(c.label for c in g.cells if c.method == "alrr")[0] == "tiny · alrr [growth_eps=0.0] · telltale_arith_l1"
    again = load_grid(p)
    assert [c.id for c in again.cells] == [c.id for c in g.cells]  # the same definition: the same cells
    changed = load_grid(_grid(tmp_path, "h.yaml", methods=[
        {"name": "vllm", "model": "vllm"}, {"name": "alrr", "model": "vllm-alrr", "model_args": {"growth_eps": [0.0, 0.2]}}]))
    old, new = {c.id for c in g.cells}, {c.id for c in changed.cells}
    assert len(old & new) == 2 + 2  # stock cells and growth_eps=0.0 unchanged; growth_eps=0.2 is a new cell
    salted = load_grid(p, salt="code-v2")  # make eval's code digest (or an upgrade: versions) makes new cells
    assert not {c.id for c in salted.cells} & {c.id for c in g.cells}
    dep = load_grid(_grid(tmp_path, "d.yaml", methods=[
        {"name": "high", "model": "vllm-suppress"},
        {"name": "rand", "model": "vllm-suppress", "model_args": {"suppress_mode": "matched",
                                                                 "match_stats": "{sidecar:high}"}}]))
    high = {c.task: c.id for c in dep.cells if c.method == "high"}
    assert all(c.depends == (high[c.task],) for c in dep.cells if c.method == "rand")


def test_dry_run_prints_every_cell_and_starts_nothing(tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a cell was started")

    monkeypatch.setattr(subprocess, "Popen", boom)
    assert G.main(["run", str(_grid(tmp_path)), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("[pending] tiny · ") == 4 and out.count("    lm_eval --model vll") == 4
    assert "--model vllm-norms" in out and "config=telltale-arith" in out
    import shlex

    line = next(ln for ln in out.splitlines() if "--model vllm-norms" in ln)
    argv = shlex.split(line)  # a line a shell takes as it is ("</think>" quoted)
    assert argv[0] == "lm_eval" and argv[argv.index("--model_args") + 1].endswith("config=telltale-arith")


def test_shipped_grids_are_valid(capsys):
    root = Path(__file__).resolve().parents[2] / "grids"
    assert len(load_grid(root / "arith.yaml").cells) == 9
    paper = load_grid(root / "paper.yaml")
    assert {c.method for c in paper.cells} == {"baseline", "alrr", "erss", "lrs"} and len(paper.cells) == 4 * 4 * 5
    assert {c.gpus for c in paper.cells} == {1, 2, 4}


# -- real grids (CPU, the shipped model, in-process engines) ------------------------------------------

def _run(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lm_eval_telltale", "grid", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _check_page_in_browser(page: Path, tmp: Path) -> None:
    """The grid's page renders in a real headless browser: its table and cells are in the DOM, no
    console error, and a screenshot is not blank (as ``telltale view``'s pages are checked)."""
    from test_view import CHROMIUM, _chromium

    if CHROMIUM is None:
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    p = _chromium(page, tmp, "--virtual-time-budget=3000", "--dump-dom")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "<th>telltale_arith_l1</th>" in p.stdout and p.stdout.count("<tr class=") == 6
    assert not [line for line in p.stderr.splitlines() if ":CONSOLE" in line]
    shot = tmp / "grid.png"
    p = _chromium(page, tmp, "--window-size=1280,900", f"--screenshot={shot}")
    assert p.returncode == 0 and shot.is_file(), p.stderr[-2000:]
    import matplotlib.image as mpimg
    import numpy as np

    img = mpimg.imread(shot)[..., :3]
    assert float(np.std(img)) > 0.02


def _table(out: Path) -> list:
    t = json.loads((out / "table.json").read_text())
    return [(r["label"], {k: v["value"] for k, v in r["cells"].items()}) for r in t["rows"]]


@pytest.mark.e2e
def test_grid_killed_and_resumed_then_ray_gives_the_same_table(tmp_path):
    broken = {"name": "broken", "model": "vllm", "model_args": {"max_model_len": 16}}  # prompts are longer
    p = _grid(tmp_path, methods=[{"name": "vllm", "model": "vllm"}, {"name": "norms", "model": "vllm-norms"}, broken])
    out = tmp_path / "out"
    proc = _run(["run", str(p)])
    deadline = time.time() + 600
    while time.time() < deadline:  # SIGKILL the grid once a cell is done and another has started
        states = [json.loads(f.read_text()).get("state") for f in out.glob("cells/*/state.json")]
        if "done" in states and "running" in states:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(1.0)
    st = subprocess.run([sys.executable, "-m", "lm_eval_telltale", "grid", "status", str(p)], capture_output=True,
                        text=True, timeout=120)
    assert "interrupted" in st.stdout and "done" in st.stdout, st.stdout
    done_before = {f.parent.name: f.read_text() for f in out.glob("cells/*/state.json")
                   if json.loads(f.read_text())["state"] == "done"}
    n_done = len(done_before)
    proc = _run(["run", str(p)])
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 1, stderr[-3000:]  # the broken cells failed, the rest finished
    assert f"{n_done} done or running elsewhere, {6 - n_done} to run" in stderr
    assert stderr.count("telltale grid: FAILED tiny · broken") == 2 and "log " in stderr
    for name, text in done_before.items():  # done cells were not run again
        assert (out / "cells" / name / "state.json").read_text() == text
    assert any((out / "cells").glob("*/attempts/*/log.txt"))  # the interrupted attempt kept aside
    rows = _table(out)
    assert [label.split(" ")[0] for label, _ in rows] == ["vllm", "norms"]  # the broken cells are left out
    assert all(set(cells) == {"telltale_arith_l1", "telltale_arith_l2"} for _, cells in rows)
    page = (out / "index.html").read_text()
    assert "tiny · norms · telltale_arith_l2" in page and "failed" in page
    _check_page_in_browser(out / "index.html", tmp_path)
    # the same grid (without the broken method) through a local Ray cluster, from scratch
    clean = _grid(tmp_path, "clean.yaml", output=str(tmp_path / "ray"),
                  methods=[{"name": "vllm", "model": "vllm"}, {"name": "norms", "model": "vllm-norms"}])
    proc = _run(["run", str(clean), "--ray", "local"])
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-3000:]
    assert _table(tmp_path / "ray") == rows


def test_cells_are_packed_onto_gpu_groups(tmp_path, monkeypatch):
    """On a machine with GPUs, each cell gets ``gpus`` of them, running cells never share one, and
    a cell that needs more GPUs than the machine has fails alone. (The cells' processes are a
    stand-in here that records its CUDA_VISIBLE_DEVICES.)"""
    from lm_eval_telltale.tools.grid import execute

    def model(name, gpus, n):
        return {**MODELS[0], "name": name, "gpus": gpus, "model_args": {**MODELS[0]["model_args"], "max_model_len": n}}

    p = _grid(tmp_path, models=[model("tiny", 2, 512), model("small", 1, 511), model("huge", 8, 510)],
              methods=[{"name": "vllm", "model": "vllm"}], tasks=["telltale_arith_l1", "telltale_arith_l2"])
    g = load_grid(p)
    record = tmp_path / "gpus.txt"
    script = ("import os,time,sys; open(sys.argv[1],'a').write(os.environ['CUDA_VISIBLE_DEVICES']+' '+"
              "str(time.time())+'\\n'); time.sleep(0.6); open(sys.argv[1],'a').write('end '+str(time.time())+'\\n')")
    monkeypatch.setattr(execute, "command_of", lambda grid, cell: [sys.executable, "-c", script, str(record)])
    monkeypatch.setattr(execute, "complete", lambda d, cell: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    out = execute.run_cells(g, g.cells, quiet=True)
    assert len(out.done) == 4 and [c.model for c, _ in out.failed] == ["huge", "huge"]
    assert "needs 8 GPUs, this machine has 3" in out.failed[0][1]
    starts = [line.split()[0] for line in record.read_text().splitlines() if not line.startswith("end")]
    assert sorted(len(s.split(",")) for s in starts) == [1, 1, 2, 2]
    assert all(set(s.split(",")) <= {"0", "1", "2"} for s in starts)
    events = sorted((float(line.split()[1]), line.startswith("end")) for line in record.read_text().splitlines())
    running, most = 0, 0
    for _, end in events:
        running += -1 if end else 1
        most = max(most, running)
    assert most == 2  # a 2-GPU and a 1-GPU cell side by side on 3 GPUs


def test_a_failed_dependency_fails_its_dependents_and_nothing_else(tmp_path, monkeypatch):
    from lm_eval_telltale.tools.grid import execute

    p = _grid(tmp_path, methods=[
        {"name": "vllm", "model": "vllm"}, {"name": "high", "model": "vllm-suppress"},
        {"name": "rand", "model": "vllm-suppress", "model_args": {"suppress_mode": "matched",
                                                                 "match_stats": "{sidecar:high}"}}])
    g = load_grid(p)
    monkeypatch.setattr(execute, "command_of", lambda grid, cell: [sys.executable, "-c", "pass"])
    monkeypatch.setattr(execute, "complete", lambda d, cell: cell.method != "high")  # "high" ends without results
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    out = execute.run_cells(g, g.cells, quiet=True)
    assert sorted(c.method for c in out.done) == ["vllm", "vllm"]
    whys = {(c.method, why) for c, why in out.failed}
    assert whys == {("high", "lm_eval ended without a complete results file and sidecar"),
                    ("rand", "a cell it depends on failed")}
    assert len(out.failed) == 4


def test_grid_env_sets_and_unsets_variables(tmp_path, monkeypatch):
    from lm_eval_telltale.tools.grid.execute import cell_env

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")
    g = load_grid(_grid(tmp_path, env={"VLLM_CPU_KVCACHE_SPACE": None, "A_SETTING": 1}))
    env = cell_env(g.cells[0], None)
    assert "VLLM_CPU_KVCACHE_SPACE" not in env and env["A_SETTING"] == "1"
    assert "VLLM_CPU_KVCACHE_SPACE" in __import__("os").environ  # the grid's own environment is untouched
