"""The figures of the ``telltale`` tools (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .table import Table


def save_figure(fig, path: str | Path) -> Path:
    """Lay out, write (PNG, 120 dpi, parent dirs created) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # legends placed outside the axes included
    plt.close(fig)
    return path


#: methods whose rows form the ablation panel: their Δ (tens of points) would set the scale of the
#: methods' few-point effects
ABLATION_METHODS = ("suppress",)


def plot_deltas(t: Table, path: str | Path) -> Path:
    """Grouped bars: Δ (points) vs the baseline per column (and avg), one bar per non-baseline row,
    with ± the stderr of Δ as error bars. Per model one panel of the methods and, below it, one of
    the suppression ablation (rows of method ``suppress``), each with its own y scale, so that the
    ablation's large Δ does not flatten the methods' small ones."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = []
    for r in t.rows:
        if r.model not in models:
            models.append(r.model)
    cols = [c.name for c in t.columns] + ["avg"]
    panels = []  # (model, what, rows)
    for m in models:
        rows = [r for r in t.rows if r.model == m and not r.is_baseline]
        meth = [r for r in rows if r.method not in ABLATION_METHODS]
        abl = [r for r in rows if r.method in ABLATION_METHODS]
        if meth or not abl:
            panels.append((m, "methods" if abl else "", meth))
        if abl:
            panels.append((m, "suppression ablation", abl))
    nmax = max([len(rows) for _, _, rows in panels] + [1])
    cmap = plt.get_cmap("tab10" if nmax <= 10 else "tab20")
    heights = [max(2.6, 1.2 + 0.2 * max(1, len(rows))) for _, _, rows in panels]
    fig, axes = plt.subplots(len(panels), 1, squeeze=False, gridspec_kw={"height_ratios": heights},
                             figsize=(min(14.0, max(5.0, 0.22 * nmax * len(cols) + 2.5)) + 4.5, sum(heights)))
    for ax, (m, what, rows) in zip(axes[:, 0], panels):
        width = 0.8 / max(1, len(rows))
        for i, r in enumerate(rows):
            cells = [r.cells.get(c) for c in cols[:-1]] + [r.avg]
            ys = [c.delta if c is not None else None for c in cells]
            es = [c.delta_stderr if c is not None else None for c in cells]
            xs = [k + (i - (len(rows) - 1) / 2) * width for k in range(len(cols))]
            color = cmap(i % cmap.N)
            ax.bar(xs, [y if y is not None else 0.0 for y in ys], width=width * 0.92, color=color,
                   label=textwrap.fill(r.label, 50, subsequent_indent="  "))
            # a dot on every value, so a Δ of exactly 0 is still visible
            ax.scatter([x for x, y in zip(xs, ys) if y is not None], [y for y in ys if y is not None],
                       s=10, color=color, zorder=3, edgecolors="black", linewidths=0.3)
            err = [(x, y, e) for x, y, e in zip(xs, ys, es) if y is not None and e is not None]
            if err:
                ax.errorbar([x for x, _, _ in err], [y for _, y, _ in err], yerr=[e for _, _, e in err], fmt="none",
                            ecolor="black", elinewidth=0.7, capsize=1.5, capthick=0.7, zorder=4)
        ax.axhline(0.0, color="black", linewidth=0.8)
        for k in range(1, len(cols)):
            ax.axvline(k - 0.5, color="#dddddd", linewidth=0.6)
        ax.set_xticks(range(len(cols)))
        ax.set_xticklabels([c.replace("telltale_", "") for c in cols], rotation=20, ha="right", fontsize=8)
        ax.set_xlim(-0.5, len(cols) - 0.5)
        lo, hi = ax.get_ylim()
        if hi - lo < 2.0:  # all Δ ≈ 0: keep a readable ±1 point scale
            ax.set_ylim(min(lo, -1.0), max(hi, 1.0))
        ax.set_ylabel(f"Δ vs {t.baseline} (points)", fontsize=9)
        title = f"{m}: {what}" if what else m
        if not rows:
            title += " (no rows to compare)"
        elif what == "suppression ablation":
            title += " (own y scale)"
        ax.set_title(title + ("; error bars ± stderr of Δ" if rows else ""), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        if rows:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return save_figure(fig, path)


def lrs_cost_rows(t: Table) -> list:
    """The rows :func:`plot_lrs_cost` draws: every LRS row that was returned and knows its tokens per
    prompt, and the baseline rows of the same models."""
    lrs = [r for r in t.rows if r.method == "lrs" and r.returned and r.extras.get("cand_tokens") is not None]
    models = {r.model for r in lrs}
    return [r for r in t.rows if r.is_baseline and r.model in models] + lrs


def plot_lrs_cost(t: Table, path: str | Path, column: str) -> Path:
    """Accuracy (``column``, ± stderr) against tokens generated per prompt (all candidates) for full
    and online LRS, with the baseline's single answer for reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = lrs_cost_rows(t)
    fig, ax = plt.subplots(figsize=(8.0, 4.0 + 0.25 * len(rows)))
    cmap = plt.get_cmap("tab10")
    for i, r in enumerate(rows):
        c = r.cells.get(column)
        x = r.extras.get("cand_tokens") if not r.is_baseline else r.extras.get("gen_tokens")
        if c is None or c.value is None or x is None:
            continue
        ax.errorbar([x], [c.value], yerr=[c.stderr] if c.stderr is not None else None, fmt="s" if r.is_baseline else "o",
                    color=cmap(i % cmap.N), capsize=3, label=f"{r.model}: {r.label}")
    ax.set_xlabel("generated tokens per prompt (all candidates)", fontsize=9)
    ax.set_ylabel(f"{column} (× 100, ± stderr)", fontsize=9)
    ax.set_title("LRS: accuracy against tokens, full and online", fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(x=0.15)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.16), frameon=False)
    return save_figure(fig, path)


