"""95% intervals for the ratios and means of the paper's tables, with facts as the unit.

The queries of one fact are paraphrases of one another: they are not independent, so every
interval here treats the *fact* as the sampled unit (docs/methods.md, "Intervals"):

* :func:`wilson`: Wilson's score interval of a share of facts (``k`` of ``n``), e.g. the
  share of facts in K_I;
* :func:`fact_bootstrap`: the percentile interval of a seeded bootstrap over facts of a
  mean over values grouped in facts. A resample draws facts with replacement and
  recomputes the statistic over *all* values of the drawn facts (``Σ sums / Σ counts``),
  so duplicating the queries of a fact changes nothing. With one value per fact it is the
  plain bootstrap of a mean (:func:`scipy.stats.bootstrap`, ``method="percentile"``).

Every bootstrap is deterministic: its generator is :func:`numpy.random.default_rng` seeded
by :func:`boot_seed`, a content hash of the run's seed and the statistic's identity (table,
row, column), so one statistic gets the same interval whatever else is computed beside it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from .errors import ConfigError
from .store.io import content_hash

__all__ = [
    "LEVEL",
    "N_BOOT",
    "FactSums",
    "boot_seed",
    "bootstrap_ratios",
    "fact_bootstrap",
    "fact_sums",
    "grouped_mean_intervals",
    "mean_intervals",
    "percentile_interval",
    "wilson",
]

#: Confidence level of every interval.
LEVEL = 0.95
#: Default number of bootstrap resamples.
N_BOOT = 1000


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ConfigError(f"the confidence level must lie in (0, 1), got {level!r}")


def _check_n_boot(n_boot: int) -> None:
    if isinstance(n_boot, bool) or int(n_boot) != n_boot or n_boot < 1:
        raise ConfigError(f"n_boot (the number of bootstrap resamples) must be an integer "
                          f">= 1, got {n_boot!r}")


def wilson(k: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson's score interval of the proportion ``k / n``.

    ``(p̂ + z²/2n ± z·sqrt(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n)`` with ``z`` the
    ``(1 + level)/2`` normal quantile; it stays inside [0, 1] and is not degenerate at 0 or
    ``n`` successes. ``(nan, nan)`` for ``n == 0``.

    Raises:
        ConfigError: ``k`` outside ``[0, n]`` or a level outside (0, 1).
    """
    _check_level(level)
    k, n = int(k), int(n)
    if n < 0 or not 0 <= k <= max(n, 0):
        raise ConfigError(f"wilson needs 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return math.nan, math.nan
    z = float(stats.norm.ppf(0.5 + level / 2))
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # at k = 0 (k = n) the exact lower (upper) bound is 0 (1); keep rounding from crossing it
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


def boot_seed(seed: int, *identity: Any) -> int:
    """The bootstrap seed of one statistic: a stable content hash of the run's ``seed`` and
    the statistic's ``identity`` (JSON-able parts, e.g. ``"table1", "ig", "St", "S_I"``),
    the same in every process and platform."""
    return int(content_hash([int(seed), *identity], length=15), 16)


def percentile_interval(samples: np.ndarray, level: float = LEVEL) -> tuple[np.ndarray,
                                                                            np.ndarray]:
    """The ``(1 − level)/2`` and ``(1 + level)/2`` percentiles (linear interpolation, as
    :func:`scipy.stats.bootstrap`) of bootstrap ``samples`` along axis 0; NaN samples (a
    resample where the statistic is undefined) are left out, a column without any gives NaN."""
    _check_level(level)
    x = np.asarray(samples, dtype=float)
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    if x.shape[0] == 0:
        nan = np.full(x.shape[1:], np.nan)
        return nan, nan.copy()
    if np.isnan(x).any():
        with warnings.catch_warnings():  # an all-NaN column is NaN, said in the docstring
            warnings.simplefilter("ignore", RuntimeWarning)
            lo, hi = np.nanpercentile(x, q, axis=0)
    else:
        lo, hi = np.percentile(x, q, axis=0)
    return np.asarray(lo, dtype=float), np.asarray(hi, dtype=float)


@dataclass(frozen=True)
class FactSums:
    """Values grouped by fact: per fact (rows, sorted by fact id) and column, the sum and the
    number of the non-NaN values. ``Σ sums / Σ counts`` over all facts is the plain mean
    of every value of a column."""

    facts: np.ndarray
    sums: np.ndarray
    counts: np.ndarray

    @property
    def n_facts(self) -> np.ndarray:
        """Per column, the number of facts with at least one value."""
        return (self.counts > 0).sum(axis=0)


def fact_sums(values: Any, facts: Sequence[Any] | np.ndarray | pd.Series) -> FactSums:
    """Group ``values`` (one row per query or edit; a 1-D array is one column) by the fact
    id of each row (``facts``, same length). Facts are sorted by their text, so the result
    does not depend on the row order."""
    v = np.asarray(values, dtype=float)
    if v.ndim == 1:
        v = v[:, None]
    f = np.asarray([str(x) for x in facts], dtype=object)
    if len(f) != v.shape[0]:
        raise ConfigError(f"fact_sums needs one fact per row: {len(f)} facts, "
                          f"{v.shape[0]} rows")
    uniq, inverse = np.unique(f.astype(str), return_inverse=True)
    ok = ~np.isnan(v)
    sums = np.zeros((len(uniq), v.shape[1]))
    counts = np.zeros((len(uniq), v.shape[1]))
    np.add.at(sums, inverse, np.where(ok, v, 0.0))
    np.add.at(counts, inverse, ok.astype(float))
    return FactSums(uniq, sums, counts)


def bootstrap_ratios(grouped: FactSums, *, n_boot: int = N_BOOT,
                     seed: int | np.random.Generator = 0) -> np.ndarray:
    """Bootstrap distribution of every column's mean, facts as units: ``(n_boot, columns)``.

    Resample ``b`` draws ``n_facts`` facts with replacement (``rng.integers(0, n_facts,
    (n_boot, n_facts))``, the draw of :func:`scipy.stats.bootstrap`) and takes, per column,
    ``Σ sums / Σ counts`` over the drawn facts (NaN where they hold no value). All columns
    share the resamples, so a statistic of several columns (e.g. the mean of two means) is
    resampled jointly. ``seed``: an integer (see :func:`boot_seed`) or a generator.
    """
    _check_n_boot(n_boot)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(int(seed))
    k = grouped.sums.shape[0]
    if k == 0:
        return np.full((int(n_boot), grouped.sums.shape[1]), np.nan)
    idx = rng.integers(0, k, (int(n_boot), k))
    num = grouped.sums[idx].sum(axis=1)
    den = grouped.counts[idx].sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def fact_bootstrap(values: Any, facts: Sequence[Any] | np.ndarray | pd.Series | None = None,
                   *, n_boot: int = N_BOOT, seed: int | np.random.Generator = 0,
                   level: float = LEVEL) -> tuple[float, float, int]:
    """``(lo, hi, n_facts)``: the percentile interval of the mean of ``values`` from a
    bootstrap over facts (``facts``: the fact of each value; None: each value is its own
    fact). NaN values are left out; facts without a value do not count. The interval is
    ``(nan, nan)`` with fewer than 2 facts (one fact says nothing about the spread between
    facts)."""
    v = np.asarray(values, dtype=float).ravel()
    f = [f"{i:012d}" for i in range(v.size)] if facts is None else facts  # input order
    grouped = fact_sums(v, f)
    keep = grouped.counts[:, 0] > 0
    grouped = FactSums(grouped.facts[keep], grouped.sums[keep], grouped.counts[keep])
    n = int(keep.sum())
    if n < 2:
        return math.nan, math.nan, n
    lo, hi = percentile_interval(bootstrap_ratios(grouped, n_boot=n_boot, seed=seed), level)
    return float(lo[0]), float(hi[0]), n


def mean_intervals(values: pd.DataFrame, facts: Sequence[Any] | np.ndarray | pd.Series, *,
                   n_boot: int = N_BOOT, seed: int | np.random.Generator = 0,
                   level: float = LEVEL) -> pd.DataFrame:
    """The 95% interval of the mean of every column of ``values`` (rows: queries or edits;
    ``facts``: each row's fact), from one bootstrap over facts shared by all columns.

    Returns:
        One row per column of ``values`` (index: the column names), columns ``lo``, ``hi``
        (percentile interval; NaN where fewer than 2 facts hold a value) and ``n_facts``
        (facts with at least one non-NaN value in that column). A statistic of several
        columns (the mean of two means) takes :func:`bootstrap_ratios` of the same
        :func:`fact_sums` instead.
    """
    grouped = fact_sums(values.to_numpy(dtype=float), facts)
    samples = bootstrap_ratios(grouped, n_boot=n_boot, seed=seed)
    lo, hi = percentile_interval(samples, level)
    n = grouped.n_facts
    few = n < 2
    out = pd.DataFrame({"lo": np.where(few, np.nan, lo), "hi": np.where(few, np.nan, hi),
                        "n_facts": n.astype("int64")}, index=list(values.columns))
    return out


def grouped_mean_intervals(values: Any, facts: Sequence[Any] | np.ndarray | pd.Series,
                           groups: Sequence[Any] | np.ndarray | pd.Series, *,
                           averages: dict[str, tuple[str, str]] | None = None,
                           n_boot: int = N_BOOT, seed: int | np.random.Generator = 0,
                           level: float = LEVEL) -> dict[str, tuple[float, float, int]]:
    """Intervals of the mean of ``values`` within each group (e.g. each operation: suppress,
    enhance), all from the same bootstrap over facts, and of averages of two group means.

    Args:
        values, facts, groups: one entry per row (query): its value, its fact, its group.
        averages: ``name -> (a, b)``: the statistic ``(mean_a + mean_b) / 2`` (the mean of
            the group means present, when only one of them is), resampled jointly.

    Returns:
        ``name -> (lo, hi, n_facts)`` for every group and every average: the percentile
        interval (NaN when fewer than 2 facts hold a value of the group, or of either group
        of an average) and the number of facts with a value.
    """
    v = np.asarray(values, dtype=float).ravel()
    g = np.asarray([str(x) for x in groups], dtype=object)
    labels = sorted(set(g))
    matrix = np.column_stack([np.where(g == lab, v, np.nan) for lab in labels]) \
        if labels else np.empty((v.size, 0))
    grouped = fact_sums(matrix, facts)
    samples = bootstrap_ratios(grouped, n_boot=n_boot, seed=seed)
    cols = {lab: samples[:, i] for i, lab in enumerate(labels)}
    has = {lab: grouped.counts[:, i] > 0 for i, lab in enumerate(labels)}
    enough = {lab: int(has[lab].sum()) >= 2 for lab in labels}
    for name, pair in (averages or {}).items():
        present = [p for p in pair if p in cols]
        if present:
            cols[name] = np.mean([cols[p] for p in present], axis=0)
            has[name] = np.any([has[p] for p in present], axis=0)
            enough[name] = all(enough[p] for p in present)
    out: dict[str, tuple[float, float, int]] = {}
    for name, smp in cols.items():
        lo, hi = percentile_interval(smp[:, None], level)
        ok = enough[name]
        out[name] = (float(lo[0]) if ok else math.nan, float(hi[0]) if ok else math.nan,
                     int(has[name].sum()))
    return out
