"""Issue 31: the ``telltale`` commands' argument errors — an output never written over an input, an
existing model never replaced without ``--force``, one line naming the flag (exit 2) instead of a
traceback, and the messages and notes that said the wrong thing. No engine starts here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import no_generation

DATA = Path(__file__).resolve().parents[1] / "data" / "table"
EDGE = [DATA / "edge" / n for n in ("baseline", "alrr", "suppress", "corrupt", "lrs")]


class Reached(Exception):
    """The command got past its argument checks (where generation would start)."""


def _reach_collect(monkeypatch):
    import lm_eval_telltale.tools.profile as prof

    def reached(*a, **k):
        raise Reached

    monkeypatch.setattr(prof, "collect", reached)


def _exit2(fn, argv, capsys) -> str:
    """Run a tool's main; it must stop with argparse's exit 2. Returns its stderr."""
    with pytest.raises(SystemExit) as e:
        fn([str(x) for x in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err
    return err


def _collection(path: Path) -> Path:
    """A small synthetic collection file (what ``telltale profile`` saves after generating)."""
    from lm_eval_telltale.tools.profile import save_collection

    rng = np.random.default_rng(0)
    samples = [{"mode": m, "task": "t", "doc_id": d, "n_prompt_tokens": 5, "token_ids": list(range(11)), "text": "x",
                "finish_reason": "length", "position": list(range(10)), "norm": rng.uniform(1, 5, size=(10, 4)),
                "tau": np.full((10, 4), 3.0)} for m in ("thinking", "non-thinking") for d in range(2)]
    meta = {"model": "m", "engine": "vllm", "architecture": "Qwen3ForCausalLM", "num_layers": 4, "layers": [0, 1, 2, 3],
            "tasks": ["t"], "limit": 2, "modes": ["thinking", "non-thinking"], "warmup": 4, "iqr_k": 1.5,
            "tau_mode": "request", "chat_template": True, "think_end_token_id": None, "created": "2026-01-01T00:00:00"}
    return save_collection({"meta": meta, "samples": samples}, path)


def _gen_args(tiny_model_dir, local_task_dir, *extra):
    return ["--model", tiny_model_dir, "--tasks", "telltale_local", "--include_path", local_task_dir, "--limit", "2",
            "--max-tokens", "8", "--warmup", "4", *extra]


# -- item 1: no output over an input ---------------------------------------------------------------

def test_calibrate_refuses_out_onto_its_collection(tmp_path, monkeypatch, capsys):
    from lm_eval_telltale.tools.profile import main_calibrate

    no_generation(monkeypatch)
    col = _collection(tmp_path / "c.npz")
    before = col.read_bytes()
    err = _exit2(main_calibrate, ["--collection", col, "--out", col], capsys)
    assert "--out: refusing to overwrite the input" in err.splitlines()[-1]
    assert col.read_bytes() == before
    # the same file through another spelling (a symlink) is the same input
    (tmp_path / "link.npz").symlink_to(col)
    err = _exit2(main_calibrate, ["--collection", col, "--out", tmp_path / "link.npz"], capsys)
    assert "--out: refusing" in err and col.read_bytes() == before
    # the side file is written only when generating: finishing from <out>.collection.npz stays allowed
    side = _collection(tmp_path / "cal.collection.npz")
    assert main_calibrate(["--collection", str(side), "--out", str(tmp_path / "cal.yaml")]) == 0
    assert (tmp_path / "cal.yaml").read_text().startswith("# written by `telltale calibrate`")


def test_calibrate_refuses_out_onto_a_model_file_before_generating(tiny_model_dir, local_task_dir, monkeypatch,
                                                                   capsys):
    from lm_eval_telltale.tools.profile import main_calibrate

    no_generation(monkeypatch)
    cfg = Path(tiny_model_dir) / "config.json"
    before = cfg.read_bytes()
    err = _exit2(main_calibrate, _gen_args(tiny_model_dir, local_task_dir, "--out", cfg), capsys)
    assert "--out: refusing to overwrite the input" in err and cfg.read_bytes() == before


def test_profile_refuses_out_where_its_collection_would_be_overwritten(tmp_path, monkeypatch, capsys):
    from lm_eval_telltale.tools.profile import main_profile

    no_generation(monkeypatch)
    d = tmp_path / "prof"
    col = _collection(d / "profile.json")  # profile.json is what --out DIR gets
    before = col.read_bytes()
    err = _exit2(main_profile, ["--collection", col, "--out", d], capsys)
    assert "--out: refusing to overwrite the input" in err and str(col) in err
    assert col.read_bytes() == before and sorted(p.name for p in d.iterdir()) == ["profile.json"]
    # the collection.npz of DIR is not written from --collection: redoing the plots in place is fine
    _collection(d / "collection.npz")
    assert main_profile(["--collection", str(d / "collection.npz"), "--out", str(d)]) == 0
    assert (d / "profile_layers.png").is_file()


def _view_run(tmp_path: Path, results_name: str) -> Path:
    """A run directory whose results file (any name: it is given directly) points at a traced sidecar."""
    run = tmp_path / "run"
    run.mkdir()
    T, layers = 6, (4, 5)
    row = {"task": "t", "doc_id": 0, "repeat": 0, "method": "alrr", "n_prompt_tokens": 3, "n_generated_tokens": T + 1,
           "finish_reason": "length", "response": "abcdefg", "token_ids": list(range(70, 70 + T + 1)),
           "layers": {str(l): {} for l in layers},
           "tokens": {"position": [3 + i for i in range(T)], "norm": [[20.0, 21.0]] * T,
                      "tau": [[None, None]] * 2 + [[20.5, 20.5]] * (T - 2), "event": [[0, 0]] * T}}
    (run / "telltale_alrr_x.jsonl").write_text(json.dumps(row) + "\n")
    res = {"results": {"t": {"exact_match,none": 0.5}},
           "config": {"model": "vllm-alrr", "model_args": {},
                      "telltale": {"method": "alrr", "stats_path": "telltale_alrr_x.jsonl"}}}
    (run / results_name).write_text(json.dumps(res))
    return run / results_name


def test_view_refuses_out_onto_its_input(tmp_path, capsys):
    from lm_eval_telltale.tools.view import main

    res = _view_run(tmp_path, "page.html")
    before = res.read_bytes()
    err = _exit2(main, [res, "--out", res], capsys)
    assert "--out: refusing to overwrite the input" in err.splitlines()[-1]
    assert res.read_bytes() == before
    assert main([str(res), "--out", str(tmp_path / "other.html")]) == 0  # another page: fine


# -- item 2: tiny-model never replaces a model without --force -------------------------------------

def test_tiny_model_refuses_an_existing_model_without_force(tmp_path, capsys):
    from lm_eval_telltale.cli import main

    d = tmp_path / "m"
    assert main(["tiny-model", "--out", str(d), "--layers", "1"]) == 0
    (d / "MODEL_CARD.md").write_text("describes these weights")
    weights = {p.name: p.read_bytes() for p in d.iterdir()}
    err = _exit2(main, ["tiny-model", "--out", d, "--layers", "1", "--seed", "1"], capsys)
    assert "--out" in err.splitlines()[-1] and "already holds a model" in err and "--force" in err
    assert {p.name: p.read_bytes() for p in d.iterdir()} == weights
    # a directory with weights only (no config.json) holds a model too
    w = tmp_path / "w"
    w.mkdir()
    (w / "pytorch_model.bin").write_bytes(b"x")
    assert "already holds a model" in _exit2(main, ["tiny-model", "--out", w], capsys)
    # --force replaces it; a directory without a model is fine
    capsys.readouterr()
    assert main(["tiny-model", "--out", str(d), "--layers", "1", "--seed", "1", "--force"]) == 0
    assert (d / "model.safetensors").read_bytes() != weights["model.safetensors"]
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "notes.txt").write_text("x")
    assert main(["tiny-model", "--out", str(tmp_path / "tok"), "--layers", "1"]) == 0


def test_build_tiny_model_callers_keep_working(tmp_path):
    """The library function (tests' fixtures, ``telltale bench --tiny-mid``) writes where it is told."""
    from lm_eval_telltale.tools.tiny import build_tiny_model, model_files

    d = build_tiny_model(tmp_path / "m", num_layers=1)
    assert [p.name for p in model_files(d)] == ["config.json", "model.safetensors"]
    assert build_tiny_model(d, num_layers=1, seed=1) == d


# -- item 3a: table --out/--plot that cannot be written ---------------------------------------------

@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc (where nothing can be created)")
@pytest.mark.parametrize("flag", ["--out", "--plot"])
def test_table_unwritable_destination_is_one_line(flag, tmp_path, capsys):
    from lm_eval_telltale.tools.table import main

    dest = "/proc/nope/t.md" if flag == "--out" else "/proc/nope/p.png"
    fine = tmp_path / "t.md"
    extra = [] if flag == "--out" else ["--out", str(fine)]
    rc = main([*map(str, EDGE), flag, dest, *extra])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"telltale table: error: {flag} {dest}: cannot write it"), err
    assert not fine.exists()  # every directory is made before anything is written


