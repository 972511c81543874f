"""Query-KN mapping (METHODS §4, paper §3.1, Figure 4): suppress (×0) / enhance (×2) the
activations of a query's own knowledge neurons and of its neighbor sets, record ΔProb.

Units are (method, fact), content-hashed and resumable; each writes its
``interventions`` rows. The stage returns the Figure 4 table;
:func:`knowloc.report.stages.present_mapping` writes its CSV and figures.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import pandas as pd

from ..attribution import sort_methods
from ..intervals import N_BOOT, grouped_mean_intervals
from ..intervals import boot_seed as boot_seed_of
from ..models import Model
from ..store import RunStore
from .resampling import run_bootstrap
from .run import (
    RunFacts,
    key_config,
    parse_threshold,
    read_run,
    split_fact_neurons,
    target_key,
    unit_key,
)
from .units import Executor, Unit, run_units

log = logging.getLogger(__name__)

MAPPING_SETS = ("Self", "Union", "Intersection", "Refine")
INTERVENTION_SORT = ["method", "relation", "fact_id", "query_id", "set", "op"]


@dataclass
class MappingConfig:
    """Query-KN mapping (METHODS §4, paper §3.1, Figure 4)."""

    methods: Sequence[str] | None = None
    split_threshold: float | str = 0.1
    suppress: float = 0.0
    enhance: float = 2.0
    only_known: bool = True

    #: Fields that choose which units exist, not what one computes (see ``key_config``).
    UNKEYED: ClassVar[tuple[str, ...]] = ("methods", "split_threshold")

    def key_config(self) -> dict[str, Any]:
        """The fields that key the stage's units (:func:`~knowloc.pipeline.run.key_config`)."""
        return key_config(self, self.UNKEYED)

    def as_dict(self) -> dict[str, Any]:
        return {"methods": list(self.methods) if self.methods else None,
                "split_threshold": self.split_threshold, "suppress": self.suppress,
                "enhance": self.enhance, "only_known": self.only_known}


@dataclass
class MappingResult:
    interventions: pd.DataFrame
    figure4: pd.DataFrame
    methods: list[str]
    computed: int
    skipped_done: int
    seconds: float


def neighbor_sets(sets: dict[str, list[tuple[int, int]]], query_id: str) -> dict[str, set]:
    """Self N_i and the neighbor sets N_i^N over j ≠ i (paper eq. 3)."""
    from ..neurons import intersection, refine, union

    others = [s for q, s in sets.items() if q != query_id]
    return {"Self": set(sets[query_id]), "Union": union(others),
            "Intersection": intersection(others), "Refine": refine(others)}


@dataclass(frozen=True)
class MappingUnit:
    """The payload of one mapping unit: one (method, fact)."""

    method: str
    relation: str
    fact_id: str
    queries: tuple[tuple[str, str, str], ...]  # (query_id, prompt, answer), by query id
    sets: tuple[tuple[str, tuple[tuple[int, int], ...]], ...]  # query_id -> N_i
    suppress: float
    enhance: float
    target: str = "first"  # the run's target mode (Model.target_ids)


def intervene_fact(model: Model, unit: MappingUnit) -> dict[str, pd.DataFrame]:
    """ΔProb of scaling each neuron set of each query of one fact: its ``interventions``.

    P is the teacher-forced probability of the query's target tokens (``unit.target``
    mode); the activations are scaled at the last prompt position."""
    from ..evaluation import delta_prob
    from ..interventions.activations import intervention_probs

    sets = {qid: list(ns) for qid, ns in unit.sets}
    rows = []
    for qid, prompt, answer in unit.queries:
        ids = model.encode_prompt(prompt)
        target = model.target_ids(prompt, answer, unit.target)
        nsets = neighbor_sets(sets, qid)
        variants, labels = [], []
        for name in MAPPING_SETS:
            for op, scale in (("suppress", unit.suppress), ("enhance", unit.enhance)):
                if nsets[name]:
                    variants.append((sorted(nsets[name]), scale))
                    labels.append((name, op))
        probs = intervention_probs(model, ids, variants, target).cpu().numpy()
        p_b = float(probs[0])
        done_labels = dict(zip(labels, probs[1:]))
        for name in MAPPING_SETS:
            for op in ("suppress", "enhance"):
                base = {"method": unit.method, "relation": unit.relation,
                        "fact_id": unit.fact_id, "query_id": qid, "set": name, "op": op,
                        "n_neurons": len(nsets[name]), "p_before": p_b}
                if (name, op) in done_labels:
                    p_a = float(done_labels[(name, op)])
                    rows.append({**base, "status": "ok", "p_after": p_a,
                                 "delta_prob": delta_prob(p_b, p_a, op)})
                else:
                    rows.append({**base, "status": "empty", "p_after": float("nan"),
                                 "delta_prob": float("nan")})
    return {"interventions": pd.DataFrame(rows)}


