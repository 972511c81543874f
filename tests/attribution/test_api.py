"""Attribution.to_frame, Attribution.plot and the notebook display."""

from __future__ import annotations

import dataclasses
import html
import io
import sys

import numpy as np
import pytest
import torch
from tiny import tiny_model

from knowloc import attribute, knowledge_neurons
from knowloc.errors import ConfigError

PROMPT, ANSWER = "the official language of brazil is", "portuguese"


@pytest.fixture(scope="module")
def attr():
    m = tiny_model("llama")
    q = type("Q", (), {"prompt": PROMPT, "answer": ANSWER, "query_id": "f#0",
                       "fact_id": "f", "relation": "P37"})()
    return attribute(m, q, "ig", n_steps=4, progress=False)


# ------------------------------------------------------------------------ to_frame
def test_to_frame_is_the_map_one_row_per_neuron(attr):
    df = attr.to_frame()
    n_layers, d_mlp = attr.scores.shape
    assert list(df.columns) == ["layer", "neuron", "attribution", "activation"]
    assert len(df) == n_layers * d_mlp
    assert df["layer"].dtype == np.int64 and df["attribution"].dtype == np.float64
    # every row holds exactly the map's value at (layer, neuron)
    layer, neuron = df["layer"].to_numpy(), df["neuron"].to_numpy()
    assert np.array_equal(df["attribution"].to_numpy(),
                          attr.scores.double().numpy()[layer, neuron])
    assert np.array_equal(df["activation"].to_numpy(),
                          attr.activations.double().numpy()[layer, neuron])
    # in (layer, neuron) order: the frame reshapes back into the map
    back = torch.tensor(df["attribution"].to_numpy().reshape(n_layers, d_mlp))
    assert torch.equal(back.to(attr.scores.dtype), attr.scores)
    assert df.attrs["prompt"] == PROMPT and df.attrs["answer"] == ANSWER
    assert df.attrs["method"] == "ig" and df.attrs["prob"] == attr.prob
    assert df.attrs["query_id"] == "f#0" and df.attrs["config"]["n_steps"] == 4


def test_to_frame_top_matches_top_and_meta_columns(attr):
    top = attr.to_frame(top=7, meta=True)
    assert list(top.columns) == ["method", "fact_id", "query_id", "prompt", "answer",
                                 "layer", "neuron", "attribution", "activation"]
    expect = attr.top(7)
    assert [(r.layer, r.neuron) for r in top.itertuples()] == [(a, b) for a, b, _, _ in expect]
    assert top["attribution"].tolist() == pytest.approx([s for _, _, s, _ in expect], abs=0)
    assert set(top["query_id"]) == {"f#0"} and set(top["prompt"]) == {PROMPT}
    assert len(attr.to_frame(top=0)) == 0
    assert len(attr.to_frame(top=10**6)) == attr.scores.numel()
    for bad in (-1, 2.5, True):
        with pytest.raises(ConfigError, match="top"):
            attr.to_frame(top=bad)


# ------------------------------------------------------------------------ plot
def _threshold_line(fig):
    (ax,) = fig.axes
    lines = [ln for ln in ax.lines if ln.get_gid() == "threshold"]
    assert len(lines) == 1
    return ax, lines[0]


@pytest.mark.parametrize("t", [0.2, 0.5])
def test_plot_draws_the_threshold_line_at_t_times_max(attr, t):
    from matplotlib.figure import Figure

    pyplot_figs = (sys.modules["matplotlib.pyplot"].get_fignums()
                   if "matplotlib.pyplot" in sys.modules else None)
    fig = attr.plot(threshold=t)
    assert isinstance(fig, Figure)
    ax, line = _threshold_line(fig)
    top = float(attr.scores.max())
    assert top > 0
    assert list(line.get_ydata()) == pytest.approx([t * top] * 2, rel=1e-12)
    # highlighted points are exactly the knowledge neurons at this threshold
    kn = knowledge_neurons(attr, threshold=t)
    highlighted = [c for c in ax.collections if "knowledge neurons" in str(c.get_label())]
    assert len(highlighted) == 1
    assert len(highlighted[0].get_offsets()) == len(kn) > 0
    assert all(y > t * top for _, y in highlighted[0].get_offsets())
    n_points = sum(len(c.get_offsets()) for c in ax.collections)
    assert n_points == attr.scores.numel()
    fig.savefig(io.BytesIO(), format="png")  # renders without a display
    if pyplot_figs is not None:  # no figure left in pyplot's global state
        assert sys.modules["matplotlib.pyplot"].get_fignums() == pyplot_figs


def test_plot_into_a_given_axes_returns_its_figure(attr):
    from matplotlib.figure import Figure

    fig = Figure()
    ax1, ax2 = fig.subplots(1, 2)
    assert attr.plot(0.3, ax=ax2) is fig
    assert not ax1.lines and _threshold_line_of(ax2)
    sub = Figure().subfigures(1, 2)[1]
    assert attr.plot(ax=sub.add_subplot()) is sub.figure


def _threshold_line_of(ax):
    return [ln for ln in ax.lines if ln.get_gid() == "threshold"]


def test_plot_of_a_map_without_positive_scores_highlights_nothing(attr):
    neg = dataclasses.replace(attr, scores=-attr.scores.abs() - 1)
    ax, line = _threshold_line(neg.plot())
    assert len(knowledge_neurons(neg)) == 0
    highlighted = [c for c in ax.collections if "knowledge neurons" in str(c.get_label())]
    assert len(highlighted[0].get_offsets()) == 0
    assert line.get_ydata()[0] == pytest.approx(0.2 * float(neg.scores.max()))


@pytest.mark.parametrize("bad", [-0.1, 1.5, "max", True])
def test_plot_rejects_a_bad_threshold(attr, bad):
    with pytest.raises(ConfigError, match="threshold"):
        attr.plot(threshold=bad)


# ------------------------------------------------------------------------ notebook display
def test_repr_html_summarizes_prompt_answer_p_and_top_neurons(attr):
    text = attr._repr_html_()
    assert PROMPT in text and ANSWER in text
    assert f"{attr.prob:.4f}" in text
    assert "ig (4 steps)" in text
    n_kn = len(knowledge_neurons(attr, 0.2))
    assert f"{n_kn} above 0.2 × max" in text
    for layer, neuron, score, _ in attr.top(5):
        assert f"<td>{layer}</td><td>{neuron}</td><td>{score:.4g}</td>" in text
    assert text.count("<tr><td>") == 5  # five neuron rows: the display stays short
    assert "f#0" in text


def test_repr_html_escapes_the_prompt(attr):
    odd = dataclasses.replace(attr, prompt="x < y & <b>z</b>", answer="<i>")
    text = odd._repr_html_()
    assert "<b>z</b>" not in text and html.escape("x < y & <b>z</b>") in text
    assert "<i>" not in text and "&lt;i&gt;" in text
