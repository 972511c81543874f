"""Screening and localization: which facts the model knows, and the knowledge neurons of
their queries.

Stage tables (Parquet, under ``<run>/parts/<table>/<key>.parquet`` while running and
``<run>/<table>.parquet`` once consolidated):

* ``screen``       one row per screened query: P(answer), the model's top-1, known
* ``queries``      one row per (method, query): probability, prediction, known, |N_i|,
                   completeness gap (largest over layers, see ``Attribution``)
* ``neuron_sets``  one row per knowledge neuron of a query (layer, neuron, attribution, ...)
* ``attributions`` the top ``keep_top`` attribution scores of each query (for CAS and plots)
* ``timings``      wall-clock seconds per (method, query), apart so results stay byte-identical
* ``maps``         with ``keep_maps``: the full attribution map of each (method, query), keyed
                   by the attribution alone (:func:`map_key`), so another neuron selection
                   is read off the stored maps without a model

``screen`` and ``queries`` say what was scored: ``target_ids`` (every token of the answer's
target in the run's target mode), ``target_text`` (exactly those tokens, decoded) and
``target_id`` (the first of them; under ``first``, a bare space on Gemma's year answers,
whose target is " 1").

Each (model, prompt, answer, method config) is a content-hashed work unit: a rerun skips
finished units, an interrupted run resumes, nothing is computed twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from ..attribution import Attribution, AttributionConfig, attribute
from ..attribution.quadrature import DEFAULT_RULE
from ..data import Fact, FactSet, Query
from ..errors import TokenizationError
from ..models import Model
from ..models.forward import answer_scores
from ..neurons import Selection, neurons_frame
from ..store import RunStore
from .run import MAPS, map_frame, read_map, record_target, target_key, unit_key, with_ident
from .units import (
    Compute,
    Executor,
    LocalExecutor,
    Tables,
    Unit,
    UnitStats,
    log_summary,
    run_units,
    short_label,
)

log = logging.getLogger(__name__)

QUERY_SORT = ["method", "relation", "fact_id", "query_id"]
NEURON_SORT = ["method", "relation", "fact_id", "query_id", "rank"]
LOCALIZE_TABLES: dict[str, Sequence[str] | None] = {
    "queries": QUERY_SORT, "timings": QUERY_SORT, "neuron_sets": NEURON_SORT,
    "attributions": NEURON_SORT}


# ------------------------------------------------------------------------ screening
def screen_key(model: Model, fact: Fact, target: str = "first") -> str:
    """The unit key of screening one fact (all its queries) in ``target`` mode."""
    return unit_key(model, "screen", queries=[(q.prompt, q.answer) for q in fact.queries],
                    **target_key(target))


@dataclass(frozen=True)
class ScreenUnit:
    """The payload of one screening unit: a fact and the target mode."""

    fact: Fact
    target: str = "first"


@torch.no_grad()
def screen_fact(model: Model, unit: ScreenUnit) -> dict[str, pd.DataFrame]:
    """Forward passes for a fact's queries, batched by token length, logits at the end only:
    the ``screen`` rows of the fact. ``prob`` is the teacher-forced P(target) and ``known``
    says whether greedy decoding reproduces every target token (:meth:`Model.target_ids`
    in ``unit.target`` mode); ``predicted`` is the model's next token."""
    fact = unit.fact
    encoded = [(q, model.encode_prompt(q.prompt),
                model.target_ids(q.prompt, q.answer, unit.target)) for q in fact.queries]
    by_len: dict[tuple[int, int], list[int]] = {}
    for i, (_, ids, target) in enumerate(encoded):
        by_len.setdefault((len(ids), len(target)), []).append(i)
    scores: dict[int, tuple[float, int, bool]] = {}
    for idx in by_len.values():
        s = answer_scores(model, [encoded[i][1] for i in idx], [encoded[i][2] for i in idx])
        for k, i in enumerate(idx):
            scores[i] = (float(s.prob[k]), int(s.greedy[k, 0]), bool(s.known[k]))
    rows = []
    for i, (q, _, target) in enumerate(encoded):
        prob, pred, known = scores[i]
        rows.append({"relation": q.relation, "fact_id": q.fact_id, "query_id": q.query_id,
                     "prompt": q.prompt, "answer": q.answer, **target_columns(model, target),
                     "prob": prob, "predicted": model.tokenizer.decode([pred]),
                     "known": known})
    return {"screen": pd.DataFrame(rows)}


def target_columns(model: Model, ids: Sequence[int]) -> dict[str, Any]:
    """What a row scored: ``target_id`` (the first token), ``target_ids`` (every token of
    the target) and ``target_text`` (exactly those tokens, decoded)."""
    ids = [int(t) for t in ids]
    return {"target_id": ids[0], "target_ids": ids, "target_text": model.tokenizer.decode(ids)}


