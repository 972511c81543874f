"""Dynamic KN selection (METHODS §5, paper §3.2): predominance (Figure 5), knowledge
synapses × 0 / × 2 (Figure 6) and the activation heatmaps (Figures 1, 7, 10).

Units are facts (content-hashed, resumable): each writes ``attention_queries``,
``synapse_effects`` and ``predominance`` (the marker). The heatmaps of one K_I and one K_II
fact are units of the ``heatmaps`` table. The stage returns the Figure 5 and 6 tables and
the heatmap tables; :func:`knowloc.report.stages.present_attention` writes their CSV and
figures.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch

from ..errors import ConfigError
from ..models import Model
from ..store import RunStore
from .attention_tables import (  # noqa: F401  (re-exported)
    KIND_ORDER,
    OPERATION_ORDER,
    SYNAPSE_ORDER,
    figure5_table,
    figure6_table,
    synapse_effect_summary,
)
from .resampling import run_bootstrap
from .run import (
    RunFacts,
    key_config,
    parse_threshold,
    read_run,
    seeded_rng,
    target_key,
    unit_key,
)
from .units import Executor, Unit, run_units, short_label

log = logging.getLogger(__name__)

ATTENTION_QUERY_SORT = ["relation", "fact_id", "query_id"]
PREDOMINANCE_SORT = ["relation", "fact_id", "first"]
SYNAPSE_EFFECT_SORT = ["method", "relation", "fact_id", "query_id", "first", "synapses",
                       "operation"]
ATTENTION_TABLES: dict[str, Sequence[str] | None] = {
    "attention_queries": ATTENTION_QUERY_SORT, "synapse_effects": SYNAPSE_EFFECT_SORT,
    "predominance": PREDOMINANCE_SORT}

SYNAPSE_VARIANTS = {True: "as-defined", False: "no-first"}


@dataclass
class AttentionConfig:
    """Dynamic KN selection (METHODS §5, paper §3.2, Figures 1, 5, 6, 7, 10)."""

    methods: Sequence[str] | None = None  # whose KNs (ΔValue) and K_I/K_II split are used
    split_threshold: float | str = 0.1
    alpha: float = 0.3
    suppress: float = 0.0
    enhance: float = 2.0
    rows: str = "all"
    only_known: bool = True  # Figure 6 averages over queries the model answers correctly
    seed: int = 0
    heatmap_neurons: int = 64  # neuron columns of the report's heatmaps (KNs + top |act|)

    def validate(self) -> AttentionConfig:
        if self.rows not in ("all", "last"):
            raise ConfigError(f"rows must be 'all' or 'last' (got {self.rows!r})")
        if not self.alpha >= 0:
            raise ConfigError(f"alpha must be >= 0 (got {self.alpha})")
        if self.heatmap_neurons < 1:
            raise ConfigError("heatmap_neurons must be >= 1")
        self.split_threshold = parse_threshold(self.split_threshold)
        return self

    #: Fields that choose which units exist or how they are shown, not what one computes.
    UNKEYED: ClassVar[tuple[str, ...]] = ("methods", "split_threshold", "only_known",
                                          "heatmap_neurons")

    def key_config(self) -> dict[str, Any]:
        """The fields that key the stage's units (:func:`~knowloc.pipeline.run.key_config`)."""
        return key_config(self, self.UNKEYED)

    def as_dict(self) -> dict[str, Any]:
        return {"methods": list(self.methods) if self.methods else None,
                "split_threshold": self.split_threshold, "alpha": self.alpha,
                "suppress": self.suppress, "enhance": self.enhance, "rows": self.rows,
                "only_known": self.only_known, "seed": self.seed,
                "heatmap_neurons": self.heatmap_neurons}


@dataclass
class HeatmapPanel:
    """The heatmap table of two neighbor queries of one fact (Figures 1, 7, 10)."""

    fact_id: str
    method: str
    table: pd.DataFrame


@dataclass
class AttentionResult:
    predominance: pd.DataFrame  # one row per fact and variant (first position allowed or not)
    queries: pd.DataFrame  # one row per query: most attended tokens, synapse counts
    effects: pd.DataFrame  # one row per method, query, variant, synapse set and operation
    figure5: pd.DataFrame
    figure6: pd.DataFrame
    split: pd.DataFrame  # the K_I/K_II split the stage used
    methods: list[str]
    only_known: bool
    heatmaps: dict[str, HeatmapPanel]  # panel (K_I / K_II) -> its table
    computed: int
    skipped_done: int
    seconds: float


