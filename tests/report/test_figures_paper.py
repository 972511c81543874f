"""What a reader of the paper checks in the figures: axes, panels, spreads, colours, formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.container import BarContainer, ErrorbarContainer
from matplotlib.figure import Figure

from knowloc.report.figures import (
    OP_COLOURS,
    activation_heatmaps,
    bars_synapse_effects,
    kn_layer_bars,
    query_kn_bars,
    save_figure,
    violin_cs2,
    violin_predominance,
)


def _bars(ax) -> list[BarContainer]:
    return [c for c in ax.containers if isinstance(c, BarContainer)]


def test_every_figure_is_saved_as_png_pdf_svg_and_csv(tmp_path: Path) -> None:
    fig = Figure(figsize=(2, 2))
    fig.add_subplot().plot([0, 1], [1, 0])
    png = save_figure(fig, tmp_path / "line.png", pd.DataFrame({"x": [0, 1]}))
    assert png.read_bytes().startswith(b"\x89PNG")
    assert png.with_suffix(".pdf").read_bytes().startswith(b"%PDF")
    assert b"<svg" in png.with_suffix(".svg").read_bytes()[:2000]
    assert png.with_suffix(".csv").exists()


def test_layer_ticks_are_integers(tmp_path: Path) -> None:
    neurons = pd.DataFrame({"method": ["ig", "ig", "amig"], "layer": [0, 3, 5]})
    fig = kn_layer_bars(neurons, 6, tmp_path / "layers.png")
    ticks = fig.axes[0].get_xticks()
    assert list(ticks) == [0, 1, 2, 3, 4, 5]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == [str(i) for i in range(6)]


def _heatmap_table() -> pd.DataFrame:
    rows = []
    for q in ("q1", "q2"):
        for cond, scale in (("none", 1.0), ("suppress", 0.0)):
            for layer in range(3):
                for neuron in (7, 100, 2048):
                    rows.append({"query": q, "condition": cond, "layer": layer, "neuron": neuron,
                                 "activation": scale * (layer + 1), "is_kn": neuron == 100})
    return pd.DataFrame(rows)


def test_heatmaps_show_neuron_ids_and_differences(tmp_path: Path) -> None:
    fig = activation_heatmaps(_heatmap_table(), tmp_path / "fig7.png")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    # the suppressed panels and their after - before panels, no repeated "as is" panel
    assert sum("after − before" in t for t in titles) == 2
    assert not any("no manipulation" in t and "after" not in t for t in titles)
    ax = next(a for a in fig.axes if "after − before" in a.get_title())
    assert [t.get_text() for t in ax.get_xticklabels()] == ["7", "100", "2048"]
    diff = ax.images[0].get_array()
    assert np.allclose(diff, -np.array([[1.0] * 3, [2.0] * 3, [3.0] * 3]))


def test_figure5_with_every_fact_k_i(tmp_path: Path) -> None:
    pred = pd.DataFrame({"fact_id": ["a", "a", "b", "b"], "kind": ["K_I"] * 4,
                         "first": [True, False, True, False], "P": [1.0, 0.5, 1.0, 0.75]})
    fig = violin_predominance(pred, tmp_path / "fig5.png")
    assert isinstance(fig, Figure)
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["K_I\n2 facts", "K_II\n0 facts"]
    assert any(t.get_text() == "no facts" for t in fig.axes[0].texts)
    # two facts per group: the points are drawn
    assert sum(len(c.get_offsets()) for c in fig.axes[0].collections
               if hasattr(c, "get_offsets")) >= 4


def test_small_violins_show_their_points(tmp_path: Path) -> None:
    scores = pd.DataFrame({"method": "ig", "relation": ["P1"] * 3, "fact_id": ["a", "b", "c"],
                           "cs2": [0.1, 0.5, 0.9]})
    fig = violin_cs2(scores, "ig", tmp_path / "v.png", 0.1)
    points = [c for c in fig.axes[0].collections if type(c).__name__ == "PathCollection"]
    assert sorted(np.concatenate([p.get_offsets()[:, 1] for p in points])) == [0.1, 0.5, 0.9]


def _interval_bars(ax) -> list[ErrorbarContainer]:
    return [c for c in ax.containers if isinstance(c, ErrorbarContainer)]


def test_figures_4_and_6_have_error_bars_in_the_same_colours(tmp_path: Path) -> None:
    f4 = pd.DataFrame({"kind": ["K_I"], "set": ["Self"], "suppress": [0.5], "suppress_lo": [0.3],
                       "suppress_hi": [0.8], "enhance": [2.0], "enhance_lo": [1.2],
                       "enhance_hi": [2.9], "avg": [1.25], "avg_lo": [0.9], "avg_hi": [1.7],
                       "n_queries": [3], "n_empty": [0]})
    fig4 = query_kn_bars(f4, tmp_path / "f4.png", method="ig")
    csv = pd.read_csv(tmp_path / "f4.csv")
    assert list(csv.columns) == list(f4.columns)  # the table's bounds, no other spread
    colours4 = {c.get_label(): c.patches[0].get_facecolor() for c in _bars(fig4.axes[0])}
    assert len(_interval_bars(fig4.axes[0])) == 3  # one interval per bar

    eff = pd.DataFrame({"kind": "K_I", "synapses": "self", "operation": ["sup", "enh"] * 3,
                        "fact_id": ["a", "a", "b", "b", "c", "c"],
                        "delta_value": [0.1, 0.2, 0.3, 0.4, 0.5, 0.9],
                        "delta_prob": [0.2, 0.4, 0.6, 0.1, 0.3, 0.5]})
    fig6 = bars_synapse_effects(eff, tmp_path / "f6.png")
    colours6 = {c.get_label(): c.patches[0].get_facecolor() for c in _bars(fig6.axes[0])}
    assert colours6["Sup (× 0)"] == colours4["Sup (×0)"]
    assert colours6["Enh (× 2)"] == colours4["Enh (×2)"]
    assert colours6["Avg"] == colours4["Avg"]
    assert set(OP_COLOURS) == {"suppress", "enhance", "avg"}
    summary = pd.read_csv(tmp_path / "f6.csv")
    sup = summary[(summary.operation == "sup") & (summary.metric == "delta_value")]
    # one value per fact: the bounds lie within the smallest and largest fact means
    assert 0.1 <= sup["value_lo"].iloc[0] <= sup["value"].iloc[0] <= sup["value_hi"].iloc[0] <= 0.5
    assert len(_interval_bars(fig6.axes[0])) == 3
