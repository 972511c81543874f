"""Integration rules for the path integral of integrated gradients.

Every attribution method integrates the gradient along the straight path from a baseline b
to the activation a of a layer::

    Attr(l, p) = (a_lp - b_lp) * integral_0^1 dP(b_l + alpha (a_l - b_l)) / da_lp d alpha
               ~ (a_lp - b_lp) * sum_k w_k dP(b_l + alpha_k (a_l - b_l)) / da_lp

A rule is the nodes alpha_k in [0, 1] and the weights w_k (summing to 1) of that sum, for a
given number of points n (gradient evaluations per layer and baseline):

=================  ===========================================  ==================================
rule               nodes alpha_k                                 weights w_k
=================  ===========================================  ==================================
``riemann_right``  k / n, k = 1..n (the paper's, and captum's   1 / n
                   ``riemann_right``)
``trapezoid``      k / (n - 1), k = 0..n-1 (both end points)    1 / (n - 1), half at both ends
``gausslegendre``  Gauss-Legendre nodes mapped from [-1, 1] to  Gauss-Legendre weights / 2
                   [0, 1] (captum's default rule)
=================  ===========================================  ==================================

The right Riemann sum's error is O(1/n), the trapezoid's O(1/n^2) and Gauss-Legendre's
decays faster than any power of 1/n for a smooth integrand; which one needs the fewest
points on real models is measured by ``benchmarks/quadrature.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError

__all__ = ["DEFAULT_RULE", "RULES", "Quadrature", "quadrature"]

#: The integration rules, the paper's first.
RULES = ("riemann_right", "trapezoid", "gausslegendre")
#: The paper's rule (right Riemann sum, alpha_k = k / n).
DEFAULT_RULE = "riemann_right"
_MIN_POINTS = {"riemann_right": 1, "trapezoid": 2, "gausslegendre": 1}


@dataclass(frozen=True, eq=False)
class Quadrature:
    """The ``n`` nodes (increasing, in [0, 1]) and weights (summing to 1) of ``rule``.

    ``nodes`` and ``weights`` are float64 numpy arrays; :meth:`alphas` gives the nodes as a
    tensor in the dtype the engine computes in. ``uniform``: every weight is 1 / n (the
    engine then sums the gradients and divides by n once, as the paper's rule does).
    """

    rule: str
    n: int
    nodes: np.ndarray
    weights: np.ndarray

    @property
    def uniform(self) -> bool:
        return self.rule == "riemann_right"

    @property
    def has_one(self) -> bool:
        """Whether alpha = 1 (the unpatched activation itself) is the last node."""
        return bool(self.nodes[-1] == 1.0)

    @property
    def has_zero(self) -> bool:
        """Whether alpha = 0 (the baseline itself) is the first node."""
        return bool(self.nodes[0] == 0.0)

    def alphas(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        """The nodes as a ``[n]`` tensor. For ``riemann_right`` they are computed as
        ``arange(1, n + 1) / n`` in ``dtype`` itself (one rounding, the paper's values)."""
        if self.rule == "riemann_right":
            return torch.arange(1, self.n + 1, device=device, dtype=dtype) / self.n
        return torch.tensor(self.nodes, device=device, dtype=torch.float64).to(dtype)

    def integrate(self, f: object) -> float:
        """``sum_k w_k f(alpha_k)`` for a vectorized ``f`` on numpy arrays (for checks)."""
        values = np.asarray(f(self.nodes), dtype=np.float64)  # type: ignore[operator]
        return float(np.dot(self.weights, values))


def quadrature(rule: str, n: int) -> Quadrature:
    """The :class:`Quadrature` of ``rule`` with ``n`` points on [0, 1].

    Raises :class:`~knowloc.errors.ConfigError` for an unknown rule or too few points
    (the trapezoid needs both end points: n >= 2).
    """
    if rule not in RULES:
        raise ConfigError(f"unknown integration rule {rule!r}; choose from {', '.join(RULES)}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < _MIN_POINTS[rule]:
        raise ConfigError(f"the {rule} rule needs an integer number of points >= "
                          f"{_MIN_POINTS[rule]} (got {n!r})")
    n = int(n)
    if rule == "riemann_right":
        nodes = np.arange(1, n + 1, dtype=np.float64) / n
        weights = np.full(n, 1.0 / n)
    elif rule == "trapezoid":
        nodes = np.arange(n, dtype=np.float64) / (n - 1)
        nodes[-1] = 1.0
        weights = np.full(n, 1.0 / (n - 1))
        weights[0] = weights[-1] = 0.5 / (n - 1)
    else:
        x, w = np.polynomial.legendre.leggauss(n)
        nodes = (x + 1.0) / 2.0
        weights = w / 2.0
    return Quadrature(rule, n, nodes, weights)
