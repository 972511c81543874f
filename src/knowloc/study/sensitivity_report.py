"""What ``knowloc sensitivity`` shows: the curves as a figure, the rows as CSV and Markdown,
and the report's "Threshold sensitivity" section (the computation is in :mod:`.sensitivity`).
"""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from ..attribution import sort_methods
from ..errors import RunError
from ..store import RunStore
from .sensitivity import AXES, Sensitivity, consistency_config, has_maps, sensitivity
from .spec import RunSpec, read_spec

log = logging.getLogger(__name__)

__all__ = ["display_table", "sensitivity_figure", "sensitivity_markdown", "sensitivity_section",
           "write_sensitivity"]


# ------------------------------------------------------------------ figure and files
_BIN_MARKERS = {64: "v", 128: "s", 256: "D"}
_BIN_STYLES = {64: ":", 128: "-.", 256: "--"}
_PANELS = [("k2_share", "K$_{II}$ share (R: II)"), ("cs2_gap", "CS$_2$ gap (S: I − S: II)"),
           ("welch_p", "Welch's p"), ("cap_II", "∩: II (every method)")]


def sensitivity_figure(table: pd.DataFrame, path_png: str | Path) -> Any:
    """Draw the sensitivity curves and save them (:func:`knowloc.report.figures.save_figure`:
    PNG, PDF, SVG and the CSV of ``table`` beside them).

    One column of panels per axis present (neuron threshold, split threshold), one row per
    quantity (K_II share, CS2 gap, Welch's p on a log scale, ∩:II). On the neuron axis a
    method's static split is a solid line, Otsu's split a dashed one; on the split axis the
    static thresholds are a line and Otsu's thresholds are marked at their value (one
    marker per number of bins). Interval columns, when present, are drawn as bands.
    """
    from matplotlib.figure import Figure

    from ..report.figures import method_label, save_figure

    axes_present = [a for a in AXES if (table["axis"] == a).any()] or ["split"]
    methods = sort_methods(set(table["method"])) if len(table) else []
    colour = {m: f"C{i}" for i, m in enumerate(methods)}
    fig = Figure(figsize=(5.2 * len(axes_present), 2.5 * len(_PANELS) + 0.6))
    grid = fig.subplots(len(_PANELS), len(axes_present), squeeze=False, sharex="col")
    for j, axis in enumerate(axes_present):
        rows = table[table["axis"] == axis]
        for i, (col, label) in enumerate(_PANELS):
            ax = grid[i][j]
            if axis == "neuron":
                _neuron_panel(ax, rows, col, methods, colour)
            else:
                _split_panel(ax, rows, col, methods, colour)
            if col == "welch_p":
                ax.set_yscale("log")
                ax.axhline(0.05, color="0.5", linestyle=":", linewidth=0.8)
            elif col != "cs2_gap":
                ax.set_ylim(-0.03, 1.03)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel(label, fontsize=9)
        grid[-1][j].set_xlabel("neuron threshold t (Attr > t · max)" if axis == "neuron"
                               else "split threshold T (K_I: CS$_2$ > T)")
        grid[0][j].set_title("(a) neuron threshold" if axis == "neuron"
                             else "(b) split threshold", fontsize=10)
    handles = [_line(colour[m], "-", method_label(m)) for m in methods]
    if "neuron" in axes_present:
        handles += [_line("0.3", "-", "static split"), _line("0.3", "--", "Otsu split")]
    if "split" in axes_present:
        bins = sorted(int(b) for b in table.loc[table["split"] == "otsu", "bins"].dropna()
                      .unique())
        handles += [_line("0.3", _BIN_STYLES.get(b, ":"), f"Otsu, {b} bins",
                          marker=_BIN_MARKERS.get(b, "o")) for b in bins]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=8,
               frameon=False)
    fig.subplots_adjust(bottom=0.11, hspace=0.25, wspace=0.2)
    if table.empty:
        grid[0][0].text(0.5, 0.5, "no rows", transform=grid[0][0].transAxes, ha="center")
    save_figure(fig, path_png, table)
    return fig


def _line(colour: str, style: Any, label: str, marker: str | None = None) -> Any:
    from matplotlib.lines import Line2D

    return Line2D([], [], color=colour, linestyle=style or "none", marker=marker, label=label)


def _band(ax: Any, rows: pd.DataFrame, col: str, colour: str) -> None:
    lo, hi = f"{col}_lo", f"{col}_hi"
    if lo in rows.columns and hi in rows.columns and rows[lo].notna().any():
        ax.fill_between(rows["threshold"], rows[lo].astype(float), rows[hi].astype(float),
                        color=colour, alpha=0.15, linewidth=0)


def _plottable(values: pd.Series, col: str) -> pd.Series:
    v = values.astype(float)
    return v.where(v > 0) if col == "welch_p" else v


def _neuron_panel(ax: Any, rows: pd.DataFrame, col: str, methods: list[str],
                  colour: dict[str, str]) -> None:
    for split, style in (("static", "-"), ("otsu", "--")):
        part = rows[rows["split"] == split]
        if col == "cap_II":
            one = part.drop_duplicates("threshold").sort_values("threshold")
            ax.plot(one["threshold"], _plottable(one[col], col), color="0.2", linestyle=style,
                    marker="o", markersize=3)
            continue
        for m in methods:
            g = part[part["method"] == m].sort_values("threshold")
            ax.plot(g["threshold"], _plottable(g[col], col), color=colour[m], linestyle=style,
                    marker="o", markersize=3)
            if split == "static":
                _band(ax, g, col, colour[m])


