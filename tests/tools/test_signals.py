"""``telltale signals`` (issue #37): every signal on crafted tensors (known entropies), the statistics
on planted effects, the SAE formats, training and the bound check (a planted violation must be
reported), the teacher-forced pass against transformers' own outputs, and the command end to end
on the shipped model (generation through vLLM, whose norm trace must equal the pass's)."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BIN, KV_BYTES, no_generation

from lm_eval_telltale.tools.signals import measures, stats
from lm_eval_telltale.tools.signals.analysis import ANSWER, THINK, analyze, verdicts
from lm_eval_telltale.tools.signals.sae import (
    SAE,
    SAEError,
    bound_ratio,
    load_saes,
    reasoning_features,
    save_saelens,
    train_sae,
)

SHIPPED = Path(__file__).resolve().parents[2] / "lm_eval_telltale" / "arith" / "telltale-arith-tiny"


# -- the signals ---------------------------------------------------------------------------------

def test_entropies_on_known_distributions():
    V = 50
    assert float(measures.logits_entropy(torch.zeros(V))) == pytest.approx(math.log(V), rel=1e-6)
    p = torch.tensor([0.25, 0.75])
    want = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert float(measures.logits_entropy(p.log() + 3.0)) == pytest.approx(want, rel=1e-6)  # shift-invariant
    assert float(measures.logits_entropy(torch.tensor([0.0, -1e4, -1e4]))) == pytest.approx(0.0, abs=1e-6)
    d = 64
    assert float(measures.hidden_entropy(torch.ones(d))) == pytest.approx(math.log(d), rel=1e-6)
    assert float(measures.hidden_entropy(torch.eye(d)[3] * 7.0)) == pytest.approx(0.0, abs=1e-6)
    h = torch.randn(5, d)
    torch.testing.assert_close(measures.hidden_entropy(h), measures.hidden_entropy(-4.2 * h))  # scale-free
    torch.testing.assert_close(measures.l2_norm(h), torch.linalg.vector_norm(h, dim=-1))
    # attention: head 0 uniform over 4 keys, head 1 on one key → mean (log 4 + 0) / 2
    w = torch.zeros(2, 1, 4)
    w[0, 0] = 0.25
    w[1, 0, 2] = 1.0
    assert float(measures.attention_entropy(w)[0]) == pytest.approx(math.log(4) / 2, rel=1e-6)


@pytest.fixture(scope="module")
def shipped_lm():
    from lm_eval_telltale.tools.signals.teacher import load_model

    return load_model(str(SHIPPED), "cpu")


def test_teacher_pass_matches_transformers_outputs(shipped_lm):
    """The pass's norms are ``hidden_states[l+1]``'s (l < L−1), its attention entropy is that of
    ``output_attentions``, the logit lens at the last layer is the output entropy, and row k is the
    forward of generated token k (the last generated token is not fed)."""
    from lm_eval_telltale.tools.signals.teacher import SignalPass

    prompt, gen = [1, 5, 9, 14, 30, 41], [50, 61, 72, 83, 90]
    sp = SignalPass(shipped_lm, [2, 5, 7])
    p = sp.run(prompt, gen)
    assert p["position"] == [6, 7, 8, 9]
    with torch.no_grad():
        out = shipped_lm(input_ids=torch.tensor([prompt + gen[:-1]]), output_hidden_states=True, output_attentions=True)
    rows = p["position"]
    for j, l in enumerate((2, 5)):
        want = torch.linalg.vector_norm(out.hidden_states[l + 1][0, rows], dim=-1).double().numpy()
        np.testing.assert_allclose(p["norm"][:, j], want, rtol=1e-6)
        w = out.attentions[l][0][:, rows]
        np.testing.assert_allclose(p["attn_entropy"][:, j], measures.attention_entropy(w).double().numpy(), rtol=1e-5)
    logits = out.logits[0, rows]
    np.testing.assert_allclose(p["output_entropy"], measures.logits_entropy(logits).double().numpy(), rtol=1e-5)
    np.testing.assert_allclose(p["lens_entropy"][:, 2], p["output_entropy"], rtol=1e-5)
    assert not np.allclose(p["lens_entropy"][:, 0], p["output_entropy"], rtol=1e-2)


# -- statistics ------------------------------------------------------------------------------------

def test_planted_correlation_and_effect_size():
    rng = np.random.default_rng(0)
    n_gen, per = 60, 40
    group = np.repeat(np.arange(n_gen), per)
    x = rng.standard_normal(n_gen * per)
    y = 0.6 * x + 0.8 * rng.standard_normal(x.size)       # Pearson 0.6
    noise = rng.standard_normal(x.size)
    draws = stats.cluster_draws(group, 200, 0)
    c = stats.correlations(np.stack([x, noise]), y, draws)
    assert c["pearson"][0] == pytest.approx(0.6, abs=0.04)
    assert c["spearman"][0] == pytest.approx(6 / math.pi * math.asin(0.3), abs=0.04)  # bivariate normal
    lo, hi = c["spearman_ci"][0]
    assert 0.4 < lo < c["spearman"][0] < hi
    lo, hi = c["pearson_ci"][1]
    assert lo < 0 < hi  # no relation: the interval holds 0
    think = np.arange(x.size) % 2 == 0
    v = rng.standard_normal(x.size) + np.where(think, 0.8, 0.0)
    ct = stats.contrast(v, think, ~think, draws)
    assert ct["d"] == pytest.approx(0.8, abs=0.08)
    assert ct["auc"] == pytest.approx(0.5 * (1 + math.erf(0.8 / 2)), abs=0.03)  # Φ(d/√2)
    assert ct["d_ci"][0] > 0.5
    assert stats.spearman_rows(np.array([[1.0, 1.0, 2.0, 3.0]]), np.array([1.0, 2.0, 3.0, 4.0]))[0] == pytest.approx(
        0.9486833, rel=1e-6)  # ties share their average rank


# -- SAEs --------------------------------------------------------------------------------------------

def _random_sae(d=16, k=48, layer=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return SAE(torch.randn(d, k, generator=g), torch.randn(k, generator=g), torch.randn(d, generator=g) * 0.1,
               torch.randn(k, d, generator=g), layer, subtract_b_dec=True)


def test_bound_holds_for_the_encoder_and_a_planted_violation_is_reported():
    sae = _random_sae()
    h = torch.randn(200, 16) * 5
    f, x = sae.encode(h)
    r = bound_ratio(f, x, sae.W_enc, sae.b_enc)
    assert 0 < r <= 1
    assert bound_ratio(f * 3.0, x, sae.W_enc, sae.b_enc) > 1  # activations the encoder cannot produce
    res = {"per_layer": {"3": {"bound_ratio": bound_ratio(f * 3.0, x, sae.W_enc, sae.b_enc)}}, "layers": [3],
           "late_layers": [3], "signals": [], "agreement": None, "counts": {"generations": 20}}
    v = verdicts(res)
    assert v[0]["verdict"] == "does not hold" and "layer 3" in v[0]["evidence"]


def test_reasoning_features_are_the_planted_ones():
    think = torch.tensor([0.0, 2.0, 1.0, 5.0, 0.5])
    answer = torch.tensor([1.0, 0.1, 1.0, 0.5, 0.0])
    assert reasoning_features(think, answer, top=2).tolist() == [1, 4]  # (2−0.1)/0.1 = 19, 0.5/ε
    assert reasoning_features(think, answer, top=5).tolist() == [1, 3, 4]  # never one less active while thinking
    freq = torch.tensor([0.0, 0.5, 0.5, 0.5, 0.001])  # feature 4 fires on 0.1 % of the thinking rows
    assert reasoning_features(think, answer, top=2, think_freq=freq).tolist() == [1, 3]
    assert reasoning_features(torch.zeros(5), answer, top=3).tolist() == []


def test_trained_sae_finds_a_sparse_code_and_round_trips_through_the_saelens_format(tmp_path):
    g = torch.Generator().manual_seed(1)
    atoms = torch.randn(24, 16, generator=g)
    codes = torch.relu(torch.randn(3000, 24, generator=g) - 1.2) * 3   # ~12 % active
    h = codes @ atoms + 0.01 * torch.randn(3000, 16, generator=g)
    sae = train_sae(h, 4, expansion=4, epochs=6, l1=1.0, seed=0)
    assert sae.info["fvu"] < 0.2 and sae.info["l0"] < 20, sae.info
    d = save_saelens(sae, tmp_path / "sae" / "layers.4")
    cfg = json.loads((d / "cfg.json").read_text())
    assert cfg["architecture"] == "standard" and cfg["metadata"]["hook_name"] == "blocks.4.hook_resid_post"
    back = load_saes(tmp_path / "sae")
    assert list(back) == [4]
    torch.testing.assert_close(back[4].encode(h[:50])[0], sae.encode(h[:50])[0])


def test_sparsify_and_saelens_variants_load(tmp_path):
    from safetensors.torch import save_file

    d, k = 16, 40
    g = torch.Generator().manual_seed(2)
    enc, bias, bdec = torch.randn(k, d, generator=g), torch.randn(k, generator=g), torch.randn(d, generator=g)
    sp = tmp_path / "sp" / "layers.6"
    sp.mkdir(parents=True)
    save_file({"encoder.weight": enc, "encoder.bias": bias, "W_dec": torch.randn(k, d, generator=g), "b_dec": bdec},
              str(sp / "sae.safetensors"))
    (sp / "cfg.json").write_text(json.dumps({"d_in": d, "k": 5, "expansion_factor": 4}))
    s = load_saes(tmp_path / "sp")[6]
    h = torch.randn(30, d, generator=g)
    f, _ = s.encode(h)
    pre = torch.relu((h - bdec) @ enc.T + bias)
    top = pre.topk(5, dim=-1)
    want = torch.zeros_like(pre).scatter_(-1, top.indices, top.values)
    torch.testing.assert_close(f, want)
    assert int((f > 0).sum(-1).max()) <= 5
    # SAELens, resid_pre of block 3 = the output of layer 2; a jumprelu threshold
    sl = tmp_path / "sl"
    sl.mkdir()
    save_file({"W_enc": enc.T.contiguous(), "b_enc": bias, "W_dec": torch.randn(k, d, generator=g), "b_dec": bdec,
               "threshold": torch.full((k,), 0.5)}, str(sl / "sae_weights.safetensors"))
    (sl / "cfg.json").write_text(json.dumps({"architecture": "jumprelu", "d_in": d, "d_sae": k,
                                             "apply_b_dec_to_input": False, "hook_name": "blocks.3.hook_resid_pre"}))
    j = load_saes(sl)[2]
    pre = h @ enc.T + bias
    torch.testing.assert_close(j.encode(h)[0], pre * (pre > 0.5))
    for bad, msg in (({"architecture": "gated", "d_in": d, "d_sae": k, "hook_name": "blocks.1.hook_resid_post"},
                      "architecture 'gated'"),
                     ({"architecture": "standard", "d_in": d, "d_sae": k, "hook_name": "blocks.1.hook_mlp_out"},
                      "not a decoder layer's residual stream")):
        (sl / "cfg.json").write_text(json.dumps(bad))
        with pytest.raises(SAEError, match=msg):
            load_saes(sl)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SAEError, match="no SAE here"):
        load_saes(tmp_path / "empty")


# -- the analysis on a planted dataset ----------------------------------------------------------------

def _planted(n_gen=30, seed=3):
    """Generations whose reasoning features scale with the norm (thinking rows larger), entropies noise."""
    rng = np.random.default_rng(seed)
    d, k = 8, 32
    sae = SAE(torch.eye(d).repeat(1, k // d), torch.zeros(k), torch.zeros(d), None, 1)
    passes, labels = [], []
    for _g in range(n_gen):
        n = 20
        lab = np.where(np.arange(n) < 12, THINK, ANSWER).astype(np.int8)
        scale = np.where(lab == THINK, 3.0, 1.0) * rng.uniform(0.5, 1.5, n)
        h = torch.from_numpy(np.abs(rng.standard_normal((n, d))) * scale[:, None]).float()
        ent = rng.standard_normal((n, 1))
        passes.append({"position": list(range(10, 10 + n)), "h": {1: h}, "norm": np.linalg.norm(h.numpy(), axis=1)[:, None],
                       "hidden_entropy": ent, "lens_entropy": ent.copy(), "attn_entropy": ent.copy(),
                       "output_entropy": rng.standard_normal(n)})
        labels.append(lab)
    meta = {"model": "m", "num_layers": 2, "tasks": ["t"], "modes": ["thinking"], "engine": "x"}
    return meta, passes, labels, {1: sae}, rng


def _verdicts(res):
    return [v["verdict"] for v in res["verdicts"]]


def test_analysis_reports_a_planted_norm_signal():
    """The planted signal: every verdict holds. The norm shuffled within each generation: the
    correlation verdict does not. An entropy that is the norm's negative mirror tracks the score as
    closely (in absolute value): it does not either. Too few generations or no bootstrap: the
    statistical claims are not measured."""
    meta, passes, labels, saes, rng = _planted()
    res = analyze(meta, [{}] * 30, passes, labels, saes, [1], top=8, n_boot=100, seed=0)
    assert _verdicts(res) == ["holds", "holds", "holds"], res["verdicts"]
    assert res["per_layer"]["1"]["correlation"]["norm"]["spearman"] > 0.7
    assert res["per_layer"]["1"]["norm_margin"]["spearman_ci"][0] > 0.4
    mirrored = [{**p, "hidden_entropy": -p["norm"] * 1.01} for p in passes]
    res = analyze(meta, [{}] * 30, mirrored, labels, saes, [1], top=8, n_boot=100, seed=0)
    assert _verdicts(res)[1] == "does not hold" and "hidden_entropy" in res["verdicts"][1]["evidence"]
    assert _verdicts(analyze(meta, [{}] * 30, passes, labels, saes, [1], top=8, n_boot=0, seed=0))[1:] == [
        "not measured", "not measured"]
    assert _verdicts(analyze(meta, [{}] * 5, passes[:5], labels[:5], saes, [1], top=8, n_boot=50, seed=0))[1:] == [
        "not measured", "not measured"]
    held = analyze(meta, [{}] * 30, passes, labels, saes, [1], top=8, n_boot=50, seed=0, held_out=True)
    assert held["counts"]["evaluated_generations"] == 15 and _verdicts(held) == ["holds", "holds", "holds"]
    for p in passes:
        p["norm"] = rng.permutation(p["norm"])
    res = analyze(meta, [{}] * 30, passes, labels, saes, [1], top=8, n_boot=100, seed=0)
    assert _verdicts(res)[1] == "does not hold"


def test_engine_agreement_fails_on_a_value_that_is_not_finite():
    from lm_eval_telltale.tools.signals.analysis import engine_agreement

    p = {"position": [5, 6, 7], "norm": np.array([[1.0], [2.0], [3.0]])}
    ok = engine_agreement([{"position": [5, 6, 7], "norm": np.array([[1.0], [2.0], [3.0]])}], [p], [4], None, "float32")
    assert ok["ok"] and ok["rows"] == 3
    bad = engine_agreement([{"position": [5, 6, 7], "norm": np.array([[1.0], [np.nan], [3.0]])}], [p], [4], None)
    assert not bad["ok"] and not bad["finite"]


# -- the command ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra,msg", [
    (["--sae", "NOSAE"], "--sae"),
    (["--sae", "BADSAE"], "reads 16 dimensions, the model's hidden size is 128"),
    (["--bootstrap", "-1"], "--bootstrap must be >= 0"),
    (["--sae-l1", "-1"], "--sae-l1 must be >= 0"),
    (["--run", "NORUN"], "--run"),
    (["--sae", "BADSAE", "--train-sae"], "not allowed with argument"),
    (["--thinking", "off"], "--thinking off: the study contrasts thinking with answering tokens"),
])
def test_cli_checks_before_generating(tmp_path, monkeypatch, capsys, extra, msg):
    from lm_eval_telltale.tools.signals import main

    no_generation(monkeypatch)
    bad = tmp_path / "BADSAE" / "layers.3"
    save_saelens(_random_sae(layer=3), bad)
    extra = [str(tmp_path / x) if x in ("NOSAE", "NORUN") else str(tmp_path / "BADSAE") if x == "BADSAE" else x
             for x in extra]
    with pytest.raises(SystemExit) as e:
        main(["--model", str(SHIPPED), "--tasks", "telltale_arith_l1", "--out", str(tmp_path / "o"), *extra])
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


@pytest.mark.e2e
def test_cli_end_to_end_on_the_shipped_model(tmp_path):
    """Generation through vLLM (float32), the pass, trained SAEs, the report; then the same from the
    saved collection and SAEs, with the same numbers."""
    from lm_eval_telltale.tools.signals import main

    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    out = tmp_path / "sig"
    p = subprocess.run([str(BIN / "telltale"), "signals", "--model", str(SHIPPED), "--tasks", "telltale_arith_l2",
                        "--limit", "5", "--dtype", "float32", "--bootstrap", "50", "--kv-cache-memory-bytes",
                        str(KV_BYTES), "--engine-args", '{"enforce_eager": true}', "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / "signals.json").read_text())
    assert res["meta"]["modes"] == ["thinking", "non-thinking"] and res["counts"]["generations"] == 10
    assert res["counts"]["thinking"] > 50 and res["counts"]["answering"] > 50
    ag = res["agreement"]
    assert ag["engine_dtype"] == "float32" and ag["rows"] == res["counts"]["rows"] and ag["max_rel_diff"] <= 1e-4
    claims = [v["claim"] for v in res["verdicts"]]
    assert len(claims) == 4 and all(v["verdict"] in ("holds", "does not hold") for v in res["verdicts"])
    assert res["verdicts"][0]["verdict"] == "holds"  # the bound
    for l in map(str, range(8)):
        c = res["per_layer"][l]["correlation"]
        assert set(c) == {"norm", "hidden_entropy", "lens_entropy", "attn_entropy", "output_entropy"}
        assert -1 <= c["norm"]["spearman"] <= 1 and c["norm"]["spearman_ci"][0] <= c["norm"]["spearman_ci"][1]
    md = (out / "signals.md").read_text()
    assert "## Verdicts" in md and "telltale signals --model" in md
    toks = np.load(out / "tokens.npz")
    assert len(toks["norm_7"]) == res["counts"]["rows"] and len(toks["feature_score_7"]) == res["counts"]["rows"]
    for png in ("signals_corr.png", "signals_think.png"):
        assert (out / png).stat().st_size > 5000
    again = tmp_path / "again"
    assert main(["--collection", str(out / "collection.npz"), "--sae", str(out / "sae"), "--bootstrap", "50",
                 "--out", str(again)]) == 0
    res2 = json.loads((again / "signals.json").read_text())
    for l in map(str, range(8)):
        assert res2["per_layer"][l]["correlation"] == res["per_layer"][l]["correlation"]
        assert res2["per_layer"][l]["sae"]["features"] == res["per_layer"][l]["sae"]["features"]
    # the features chosen on half the generations, the statistics over the other half: 5 of 10 is too few
    held = tmp_path / "held"
    assert main(["--collection", str(out / "collection.npz"), "--sae", str(out / "sae"), "--bootstrap", "20",
                 "--held-out", "--no-attention", "--layers", "6-7", "--out", str(held)]) == 0
    res3 = json.loads((held / "signals.json").read_text())
    assert res3["counts"]["evaluated_generations"] == 5 and "attn_entropy" not in res3["signals"]
    assert [v["verdict"] for v in res3["verdicts"]][1:3] == ["not measured", "not measured"]


def test_think_labels_follow_the_scorers_tags(monkeypatch):
    """One rule for the think block: the view's and the study's labels read the scorer's tags
    (``TELLTALE_THINK_START`` / ``TELLTALE_THINK_END``), not a second copy of them."""
    from lm_eval_telltale.tools.view import prompt_opens_block, think_flags

    pieces = ["<reason>", "a", "b", "</reason>", "c"]
    assert think_flags(pieces, False) == [0, 0, 0, 0, 0]
    monkeypatch.setenv("TELLTALE_THINK_START", "<reason>")
    monkeypatch.setenv("TELLTALE_THINK_END", "</reason>")
    assert think_flags(pieces, False) == [2, 1, 1, 2, 0]
    assert prompt_opens_block("user: hi <reason>") and not prompt_opens_block("<reason> x </reason>")
