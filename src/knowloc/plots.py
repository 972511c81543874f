"""Figures from saved tables (never from a model).

Every figure is written as a PNG together with the CSV of the rows it plots (same stem,
``.csv``), via :func:`save_figure`. Figures are built on :class:`matplotlib.figure.Figure`
directly, so nothing touches pyplot's global state or the process-wide backend.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from knowloc.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

__all__ = ["DPI", "METHOD_LABELS", "natural_key", "query_kn_bars", "save_figure", "violin_cs2"]

#: Resolution of every saved PNG.
DPI = 120

#: Display names of the localization methods (paper §2.1, A.4).
METHOD_LABELS: dict[str, str] = {
    "ig": "IG (Dai et al.)",
    "sig": "SIG (Enguehard)",
    "amig": "AMIG (Chen et al.)",
}


def natural_key(s: object) -> tuple[object, ...]:
    """Sort key that orders embedded numbers numerically (``P17`` before ``P101``)."""
    parts = re.split(r"(\d+)", str(s))
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts if p != "")


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Write through a temporary file in the same folder, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def save_figure(fig: Figure, path_png: str | os.PathLike[str], data: pd.DataFrame) -> Path:
    """Save ``fig`` as a PNG (``DPI`` dots per inch) and ``data`` as the CSV behind it.

    The CSV has the PNG's stem and the suffix ``.csv``, no index column. Parent folders are
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
    _atomic_write(csv, lambda p: data.to_csv(p, index=False))
    _atomic_write(png, lambda p: fig.savefig(p, dpi=DPI, bbox_inches="tight", format="png"))
    logger.info("wrote %s and %s", png, csv.name)
    return png


def violin_cs2(
    scores_split: pd.DataFrame,
    method: str,
    path_png: str | os.PathLike[str],
    threshold: float,
) -> Path:
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
    CS2 values cannot make a density (a single fact, or all values equal) is drawn as points.
    A method present in the table but with nothing to plot gives an empty, annotated figure.

    Returns:
        The PNG path.

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
        else:
            jitter = rng.uniform(-0.08, 0.08, size=vals.size) if vals.size > 1 else 0.0
            ax.scatter(i + jitter, vals, s=14, color="C0", zorder=3)
    if violin_data:
        parts = ax.violinplot(
            violin_data, positions=violin_pos, widths=0.8, showmedians=True, showextrema=True
        )
        for body in parts["bodies"]:
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

    return save_figure(fig, path_png, data)


def query_kn_bars(
    figure4: pd.DataFrame,
    path_png: str | os.PathLike[str],
    *,
    method: str = "",
) -> Path:
    """Grouped bar chart of ΔProb (paper Figure 4) for one localization method.

    Args:
        figure4: rows of :func:`knowloc.experiments.figure4_table` (columns ``kind, set,
            suppress, enhance, avg, n_queries, n_empty``), usually one method's.
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
    bars = (("suppress", "Sup (×0)", "C3"), ("enhance", "Enh (×2)", "C2"), ("avg", "Avg", "C0"))
    for ax, kind in zip(axes, kinds, strict=True):
        d = figure4[figure4["kind"] == kind].set_index("set")
        for j, (col, label, color) in enumerate(bars):
            vals = [float(d.loc[s, col]) if s in d.index else np.nan for s in sets]
            ax.bar(np.arange(len(sets)) + (j - 1) * width, np.nan_to_num(vals), width,
                   label=label, color=color)
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
    fig.suptitle(f"Query-KN mapping: ΔProb of editing KN activations — {label}")
    fig.tight_layout()
    return save_figure(fig, path_png, figure4.reset_index(drop=True))
