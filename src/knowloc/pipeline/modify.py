"""Knowledge modification (METHODS §3, paper §2.2, Tables 2 and 3): erase or update the
value vectors of a fact's knowledge neurons, evaluate, restore.

Units are (method, fact, op, set), content-hashed and resumable; each writes its ``edits``
rows. The stage then stores Table 2 in ``metrics`` and returns Tables 2 and 3;
:func:`knowloc.report.stages.present_modification` writes their CSV and Markdown.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from ..attribution import sort_methods
from ..errors import ConfigError
from ..evaluation import Baseline, EvalQuery, PPLSampler, evaluate_edit, load_ppl_corpus
from ..intervals import N_BOOT, mean_intervals
from ..intervals import boot_seed as boot_seed_of
from ..models import Model
from ..store import RunStore
from .resampling import run_bootstrap
from .run import (
    RunFacts,
    attribution_maps,
    key_config,
    parse_threshold,
    read_run,
    seeded_rng,
    split_fact_neurons,
    target_key,
    unit_key,
    with_ident,
)
from .units import Executor, Unit, run_units

log = logging.getLogger(__name__)

EDIT_SETS = ("local", "global", "cas")
DEFAULT_EDIT_SETS = ("local", "global")  # Table 2; "cas" (Table 3) is asked for explicitly
EDIT_OPS = ("erase", "update")
EDIT_SORT = ["method", "set", "op", "relation", "fact_id", "query_id"]
TABLE2_METRICS = ["rel", "gen", "loc", "avg", "dppl", "rel_prob", "gen_prob", "loc_prob",
                  "avg_prob"]


@dataclass
class ModifyConfig:
    """Knowledge modification (METHODS §3, paper §2.2, Table 2)."""

    ops: Sequence[str] = EDIT_OPS
    sets: Sequence[str] = DEFAULT_EDIT_SETS
    methods: Sequence[str] | None = None  # None: every method of the run
    lambda1: float = 2.0
    lambda2: float = 2.0
    split_threshold: float | str = 0.1  # K_I / K_II split on CS2 (paper §2.2: static)
    n_locality: int = 20
    gen_on: str = "known"
    ppl_entries: int = 5
    ppl_pool: int = 25
    ppl_max_tokens: int | None = 128
    seed: int = 0
    update_sign: str = "none"  # "activation": multiply the update by sign(activation)
    # Consistency-Aware set (paper §3.3, eq. 7); candidates = ∪ N_i of the fact (see cas_set)
    cas_beta1: float = 0.7
    cas_beta2: float = 0.3
    cas_threshold: float = 0.3

    def validate(self) -> ModifyConfig:
        bad = [o for o in self.ops if o not in EDIT_OPS]
        if bad or not self.ops:
            raise ConfigError(f"unknown --op {', '.join(bad) or '(none)'}; choose from "
                              f"{', '.join(EDIT_OPS)}")
        bad = [s for s in self.sets if s not in EDIT_SETS]
        if bad or not self.sets:
            raise ConfigError(f"unknown --set {', '.join(bad) or '(none)'}; choose from "
                              f"{', '.join(EDIT_SETS)}")
        if self.gen_on not in ("known", "all"):
            raise ConfigError(f"gen_on must be 'known' or 'all' (got {self.gen_on!r})")
        if self.update_sign not in ("none", "activation"):
            raise ConfigError(f"update_sign must be 'none' or 'activation' "
                              f"(got {self.update_sign!r})")
        if self.n_locality < 1 or self.ppl_entries < 1 or self.ppl_pool < 1:
            raise ConfigError("n_locality, ppl_entries and ppl_pool must be >= 1")
        if self.ppl_max_tokens is not None and self.ppl_max_tokens < 2:
            raise ConfigError("ppl_max_tokens must be >= 2")
        self.split_threshold = parse_threshold(self.split_threshold)
        return self

    #: Fields that choose which units exist (ops, sets, methods, the split) or that only
    #: the CAS set's own key part holds (``cas_*``), not what every unit computes.
    UNKEYED: ClassVar[tuple[str, ...]] = ("ops", "sets", "methods", "split_threshold",
                                          "cas_beta1", "cas_beta2", "cas_threshold")

    def key_config(self) -> dict[str, Any]:
        """The fields that key the stage's units (:func:`~knowloc.pipeline.run.key_config`)."""
        return key_config(self, self.UNKEYED)

    def as_dict(self) -> dict[str, Any]:
        return {"ops": list(self.ops), "sets": list(self.sets),
                "methods": list(self.methods) if self.methods else None,
                "lambda1": self.lambda1, "lambda2": self.lambda2,
                "split_threshold": self.split_threshold, "n_locality": self.n_locality,
                "gen_on": self.gen_on, "ppl_entries": self.ppl_entries,
                "ppl_pool": self.ppl_pool, "ppl_max_tokens": self.ppl_max_tokens,
                "seed": self.seed, "update_sign": self.update_sign,
                "cas_beta1": self.cas_beta1, "cas_beta2": self.cas_beta2,
                "cas_threshold": self.cas_threshold}


