"""KN-consistency analysis (paper §2.1, eq. 1, Table 1, Table 4; docs/methods.md §2).

Given the knowledge neurons N_i of every neighbor query q_i of a fact, this module computes

* ``CS1 = |∩ N_i| / |∪ N_i|`` and
* ``CS2 = |{n ∈ ∪ N_i : n is in more than one N_i}| / |∪ N_i|``

per (method, fact), splits facts into K_I (``cs2 > threshold``) and K_II (``cs2 <= threshold``)
with a static threshold (0.1, Table 4) or Otsu's threshold computed per method, compares the
two groups with Welch's t-test, and assembles the paper's Table 1.

Inputs are two tables produced by the localization stage:

``queries``
    one row per localized query: ``method, fact_id, relation, query_id, known, prob,
    n_neurons``. A query may have zero neurons (then it has no rows in ``neurons``).
``neurons``
    one row per knowledge neuron: ``method, fact_id, relation, query_id, layer, neuron,
    attribution``.

A neuron is identified by the pair ``(layer, neuron)``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from scipy import stats

from knowloc.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

__all__ = [
    "POPULATIONS",
    "SCORE_COLUMNS",
    "SKIP_EMPTY_UNION",
    "SKIP_FEW_QUERIES",
    "SKIP_NOT_KNOWN",
    "SKIP_REASONS",
    "TABLE1_COLUMNS",
    "Consistency",
    "FactConsistency",
    "consistency_of",
    "consistency_scores",
    "otsu_threshold",
    "skipped_summary",
    "split_facts",
    "table1",
    "table1_markdown",
    "welch_t",
]

#: Skip reasons, in the order the filters are applied.
SKIP_NOT_KNOWN = "not known by the model"
SKIP_FEW_QUERIES = "fewer than 2 queries"
SKIP_EMPTY_UNION = "empty union"
SKIP_REASONS: tuple[str, ...] = (SKIP_NOT_KNOWN, SKIP_FEW_QUERIES, SKIP_EMPTY_UNION)

#: Accepted values of ``population``.
POPULATIONS: tuple[str, ...] = ("known", "all")

#: Columns of the table returned by :func:`consistency_scores`.
SCORE_COLUMNS: list[str] = [
    "method",
    "fact_id",
    "relation",
    "n_queries",
    "n_union",
    "n_intersection",
    "n_shared",
    "cs1",
    "cs2",
    "skipped",
]

#: Columns of the table returned by :func:`table1`.
TABLE1_COLUMNS: list[str] = [
    "method",
    "T",
    "threshold",
    "n_facts",
    "R_I",
    "S_I",
    "R_II",
    "S_II",
    "t",
    "p",
    "cap_II",
]

#: Paper order of the localization methods (Dai et al., Enguehard, Chen et al.).

_QUERY_COLUMNS = ("method", "fact_id", "relation", "query_id", "known")
_NEURON_COLUMNS = ("method", "fact_id", "query_id", "layer", "neuron")

Threshold = float | Literal["otsu"]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _require_columns(df: pd.DataFrame, columns: Iterable[str], name: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(
            f"the {name} table lacks column(s) {missing}; it has {list(df.columns)}. "
            "Pass the tables written by the localization stage."
        )


def _method_order(methods: Iterable[str]) -> list[str]:
    """Methods in the registry's display order (ig, sig, amig, ...), unregistered ones after
    them alphabetically."""
    from .attribution import sort_methods

    return sort_methods(set(methods))


def _empty_scores() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "method": pd.Series(dtype=object),
            "fact_id": pd.Series(dtype=object),
            "relation": pd.Series(dtype=object),
            "n_queries": pd.Series(dtype="int64"),
            "n_union": pd.Series(dtype="int64"),
            "n_intersection": pd.Series(dtype="int64"),
            "n_shared": pd.Series(dtype="int64"),
            "cs1": pd.Series(dtype="float64"),
            "cs2": pd.Series(dtype="float64"),
            "skipped": pd.Series(dtype=object),
        }
    )


# --------------------------------------------------------------------------------------------
# CS1 / CS2
# --------------------------------------------------------------------------------------------
def consistency_scores(
    queries: pd.DataFrame,
    neurons: pd.DataFrame,
    *,
    population: str = "known",
) -> pd.DataFrame:
    """KN-consistency scores CS1 and CS2 (paper eq. 1) for every (method, fact).

    Args:
        queries: one row per localized query (columns ``method, fact_id, relation,
            query_id, known`` are used). Every query counts towards the fact, including
            queries whose neuron set is empty.
        neurons: one row per knowledge neuron (columns ``method, fact_id, query_id, layer,
            neuron`` are used). Duplicate rows are counted once.
        population: ``"known"`` (default, docs/methods.md §2) keeps, per method, only facts whose
            gold answer is the model's top-1 on at least one of their queries; other facts
            are kept in the output with ``skipped = "not known by the model"``. ``"all"``
            keeps every fact.

    Returns:
        One row per (method, fact_id), sorted by ``method`` then ``fact_id``, with columns
        :data:`SCORE_COLUMNS`. ``n_queries`` is the number of queries of the fact,
        ``n_union = |∪ N_i|``, ``n_intersection = |∩ N_i|``, ``n_shared`` the number of
        neurons in more than one N_i; these counts are filled for every row. ``cs1`` and
        ``cs2`` are NaN where ``skipped`` is not None. Reasons, checked in this order:
        ``"not known by the model"``, ``"fewer than 2 queries"``, ``"empty union"``.

    Raises:
        ConfigError: unknown ``population``.
        DataError: a required column is missing, or a neuron row names a query that is not
            in ``queries``.
    """
    if population not in POPULATIONS:
        raise ConfigError(f"population must be one of {list(POPULATIONS)}, got {population!r}")
    _require_columns(queries, _QUERY_COLUMNS, "queries")
    _require_columns(neurons, _NEURON_COLUMNS, "neurons")
    if queries.empty:
        return _empty_scores()

    fact_key = ["method", "fact_id"]
    query_key = [*fact_key, "query_id"]

    q = queries[list(_QUERY_COLUMNS)].copy()
    q["method"] = q["method"].astype(str)
    q["fact_id"] = q["fact_id"].astype(str)
    q["query_id"] = q["query_id"].astype(str)
    q = q.drop_duplicates(query_key)
    q["known"] = q["known"].astype(bool)

    facts = (
        q.groupby(fact_key, sort=True)
        .agg(
            relation=("relation", "first"),
            n_queries=("query_id", "size"),
            any_known=("known", "any"),
            n_relations=("relation", "nunique"),
        )
        .reset_index()
    )
    bad_rel = facts[facts["n_relations"] > 1]
    if not bad_rel.empty:
        logger.warning(
            "%d fact(s) have queries with different relations; using the first (e.g. %s)",
            len(bad_rel),
            bad_rel.iloc[0]["fact_id"],
        )

    n = neurons[list(_NEURON_COLUMNS)].copy()
    n["method"] = n["method"].astype(str)
    n["fact_id"] = n["fact_id"].astype(str)
    n["query_id"] = n["query_id"].astype(str)
    n = n.drop_duplicates([*query_key, "layer", "neuron"])

    # every neuron row must belong to a known query
    if not n.empty:
        check = (
            n[query_key]
            .drop_duplicates()
            .merge(q[query_key], on=query_key, how="left", indicator=True)
        )
        orphans = check[check["_merge"] == "left_only"]
        if not orphans.empty:
            first = orphans.iloc[0]
            raise DataError(
                f"{len(orphans)} query(ies) have neurons but no row in the queries table, "
                f"e.g. method={first['method']!r} fact_id={first['fact_id']!r} "
                f"query_id={first['query_id']!r}. Pass matching queries/neurons tables."
            )

    # how many of the fact's queries contain each neuron
    per_neuron = (
        n.groupby([*fact_key, "layer", "neuron"], sort=False).size().rename("count").reset_index()
    )
    per_neuron = per_neuron.merge(facts[[*fact_key, "n_queries"]], on=fact_key, how="left")
    per_neuron["shared"] = per_neuron["count"] > 1
    per_neuron["in_all"] = per_neuron["count"] == per_neuron["n_queries"]
    counts = (
        per_neuron.groupby(fact_key, sort=False)
        .agg(
            n_union=("count", "size"),
            n_shared=("shared", "sum"),
            n_intersection=("in_all", "sum"),
        )
        .reset_index()
    )

    out = facts.merge(counts, on=fact_key, how="left")
    for col in ("n_union", "n_shared", "n_intersection"):
        out[col] = out[col].fillna(0).astype("int64")
    out["n_queries"] = out["n_queries"].astype("int64")

    not_known = (~out["any_known"].astype(bool)).to_numpy() & (population == "known")
    few = (out["n_queries"] < 2).to_numpy()
    empty = (out["n_union"] == 0).to_numpy()
    out["skipped"] = pd.Series(
        [
            SKIP_NOT_KNOWN if nk else SKIP_FEW_QUERIES if fw else SKIP_EMPTY_UNION if em else None
            for nk, fw, em in zip(not_known, few, empty)
        ],
        index=out.index,
        dtype=object,
    )

    ok = out["skipped"].isna()
    union = out["n_union"].to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        cs1 = out["n_intersection"].to_numpy(dtype=float) / union
        cs2 = out["n_shared"].to_numpy(dtype=float) / union
    out["cs1"] = np.where(ok, cs1, np.nan)
    out["cs2"] = np.where(ok, cs2, np.nan)

    out = out[SCORE_COLUMNS].sort_values(fact_key, kind="mergesort").reset_index(drop=True)
    for reason, cnt in out["skipped"].value_counts().items():
        logger.info("consistency: skipped %d fact(s): %s", cnt, reason)
    return out


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
def _check_threshold(threshold: object) -> None:
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
    _check_threshold(threshold)
    _require_columns(scores, ("method", "fact_id", "cs2", "skipped"), "scores")
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


# --------------------------------------------------------------------------------------------
# Table 1
# --------------------------------------------------------------------------------------------
def table1(
    scores: pd.DataFrame,
    thresholds: Sequence[tuple[str, Threshold]] = (("St", 0.1), ("Ot", "otsu")),
) -> pd.DataFrame:
    """The paper's Table 1: K_I / K_II ratios, mean CS2, Welch's t and ∩:II.

    Args:
        scores: the output of :func:`consistency_scores` (all methods of one model).
        thresholds: ``(label, threshold)`` pairs; each threshold as in :func:`split_facts`.

    Returns:
        One row per threshold type × method (threshold types in the given order, methods in
        paper order ig, sig, amig, then any others), columns :data:`TABLE1_COLUMNS`:

        * ``T``: the threshold label; ``threshold``: the value used for this method;
        * ``n_facts``: non-skipped facts of the method;
        * ``R_I``, ``R_II``: share of those facts in K_I / K_II;
        * ``S_I``, ``S_II``: mean CS2 of K_I / K_II (NaN for an empty group);
        * ``t``, ``p``: Welch's t-test between the CS2 of K_I and of K_II
          (see :func:`welch_t`; NaN if a group has fewer than 2 facts);
        * ``cap_II`` (∩:II): among the facts non-skipped in every method of ``scores``, the
          share that every method puts in K_II under this threshold type; the same value on
          every row of one ``T``; NaN if no fact is non-skipped in every method.

    Raises:
        ConfigError: empty ``thresholds``, a duplicate label, or an invalid threshold.
    """
    if len(thresholds) == 0:
        raise ConfigError("table1 needs at least one (label, threshold) pair")
    labels = [lab for lab, _ in thresholds]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"threshold labels must be unique, got {labels}")
    for _, thr in thresholds:
        _check_threshold(thr)
    _require_columns(scores, ("method", "fact_id", "cs2", "skipped"), "scores")

    methods = _method_order(scores["method"].astype(str).unique())
    rows: list[dict[str, object]] = []
    for label, thr in thresholds:
        split = split_facts(scores, thr)
        split = split.assign(method=split["method"].astype(str))

        # ∩:II over facts non-skipped in every method
        cap_ii = float("nan")
        if methods:
            fact_sets = [set(split.loc[split["method"] == m, "fact_id"]) for m in methods]
            common = set.intersection(*fact_sets)
            if common:
                sub = split[split["fact_id"].isin(common)]
                all_ii = (sub["kind"] == "K_II").groupby(sub["fact_id"]).all()
                cap_ii = float(all_ii.sum()) / len(common)

        for m in methods:
            g = split[split["method"] == m]
            n_facts = len(g)
            cs_i = g.loc[g["kind"] == "K_I", "cs2"].to_numpy(dtype=float)
            cs_ii = g.loc[g["kind"] == "K_II", "cs2"].to_numpy(dtype=float)
            if n_facts:
                thr_used = float(g["threshold"].iloc[0])
            elif thr == "otsu":
                thr_used = float("nan")
            else:
                thr_used = float(thr)
            t, p = welch_t(cs_i, cs_ii)
            rows.append(
                {
                    "method": m,
                    "T": label,
                    "threshold": thr_used,
                    "n_facts": n_facts,
                    "R_I": cs_i.size / n_facts if n_facts else float("nan"),
                    "S_I": float(cs_i.mean()) if cs_i.size else float("nan"),
                    "R_II": cs_ii.size / n_facts if n_facts else float("nan"),
                    "S_II": float(cs_ii.mean()) if cs_ii.size else float("nan"),
                    "t": t,
                    "p": p,
                    "cap_II": cap_ii,
                }
            )
    out = pd.DataFrame(rows, columns=TABLE1_COLUMNS)
    out["n_facts"] = out["n_facts"].astype("int64")
    return out


def _fmt(x: object, spec: str) -> str:
    if x is None:
        return "–"
    try:
        v = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(v):
        return "–"
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    return format(v, spec)


#: Markdown header labels of :func:`table1_markdown`, in column order.
_MD_HEADERS: list[tuple[str, str, str]] = [
    # (column, header, format spec)
    ("method", "method", ""),
    ("T", "T", ""),
    ("threshold", "threshold", ".3f"),
    ("n_facts", "n", "d"),
    ("R_I", "R: I", ".2f"),
    ("S_I", "S: I", ".3f"),
    ("R_II", "R: II", ".2f"),
    ("S_II", "S: II", ".3f"),
    ("t", "t", ".1f"),
    ("p", "p", ".1e"),
    ("cap_II", "∩: II", ".2f"),
]


def table1_markdown(df: pd.DataFrame) -> str:
    """Format a :func:`table1` result as a Markdown table, like the paper's Table 1.

    Ratios (R, ∩:II) get 2 decimals, scores (S) and thresholds 3, t one decimal, p
    scientific notation (e.g. ``1.2e-07``); NaN prints as ``–``.
    """
    _require_columns(df, TABLE1_COLUMNS, "table1")
    head = "| " + " | ".join(h for _, h, _ in _MD_HEADERS) + " |"
    align = (
        "|" + "|".join(":---" if c in ("method", "T") else "---:" for c, _, _ in _MD_HEADERS) + "|"
    )
    lines = [head, align]
    for rec in df.to_dict("records"):
        cells = []
        for col, _, spec in _MD_HEADERS:
            v = rec[col]
            if spec == "":
                cells.append(str(v))
            elif spec == "d":
                cells.append(str(int(v)) if v is not None and not pd.isna(v) else "–")
            else:
                cells.append(_fmt(v, spec))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# skipped facts
# --------------------------------------------------------------------------------------------
def skipped_summary(scores: pd.DataFrame) -> pd.DataFrame:
    """Number of skipped facts per method and reason.

    Returns:
        Columns ``method, reason, n_facts``: for every method in ``scores`` one row per reason
        in :data:`SKIP_REASONS` (zeros included, pipeline order), then any other reason
        found, then a row ``reason = "kept"`` with the number of non-skipped facts. Methods
        in paper order.
    """
    _require_columns(scores, ("method", "skipped"), "scores")
    rows: list[dict[str, object]] = []
    for m in _method_order(scores["method"].astype(str).unique()):
        g = scores[scores["method"].astype(str) == m]
        counts = g["skipped"].dropna().value_counts()
        reasons = list(SKIP_REASONS) + sorted(set(counts.index) - set(SKIP_REASONS))
        for r in reasons:
            rows.append({"method": m, "reason": r, "n_facts": int(counts.get(r, 0))})
        rows.append({"method": m, "reason": "kept", "n_facts": int(g["skipped"].isna().sum())})
    out = pd.DataFrame(rows, columns=["method", "reason", "n_facts"])
    out["n_facts"] = out["n_facts"].astype("int64")
    return out


# --------------------------------------------------------------------------------------------
# from Python objects: attributions or neuron sets, no tables needed
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FactConsistency:
    """CS1 and CS2 of one fact under one method: a row of :data:`SCORE_COLUMNS`.

    ``cs1`` and ``cs2`` are NaN when ``skipped`` (the reason) is not None; ``relation`` is
    None when the inputs did not carry one.
    """

    method: str
    fact_id: str
    relation: str | None
    n_queries: int
    n_union: int
    n_intersection: int
    n_shared: int
    cs1: float
    cs2: float
    skipped: str | None


@dataclass(frozen=True)
class Consistency:
    """The KN-consistency of a set of facts, as computed by :func:`consistency_of`.

    Attributes:
        scores: one row per (method, fact), columns :data:`SCORE_COLUMNS` (exactly
            :func:`consistency_scores` of ``queries`` and ``neurons``).
        queries: the query table built from the inputs (``method, fact_id, relation,
            query_id, known, prob, n_neurons``; ``prob`` is NaN for neuron sets).
        neurons: the knowledge-neuron table built from the inputs (``method, fact_id,
            relation, query_id, layer, neuron, attribution``; ``attribution`` is NaN for
            neuron sets).
        population: the population the scores were computed for (``"known"`` or ``"all"``).

    Iterating gives one :class:`FactConsistency` per row of ``scores``.
    """

    scores: pd.DataFrame
    queries: pd.DataFrame
    neurons: pd.DataFrame
    population: str

    def __len__(self) -> int:
        return len(self.scores)

    def __iter__(self) -> Iterator[FactConsistency]:
        for rec in self.scores.to_dict("records"):
            yield _fact_consistency(rec)

    def fact(self, fact_id: str, method: str | None = None) -> FactConsistency:
        """The scores of one fact (``method`` is needed when the fact has several)."""
        rows = self.scores[self.scores["fact_id"] == str(fact_id)]
        if method is not None:
            rows = rows[rows["method"] == method]
        if rows.empty:
            known = sorted(set(self.scores["fact_id"]))
            raise DataError(f"no scores for fact {fact_id!r}"
                            + (f" and method {method!r}" if method is not None else "")
                            + f"; the facts are {known[:10]}")
        if len(rows) > 1:
            raise ConfigError(f"fact {fact_id!r} has scores for several methods "
                              f"{sorted(rows['method'])}; pass method=")
        return _fact_consistency(rows.iloc[0].to_dict())

    def table1(self, static_threshold: float = 0.1, *, otsu: bool = True) -> pd.DataFrame:
        """The paper's Table 1 of these scores (:func:`table1`): the static threshold
        (label ``St``) and, with ``otsu``, Otsu's threshold per method (label ``Ot``)."""
        thresholds: list[tuple[str, Threshold]] = [("St", static_threshold)]
        if otsu:
            thresholds.append(("Ot", "otsu"))
        return table1(self.scores, thresholds)

    def skipped(self) -> pd.DataFrame:
        """Skipped facts per method and reason (:func:`skipped_summary`)."""
        return skipped_summary(self.scores)

    def _repr_html_(self) -> str:
        return str(self.scores.to_html(index=False, float_format=lambda v: f"{v:.3f}"))


