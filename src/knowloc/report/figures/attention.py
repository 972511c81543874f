"""Figures 5 and 6 of the attention stage: the predominance of the most attended token per
K_I / K_II, and ΔValue / ΔProb of suppressing or enhancing knowledge synapses."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ...intervals import N_BOOT
from ...pipeline.attention import (
    KIND_ORDER,
    OPERATION_ORDER,
    SYNAPSE_VARIANTS,
    AttentionResult,
    synapse_effect_summary,
)
from ...store import RunStore
from .common import (
    FEW_POINTS,
    INTERVAL_BARS,
    OP_COLOURS,
    Files,
    figure_files,
    interval_bars,
    method_label,
    need_columns,
    ordered,
    save_figure,
)

OPERATION_LABELS = {"enh": "Enh (× 2)", "sup": "Sup (× 0)", "avg": "Avg"}
OPERATION_NAMES = {"enh": "enhance", "sup": "suppress", "avg": "avg"}
SYNAPSE_LABELS = {"self": "Self (S)", "irrelevant": "Irrelevant (S_ir)"}


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
    need_columns(table, ["fact_id", "kind", "first", "P"], "violin_predominance")
    cols = ["fact_id", "kind", "first", "P"] + (["model"] if "model" in table.columns else [])
    data = table[cols].copy()
    data = data[data["P"].notna()]
    data["kind"] = data["kind"].astype(str)
    data["first"] = data["first"].astype(bool)
    kinds = ordered([*KIND_ORDER, *data["kind"]], KIND_ORDER)
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
    table: pd.DataFrame, path_png: str | os.PathLike[str], *, title: str | None = None,
    n_boot: int = N_BOOT, boot_seed: int = 0,
) -> Figure:
    """Grouped bars of ΔValue and ΔProb (Figure 6): for K_I / K_II × Self / Irrelevant
    synapses, bars for Enh, Sup and their Avg, in Figure 4's colours.

    ``table`` is either

    * the means to draw: rows of :func:`knowloc.pipeline.attention.figure6_table` (one
      method and variant; columns ``kind, synapses, operation, metric, value``), each bar
      with the table's 95% interval (``value_lo``, ``value_hi``, a bootstrap over facts) as
      its error bar, so the figure shows exactly the table's interval; or
    * the per-query effects (``kind, synapses, operation, delta_value, delta_prob``),
      averaged by :func:`synapse_effect_summary`: with a ``fact_id`` column, the means get
      the intervals of a bootstrap over facts (``n_boot`` resamples seeded by ``boot_seed``).

    Bars of a mean without an interval (fewer than two facts) have no error bar. The CSV is
    the plotted rows."""
    if "value" in table.columns:
        need_columns(table, ["kind", "synapses", "operation", "metric", "value"],
                     "bars_synapse_effects")
        summary = table.reset_index(drop=True)
    else:
        summary = synapse_effect_summary(table, n_boot=n_boot if "fact_id" in table else None,
                                         boot_seed=boot_seed)
    with_bars = {"value_lo", "value_hi"} <= set(summary.columns)
    fig = Figure(figsize=(10.0, 4.2), layout="constrained")
    axes = fig.subplots(1, 2, squeeze=False)[0]
    ops = ordered(summary["operation"], OPERATION_ORDER)
    for ax, metric, label in zip(axes, ("delta_value", "delta_prob"), ("ΔValue", "ΔProb")):
        sub = summary[summary["metric"].astype(str) == metric]
        groups = list(dict.fromkeys(zip(sub["kind"].astype(str), sub["synapses"].astype(str))))
        width = 0.8 / max(1, len(ops))
        for oi, op in enumerate(ops):
            ys, los, his = [], [], []
            for kind, syn in groups:
                row = sub[(sub["kind"].astype(str) == kind)
                          & (sub["synapses"].astype(str) == syn)
                          & (sub["operation"].astype(str) == op)]
                ys.append(float(row["value"].iloc[0]) if len(row) else np.nan)
                los.append(float(row["value_lo"].iloc[0]) if with_bars and len(row) else np.nan)
                his.append(float(row["value_hi"].iloc[0]) if with_bars and len(row) else np.nan)
            xs = np.arange(len(groups)) + (oi - (len(ops) - 1) / 2) * width
            ax.bar(xs, np.nan_to_num(ys), width=width, label=OPERATION_LABELS.get(op, op),
                   color=OP_COLOURS.get(OPERATION_NAMES.get(op, op), f"C{oi + 4}"))
            interval_bars(ax, xs, los, his)
        ax.set_xticks(np.arange(len(groups)))
        ax.set_xticklabels([f"{k}\n{SYNAPSE_LABELS.get(s, s)}" for k, s in groups], fontsize=8)
        ax.axhline(0, color="k", linewidth=0.6)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
        if not groups:
            ax.text(0.5, 0.5, "no rows", transform=ax.transAxes, ha="center", va="center")
    axes[0].legend(fontsize=8)
    fig.suptitle((title or "Manipulating knowledge synapses (sign: + = in the expected "
                  "direction)") + "\nmean" + (f"; {INTERVAL_BARS}" if with_bars else ""))
    save_figure(fig, path_png, summary)
    return fig


# ===================================================================== stage figures
def attention_figures(store: RunStore, res: AttentionResult) -> Files:
    """Figure 5 (``figure5_<method>``) and Figure 6 as defined and with position 0 excluded
    (``figure6_<method>_<variant>``: the method's and variant's rows of ``res.figure6``,
    ``figure6.csv``, their 95% intervals as the error bars) per method."""
    out: Files = {}
    fig5, fig6 = res.figure5, res.figure6
    for method in res.methods:
        label = method_label(method)
        png = store.path("figures", f"figure5_{method}.png")
        violin_predominance(fig5[fig5["method"] == method], png,
                            title=f"Predominance of the most attended token, {label} "
                                  "split (Figure 5)")
        out[f"figure5_{method}"] = figure_files(png)
        for first, variant in SYNAPSE_VARIANTS.items():
            sub = fig6[(fig6["method"] == method) & (fig6["first"].astype(bool) == first)]
            png = store.path("figures", f"figure6_{method}_{variant}.png")
            what = "as defined" if first else "position 0 excluded"
            bars_synapse_effects(sub, png, title=f"Knowledge synapses ({what}) × 0 / × 2, "
                                                 f"{label} KNs (Figure 6)")
            out[f"figure6_{method}_{variant}"] = figure_files(png)
    return out