def locality_pool(model: Model, catalog: pd.DataFrame, fact_id: str, relation: str, n: int,
                  seed: int) -> tuple[list[tuple[int, ...]], list[str], str]:
    """n unrelated queries (first query of facts of other relations), seeded per fact."""
    firsts = catalog.drop_duplicates("fact_id")
    pool = firsts[firsts["relation"] != relation]
    kind = "other relations"
    if pool.empty:
        pool = firsts[firsts["fact_id"] != fact_id]
        kind = "other facts of the same relation (the run has one relation)"
    if pool.empty:
        return [], [], "none"
    pick = sorted(seeded_rng("locality", seed, fact_id).choice(len(pool), min(n, len(pool)),
                                                               replace=False))
    rows = pool.iloc[pick]
    return ([tuple(model.encode_prompt(p)) for p in rows["prompt"]],
            list(rows["query_id"].astype(str)), kind)


def new_object(model: Model, catalog: pd.DataFrame, relation: str, fact_id: str, prompt: str,
               answer: str, seed: int, target: str = "first") -> str | None:
    """o′: another object of the same relation whose target tokens (in ``target`` mode,
    :meth:`~knowloc.models.Model.target_ids`) differ from o's (seeded). With ``first``,
    " 1961" and " 1066" share their target (space + "1" on Gemma): not a valid o′."""
    own = model.target_ids(prompt, answer, target)
    cands = sorted({a for a in catalog.loc[catalog["relation"] == relation, "answer"].astype(str)
                    if a.strip().lower() != answer.strip().lower()})
    cands = [a for a in cands if model.target_ids(prompt, a, target) != own]
    if not cands:
        return None
    return cands[int(seeded_rng("new-object", seed, fact_id).integers(len(cands)))]


def cas_set(attributions: dict[tuple[str, str], pd.DataFrame],
            neurons: dict[tuple[str, str], list[tuple[int, int]]], method: str,
            query_ids: Sequence[str], n_layers: int, d_mlp: int, *, beta1: float = 0.7,
            beta2: float = 0.3, threshold: float = 0.3) -> list[tuple[int, int]]:
    """The Consistency-Aware edit set of one fact (paper §3.3, eq. 7), restricted to the
    union of its queries' knowledge neurons ∪ N_i.

    Each query's attribution map is rebuilt from the run's stored scores (the top
    ``keep_top`` per query plus its knowledge neurons; neurons below the stored top count as
    0 — they are below every stored score, so this only lowers their μ and raises their σ
    marginally), then :func:`knowloc.neurons.cas_neurons` with ``candidates = ∪ N_i``, so
    the set is a subset of the union. The best candidate's CAS is usually positive, but not
    always (a neuron that is a knowledge neuron of one query in k ≥ 7, or of one query while
    the others score it negative, has μ < (β2/β1) σ): when no candidate has a positive CAS,
    the set is the candidate(s) with the largest CAS, so it is non-empty whenever the union
    is. The paper's unrestricted version is ``cas_neurons(maps)`` without ``candidates``.
    """
    from ..neurons import cas_neurons, consistency_aware_scores

    union = sorted({n for q in query_ids for n in neurons.get((method, q), [])})
    if not union:
        return []
    maps = []
    for q in query_ids:
        m = np.zeros((n_layers, d_mlp), dtype=np.float64)
        a = attributions.get((method, q))
        if a is not None and len(a):
            m[a["layer"].to_numpy(int), a["neuron"].to_numpy(int)] = a["attribution"].to_numpy(float)
        maps.append(m)
    chosen = cas_neurons(maps, beta1=beta1, beta2=beta2, threshold=threshold, candidates=union)
    if len(chosen):
        return sorted(chosen.neurons)
    scores = consistency_aware_scores(maps, beta1=beta1, beta2=beta2)
    vals = np.array([scores[l, p] for l, p in union])
    return [n for n, v in zip(union, vals) if v == vals.max()]


