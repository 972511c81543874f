"""Knowledge synapses and predominance: the pure maths of paper §3.2 (eqs. 4-6; METHODS §5).

Attention weights ``A_(l,h)`` of layer ``l`` and head ``h`` have rows ``r`` (query positions)
and columns ``c`` (key positions); everything here works on recorded post-softmax weights
(an :class:`AttentionMap`, or a ``[L, H, R, C]`` tensor) and never runs a model (recording
and scaling attention: :mod:`knowloc.interventions.attention`).

Definitions (METHODS §5, with the paper's hyperparameters as defaults):

* **attention received** by token ``c`` in head ``(l, h)``: the column sum ``Σ_r A^(r,c)``
  (eq. 4 literally sums over the rows of a softmax, which is 1 for every row; eq. 6 and
  METHODS read it as the column sum).
* **most attended token** of a query ``t_i``: the argmax over ``c`` of the column sums of
  the head- and layer-averaged map ``(1/LH) Σ_l Σ_h A_(l,h)``; **predominance** ``P`` of a
  fact: the largest share of its queries whose most attended token is the same token
  (tokens compared by their text with surrounding whitespace stripped, so ``" Brazil"``
  and ``"Brazil"`` agree). Reported with and without the first position (BOS / sink).
* **knowledge synapses** ``S = {(c, l, h) : Σ_r A_(l,h)^(r,c) > τ}`` with
  ``τ = α · (1/(L·H)) Σ_l Σ_h Σ_r Σ_c A_(l,h)^(r,c)``, ``α = 0.3``.
* **ΔValue** = ± (V̄_after − V̄_before) / |V̄_before|, V̄ the mean activation of the query's
  knowledge neurons at the last position; **ΔProb** = ± (P_after − P_before) / P_before,
  P the probability of the gold answer's first token. The sign is "−" for a suppression
  (factor < 1), so that a drop counts as a positive effect (as METHODS §4). The absolute
  value in ΔValue's denominator keeps the sign meaningful when V̄_before < 0 (gated MLPs
  have signed activations); for V̄_before > 0 it is the paper's formula.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from .errors import ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "ALPHA",
    "CONDITIONS",
    "AttentionMap",
    "Predominance",
    "Rows",
    "Synapse",
    "SynapseEffect",
    "SynapseSet",
    "activation_frame",
    "as_synapses",
    "check_rows",
    "knowledge_synapses",
    "mean_activation",
    "measure_effect",
    "most_attended",
    "predominance",
    "predominance_both",
    "received_attention",
    "signed_relative_change",
]

#: α of eq. 5 (paper A.1: "τ = 0.3", meaning the scaling factor).
ALPHA = 0.3

Rows = Literal["all", "last"]
Synapse = tuple[int, int, int]  # (position c, layer l, head h)

#: Heatmap conditions and the factor applied to the prompt's synapses.
CONDITIONS: dict[str, float] = {"none": 1.0, "suppress": 0.0, "enhance": 2.0}


def check_rows(rows: str) -> None:
    """``rows`` must be ``"all"`` (every query row) or ``"last"`` (the last one)."""
    if rows not in ("all", "last"):
        raise ConfigError(f"rows must be 'all' or 'last' (got {rows!r})")


@dataclass(frozen=True)
class AttentionMap:
    """Post-softmax attention of one prompt: ``weights[layer, head, row, column]``.

    ``rows == "all"``: every query position (R = C); ``"last"``: only the last (R = 1).
    ``tokens[c]`` is the text of the token at position ``c`` (used to compare queries).
    """

    weights: torch.Tensor
    token_ids: tuple[int, ...]
    tokens: tuple[str, ...] = ()
    rows: str = "all"
    prompt: str | None = None
    query_id: str | None = None
    fact_id: str | None = None

    def __post_init__(self) -> None:
        if self.weights.ndim != 4:
            raise ConfigError(
                f"attention weights must be [layers, heads, rows, columns] (got {tuple(self.weights.shape)})"
            )
        if self.token_ids and len(self.token_ids) != self.weights.shape[-1]:
            raise ConfigError(
                f"{len(self.token_ids)} token ids for {self.weights.shape[-1]} attention columns"
            )
        if self.tokens and len(self.tokens) != self.weights.shape[-1]:
            raise ConfigError(f"{len(self.tokens)} tokens for {self.weights.shape[-1]} attention columns")

    @property
    def n_layers(self) -> int:
        return int(self.weights.shape[0])

    @property
    def n_heads(self) -> int:
        return int(self.weights.shape[1])

    @property
    def n_positions(self) -> int:
        return int(self.weights.shape[-1])

    def received(self) -> torch.Tensor:
        """[layers, heads, columns]: attention each token receives, Σ_r A^(r,c)."""
        return received_attention(self.weights)

    def token_key(self, position: int) -> str | int:
        """What identifies the token at ``position`` across queries: its stripped text, else
        its id."""
        if self.tokens:
            return _normalize_token(self.tokens[position])
        if self.token_ids:
            return int(self.token_ids[position])
        return position


def _normalize_token(text: str) -> str:
    return text.replace("\u2581", " ").replace("\u0120", " ").strip()



# ===================================================================== predominance
def _weights(x: AttentionMap | torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(x, AttentionMap):
        return x.weights
    t = torch.as_tensor(x)
    return t.float() if not t.is_floating_point() else t


def received_attention(weights: AttentionMap | torch.Tensor | np.ndarray) -> torch.Tensor:
    """Column sums Σ_r A^(r,c) over the row axis (second to last): ``[..., columns]``."""
    return _weights(weights).sum(-2)


def most_attended(
    weights: AttentionMap | torch.Tensor | np.ndarray, *, skip_first: bool = False
) -> int | None:
    """The position ``c`` of the most attended token (eq. 4): argmax of the column sums of
    the map averaged over layers and heads. ``weights`` is ``[L, H, R, C]`` (or ``[R, C]``).
    ``skip_first`` leaves out position 0 (BOS / attention sink). Ties go to the earlier
    position. None when there is no candidate (one-token prompt with ``skip_first``)."""
    w = _weights(weights)
    if w.ndim == 4:
        w = w.mean(dim=(0, 1))
    elif w.ndim != 2:
        raise ConfigError(f"expected [L, H, R, C] or [R, C] attention weights, got {tuple(w.shape)}")
    col = w.sum(0)
    start = 1 if skip_first else 0
    if col.numel() <= start:
        return None
    return start + int(torch.argmax(col[start:]))


@dataclass(frozen=True)
class Predominance:
    """Predominance score P of one fact (eq. 4) and what it was computed from."""

    score: float  # max_t share of queries whose most attended token is t (NaN: no queries)
    token: str | int | None  # the winning token t (first of equal counts, in query order)
    positions: tuple[int | None, ...]  # most attended position per query
    tokens: tuple[str | int | None, ...]  # its token key per query
    skip_first: bool
    n_queries: int  # queries that had a candidate position



def predominance(maps: Sequence[AttentionMap], *, skip_first: bool = False) -> Predominance:
    """Predominance P of a fact from the attention maps of its queries (eq. 4, METHODS §5).

    For each query, the most attended token t_i (:func:`most_attended`); P is the largest
    share of queries sharing one token. Tokens are compared by :meth:`AttentionMap.token_key`
    (stripped text). Queries with no candidate (one token and ``skip_first``) are left out.
    """
    positions = tuple(most_attended(m, skip_first=skip_first) for m in maps)
    keys = tuple(None if p is None else m.token_key(p) for m, p in zip(maps, positions))
    valid = [k for k in keys if k is not None]
    if not valid:
        return Predominance(math.nan, None, positions, keys, skip_first, 0)
    counts: dict[Any, int] = {}
    for k in valid:
        counts[k] = counts.get(k, 0) + 1
    best = max(counts.values())
    token = next(k for k in valid if counts[k] == best)
    return Predominance(best / len(valid), token, positions, keys, skip_first, len(valid))


def predominance_both(maps: Sequence[AttentionMap]) -> dict[str, Predominance]:
    """P with and without the first position: ``{"with_first": ..., "without_first": ...}``."""
    return {
        "with_first": predominance(maps, skip_first=False),
        "without_first": predominance(maps, skip_first=True),
    }


# ============================================================================ synapses
@dataclass(frozen=True)
class SynapseSet:
    """Knowledge synapses of one query: ``(position, layer, head)`` triples (eq. 6)."""

    synapses: frozenset[Synapse]
    n_positions: int
    n_layers: int
    n_heads: int
    alpha: float = ALPHA
    tau: float = math.nan
    rows: str = "all"
    prompt: str | None = None
    query_id: str | None = None
    fact_id: str | None = None

    def __len__(self) -> int:
        return len(self.synapses)

    def __iter__(self) -> Iterator[Synapse]:
        return iter(sorted(self.synapses, key=lambda s: (s[1], s[2], s[0])))

    def __contains__(self, s: object) -> bool:
        return s in self.synapses

    def clip(self, n_positions: int) -> SynapseSet:
        """The synapses at positions < ``n_positions`` (another prompt's length)."""
        kept = frozenset(s for s in self.synapses if s[0] < n_positions)
        return SynapseSet(kept, min(self.n_positions, n_positions), self.n_layers, self.n_heads,
                          self.alpha, self.tau, self.rows, self.prompt, self.query_id, self.fact_id)

    def by_layer(self) -> dict[int, dict[int, list[int]]]:
        """``layer -> head -> sorted positions``."""
        out: dict[int, dict[int, list[int]]] = {}
        for c, l, h in self:
            out.setdefault(l, {}).setdefault(h, []).append(c)
        return out

    def to_frame(self) -> pd.DataFrame:
        rows = list(self)
        return pd.DataFrame(
            {
                "position": np.array([s[0] for s in rows], dtype=np.int32),
                "layer": np.array([s[1] for s in rows], dtype=np.int32),
                "head": np.array([s[2] for s in rows], dtype=np.int32),
            }
        )


def knowledge_synapses(
    attention: AttentionMap | torch.Tensor | np.ndarray,
    *,
    alpha: float = ALPHA,
    exclude_first: bool = False,
) -> SynapseSet:
    """Knowledge synapses (eqs. 5-6): ``{(c, l, h) : Σ_r A_(l,h)^(r,c) > τ}`` with
    ``τ = α · (1/(L·H)) Σ_l Σ_h Σ_r Σ_c A_(l,h)^(r,c)``.

    ``attention`` is an :class:`AttentionMap` or a ``[L, H, R, C]`` tensor. With every row of
    a causal softmax summing to 1, τ = α · R (α · 1 for ``rows="last"``).

    ``exclude_first`` drops the synapses at position 0 (BOS / attention sink; τ unchanged).
    In models with a sink, column 0 receives most of every head's attention, so the
    definition puts one synapse at position 0 in nearly every head (Gemma 3 270M: ~72 of
    ~73 per query) and suppressing them disables attention wholesale, for any prompt.
    """
    if not alpha >= 0:
        raise ConfigError(f"alpha must be >= 0 (got {alpha})")
    w = _weights(attention).double()
    if w.ndim != 4:
        raise ConfigError(f"expected [L, H, R, C] attention weights, got {tuple(w.shape)}")
    L, H, _, C = w.shape
    tau = alpha * float(w.sum(dim=(2, 3)).mean())
    col = w.sum(2)  # [L, H, C]
    idx = torch.nonzero(col > tau, as_tuple=False)
    syn = frozenset((int(c), int(l), int(h)) for l, h, c in idx.tolist() if not (exclude_first and c == 0))
    meta: dict[str, Any] = {}
    if isinstance(attention, AttentionMap):
        meta = {"rows": attention.rows, "prompt": attention.prompt, "query_id": attention.query_id,
                    "fact_id": attention.fact_id}
    return SynapseSet(syn, C, L, H, alpha=alpha, tau=tau, **meta)



def as_synapses(synapses: SynapseSet | Iterable[Synapse]) -> list[Synapse]:
    """``(position, layer, head)`` integer triples of a synapse set or iterable."""
    out = []
    for s in synapses:
        if len(s) != 3:
            raise ConfigError(f"a synapse is (position, layer, head); got {s!r}")
        out.append((int(s[0]), int(s[1]), int(s[2])))
    return out



def mean_activation(acts: torch.Tensor, neurons: Iterable[tuple[int, int]]) -> float:
    """Mean of ``acts[layer, neuron]`` over ``neurons`` (NaN for an empty set)."""
    idx = list(neurons)
    if not idx:
        return math.nan
    ls = torch.tensor([n[0] for n in idx])
    ps = torch.tensor([n[1] for n in idx])
    return float(acts[ls, ps].double().mean())


def signed_relative_change(before: float, after: float, factor: float) -> float:
    """± (after − before) / |before|, "−" for a suppression (factor < 1)."""
    if before == 0 or not math.isfinite(before) or not math.isfinite(after):
        return math.nan
    sign = -1.0 if factor < 1 else 1.0
    return sign * (after - before) / abs(before)


@dataclass(frozen=True)
class SynapseEffect:
    """Effect of one synapse manipulation on one query (METHODS §5)."""

    factor: float
    n_synapses: int  # applied (after clipping to the prompt length)
    n_clipped: int  # dropped by clipping
    n_neurons: int
    value_before: float
    value_after: float
    prob_before: float
    prob_after: float
    delta_value: float
    delta_prob: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)




