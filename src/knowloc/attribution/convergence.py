"""Has an attribution converged? Its completeness gap (``Attribution.completeness_gap``, see
docs/methods.md §8) summarized for people: the largest gap over layers, where it is, how
many layers are above :data:`GAP_LIMIT`, the lines ``knowloc localize`` prints and the JSON
fields it writes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["GAP_LIMIT", "GapSummary", "advice", "format_gap", "gap_summary"]

#: A completeness gap above this (5%) means the integral has not converged: the sum over
#: the integration points misses more than 5% of P(a_l) - P(b_l) on some layer.
GAP_LIMIT = 0.05


def format_gap(gap: float) -> str:
    """A gap as a percentage with one decimal (``0.0321`` -> ``"3.2%"``); ``"infinite"`` for
    a layer whose probability does not move along the path while its sum does, ``"not
    computed"`` for NaN."""
    if math.isnan(gap):
        return "not computed"
    if math.isinf(gap):
        return "infinite"
    return f"{100 * gap:.1f}%"


def _json_number(x: float) -> float | None:
    """``x`` for JSON: a finite float, or None (JSON has no infinity or NaN)."""
    return x if math.isfinite(x) else None


@dataclass(frozen=True)
class GapSummary:
    """One attribution's completeness gap, summarized.

    Attributes:
        per_layer: the gap of each layer (float; ``inf`` where P(a_l) = P(b_l) but the sum
            is not 0); empty when the attribution has no gap (saved before knowloc
            computed it).
        limit: the gap above which a layer has not converged (:data:`GAP_LIMIT`).
    """

    per_layer: tuple[float, ...]
    limit: float = GAP_LIMIT

    @property
    def computed(self) -> bool:
        """Whether there is a gap to summarize."""
        return len(self.per_layer) > 0 and not all(math.isnan(g) for g in self.per_layer)

    @property
    def largest(self) -> float:
        """The largest gap over layers (NaN when not computed)."""
        values = [g for g in self.per_layer if not math.isnan(g)]
        return max(values) if values else math.nan

    @property
    def layer(self) -> int | None:
        """The layer (0-based, as in the neuron tables) with the largest gap; the first of
        them on a tie; None when not computed."""
        if not self.computed:
            return None
        return self.per_layer.index(self.largest)

    @property
    def n_above(self) -> int:
        """How many layers have a gap above :attr:`limit`."""
        return sum(1 for g in self.per_layer if g > self.limit)

    @property
    def converged(self) -> bool | None:
        """Whether every layer's gap is at most :attr:`limit`; None when not computed."""
        return None if not self.computed else not self.largest > self.limit

    def lines(self, method: str, rule: str | None = None) -> list[str]:
        """What ``knowloc localize`` prints for one method: the gap line, and when the
        largest gap is above :attr:`limit` a second line saying the integral has not
        converged and what to do (``rule``: the integration rule used)."""
        if not self.computed:
            return ["completeness gap: not computed"]
        limit = f"{100 * self.limit:g}%"
        out = [(f"completeness gap: {format_gap(self.largest)} (largest over layers, layer "
                f"{self.layer}); {self.n_above} of {len(self.per_layer)} layers above {limit}")]
        if not self.converged:
            out.append(f"the integral has not converged: {advice(method, rule)}")
        return out

    def as_dict(self) -> dict[str, Any]:
        """The JSON fields: ``completeness_gap`` (largest over layers),
        ``completeness_gap_layer``, ``completeness_gap_per_layer``, ``layers_above_gap_limit``
        and ``gap_limit``; an infinite or missing gap is null."""
        return {
            "completeness_gap": _json_number(self.largest),
            "completeness_gap_layer": self.layer,
            "completeness_gap_per_layer": [_json_number(g) for g in self.per_layer],
            "layers_above_gap_limit": self.n_above if self.computed else None,
            "gap_limit": self.limit,
        }


def advice(method: str, rule: str | None = None) -> str:
    """What to do about an unconverged integral of ``method`` under ``rule``."""
    text = "use more points (--n-steps)"
    if method != "ig" and rule != "gausslegendre":
        text += " or --rule gausslegendre"
    if method == "ig":
        text += ("; IG converges slowly on models with a norm after the MLP (Gemma), "
                 "see docs/methods.md §8")
    return text


def gap_summary(gap: Any, limit: float = GAP_LIMIT) -> GapSummary:
    """The :class:`GapSummary` of a per-layer gap: an :class:`~knowloc.attribution.Attribution`
    (its ``completeness_gap``), a tensor or array ``[n_layers]``, a sequence of floats, or
    None (not computed)."""
    gap = getattr(gap, "completeness_gap", gap)
    if gap is None:
        return GapSummary((), limit)
    if hasattr(gap, "tolist"):
        gap = gap.tolist()
    values: Sequence[float] = gap
    return GapSummary(tuple(float(g) for g in values), limit)