# ------------------------------------------------------------------------------ units
@dataclass(frozen=True)
class PPLSpec:
    """How to build the ΔPPL sampler: the text (None: the built-in corpus) and its draw."""

    text: str | None
    n_entries: int
    pool_size: int
    max_tokens: int | None
    seed: int


@dataclass(frozen=True)
class EditUnit:
    """The payload of one modification unit: one (method, fact, op, set)."""

    key: str  # also seeds the unit's ΔPPL draw
    method: str
    relation: str
    fact_id: str
    op: str
    set_kind: str
    queries: tuple[tuple[str, str, str], ...]  # (query_id, prompt, answer), by query id
    sets: tuple[tuple[str, tuple[tuple[int, int], ...]], ...]  # query_id -> N_i
    cas: tuple[tuple[int, int], ...]
    new_object: str | None
    locality: tuple[tuple[int, ...], ...]  # prompt token ids of the unrelated queries
    locality_ids: tuple[str, ...]
    locality_kind: str
    lambda1: float
    lambda2: float
    update_sign: str
    gen_on: str
    ppl: PPLSpec
    target: str = "first"  # the run's target mode (Model.target_ids)


class EditState:
    """A worker's state in one modification stage call (the executor's setup step, see
    :mod:`knowloc.pipeline.units`): the model, its unedited predictions (:class:`Baseline`)
    and a ΔPPL sampler per :class:`PPLSpec` with its cached baselines.

    Both caches only memoize numbers computed as if asked first (a baseline in the batches
    of its own edit, a ΔPPL baseline per corpus entry), so a unit's rows never depend on the
    units the worker edited before it.
    """

    def __init__(self, model: Model) -> None:
        self.model = model
        self.baseline = Baseline()
        self.samplers: dict[PPLSpec, PPLSampler] = {}

    def sampler(self, spec: PPLSpec) -> PPLSampler:
        """The ΔPPL sampler of ``spec`` (built on first use)."""
        if spec not in self.samplers:
            self.samplers[spec] = PPLSampler(self.model, load_ppl_corpus(spec.text),
                                             n_entries=spec.n_entries,
                                             pool_size=spec.pool_size,
                                             max_tokens=spec.max_tokens, seed=spec.seed)
        return self.samplers[spec]


def edit_unit_rows(state: EditState, unit: EditUnit) -> dict[str, pd.DataFrame]:
    """The stage's compute: :func:`edit_fact` with the worker's :class:`EditState`."""
    return edit_fact(state.model, unit, state)