def query_kn_mapping(
    model: Model,
    store: RunStore,
    cfg: MappingConfig,
    *,
    query_ids: set[str] | None = None,
    progress: bool = True,
    executor: Executor | None = None,
    allow_partial: bool = False,
    n_boot: int | None = None,
    boot_seed: int | None = None,
) -> MappingResult:
    """Suppress (×0) / enhance (×2) the activations of Self N_i and of the neighbor sets
    Union / Intersection / Refine at the last position and record ΔProb (Figure 4).

    Writes ``interventions.parquet``. Work units are (method, fact), content-hashed and
    resumable. ``n_boot``, ``boot_seed``: the bootstrap behind Figure 4's intervals
    (default: the run's, :func:`~knowloc.pipeline.resampling.run_bootstrap`).
    """
    t0 = time.time()
    cfg.split_threshold = parse_threshold(cfg.split_threshold)
    run = read_run(store, cfg.methods, cfg.split_threshold, query_ids,
                   allow_partial=allow_partial)
    config = cfg.key_config()
    units = []
    for fn in split_fact_neurons(run):
        key = unit_key(model, "query_kn_mapping", **fn.key_parts(), config=config,
                       **target_key(run.target))
        payload = MappingUnit(fn.method, fn.relation, fn.fact_id, fn.queries, fn.set_items(),
                              cfg.suppress, cfg.enhance, run.target)
        units.append(Unit(key, payload, f"{fn.method} {fn.fact_id[:30]}",
                          {"method": fn.method, "relation": fn.relation,
                           "fact_id": fn.fact_id}))
    stats = run_units(units, intervene_fact, store, model=model, marker="interventions",
                      consolidate={"interventions": INTERVENTION_SORT}, executor=executor,
                      desc="intervening", unit_name="fact", progress=progress)
    res = mapping_result(store, run, cfg, n_boot=n_boot, boot_seed=boot_seed)
    res.computed, res.skipped_done, res.seconds = stats.computed, stats.skipped_done, \
        time.time() - t0
    return res


def mapping_result(store: RunStore, run: RunFacts, cfg: MappingConfig, *,
                   n_boot: int | None = None, boot_seed: int | None = None) -> MappingResult:
    """Figure 4 of the stored ``interventions`` of ``run``'s split (no model): what
    :func:`query_kn_mapping` returns, from a run directory. ``n_boot``, ``boot_seed``: the
    bootstrap of its intervals (default: the run's,
    :func:`~knowloc.pipeline.resampling.run_bootstrap`)."""
    n_boot, boot_seed = run_bootstrap(store, n_boot, boot_seed)
    table = store.table("interventions")
    if len(table):
        pairs = set(zip(run.split["method"], run.split["fact_id"]))
        table = table[[(m, f) in pairs for m, f in zip(table["method"], table["fact_id"])]]
        if cfg.only_known:
            known = run.queries[run.queries["known"].astype(bool)]
            kq = set(zip(known["method"], known["query_id"]))
            table = table[[(m, q) in kq for m, q in zip(table["method"], table["query_id"])]]
    return MappingResult(table.reset_index(drop=True),
                         figure4_table(table, run.split, n_boot=n_boot, boot_seed=boot_seed),
                         run.methods, 0, 0, 0.0)


#: Columns of Figure 4's table (:func:`figure4_table`).
FIGURE4_COLUMNS = ["method", "kind", "set", "suppress", "suppress_lo", "suppress_hi", "enhance",
                   "enhance_lo", "enhance_hi", "avg", "avg_lo", "avg_hi", "suppress_median",
                   "enhance_median", "n_queries", "n_empty", "n_facts"]


def figure4_table(interventions: pd.DataFrame, split: pd.DataFrame, *, n_boot: int = N_BOOT,
                  boot_seed: int = 0) -> pd.DataFrame:
    """Mean ΔProb per method, K_I/K_II and neuron set, for suppression and enhancement, and
    their average (Figure 4). Empty neuron sets are counted (``n_empty``), not averaged.

    Each mean has its 95% interval (``<col>_lo``, ``<col>_hi``): the percentile interval of a
    bootstrap over the ``n_facts`` facts of the row (``n_boot`` resamples seeded by
    ``boot_seed`` and the row), suppression, enhancement and their average from the same
    resamples."""
    cols = FIGURE4_COLUMNS
    if interventions.empty:
        return pd.DataFrame(columns=cols)
    df = interventions.merge(split[["method", "fact_id", "kind"]], on=["method", "fact_id"])
    rows = []
    for method in sort_methods(df["method"]):
        for kind in ("K_I", "K_II"):
            for name in MAPPING_SETS:
                g = df[(df["method"] == method) & (df["kind"] == kind) & (df["set"] == name)]
                if g.empty:
                    continue
                ok = g[g["status"] == "ok"]
                sup = ok.loc[ok["op"] == "suppress", "delta_prob"].dropna()
                enh = ok.loc[ok["op"] == "enhance", "delta_prob"].dropna()
                s = float(sup.mean()) if len(sup) else float("nan")
                e = float(enh.mean()) if len(enh) else float("nan")
                row = {"method": method, "kind": kind, "set": name, "suppress": s,
                       "enhance": e, "avg": (s + e) / 2,
                       "suppress_median": float(sup.median()) if len(sup) else float("nan"),
                       "enhance_median": float(enh.median()) if len(enh) else float("nan"),
                       "n_queries": int(g["query_id"].nunique()),
                       "n_empty": int(g.loc[g["status"] == "empty", "query_id"].nunique())}
                rows.append({**row, **_figure4_intervals(ok, (method, kind, name), n_boot,
                                                         boot_seed)})
    return pd.DataFrame(rows, columns=cols)


def _figure4_intervals(ok: pd.DataFrame, row: tuple[str, str, str], n_boot: int,
                       boot_seed: int) -> dict[str, float | int]:
    """The bounds of the row's suppression, enhancement and average means, and its facts."""
    ci = grouped_mean_intervals(ok["delta_prob"], ok["fact_id"].astype(str), ok["op"],
                                averages={"avg": ("suppress", "enhance")}, n_boot=n_boot,
                                seed=boot_seed_of(boot_seed, "figure4", *row))
    nan = (float("nan"), float("nan"), 0)
    out: dict[str, float | int] = {"n_facts": int(ok["fact_id"].nunique())}
    for col in ("suppress", "enhance", "avg"):
        out[f"{col}_lo"], out[f"{col}_hi"], _ = ci.get(col, nan)
    return out