def check_targets(model: Model, queries: Sequence[Query], target: str) -> None:
    """Refuse, before any unit runs, queries whose answer cannot be a target of ``model``.

    An answer the tokenizer turns into a special token (a small vocabulary's ``<unk>``, say)
    has no probability to attribute; the error names every such fact (and how many queries)
    so that the facts file can be fixed or another model chosen.
    """
    bad: dict[tuple[str, str], str] = {}
    count = 0
    for q in queries:
        try:
            model.target_ids(q.prompt, q.answer, target)
        except TokenizationError as exc:
            count += 1
            bad.setdefault((q.relation, q.fact_id), str(exc))
    if bad:
        shown = "; ".join(f"fact {fid} ({rel}): {msg}" for (rel, fid), msg in list(bad.items())[:3])
        more = f" and {len(bad) - 3} more facts" if len(bad) > 3 else ""
        raise TokenizationError(
            f"{count} queries of {len(bad)} facts have no target for model {model.name}: "
            f"{shown}{more}; remove those facts or use another model")


def screen(model: Model, facts: FactSet, store: RunStore, *, progress: bool = True,
           known_per_relation: int | None = None, max_per_relation: int | None = None,
           executor: Executor | None = None, target: str = "first") -> pd.DataFrame:
    """One forward pass per query: P(answer), the model's top-1 and whether greedy decoding
    reproduces the answer's target (``target`` mode, as localization will use it).

    Cheap (no gradients); it decides the consistency population (METHODS §2: facts whose
    answer is top-1 on at least one query) before any attribution is spent on them.
    Stored per fact in the ``screen`` table. With ``known_per_relation``, each relation's
    facts are screened in order until that many of them are known; ``max_per_relation``
    caps the number of facts screened per relation.

    The units run in waves: each wave takes, for every relation still short of
    ``known_per_relation`` known facts by n, its next n unscreened facts (all of them without
    a quota). That screens exactly the facts a one-by-one loop would: until the last fact of
    a wave is screened, the relation cannot have reached its quota.
    """
    by_rel: dict[str, list[Fact]] = {}
    for fact in facts:
        by_rel.setdefault(fact.relation, []).append(fact)
    if max_per_relation is not None:
        by_rel = {r: fs[:max_per_relation] for r, fs in by_rel.items()}
    pos = dict.fromkeys(by_rel, 0)
    known = dict.fromkeys(by_rel, 0)
    screened: list[str] = []
    wave = computed = 0
    t0 = time.time()
    while True:
        batch: list[Fact] = []
        for rel, fs in by_rel.items():
            n = len(fs) - pos[rel]
            if known_per_relation is not None:
                n = min(n, known_per_relation - known[rel])
            batch += fs[pos[rel]:pos[rel] + max(n, 0)]
            pos[rel] += max(n, 0)
        if not batch:
            break
        wave += 1
        check_targets(model, [q for f in batch for q in f.queries], target)
        units = [Unit(screen_key(model, f, target), ScreenUnit(f, target),
                      f"{f.relation} {f.fact_id}",
                      {"relation": f.relation, "fact_id": f.fact_id}) for f in batch]
        stats = run_units(units, screen_fact, store, model=model, marker="screen",
                          executor=executor,
                          desc="screening" if wave == 1 else f"screening (wave {wave})",
                          unit_name="fact", progress=progress, summary=False)
        computed += stats.computed
        screened += [u.key for u in units]
        for unit, fact in zip(units, batch):
            part = store.get("screen", unit.key)
            if bool(part.loc[part["fact_id"] == fact.fact_id, "known"].any()):
                known[fact.relation] += 1
    store.set_current("screen", screened)  # every wave's facts
    log_summary(f"screening ({wave} wave{'s' if wave != 1 else ''})", "fact",
                UnitStats(computed, len(screened) - computed, time.time() - t0), len(screened))
    table = store.table("screen")
    ids = {q.query_id for q in facts.queries()}
    return table[table["query_id"].isin(ids)].reset_index(drop=True)