def edit_fact(model: Model, unit: EditUnit,
              state: EditState | None = None) -> dict[str, pd.DataFrame]:
    """Edit, evaluate and restore one (method, fact, op, set): its ``edits`` rows.

    ``state``: the caches of unedited predictions to use (a fresh one by default); the rows
    are the same bytes with any state of the same model."""
    from ..interventions.weights import Edit, activation_signs

    if state is None:
        state = EditState(model)
    elif state.model is not model:
        raise ValueError("edit_fact: the state belongs to another model")
    baseline, ppl = state.baseline, state.sampler(unit.ppl)
    op, set_kind, new_obj = unit.op, unit.set_kind, unit.new_object
    sets = {qid: list(ns) for qid, ns in unit.sets}
    cas = list(unit.cas)
    equeries = [EvalQuery(qid, tuple(model.encode_prompt(prompt)),
                          tuple(model.target_ids(prompt, answer, unit.target)),
                          tuple(model.target_ids(prompt, new_obj, unit.target))
                          if new_obj else None)
                for qid, prompt, answer in unit.queries]
    before = baseline.observe(model, equeries, list(unit.locality))
    known = [q.query_id for q in equeries if before.hit[(q.query_id, q.target_ids)]]
    rows: list[dict[str, Any]] = []
    nan = float("nan")
    for q in equeries:
        if q.query_id not in known:
            rows.append({"query_id": q.query_id, "status": "not known",
                         "n_neurons": len(cas) if set_kind == "cas" else len(sets[q.query_id])})
    if op == "update" and new_obj is None:
        rows += [{"query_id": qid, "status": "no new object", "n_neurons": 0} for qid in known]
        known = []

    def make_edit(neurons: list[tuple[int, int]], q: EvalQuery, read_by: list[EvalQuery]) -> Edit:
        if op == "erase":
            return Edit.erase(neurons)
        signs = (activation_signs(model, [r.prompt_ids for r in read_by], neurons)
                 if unit.update_sign == "activation" else None)
        return Edit.update(neurons, q.target_ids, q.new_target_ids,  # type: ignore[arg-type]
                           lambda1=unit.lambda1, lambda2=unit.lambda2, signs=signs)

    common: dict[str, Any] = {"fact_queries": equeries, "locality": list(unit.locality),
                              "baseline": baseline, "ppl": ppl, "gen_on": unit.gen_on}
    if set_kind == "local":
        for qid in known:
            q = next(e for e in equeries if e.query_id == qid)
            rows += evaluate_edit(model, make_edit(sets[qid], q, [q]), rel_ids=[qid],
                                  ppl_key=f"{unit.key}:{qid}", **common)
    elif known:
        union = cas if set_kind == "cas" else sorted({n for s in sets.values() for n in s})
        q = next(e for e in equeries if e.query_id == known[0])
        readers = [e for e in equeries if e.query_id in known]
        rows += evaluate_edit(model, make_edit(union, q, readers), rel_ids=known,
                              ppl_key=unit.key, **common)
    frame = pd.DataFrame(rows)
    for col in ("rel", "gen", "loc", "avg", "rel_prob", "gen_prob", "loc_prob", "avg_prob",
                "ppl_before", "ppl_after", "dppl"):
        if col not in frame:
            frame[col] = nan
        frame[col] = frame[col].astype(float)
    frame["ppl_entries"] = frame.get("ppl_entries", pd.Series(dtype=object)).fillna("")
    for col in ("n_gen", "n_loc", "n_neurons"):
        frame[col] = frame.get(col, pd.Series(dtype=float)).fillna(0).astype("int64")
    ident = {"model": model.name, "method": unit.method, "relation": unit.relation,
             "fact_id": unit.fact_id, "op": op, "set": set_kind,
             "answer": unit.queries[0][2], "new_answer": new_obj or "",
             "locality_query_ids": "|".join(unit.locality_ids),
             "locality_pool": unit.locality_kind}
    return {"edits": with_ident(frame, ident)}


# ------------------------------------------------------------------------------ stage
@dataclass
class ModifyResult:
    edits: pd.DataFrame
    table2: pd.DataFrame
    computed: int
    skipped_done: int
    seconds: float
    ppl: dict[str, Any]
    table3: pd.DataFrame | None = None


def edit_units(model: Model, run: RunFacts, store: RunStore, cfg: ModifyConfig,
               ppl: PPLSpec, ppl_config: dict[str, Any]) -> list[Unit]:
    """The modification units of the run's split, in (method, fact, op, set) order."""
    attributions: dict[tuple[str, str], pd.DataFrame] | None = None
    units = []
    for fn in split_fact_neurons(run):
        for op in cfg.ops:
            for set_kind in cfg.sets:
                _, first_prompt, first_answer = fn.queries[0]
                new_obj = (new_object(model, run.catalog, fn.relation, fn.fact_id,
                                      first_prompt, first_answer, cfg.seed, run.target)
                           if op == "update" else None)
                loc_prompts, loc_ids, loc_kind = locality_pool(
                    model, run.catalog, fn.fact_id, fn.relation, cfg.n_locality, cfg.seed)
                key_parts: dict[str, Any] = {
                    **fn.key_parts(), "op": op, "set": set_kind, "new_object": new_obj,
                    "locality": loc_ids, "config": cfg.key_config(), "ppl": ppl_config,
                    **target_key(run.target)}
                cas: list[tuple[int, int]] = []
                if set_kind == "cas":
                    if attributions is None:
                        attributions = attribution_maps(store, run.methods)
                    cas = cas_set(attributions, run.neurons, fn.method, list(fn.sets),
                                  model.n_layers, model.d_mlp, beta1=cfg.cas_beta1,
                                  beta2=cfg.cas_beta2, threshold=cfg.cas_threshold)
                    key_parts["cas"] = {"neurons": cas, "beta1": cfg.cas_beta1,
                                        "beta2": cfg.cas_beta2,
                                        "threshold": cfg.cas_threshold}
                key = unit_key(model, "modify", **key_parts)
                payload = EditUnit(
                    key=key, method=fn.method, relation=fn.relation,
                    fact_id=fn.fact_id, op=op, set_kind=set_kind, queries=fn.queries,
                    sets=fn.set_items(),
                    cas=tuple(cas), new_object=new_obj, locality=tuple(loc_prompts),
                    locality_ids=tuple(loc_ids), locality_kind=loc_kind,
                    lambda1=cfg.lambda1, lambda2=cfg.lambda2, update_sign=cfg.update_sign,
                    gen_on=cfg.gen_on, ppl=ppl, target=run.target)
                units.append(Unit(key, payload,
                                  f"{fn.method} {op} {set_kind} {fn.fact_id[:30]}",
                                  {"method": fn.method, "relation": fn.relation,
                                   "fact_id": fn.fact_id, "op": op, "set": set_kind}))
    return units


