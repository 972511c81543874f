"""Figures 3, 8, 9: the KN-consistency CS2 per relation, one violin plot per method."""

from __future__ import annotations

import logging
import os

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ...attribution import sort_methods
from ...data import natural_key
from ...errors import ConfigError, DataError
from ...pipeline.consistency import ConsistencyResult
from ...store import RunStore
from .common import FEW_POINTS, METHOD_LABELS, Files, figure_files, save_figure

logger = logging.getLogger(__name__)


def violin_cs2(
    scores_split: pd.DataFrame,
    method: str,
    path_png: str | os.PathLike[str],
    threshold: float,
) -> Figure:
    """Violin plot of CS2 per relation for one localization method (paper Figures 3, 8, 9).

    Args:
        scores_split: a table with columns ``method, relation, fact_id, cs2`` (the output of
            :func:`knowloc.consistency.consistency_scores` or ``split_facts``). Rows that are
            skipped (``skipped`` not null, when that column exists) or have NaN CS2 are left
            out.
        method: which method's rows to plot.
        path_png: where to write the PNG; the CSV of the plotted rows (``relation, fact_id,
            cs2``, in plotting order) goes next to it with suffix ``.csv``.
        threshold: drawn as a dashed horizontal line (facts at or below it are K_II).

    Relations are on the x axis in natural order (``P17`` before ``P101``). A relation whose
    CS2 values cannot make a density (a single fact, or all values equal) is drawn as points;
    a relation with fewer than :data:`FEW_POINTS` facts has its points over the violin.
    A method present in the table but with nothing to plot gives an empty, annotated figure.

    Returns:
        The figure (already saved).

    Raises:
        ConfigError: ``method`` does not occur in ``scores_split``.
        DataError: a required column is missing.
    """
    missing = [c for c in ("method", "relation", "fact_id", "cs2") if c not in scores_split]
    if missing:
        raise DataError(f"violin_cs2 needs column(s) {missing}; got {list(scores_split.columns)}")
    methods = sorted(scores_split["method"].astype(str).unique())
    if str(method) not in methods:
        raise ConfigError(f"method {method!r} not in the scores table; it has {methods}")

    df = scores_split[scores_split["method"].astype(str) == str(method)]
    if "skipped" in df.columns:
        df = df[df["skipped"].isna()]
    df = df[df["cs2"].notna()]
    relations = sorted(df["relation"].astype(str).unique(), key=natural_key)
    data = df.assign(relation=df["relation"].astype(str), fact_id=df["fact_id"].astype(str))[
        ["relation", "fact_id", "cs2"]
    ]
    order = {r: i for i, r in enumerate(relations)}
    data = (
        data.assign(_r=data["relation"].map(order))
        .sort_values(["_r", "fact_id"], kind="mergesort")
        .drop(columns="_r")
        .reset_index(drop=True)
    )

    n_rel = len(relations)
    width = max(6.0, 0.32 * n_rel + 2.5)
    fig = Figure(figsize=(width, 4.8))
    ax = fig.add_subplot(1, 1, 1)
    rng = np.random.default_rng(0)  # fixed jitter: the figure is deterministic

    violin_data: list[np.ndarray] = []
    violin_pos: list[int] = []
    for i, rel in enumerate(relations):
        vals = data.loc[data["relation"] == rel, "cs2"].to_numpy(dtype=float)
        if vals.size >= 2 and np.ptp(vals) > 0:
            violin_data.append(vals)
            violin_pos.append(i)
        if vals.size < FEW_POINTS or not (vals.size >= 2 and np.ptp(vals) > 0):
            jitter = rng.uniform(-0.08, 0.08, size=vals.size) if vals.size > 1 else 0.0
            ax.scatter(i + jitter, vals, s=14, color="C0", zorder=3)
    if violin_data:
        parts = ax.violinplot(
            violin_data, positions=violin_pos, widths=0.8, showmedians=True, showextrema=True
        )
        for body in parts["bodies"]:  # type: ignore[attr-defined]
            body.set_facecolor("C0")
            body.set_edgecolor("C0")
            body.set_alpha(0.45)
        for key in ("cmedians", "cmins", "cmaxes", "cbars"):
            if key in parts:
                parts[key].set_color("C0")
                parts[key].set_linewidth(0.8)

    ax.axhline(threshold, linestyle="--", color="C3", linewidth=1.2)
    handles = [
        Line2D([], [], linestyle="--", color="C3", label=f"threshold = {threshold:g}"),
    ]
    if data.shape[0]:
        share_ii = float((data["cs2"] <= threshold).mean())
        handles.append(Line2D([], [], linestyle="", label=f"at or below (K_II): {share_ii:.0%}"))
    ax.legend(handles=handles, loc="upper right", fontsize=8, framealpha=0.9)

    ax.set_xticks(range(n_rel))
    rotate = n_rel > 8
    ax.set_xticklabels(
        relations, rotation=60 if rotate else 0, ha="right" if rotate else "center", fontsize=8
    )
    ax.set_xlim(-0.7, max(n_rel, 1) - 0.3)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("relation")
    ax.set_ylabel("CS$_2$")
    ax.grid(axis="y", alpha=0.3)
    label = METHOD_LABELS.get(str(method), str(method))
    ax.set_title(f"KN-consistency CS$_2$ per relation — {label}, {len(data)} facts")
    if data.empty:
        ax.text(0.5, 0.5, "no facts to plot", transform=ax.transAxes, ha="center", va="center")
        logger.warning("violin_cs2: no non-skipped facts for method %s", method)

    save_figure(fig, path_png, data)
    return fig


def consistency_figures(store: RunStore, res: ConsistencyResult) -> Files:
    """Figures 3, 8, 9: the CS2 violin of each method, ``figures/cs2_violin_<method>.png``."""
    out: Files = {}
    for method in sort_methods(res.scores["method"]):
        png = store.path("figures", f"cs2_violin_{method}.png")
        violin_cs2(res.scores, method, png, res.static_threshold)
        out[method] = figure_files(png)
    return out