def select_population(facts: FactSet, screened: pd.DataFrame, *, population: str = "known",
                      known_per_relation: int | None = None) -> tuple[FactSet, dict[str, int]]:
    """The facts to localize: all, or those known (top-1) on at least one query.

    ``known_per_relation`` keeps at most that many population facts per relation (in the
    source's order). Returns the subset and the number of facts each filter removed.
    """
    if population not in ("known", "all"):
        raise ValueError(f"population must be 'known' or 'all' (got {population!r})")
    known_facts = set(screened.loc[screened["known"].astype(bool), "fact_id"])
    seen = set(screened["fact_id"])
    kept: list = []
    removed = {"not screened (relation's quota of known facts reached, or screen cap)": 0,
               "not known by the model": 0, "beyond known_per_relation": 0}
    per_rel: dict[str, int] = {}
    for f in facts:
        if f.fact_id not in seen:
            removed["not screened (relation's quota of known facts reached, or screen cap)"] += 1
            continue
        if population == "known" and f.fact_id not in known_facts:
            removed["not known by the model"] += 1
            continue
        if known_per_relation is not None and per_rel.get(f.relation, 0) >= known_per_relation:
            removed["beyond known_per_relation"] += 1
            continue
        per_rel[f.relation] = per_rel.get(f.relation, 0) + 1
        kept.append(f)
    subset = FactSet(facts=kept, source=facts.source, skipped=dict(facts.skipped),
                     relations=sorted({f.relation for f in kept}),
                     relation_labels=getattr(facts, "relation_labels", {}))
    return subset, {k: v for k, v in removed.items() if v}


# --------------------------------------------------------------------- localization
@dataclass
class LocalizeConfig:
    """What to localize: the methods and their attribution settings, how knowledge neurons
    are selected, how many top scores each query keeps (``keep_top``), and ``keep_maps``:
    keep every query's full attribution map in the ``maps`` table."""

    methods: Sequence[str] = ("ig",)
    n_steps: int = 20
    sig_mode: str = "mean"
    selection: Selection = field(default_factory=Selection)
    keep_top: int = 200
    internal_batch_size: int | None = None
    memory_budget_gb: float = 2.0
    target: str = "first"
    keep_maps: bool = False
    rule: str = DEFAULT_RULE  # the integration rule (knowloc.attribution.quadrature)

    def attribution_configs(self) -> list[AttributionConfig]:
        return [
            AttributionConfig(method=m, n_steps=self.n_steps, sig_mode=self.sig_mode,
                              target=self.target, rule=self.rule).validate()
            for m in self.methods
        ]

    def as_dict(self) -> dict[str, Any]:
        return {
            "methods": list(self.methods),
            "n_steps": self.n_steps,
            "sig_mode": self.sig_mode,
            "selection": self.selection.as_dict(),
            "keep_top": self.keep_top,
            "target": self.target,
            "keep_maps": self.keep_maps,
            "rule": self.rule,
        }


def query_key(model: Model, query: Query, cfg: AttributionConfig, selection: Selection,
              keep_top: int) -> str:
    """The unit key of localizing one query with one method."""
    return unit_key(model, None, prompt=query.prompt, answer=query.answer,
                    attribution=cfg.as_dict(), selection=selection.as_dict(),
                    keep_top=keep_top)


def map_key(model: Model, query: Query, cfg: AttributionConfig) -> str:
    """The key of one query's attribution map with one method (no neuron selection)."""
    return unit_key(model, MAPS, prompt=query.prompt, answer=query.answer,
                    attribution=cfg.as_dict())


@dataclass(frozen=True)
class LocalizeUnit:
    """The payload of one localization unit (``map_key``: the key of its attribution map)."""

    query: Query
    attribution: AttributionConfig
    selection: Selection
    keep_top: int
    internal_batch_size: int | None
    memory_budget_gb: float
    map_key: str | None = None

    @property
    def ident(self) -> dict[str, Any]:
        """The identity columns of the unit's rows."""
        q = self.query
        return {"method": self.attribution.method, "relation": q.relation,
                "fact_id": q.fact_id, "query_id": q.query_id}


def attribute_query(model: Model, unit: LocalizeUnit) -> tuple[Attribution, float]:
    """The attribution of the unit's query and the seconds it took."""
    q, acfg = unit.query, unit.attribution
    t = time.time()
    attr = attribute(
        model,
        q,
        acfg.method,
        n_steps=acfg.n_steps,
        sig_mode=acfg.sig_mode,
        target=acfg.target,
        rule=acfg.rule,
        internal_batch_size=unit.internal_batch_size,
        memory_budget_gb=unit.memory_budget_gb,
        progress=False,
    )
    seconds = time.time() - t
    assert isinstance(attr, Attribution)  # one query in, one Attribution out
    return attr, seconds


def localization_tables(unit: LocalizeUnit, attr: Attribution, seconds: float,
                        model: Model) -> Tables:
    """The unit's tables read off its attribution: knowledge neurons, top scores, timing
    and queries row (``model``: only its tokenizer, for ``target_text``)."""
    q, acfg, ident = unit.query, unit.attribution, unit.ident
    kn = neurons_frame(attr, unit.selection)
    top = neurons_frame(attr, Selection("topk", min(unit.keep_top, attr.scores.numel())))
    row = {
        **ident,
        "prompt": q.prompt,
        "answer": q.answer,
        **target_columns(model, attr.target_ids or (attr.target_id,)),
        "prob": attr.prob,
        "predicted": attr.predicted,
        "known": bool(attr.top1),
        "n_neurons": len(kn),
        "max_attribution": float(attr.scores.max()),
        "n_steps": acfg.n_steps,
        "completeness_gap": (float(attr.completeness_gap.max())
                             if attr.completeness_gap is not None else float("nan")),
    }
    return {"neuron_sets": with_ident(kn, ident), "attributions": with_ident(top, ident),
            "timings": pd.DataFrame([{**ident, "seconds": round(seconds, 3)}]),
            "queries": pd.DataFrame([row])}