def irrelevant_query(catalog: pd.DataFrame, relation: str, fact_id: str, query_id: str,
                     seed: int) -> tuple[str, str] | None:
    """S_ir's source: a query of a fact of another relation (of another fact when the run has
    one relation), drawn with a seed per query. Returns (query_id, prompt)."""
    pool = catalog[catalog["relation"] != relation]
    if pool.empty:
        pool = catalog[catalog["fact_id"] != fact_id]
    if pool.empty:
        return None
    row = pool.iloc[int(seeded_rng("irrelevant-synapses", seed, query_id).integers(len(pool)))]
    return str(row["query_id"]), str(row["prompt"])


@dataclass(frozen=True)
class AttentionUnit:
    """The payload of one attention unit: one fact's queries."""

    fact_id: str
    relation: str
    queries: tuple[tuple[str, str, str, bool], ...]  # (query_id, prompt, answer, known)
    kns: tuple[tuple[str, tuple[tuple[str, tuple[tuple[int, int], ...]], ...]], ...]
    irrelevant: tuple[tuple[str, tuple[str, str] | None], ...]  # query_id -> (id, prompt)
    alpha: float
    suppress: float
    enhance: float
    rows: str
    target: str = "first"  # the run's target mode (Model.target_ids)


def attend_fact(model: Model, unit: AttentionUnit) -> dict[str, pd.DataFrame]:
    """Predominance, synapses and synapse manipulations of one fact's queries (ΔProb of
    the teacher-forced target tokens in ``unit.target`` mode)."""
    from ..interventions.attention import attention_map, eager_attention, synapse_effects
    from ..synapses import knowledge_synapses, most_attended, predominance_both

    rows: Any = unit.rows  # "all" or "last", checked by AttentionConfig.validate
    kns = {m: dict(by_q) for m, by_q in unit.kns}
    irrelevant = dict(unit.irrelevant)
    maps, qrows, erows = [], [], []
    irr_maps: dict[str, Any] = {}
    ops = (("sup", unit.suppress), ("enh", unit.enhance))
    with eager_attention(model):
        for qid, prompt, answer, known in unit.queries:
            ids = model.encode_prompt(prompt)
            target = model.target_ids(prompt, answer, unit.target)
            amap = attention_map(model, ids, rows=rows, query_id=qid, fact_id=unit.fact_id)
            maps.append(amap)
            own = {True: knowledge_synapses(amap, alpha=unit.alpha),
                   False: knowledge_synapses(amap, alpha=unit.alpha, exclude_first=True)}
            irr = irrelevant[qid]
            irr_sets: dict[bool, Any] = {}
            if irr is not None:
                if irr[0] not in irr_maps:
                    irr_maps[irr[0]] = attention_map(model, irr[1], rows=rows)
                im = irr_maps[irr[0]]
                irr_sets = {True: knowledge_synapses(im, alpha=unit.alpha),
                            False: knowledge_synapses(im, alpha=unit.alpha, exclude_first=True)}
            top_any = most_attended(amap)
            top_no_first = most_attended(amap, skip_first=True)
            qrows.append({
                "relation": unit.relation, "fact_id": unit.fact_id, "query_id": qid,
                "prompt": prompt, "answer": answer, "known": known,
                "n_positions": len(ids),
                "top_token": amap.tokens[top_any] if top_any is not None else None,
                "top_token_no_first": (amap.tokens[top_no_first] if top_no_first is not None
                                       else None),
                "tau": float(own[True].tau), "n_synapses": len(own[True]),
                "n_synapses_first": len(own[True]) - len(own[False]),
                "n_synapses_no_first": len(own[False]),
                "irrelevant_query_id": irr[0] if irr else None,
            })
            labels, variants = [], []
            for first in (True, False):
                sets = {"self": own[first]}
                if irr_sets:
                    sets["irrelevant"] = irr_sets[first]  # clipped to the prompt by the effect
                for name, syn in sets.items():
                    for op, factor in ops:
                        labels.append((first, name, op))
                        variants.append((syn, factor))
            methods = list(kns)
            effects = synapse_effects(model, ids, target, variants,
                                      [kns[m].get(qid, ()) for m in methods], rows=rows)
            for (first, name, op), by_method in zip(labels, effects):
                for method, e in zip(methods, by_method):
                    erows.append({
                        "method": method, "relation": unit.relation,
                        "fact_id": unit.fact_id, "query_id": qid, "known": known,
                        "first": first, "synapses": name, "operation": op,
                        "factor": e.factor, "n_synapses": e.n_synapses,
                        "n_clipped": e.n_clipped, "n_neurons": e.n_neurons,
                        "value_before": e.value_before, "value_after": e.value_after,
                        "prob_before": e.prob_before, "prob_after": e.prob_after,
                        "delta_value": e.delta_value, "delta_prob": e.delta_prob,
                        "irrelevant_query_id": irr[0] if name == "irrelevant" and irr
                        else None,
                    })
    both = predominance_both(maps)
    prows = [{"relation": unit.relation, "fact_id": unit.fact_id, "first": key == "with_first",
              "P": pr.score, "token": None if pr.token is None else str(pr.token),
              "n_queries": pr.n_queries} for key, pr in both.items()]
    return {"attention_queries": pd.DataFrame(qrows), "synapse_effects": pd.DataFrame(erows),
            "predominance": pd.DataFrame(prows)}