def modify(
    model: Model,
    store: RunStore,
    cfg: ModifyConfig,
    *,
    ppl_text: str | Path | None = None,
    query_ids: set[str] | None = None,
    progress: bool = True,
    executor: Executor | None = None,
    allow_partial: bool = False,
    n_boot: int | None = None,
    boot_seed: int | None = None,
) -> ModifyResult:
    """Erase/update the knowledge neurons of every known query of the run's K_I/K_II facts.

    For each method, fact and query q_i the unedited model answers correctly, edits the value
    vectors of N_i (``local``) or N_g = ∪_j N_j (``global``), evaluates Rel/Gen/Loc/Avg, their
    probability-based versions and ΔPPL (:func:`knowloc.evaluation.evaluate_edit`) and
    restores the weights. Work units are (method, fact, op, set), content-hashed and
    resumable; the tables hold the units of ``cfg`` only. Writes ``edits.parquet`` and
    ``metrics.parquet`` (Table 2).

    ``n_boot``, ``boot_seed``: the bootstrap behind the tables' intervals (default: the
    run's, :func:`~knowloc.pipeline.resampling.run_bootstrap`).
    """
    cfg.validate()
    run = read_run(store, cfg.methods, cfg.split_threshold, query_ids,
                   allow_partial=allow_partial)
    corpus = load_ppl_corpus(ppl_text)
    spec = PPLSpec(None if ppl_text is None else str(ppl_text), cfg.ppl_entries, cfg.ppl_pool,
                   cfg.ppl_max_tokens, cfg.seed)
    ppl_config = PPLSampler(model, corpus, n_entries=spec.n_entries, pool_size=spec.pool_size,
                            max_tokens=spec.max_tokens, seed=spec.seed).config()
    t0 = time.time()
    units = edit_units(model, run, store, cfg, spec, ppl_config)
    stats = run_units(units, edit_unit_rows, store, model=model, setup=EditState,
                      marker="edits", consolidate={"edits": EDIT_SORT}, executor=executor,
                      desc="editing", progress=progress)
    res = modify_result(store, run, ppl_config, n_boot=n_boot, boot_seed=boot_seed)
    store.put("metrics", "table2", res.table2)
    store.consolidate("metrics")
    res.computed, res.skipped_done, res.seconds = stats.computed, stats.skipped_done, \
        time.time() - t0
    return res


def modify_result(store: RunStore, run: RunFacts, ppl_config: dict[str, Any], *,
                  n_boot: int | None = None, boot_seed: int | None = None) -> ModifyResult:
    """Tables 2 and 3 of the stored ``edits`` of the facts of ``run``'s split (no model):
    what :func:`modify` returns, from a run directory (``computed``, ``skipped_done`` and
    ``seconds`` are 0 here). ``n_boot``, ``boot_seed``: the bootstrap of their intervals
    (default: the run's, :func:`~knowloc.pipeline.resampling.run_bootstrap`)."""
    n_boot, boot_seed = run_bootstrap(store, n_boot, boot_seed)
    edits = store.table("edits")
    if len(edits):
        pairs = set(zip(run.split["method"], run.split["fact_id"]))
        keep = [(m, f) in pairs for m, f in zip(edits["method"], edits["fact_id"])]
        edits = edits[keep].reset_index(drop=True)
    t2 = table2(edits, run.split, n_boot=n_boot, boot_seed=boot_seed)
    t3 = (table3(edits, run.split, n_boot=n_boot, boot_seed=boot_seed)
          if len(edits) and (edits["set"] == "cas").any() else None)
    return ModifyResult(edits, t2, 0, 0, 0.0, ppl_config, t3)