def localize_query(model: Model, unit: LocalizeUnit) -> dict[str, pd.DataFrame]:
    """Attribution of one query: its knowledge neurons, top scores, timing and queries row."""
    attr, seconds = attribute_query(model, unit)
    return localization_tables(unit, attr, seconds, model)


def map_query(model: Model, unit: LocalizeUnit) -> dict[str, pd.DataFrame]:
    """Attribution of one query: its full map (the ``maps`` row, :func:`~.run.map_frame`)."""
    attr, seconds = attribute_query(model, unit)
    return {MAPS: map_frame(attr, unit.ident, seconds)}


class FromMaps:
    """An executor of localization units that computes a unit whose attribution map is
    stored from that map, here and without the model; the other units go to ``inner``."""

    def __init__(self, inner: Executor, store: RunStore, stored: set[str]) -> None:
        self.inner = inner
        self.store = store
        self.stored = stored

    def run(self, compute: Compute, model: Any, payloads: Sequence[Any],
            **options: Any) -> Iterator[tuple[int, Tables]]:
        rest: list[int] = []
        for i, unit in enumerate(payloads):
            if unit.map_key in self.stored:
                attr, seconds = read_map(self.store, unit.map_key, unit.query.query_id)
                yield i, localization_tables(unit, attr, seconds, model)
            else:
                rest.append(i)
        if rest:
            for j, tables in self.inner.run(compute, model, [payloads[i] for i in rest],
                                            **options):
                yield rest[j], tables


def retire_downstream(store: RunStore) -> None:
    """Retire every table computed from the localized queries (consistency and the stages
    after it): a run directory holds one localization, and their rows belong to another.
    Their parts stay as a cache; rerunning those stages restores them without computing."""
    own = {"screen", MAPS, *LOCALIZE_TABLES}
    stale = [t for t in store.tables() if t not in own]
    for table in stale:
        store.retire(table)
    if stale:
        log.warning("the run's localization changed: retired %s; rerun consistency and the "
                    "stages after it", ", ".join(stale))


@dataclass
class LocalizeResult:
    store: RunStore
    computed: int
    skipped_done: int
    seconds: float
    queries: pd.DataFrame


def localize(
    model: Model,
    facts: FactSet,
    store: RunStore,
    cfg: LocalizeConfig,
    *,
    progress: bool = True,
    executor: Executor | None = None,
) -> LocalizeResult:
    """Localize the knowledge neurons of every query of ``facts`` with every method.

    With ``cfg.keep_maps`` every query's full attribution map is stored first (the ``maps``
    table; :func:`~knowloc.pipeline.run.load_maps` reads them back). A unit not done whose
    map is stored, from this or an earlier call, is read off the map without the model, so
    another neuron selection on a run with maps computes no attribution.
    """
    check_targets(model, facts.queries(), cfg.target)
    units = []
    for acfg in cfg.attribution_configs():
        for q in facts.queries():
            payload = LocalizeUnit(q, acfg, cfg.selection, cfg.keep_top, cfg.internal_batch_size,
                                   cfg.memory_budget_gb, map_key(model, q, acfg))
            units.append(Unit(query_key(model, q, acfg, cfg.selection, cfg.keep_top), payload,
                              f"{acfg.method} {q.relation} {short_label(q.prompt, 30)}",
                              payload.ident))
    before = store.current_keys("queries")
    if before is not None and before != {u.key for u in units}:
        retire_downstream(store)
    if cfg.keep_maps:
        maps = [Unit(u.payload.map_key, u.payload, u.label, u.ident) for u in units]
        run_units(maps, map_query, store, model=model, marker=MAPS, executor=executor,
                  desc="attribution maps", unit_name="query", progress=progress)
    stored = store.done_keys(MAPS)
    if stored:
        executor = FromMaps(executor or LocalExecutor(), store, stored)
    stats = run_units(units, localize_query, store, model=model, marker="queries",
                      consolidate=LOCALIZE_TABLES, executor=executor, desc="localizing",
                      unit_name="query", progress=progress)
    record_target(store, cfg.target)  # the stages after it score answers the same way
    return LocalizeResult(store, stats.computed, stats.skipped_done, stats.seconds,
                          store.table("queries"))