def _split_panel(ax: Any, rows: pd.DataFrame, col: str, methods: list[str],
                 colour: dict[str, str]) -> None:
    static = rows[rows["split"] == "static"]
    otsu = rows[rows["split"] == "otsu"]
    if col == "cap_II":
        one = static.drop_duplicates("threshold").sort_values("threshold")
        ax.plot(one["threshold"], one[col].astype(float), color="0.2", marker="o", markersize=3)
        for b, g in otsu.groupby("bins"):  # one value per number of bins: a level
            ax.axhline(float(g[col].iloc[0]), color="0.5", linewidth=0.9,
                       linestyle=_BIN_STYLES.get(int(b), ":"))
        return
    for m in methods:
        g = static[static["method"] == m].sort_values("threshold")
        ax.plot(g["threshold"], _plottable(g[col], col), color=colour[m], marker="o",
                markersize=3)
        _band(ax, g, col, colour[m])
        for b, o in otsu[otsu["method"] == m].groupby("bins"):
            ax.plot(o["threshold"], _plottable(o[col], col), linestyle="none",
                    color=colour[m], marker=_BIN_MARKERS.get(int(b), "o"), markersize=6,
                    markerfacecolor="none")


def write_sensitivity(res: Sensitivity, out: str | Path | None = None) -> dict[str, Path]:
    """Write ``sensitivity.csv`` and ``figures/sensitivity.png`` (PDF, SVG and the same rows
    as CSV beside it) under ``out`` (default: the run directory); returns them by name."""
    from ..store.io import write_csv

    root = Path(out) if out is not None else res.run
    root.mkdir(parents=True, exist_ok=True)
    csv = root / "sensitivity.csv"
    write_csv(csv, res.table)
    png = root / "figures" / "sensitivity.png"
    sensitivity_figure(res.table, png)
    res.files = {"csv": csv, "png": png}
    return res.files


# ------------------------------------------------------------------ text and report
_DISPLAY = [("method", "method", ""), ("threshold", "threshold", ".3f"),
            ("split", "split", ""), ("n_facts", "n", "d"), ("k2_share", "R: II", ".2f"),
            ("cs2_gap", "S: I − S: II", ".3f"), ("welch_t", "t", ".1f"),
            ("welch_p", "p", ".1e"), ("cap_II", "∩: II", ".2f")]


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The sensitivity rows with the paper's headers, one format per column (text cells);
    the split column names Otsu's bins; a value with an interval reads ``v [lo, hi]``."""
    from ..report.tables import format_value

    cells: dict[str, list[str]] = {"axis": list(table["axis"].astype(str))}
    for col, header, fmt in _DISPLAY:
        values = []
        for rec in table.to_dict("records"):
            if col == "split" and rec["split"] == "otsu":
                values.append(f"otsu ({int(rec['bins'])} bins)")
                continue
            text = format_value(rec[col], fmt)
            lo, hi = rec.get(f"{col}_lo"), rec.get(f"{col}_hi")
            if lo is not None and hi is not None and not (pd.isna(lo) or pd.isna(hi)):
                text += f" [{format_value(lo, fmt)}, {format_value(hi, fmt)}]"
            values.append(text)
        cells[header] = values
    return pd.DataFrame(cells)


def sensitivity_markdown(table: pd.DataFrame) -> str:
    """The sensitivity rows as one Markdown table (:func:`display_table`)."""
    from ..report.tables import markdown_table

    return markdown_table(display_table(table))


def sensitivity_section(store: RunStore, spec: RunSpec | None = None) -> Any | None:
    """The report's "Threshold sensitivity" section (figure and table), written into the
    run directory; None when the run kept no complete maps or has no consistency results
    (the section needs no model, and is left out then)."""
    from ..report.html import Section

    if not has_maps(store) or store.table("consistency").empty:
        return None
    try:
        res = sensitivity(store, axes=AXES)
    except RunError as exc:
        log.info("report: no threshold sensitivity: %s", exc)
        return None
    files = write_sensitivity(res)
    spec = spec or read_spec(store)
    cfg = spec.consistency or consistency_config()
    text = (
        "<p>Table 1 as a function of its two thresholds, per method, read off the "
        "attribution maps the run kept (no model). (a) The relative neuron threshold t: the "
        "knowledge neurons of every query are those with Attr &gt; t &middot; max Attr, and "
        f"the facts are split at the static threshold {html.escape(str(cfg.static_threshold))}"
        " (solid) and at Otsu's (dashed). (b) The split threshold on the run's CS<sub>2</sub> "
        "values: static thresholds (line) and Otsu's with 64, 128 and 256 bins (markers). "
        "R: II is the share of facts in K<sub>II</sub>, S: I &minus; S: II the gap of mean "
        "CS<sub>2</sub> between K<sub>I</sub> and K<sub>II</sub>, p Welch's, &cap;: II the "
        "share of facts every method puts in K<sub>II</sub>.</p>")
    return Section(title="Threshold sensitivity", html=text,
                   tables=[("Threshold sensitivity", display_table(res.table), files["csv"])],
                   figures=[("Table 1 against the neuron and the split threshold",
                             files["png"], files["png"].with_suffix(".csv"))])
