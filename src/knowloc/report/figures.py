"""Every figure of knowloc, drawn from saved tables (never from a model).

Each plot function builds a :class:`matplotlib.figure.Figure` (directly, so nothing touches
pyplot's global state or the process-wide backend), writes it as a PNG together with the CSV
of the rows it plots (same stem, ``.csv``) via :func:`save_figure`, and returns the figure.
The stage functions at the end (:func:`consistency_figures`, :func:`mapping_figures`,
:func:`attention_figures`, :func:`heatmap_figures`, :func:`kn_layers`) draw the figures of
one stage into a run directory and return ``{name: (png, csv)}``.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from ..attribution import get_method, method_names, sort_methods
from ..data import natural_key
from ..errors import ConfigError, DataError
from ..pipeline.attention import (
    KIND_ORDER,
    OPERATION_ORDER,
    SYNAPSE_VARIANTS,
    AttentionResult,
    synapse_effect_summary,
)
from ..pipeline.consistency import ConsistencyResult
from ..pipeline.mapping import MappingResult
from ..store import RunStore
from ..store.io import atomic_write, write_csv
from .stats import ci95, run_kinds

logger = logging.getLogger(__name__)

__all__ = [
    "DPI",
    "METHOD_LABELS",
    "activation_heatmaps",
    "attention_figures",
    "bars_synapse_effects",
    "consistency_figures",
    "heatmap_figures",
    "kn_layer_bars",
    "kn_layers",
    "mapping_figures",
    "query_kn_bars",
    "save_figure",
    "violin_cs2",
    "violin_predominance",
]

#: Resolution of every saved PNG.
DPI = 120

#: Violins of fewer values than this also show each value as a point.
FEW_POINTS = 10

#: Colours of the operations, shared by Figure 4 and Figure 6.
OP_COLOURS = {"suppress": "C3", "enhance": "C2", "avg": "C0"}

#: Display names of the localization methods (paper §2.1, A.4).
METHOD_LABELS: dict[str, str] = {
    "ig": "IG (Dai et al.)",
    "sig": "SIG (Enguehard)",
    "amig": "AMIG (Chen et al.)",
}


def save_figure(fig: Figure, path_png: str | os.PathLike[str], data: pd.DataFrame) -> Path:
    """Save ``fig`` as a PNG (``DPI`` dots per inch), a PDF and an SVG, and ``data`` as the
    CSV behind it.

    The CSV, PDF and SVG have the PNG's stem, the CSV no index column. Parent folders are
    created. Each file is written to a temporary name and renamed, so an interrupted call
    never leaves a truncated file under the final name; the CSV is written first, the PNG
    last.

    Returns:
        The PNG path.
    """
    png = Path(path_png)
    if png.suffix.lower() != ".png":
        raise ConfigError(f"figure path must end in .png, got {str(png)!r}")
    png.parent.mkdir(parents=True, exist_ok=True)
    csv = png.with_suffix(".csv")
    write_csv(csv, data)
    for fmt, dpi in (("pdf", "figure"), ("svg", "figure"), ("png", DPI)):
        atomic_write(png.with_suffix(f".{fmt}"), functools.partial(
            fig.savefig, bbox_inches="tight", format=fmt, dpi=dpi))
    logger.info("wrote %s (+ .pdf, .svg) and %s", png, csv.name)
    return png


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


# ================================================================ attention figures
CONDITION_ORDER = ("none", "suppress", "enhance")
CONDITION_LABELS = {
    "none": "no manipulation",
    "suppress": "knowledge synapses suppressed (× 0)",
    "enhance": "knowledge synapses enhanced (× 2)",
}
OPERATION_LABELS = {"enh": "Enh (× 2)", "sup": "Sup (× 0)", "avg": "Avg"}
OPERATION_NAMES = {"enh": "enhance", "sup": "suppress", "avg": "avg"}
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
    _need(table, ["query", "condition", "layer", "neuron", "activation"], "activation_heatmaps")
    if table.empty:
        raise DataError("activation_heatmaps: the table is empty")
    conds = _ordered(table["condition"], CONDITION_ORDER)
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


# ============================================================ Figure 5: predominance
def violin_predominance(
    table: pd.DataFrame, path_png: str | os.PathLike[str], *, title: str | None = None
) -> Figure:
    """Violin plot of the predominance score P per K_I / K_II (Figure 5), with and without
    the first (BOS / sink) position side by side.

    ``table``: ``fact_id, kind, first, P`` (``first``: True when position 0 was allowed);
    an optional ``model`` column makes groups ``model:kind`` as in the paper. NaN P (no
    query had a candidate) is left out. Both K_I and K_II always have a group; one without
    facts (e.g. every fact is K_I) says so. Groups of fewer than :data:`FEW_POINTS` facts
    show their points over the violin. The CSV is the plotted rows.
    """
    _need(table, ["fact_id", "kind", "first", "P"], "violin_predominance")
    cols = ["fact_id", "kind", "first", "P"] + (["model"] if "model" in table.columns else [])
    data = table[cols].copy()
    data = data[data["P"].notna()]
    data["kind"] = data["kind"].astype(str)
    data["first"] = data["first"].astype(bool)
    kinds = _ordered([*KIND_ORDER, *data["kind"]], KIND_ORDER)
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
                for body in parts["bodies"]:  # type: ignore[attr-defined]
                    body.set_facecolor(colour)
                    body.set_edgecolor(colour)
                    body.set_alpha(0.45)
                for key in ("cmedians", "cmins", "cmaxes", "cbars"):
                    if key in parts:
                        parts[key].set_color(colour)
            if 0 < vals.size < FEW_POINTS or (vals.size and not np.ptp(vals) > 0):
                ax.scatter(x + rng.uniform(-0.05, 0.05, vals.size), vals, s=14, color=colour,
                           zorder=3, edgecolors="white", linewidths=0.4)
        n_facts = data.loc[data["kind"] == kind, "fact_id"].nunique() if model is None else \
            data.loc[(data["kind"] == kind) & (data["model"].astype(str) == model),
                     "fact_id"].nunique()
        if not n_facts and not data.empty:
            ax.text(gi, 0.5, "no facts", ha="center", va="center", color="0.4")
        ticks.append(gi)
        name = kind.replace("K_", "")
        labels.append((f"{model}:{name}" if model is not None else kind) + f"\n{n_facts} facts")
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
    save_figure(fig, path_png, data)
    return fig


# ===================================================== Figure 6: synapse manipulation
def bars_synapse_effects(
    table: pd.DataFrame, path_png: str | os.PathLike[str], *, title: str | None = None
) -> Figure:
    """Grouped bars of ΔValue and ΔProb (Figure 6): for K_I / K_II × Self / Irrelevant
    synapses, bars for Enh, Sup and their Avg, in Figure 4's colours, with the 95% confidence
    interval of each mean as an error bar (Avg: half the root sum of squares of the two). The
    CSV is :func:`synapse_effect_summary` plus ``ci95`` (the half-width)."""
    summary = synapse_effect_summary(table)
    summary = summary.assign(ci95=_synapse_ci(summary, table))
    fig = Figure(figsize=(10.0, 4.2), layout="constrained")
    axes = fig.subplots(1, 2, squeeze=False)[0]
    ops = _ordered(summary["operation"], OPERATION_ORDER)
    for ax, metric, label in zip(axes, ("delta_value", "delta_prob"), ("ΔValue", "ΔProb")):
        sub = summary[summary["metric"] == metric]
        groups = list(dict.fromkeys(zip(sub["kind"], sub["synapses"])))
        width = 0.8 / max(1, len(ops))
        for oi, op in enumerate(ops):
            ys, errs = [], []
            for kind, syn in groups:
                row = sub[(sub["kind"] == kind) & (sub["synapses"] == syn) & (sub["operation"] == op)]
                ys.append(float(row["value"].iloc[0]) if len(row) else np.nan)
                errs.append(float(row["ci95"].iloc[0]) if len(row) else np.nan)
            xs = np.arange(len(groups)) + (oi - (len(ops) - 1) / 2) * width
            ax.bar(xs, ys, width=width, yerr=np.nan_to_num(errs), capsize=2,
                   label=OPERATION_LABELS.get(op, op),
                   color=OP_COLOURS.get(OPERATION_NAMES.get(op, op), f"C{oi + 4}"))
        ax.set_xticks(np.arange(len(groups)))
        ax.set_xticklabels([f"{k}\n{SYNAPSE_LABELS.get(s, s)}" for k, s in groups], fontsize=8)
        ax.axhline(0, color="k", linewidth=0.6)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
        if not groups:
            ax.text(0.5, 0.5, "no rows", transform=ax.transAxes, ha="center", va="center")
    axes[0].legend(fontsize=8)
    fig.suptitle((title or "Manipulating knowledge synapses (sign: + = in the expected "
                  "direction)") + "\nmean, error bars: 95% CI of the mean")
    save_figure(fig, path_png, summary)
    return fig


def _synapse_ci(summary: pd.DataFrame, table: pd.DataFrame) -> list[float]:
    """Half-widths of the 95% CIs of :func:`synapse_effect_summary`'s means, row by row."""
    half: dict[tuple[str, str, str, str], float] = {}
    for r in summary.itertuples():
        if r.operation == "avg":
            continue
        g = table[(table["kind"].astype(str) == r.kind)
                  & (table["synapses"].astype(str) == r.synapses)
                  & (table["operation"].astype(str) == r.operation)]
        half[(r.kind, r.synapses, r.operation, r.metric)] = ci95(g[r.metric])[1]
    return [float(np.hypot(half.get((r.kind, r.synapses, "sup", r.metric), np.nan),
                           half.get((r.kind, r.synapses, "enh", r.metric), np.nan)) / 2)
            if r.operation == "avg" else half[(r.kind, r.synapses, r.operation, r.metric)]
            for r in summary.itertuples()]


