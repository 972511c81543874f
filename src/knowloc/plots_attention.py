"""Figures of the Dynamic-KN-selection experiments (paper Figures 1, 5, 6, 7, 10), from
saved tables (never from a model).

Each function writes a PNG and, beside it, the CSV of exactly what it plots, through
:func:`knowloc.plots.save_figure`. The tables are the ones :mod:`knowloc.attention` builds:

* :func:`activation_heatmaps` — ``query, condition, layer, neuron, activation`` (from
  :func:`knowloc.attention.heatmap_frame`); Figure 1 is condition ``none``, Figure 7
  ``suppress``, Figure 10 all three.
* :func:`violin_predominance` — one row per fact and variant: ``fact_id, kind, first, P``
  (``kind`` K_I / K_II, ``first`` True when the first/sink position was allowed).
* :func:`bars_synapse_effects` — one row per query and manipulation: ``kind, synapses,
  operation, delta_value, delta_prob`` (from :func:`knowloc.attention.synapse_experiment`
  plus the fact's kind).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from knowloc.errors import DataError
from knowloc.plots import natural_key, save_figure

logger = logging.getLogger(__name__)

__all__ = ["activation_heatmaps", "bars_synapse_effects", "violin_predominance"]

CONDITION_ORDER = ("none", "suppress", "enhance")
CONDITION_LABELS = {
    "none": "no manipulation",
    "suppress": "knowledge synapses suppressed (× 0)",
    "enhance": "knowledge synapses enhanced (× 2)",
}
KIND_ORDER = ("K_I", "K_II")
OPERATION_ORDER = ("enh", "sup", "avg")
OPERATION_LABELS = {"enh": "Enh (× 2)", "sup": "Sup (× 0)", "avg": "Avg"}
SYNAPSE_LABELS = {"self": "Self (S)", "irrelevant": "Irrelevant (S_ir)"}


def _need(df: pd.DataFrame, cols: Sequence[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise DataError(f"{what} needs column(s) {missing}; got {list(df.columns)}")


def _ordered(values: Sequence[object], order: Sequence[str]) -> list[str]:
    vals = [str(v) for v in dict.fromkeys(values)]
    known = [v for v in order if v in vals]
    return known + sorted((v for v in vals if v not in order), key=natural_key)


# ============================================================================ heatmaps
def activation_heatmaps(
    table: pd.DataFrame,
    path_png: str | os.PathLike[str],
    *,
    title: str | None = None,
    clip_percentile: float = 99.5,
) -> Path:
    """Layer × neuron heatmaps of last-position neuron activations (Figures 1, 7, 10).

    One panel per (condition, query): conditions as rows (none, suppress, enhance, in that
    order), queries as columns. All panels share one symmetric colour scale, ±the
    ``clip_percentile``-th percentile of |activation| (a few huge activations would
    otherwise wash out the rest), so before/after panels compare directly. When the table
    has a boolean ``is_kn`` column, those neurons are circled.

    The CSV is the plotted rows (``query, condition, layer, neuron, activation`` [+ is_kn]).
    """
    _need(table, ["query", "condition", "layer", "neuron", "activation"], "activation_heatmaps")
    if table.empty:
        raise DataError("activation_heatmaps: the table is empty")
    conds = _ordered(table["condition"], CONDITION_ORDER)
    queries = [str(q) for q in dict.fromkeys(table["query"].astype(str))]
    cols = ["query", "condition", "layer", "neuron", "activation"]
    if "is_kn" in table.columns:
        cols.append("is_kn")
    data = table[cols].assign(query=table["query"].astype(str), condition=table["condition"].astype(str))
    data = data.sort_values(["query", "condition", "layer", "neuron"], kind="mergesort").reset_index(drop=True)

    vmax = float(np.nanpercentile(np.abs(data["activation"].to_numpy(float)), clip_percentile))
    vmax = vmax if vmax > 0 else 1.0
    n_r, n_c = len(conds), len(queries)
    fig = Figure(figsize=(max(5.0, 4.6 * n_c), 2.6 * n_r + 0.8), layout="constrained")
    axes = fig.subplots(n_r, n_c, squeeze=False)
    image = None
    for i, cond in enumerate(conds):
        for j, q in enumerate(queries):
            ax = axes[i][j]
            sub = data[(data["condition"] == cond) & (data["query"] == q)]
            if sub.empty:
                ax.set_axis_off()
                continue
            grid = sub.pivot(index="layer", columns="neuron", values="activation")
            image = ax.imshow(
                grid.to_numpy(float), aspect="auto", origin="lower", cmap="RdBu_r",
                vmin=-vmax, vmax=vmax, interpolation="nearest",
                extent=(-0.5, grid.shape[1] - 0.5, grid.index.min() - 0.5, grid.index.max() + 0.5),
            )
            if "is_kn" in sub.columns:
                kn = sub[sub["is_kn"].astype(bool)]
                pos = {n: k for k, n in enumerate(grid.columns)}
                ax.scatter([pos[n] for n in kn["neuron"]], kn["layer"], s=30, facecolors="none",
                           edgecolors="k", linewidths=0.8)
            ax.set_xlabel("neuron" if grid.shape[1] == grid.columns.max() + 1 - grid.columns.min()
                          else "neuron (selected columns)")
            ax.set_ylabel("layer")
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(f"{q}\n{CONDITION_LABELS.get(cond, cond)}", fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="activation")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path_png, data)


# ============================================================ Figure 5: predominance
def violin_predominance(
    table: pd.DataFrame, path_png: str | os.PathLike[str], *, title: str | None = None
) -> Path:
    """Violin plot of the predominance score P per K_I / K_II (Figure 5), with and without
    the first (BOS / sink) position side by side.

    ``table``: ``fact_id, kind, first, P`` (``first``: True when position 0 was allowed);
    an optional ``model`` column makes groups ``model:kind`` as in the paper. NaN P (no
    query had a candidate) is left out. The CSV is the plotted rows.
    """
    _need(table, ["fact_id", "kind", "first", "P"], "violin_predominance")
    cols = ["fact_id", "kind", "first", "P"] + (["model"] if "model" in table.columns else [])
    data = table[cols].copy()
    data = data[data["P"].notna()]
    data["kind"] = data["kind"].astype(str)
    data["first"] = data["first"].astype(bool)
    kinds = _ordered(data["kind"], KIND_ORDER)
    models = [str(m) for m in dict.fromkeys(data["model"].astype(str))] if "model" in data else [None]
    groups = [(m, k) for m in models for k in kinds]
    data = data.sort_values(cols[:3], kind="mergesort").reset_index(drop=True)

    fig = Figure(figsize=(max(5.0, 1.6 * len(groups) + 2.0), 4.4))
    ax = fig.add_subplot(1, 1, 1)
    rng = np.random.default_rng(0)
    ticks, labels = [], []
    for gi, (model, kind) in enumerate(groups):
        for off, first, colour in ((-0.2, True, "C0"), (0.2, False, "C1")):
            sel = (data["kind"] == kind) & (data["first"] == first)
            if model is not None:
                sel &= data["model"].astype(str) == model
            vals = data.loc[sel, "P"].to_numpy(float)
            x = gi + off
            if vals.size >= 2 and np.ptp(vals) > 0:
                parts = ax.violinplot([vals], positions=[x], widths=0.35, showmedians=True)
                for body in parts["bodies"]:
                    body.set_facecolor(colour)
                    body.set_edgecolor(colour)
                    body.set_alpha(0.45)
                for key in ("cmedians", "cmins", "cmaxes", "cbars"):
                    if key in parts:
                        parts[key].set_color(colour)
            elif vals.size:
                ax.scatter(x + rng.uniform(-0.05, 0.05, vals.size), vals, s=14, color=colour, zorder=3)
        ticks.append(gi)
        name = kind.replace("K_", "")
        labels.append(f"{model}:{name}" if model is not None else kind)
    ax.scatter([], [], color="C0", label="with first position")
    ax.scatter([], [], color="C1", label="without first position")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels)
    ax.set_ylim(-0.03, 1.05)
    ax.set_ylabel("predominance $\\mathcal{P}$")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title or f"Predominance of the most attended token ({data['fact_id'].nunique()} facts)")
    if data.empty:
        ax.text(0.5, 0.5, "no facts to plot", transform=ax.transAxes, ha="center", va="center")
    return save_figure(fig, path_png, data)


# ===================================================== Figure 6: synapse manipulation
def synapse_effect_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Means of ΔValue and ΔProb per (kind, synapses, operation), plus ``avg`` = mean of the
    ``sup`` and ``enh`` means (the paper's "Avg"). Columns: ``kind, synapses, operation,
    metric, value, n``."""
    _need(table, ["kind", "synapses", "operation", "delta_value", "delta_prob"], "synapse_effect_summary")
    long = table.melt(
        id_vars=["kind", "synapses", "operation"], value_vars=["delta_value", "delta_prob"],
        var_name="metric", value_name="v",
    )
    long = long[long["v"].notna()]
    agg = (
        long.groupby(["kind", "synapses", "operation", "metric"], sort=False)["v"]
        .agg(value="mean", n="size").reset_index()
    )
    avg = (
        agg[agg["operation"].isin(["sup", "enh"])]
        .groupby(["kind", "synapses", "metric"], sort=False)
        .agg(value=("value", "mean"), n=("n", "sum")).reset_index()
        .assign(operation="avg")
    )
    out = pd.concat([agg, avg], ignore_index=True)
    for c in ("kind", "synapses", "operation", "metric"):
        out[c] = out[c].astype(str)
    out["n"] = out["n"].astype(int)
    kinds = _ordered(out["kind"], KIND_ORDER)
    syns = _ordered(out["synapses"], tuple(SYNAPSE_LABELS))
    ops = _ordered(out["operation"], OPERATION_ORDER)
    out["_k"] = out["kind"].map({k: i for i, k in enumerate(kinds)})
    out["_s"] = out["synapses"].map({k: i for i, k in enumerate(syns)})
    out["_o"] = out["operation"].map({k: i for i, k in enumerate(ops)})
    out["_m"] = out["metric"].map({"delta_value": 0, "delta_prob": 1})
    return (
        out.sort_values(["_m", "_k", "_s", "_o"], kind="mergesort")
        .drop(columns=["_k", "_s", "_o", "_m"])[["kind", "synapses", "operation", "metric", "value", "n"]]
        .reset_index(drop=True)
    )