def _fact_consistency(rec: dict[str, object]) -> FactConsistency:
    def opt(v: object) -> str | None:
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)

    return FactConsistency(
        method=str(rec["method"]),
        fact_id=str(rec["fact_id"]),
        relation=opt(rec["relation"]),
        n_queries=int(rec["n_queries"]),  # type: ignore[call-overload]
        n_union=int(rec["n_union"]),  # type: ignore[call-overload]
        n_intersection=int(rec["n_intersection"]),  # type: ignore[call-overload]
        n_shared=int(rec["n_shared"]),  # type: ignore[call-overload]
        cs1=float(rec["cs1"]),  # type: ignore[arg-type]
        cs2=float(rec["cs2"]),  # type: ignore[arg-type]
        skipped=opt(rec["skipped"]),
    )


def consistency_of(
    items: Iterable[object] | Mapping[str, Iterable[object]],
    *,
    threshold: float = 0.2,
    mode: str = "relative",
    population: str | None = None,
) -> Consistency:
    """KN-consistency (CS1, CS2; paper eq. 1) straight from attributions or neuron sets.

    Args:
        items: the neighbor queries' results, either

            * an iterable of :class:`~knowloc.attribution.Attribution` or
              :class:`~knowloc.neurons.NeuronSet` objects, grouped by their ``fact_id``
              (attribute :class:`~knowloc.data.Query` objects from
              :func:`~knowloc.data.load_facts` and the ids are set), or
            * a mapping ``fact_id -> [items of that fact]``; the key is the fact, whatever
              the items say. Here an item may also be a plain collection of
              ``(layer, neuron)`` pairs.

            Items are grouped by method too (each method gets its own scores).
        threshold, mode: how the knowledge neurons of an attribution are read off its map,
            as in :func:`knowloc.knowledge_neurons` (default: above 0.2 × its largest
            score). Neuron sets are taken as they are.
        population: ``"known"`` keeps only facts whose answer is the model's top-1 on at
            least one of their attributions (the others get ``skipped = "not known by the
            model"``); ``"all"`` keeps every fact. Default: ``"known"`` when every item is an
            attribution, ``"all"`` otherwise (a neuron set does not record whether the model
            knew the answer).

    Returns:
        A :class:`Consistency`: ``.scores`` is the same table as :func:`consistency_scores`
        on the run tables of these queries; ``.table1()`` the paper's Table 1; iterating
        gives one :class:`FactConsistency` per (method, fact).

    Raises:
        ConfigError: a bad ``threshold``, ``mode`` or ``population``, or
            ``population="known"`` with neuron sets.
        DataError: an item that is neither an attribution nor a neuron set, an item without
            ``fact_id`` outside a mapping, or the same query twice for one method.
    """
    from .attribution import Attribution
    from .neurons import NeuronSet, Selection, as_neurons, select

    selection = Selection(mode, threshold).validate()
    if population is not None and population not in POPULATIONS:
        raise ConfigError(f"population must be one of {list(POPULATIONS)}, got {population!r}")
    grouped: list[tuple[str | None, object]]
    if isinstance(items, Mapping):
        grouped = [(str(f), it) for f, group in items.items() for it in group]
    elif isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise DataError(f"consistency_of needs attributions or neuron sets, got "
                        f"{type(items).__name__}")
    else:
        grouped = [(None, it) for it in items]

    query_rows: list[dict[str, object]] = []
    neuron_rows: list[dict[str, object]] = []
    n_sets = 0
    seen: set[tuple[str, str, str]] = set()
    position: dict[tuple[str, str], int] = {}
    for i, (key, it) in enumerate(grouped):
        if isinstance(it, Attribution):
            method, qid, fid, rel = it.method, it.query_id, it.fact_id, it.relation
            idx = select(it.scores, selection)
            sc = it.scores.detach().cpu().double().numpy()
            pairs = [(int(layer), int(neuron)) for layer, neuron in idx]
            attrib = [float(sc[p]) for p in pairs]
            known, prob = bool(it.top1), float(it.prob)
        elif isinstance(it, NeuronSet) or (key is not None and isinstance(
                it, (set, frozenset, list, tuple))):
            n_sets += 1
            if isinstance(it, NeuronSet):
                method, qid, fid = it.method, it.query_id, it.fact_id
                members: Iterable[object] = it.neurons
            else:
                method, qid, fid, members = "", None, None, it
            try:
                pairs = list(as_neurons(members))  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise DataError(f"item {i} of fact {key!r} is not a collection of "
                                "(layer, neuron) pairs") from None
            rel, attrib, known, prob = None, [math.nan] * len(pairs), True, math.nan
        else:
            what = ("an Attribution, a NeuronSet or a set of (layer, neuron) pairs"
                    if key is not None else "an Attribution or a NeuronSet")
            raise DataError(f"item {i} is a {type(it).__name__}; consistency_of takes {what}")
        fact = key if key is not None else fid
        if fact is None:
            raise DataError(f"item {i} ({type(it).__name__}) has no fact_id; attribute Query "
                            "objects from load_facts, or pass a mapping {fact_id: [items]}")
        fact, method = str(fact), str(method)
        n = position.get((method, fact), 0)
        position[(method, fact)] = n + 1
        query = str(qid) if qid is not None else f"{fact}#{n}"
        if (method, fact, query) in seen:
            raise DataError(f"query {query!r} of fact {fact!r} is given twice for method "
                            f"{method!r}; pass each query's result once")
        seen.add((method, fact, query))
        query_rows.append({"method": method, "fact_id": fact, "relation": rel,
                           "query_id": query, "known": known, "prob": prob,
                           "n_neurons": len(pairs)})
        neuron_rows.extend({"method": method, "fact_id": fact, "relation": rel,
                            "query_id": query, "layer": layer, "neuron": neuron,
                            "attribution": a}
                           for (layer, neuron), a in zip(pairs, attrib))

    if population is None:
        population = "all" if n_sets else "known"
    elif population == "known" and n_sets:
        raise ConfigError("a neuron set does not record whether the model knew the answer; "
                          "pass population='all', or pass the attributions")
    queries = pd.DataFrame(query_rows, columns=[*_QUERY_COLUMNS, "prob", "n_neurons"])
    queries = queries.astype({"known": bool, "n_neurons": "int64", "prob": "float64"})
    neurons = pd.DataFrame(neuron_rows, columns=["method", "fact_id", "relation", "query_id",
                                                 "layer", "neuron", "attribution"])
    neurons = neurons.astype({"layer": "int64", "neuron": "int64", "attribution": "float64"})
    scores = consistency_scores(queries, neurons, population=population)
    return Consistency(scores, queries, neurons, population)
