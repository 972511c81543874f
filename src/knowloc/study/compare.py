"""Models side by side: the Table 1 of several runs, one block of rows per model, as in the
paper's Table 1 (model × threshold kind × method), with the runs' intervals.

:func:`compare` reads each run directory alone (no model): its ``config.yaml`` for the model
and its stored consistency results, from which the Table 1 of ``knowloc report`` is
computed (the run's static threshold and Otsu's, its bootstrap settings).
:func:`write_compare` writes ``compare.md``, ``compare.csv`` and ``compare.png`` (the K_II
share per model and method with its interval; PDF and SVG beside it).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..attribution import sort_methods
from ..errors import ConfigError, RunError
from ..store import RunStore
from .spec import read_spec

log = logging.getLogger(__name__)

__all__ = ["PAPER_TABLE1", "Comparison", "compare", "compare_figure", "compare_markdown",
           "paper_table1", "write_compare"]

#: Columns in front of each run's Table 1 columns in :attr:`Comparison.table`.
RUN_COLUMNS = ["model", "run"]

#: The paper's Table 1 (Chen et al., ICLR 2025): model -> threshold kind -> method ->
#: (R: I, S: I, R: II, S: II, t), and ∩: II per (model, threshold kind). IG is Dai et al.'s
#: method, SIG Enguehard's, AMIG Chen et al.'s. The paper gives p < 1e-6 in every case, and
#: neither n nor intervals.
PAPER_TABLE1: dict[str, dict[str, Any]] = {
    "GPT-2": {
        "St": {"ig": (0.56, 0.21, 0.44, 0.03, 236), "sig": (0.54, 0.23, 0.46, 0.03, 235),
               "amig": (0.53, 0.25, 0.47, 0.03, None), "cap_II": 0.42},
        "Ot": {"ig": (0.41, 0.24, 0.59, 0.06, 223), "sig": (0.44, 0.29, 0.55, 0.05, 219),
               "amig": (0.40, 0.29, 0.60, 0.06, None), "cap_II": 0.53},
    },
    "LLaMA2-7b": {
        "St": {"ig": (0.40, 0.21, 0.60, 0.04, 158), "sig": (0.39, 0.20, 0.61, 0.04, 150),
               "amig": (0.40, 0.20, 0.60, 0.04, None), "cap_II": 0.55},
        "Ot": {"ig": (0.21, 0.28, 0.79, 0.062, 152), "sig": (0.20, 0.25, 0.80, 0.07, 158),
               "amig": (0.24, 0.30, 0.76, 0.06, None), "cap_II": 0.70},
    },
    "LLaMA3-8b": {
        "St": {"ig": (0.16, 0.16, 0.84, 0.03, 114), "sig": (0.15, 0.18, 0.85, 0.03, 105),
               "amig": (0.18, 0.19, 0.82, 0.03, None), "cap_II": 0.77},
        "Ot": {"ig": (0.23, 0.14, 0.77, 0.03, 128), "sig": (0.21, 0.15, 0.79, 0.03, 107),
               "amig": (0.24, 0.16, 0.76, 0.03, None), "cap_II": 0.70},
    },
}


def paper_table1() -> pd.DataFrame:
    """The paper's Table 1 (:data:`PAPER_TABLE1`) in the columns of
    :attr:`Comparison.table`: one block per model (``"GPT-2 (paper)"``, ...; ``run`` is
    ``"paper"``), NaN where the paper gives no value (n, thresholds, intervals; the t of
    AMIG, which its table leaves out; p, given only as < 1e-6)."""
    rows = []
    for model, kinds in PAPER_TABLE1.items():
        for kind, methods in kinds.items():
            for method in ("ig", "sig", "amig"):
                r_i, s_i, r_ii, s_ii, t = methods[method]
                rows.append({"model": f"{model} (paper)", "run": "paper", "method": method,
                             "T": kind, "R_I": r_i, "S_I": s_i, "R_II": r_ii, "S_II": s_ii,
                             "t": np.nan if t is None else float(t), "p": np.nan,
                             "cap_II": methods["cap_II"]})
    return pd.DataFrame(rows)


@dataclass
class Comparison:
    """The Table 1 of several runs.

    Attributes:
        table: one block of rows per run, in the order given: ``model`` (the model's name,
            with the run directory's name when two runs share a model), ``run`` (the run
            directory), then the run's Table 1 columns (threshold kind ``T``, method, ...)
            in the run's row order.
        runs: the run directories.
    """

    table: pd.DataFrame
    runs: list[Path]
    files: dict[str, Path] = field(default_factory=dict)


def _run_table1(run: Path) -> tuple[str, pd.DataFrame]:
    """The model name and the Table 1 of one run, as its report computes it."""
    from .stages import ConsistencyStage

    store = RunStore(run, create=False)
    spec = read_spec(store)
    result = ConsistencyStage.from_spec(spec).collect(store, spec)
    if result is None:
        raise RunError(f"run {store.root} has no consistency results; run "
                       f"`knowloc consistency --run {store.root}` first")
    name = spec.model_info.get("name") or spec.model.get("name") or store.root.name
    return str(name), result.table1


def compare(runs: Sequence[str | Path], paper: bool = False) -> Comparison:
    """Table 1 of each run, one block per model (see :class:`Comparison`); with ``paper``,
    the paper's blocks (:func:`paper_table1`) first.

    Raises:
        ConfigError: no run, or a run given twice.
        RunError: a path that is not a run directory, or a run without consistency
            results.
    """
    if not runs:
        raise ConfigError("compare needs at least one run directory")
    paths = [RunStore(r, create=False).root for r in runs]
    twice = [p for p, c in Counter(paths).items() if c > 1]
    if twice:
        raise ConfigError(f"run {twice[0]} is given twice; give each run once")
    blocks = [_run_table1(p) for p in paths]
    names = Counter(name for name, _ in blocks)
    parts = []
    for path, (name, t1) in zip(paths, blocks):
        label = name if names[name] == 1 else f"{name} ({path.name})"
        block = t1.copy()
        block.insert(0, "run", str(path))
        block.insert(0, "model", label)
        parts.append(block)
    columns = list(dict.fromkeys(c for part in parts for c in part.columns))
    if paper:
        parts.insert(0, paper_table1())
    table = pd.concat(parts, ignore_index=True, sort=False)[columns]  # the runs' order
    return Comparison(table, paths)


#: Markdown columns: (column, header, format); a column with ``_lo``/``_hi`` beside it
#: reads ``value [lo, hi]``.
_MD = [("model", "model", ""), ("T", "T", ""), ("method", "method", ""),
       ("threshold", "threshold", ".3f"), ("n_facts", "n", "d"), ("R_I", "R: I", ".2f"),
       ("S_I", "S: I", ".3f"), ("R_II", "R: II", ".2f"), ("S_II", "S: II", ".3f"),
       ("t", "t", ".1f"), ("p", "p", ".1e"), ("cap_II", "∩: II", ".2f")]


def compare_markdown(table: pd.DataFrame) -> str:
    """The comparison as one Markdown table like the paper's Table 1: model, threshold kind
    (St: static, Ot: Otsu), method, n, R: I, S: I, R: II, S: II, t, p, ∩: II; shares and
    means with their 95% interval when the runs have them; the model and threshold kind
    written once per block."""
    from ..report.figures import method_label
    from ..report.tables import format_value

    cols = [c for c in _MD if c[0] in table.columns]
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |",
             "|" + "|".join(":---" if f == "" else "---:" for _, _, f in cols) + "|"]
    last: tuple[Any, Any] = (None, None)
    for rec in table.to_dict("records"):
        cells = []
        for col, _, fmt in cols:
            value = rec[col]
            if col == "model":
                cells.append(str(value) if value != last[0] else "")
            elif col == "T":
                cells.append(str(value) if (rec["model"], value) != last else "")
            elif col == "method":
                cells.append(method_label(str(value)))
            else:
                text = format_value(value, fmt)
                lo, hi = rec.get(f"{col}_lo"), rec.get(f"{col}_hi")
                if lo is not None and hi is not None and not (pd.isna(lo) or pd.isna(hi)):
                    text += f" [{format_value(lo, fmt)}, {format_value(hi, fmt)}]"
                cells.append(text)
        last = (rec["model"], rec["T"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare_figure(table: pd.DataFrame, path_png: str | Path) -> Any:
    """Bars of the K_II share (R: II) per model and method, one panel per threshold kind,
    with the 95% interval as error bars when the runs have it; saved with
    :func:`knowloc.report.figures.save_figure` (PNG, PDF, SVG and ``table`` as the CSV)."""
    from matplotlib.figure import Figure

    from ..report.figures import method_label, save_figure

    kinds = list(dict.fromkeys(table["T"].astype(str)))
    models = list(dict.fromkeys(table["model"].astype(str)))
    methods = sort_methods(set(table["method"].astype(str)))
    width = 0.8 / max(len(methods), 1)
    fig = Figure(figsize=(max(4.0, 1.2 + 1.1 * len(models) * max(len(methods), 1) * 0.6)
                          * max(len(kinds), 1), 3.8))
    axes = fig.subplots(1, max(len(kinds), 1), squeeze=False, sharey=True)[0]
    labels = {"St": "static threshold", "Ot": "Otsu's threshold"}
    for ax, kind in zip(axes, kinds):
        rows = table[table["T"].astype(str) == kind]
        for j, m in enumerate(methods):
            g = rows[rows["method"].astype(str) == m].set_index("model").reindex(models)
            x = np.arange(len(models)) + (j - (len(methods) - 1) / 2) * width
            y = g["R_II"].astype(float).to_numpy()
            err = None
            if "R_II_lo" in g.columns and "R_II_hi" in g.columns:
                lo = g["R_II_lo"].astype(float).to_numpy()
                hi = g["R_II_hi"].astype(float).to_numpy()
                err = np.vstack([np.where(np.isnan(lo), 0, y - lo),
                                 np.where(np.isnan(hi), 0, hi - y)])
                err = np.nan_to_num(err)
            ax.bar(x, np.nan_to_num(y), width=width, color=f"C{j}", label=method_label(m),
                   yerr=err, capsize=3, error_kw={"linewidth": 0.9})
        ax.set_xticks(np.arange(len(models)))
        ax.set_xticklabels(models, rotation=20 if len(models) > 2 else 0,
                           ha="right" if len(models) > 2 else "center", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(labels.get(kind, kind), fontsize=10)
    axes[0].set_ylabel("K$_{II}$ share (R: II), 95% interval")
    axes[0].legend(fontsize=8, loc="upper left")
    save_figure(fig, path_png, table)
    return fig


def write_compare(cmp: Comparison, out: str | Path) -> dict[str, Path]:
    """Write ``compare.md``, ``compare.csv`` and ``compare.png`` (with its PDF and SVG; the
    CSV is the figure's) under ``out``; returns them by name."""
    from ..store.io import atomic_write_text

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    md = root / "compare.md"
    atomic_write_text(md, compare_markdown(cmp.table))
    png = root / "compare.png"
    compare_figure(cmp.table, png)  # writes compare.csv, the rows it draws
    cmp.files = {"md": md, "csv": png.with_suffix(".csv"), "png": png}
    return cmp.files