# ===================================================================== stage figures
Files = dict[str, tuple[Path, Path]]

#: Heatmap figures and the conditions each shows.
HEATMAP_FIGURES = {"figure1": ("none",),
                   "figure7": ("none", "suppress", "suppress (position 0 excluded)"),
                   "figure10": ("none", "enhance", "enhance (position 0 excluded)")}
HEATMAP_TITLES = {"figure1": "Figure 1", "figure7": "Figure 7: synapses suppressed (× 0)",
                  "figure10": "Figure 10: synapses enhanced (× 2)"}


def _files(png: Path) -> tuple[Path, Path]:
    return png, png.with_suffix(".csv")


def consistency_figures(store: RunStore, res: ConsistencyResult) -> Files:
    """Figures 3, 8, 9: the CS2 violin of each method, ``figures/cs2_violin_<method>.png``."""
    out: Files = {}
    for method in sort_methods(res.scores["method"]):
        png = store.path("figures", f"cs2_violin_{method}.png")
        violin_cs2(res.scores, method, png, res.static_threshold)
        out[method] = _files(png)
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
        out[method] = _files(png)
    return out


def attention_figures(store: RunStore, res: AttentionResult) -> Files:
    """Figure 5 (``figure5_<method>``) and Figure 6 as defined and with position 0 excluded
    (``figure6_<method>_<variant>``) per method."""
    out: Files = {}
    eff = res.effects.merge(res.split[["method", "fact_id", "kind"]], on=["method", "fact_id"]) \
        if len(res.effects) else pd.DataFrame(columns=["method", "first", "kind", "synapses",
                                                       "operation", "delta_value", "delta_prob",
                                                       "known"])
    if res.only_known and len(eff):
        eff = eff[eff["known"].astype(bool)]
    fig5 = res.figure5
    for method in res.methods:
        label = method_label(method)
        png = store.path("figures", f"figure5_{method}.png")
        violin_predominance(fig5[fig5["method"] == method], png,
                            title=f"Predominance of the most attended token, {label} "
                                  "split (Figure 5)")
        out[f"figure5_{method}"] = _files(png)
        for first, variant in SYNAPSE_VARIANTS.items():
            sub = eff[(eff["method"] == method) & (eff["first"].astype(bool) == first)]
            png = store.path("figures", f"figure6_{method}_{variant}.png")
            what = "as defined" if first else "position 0 excluded"
            bars_synapse_effects(sub, png, title=f"Knowledge synapses ({what}) × 0 / × 2, "
                                                 f"{label} KNs (Figure 6)")
            out[f"figure6_{method}_{variant}"] = _files(png)
    return out


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
        out[fig] = _files(png)
    return out


