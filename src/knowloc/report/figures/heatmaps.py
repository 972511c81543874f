"""Figures 1, 7, 10: layer × neuron heatmaps of last-position activations, as is and with the
knowledge synapses suppressed or enhanced."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ...errors import DataError
from ...pipeline.attention import AttentionResult
from ...store import RunStore
from .common import Files, figure_files, method_label, need_columns, ordered, save_figure

CONDITION_ORDER = ("none", "suppress", "enhance")
CONDITION_LABELS = {
    "none": "no manipulation",
    "suppress": "knowledge synapses suppressed (× 0)",
    "enhance": "knowledge synapses enhanced (× 2)",
}

#: Heatmap figures and the conditions each shows.
HEATMAP_FIGURES = {"figure1": ("none",),
                   "figure7": ("none", "suppress", "suppress (position 0 excluded)"),
                   "figure10": ("none", "enhance", "enhance (position 0 excluded)")}
HEATMAP_TITLES = {"figure1": "Figure 1", "figure7": "Figure 7: synapses suppressed (× 0)",
                  "figure10": "Figure 10: synapses enhanced (× 2)"}


def activation_heatmaps(
    table: pd.DataFrame,
    path_png: str | os.PathLike[str],
    *,
    title: str | None = None,
    clip_percentile: float = 99.5,
) -> Figure:
    """Layer × neuron heatmaps of last-position neuron activations (Figures 1, 7, 10).

    One panel per (condition, query): conditions as rows (none, suppress, enhance, in that
    order), queries as columns. All activation panels share one symmetric colour scale,
    ±the ``clip_percentile``-th percentile of |activation| (a few huge activations would
    otherwise wash out the rest), so before/after panels compare directly. When the table
    has the condition ``none`` and others, the ``none`` panels are not drawn again; each other
    condition gets a row of difference panels (after − before) on their own symmetric scale
    beneath. The x axis shows the neuron ids of the selected columns. When the table has a
    boolean ``is_kn`` column, those neurons are circled.

    The CSV is the table's rows (``query, condition, layer, neuron, activation`` [+ is_kn]).
    """
    need_columns(table, ["query", "condition", "layer", "neuron", "activation"], "activation_heatmaps")
    if table.empty:
        raise DataError("activation_heatmaps: the table is empty")
    conds = ordered(table["condition"], CONDITION_ORDER)
    queries = [str(q) for q in dict.fromkeys(table["query"].astype(str))]
    cols = ["query", "condition", "layer", "neuron", "activation"]
    if "is_kn" in table.columns:
        cols.append("is_kn")
    data = table[cols].assign(query=table["query"].astype(str),
                              condition=table["condition"].astype(str))
    data = data.sort_values(["query", "condition", "layer", "neuron"],
                            kind="mergesort").reset_index(drop=True)

    def grid(cond: str, q: str) -> pd.DataFrame:
        sub = data[(data["condition"] == cond) & (data["query"] == q)]
        return sub.pivot(index="layer", columns="neuron", values="activation")

    shown = [c for c in conds if c != "none"] if len(conds) > 1 and "none" in conds else conds
    diffs = [c for c in shown if c != "none"] if "none" in conds and len(conds) > 1 else []
    plotted = data[data["condition"].isin(shown)]
    vmax = float(np.nanpercentile(np.abs(plotted["activation"].to_numpy(float)), clip_percentile))
    vmax = vmax if vmax > 0 else 1.0
    delta = {(c, q): grid(c, q) - grid("none", q) for c in diffs for q in queries}
    dvals = np.abs(np.concatenate([d.to_numpy(float).ravel() for d in delta.values()])) \
        if delta else np.zeros(1)
    dmax = float(np.nanpercentile(dvals, clip_percentile)) if np.isfinite(dvals).any() else 0.0
    dmax = dmax if dmax > 0 else 1.0
    rows = [(c, False) for c in shown] + [(c, True) for c in diffs]
    n_r, n_c = len(rows), len(queries)
    fig = Figure(figsize=(max(5.0, 4.6 * n_c), 2.6 * n_r + 0.8), layout="constrained")
    axes = fig.subplots(n_r, n_c, squeeze=False)
    image = dimage = None
    for i, (cond, is_diff) in enumerate(rows):
        for j, q in enumerate(queries):
            ax = axes[i][j]
            g = delta[(cond, q)] if is_diff else grid(cond, q)
            if g.empty:
                ax.set_axis_off()
                continue
            im = ax.imshow(
                g.to_numpy(float), aspect="auto", origin="lower",
                cmap="PuOr_r" if is_diff else "RdBu_r", vmin=-(dmax if is_diff else vmax),
                vmax=dmax if is_diff else vmax, interpolation="nearest",
                extent=(-0.5, g.shape[1] - 0.5, g.index.min() - 0.5, g.index.max() + 0.5),
            )
            if is_diff:
                dimage = im
            else:
                image = im
            sub = data[(data["condition"] == cond) & (data["query"] == q)]
            if "is_kn" in sub.columns:
                kn = sub[sub["is_kn"].astype(bool)]
                pos = {n: k for k, n in enumerate(g.columns)}
                ax.scatter([pos[n] for n in kn["neuron"]], kn["layer"], s=30, facecolors="none",
                           edgecolors="k", linewidths=0.8)
            ticks = _neuron_ticks(g.shape[1])
            ax.set_xticks(ticks)
            ax.set_xticklabels([str(g.columns[k]) for k in ticks], rotation=90, fontsize=6)
            contiguous = g.shape[1] == g.columns.max() + 1 - g.columns.min()
            ax.set_xlabel("neuron" if contiguous else "neuron id (selected columns)")
            ax.set_ylabel("layer")
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            what = CONDITION_LABELS.get(cond, cond)
            ax.set_title(f"{q}\n{'after − before: ' if is_diff else ''}{what}", fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=axes[: len(shown)], shrink=0.8, label="activation")
    if dimage is not None:
        fig.colorbar(dimage, ax=axes[len(shown):], shrink=0.8, label="Δ activation")
    if title:
        fig.suptitle(title)
    save_figure(fig, path_png, data)
    return fig


def _neuron_ticks(n: int, most: int = 16) -> list[int]:
    """Column positions to label on a heatmap of ``n`` neuron columns."""
    step = max(1, int(np.ceil(n / most)))
    return list(range(0, n, step))


def heatmap_figures(table: pd.DataFrame, directory: Path, prefix: str = "",
                    title: str = "") -> Files:
    """Figures 1 (as is), 7 (synapses suppressed) and 10 (enhanced) from a
    :func:`knowloc.pipeline.attention.heatmap_table`, each a PNG with its CSV (Figures 7
    and 10 with the unmanipulated rows, behind their difference panels)."""
    out: Files = {}
    for fig, conds in HEATMAP_FIGURES.items():
        sub = table[table["condition"].isin(conds)]
        if sub.empty or set(sub["condition"]) == {"none"} and fig != "figure1":
            continue
        png = Path(directory) / f"{prefix}{fig}.png"
        activation_heatmaps(sub, png, title=f"{HEATMAP_TITLES[fig]}"
                                            f"{' — ' + title if title else ''}")
        out[fig] = figure_files(png)
    return out


def attention_heatmaps(store: RunStore, res: AttentionResult) -> dict[str, Files]:
    """The heatmap figures of each panel (K_I, K_II) of the attention stage."""
    return {kind: heatmap_figures(p.table, store.path("figures"), prefix=f"heatmap_{kind}_",
                                  title=f"{kind} fact {p.fact_id}, {method_label(p.method)} "
                                        "KNs circled")
            for kind, p in res.heatmaps.items()}
