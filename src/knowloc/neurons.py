"""Knowledge-neuron sets: from an attribution map to the neurons of a query (METHODS §1).

``N_i`` = neurons whose attribution exceeds ``t * max Attr`` (relative threshold, t = 0.2,
Dai et al.'s default; the paper gives none), or an absolute threshold, or the top-k.
Set algebra over the neighbor queries of a fact (union, intersection, refine) lives here too,
and the Consistency-Aware Score edit set of a fact (paper §3.3, eq. 7: :func:`cas_neurons`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from .errors import ConfigError
from .models import Model

log = logging.getLogger(__name__)

SELECTION_MODES = ("relative", "absolute", "topk")

Neuron = tuple[int, int]


def as_neurons(neurons: Iterable[Sequence[int]]) -> tuple[Neuron, ...]:
    """Sorted, de-duplicated ``(layer, neuron)`` integer pairs."""
    out = set()
    for n in neurons:
        layer, neuron = n
        out.add((int(layer), int(neuron)))
    return tuple(sorted(out))


def check_neurons(model: Model, neurons: Iterable[Neuron]) -> None:
    """Every neuron must exist in ``model`` (:class:`ConfigError` naming the first that does
    not)."""
    for layer, neuron in neurons:
        if not (0 <= layer < model.n_layers and 0 <= neuron < model.d_mlp):
            raise ConfigError(
                f"neuron ({layer}, {neuron}) is outside {model.name} "
                f"({model.n_layers} layers x {model.d_mlp} neurons); was the neuron set made "
                "with another model?"
            )


def neurons_by_layer(neurons: Iterable[Neuron]) -> dict[int, list[int]]:
    """``layer -> [neuron, ...]`` in the order given."""
    groups: dict[int, list[int]] = {}
    for layer, neuron in neurons:
        groups.setdefault(layer, []).append(neuron)
    return groups


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
    as_sets = [set(s) for s in sets]
    if not as_sets:
        return set()
    out = as_sets[0]
    for s in as_sets[1:]:
        out &= s
    return out


def refine(sets: Sequence[Iterable[Neuron]]) -> set[Neuron]:
    """Neurons that appear in more than one of the sets."""
    counts = Counter(n for s in sets for n in set(s))
    return {n for n, c in counts.items() if c > 1}


# ------------------------------------------------------- consistency-aware score (CAS)
CAS_BETA1 = 0.7
CAS_BETA2 = 0.3
CAS_THRESHOLD = 0.3
CAS_NORMALIZATIONS = ("max", "none")


def _score_map(x: Any) -> np.ndarray:
    scores = getattr(x, "scores", x)
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().double().numpy()
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ConfigError(f"an attribution map must be [layers, neurons] (got shape {s.shape})")
    return s


def normalize_map(scores: np.ndarray, normalize: str = "max") -> np.ndarray:
    """One query's attribution map as used by CAS: ``"max"`` divides by its largest score
    (when positive), so every query weighs the same and ``as > t`` means "above t × max",
    the knowledge-neuron criterion; ``"none"`` keeps the scores (e.g. already normalized by
    the method: SIG by the norm, AMIG by the sum)."""
    if normalize not in CAS_NORMALIZATIONS:
        raise ConfigError(f"unknown CAS normalization {normalize!r}; choose from {CAS_NORMALIZATIONS}")
    s = np.asarray(scores, dtype=np.float64)
    if normalize == "max":
        top = float(s.max()) if s.size else 0.0
        return s / top if top > 0 else s
    return s


def consistency_aware_scores(
    maps: Sequence[Any],
    *,
    beta1: float = CAS_BETA1,
    beta2: float = CAS_BETA2,
    normalize: str = "max",
) -> np.ndarray:
    """Consistency-Aware Score of every neuron over a fact's k queries (paper eq. 7).

    ``CAS_lp = β1 μ_lp − β2 σ_lp`` with μ the mean and σ the *population* standard deviation
    (``1/k`` inside the root, exactly eq. 7; the queries of a fact are the whole population
    being scored, not a sample) of the normalized scores ``as_lp^(i)`` (:func:`normalize_map`).

    Args:
        maps: attributions (anything with ``.scores``) or ``[layers, neurons]`` arrays, one
            per query of the fact, all of the same shape.

    Returns:
        ``[layers, neurons]`` float64 array.
    """
    if not maps:
        raise ConfigError("CAS needs the attribution maps of at least one query")
    arrs = [normalize_map(_score_map(m), normalize) for m in maps]
    shapes = {a.shape for a in arrs}
    if len(shapes) != 1:
        raise ConfigError(f"attribution maps of one fact must have one shape (got {sorted(shapes)})")
    stack = np.stack(arrs)
    return beta1 * stack.mean(0) - beta2 * stack.std(0, ddof=0)


def cas_neurons(
    maps: Sequence[Any],
    *,
    beta1: float = CAS_BETA1,
    beta2: float = CAS_BETA2,
    threshold: float = CAS_THRESHOLD,
    normalize: str = "max",
    candidates: Iterable[Neuron] | None = None,
    fact_id: str | None = None,
) -> NeuronSet:
    """The edit set of Consistency-Aware KN modification (paper §3.3, A.1): neurons with
    ``CAS > threshold · max CAS`` (``threshold = 0.3``), as a :class:`NeuronSet`.

    ``candidates=None`` (default) is the paper: every neuron competes. The set is then *not*
    always inside the union of the fact's query sets ∪ N_i: with max-normalized maps a
    neuron outside ∪ N_i (relative threshold t) has CAS ≤ β1 · t (0.14 by default), so the
    set stays inside ∪ N_i whenever ``threshold · max CAS ≥ β1 · t`` (max CAS ≥ 0.467), but
    for facts whose queries disagree a neuron that every query attributes moderately (below
    t × max each time) can enter — which is what a consistency-aware score rewards.
    ``candidates`` (e.g. ∪ N_i) restricts the selection to those neurons: the threshold is
    then relative to the largest CAS among them, so the set is non-empty whenever one of
    them has a positive CAS.

    Empty when no (candidate) CAS is positive. ``method`` is the attributions' method (when
    ``maps`` are attributions; they must agree); ``query_id`` is None (the set belongs to
    the fact); ``fact_id`` defaults to the attributions' common fact id.
    """
    if not 0 <= threshold <= 1:
        raise ConfigError(f"the CAS threshold must lie in [0, 1] (got {threshold})")
    cas = consistency_aware_scores(maps, beta1=beta1, beta2=beta2, normalize=normalize)
    methods = {getattr(m, "method", None) for m in maps} - {None}
    if len(methods) > 1:
        raise ConfigError(f"CAS over attributions of different methods: {sorted(map(str, methods))}")
    facts = {getattr(m, "fact_id", None) for m in maps} - {None}
    if fact_id is None and len(facts) == 1:
        fact_id = next(iter(facts))
    if candidates is not None:
        keep = np.zeros(cas.shape, dtype=bool)
        cand = [(int(l), int(p)) for l, p in candidates]
        if cand:
            ls, ps = np.array(cand).T
            if ls.min() < 0 or ps.min() < 0 or ls.max() >= cas.shape[0] or ps.max() >= cas.shape[1]:
                raise ConfigError(f"CAS candidates outside the {cas.shape} attribution map")
            keep[ls, ps] = True
        cas = np.where(keep, cas, -np.inf)
    top = float(cas.max()) if cas.size else 0.0
    idx = np.argwhere(cas > threshold * top) if top > 0 else np.zeros((0, 2), dtype=np.int64)
    return NeuronSet(
        frozenset((int(l), int(p)) for l, p in idx),
        method=str(next(iter(methods))) if methods else "",
        query_id=None,
        fact_id=fact_id,
    )
