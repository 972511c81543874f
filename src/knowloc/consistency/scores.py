"""CS1 and CS2 of every (method, fact) from the localization stage's tables (paper eq. 1).

``CS1 = |∩ N_i| / |∪ N_i|`` and ``CS2 = |{n ∈ ∪ N_i : n is in more than one N_i}| / |∪ N_i|``
over the knowledge neurons N_i of a fact's neighbor queries q_i; a neuron is the pair
``(layer, neuron)``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import pandas as pd

from ..errors import ConfigError, DataError

logger = logging.getLogger(__name__)


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

#: Columns of the ``queries`` and ``neurons`` tables that the scores read.
QUERY_COLUMNS = ("method", "fact_id", "relation", "query_id", "known")
NEURON_COLUMNS = ("method", "fact_id", "query_id", "layer", "neuron")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def require_columns(df: pd.DataFrame, columns: Iterable[str], name: str) -> None:
    """Refuse a table ``name`` that lacks one of ``columns`` (DataError naming them)."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(
            f"the {name} table lacks column(s) {missing}; it has {list(df.columns)}. "
            "Pass the tables written by the localization stage."
        )


def method_order(methods: Iterable[str]) -> list[str]:
    """Methods in the registry's display order (ig, sig, amig, ...), unregistered ones after
    them alphabetically."""
    from ..attribution import sort_methods

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
    require_columns(queries, QUERY_COLUMNS, "queries")
    require_columns(neurons, NEURON_COLUMNS, "neurons")
    if queries.empty:
        return _empty_scores()

    fact_key = ["method", "fact_id"]
    query_key = [*fact_key, "query_id"]

    q = queries[list(QUERY_COLUMNS)].copy()
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

    n = neurons[list(NEURON_COLUMNS)].copy()
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
