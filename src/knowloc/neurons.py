"""Knowledge-neuron sets: from an attribution map to the neurons of a query (METHODS §1).

``N_i`` = neurons whose attribution exceeds ``t * max Attr`` (relative threshold, t = 0.2,
Dai et al.'s default; the paper gives none), or an absolute threshold, or the top-k.
Set algebra over the neighbor queries of a fact (union, intersection, refine) lives here too.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from .errors import ConfigError

SELECTION_MODES = ("relative", "absolute", "topk")

Neuron = tuple[int, int]


@dataclass(frozen=True)
class Selection:
    """How knowledge neurons are read off an attribution map."""

    mode: str = "relative"
    value: float = 0.2

    def validate(self) -> Selection:
        if self.mode not in SELECTION_MODES:
            raise ConfigError(f"unknown selection mode {self.mode!r}; choose from {SELECTION_MODES}")
        if self.mode == "relative" and not 0 <= self.value <= 1:
            raise ConfigError(f"a relative threshold must lie in [0, 1] (got {self.value})")
        if self.mode == "topk" and (self.value < 0 or int(self.value) != self.value):
            raise ConfigError(f"top-k needs a non-negative integer k (got {self.value})")
        return self

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "value": self.value}


def select(scores: torch.Tensor | np.ndarray, selection: Selection = Selection()) -> np.ndarray:
    """Indices ``[(layer, neuron), ...]`` (int array of shape [k, 2]) of the selected neurons,
    sorted by decreasing attribution."""
    s = scores.detach().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
    flat = s.reshape(-1)
    if selection.mode == "relative":
        top = float(flat.max()) if flat.size else 0.0
        idx = np.flatnonzero(flat > selection.value * top) if top > 0 else np.array([], dtype=int)
    elif selection.mode == "absolute":
        idx = np.flatnonzero(flat > selection.value)
    else:
        k = min(int(selection.value), flat.size)
        idx = np.argpartition(-flat, k - 1)[:k] if k > 0 else np.array([], dtype=int)
    idx = idx[np.argsort(-flat[idx], kind="stable")]
    d = s.shape[-1]
    return np.stack([idx // d, idx % d], 1).astype(np.int64) if idx.size else np.zeros((0, 2), np.int64)


@dataclass(frozen=True)
class NeuronSet:
    """The knowledge neurons of one query under one localization method."""

    neurons: frozenset[Neuron]
    method: str = ""
    query_id: str | None = None
    fact_id: str | None = None

    def __len__(self) -> int:
        return len(self.neurons)

    def __iter__(self):
        return iter(sorted(self.neurons))

    def __contains__(self, n: object) -> bool:
        return n in self.neurons

    @classmethod
    def from_attribution(cls, attr: Any, selection: Selection = Selection()) -> NeuronSet:
        idx = select(attr.scores, selection)
        return cls(
            frozenset((int(l), int(p)) for l, p in idx),
            method=attr.method,
            query_id=attr.query_id,
            fact_id=attr.fact_id,
        )


def knowledge_neurons(attr: Any, threshold: float = 0.2, mode: str = "relative") -> NeuronSet:
    """The knowledge neurons of one attribution (see :func:`select`)."""
    return NeuronSet.from_attribution(attr, Selection(mode, threshold).validate())


def neurons_frame(attr: Any, selection: Selection = Selection()) -> pd.DataFrame:
    """One row per selected neuron: layer, neuron, attribution, activation, rank."""
    idx = select(attr.scores, selection)
    sc = attr.scores.numpy()
    ac = attr.activations.numpy()
    return pd.DataFrame(
        {
            "layer": idx[:, 0].astype(np.int32),
            "neuron": idx[:, 1].astype(np.int32),
            "attribution": sc[idx[:, 0], idx[:, 1]].astype(np.float64) if len(idx) else np.zeros(0),
            "activation": ac[idx[:, 0], idx[:, 1]].astype(np.float64) if len(idx) else np.zeros(0),
            "rank": np.arange(len(idx), dtype=np.int32),
        }
    )


# ------------------------------------------------------------------ set algebra
def union(sets: Iterable[Iterable[Neuron]]) -> set[Neuron]:
    out: set[Neuron] = set()
    for s in sets:
        out |= set(s)
    return out


def intersection(sets: Sequence[Iterable[Neuron]]) -> set[Neuron]:
    sets = [set(s) for s in sets]
    if not sets:
        return set()
    out = sets[0]
    for s in sets[1:]:
        out &= s
    return out


def refine(sets: Sequence[Iterable[Neuron]]) -> set[Neuron]:
    """Neurons that appear in more than one of the sets."""
    counts = Counter(n for s in sets for n in set(s))
    return {n for n, c in counts.items() if c > 1}
