"""Figure 4: the query-KN mapping, mean ΔProb of suppressing / enhancing KN activations."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ...errors import DataError
from ...pipeline.mapping import MappingResult
from ...store import RunStore
from ..stats import ci95, run_kinds
from .common import METHOD_LABELS, OP_COLOURS, Files, figure_files, save_figure


def query_kn_bars(
    figure4: pd.DataFrame,
    path_png: str | os.PathLike[str],
    *,
    method: str = "",
    per_query: pd.DataFrame | None = None,
) -> Figure:
    """Grouped bar chart of ΔProb (paper Figure 4) for one localization method.

    Args:
        figure4: rows of :func:`knowloc.pipeline.mapping.figure4_table` (columns ``kind, set,
            suppress, enhance, avg, n_queries, n_empty``), usually one method's.
        path_png: the PNG; the plotted rows go to the CSV beside it.
        method: shown in the title.
        per_query: the interventions behind the means (``kind, set, op, status,
            delta_prob``, one row per query, set and op); when given, each bar gets the 95%
            confidence interval of its mean as an error bar (Avg: half the root sum of squares
            of the two intervals) and the CSV the columns ``*_ci95`` (half-widths).

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
    if per_query is not None:
        figure4 = figure4.assign(**_figure4_ci(figure4, per_query))
    for ax, kind in zip(axes, kinds, strict=True):
        d = figure4[figure4["kind"] == kind].set_index("set")
        for j, (col, label) in enumerate(bars):
            vals = [float(d.loc[s, col]) if s in d.index else np.nan for s in sets]
            err = ([float(d.loc[s, f"{col}_ci95"]) if s in d.index else np.nan for s in sets]
                   if f"{col}_ci95" in d else None)
            ax.bar(np.arange(len(sets)) + (j - 1) * width, np.nan_to_num(vals), width,
                   yerr=None if err is None else np.nan_to_num(err), capsize=2,
                   label=label, color=OP_COLOURS[col])
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
                 + ("\n(error bars: 95% CI of the mean)" if per_query is not None else ""))
    fig.tight_layout()
    save_figure(fig, path_png, figure4)
    return fig


def _figure4_ci(figure4: pd.DataFrame, per_query: pd.DataFrame) -> dict[str, list[float]]:
    """Half-widths of the 95% CIs of Figure 4's means, aligned with ``figure4``'s rows."""
    ok = per_query[per_query["status"] == "ok"]
    out: dict[str, list[float]] = {"suppress_ci95": [], "enhance_ci95": [], "avg_ci95": []}
    for r in figure4.itertuples():
        g = ok[(ok["kind"] == r.kind) & (ok["set"] == r.set)]
        hs = ci95(g.loc[g["op"] == "suppress", "delta_prob"])[1]
        he = ci95(g.loc[g["op"] == "enhance", "delta_prob"])[1]
        out["suppress_ci95"].append(hs)
        out["enhance_ci95"].append(he)
        out["avg_ci95"].append(float(np.hypot(hs, he) / 2))
    return out


def mapping_figures(store: RunStore, res: MappingResult) -> Files:
    """Figure 4 per method, ``figures/figure4_<method>.png``."""
    out: Files = {}
    per_query = res.interventions.merge(run_kinds(store, "intervene"), on=["method", "fact_id"]) \
        if len(res.interventions) else None
    for method in res.methods:
        png = store.path("figures", f"figure4_{method}.png")
        query_kn_bars(res.figure4[res.figure4["method"] == method], png, method=method,
                      per_query=None if per_query is None
                      else per_query[per_query["method"] == method])
        out[method] = figure_files(png)
    return out