def attention_heatmaps(store: RunStore, res: AttentionResult) -> dict[str, Files]:
    """The heatmap figures of each panel (K_I, K_II) of the attention stage."""
    return {kind: heatmap_figures(p.table, store.path("figures"), prefix=f"heatmap_{kind}_",
                                  title=f"{kind} fact {p.fact_id}, {method_label(p.method)} "
                                        "KNs circled")
            for kind, p in res.heatmaps.items()}


def kn_layer_bars(neurons: pd.DataFrame, n_layers: int,
                  path_png: str | os.PathLike[str]) -> Figure:
    """Share of knowledge neurons per layer and method (bars, one integer tick per layer).

    ``neurons``: rows ``method, layer`` (one per knowledge neuron of a query). The CSV is
    ``method, layer, n_neurons, share``."""
    counts = (neurons.groupby(["method", "layer"]).size().rename("n").reset_index()
              if len(neurons) else pd.DataFrame(columns=["method", "layer", "n"]))
    fig = Figure(figsize=(8, 3.6))
    ax = fig.add_subplot()
    methods = sort_methods(counts["method"])
    width = 0.8 / max(1, len(methods))
    rows = []
    for i, m in enumerate(methods):
        c = counts[counts["method"] == m].set_index("layer")["n"].reindex(range(n_layers),
                                                                           fill_value=0)
        share = c / max(1, c.sum())
        ax.bar([x + (i - (len(methods) - 1) / 2) * width for x in range(n_layers)],
               share.values, width=width, label=method_label(m))
        rows += [{"method": m, "layer": int(k), "n_neurons": int(c[k]), "share": float(share[k])}
                 for k in range(n_layers)]
    step = max(1, int(np.ceil(n_layers / 24)))
    ax.set_xticks(range(0, n_layers, step))
    ax.set_xlim(-0.6, n_layers - 0.4)
    ax.set_xlabel("layer")
    ax.set_ylabel("share of knowledge neurons")
    ax.set_title("Where knowledge neurons sit (all localized queries)")
    if methods:
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path_png, pd.DataFrame(rows, columns=["method", "layer", "n_neurons",
                                                           "share"]))
    return fig


def kn_layers(store: RunStore, neurons: pd.DataFrame, n_layers: int) -> tuple[Path, Path]:
    """:func:`kn_layer_bars` of a run, ``figures/kn_layers.png``."""
    png = store.path("figures", "kn_layers.png")
    kn_layer_bars(neurons, n_layers, png)
    return _files(png)


def method_label(method: str) -> str:
    """The registry's label of a method (the name itself for an unregistered one)."""
    return get_method(method).label if method in method_names() else method

