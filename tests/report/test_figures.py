"""Figures (knowloc.report.figures): PNG + CSV of each plot, moved here from the stage tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from tiny import tiny_model

from knowloc.consistency import SKIP_EMPTY_UNION, SKIP_FEW_QUERIES
from knowloc.data import natural_key
from knowloc.errors import ConfigError
from knowloc.interventions.attention import heatmap_frame
from knowloc.report.figures import (
    activation_heatmaps,
    bars_synapse_effects,
    save_figure,
    violin_cs2,
    violin_predominance,
)

PROMPT = "the official language of brazil is"
OTHER = "people in japan speak the language known as"


def test_natural_key() -> None:
    assert sorted(["P101", "P17", "P1001", "P2"], key=natural_key) == ["P2", "P17", "P101", "P1001"]


def test_violin_writes_png_and_csv(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for r in ("P101", "P17", "P30"):
        for i in range(25):
            rows.append(
                {
                    "method": "ig",
                    "relation": r,
                    "fact_id": f"{r}-{i}",
                    "cs2": float(np.clip(rng.beta(1, 6), 0, 1)),
                    "skipped": None,
                }
            )
    rows.append(
        {"method": "ig", "relation": "P9", "fact_id": "lonely", "cs2": 0.4, "skipped": None}
    )
    rows.append(
        {
            "method": "ig",
            "relation": "P9",
            "fact_id": "skipped",
            "cs2": np.nan,
            "skipped": SKIP_FEW_QUERIES,
        }
    )
    rows.append(
        {"method": "sig", "relation": "P17", "fact_id": "other", "cs2": 0.2, "skipped": None}
    )
    df = pd.DataFrame(rows)

    png = tmp_path / "fig" / "violin_ig.png"
    fig = violin_cs2(df, "ig", png, threshold=0.1)
    assert isinstance(fig, Figure) and fig.axes
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv = pd.read_csv(png.with_suffix(".csv"), dtype={"relation": str, "fact_id": str})
    assert list(csv.columns) == ["relation", "fact_id", "cs2"]
    expected = df[(df.method == "ig") & df.skipped.isna()]
    assert len(csv) == len(expected)
    assert set(csv.fact_id) == set(expected.fact_id)
    merged = csv.merge(expected, on="fact_id", suffixes=("", "_in"))
    assert np.allclose(merged.cs2, merged.cs2_in) and (merged.relation == merged.relation_in).all()
    assert list(dict.fromkeys(csv.relation)) == ["P9", "P17", "P30", "P101"]
    assert not [p for p in png.parent.iterdir() if p.name.startswith(".")]  # no temp files

    with pytest.raises(ConfigError):
        violin_cs2(df, "amig", tmp_path / "x.png", threshold=0.1)
    with pytest.raises(ConfigError):
        violin_cs2(df, "ig", tmp_path / "x.pdf", threshold=0.1)
    # a method with nothing to plot still gives a (annotated) figure and an empty CSV
    only_skipped = df.assign(method="ig", skipped=SKIP_EMPTY_UNION)
    p2 = tmp_path / "empty.png"
    assert isinstance(violin_cs2(only_skipped, "ig", p2, threshold=0.1), Figure)
    assert p2.exists() and pd.read_csv(p2.with_suffix(".csv")).empty


def test_save_figure(tmp_path: Path) -> None:
    fig = Figure(figsize=(2, 2))
    fig.add_subplot(1, 1, 1).plot([0, 1], [1, 0])
    data = pd.DataFrame({"x": [0, 1], "y": [1, 0]})
    out = save_figure(fig, tmp_path / "a" / "b" / "line.png", data)
    assert out.exists() and out.stat().st_size > 0
    pd.testing.assert_frame_equal(pd.read_csv(out.with_suffix(".csv")), data)


def test_attention_plots_write_png_and_csv(tmp_path):
    m = tiny_model("gpt2")
    frame = heatmap_frame(m, [PROMPT, OTHER], conditions=("none", "suppress", "enhance"))
    frame["is_kn"] = (frame["layer"] == 2) & (frame["neuron"] < 3)
    png = tmp_path / "fig10.png"
    assert isinstance(activation_heatmaps(frame, png, title="tiny"), Figure)
    assert png.stat().st_size > 0
    csv = pd.read_csv(tmp_path / "fig10.csv")
    assert len(csv) == len(frame) and set(csv["condition"]) == {"none", "suppress", "enhance"}

    pred = pd.DataFrame({
        "fact_id": ["a", "b", "c", "a", "b", "c"],
        "kind": ["K_I", "K_II", "K_II", "K_I", "K_II", "K_II"],
        "first": [True, True, True, False, False, False],
        "P": [1.0, 1.0, 1.0, 0.5, 0.25, float("nan")],
    })
    violin_predominance(pred, tmp_path / "fig5.png")
    assert len(pd.read_csv(tmp_path / "fig5.csv")) == 5

    eff = pd.DataFrame({
        "kind": ["K_I"] * 4 + ["K_II"] * 4,
        "synapses": ["self", "self", "irrelevant", "irrelevant"] * 2,
        "operation": ["sup", "enh"] * 4,
        "delta_value": [0.4, 0.2, 0.1, 0.0, 0.6, 0.4, 0.1, 0.1],
        "delta_prob": [0.8, 0.6, 0.2, 0.0, 0.9, 0.7, 0.3, 0.1],
    })
    bars_synapse_effects(eff, tmp_path / "fig6.png")
    summary = pd.read_csv(tmp_path / "fig6.csv")
    row = summary[(summary.kind == "K_II") & (summary.synapses == "self")
                  & (summary.operation == "avg") & (summary.metric == "delta_prob")]
    assert float(row["value"].iloc[0]) == pytest.approx(0.8)
    assert len(summary) == 2 * 2 * 3 * 2


def test_method_labels_captions_and_order_come_from_the_registry(tmp_path):
    from knowloc.report.figures import kn_layers, method_label
    from knowloc.report.sections import violin_caption
    from knowloc.store import RunStore

    assert violin_caption("ig") == "CS2 per relation, IG (Figure 3)"
    assert violin_caption("sig") == "CS2 per relation, SIG (Figure 8)"
    assert violin_caption("amig") == "CS2 per relation, AMIG (Figure 9)"
    assert violin_caption("toy") == "CS2 per relation, toy"  # no invented figure number
    assert method_label("amig") == "AMIG"
    # an unregistered method is drawn after the registered ones, not dropped
    neurons = pd.DataFrame({"method": ["toy", "amig", "ig", "toy"], "layer": [0, 1, 1, 1]})
    png, csv = kn_layers(RunStore(tmp_path / "run"), neurons, n_layers=2)
    data = pd.read_csv(csv)
    assert list(dict.fromkeys(data["method"])) == ["ig", "amig", "toy"]
    assert data.loc[data["method"] == "toy", "n_neurons"].tolist() == [1, 1]
    assert png.exists()
