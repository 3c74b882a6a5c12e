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
#: fewer generations than this give no verdict on the statistical claims (a bootstrap over 1–9
#: generations says little about its own spread)
MIN_GENERATIONS = 10
ENC_CHUNK = 4096


def row_labels(tok, prompt_ids: list[int], token_ids: list[int], n_rows: int) -> np.ndarray:
    """Thinking / answering / tag label of each row: row g is the forward of generated token g, inside
    the think block (``tools.view.think_flags``, the prompt may open it) or outside."""
    if n_rows == 0:
        return np.zeros(0, dtype=np.int8)
    prompt = tok.decode(prompt_ids, skip_special_tokens=False)
    flags = think_flags(token_pieces(tok, list(token_ids)), prompt_opens_block(prompt))
    return np.asarray(flags[:n_rows], dtype=np.int8)


def late_layers(num_layers: int, layers: list[int]) -> tuple[list[int], bool]:
    """(the analysed layers in the last quarter of the stack, True) — or (all analysed layers,
    False) when none is there."""
    late = [l for l in layers if l >= num_layers - max(1, num_layers // 4)]
    return (late, True) if late else (list(layers), False)


def feature_scores(sae: SAE, h: torch.Tensor, select: np.ndarray, think: np.ndarray, answer: np.ndarray,
                   top: int) -> tuple[np.ndarray, np.ndarray, float, dict]:
    """(score per row, the reasoning features, the largest bound ratio, facts) for one layer, in two
    streaming passes over row chunks (no rows × features matrix is kept): the features are chosen
    on the ``select`` rows (thinking vs answering means, firing share while thinking); a row's score
    is the mean activation of the chosen features."""
    k = sae.d_sae
    s_t, s_a, fire_t = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64), torch.zeros(k)
    ratio, active = 0.0, 0.0
    t_sel, a_sel = torch.from_numpy(think & select), torch.from_numpy(answer & select)
    for i in range(0, h.shape[0], ENC_CHUNK):
        f, x = sae.encode(h[i:i + ENC_CHUNK])
        ratio = max(ratio, bound_ratio(f, x, sae.W_enc, sae.b_enc))
        t, a = t_sel[i:i + ENC_CHUNK], a_sel[i:i + ENC_CHUNK]
        s_t += f[t].double().sum(0)
        s_a += f[a].double().sum(0)
        fire_t += (f[t] > 0).float().sum(0)
        active += float((f > 0).float().sum())
    n_t, n_a = max(1, int(t_sel.sum())), max(1, int(a_sel.sum()))
    feats = reasoning_features((s_t / n_t).float(), (s_a / n_a).float(), top, think_freq=fire_t / n_t)
    score = torch.cat([sae.encode(h[i:i + ENC_CHUNK])[0][:, feats].mean(1) if len(feats)
                       else torch.zeros(min(ENC_CHUNK, h.shape[0] - i)) for i in range(0, h.shape[0], ENC_CHUNK)])
    score = score.double().numpy() if h.shape[0] else np.zeros(0)
    facts = {"l0": active / max(1, h.shape[0]), "n_features": int(len(feats)),
             "zero_score_share": float((score == 0).mean()) if score.size else None,
             "feature_think_freq": float((fire_t[feats] / n_t).mean()) if len(feats) else None}
    return score, feats.numpy(), ratio, facts


def engine_dtype(meta: dict) -> str | None:
    """The dtype the generating engine computed in (recorded by ``profile.collect``), if known."""
    st = meta.get("engine_settings") or {}
    v = st.get("model_dtype") or st.get("dtype")
    return None if v in (None, "auto") else str(v).removeprefix("torch.")


def engine_agreement(samples: list[dict], passes: list[dict], layers: list[int], trace_layers: list[int] | None,
                     dtype: str | None = None) -> dict[str, Any] | None:
    """The largest relative difference between the engine's recorded norms (a trace over
    ``trace_layers``, by default the analysed layers) and the teacher-forced ones, over the rows and
    layers both have; a value that is not finite on either side fails it."""
    trace_layers = list(layers if trace_layers is None else trace_layers)
    cols = [(i, layers.index(l)) for i, l in enumerate(trace_layers) if l in layers]
    err, n, finite = 0.0, 0, True
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
        with np.errstate(invalid="ignore", divide="ignore"):
            rel = np.abs(a - b) / np.abs(b)
        finite &= bool(np.isfinite(rel).all())
        err = max(err, float(np.nanmax(rel)) if np.isfinite(rel).any() else float("inf"))
        n += len(ks)
    if not n:
        return None
    return {"rows": n, "layers": [trace_layers[c] for c, _ in cols], "max_rel_diff": err, "finite": finite,
            "ok": finite and err <= AGREE_TOL, "engine_dtype": dtype}


def _corr_entry(corr: dict, i: int) -> dict:
    return {"spearman": float(corr["spearman"][i]), "spearman_ci": list(corr["spearman_ci"][i]),
            "pearson": float(corr["pearson"][i]), "pearson_ci": list(corr["pearson_ci"][i])}


def analyze(meta: dict, samples: list[dict], passes: list[dict], labels: list[np.ndarray],
            saes: dict[int, SAE], layers: list[int], *, top: int, n_boot: int, seed: int,
            held_out: bool = False) -> dict[str, Any]:
    """Every number of the report (JSON-ready) and, under ``"tokens"``, the per-row arrays.
    ``held_out``: the reasoning features are chosen on the even-numbered generations and every
    statistic is taken over the odd-numbered ones (else both use all, as the paper does)."""
    lab = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int8)
    group = np.concatenate([np.full(len(p["position"]), i) for i, p in enumerate(passes)]) if passes else np.zeros(0)
    rel = np.concatenate([np.arange(len(p["position"])) / max(1, len(p["position"])) for p in passes]) \
        if passes else np.zeros(0)
    think, answer = lab == THINK, lab == ANSWER
    select = (group % 2 == 0) if held_out else np.ones(lab.size, dtype=bool)
    ev = (group % 2 == 1) if held_out else np.ones(lab.size, dtype=bool)
    names = [s for s in SIGNALS if passes and passes[0].get(s) is not None]
    for what, mask in (("", np.ones(lab.size, dtype=bool)), (" of the selection half", select)):
        if not int((think & mask).sum()) or not int((answer & mask).sum()):
            raise ValueError(f"the generations{what} hold {int((think & mask).sum())} thinking and "
                             f"{int((answer & mask).sum())} answering tokens: the reasoning features are chosen by "
                             "contrasting the two, so both are needed (a model with <think> … </think>, and "
                             "--thinking auto/both or on)")
    n_gen = len(np.unique(group[ev]))
    draws = stats.cluster_draws(group[ev], n_boot, seed)
    tokens: dict[str, np.ndarray] = {"group": group, "label": lab, "rel_position": rel, "evaluated": ev}
    per_layer: dict[str, Any] = {}
    for j, l in enumerate(layers):
        sig = {s: np.concatenate([p[s] if p[s].ndim == 1 else p[s][:, j] for p in passes]) for s in names}
        for s in names:
            tokens[f"{s}_{l}"] = sig[s]
        t_ev, a_ev = think[ev], answer[ev]
        entry: dict[str, Any] = {"contrast": {s: stats.contrast(sig[s][ev], t_ev, a_ev, draws) for s in names},
                                 "position_spearman": {s: float(stats.spearman_rows(sig[s][ev][None], rel[ev])[0])
                                                       for s in names}}
        sae = saes.get(l)
        if sae is not None:
            h = torch.cat([p["h"][l] for p in passes])
            score, feats, ratio, facts = feature_scores(sae, h, select, think, answer, top)
            tokens[f"feature_score_{l}"] = score
            corr = stats.correlations(np.stack([sig[s][ev] for s in names]), score[ev], draws)
            entry.update({
                "sae": {"source": sae.source, "d_sae": sae.d_sae, "features": feats.tolist(), **facts,
                        "train": {k: sae.info[k] for k in ("trained_on_tokens", "fvu", "l0", "dead_fraction")
                                  if k in sae.info}},
                "bound_ratio": ratio,
                "correlation": {s: _corr_entry(corr, i) for i, s in enumerate(names)},
            })
            ents = [i for i, s in enumerate(names) if s in ENTROPIES]
            if "norm" in names and ents:
                i_n = names.index("norm")
                point = corr["spearman"][i_n] - np.max(np.abs(corr["spearman"][ents]))
                boot = corr["spearman_boot"][:, i_n] - np.max(np.abs(corr["spearman_boot"][:, ents]), axis=1)
                entry["norm_margin"] = {"spearman": float(point), "spearman_ci": stats.interval(boot)}
            entry["contrast"]["feature_score"] = stats.contrast(score[ev], t_ev, a_ev, draws)
        per_layer[str(l)] = entry
    late, in_quarter = late_layers(int(meta["num_layers"]), layers)
    res = {"meta": meta, "signals": names, "layers": layers, "late_layers": late, "late_in_last_quarter": in_quarter,
           "counts": {"generations": len(passes), "rows": int(lab.size), "evaluated_generations": n_gen,
                      **{LABELS[k]: int((lab == k).sum()) for k in LABELS}},
           "per_layer": per_layer, "agreement": engine_agreement(samples, passes, layers, meta.get("trace_layers"),
                                                                 engine_dtype(meta)),
           "settings": {"top_features": top, "bootstrap": n_boot, "seed": seed, "ci": stats.CI,
                        "held_out": held_out}}
    res["verdicts"] = verdicts(res)
    res["tokens"] = tokens
    return res


