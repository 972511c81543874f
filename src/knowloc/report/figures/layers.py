"""Where knowledge neurons sit: the share of a run's knowledge neurons per layer and method."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ...attribution import sort_methods
from ...store import RunStore
from .common import figure_files, method_label, save_figure


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
    return figure_files(png)