def measure_effect(
    factor: float,
    neurons: Iterable[tuple[int, int]],
    acts_before: torch.Tensor,
    acts_after: torch.Tensor,
    prob_before: float,
    prob_after: float,
    *,
    n_synapses: int,
    n_clipped: int = 0,
) -> SynapseEffect:
    """ΔValue and ΔProb of one manipulation from the ``[layers, d_mlp]`` last-position
    activations and the target's probability before and after it."""
    kns = list(neurons)
    vb, va = mean_activation(acts_before, kns), mean_activation(acts_after, kns)
    pb, pa = float(prob_before), float(prob_after)
    return SynapseEffect(
        factor=float(factor),
        n_synapses=int(n_synapses),
        n_clipped=int(n_clipped),
        n_neurons=len(kns),
        value_before=vb,
        value_after=va,
        prob_before=pb,
        prob_after=pa,
        delta_value=signed_relative_change(vb, va, factor),
        delta_prob=signed_relative_change(pb, pa, factor),
    )


def activation_frame(label: str, prompt: str, condition: str, acts: torch.Tensor,
                     neurons: np.ndarray) -> pd.DataFrame:
    """One heatmap block as a long table: the ``[layers, d_mlp]`` activations ``acts`` at the
    neuron indices ``neurons``. Columns: ``query, prompt, condition, layer, neuron,
    activation``."""
    sub = acts[:, torch.as_tensor(neurons)].numpy()
    n_layers = sub.shape[0]
    return pd.DataFrame(
        {
            "query": label,
            "prompt": prompt,
            "condition": condition,
            "layer": np.repeat(np.arange(n_layers, dtype=np.int32), len(neurons)),
            "neuron": np.tile(neurons.astype(np.int32), n_layers),
            "activation": sub.reshape(-1).astype(np.float64),
        }
    )
