"""What every figure shares: :func:`save_figure` (PNG, PDF, SVG and the CSV behind them, each
written atomically), the style (:data:`DPI`, colours, method labels) and small helpers."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ...attribution import get_method, method_names
from ...data import natural_key
from ...errors import ConfigError, DataError
from ...store.io import atomic_write, write_csv

logger = logging.getLogger(__name__)

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

#: What the error bars of the figures of means (Figures 4 and 6) are: the intervals of
#: their tables (``<col>_lo``, ``<col>_hi``).
INTERVAL_BARS = "error bars: 95% interval, bootstrap over facts"

#: ``name -> (png, csv)`` of the figures a stage function drew.
Files = dict[str, tuple[Path, Path]]


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


def method_label(method: str) -> str:
    """The registry's label of a method (the name itself for an unregistered one)."""
    return get_method(method).label if method in method_names() else method


def figure_files(png: Path) -> tuple[Path, Path]:
    """The PNG and the CSV beside it."""
    return png, png.with_suffix(".csv")


def need_columns(df: pd.DataFrame, cols: Sequence[str], what: str) -> None:
    """Raise :class:`DataError` naming the columns of ``cols`` that ``df`` lacks."""
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise DataError(f"{what} needs column(s) {missing}; got {list(df.columns)}")


def ordered(values: Sequence[object], order: Sequence[str]) -> list[str]:
    """The distinct values as strings: those in ``order`` first (in that order), then the others
    in natural order (:func:`knowloc.data.natural_key`)."""
    vals = [str(v) for v in dict.fromkeys(values)]
    known = [v for v in order if v in vals]
    return known + sorted((v for v in vals if v not in order), key=natural_key)


def interval_bars(ax: Axes, x: Sequence[float] | np.ndarray, lo: Sequence[float] | np.ndarray,
                  hi: Sequence[float] | np.ndarray) -> None:
    """Draw the intervals ``[lo[i], hi[i]]`` at the positions ``x[i]`` as black capped
    error bars, exactly from ``lo`` to ``hi`` whatever the height of the bar beside them; an
    interval with a NaN bound (fewer than two facts) draws nothing."""
    xs, low, high = (np.asarray(v, dtype=float) for v in (x, lo, hi))
    ok = ~(np.isnan(low) | np.isnan(high))
    if ok.any():
        ax.errorbar(xs[ok], (low[ok] + high[ok]) / 2, yerr=(high[ok] - low[ok]) / 2,
                    fmt="none", ecolor="black", elinewidth=0.9, capsize=2, zorder=3,
                    label="_nolegend_")
