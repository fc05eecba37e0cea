"""Matplotlib figures (Agg backend, no display needed) for the outlier analysis.

Each function takes plain data, returns the ``matplotlib.figure.Figure`` and, with ``path``,
also saves it as PNG. Per-model results are dicts with keys ``name``, ``n_params``, ``ppl``
(optional), ``layer_share``, ``position_share``, ``median_magnitude`` (optional), as produced
by :func:`model_record`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .outliers import OutlierAnalysis, OutlierSummary
from .paper import PAPER_TABLE4

__all__ = ["model_record", "plot_emergence", "plot_magnitude", "plot_heatmap", "plot_zeroing"]

_PAPER_STYLE = dict(color="0.55", marker="s", linestyle="--", linewidth=1, markersize=5)


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def model_record(name: str, n_params: float, summary: OutlierSummary, ppl: float | None = None) -> dict:
    """The per-model dict the emergence plots take."""
    return {
        "name": name,
        "n_params": float(n_params),
        "ppl": None if ppl is None else float(ppl),
        "layer_share": summary.layer_share,
        "position_share": summary.position_share,
        "median_magnitude": summary.median_magnitude,
        "max_magnitude": summary.max_magnitude,
        "n_outlier_features": summary.n_outlier_features,
    }


def _save(fig, path):
    if path is not None:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def plot_emergence(records: Sequence[dict], *, paper: bool = True, text_name: str = "our text",
                   title: str | None = None, path: str | None = None):
    """Figure 3 analogue: share of layers and of sequence positions affected by outlier
    features, (a) against parameter count and (b) against perplexity. The paper's Table 4
    values are drawn beside ours, labelled "paper (reported)"; the paper's perplexity is C4,
    ours is on ``text_name``."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, xkey, pkey, xlabel in (
        (axes[0], "n_params", "n_params", "parameters"),
        (axes[1], "ppl", "c4_ppl", f"perplexity (ours: {text_name}; paper: C4)"),
    ):
        if paper:
            pr = sorted(PAPER_TABLE4, key=lambda r: r[pkey])
            x = [r[pkey] for r in pr]
            ax.plot(x, [100 * r["layer_share"] for r in pr], label="paper (reported): % layers", **_PAPER_STYLE)
            ax.plot(x, [100 * r["position_share"] for r in pr], label="paper (reported): % positions",
                    **{**_PAPER_STYLE, "marker": "^", "linestyle": ":"})
        ours = sorted((r for r in records if r.get(xkey) is not None), key=lambda r: r[xkey])
        if ours:
            x = [r[xkey] for r in ours]
            # markers only: our models come from different families, a line would suggest a trend
            ax.plot(x, [100 * r["layer_share"] for r in ours], "o", color="C0", markersize=8, label="ours: % layers")
            ax.plot(x, [100 * r["position_share"] for r in ours], "^", color="C1", markersize=8,
                    label="ours: % positions")
            for r in ours:
                ax.annotate(r["name"], (r[xkey], 100 * r["layer_share"]), textcoords="offset points",
                            xytext=(4, 6), fontsize=8)
        ax.set_xscale("log")
        if xkey == "ppl":
            ax.invert_xaxis()  # lower perplexity to the right, as in the paper
            from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

            # perplexities span less than a decade or two: ticks at 1, 2 and 5 x 10^k, so that the
            # reversed axis shows several labelled values rather than a single power of ten
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel("% affected by outlier features")
        ax.set_ylim(-3, 112)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    axes[0].set_title("(a) by model size")
    axes[1].set_title("(b) by perplexity")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_magnitude(records: Sequence[dict], *, paper: bool = True, title: str | None = None,
                   path: str | None = None):
    """Figure 4a analogue: median outlier magnitude against parameter count. Models without
    outlier features are drawn at 0 with a hollow marker."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    if paper:
        pr = sorted(PAPER_TABLE4, key=lambda r: r["n_params"])
        ax.plot([r["n_params"] for r in pr], [r["median_magnitude"] for r in pr],
                label="paper (reported): |median| of most common outlier", **_PAPER_STYLE)
    ours = sorted(records, key=lambda r: r["n_params"])
    for r in ours:
        m = r.get("median_magnitude")
        has = m is not None and np.isfinite(m)
        ax.plot([r["n_params"]], [m if has else 0.0], "o", color="C0",
                markerfacecolor="C0" if has else "none", markersize=8)
        ax.annotate(r["name"] + ("" if has else " (no outliers)"), (r["n_params"], m if has else 0.0),
                    textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax.plot([], [], "o", color="C0", label="ours: median |outlier|")
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("median outlier magnitude")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1)
    ax.set_title(title or "Median outlier magnitude (Figure 4a analogue)")
    fig.tight_layout()
    return _save(fig, path)


def plot_heatmap(analysis: OutlierAnalysis, *, title: str = "", max_features: int | None = None,
                 path: str | None = None):
    """Largest ``|x|`` per layer (rows) and feature (columns); outlier features are marked
    with ticks on top. ``max_features`` keeps only the features with the largest magnitudes
    (plus all outlier features) for wide models."""
    plt = _plt()
    m = analysis.max_abs
    cols = np.arange(m.shape[1])
    if max_features is not None and m.shape[1] > max_features:
        order = np.argsort(-m.max(axis=0), kind="stable")[:max_features]
        cols = np.union1d(order, np.flatnonzero(analysis.is_outlier))
        m = m[:, cols]
    fig, ax = plt.subplots(figsize=(min(14, 4 + 0.05 * m.shape[1] + 4), 0.3 * m.shape[0] + 2.5))
    norm = None
    pos = m[m > 0]
    if pos.size and pos.max() > 20 * np.median(pos):
        # a few huge values would flatten a linear colour scale to black
        from matplotlib.colors import LogNorm

        norm = LogNorm(vmin=max(float(pos.min()), 1e-3), vmax=float(pos.max()))
    im = ax.imshow(m, aspect="auto", cmap="magma", interpolation="nearest", norm=norm)
    fig.colorbar(im, ax=ax, label="max |x|")
    thr = analysis.summary.threshold
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(analysis.layers)))
    ax.set_yticklabels(analysis.layers, fontsize=7)
    ax.set_xlabel("feature dimension" + (" (subset)" if cols.size != analysis.max_abs.shape[1] else ""))
    outl = [i for i, c in enumerate(cols) if analysis.is_outlier[c]]
    if cols.size <= 80:
        ax.set_xticks(range(cols.size))
        ax.set_xticklabels([str(c) for c in cols], fontsize=6, rotation=90)
    else:
        # tick labels are feature indices, also when only a subset of columns is shown
        ticks = np.unique(np.linspace(0, cols.size - 1, 12).astype(int))
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(cols[t]) for t in ticks], fontsize=7)
    if outl:
        # mark outlier features above the top row, leaving the cells visible
        ax.scatter(outl, [-0.9] * len(outl), marker="v", s=18, color="tab:cyan", clip_on=False,
                   label="outlier feature")
        ax.set_ylim(len(analysis.layers) - 0.5, -1.2)
    ax.set_title((title + "\n" if title else "")
                 + f"threshold {thr:g}; triangles: outlier features ({len(np.flatnonzero(analysis.is_outlier))})",
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_zeroing(result: Any, *, title: str = "", path: str | None = None):
    """Bars of mean top-1 attention probability and perplexity: baseline, outliers zeroed,
    random features zeroed (mean over seeds, with min-max range)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    labels = ["baseline", f"outliers zeroed\n({len(result.outliers.features)} dims)",
              f"random zeroed\n({len(result.outliers.features)} dims, {len(result.random)} seeds)"]
    for ax, key, ylab in ((axes[0], "top1", "mean top-1 attention probability"),
                          (axes[1], "ppl", "perplexity")):
        vals = [getattr(result.baseline, key), getattr(result.outliers, key)]
        rnd = np.array([getattr(r, key) for r in result.random], dtype=float)
        rmean = float(np.nanmean(rnd)) if rnd.size and np.isfinite(rnd).any() else float("nan")
        vals.append(rmean)
        err = None
        if rnd.size and np.isfinite(rnd).any():
            err = np.array([[0, 0, rmean - np.nanmin(rnd)], [0, 0, np.nanmax(rnd) - rmean]])
        ax.bar(range(3), vals, yerr=err, color=["C0", "C3", "C7"], capsize=4)
        ax.set_xticks(range(3))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel(ylab)
        for i, v in enumerate(vals):
            if np.isfinite(v):
                # above the error bar's cap, not under it
                top = v + (err[1][i] if err is not None and np.isfinite(err[1][i]) else 0.0)
                ax.annotate(f"{v:.3g}", (i, top), ha="center", va="bottom", fontsize=8,
                            textcoords="offset points", xytext=(0, 5 if err is not None and i == 2 else 3))
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title or "Zeroing features before the attention projections")
    fig.tight_layout()
    return _save(fig, path)