def attention_units(model: Model, run: RunFacts, cfg: AttentionConfig) -> list[Unit]:
    """One unit per fact of the run's split."""
    facts = run.split.drop_duplicates("fact_id")[["fact_id", "relation"]]
    config = cfg.key_config()
    units = []
    for fact in facts.itertuples():
        fq = (run.queries[(run.queries["fact_id"] == fact.fact_id)
                          & run.queries["method"].isin(run.methods)]
              .drop_duplicates("query_id").sort_values("query_id"))
        if fq.empty:
            continue
        qids = [str(q) for q in fq["query_id"]]
        kns = {m: {q: sorted(run.neurons.get((m, q), [])) for q in qids} for m in run.methods}
        irr = {q: irrelevant_query(run.catalog, fact.relation, fact.fact_id, q, cfg.seed)
               for q in qids}
        key = unit_key(model, "attention",
                       queries=[(q.prompt, q.answer, bool(q.known)) for q in fq.itertuples()],
                       neurons=kns, irrelevant=irr, config=config, **target_key(run.target))
        payload = AttentionUnit(
            fact_id=fact.fact_id, relation=fact.relation,
            queries=tuple((str(q.query_id), str(q.prompt), str(q.answer), bool(q.known))
                          for q in fq.itertuples()),
            kns=tuple((m, tuple((q, tuple(ns)) for q, ns in by_q.items()))
                      for m, by_q in kns.items()),
            irrelevant=tuple(irr.items()), alpha=cfg.alpha, suppress=cfg.suppress,
            enhance=cfg.enhance, rows=cfg.rows, target=run.target)
        units.append(Unit(key, payload, f"{fact.relation} {fact.fact_id[:30]}",
                          {"relation": fact.relation, "fact_id": fact.fact_id}))
    return units


def attention_experiment(
    model: Model,
    store: RunStore,
    cfg: AttentionConfig,
    *,
    query_ids: set[str] | None = None,
    heatmaps: bool = True,
    progress: bool = True,
    executor: Executor | None = None,
    allow_partial: bool = False,
    n_boot: int | None = None,
    boot_seed: int | None = None,
) -> AttentionResult:
    """Predominance (Figure 5), knowledge synapses and their suppression/enhancement
    (Figure 6) for every fact of the run's K_I/K_II split, and the activation heatmaps of
    two neighbor queries of one K_I and one K_II fact (Figures 1, 7, 10).

    Per fact (one work unit, content-hashed and resumable): the attention map of each query
    (eager attention), the predominance score P with and without the first position, the
    query's synapses as defined and with position 0 excluded, the synapses of an unrelated
    query (another relation's, seeded, clipped to the prompt length), each × 0 and × 2:
    ΔProb and ΔValue (mean activation of the query's KNs, per method). Writes
    ``predominance.parquet``, ``attention_queries.parquet`` and ``synapse_effects.parquet``.
    ``n_boot``, ``boot_seed``: the bootstrap behind Figure 6's intervals (default: the
    run's, :func:`~knowloc.pipeline.resampling.run_bootstrap`).
    """
    t0 = time.time()
    cfg.validate()
    run = read_run(store, cfg.methods, cfg.split_threshold, query_ids,
                   allow_partial=allow_partial)
    stats = run_units(attention_units(model, run, cfg), attend_fact, store, model=model,
                      marker="predominance", consolidate=ATTENTION_TABLES, executor=executor,
                      desc="attention", unit_name="fact", progress=progress)
    panels = heatmap_panels(model, store, run, cfg, executor=executor,
                            progress=progress) if heatmaps else {}
    res = attention_result(store, run, cfg, query_ids, panels, n_boot=n_boot,
                           boot_seed=boot_seed)
    res.computed, res.skipped_done, res.seconds = stats.computed, stats.skipped_done, \
        time.time() - t0
    return res


