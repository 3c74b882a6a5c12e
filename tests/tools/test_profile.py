"""``telltale profile`` / ``telltale calibrate`` on the tiny model, and the calibration round trip:
the τ the engine uses under ``tau_mode=calibrated`` (or ``config=FILE``) is the file's quantile."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from conftest import BIN, KV_BYTES, no_generation, rpc

from lm_eval_telltale.config import ConfigError, load_calibration, load_preset, resolve

ENGINE = dict(kv_cache_memory_bytes=KV_BYTES, max_model_len=512, dtype="float32")


def _check_png(path) -> None:
    import matplotlib.image as mpimg

    assert path.is_file() and path.stat().st_size > 5000, path
    img = mpimg.imread(path)
    assert img.ndim == 3 and min(img.shape[:2]) > 100 and float(np.std(img[..., :3])) > 0.02, path


@pytest.fixture(scope="module")
def collection(tiny_model_dir, local_task_dir):
    from lm_eval_telltale.tools.profile import collect

    return collect(str(tiny_model_dir), ["telltale_local"], limit=2, thinking="auto", warmup=4, max_tokens=24,
                   include_path=str(local_task_dir), engine_args=ENGINE)


@pytest.mark.engine
def test_profile_runs_thinking_on_and_off(collection):
    meta, samples = collection["meta"], collection["samples"]
    assert meta["modes"] == ["thinking", "non-thinking"]  # the tiny chat template has enable_thinking
    assert meta["layers"] == list(range(8))  # every layer by default
    assert sorted((s["mode"], s["doc_id"]) for s in samples) == [
        ("non-thinking", 0), ("non-thinking", 1), ("thinking", 0), ("thinking", 1)]
    for s in samples:
        assert s["norm"].shape == (23, 8) and np.all(s["norm"] > 0)  # 24 generated, the last never fed back
        assert np.isnan(s["tau"][:4]).all() and np.isfinite(s["tau"][5:]).all()  # warm-up 4, then adaptive τ
    # the non-thinking prompt closes an empty think block, so the two modes see different contexts
    by = {(s["mode"], s["doc_id"]): s for s in samples}
    assert by[("non-thinking", 0)]["n_prompt_tokens"] > by[("thinking", 0)]["n_prompt_tokens"]


@pytest.mark.engine
def test_profile_json_and_plots(collection, tmp_path):
    from lm_eval_telltale.tools.profile import plot_layers, plot_trace, summarize_profile

    prof = summarize_profile(collection)
    st = prof["modes"]["thinking"]["layers"]["6"]
    assert st["count"] == 46 and st["min"] <= st["quantiles"]["p10"] <= st["quantiles"]["p90"] <= st["max"]
    assert prof["trace"]["layer"] == 6  # the deepest default patched layer of an 8-layer model
    tr = prof["trace"]["modes"]["thinking"]
    assert len(tr["norm"]) == 23 and tr["tau"][:4] == [None] * 4
    json.dumps(prof)  # serialisable
    _check_png(plot_layers(prof, tmp_path / "layers.png"))
    _check_png(plot_trace(prof, tmp_path / "trace.png"))


@pytest.mark.engine
def test_calibration_round_trip(collection, engines, tiny_model_dir, tmp_path):
    from vllm import SamplingParams

    from lm_eval_telltale.tools.profile import calibration_data, write_calibration

    data = calibration_data(collection)
    f = write_calibration(data, tmp_path / "calib.yaml")
    q = yaml.safe_load(f.read_text())["calibration"]["quantiles"]
    assert sorted(q) == list(range(8)) and list(q[6]) == ["p50", "p75", "p80", "p85", "p90", "p95", "p99"]
    pooled = np.concatenate([s["norm"][:, 6] for s in collection["samples"]])
    assert q[6]["p90"] == pytest.approx(float(np.quantile(pooled, 0.9)))

    # tau_mode=calibrated reads it ...
    cfg = resolve("norms", {"layers": "4-6", "tau_mode": "calibrated", "tau_file": str(f), "tau_q": 0.95}, 8)
    assert cfg.tau_values == [q[l]["p95"] for l in (4, 5, 6)]
    # ... and the file is a preset by itself (config=FILE): calibrated τ at its tau_q (0.9)
    pre = resolve("norms", {"layers": "4-6"}, 8, preset=load_preset(str(f)))
    assert pre.tau_mode == "calibrated" and pre.tau_values == [q[l]["p90"] for l in (4, 5, 6)]
    assert resolve("norms", {"tau_q": 0.5}, 8, preset=load_preset(str(f))).tau_values == [q[6]["p50"]]
    with pytest.raises(ConfigError, match="tau_q"):
        resolve("norms", {"tau_q": 0.6}, 8, preset=load_preset(str(f)))
    # JSON works too
    fj = write_calibration(data, tmp_path / "calib.json")
    assert load_calibration(fj)["quantiles"] == json.loads(json.dumps(data["calibration"]["quantiles"]))

    # the engine's τ is the file's quantile, for every generated token and layer
    llm = engines.make(tiny_model_dir, "norms", {"layers": "4-6", "tau_mode": "calibrated", "tau_file": str(f),
                                                 "tau_q": 0.95, "record_tokens": True})
    sp = SamplingParams(max_tokens=10, temperature=0.0, extra_args={"telltale_tag": "c0"})
    llm.generate([{"prompt_token_ids": list(range(5, 40))}], [sp], use_tqdm=False)
    rec = rpc(llm, "telltale_collect", ["c0"])[0]
    tau = np.array(rec["tokens"]["tau"], dtype=float)
    assert tau.shape == (9, 3)
    np.testing.assert_allclose(tau, np.tile([q[l]["p95"] for l in (4, 5, 6)], (9, 1)), rtol=1e-6, atol=1e-5)
    engines.close(llm)


@pytest.mark.e2e
def test_cli_profile_and_calibrate(tiny_model_dir, local_task_dir, tmp_path):
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")  # in-process engine: seconds, not half a minute
    common = ["--model", str(tiny_model_dir), "--tasks", "telltale_local", "--include_path", str(local_task_dir),
              "--limit", "1", "--max-tokens", "12", "--warmup", "4", "--kv-cache-memory-bytes", str(KV_BYTES),
              "--max-model-len", "512", "--engine-args", '{"enforce_eager": true}']  # the collection, not compilation
    out = tmp_path / "prof"
    p = subprocess.run([str(BIN / "telltale"), "profile", *common, "--out", str(out)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    prof = json.loads((out / "profile.json").read_text())
    assert set(prof["modes"]) == {"thinking", "non-thinking"} and prof["modes"]["thinking"]["n_tokens"] == 11
    _check_png(out / "profile_layers.png")
    _check_png(out / "profile_trace.png")
    f = tmp_path / "cal.yaml"
    p = subprocess.run([sys.executable, "-m", "lm_eval_telltale", "calibrate", *common, "--thinking", "off",
                        "--out", str(f)], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    cal = load_calibration(f)
    assert cal["thinking"] == ["non-thinking"] and sorted(cal["quantiles"]) == list(range(8))
    assert resolve("norms", {}, 8, preset=load_preset(str(f))).tau_values == [cal["quantiles"][6]["p90"]]


# -- issue 14 item 7: every argument checked before an engine starts; collected data saved first ------

def _args(tiny_model_dir, local_task_dir, *extra):
    return ["--model", str(tiny_model_dir), "--tasks", "telltale_local", "--include_path", str(local_task_dir),
            "--limit", "2", "--max-tokens", "12", "--warmup", "4", *extra]


@pytest.mark.parametrize("cmd,extra,flag", [
    ("calibrate", ["--tau-q", "0.6"], "--tau-q 0.6 must be one of --quantiles"),
    ("calibrate", ["--tau-q", "1.5"], "--tau-q must be in (0, 1)"),
    ("calibrate", ["--quantiles", "0.5,abc"], "--quantiles"),
    ("calibrate", ["--quantiles", "0,0.9"], "--quantiles"),
    ("calibrate", ["--out", "DIR"], "is a directory"),
    ("calibrate", ["--out", "FILE/cal.yaml"], "is a file, not a directory"),
    ("profile", ["--layers", "4-6", "--trace-layer", "3"], "--trace-layer 3 is not among the recorded layers"),
    ("profile", ["--trace-layer", "8"], "--trace-layer 8"),
    ("profile", ["--trace-sample", "-1"], "--trace-sample must be >= 0"),
    ("profile", ["--out", "FILE"], "exists and is not a directory"),
    ("profile", ["--out", "FILE/sub"], "is a file, not a directory"),
    ("profile", ["--layers", "5-2"], "empty range 5-2: the first layer must not exceed the last"),
    ("profile", ["--engine-args", '{"max_num_seqs": 4,}'], "--engine-args: malformed JSON"),
    ("profile", ["--engine-args", "[1]"], "--engine-args: expected a JSON object"),
    ("calibrate", ["--metadata", "{bad"], "--metadata: malformed JSON"),
    ("profile", ["--limit", "0"], "--limit must be >= 1"),
    ("profile", ["--model", "/nonexistent"], "pretrained='/nonexistent': no such directory"),
])
def test_cli_checks_everything_before_generating(tiny_model_dir, local_task_dir, tmp_path, monkeypatch, capsys,
                                                 cmd, extra, flag):
    from lm_eval_telltale.tools.profile import main_calibrate, main_profile

    no_generation(monkeypatch)
    (tmp_path / "FILE").write_text("x")
    (tmp_path / "DIR").mkdir()
    extra = [str(tmp_path / x) if x in ("DIR", "FILE", "FILE/cal.yaml", "FILE/sub") else x for x in extra]
    out = [] if "--out" in extra else ["--out", str(tmp_path / ("cal.yaml" if cmd == "calibrate" else "prof"))]
    argv = _args(tiny_model_dir, local_task_dir, *out, *extra)
    if "--model" in extra:
        argv = argv[2:]
    with pytest.raises(SystemExit) as e:
        (main_calibrate if cmd == "calibrate" else main_profile)(argv)
    assert e.value.code == 2
    assert flag in capsys.readouterr().err


def test_trace_sample_beyond_the_documents_fails_before_the_engine(tiny_model_dir, local_task_dir, tmp_path,
                                                                   monkeypatch, capsys):
    import vllm

    from lm_eval_telltale.tools.profile import main_profile

    def boom(*a, **k):
        raise AssertionError("engine built")

    monkeypatch.setattr(vllm, "LLM", boom)
    with pytest.raises(SystemExit) as e:  # the prompts exist (2 documents), the engine does not
        main_profile(_args(tiny_model_dir, local_task_dir, "--trace-sample", "2", "--out", str(tmp_path / "p")))
    assert e.value.code == 2 and "--trace-sample 2 out of range: the tasks give 2 documents (0..1)" in capsys.readouterr().err


def test_collection_file_round_trip(collection, tmp_path):
    from lm_eval_telltale.tools.profile import load_collection, save_collection

    back = load_collection(save_collection(collection, tmp_path / "c.npz"))
    assert back["meta"] == json.loads(json.dumps(collection["meta"]))
    assert len(back["samples"]) == len(collection["samples"])
    for a, b in zip(collection["samples"], back["samples"]):
        np.testing.assert_array_equal(a["norm"], b["norm"])
        np.testing.assert_array_equal(a["tau"], b["tau"])
        assert a["token_ids"] == b["token_ids"] and a["text"] == b["text"]


def test_late_failure_keeps_the_generations(collection, tiny_model_dir, local_task_dir, tmp_path, monkeypatch, capsys):
    """A step after generation fails: the generations are on disk first, the message names them, and
    --collection finishes the job without generating again."""
    import lm_eval_telltale.tools.profile as prof

    calls = []
    monkeypatch.setattr(prof, "collect", lambda *a, **k: calls.append(1) or collection)
    real = prof.calibration_data
    monkeypatch.setattr(prof, "calibration_data", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk on fire")))
    out = tmp_path / "cal.yaml"
    assert prof.main_calibrate(_args(tiny_model_dir, local_task_dir, "--out", str(out))) == 1
    err = capsys.readouterr().err
    saved = tmp_path / "cal.collection.npz"
    assert calls == [1] and saved.is_file() and not out.exists()
    assert "disk on fire" in err and f"--collection {saved}" in err
    monkeypatch.setattr(prof, "calibration_data", real)
    no_generation(monkeypatch)
    assert prof.main_calibrate(["--collection", str(saved), "--out", str(out)]) == 0
    assert load_calibration(out)["quantiles"] == load_calibration(write_cal(real(collection), tmp_path))["quantiles"]

    # profile: the plots fail after profile.json; collection.npz is there, --collection redoes the plots
    monkeypatch.setattr(prof, "collect", lambda *a, **k: collection)
    real_plot = prof.plot_trace
    monkeypatch.setattr(prof, "plot_trace", lambda *a, **k: (_ for _ in ()).throw(OSError("no space left")))
    d = tmp_path / "prof"
    assert prof.main_profile(_args(tiny_model_dir, local_task_dir, "--out", str(d))) == 1
    assert "no space left" in capsys.readouterr().err and (d / "collection.npz").is_file()
    monkeypatch.setattr(prof, "plot_trace", real_plot)
    no_generation(monkeypatch)
    assert prof.main_profile(["--collection", str(d / "collection.npz"), "--out", str(d), "--trace-layer", "5"]) == 0
    assert json.loads((d / "profile.json").read_text())["trace"]["layer"] == 5
    _check_png(d / "profile_trace.png")


def write_cal(data, tmp_path):
    from lm_eval_telltale.tools.profile import write_calibration

    return write_calibration(data, tmp_path / "expected.yaml")
