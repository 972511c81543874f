"""The consistency stage: CS1/CS2 per fact and method, the K_I/K_II split and Table 1.

Reads the ``queries`` and ``neuron_sets`` tables of a run and stores ``consistency``. Its one
unit (key ``all``) depends on every localized query, so it is computed again on every call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import pandas as pd

from .. import consistency as cons
from ..errors import ConfigError, RunError
from ..store import RunStore
from .units import Executor, Unit, require_complete, run_units

log = logging.getLogger(__name__)

CONSISTENCY_SORT = ["method", "fact_id"]


@dataclass
class ConsistencyConfig:
    """The consistency analysis: which facts count (``population``: ``known``, facts whose
    answer is the model's top-1 on at least one query, or ``all``) and the static K_I/K_II
    threshold of Table 1 (Otsu's threshold is always computed beside it); ``n_boot`` and
    ``boot_seed``: resamples and seed of the bootstrap over facts behind every interval of
    the run (Tables 1-3, Figures 4 and 6; ``--n-boot``, ``--boot-seed``)."""

    population: str = "known"
    static_threshold: float = 0.1
    n_boot: int = 1000
    boot_seed: int = 0

    def validate(self) -> ConsistencyConfig:
        if self.population not in ("known", "all"):
            raise ConfigError(f"population must be 'known' or 'all' (got {self.population!r})")
        if not 0 <= self.static_threshold <= 1:
            raise ConfigError(f"the static threshold must lie in [0, 1] "
                              f"(got {self.static_threshold})")
        if isinstance(self.n_boot, bool) or int(self.n_boot) != self.n_boot or self.n_boot < 1:
            raise ConfigError(f"n_boot must be an integer >= 1 (got {self.n_boot!r})")
        return self

    def as_dict(self) -> dict[str, Any]:
        return {"population": self.population, "static_threshold": self.static_threshold,
                "n_boot": self.n_boot, "boot_seed": self.boot_seed}


@dataclass
class ConsistencyResult:
    scores: pd.DataFrame
    table1: pd.DataFrame
    skipped: pd.DataFrame
    static_threshold: float


@dataclass(frozen=True)
class ConsistencyUnit:
    """The payload of the consistency unit: the tables it reads."""

    queries: pd.DataFrame
    neurons: pd.DataFrame
    population: str


def consistency_scores(model: Any, unit: ConsistencyUnit) -> dict[str, pd.DataFrame]:
    """CS1/CS2 and the skip reason of every fact and method (``model`` is not used)."""
    return {"consistency": cons.consistency_scores(unit.queries, unit.neurons,
                                                   population=unit.population)}


def consistency(store: RunStore, *, population: str = "known", static_threshold: float = 0.1,
                query_ids: set[str] | None = None, executor: Executor | None = None,
                allow_partial: bool = False, n_boot: int = 1000,
                boot_seed: int = 0) -> ConsistencyResult:
    """CS1/CS2 per fact and method, K_I/K_II splits, Welch's t-test and Table 1.

    Refuses a run whose localization is unfinished (:func:`require_complete`) unless
    ``allow_partial``.

    ``n_boot`` and ``boot_seed``: the bootstrap of Table 1's intervals.

    Writes ``consistency.parquet``; :func:`knowloc.report.stages.present_consistency` writes
    Table 1 and the violin plots.
    """
    require_complete(store, "queries", stage="localize", allow_partial=allow_partial)
    queries = store.table("queries")
    neurons = store.table("neuron_sets")
    if query_ids is not None:
        queries = queries[queries["query_id"].isin(query_ids)]
        neurons = neurons[neurons["query_id"].isin(query_ids)] if len(neurons) else neurons
    if len(neurons):  # a unit is finished when its queries row exists (written last)
        done = set(zip(queries["method"], queries["query_id"]))
        neurons = neurons[[(m, q) in done for m, q in zip(neurons["method"],
                                                           neurons["query_id"])]]
    if queries.empty:
        raise RunError(f"run {store.root} has no localized queries; run `knowloc localize` first")
    if neurons.empty:
        neurons = pd.DataFrame(columns=["method", "fact_id", "relation", "query_id", "layer",
                                        "neuron", "attribution"])
    run_units([Unit("all", ConsistencyUnit(queries, neurons, population))], consistency_scores,
              store, model=None, marker="consistency",
              consolidate={"consistency": CONSISTENCY_SORT}, executor=executor,
              desc="consistency", unit_name="run", progress=False, resume=False)
    return consistency_result(store.get("consistency", "all"), static_threshold,
                              n_boot=n_boot, boot_seed=boot_seed)


def consistency_result(scores: pd.DataFrame, static_threshold: float, *, n_boot: int = 1000,
                       boot_seed: int = 0) -> ConsistencyResult:
    """Table 1 (with intervals from ``n_boot`` bootstrap resamples seeded by ``boot_seed``)
    and the skip summary of stored consistency ``scores`` (no model, no recomputation of
    CS1/CS2): what :func:`consistency` returns, from a run directory."""
    t1 = cons.table1(scores, thresholds=(("St", static_threshold), ("Ot", "otsu")),
                     n_boot=n_boot, seed=boot_seed)
    return ConsistencyResult(scores, t1, cons.skipped_summary(scores), static_threshold)