def attention_result(store: RunStore, run: RunFacts, cfg: AttentionConfig,
                     query_ids: set[str] | None = None,
                     panels: dict[str, HeatmapPanel] | None = None, *,
                     n_boot: int | None = None,
                     boot_seed: int | None = None) -> AttentionResult:
    """Figures 5 and 6 of the stored attention tables of ``run``'s split (no model): what
    :func:`attention_experiment` returns, from a run directory. ``panels``: the heatmap
    panels (default: those of the stored ``heatmaps`` table); ``n_boot``, ``boot_seed``:
    the bootstrap of Figure 6's intervals (default: the run's,
    :func:`~knowloc.pipeline.resampling.run_bootstrap`)."""
    n_boot, boot_seed = run_bootstrap(store, n_boot, boot_seed)
    if panels is None:
        panels = stored_heatmap_panels(store)
    fact_ids = set(run.split["fact_id"])
    pred = store.table("predominance")
    pred = pred[pred["fact_id"].isin(fact_ids)] if len(pred) else pred
    aq = store.table("attention_queries")
    if len(aq):
        aq = aq[aq["fact_id"].isin(fact_ids)]
        if query_ids is not None:
            aq = aq[aq["query_id"].isin(query_ids)]
    eff = store.table("synapse_effects")
    if len(eff):
        keep = [(m, f) in set(zip(run.split["method"], run.split["fact_id"]))
                for m, f in zip(eff["method"], eff["fact_id"])]
        eff = eff[keep]
        if query_ids is not None:
            eff = eff[eff["query_id"].isin(query_ids)]
    return AttentionResult(pred.reset_index(drop=True), aq.reset_index(drop=True),
                           eff.reset_index(drop=True), figure5_table(pred, run.split),
                           figure6_table(eff, run.split, only_known=cfg.only_known,
                                         n_boot=n_boot, boot_seed=boot_seed), run.split,
                           run.methods, cfg.only_known, panels, 0, 0, 0.0)


def stored_heatmap_panels(store: RunStore) -> dict[str, HeatmapPanel]:
    """The heatmap panels of the run's current ``heatmaps`` table (K_I / K_II -> panel)."""
    table = store.table("heatmaps")
    if table.empty:
        return {}
    panels = {}
    for kind, g in table.groupby("panel", sort=False):
        panels[str(kind)] = HeatmapPanel(str(g["fact_id"].iloc[0]), str(g["method"].iloc[0]),
                                         g.reset_index(drop=True))
    order = {"K_I": 0, "K_II": 1}
    return dict(sorted(panels.items(), key=lambda kv: (order.get(kv[0], 2), kv[0])))


def heatmap_table(model: Model, prompts: Sequence[str], labels: Sequence[str],
                  neurons: Sequence[Sequence[tuple[int, int]]], *, alpha: float = 0.3,
                  n_neurons: int = 64, rows: str = "all") -> pd.DataFrame:
    """Layer × neuron activation table of neighbor queries (Figures 1, 7, 10).

    For each prompt: last-position activations of every layer as is (``none``), with its
    knowledge synapses suppressed (× 0) / enhanced (× 2) as defined (``suppress`` /
    ``enhance``) and with position 0 excluded from them (``... (position 0 excluded)``), by
    :func:`knowloc.interventions.attention.heatmap_frame`. The neuron axis is cut to ``n_neurons``
    columns, the same for every panel: the neuron indices of the prompts' knowledge neurons
    ``neurons[i]`` first, then those with the largest |activation| (any layer,
    unmanipulated). Columns: ``query, prompt, condition, layer, neuron, activation, is_kn``
    (is_kn: (layer, neuron) is a knowledge neuron of that query).
    """
    from ..interventions.attention import attention_map, heatmap_frame
    from ..synapses import knowledge_synapses

    if not (len(prompts) == len(labels) == len(neurons)):
        raise ConfigError("prompts, labels and neuron sets must have the same length")
    as_is = [heatmap_frame(model, [p], labels=[lab], rows=rows)  # type: ignore[arg-type]
             for p, lab in zip(prompts, labels)]
    cols: list[int] = sorted({int(p) for ns in neurons for _, p in ns})[:n_neurons]
    if len(cols) < n_neurons:
        acts = [torch.from_numpy(f["activation"].to_numpy(np.float32).reshape(model.n_layers, -1))
                for f in as_is]
        peak = torch.stack([a.abs().max(0).values for a in acts]).max(0).values
        for p in torch.argsort(peak, descending=True).tolist():
            if len(cols) >= n_neurons:
                break
            if p not in cols:
                cols.append(int(p))
    cols = sorted(cols)
    frames = []
    for i, prompt in enumerate(prompts):
        amap = attention_map(model, prompt, rows=rows)  # type: ignore[arg-type]
        parts = [as_is[i][as_is[i]["neuron"].isin(cols)]]
        for first, suffix in ((True, ""), (False, " (position 0 excluded)")):
            syn = knowledge_synapses(amap, alpha=alpha, exclude_first=not first)
            part = heatmap_frame(model, [prompt], [syn], conditions=("suppress", "enhance"),
                                 neurons=cols, labels=[labels[i]], rows=rows)  # type: ignore[arg-type]
            parts.append(part.assign(condition=part["condition"] + suffix))
        frame = pd.concat(parts, ignore_index=True)
        kn = {(int(l), int(p)) for l, p in neurons[i]}
        frame["is_kn"] = [(int(a), int(b)) in kn for a, b in zip(frame["layer"], frame["neuron"])]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def pick_heatmap_facts(run: RunFacts, method: str) -> dict[str, tuple[str, list[Any]]]:
    """One K_I and one K_II fact (the first in order with >= 2 queries, known ones first)
    and two of its queries."""
    out: dict[str, tuple[str, list[Any]]] = {}
    sp = run.split[run.split["method"] == method].sort_values(["relation", "fact_id"])
    for kind in KIND_ORDER:
        best = None
        for fact in sp[sp["kind"] == kind].itertuples():
            fq = run.queries[(run.queries["method"] == method)
                             & (run.queries["fact_id"] == fact.fact_id)]
            fq = fq.sort_values(["known", "query_id"], ascending=[False, True])
            if len(fq) < 2:
                continue
            n_known = int(fq["known"].astype(bool).sum())
            if best is None or n_known > best[0]:
                best = (n_known, fact.fact_id, list(fq.head(2).itertuples()))
            if n_known >= 2:
                break
        if best is not None:
            out[kind] = (best[1], best[2])
    return out