# ------------------------------------------------------------------------------ tables
#: Columns of Tables 2 and 3 (:func:`table2`, :func:`table3`): the counts, then every metric
#: of :data:`TABLE2_METRICS` followed by the bounds of its 95% interval.
TABLE2_COLUMNS = ["model", "method", "set", "op", "kind", "n_edits", "n_facts", "n_empty",
                  "n_not_known", "n_no_new_object",
                  *[c for m in TABLE2_METRICS for c in (m, f"{m}_lo", f"{m}_hi")]]


def table2(edits: pd.DataFrame, split: pd.DataFrame, *, n_boot: int = N_BOOT,
           boot_seed: int = 0) -> pd.DataFrame:
    """Table 2: mean Rel/Gen/Loc/Avg/ΔPPL (and probability versions) per model, method,
    set (local N_i / global N_g), op and K_I/K_II, with the number of edits, of their facts,
    of empty neuron sets (never counted as successes) and of skipped queries. Every mean has
    its 95% interval (``<metric>_lo``, ``<metric>_hi``): the percentile interval of a
    bootstrap over the facts (``n_boot`` resamples, seeded by ``boot_seed`` and the row)."""
    return _edit_means(edits[edits["set"].isin(DEFAULT_EDIT_SETS)] if len(edits) else edits,
                       split, n_boot=n_boot, boot_seed=boot_seed)


def table3(edits: pd.DataFrame, split: pd.DataFrame, *, n_boot: int = N_BOOT,
           boot_seed: int = 0) -> pd.DataFrame:
    """Table 3: Table 2's means (and intervals) for N_i (local), N_g (global) and the
    Consistency-Aware set (cas) side by side, for the methods that have CAS edits."""
    if edits.empty:
        return _edit_means(edits, split, n_boot=n_boot, boot_seed=boot_seed)
    methods = set(edits.loc[edits["set"] == "cas", "method"])
    return _edit_means(edits[edits["method"].isin(methods)], split, n_boot=n_boot,
                       boot_seed=boot_seed)


def _edit_means(edits: pd.DataFrame, split: pd.DataFrame, *, n_boot: int,
                boot_seed: int) -> pd.DataFrame:
    cols = TABLE2_COLUMNS
    if edits.empty:
        return pd.DataFrame(columns=cols)
    df = edits.merge(split[["method", "fact_id", "kind"]], on=["method", "fact_id"], how="inner")
    rows = []
    for (model_name, method, set_kind, op, kind), g in df.groupby(
            ["model", "method", "set", "op", "kind"], sort=False):
        ok = g[g["status"] == "ok"]
        row = {"model": model_name, "method": method, "set": set_kind, "op": op, "kind": kind,
               "n_edits": len(ok), "n_facts": int(ok["fact_id"].nunique()),
               "n_empty": int((g["status"] == "empty").sum()),
               "n_not_known": int((g["status"] == "not known").sum()),
               "n_no_new_object": int((g["status"] == "no new object").sum())}
        for m in TABLE2_METRICS:
            vals = ok[m].dropna()
            row[m] = float(vals.mean()) if len(vals) else float("nan")
        # one bootstrap over the row's facts for all its metrics (the row's own seed)
        ci = mean_intervals(ok[TABLE2_METRICS].astype(float), ok["fact_id"].astype(str),
                            n_boot=n_boot, seed=boot_seed_of(
                                boot_seed, "edits", str(model_name), str(method),
                                str(set_kind), str(op), str(kind)))
        for m in TABLE2_METRICS:
            row[f"{m}_lo"], row[f"{m}_hi"] = float(ci.at[m, "lo"]), float(ci.at[m, "hi"])
        rows.append(row)
    out = pd.DataFrame(rows, columns=cols)
    methods = sort_methods(out["method"])
    order = {"set": {s: i for i, s in enumerate(EDIT_SETS)},
             "op": {o: i for i, o in enumerate(EDIT_OPS)},
             "kind": {"K_I": 0, "K_II": 1},
             "method": {m: i for i, m in enumerate(methods)}}
    keys = [out[c].map(lambda v, c=c: order[c].get(v, 99)) for c in ("method", "set", "op", "kind")]
    out = out.assign(_m=keys[0], _s=keys[1], _o=keys[2], _k=keys[3]).sort_values(
        ["model", "_m", "_s", "_o", "_k"], kind="mergesort").drop(columns=["_m", "_s", "_o", "_k"])
    return out.reset_index(drop=True)