def bars_synapse_effects(
    table: pd.DataFrame, path_png: str | os.PathLike[str], *, title: str | None = None
) -> Path:
    """Grouped bars of ΔValue and ΔProb (Figure 6): for K_I / K_II × Self / Irrelevant
    synapses, bars for Enh, Sup and their Avg. The CSV is :func:`synapse_effect_summary`."""
    summary = synapse_effect_summary(table)
    fig = Figure(figsize=(10.0, 4.2), layout="constrained")
    axes = fig.subplots(1, 2, squeeze=False)[0]
    ops = _ordered(summary["operation"], OPERATION_ORDER)
    for ax, metric, label in zip(axes, ("delta_value", "delta_prob"), ("ΔValue", "ΔProb")):
        sub = summary[summary["metric"] == metric]
        groups = list(dict.fromkeys(zip(sub["kind"], sub["synapses"])))
        width = 0.8 / max(1, len(ops))
        for oi, op in enumerate(ops):
            ys = []
            for kind, syn in groups:
                row = sub[(sub["kind"] == kind) & (sub["synapses"] == syn) & (sub["operation"] == op)]
                ys.append(float(row["value"].iloc[0]) if len(row) else np.nan)
            xs = np.arange(len(groups)) + (oi - (len(ops) - 1) / 2) * width
            ax.bar(xs, ys, width=width, label=OPERATION_LABELS.get(op, op), color=f"C{oi}")
        ax.set_xticks(np.arange(len(groups)))
        ax.set_xticklabels([f"{k}\n{SYNAPSE_LABELS.get(s, s)}" for k, s in groups], fontsize=8)
        ax.axhline(0, color="k", linewidth=0.6)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
        if not groups:
            ax.text(0.5, 0.5, "no rows", transform=ax.transAxes, ha="center", va="center")
    axes[0].legend(fontsize=8)
    fig.suptitle(title or "Manipulating knowledge synapses (sign: + = in the expected direction)")
    return save_figure(fig, path_png, summary)