@dataclass(frozen=True)
class HeatmapUnit:
    """The payload of one heatmap unit: two neighbor queries of one fact."""

    kind: str
    method: str
    fact_id: str
    prompts: tuple[str, ...]
    labels: tuple[str, ...]
    neurons: tuple[tuple[tuple[int, int], ...], ...]
    alpha: float
    rows: str
    n_neurons: int


def heatmap_unit(model: Model, unit: HeatmapUnit) -> dict[str, pd.DataFrame]:
    """The ``heatmaps`` rows of one panel."""
    table = heatmap_table(model, unit.prompts, unit.labels, [list(n) for n in unit.neurons],
                          alpha=unit.alpha, n_neurons=unit.n_neurons, rows=unit.rows)
    table.insert(0, "panel", unit.kind)
    table.insert(1, "method", unit.method)
    table.insert(2, "fact_id", unit.fact_id)
    return {"heatmaps": table}


def heatmap_panels(model: Model, store: RunStore, run: RunFacts, cfg: AttentionConfig, *,
                   executor: Executor | None = None,
                   progress: bool = True) -> dict[str, HeatmapPanel]:
    """Heatmap tables (Figures 1, 7, 10) of two neighbor queries of one K_I and one K_II
    fact of the first method's split. Stored in the ``heatmaps`` table (content-hashed: a
    rerun recomputes nothing)."""
    from ..synapses import CONDITIONS

    if not run.methods:
        return {}
    method = run.methods[0]
    units = []
    for kind, (fact_id, qs) in pick_heatmap_facts(run, method).items():
        prompts = [str(q.prompt) for q in qs]
        labels = [f"{kind} q{j + 1}: {short_label(str(q.prompt), 40)} → {q.answer}"
                  for j, q in enumerate(qs)]
        neurons = [sorted(run.neurons.get((method, str(q.query_id)), [])) for q in qs]
        key = unit_key(model, "heatmaps", prompts=prompts, labels=labels, neurons=neurons,
                       alpha=cfg.alpha, rows=cfg.rows, n=cfg.heatmap_neurons,
                       factors=[CONDITIONS["suppress"], CONDITIONS["enhance"]])
        units.append(Unit(key, HeatmapUnit(kind, method, fact_id, tuple(prompts), tuple(labels),
                                           tuple(tuple(n) for n in neurons), cfg.alpha, cfg.rows,
                                           cfg.heatmap_neurons), f"{kind} {fact_id[:30]}",
                          {"panel": kind, "method": method, "fact_id": fact_id}))
    run_units(units, heatmap_unit, store, model=model, marker="heatmaps", executor=executor,
              desc="heatmaps", unit_name="panel", progress=progress)
    return {u.payload.kind: HeatmapPanel(u.payload.fact_id, method, store.get("heatmaps", u.key))
            for u in units}
