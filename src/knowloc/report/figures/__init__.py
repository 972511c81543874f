"""Every figure of knowloc, drawn from saved tables (never from a model).

Each plot function builds a :class:`matplotlib.figure.Figure` (directly, so nothing touches
pyplot's global state or the process-wide backend), writes it as a PNG together with the CSV
of the rows it plots (same stem, ``.csv``) via :func:`save_figure`, and returns the figure.
The stage functions (:func:`consistency_figures`, :func:`mapping_figures`,
:func:`attention_figures`, :func:`heatmap_figures`, :func:`kn_layers`) draw the figures of
one stage into a run directory and return ``{name: (png, csv)}``.

The package's modules:

- :mod:`~knowloc.report.figures.common`: :func:`save_figure`, the shared style (:data:`DPI`,
  colours, method labels) and helpers of every figure;
- :mod:`~knowloc.report.figures.consistency`: Figures 3, 8, 9 (CS2 violins);
- :mod:`~knowloc.report.figures.mapping`: Figure 4 (ΔProb of editing KN activations);
- :mod:`~knowloc.report.figures.attention`: Figures 5 (predominance) and 6 (knowledge
  synapses × 0 / × 2);
- :mod:`~knowloc.report.figures.heatmaps`: Figures 1, 7, 10 (layer × neuron activations);
- :mod:`~knowloc.report.figures.layers`: where knowledge neurons sit, per layer.
"""

from __future__ import annotations

from .attention import (
    OPERATION_LABELS,
    OPERATION_NAMES,
    SYNAPSE_LABELS,
    attention_figures,
    bars_synapse_effects,
    violin_predominance,
)
from .common import DPI, FEW_POINTS, METHOD_LABELS, OP_COLOURS, Files, method_label, save_figure
from .consistency import consistency_figures, violin_cs2
from .heatmaps import (
    CONDITION_LABELS,
    CONDITION_ORDER,
    HEATMAP_FIGURES,
    HEATMAP_TITLES,
    activation_heatmaps,
    attention_heatmaps,
    heatmap_figures,
)
from .layers import kn_layer_bars, kn_layers
from .mapping import mapping_figures, query_kn_bars

__all__ = [
    "CONDITION_LABELS",
    "CONDITION_ORDER",
    "DPI",
    "FEW_POINTS",
    "HEATMAP_FIGURES",
    "HEATMAP_TITLES",
    "METHOD_LABELS",
    "OPERATION_LABELS",
    "OPERATION_NAMES",
    "OP_COLOURS",
    "SYNAPSE_LABELS",
    "Files",
    "activation_heatmaps",
    "attention_figures",
    "attention_heatmaps",
    "bars_synapse_effects",
    "consistency_figures",
    "heatmap_figures",
    "kn_layer_bars",
    "kn_layers",
    "mapping_figures",
    "method_label",
    "query_kn_bars",
    "save_figure",
    "violin_cs2",
    "violin_predominance",
]