def test_table_destination_under_a_file_fails_before_building(tmp_path, capsys, monkeypatch):
    import lm_eval_telltale.tools.table as table

    def boom(*a, **k):
        raise AssertionError("the table was built before --out was checked")

    monkeypatch.setattr(table, "build_table", boom)
    (tmp_path / "f").write_text("x")
    rc = table.main([*map(str, EDGE), "--plot", str(tmp_path / "f" / "p.png")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("telltale table: error: --plot ") and "is a file, not a directory" in err


# -- item 3b/3c: profile --tasks / --engine-args checked before the engine --------------------------

def test_profile_unknown_task_is_a_clear_error(tiny_model_dir, local_task_dir, tmp_path, monkeypatch, capsys):
    from lm_eval_telltale.tools.profile import main_profile

    no_generation(monkeypatch)
    argv = _gen_args(tiny_model_dir, local_task_dir, "--out", tmp_path / "p")
    argv[argv.index("telltale_local")] = "telltale_local,nosuch_task"
    err = _exit2(main_profile, argv, capsys)
    assert "--tasks: unknown task 'nosuch_task'" in err.splitlines()[-1]


def test_profile_task_load_failure_names_tasks(tiny_model_dir, local_task_dir, tmp_path, monkeypatch, capsys):
    """lm-eval's KeyError while loading (a group member it does not know, say) is an error naming --tasks."""
    import vllm

    import lm_eval_telltale.harness.taskindex as taskindex
    import lm_eval_telltale.tools.profile as prof

    def boom(*a, **k):
        raise AssertionError("engine built")

    def missing(*a, **k):
        raise KeyError("Spec 'gone' is not a registered task/group/tag name or valid YAML path")

    monkeypatch.setattr(vllm, "LLM", boom)
    monkeypatch.setattr(prof, "_unknown_tasks", lambda *a: [])
    monkeypatch.setattr(taskindex, "load_tasks", missing)
    err = _exit2(prof.main_profile, _gen_args(tiny_model_dir, local_task_dir, "--out", tmp_path / "p"), capsys)
    assert "--tasks telltale_local: Spec 'gone' is not a registered" in err.splitlines()[-1]


def test_profile_unknown_engine_args_are_refused(tiny_model_dir, local_task_dir, tmp_path, monkeypatch, capsys):
    from lm_eval_telltale.tools.profile import main_calibrate, main_profile

    no_generation(monkeypatch)
    bad = '{"enforce_eager": true, "bogus_key": 1}'
    err = _exit2(main_profile, _gen_args(tiny_model_dir, local_task_dir, "--out", tmp_path / "p", "--engine-args", bad),
                 capsys)
    last = err.splitlines()[-1]
    assert "--engine-args: unknown vLLM engine argument(s) 'bogus_key'" in last and "enforce_eager" not in last
    err = _exit2(main_calibrate, _gen_args(tiny_model_dir, local_task_dir, "--out", tmp_path / "c.yaml",
                                           "--engine-args", bad), capsys)
    assert "'bogus_key'" in err
    # known keys pass: vLLM's EngineArgs fields, LLM's own arguments; --engine hf takes from_pretrained's
    _reach_collect(monkeypatch)
    hf = '{"device": "cpu", "batch_size": 2, "attn_implementation": "eager"}'
    for extra in (["--engine-args", '{"enforce_eager": true, "max_num_seqs": 4, "chat_template": null}'],
                  ["--engine", "hf", "--engine-args", hf]):
        with pytest.raises(Reached):
            main_profile([str(x) for x in _gen_args(tiny_model_dir, local_task_dir, "--out", tmp_path / "p", *extra)])


def test_unknown_engine_keys_is_shareable():
    from lm_eval_telltale.vllm import unknown_engine_keys

    assert unknown_engine_keys([]) == []
    keys = ["max_num_seqs", "bogus", "tensor_parallel_size", "batch_size"]
    assert unknown_engine_keys(keys) == ["bogus", "batch_size"]
    assert unknown_engine_keys(["batch_size", "max_num_seqs"], also={"batch_size"}) == []


def test_bench_unknown_engine_args_are_refused(tiny_model_dir, tmp_path, capsys):
    from lm_eval_telltale.tools import bench

    base = ["--model", tiny_model_dir, "--methods", "vllm", "--batch-sizes", "1", "--out", tmp_path / "o", "--plan"]
    err = _exit2(bench.main, [*base, "--engine-args", '{"bogus_key": 1}'], capsys)
    assert "--engine-args: unknown vLLM engine argument(s) 'bogus_key'" in err.splitlines()[-1]
    assert bench.main([str(x) for x in base] + ["--engine-args", '{"enforce_eager": true}']) == 0
    assert bench.main([str(x) for x in base] + ["--engine", "hf", "--engine-args", '{"device": "cpu"}']) == 0


# -- item 4: match_stats' error says its prefix once --------------------------------------------------

def test_match_stats_error_names_the_key_once(tmp_path):
    from lm_eval_telltale.config import ConfigError, resolve

    with pytest.raises(ConfigError) as e:
        resolve("suppress", {"layers": "3", "suppress_mode": "matched", "match_stats": str(tmp_path / "no.jsonl")}, 8)
    msg = str(e.value)
    assert msg == f"telltale: bad value for 'match_stats': file not found: {tmp_path / 'no.jsonl'}"
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"task": "t", "doc_id": 0, "layers": {}}) + "\n")
    with pytest.raises(ConfigError) as e:
        resolve("suppress", {"layers": "3", "suppress_mode": "matched", "match_stats": str(empty)}, 8)
    assert str(e.value).count("telltale: bad value for 'match_stats'") == 1 and str(empty) in str(e.value)


