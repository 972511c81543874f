"""Figure 4: the query-KN mapping, mean ΔProb of suppressing / enhancing KN activations."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ...errors import DataError
from ...pipeline.mapping import MappingResult
from ...store import RunStore
from .common import (
    INTERVAL_BARS,
    METHOD_LABELS,
    OP_COLOURS,
    Files,
    figure_files,
    interval_bars,
    save_figure,
)


def query_kn_bars(
    figure4: pd.DataFrame,
    path_png: str | os.PathLike[str],
    *,
    method: str = "",
) -> Figure:
    """Grouped bar chart of ΔProb (paper Figure 4) for one localization method.

    Args:
        figure4: rows of :func:`knowloc.pipeline.mapping.figure4_table` (columns ``kind, set,
            suppress, enhance, avg``, and ``n_queries, n_empty`` for the group labels),
            usually one method's. Where it has the bounds of a mean (``<col>_lo``,
            ``<col>_hi``: the table's 95% interval, a bootstrap over facts), the bar gets
            that interval as its error bar, so the figure shows exactly the table's interval.
        path_png: the PNG; the plotted rows go to the CSV beside it.
        method: shown in the title.

    One panel per kind (K_I, K_II); the groups are Self / Union / Intersection / Refine, the
    bars suppression (×0), enhancement (×2) and their average. Neuron sets that were empty
    for every query have no bar; the number of queries with an empty set is written under
    each group.
    """
    missing = [c for c in ("kind", "set", "suppress", "enhance", "avg") if c not in figure4]
    if missing:
        raise DataError(f"query_kn_bars needs column(s) {missing}; got {list(figure4.columns)}")
    sets = ["Self", "Union", "Intersection", "Refine"]
    kinds = ["K_I", "K_II"]
    fig = Figure(figsize=(10, 4.2))
    axes = [fig.add_subplot(1, 2, i + 1) for i in range(2)]
    width = 0.26
    bars = (("suppress", "Sup (×0)"), ("enhance", "Enh (×2)"), ("avg", "Avg"))
    figure4 = figure4.reset_index(drop=True)
    with_bars = all(f"{col}_{end}" in figure4 for col, _ in bars for end in ("lo", "hi"))
    for ax, kind in zip(axes, kinds, strict=True):
        d = figure4[figure4["kind"] == kind].set_index("set")
        for j, (col, label) in enumerate(bars):
            x = np.arange(len(sets)) + (j - 1) * width
            vals = [float(d.loc[s, col]) if s in d.index else np.nan for s in sets]
            ax.bar(x, np.nan_to_num(vals), width, label=label, color=OP_COLOURS[col])
            if with_bars:
                interval_bars(ax, x, *([float(d.loc[s, f"{col}_{end}"]) if s in d.index
                                        else np.nan for s in sets] for end in ("lo", "hi")))
        labels = []
        for s in sets:
            if s in d.index:
                n_empty = int(d.loc[s, "n_empty"]) if "n_empty" in d else 0
                n = int(d.loc[s, "n_queries"]) if "n_queries" in d else 0
                labels.append(f"{s}\n{n - n_empty}/{n} non-empty")
            else:
                labels.append(f"{s}\n(no queries)")
        ax.set_xticks(range(len(sets)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(f"K$_{{{kind[2:]}}}$")
        ax.grid(axis="y", alpha=0.3)
        if d.empty:
            ax.text(0.5, 0.5, "no facts", transform=ax.transAxes, ha="center", va="center")
    axes[0].set_ylabel("ΔProb")
    axes[0].legend(fontsize=8)
    label = METHOD_LABELS.get(str(method), str(method))
    fig.suptitle(f"Query-KN mapping: mean ΔProb of editing KN activations — {label}"
                 + (f"\n({INTERVAL_BARS})" if with_bars else ""))
    fig.tight_layout()
    save_figure(fig, path_png, figure4)
    return fig


def mapping_figures(store: RunStore, res: MappingResult) -> Files:
    """Figure 4 per method, ``figures/figure4_<method>.png``: the method's rows of
    ``res.figure4`` (``figure4.csv``), their 95% intervals as the error bars."""
    out: Files = {}
    for method in res.methods:
        png = store.path("figures", f"figure4_{method}.png")
        query_kn_bars(res.figure4[res.figure4["method"] == method], png, method=method)
        out[method] = figure_files(png)
    return out
