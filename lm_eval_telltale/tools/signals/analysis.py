"""From a collection and its teacher-forced pass to the numbers of ``telltale signals``: token labels,
the SAE's reasoning-feature score, correlations, thinking-vs-answering contrasts, the bound check,
the engines' norm agreement and one verdict per claim."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..view import prompt_opens_block, think_flags, token_pieces
from . import stats
from .measures import ENTROPIES, SIGNALS
from .sae import SAE, bound_ratio, reasoning_features

#: label codes of a row (the forward of one generated token)
ANSWER, THINK, TAG = 0, 1, 2
LABELS = {ANSWER: "answering", THINK: "thinking", TAG: "think tag"}
#: a bound ratio above 1 by more than float32 rounding is a violation
BOUND_TOL = 1e-5
#: the engines' norms must agree to this relative difference (the cross-engine parity tests' bar)
AGREE_TOL = 1e-4
ENC_CHUNK = 4096


def row_labels(tok, prompt_ids: list[int], token_ids: list[int], n_rows: int) -> np.ndarray:
    """Thinking / answering / tag label of each row: row g is the forward of generated token g, inside
    the think block (``tools.view.think_flags``, the prompt may open it) or outside."""
    if n_rows == 0:
        return np.zeros(0, dtype=np.int8)
    prompt = tok.decode(prompt_ids, skip_special_tokens=False)
    flags = think_flags(token_pieces(tok, list(token_ids)), prompt_opens_block(prompt))
    return np.asarray(flags[:n_rows], dtype=np.int8)


def late_layers(num_layers: int, layers: list[int]) -> list[int]:
    """The analysed layers in the last quarter of the stack (all analysed layers if none is)."""
    late = [l for l in layers if l >= num_layers - max(1, num_layers // 4)]
    return late or list(layers)


def feature_scores(sae: SAE, h: torch.Tensor, think: np.ndarray, answer: np.ndarray, top: int
                   ) -> tuple[np.ndarray, np.ndarray, float, dict]:
    """(score per row, the reasoning features, the largest bound ratio, activation facts) for one
    layer: the mean activation of the ``top`` reasoning features."""
    acts, ratio = [], 0.0
    for i in range(0, h.shape[0], ENC_CHUNK):
        f, x = sae.encode(h[i:i + ENC_CHUNK])
        ratio = max(ratio, bound_ratio(f, x, sae.W_enc, sae.b_enc))
        acts.append(f)
    f = torch.cat(acts) if acts else torch.zeros(0, sae.d_sae)
    t_mask, a_mask = torch.from_numpy(think), torch.from_numpy(answer)
    feats = reasoning_features(f[t_mask].mean(0), f[a_mask].mean(0), top)
    score = f[:, feats].mean(1) if len(feats) else torch.zeros(f.shape[0])
    facts = {"l0": float((f > 0).float().sum(-1).mean()) if f.numel() else 0.0, "n_features": len(feats)}
    return score.double().numpy(), feats.numpy(), ratio, facts


def engine_dtype(meta: dict) -> str | None:
    """The dtype the generating engine computed in (recorded by ``profile.collect``), if known."""
    st = meta.get("engine_settings") or {}
    v = st.get("model_dtype") or st.get("dtype")
    return None if v in (None, "auto") else str(v).removeprefix("torch.")


def engine_agreement(samples: list[dict], passes: list[dict], layers: list[int], trace_layers: list[int] | None,
                     dtype: str | None = None) -> dict[str, Any] | None:
    """The largest relative difference between the engine's recorded norms (a trace over
    ``trace_layers``, by default the analysed layers) and the teacher-forced ones, over the rows and
    layers both have."""
    trace_layers = list(layers if trace_layers is None else trace_layers)
    cols = [(i, layers.index(l)) for i, l in enumerate(trace_layers) if l in layers]
    err, n = 0.0, 0
    for s, p in zip(samples, passes):
        norm = np.asarray(s.get("norm", np.zeros((0, 0))))
        if not norm.size or not s.get("position") or not cols or norm.shape[-1] != len(trace_layers):
            continue
        where = {q: k for k, q in enumerate(p["position"])}
        ks = [(i, where[q]) for i, q in enumerate(s["position"]) if q in where]
        if not ks:
            continue
        a = norm[np.ix_([i for i, _ in ks], [c for c, _ in cols])]
        b = p["norm"][np.ix_([k for _, k in ks], [c for _, c in cols])]
        err = max(err, float(np.max(np.abs(a - b) / np.abs(b))))
        n += len(ks)
    return {"rows": n, "layers": [trace_layers[c] for c, _ in cols], "max_rel_diff": err, "ok": err <= AGREE_TOL,
            "engine_dtype": dtype} if n else None


def analyze(meta: dict, samples: list[dict], passes: list[dict], labels: list[np.ndarray],
            saes: dict[int, SAE], layers: list[int], *, top: int, n_boot: int, seed: int) -> dict[str, Any]:
    """Every number of the report (JSON-ready) and, under ``"tokens"``, the per-row arrays."""
    lab = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int8)
    group = np.concatenate([np.full(len(p["position"]), i) for i, p in enumerate(passes)]) if passes else np.zeros(0)
    rel = np.concatenate([np.arange(len(p["position"])) / max(1, len(p["position"])) for p in passes]) \
        if passes else np.zeros(0)
    think, answer = lab == THINK, lab == ANSWER
    names = [s for s in SIGNALS if passes and passes[0].get(s) is not None]
    if not int(think.sum()) or not int(answer.sum()):
        raise ValueError(f"the generations hold {int(think.sum())} thinking and {int(answer.sum())} answering tokens: "
                         "the reasoning features are chosen by contrasting the two, so both are needed (a model "
                         "with <think> … </think>, and --thinking auto/both or on)")
    draws = stats.cluster_draws(group, n_boot, seed)
    tokens: dict[str, np.ndarray] = {"group": group, "label": lab, "rel_position": rel}
    per_layer: dict[str, Any] = {}
    for j, l in enumerate(layers):
        sig = {s: np.concatenate([p[s] if p[s].ndim == 1 else p[s][:, j] for p in passes]) for s in names}
        for s in names:
            tokens[f"{s}_{l}"] = sig[s]
        entry: dict[str, Any] = {"contrast": {s: stats.contrast(sig[s], think, answer, draws) for s in names},
                                 "position_spearman": {s: float(stats.spearman_rows(sig[s][None], rel)[0])
                                                       for s in names}}
        sae = saes.get(l)
        if sae is not None:
            h = torch.cat([p["h"][j] for p in passes])
            score, feats, ratio, facts = feature_scores(sae, h, think, answer, top)
            tokens[f"feature_score_{l}"] = score
            corr = stats.correlations(np.stack([sig[s] for s in names]), score, draws)
            entry.update({
                "sae": {"source": sae.source, "d_sae": sae.d_sae, "features": feats.tolist(), **facts,
                        "train": {k: sae.info[k] for k in ("trained_on_tokens", "fvu", "l0", "dead_fraction")
                                  if k in sae.info}},
                "bound_ratio": ratio,
                "correlation": {s: {"spearman": float(corr["spearman"][i]), "spearman_ci": list(corr["spearman_ci"][i]),
                                    "pearson": float(corr["pearson"][i]), "pearson_ci": list(corr["pearson_ci"][i])}
                                for i, s in enumerate(names)},
            })
            entry["contrast"]["feature_score"] = stats.contrast(score, think, answer, draws)
        per_layer[str(l)] = entry
    res = {"meta": meta, "signals": names, "layers": layers,
           "late_layers": late_layers(int(meta["num_layers"]), layers),
           "counts": {"generations": len(passes), "rows": int(lab.size),
                      **{LABELS[k]: int((lab == k).sum()) for k in LABELS}},
           "per_layer": per_layer, "agreement": engine_agreement(samples, passes, layers, meta.get("trace_layers"),
                                                                 engine_dtype(meta)),
           "settings": {"top_features": top, "bootstrap": n_boot, "seed": seed, "ci": stats.CI}}
    res["verdicts"] = verdicts(res)
    res["tokens"] = tokens
    return res


def _fmt_ci(ci) -> str:
    return "n/a" if not ci or ci[0] is None else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"


def verdicts(res: dict) -> list[dict[str, str]]:
    """One line per claim: ``{"claim", "verdict" (holds / does not hold / not measured), "evidence"}``."""
    out = []
    pl, late = res["per_layer"], [str(l) for l in res["late_layers"]]
    with_sae = [l for l in map(str, res["layers"]) if "bound_ratio" in pl[l]]
    if with_sae:
        worst = max(with_sae, key=lambda l: pl[l]["bound_ratio"])
        r = pl[worst]["bound_ratio"]
        out.append({"claim": "‖h‖ bounds every SAE feature: |f_i| ≤ ‖w_enc,i‖·‖x‖ + |b_i|",
                    "verdict": "holds" if r <= 1 + BOUND_TOL else "does not hold",
                    "evidence": f"largest ratio {r:.4f} (layer {worst}), over {len(with_sae)} layer(s)"})
    ents = [s for s in ENTROPIES if s in res["signals"]]
    rows = [l for l in late if "correlation" in pl[l]]
    if rows and "norm" in res["signals"]:
        good = []
        for l in rows:
            c = pl[l]["correlation"]
            lo = c["norm"]["spearman_ci"][0]
            if lo is not None and lo > 0 and all(c["norm"]["spearman"] > c[s]["spearman"] for s in ents):
                good.append(l)
        l0 = rows[-1]
        c = pl[l0]["correlation"]
        best = max(ents, key=lambda s: c[s]["spearman"]) if ents else None
        out.append({"claim": "the norm tracks the SAE reasoning-feature score more closely than every entropy signal "
                             "(late layers, Spearman)",
                    "verdict": "holds" if len(good) * 2 > len(rows) else "does not hold",
                    "evidence": f"at {len(good)}/{len(rows)} late layer(s); layer {l0}: norm ρ = "
                                f"{c['norm']['spearman']:+.2f} {_fmt_ci(c['norm']['spearman_ci'])}"
                                + (f", best entropy ({best}) ρ = {c[best]['spearman']:+.2f}" if best else "")})
    if "norm" in res["signals"]:
        good = [l for l in late if (pl[l]["contrast"]["norm"]["d_ci"][0] or -1) > 0]
        l0 = late[-1]
        d = pl[l0]["contrast"]["norm"]
        out.append({"claim": "the norm is higher while the model thinks than while it answers (late layers)",
                    "verdict": "holds" if len(good) * 2 > len(late) else "does not hold",
                    "evidence": f"Cohen's d > 0 (interval above 0) at {len(good)}/{len(late)} late layer(s); layer "
                                f"{l0}: d = {d['d']:+.2f} {_fmt_ci(d['d_ci'])}, AUC {d['auc']:.2f}"})
    ag = res.get("agreement")
    if ag is not None:
        dt = ag.get("engine_dtype")
        out.append({"claim": f"the engine's norm trace equals the teacher-forced pass's (relative ≤ {AGREE_TOL:g})",
                    "verdict": ("holds" if ag["ok"] else "does not hold") if dt in (None, "float32")
                    else "not measured",
                    "evidence": f"largest relative difference {ag['max_rel_diff']:.2e} over {ag['rows']} rows"
                    + ("" if dt in (None, "float32") else f"; the engine computed in {dt} and the pass in float32: "
                       "rerun with --dtype float32 to compare")})
    return out
