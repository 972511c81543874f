"""Figures 5 and 6 as tables: predominance per fact and the synapse effects' means with
their intervals over facts (from the stored attention results; no model)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..attribution import sort_methods
from ..data import natural_key
from ..errors import DataError
from ..intervals import N_BOOT, grouped_mean_intervals, wilson
from ..intervals import boot_seed as boot_seed_of

log = logging.getLogger(__name__)

ATTENTION_QUERY_SORT = ["relation", "fact_id", "query_id"]
PREDOMINANCE_SORT = ["relation", "fact_id", "first"]
SYNAPSE_EFFECT_SORT = ["method", "relation", "fact_id", "query_id", "first", "synapses",
                       "operation"]
ATTENTION_TABLES: dict[str, Sequence[str] | None] = {
    "attention_queries": ATTENTION_QUERY_SORT, "synapse_effects": SYNAPSE_EFFECT_SORT,
    "predominance": PREDOMINANCE_SORT}


KIND_ORDER = ("K_I", "K_II")
SYNAPSE_ORDER = ("self", "irrelevant")
OPERATION_ORDER = ("enh", "sup", "avg")


def _method_rank(methods: pd.Series) -> pd.Series:
    order = {m: i for i, m in enumerate(sort_methods(methods))}
    return methods.map(order)


def figure5_table(pred: pd.DataFrame, split: pd.DataFrame) -> pd.DataFrame:
    """Predominance P per method's K_I/K_II split: ``method, relation, fact_id, kind, first,
    P, P_lo, P_hi, token, n_queries`` (``first``: position 0 allowed). P is the share of the
    fact's ``n_queries`` queries that agree on ``token``; ``P_lo``, ``P_hi``: its Wilson
    95% interval."""
    cols = ["method", "relation", "fact_id", "kind", "first", "P", "P_lo", "P_hi", "token",
            "n_queries"]
    if pred.empty:
        return pd.DataFrame(columns=cols)
    df = split[["method", "fact_id", "kind"]].merge(pred, on="fact_id", how="inner")
    bounds = [wilson(round(p * n), n) if n and not np.isnan(p) else (np.nan, np.nan)
              for p, n in zip(df["P"].astype(float), df["n_queries"].astype(int))]
    df = df.assign(P_lo=[b[0] for b in bounds], P_hi=[b[1] for b in bounds])
    df = df.assign(_m=_method_rank(df["method"]))
    df = df.sort_values(["_m", "method", "relation", "fact_id", "first"], kind="mergesort")
    return df[cols].reset_index(drop=True)


def _ordered(values: Sequence[object], order: Sequence[str]) -> list[str]:
    vals = [str(v) for v in dict.fromkeys(values)]
    known = [v for v in order if v in vals]
    return known + sorted((v for v in vals if v not in order), key=natural_key)


def synapse_effect_summary(table: pd.DataFrame, *, n_boot: int | None = None,
                           boot_seed: int = 0, identity: Sequence[Any] = ()) -> pd.DataFrame:
    """Means of ΔValue and ΔProb per (kind, synapses, operation), plus ``avg`` = mean of the
    ``sup`` and ``enh`` means (the paper's "Avg"). Columns: ``kind, synapses, operation,
    metric, value, n``; with ``n_boot``, also ``value_lo``, ``value_hi`` (95% interval from
    a bootstrap over facts, ``table`` needs ``fact_id``; seeded by ``boot_seed``,
    ``identity`` and the row) and ``n_facts``."""
    missing = [c for c in ("kind", "synapses", "operation", "delta_value", "delta_prob")
               if c not in table.columns]
    if missing:
        raise DataError(f"synapse_effect_summary needs column(s) {missing}; "
                        f"got {list(table.columns)}")
    long = table.melt(
        id_vars=["kind", "synapses", "operation"], value_vars=["delta_value", "delta_prob"],
        var_name="metric", value_name="v",
    )
    long = long[long["v"].notna()]
    bounds = _effect_intervals(table, n_boot, boot_seed, identity) if n_boot else None
    agg = (
        long.groupby(["kind", "synapses", "operation", "metric"], sort=False)["v"]
        .agg(value="mean", n="size").reset_index()
    )
    avg = (
        agg[agg["operation"].isin(["sup", "enh"])]
        .groupby(["kind", "synapses", "metric"], sort=False)
        .agg(value=("value", "mean"), n=("n", "sum")).reset_index()
        .assign(operation="avg")
    )
    out = pd.concat([agg, avg], ignore_index=True)
    for c in ("kind", "synapses", "operation", "metric"):
        out[c] = out[c].astype(str)
    out["n"] = out["n"].astype(int)
    kinds = _ordered(out["kind"], KIND_ORDER)
    syns = _ordered(out["synapses"], SYNAPSE_ORDER)
    ops = _ordered(out["operation"], OPERATION_ORDER)
    out["_k"] = out["kind"].map({k: i for i, k in enumerate(kinds)})
    out["_s"] = out["synapses"].map({k: i for i, k in enumerate(syns)})
    out["_o"] = out["operation"].map({k: i for i, k in enumerate(ops)})
    out["_m"] = out["metric"].map({"delta_value": 0, "delta_prob": 1})
    keep = ["kind", "synapses", "operation", "metric", "value", "n"]
    if bounds is not None:
        key = list(zip(out["kind"], out["synapses"], out["metric"], out["operation"]))
        vals = [bounds.get(k, (np.nan, np.nan, 0)) for k in key]
        out["value_lo"] = pd.Series([v[0] for v in vals], index=out.index, dtype=float)
        out["value_hi"] = pd.Series([v[1] for v in vals], index=out.index, dtype=float)
        out["n_facts"] = pd.Series([v[2] for v in vals], index=out.index, dtype="int64")
        keep += ["value_lo", "value_hi", "n_facts"]
    return (
        out.sort_values(["_m", "_k", "_s", "_o"], kind="mergesort")
        .drop(columns=["_k", "_s", "_o", "_m"])[keep]
        .reset_index(drop=True)
    )


def _effect_intervals(table: pd.DataFrame, n_boot: int, boot_seed: int, identity: Sequence[Any]
                      ) -> dict[tuple[str, str, str, str], tuple[float, float, int]]:
    """(kind, synapses, metric, operation) -> the bounds and facts of its mean, ``avg``
    (of ``sup`` and ``enh``) from the same resamples as its two means."""
    out = {}
    for (kind, syn), g in table.groupby(["kind", "synapses"], sort=False):
        for metric in ("delta_value", "delta_prob"):
            seed = boot_seed_of(boot_seed, "figure6", *identity, str(kind), str(syn), metric)
            ci = grouped_mean_intervals(g[metric], g["fact_id"].astype(str), g["operation"],
                                        averages={"avg": ("sup", "enh")}, n_boot=n_boot,
                                        seed=seed)
            out.update({(str(kind), str(syn), metric, op): v for op, v in ci.items()})
    return out


def figure6_table(effects: pd.DataFrame, split: pd.DataFrame, *, only_known: bool = True,
                  n_boot: int = N_BOOT, boot_seed: int = 0) -> pd.DataFrame:
    """Mean ΔValue and ΔProb per method, synapse variant (``first``: as defined, position 0
    allowed; False: position 0 excluded), K_I/K_II, synapse set (self / irrelevant) and
    operation (sup, enh, and avg = their mean), as in Figure 6; plus the medians. Each mean
    has its 95% interval (``value_lo``, ``value_hi``) from a bootstrap over its ``n_facts``
    facts (``n_boot`` resamples seeded by ``boot_seed`` and the row)."""
    cols = ["method", "first", "kind", "synapses", "operation", "metric", "value", "value_lo",
            "value_hi", "median", "n", "n_facts"]
    if effects.empty:
        return pd.DataFrame(columns=cols)
    df = effects.merge(split[["method", "fact_id", "kind"]], on=["method", "fact_id"])
    if only_known:
        df = df[df["known"].astype(bool)]
    out = []
    for (method, first), g in df.groupby(["method", "first"], sort=False):
        s = synapse_effect_summary(g, n_boot=n_boot, boot_seed=boot_seed,
                                   identity=(str(method), bool(first)))
        med = (g.melt(id_vars=["kind", "synapses", "operation"],
                      value_vars=["delta_value", "delta_prob"], var_name="metric")
               .groupby(["kind", "synapses", "operation", "metric"])["value"].median()
               .rename("median").reset_index())
        s = s.merge(med, on=["kind", "synapses", "operation", "metric"], how="left")
        out.append(s.assign(method=method, first=bool(first)))
    if not out:
        return pd.DataFrame(columns=cols)
    res = pd.concat(out, ignore_index=True)
    res = res.assign(_m=_method_rank(res["method"]), _f=~res["first"])
    res = res.sort_values(["_m", "_f"], kind="mergesort")
    return res[cols].reset_index(drop=True)


# ---------------------------------------------------------------------------- heatmaps