# -- item 5: --baseline none: no Δ in the notes --------------------------------------------------------

def test_table_without_baseline_mentions_no_delta():
    from lm_eval_telltale.tools.render import render
    from lm_eval_telltale.tools.table import build_table

    t = build_table(EDGE, baseline="none", progress=False)
    assert all(c.delta is None for r in t.rows for c in r.cells.values())
    assert t.notes[0].startswith("cells: ") and "Δ" not in t.notes[0] and "none row" not in t.notes[0]
    for fmt in ("md", "latex"):
        text = render(t, fmt)
        assert "none row" not in text and "Δ vs" not in text
    assert "(Δ vs the same model's vllm row, in points)" in build_table(EDGE, progress=False).notes[0]


# -- telltale rescore / audit: bad input is one line, nothing is written ----------------------------------

def test_rescore_and_audit_argument_errors(tmp_path, capsys):
    from lm_eval_telltale.tools import rescore

    assert "no such file or directory" in _exit2(rescore.main_rescore, [str(tmp_path / "nope")], capsys)
    assert "no such file or directory" in _exit2(rescore.main_audit, [str(tmp_path / "nope")], capsys)
    assert "--show must be >= 0" in _exit2(rescore.main_audit, [str(EDGE[0]), "--show", "-1"], capsys)
    taken = tmp_path / "taken"
    taken.mkdir()
    assert "exists; rescoring never writes over earlier files" in _exit2(
        rescore.main_rescore, [str(EDGE[0]), "--out", str(taken)], capsys)
    inside = next(EDGE[0].rglob("results*.json"))
    assert "refusing to overwrite the input" in _exit2(rescore.main_audit, [str(EDGE[0]), "--out", str(inside)], capsys)
    # a run without logged samples: a clear error, exit 2, and no output directory left behind
    (tmp_path / "empty").mkdir()
    assert rescore.main_audit([str(tmp_path / "empty")]) == 2
    assert "no lm-eval results here" in capsys.readouterr().err
    assert rescore.main_rescore([str(EDGE[0]), "--out", str(tmp_path / "new")]) == 2
    assert "no run with logged samples" in capsys.readouterr().err and not (tmp_path / "new").exists()
