"""The K_I / K_II split of facts on CS2 (a static threshold or Otsu's) and Welch's t-test
between the two groups (paper Table 1, Table 4)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
from scipy import stats

from ..errors import ConfigError
from .scores import require_columns

logger = logging.getLogger(__name__)

#: A K_I / K_II threshold: a number, or ``"otsu"`` (Otsu's threshold per method).
Threshold = float | Literal["otsu"]


# --------------------------------------------------------------------------------------------
# Otsu
# --------------------------------------------------------------------------------------------
def otsu_threshold(values: Sequence[float] | np.ndarray, nbins: int = 256) -> float:
    """Otsu's threshold: the class boundary that maximizes the between-class variance.

    The histogram has ``nbins`` equal bins over ``[min(values), max(values)]``, closed on the
    right: bin ``k`` holds ``e_k < v <= e_(k+1)`` (bin 0 also holds the minimum). Each value
    stands for its bin centre. Splitting after bin ``k`` puts bins ``0..k`` in the lower
    class; its between-class variance (up to the constant factor ``1 / N²``) is
    ``w0(k) · w1(k) · (μ0(k) − μ1(k))²`` with ``w0`` the number of values in bins ``0..k``,
    ``w1`` the number in bins ``k+1..``, ``μ0, μ1`` their mean bin centres. The returned
    threshold is the upper edge ``e_(k+1)`` of the last lower bin, so ``v > threshold``
    selects exactly the upper class of the maximizing split: the whole lower bin stays in
    the lower class (K_II). Ties go to the lowest ``k``, i.e. the boundary right above the
    lower class.

    This is the construction of :func:`skimage.filters.threshold_otsu` (same histogram,
    same maximizing bin on values that do not sit exactly on a bin edge), except that
    scikit-image returns the centre of that bin, which would move the values in its upper
    half to the upper class.

    Non-finite values are ignored. If all values are equal (degenerate input) that value is
    returned: nothing lies above it, so every value falls in the lower class (K_II).

    Raises:
        ValueError: ``nbins < 2`` or no finite value.
    """
    if int(nbins) != nbins or nbins < 2:
        raise ValueError(f"nbins must be an integer >= 2, got {nbins!r}")
    nbins = int(nbins)
    x = np.asarray(values, dtype=float).ravel()
    x = x[np.isfinite(x)]
    if x.size == 0:
        raise ValueError("otsu_threshold needs at least one finite value")
    lo, hi = float(x.min()), float(x.max())
    if lo == hi:
        return lo

    edges = np.linspace(lo, hi, nbins + 1)
    # right-closed bins: the first edge >= v closes v's bin
    bins = np.clip(np.searchsorted(edges, x, side="left") - 1, 0, nbins - 1)
    counts = np.bincount(bins, minlength=nbins).astype(float)
    centers = (edges[:-1] + edges[1:]) / 2.0

    w0 = np.cumsum(counts)  # values at or below bin k
    w1 = np.cumsum(counts[::-1])[::-1]  # values at or above bin k
    with np.errstate(divide="ignore", invalid="ignore"):
        mu0 = np.cumsum(counts * centers) / w0
        mu1 = (np.cumsum((counts * centers)[::-1]) / w1[::-1])[::-1]
    # split between bin k and bin k+1
    between = w0[:-1] * w1[1:] * (mu0[:-1] - mu1[1:]) ** 2
    between = np.nan_to_num(between, nan=-np.inf)
    return float(edges[int(np.argmax(between)) + 1])


# --------------------------------------------------------------------------------------------
# K_I / K_II split
# --------------------------------------------------------------------------------------------
def check_threshold(threshold: object) -> None:
    """Refuse a threshold that is neither a finite number nor ``"otsu"`` (ConfigError)."""
    if isinstance(threshold, str):
        if threshold != "otsu":
            raise ConfigError(f"threshold must be a number or 'otsu', got {threshold!r}")
        return
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.number)):
        raise ConfigError(f"threshold must be a number or 'otsu', got {threshold!r}")
    if not math.isfinite(float(threshold)):
        raise ConfigError(f"threshold must be finite, got {threshold!r}")


def split_facts(scores: pd.DataFrame, threshold: Threshold = 0.1) -> pd.DataFrame:
    """Classify facts into K_I (``cs2 > threshold``) and K_II (``cs2 <= threshold``).

    Args:
        scores: the output of :func:`consistency_scores`.
        threshold: a number (static threshold; 0.1 as in Table 4) or ``"otsu"``: Otsu's
            threshold computed separately for each method over that method's non-skipped
            CS2 values (Table 4: "calculated separately based on each batch of data"). It
            is the boundary of the variance-maximizing split (see :func:`otsu_threshold`),
            so ``cs2 > threshold`` reproduces that split exactly.

    Returns:
        The non-skipped rows of ``scores`` (skipped facts are excluded) with two added
        columns: ``kind`` (``"K_I"`` or ``"K_II"``) and ``threshold`` (the threshold used for
        that row's method). Row order is that of ``scores``.

    Raises:
        ConfigError: ``threshold`` is neither a finite number nor ``"otsu"``.
        DataError: ``scores`` lacks a required column.
    """
    check_threshold(threshold)
    require_columns(scores, ("method", "fact_id", "cs2", "skipped"), "scores")
    kept = scores[scores["skipped"].isna() & scores["cs2"].notna()].copy()
    if kept.empty:
        kept["kind"] = pd.Series(dtype=object)
        kept["threshold"] = pd.Series(dtype="float64")
        return kept

    if threshold == "otsu":
        per_method = {
            m: otsu_threshold(g["cs2"].to_numpy()) for m, g in kept.groupby("method", sort=True)
        }
        for m, thr in per_method.items():
            logger.info("Otsu threshold for method %s: %.4f", m, thr)
        kept["threshold"] = kept["method"].map(per_method).astype(float)
    else:
        kept["threshold"] = float(threshold)
    kept["kind"] = np.where(kept["cs2"] > kept["threshold"], "K_I", "K_II")
    kept["kind"] = kept["kind"].astype(object)
    return kept


# --------------------------------------------------------------------------------------------
# Welch's t-test
# --------------------------------------------------------------------------------------------
def welch_t(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray
) -> tuple[float, float]:
    """Welch's unequal-variance t-test of ``mean(a) − mean(b)``, two-sided.

    ``t = (ā − b̄) / sqrt(s_a²/n_a + s_b²/n_b)`` with sample variances (ddof=1); the degrees
    of freedom follow Welch–Satterthwaite, ``df = (s_a²/n_a + s_b²/n_b)² /
    ((s_a²/n_a)²/(n_a−1) + (s_b²/n_b)²/(n_b−1))``; ``p = 2 · P(T_df > |t|)``. Agrees with
    ``scipy.stats.ttest_ind(a, b, equal_var=False)``, including its zero-variance cases:
    if both groups are constant, ``(±inf, 0.0)`` when the means differ, ``(nan, nan)``
    otherwise. NaNs in the inputs are dropped.

    Returns:
        ``(t, p)``; ``(nan, nan)`` if either group has fewer than 2 values.
    """
    x = np.asarray(a, dtype=float).ravel()
    y = np.asarray(b, dtype=float).ravel()
    x = x[~np.isnan(x)]
    y = y[~np.isnan(y)]
    nx, ny = x.size, y.size
    if nx < 2 or ny < 2:
        return float("nan"), float("nan")
    vx = float(np.var(x, ddof=1)) / nx
    vy = float(np.var(y, ddof=1)) / ny
    diff = float(np.mean(x) - np.mean(y))
    se2 = vx + vy
    if se2 == 0.0:
        if diff == 0.0:
            return float("nan"), float("nan")
        return math.copysign(math.inf, diff), 0.0
    t = diff / math.sqrt(se2)
    df = se2**2 / (vx**2 / (nx - 1) + vy**2 / (ny - 1))
    p = float(2.0 * stats.t.sf(abs(t), df))
    return float(t), min(p, 1.0)
