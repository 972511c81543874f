"""Convergence of a run's attributions, for the report: per method, how the completeness
gaps of its queries are distributed (the ``queries`` table's ``completeness_gap``, the
largest over layers; see docs/methods.md §8) and how many queries and facts have a gap above
:data:`~knowloc.attribution.convergence.GAP_LIMIT`."""

from __future__ import annotations

import html
import math

import numpy as np
import pandas as pd

from ..attribution import sort_methods
from ..attribution.convergence import GAP_LIMIT

__all__ = ["CONVERGENCE_COLUMNS", "CONVERGENCE_DISPLAY", "convergence_display",
           "convergence_note", "convergence_summary", "gap_quantile"]

#: The columns of :func:`convergence_summary` (``convergence_summary.csv``).
CONVERGENCE_COLUMNS: list[str] = [
    "method", "queries", "with_gap", "not_computed", "median_gap", "p90_gap", "above",
    "above_share", "facts", "facts_above", "facts_above_share", "facts_not_computed",
    "gap_limit"]

#: How the report shows it (column, header, format; see ``report.tables.format_table``).
CONVERGENCE_DISPLAY: list[tuple[str, str, str]] = [
    ("method", "method", ""), ("queries", "queries", "d"), ("with_gap", "with a gap", "d"),
    ("median_gap", "median gap", ".1%"), ("p90_gap", "90th percentile", ".1%"),
    ("above_share", f"queries above {100 * GAP_LIMIT:g}%", ".1%"),
    ("facts_above_share", f"facts above {100 * GAP_LIMIT:g}%", ".1%"),
    ("not_computed", "not computed", "d")]


def gap_quantile(gaps: np.ndarray, q: float) -> float:
    """The ``q`` quantile of ``gaps`` (no NaN; linear interpolation, as numpy's default),
    where an infinite gap counts as the largest: the quantile is infinite as soon as it
    interpolates towards one. NaN for no gaps."""
    x = np.sort(np.asarray(gaps, dtype=np.float64))
    if x.size == 0:
        return math.nan
    if np.isfinite(x).all():
        return float(np.quantile(x, q))
    pos = q * (x.size - 1)
    lo, frac = math.floor(pos), pos - math.floor(pos)
    if frac == 0:
        return float(x[lo])
    hi = lo + 1
    if math.isinf(x[hi]):
        return math.inf
    return float(x[lo] + (x[hi] - x[lo]) * frac)


def convergence_summary(queries: pd.DataFrame, limit: float = GAP_LIMIT) -> pd.DataFrame:
    """One row per method (the :data:`CONVERGENCE_COLUMNS`) from a ``queries`` table (or any
    frame with ``method``, ``fact_id`` and, optionally, ``completeness_gap``).

    A query whose gap is NaN (a run localized before knowloc computed it; a table without
    the column is all NaN) is *not computed*: it is in neither side of ``above_share``,
    whose denominator is ``with_gap``. Medians and percentiles are over the queries with a
    gap. A fact is *above* when any of its queries is above ``limit``, *converged* when every
    query has a gap at most ``limit``, and otherwise (no query above, one without a gap) not
    computed; ``facts_above_share`` is above / (above + converged).
    """
    gaps = (queries["completeness_gap"].astype(float) if "completeness_gap" in queries
            else pd.Series(math.nan, index=queries.index, dtype=float))
    frame = pd.DataFrame({"method": queries["method"], "fact_id": queries["fact_id"],
                          "gap": gaps})
    rows = []
    for method in sort_methods(frame["method"].unique()):
        one = frame[frame["method"] == method]
        known = one["gap"].notna()
        with_gap = one.loc[known, "gap"].to_numpy()
        above_q = one["gap"] > limit  # NaN > limit is False
        per_fact = pd.DataFrame({"above": above_q, "missing": ~known}).groupby(
            one["fact_id"]).any()
        facts_above = int(per_fact["above"].sum())
        facts_converged = int((~per_fact["above"] & ~per_fact["missing"]).sum())
        n_with = int(known.sum())
        rows.append({
            "method": method,
            "queries": len(one),
            "with_gap": n_with,
            "not_computed": len(one) - n_with,
            "median_gap": gap_quantile(with_gap, 0.5),
            "p90_gap": gap_quantile(with_gap, 0.9),
            "above": int(above_q.sum()),
            "above_share": int(above_q.sum()) / n_with if n_with else math.nan,
            "facts": len(per_fact),
            "facts_above": facts_above,
            "facts_above_share": (facts_above / (facts_above + facts_converged)
                                  if facts_above + facts_converged else math.nan),
            "facts_not_computed": len(per_fact) - facts_above - facts_converged,
            "gap_limit": limit,
        })
    return pd.DataFrame(rows, columns=CONVERGENCE_COLUMNS)


def convergence_display(summary: pd.DataFrame) -> pd.DataFrame:
    """:func:`convergence_summary` as the report shows it (:data:`CONVERGENCE_DISPLAY`; an
    infinite gap as ``∞``, a missing one as ``–``)."""
    from .tables import format_table

    return format_table(summary, CONVERGENCE_DISPLAY).replace("inf%", "∞")


def convergence_note(summary: pd.DataFrame, limit: float = GAP_LIMIT) -> str:
    """The report's sentence (HTML) that says what the convergence table shows."""
    missing = int(summary["not_computed"].sum()) if len(summary) else 0
    text = (f"Convergence: the completeness gap of a query is how far its attribution is "
            f"from the exact integral, |Σ Attr − (P(a) − P(b))| / |P(a) − P(b)| on its worst "
            f"layer; above {100 * limit:g}% the number of integration points (--n-steps) is "
            f"too small for that query.")
    if missing:
        text += (f" {missing} queries were localized without it (not computed; they count "
                 f"neither as converged nor as above).")
    return f"<p>{html.escape(text)}</p>"