def _fmt_ci(ci) -> str:
    return "n/a" if not ci or ci[0] is None else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"


def _lower(ci) -> float:
    return -np.inf if not ci or ci[0] is None or not np.isfinite(ci[0]) else ci[0]


def verdicts(res: dict) -> list[dict[str, str]]:
    """One line per claim: ``{"claim", "verdict" (holds / does not hold / not measured), "evidence"}``."""
    out = []
    pl = res["per_layer"]
    late = [str(l) for l in res["late_layers"]]
    where = (f"late layers {res['late_layers']}" if res.get("late_in_last_quarter", True)
             else f"analysed layers {res['late_layers']} (none in the last quarter of the stack)")
    n_gen = res["counts"].get("evaluated_generations", res["counts"].get("generations", 0))
    n_boot = res.get("settings", {}).get("bootstrap", 1)
    no_stats = ("no intervals (--bootstrap 0)" if not n_boot else
                f"{n_gen} generation(s); the intervals need ≥ {MIN_GENERATIONS}" if n_gen < MIN_GENERATIONS else None)
    with_sae = [l for l in map(str, res["layers"]) if "bound_ratio" in pl[l]]
    if with_sae:
        worst = max(with_sae, key=lambda l: pl[l]["bound_ratio"])
        r = pl[worst]["bound_ratio"]
        out.append({"claim": "each SAE feature is bounded by its input's norm: |f_i| ≤ ‖w_enc,i‖·‖x‖ + |b_i| "
                             "(x = h, or h − b_dec where the SAE subtracts it)",
                    "verdict": "holds" if r <= 1 + BOUND_TOL else "does not hold",
                    "evidence": f"largest ratio {r:.4f} (layer {worst}), over {len(with_sae)} layer(s)"})
    ents = [s for s in ENTROPIES if s in res["signals"]]
    if "norm" in res["signals"] and ents:
        claim = ("the norm tracks the SAE reasoning-feature score more closely than every entropy signal does "
                 "(Spearman, entropies in absolute value, paired bootstrap)")
        rows = [l for l in late if "norm_margin" in pl[l]]
        if not rows:
            out.append({"claim": claim, "verdict": "not measured", "evidence": f"no SAE at the {where}"})
        elif no_stats:
            out.append({"claim": claim, "verdict": "not measured", "evidence": no_stats})
        else:
            good = [l for l in rows if _lower(pl[l]["norm_margin"]["spearman_ci"]) > 0]
            l0 = rows[-1]
            c = pl[l0]["correlation"]
            best = max(ents, key=lambda s: abs(c[s]["spearman"]))
            m = pl[l0]["norm_margin"]
            out.append({"claim": claim, "verdict": "holds" if len(good) * 2 > len(rows) else "does not hold",
                        "evidence": f"ρ_norm − max |ρ_entropy| has its interval above 0 at {len(good)}/{len(rows)} of "
                                    f"the {where}; layer {l0}: norm ρ = {c['norm']['spearman']:+.2f} "
                                    f"{_fmt_ci(c['norm']['spearman_ci'])}, strongest entropy ({best}) ρ = "
                                    f"{c[best]['spearman']:+.2f}, margin {m['spearman']:+.2f} {_fmt_ci(m['spearman_ci'])}"})
    if "norm" in res["signals"]:
        claim = "the norm is higher while the model thinks than while it answers"
        if no_stats:
            out.append({"claim": claim, "verdict": "not measured", "evidence": no_stats})
        else:
            good = [l for l in late if _lower(pl[l]["contrast"]["norm"]["d_ci"]) > 0]
            l0 = late[-1]
            d = pl[l0]["contrast"]["norm"]
            out.append({"claim": claim, "verdict": "holds" if len(good) * 2 > len(late) else "does not hold",
                        "evidence": f"Cohen's d has its interval above 0 at {len(good)}/{len(late)} of the {where}; "
                                    f"layer {l0}: d = {d['d']:+.2f} {_fmt_ci(d['d_ci'])}, AUC {d['auc']:.2f}"})
    ag = res.get("agreement")
    if ag is not None:
        dt = ag.get("engine_dtype")
        exact = dt in (None, "float32")
        out.append({"claim": f"the engine's norm trace equals the teacher-forced pass's (relative ≤ {AGREE_TOL:g})",
                    "verdict": ("holds" if ag["ok"] else "does not hold") if exact else "not measured",
                    "evidence": f"largest relative difference {ag['max_rel_diff']:.2e} over {ag['rows']} rows"
                    + ("" if ag.get("finite", True) else "; values that are not finite")
                    + ("" if exact else f"; the engine computed in {dt} and the pass in float32: rerun with "
                       "--dtype float32 to compare")})
    return out