# -- telltale profile ------------------------------------------------------------------------


COLORS = {"thinking": "#d62728", "non-thinking": "#1f77b4", "default": "#2ca02c"}


def plot_layers(prof: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = prof["meta"]["layers"]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for m, st in prof["modes"].items():
        ls = [l for l in layers if st["layers"][str(l)].get("count")]
        if not ls:
            continue
        def get(k, st=st, ls=ls):
            return [st["layers"][str(l)]["quantiles"][k] for l in ls]

        mean = [st["layers"][str(l)]["mean"] for l in ls]
        c = COLORS.get(m, None)
        ax.fill_between(ls, get("p10"), get("p90"), color=c, alpha=0.15, linewidth=0)
        ax.fill_between(ls, get("p25"), get("p75"), color=c, alpha=0.3, linewidth=0)
        ax.plot(ls, mean, color=c, marker="o", markersize=3, label=f"{m} (mean; bands p25–p75, p10–p90; "
                                                                   f"{st['n_tokens']} tokens)")
    ax.set_xlabel("layer")
    ax.set_ylabel("‖h‖₂ of generated tokens")
    ax.set_title(f"{Path(str(prof['meta']['model'])).name}: residual-stream norm per layer", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_trace(prof: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = prof["trace"]
    modes = list(tr["modes"])
    fig, axes = plt.subplots(len(modes), 1, figsize=(9, 2.8 * max(1, len(modes))), squeeze=False, sharex=True)
    for ax, m in zip(axes[:, 0], modes):
        d = tr["modes"][m]
        n = np.asarray(d["norm"], dtype=float)
        tau = np.asarray([np.nan if v is None else v for v in d["tau"]], dtype=float)
        x = np.arange(len(n))
        ax.plot(x, n, color=COLORS.get(m, "k"), linewidth=1.0, label="‖h‖₂")
        ax.plot(x, tau, color="black", linestyle="--", linewidth=1.0, label="adaptive τ (Q3 + k·IQR)")
        above = np.isfinite(tau) & (n > tau)
        ax.scatter(x[above], n[above], s=10, color="orange", zorder=3, label="n > τ")
        if d.get("think_end_index") is not None:
            ax.axvline(d["think_end_index"], color="gray", linestyle=":", label="</think>")
        ax.set_ylabel("norm")
        ax.set_title(f"{m}: {tr['task']} doc {tr['doc_id']}, layer {tr['layer']}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best", framealpha=0.85)
    axes[-1, 0].set_xlabel("generated token")
    return save_figure(fig, path)
