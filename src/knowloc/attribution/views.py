"""Views of one :class:`~knowloc.attribution.Attribution`: a table, a plot and a notebook
display. They back :meth:`Attribution.to_frame`, :meth:`Attribution.plot` and
``Attribution._repr_html_``; pandas and matplotlib are imported only when a view is made.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .result import Attribution

__all__ = ["FRAME_COLUMNS", "META_COLUMNS", "attribution_frame", "attribution_html",
           "attribution_meta", "plot_attribution"]

#: Columns of :func:`attribution_frame`, one row per neuron.
FRAME_COLUMNS: list[str] = ["layer", "neuron", "attribution", "activation"]
#: Columns :func:`attribution_frame` puts first with ``meta=True``.
META_COLUMNS: list[str] = ["method", "fact_id", "query_id", "prompt", "answer"]


def _check_threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.number)) \
            or not 0 <= float(threshold) <= 1:
        raise ConfigError(f"threshold is a fraction of the largest score, in [0, 1] "
                          f"(got {threshold!r}); 0.2 is the usual choice")
    return float(threshold)


def _numpy(t: Any) -> np.ndarray:
    """A ``[n_layers, d_mlp]`` tensor as a float64 array (exact: float32 -> float64)."""
    return np.asarray(t.detach().cpu().double().numpy(), dtype=np.float64)


def attribution_meta(attr: Attribution) -> dict[str, Any]:
    """What the attribution is of: prompt, answer, method, P(answer), top-1, ids, config."""
    return {
        "prompt": attr.prompt,
        "answer": attr.answer,
        "method": attr.method,
        "prob": float(attr.prob),
        "top1": bool(attr.top1),
        "predicted": attr.predicted,
        "target_ids": tuple(int(t) for t in (attr.target_ids or (attr.target_id,))),
        "fact_id": attr.fact_id,
        "query_id": attr.query_id,
        "relation": attr.relation,
        "config": dict(attr.config),
    }


def attribution_frame(attr: Attribution, *, top: int | None = None,
                      meta: bool = False) -> pd.DataFrame:
    """One row per MLP neuron: ``layer, neuron, attribution, activation`` (see
    :meth:`knowloc.attribution.Attribution.to_frame`)."""
    import pandas as pd

    scores, acts = _numpy(attr.scores), _numpy(attr.activations)
    d_mlp = scores.shape[1]
    flat = scores.reshape(-1)
    if top is None:
        idx = np.arange(flat.size)
    else:
        if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 0:
            raise ConfigError(f"top must be a non-negative integer (got {top!r})")
        # highest first; ties by (layer, neuron) so the order is reproducible
        idx = np.argsort(-flat, kind="stable")[: int(top)]
    df = pd.DataFrame({
        "layer": (idx // d_mlp).astype(np.int64),
        "neuron": (idx % d_mlp).astype(np.int64),
        "attribution": flat[idx],
        "activation": acts.reshape(-1)[idx],
    })
    info = attribution_meta(attr)
    if meta:
        for i, col in enumerate(META_COLUMNS):
            df.insert(i, col, pd.Series([info[col]] * len(df), dtype=object))
    df.attrs.update(info)
    return df


def _native(t: Any) -> np.ndarray:
    """The tensor as a numpy array of its own dtype (what :func:`knowloc.neurons.select`
    compares, so the thresholded set is the same to the last bit)."""
    return np.asarray(t.detach().cpu().numpy())


def _above(scores: np.ndarray, t: float) -> np.ndarray:
    """The knowledge neurons' mask: scores above ``t`` x the largest one (none when that is
    not positive), the relative selection of :func:`knowloc.knowledge_neurons`."""
    top = float(scores.max()) if scores.size else 0.0
    return scores > t * top if top > 0 else np.zeros(scores.shape, dtype=bool)


def _n_above(scores: np.ndarray, t: float) -> int:
    return int(_above(scores, t).sum())


def _root_figure(ax: Axes) -> Figure:
    from matplotlib.figure import Figure

    fig: Any = ax.figure
    while not isinstance(fig, Figure):  # a SubFigure's .figure is its parent
        fig = fig.figure
    return fig


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def plot_attribution(attr: Attribution, threshold: float = 0.2,
                     ax: Axes | None = None) -> Figure:
    """Every neuron's score against its layer, with the knowledge-neuron threshold line (see
    :meth:`knowloc.attribution.Attribution.plot`)."""
    from matplotlib.figure import Figure

    from .methods import get_method

    t = _check_threshold(threshold)
    if ax is None:
        fig = Figure(figsize=(9.0, 3.6), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = _root_figure(ax)
    scores = _numpy(attr.scores)
    n_layers, d_mlp = scores.shape
    layer, neuron = np.divmod(np.arange(scores.size), d_mlp)
    x = layer + (neuron + 0.5) / d_mlp - 0.5  # layer l spans [l - 0.5, l + 0.5)
    y = scores.reshape(-1)
    top = float(y.max()) if y.size else 0.0
    line = t * top
    kn = _above(_native(attr.scores).reshape(-1), t)
    ax.scatter(x[~kn], y[~kn], s=2, color="0.6", linewidths=0, rasterized=True,
               label="other neurons")
    ax.scatter(x[kn], y[kn], s=9, color="C3", linewidths=0, zorder=3,
               label=f"knowledge neurons ({int(kn.sum())})")
    ax.axhline(line, color="C0", linestyle="--", linewidth=1, gid="threshold",
               label=f"threshold {t:g} × max = {line:.3g}")
    ax.set_xlim(-0.5, n_layers - 0.5)
    step = max(1, int(np.ceil(n_layers / 24)))
    ax.set_xticks(range(0, n_layers, step))
    ax.set_xlabel("layer (neurons spread across each layer's width)")
    try:
        label = get_method(attr.method).label
    except ConfigError:  # a method no longer registered
        label = attr.method
    ax.set_ylabel(f"{label} attribution")
    ax.set_title(f"{_short(attr.prompt)} → {attr.answer}   (P = {attr.prob:.3f})", fontsize=10)
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    return fig


def attribution_html(attr: Attribution, k: int = 5, threshold: float = 0.2) -> str:
    """A short HTML summary: what was attributed, P(answer), the number of knowledge neurons
    and the ``k`` top neurons."""
    e = html.escape
    n_kn = _n_above(_native(attr.scores), _check_threshold(threshold))
    n_layers, d_mlp = attr.scores.shape
    steps = attr.config.get("n_steps")
    method = e(attr.method) + (f" ({int(steps)} steps)" if isinstance(steps, int) else "")
    predicted = "yes" if attr.top1 else f"no (predicts {e(repr(attr.predicted))})"
    rows = [
        ("prompt", e(attr.prompt)),
        ("answer", e(attr.answer)),
        ("method", method),
        ("P(answer)", f"{attr.prob:.4f}"),
        ("model's top-1", predicted),
    ]
    if attr.fact_id is not None or attr.query_id is not None:
        rows.append(("fact / query", f"{e(str(attr.fact_id))} / {e(str(attr.query_id))}"))
    kn_text = f"{n_kn} above {threshold:g} × max of {n_layers} layers × {d_mlp} neurons"
    rows.append(("knowledge neurons", kn_text))
    head = "".join(f"<tr><th style='text-align:left'>{a}</th><td style='text-align:left'>{b}"
                   "</td></tr>" for a, b in rows)
    tops = "".join(f"<tr><td>{li}</td><td>{ni}</td><td>{s:.4g}</td><td>{a:.4g}</td></tr>"
                   for li, ni, s, a in attr.top(k))
    return (
        "<div class='knowloc-attribution'>"
        f"<table>{head}</table>"
        f"<table><caption style='text-align:left'>top {min(k, attr.scores.numel())} neurons"
        "</caption><tr><th>layer</th><th>neuron</th><th>attribution</th><th>activation</th></tr>"
        f"{tops}</table></div>"
    )
