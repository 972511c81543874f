"""One function per paper experiment, each reading and writing a run directory.

Stage tables (Parquet, under ``<run>/parts/<table>/<key>.parquet`` while running and
``<run>/<table>.parquet`` once consolidated):

* ``queries``      one row per (method, query): probability, prediction, known, |N_i|
* ``neuron_sets``  one row per knowledge neuron of a query (layer, neuron, attribution, ...)
* ``attributions`` the top ``keep_top`` attribution scores of each query (for CAS and plots)

Each (model, prompt, answer, method config) is a content-hashed work unit: a rerun skips
finished units, an interrupted run resumes, nothing is computed twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .attribution import AttributionConfig, attribute
from .data import FactSet, Query
from .models import Model
from .models.forward import next_token_probs
from .neurons import Selection, neurons_frame
from .store import RunStore, content_hash

log = logging.getLogger(__name__)

QUERY_SORT = ["method", "relation", "fact_id", "query_id"]
NEURON_SORT = ["method", "relation", "fact_id", "query_id", "rank"]


def model_fingerprint(model: Model) -> dict[str, Any]:
    return {
        "name": model.name,
        "adapter": model.adapter.name,
        "dtype": str(model.dtype).replace("torch.", ""),
        "n_layers": model.n_layers,
        "d_mlp": model.d_mlp,
    }


@dataclass
class LocalizeConfig:
    methods: Sequence[str] = ("ig",)
    n_steps: int = 20
    sig_mode: str = "mean"
    selection: Selection = field(default_factory=Selection)
    keep_top: int = 200
    internal_batch_size: int | None = None
    memory_budget_gb: float = 2.0

    def attribution_configs(self) -> list[AttributionConfig]:
        return [
            AttributionConfig(method=m, n_steps=self.n_steps, sig_mode=self.sig_mode).validate()
            for m in self.methods
        ]

    def as_dict(self) -> dict[str, Any]:
        return {
            "methods": list(self.methods),
            "n_steps": self.n_steps,
            "sig_mode": self.sig_mode,
            "selection": self.selection.as_dict(),
            "keep_top": self.keep_top,
        }


def unit_key(model: Model, query: Query, cfg: AttributionConfig, selection: Selection) -> str:
    return content_hash(
        {
            "model": model_fingerprint(model),
            "prompt": query.prompt,
            "answer": query.answer,
            "attribution": cfg.as_dict(),
            "selection": selection.as_dict(),
        }
    )


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
) -> LocalizeResult:
    """Localize the knowledge neurons of every query of ``facts`` with every method."""
    t0 = time.time()
    done = store.done_keys("queries")
    todo: list[tuple[Query, AttributionConfig, str]] = []
    n_done = 0
    for acfg in cfg.attribution_configs():
        for q in facts.queries():
            key = unit_key(model, q, acfg, cfg.selection)
            if key in done:
                n_done += 1
            else:
                todo.append((q, acfg, key))
    if n_done:
        log.info("%d of %d query attributions already done; resuming", n_done, n_done + len(todo))
    bar = tqdm(todo, desc="localizing", unit="query", disable=not progress)
    for q, acfg, key in bar:
        bar.set_postfix_str(f"{acfg.method} {q.relation} {q.prompt[-30:]}")
        t = time.time()
        attr = attribute(
            model,
            q,
            acfg.method,
            n_steps=acfg.n_steps,
            sig_mode=acfg.sig_mode,
            internal_batch_size=cfg.internal_batch_size,
            memory_budget_gb=cfg.memory_budget_gb,
            progress=False,
        )
        seconds = time.time() - t
        ident = {
            "method": acfg.method,
            "relation": q.relation,
            "fact_id": q.fact_id,
            "query_id": q.query_id,
        }
        kn = neurons_frame(attr, cfg.selection)
        store.put("neuron_sets", key, _with_ident(kn, ident))
        top = neurons_frame(attr, Selection("topk", min(cfg.keep_top, attr.scores.numel())))
        store.put("attributions", key, _with_ident(top, ident))
        row = {
            **ident,
            "prompt": q.prompt,
            "answer": q.answer,
            "target_id": attr.target_id,
            "prob": attr.prob,
            "predicted": attr.predicted,
            "known": bool(attr.top1),
            "n_neurons": len(kn),
            "max_attribution": float(attr.scores.max()),
            "n_steps": acfg.n_steps,
        }
        # wall-clock times live in their own table so result tables stay byte-identical
        store.put("timings", key, pd.DataFrame([{**ident, "seconds": round(seconds, 3)}]))
        # the queries row is the unit's completion marker: written last
        store.put("queries", key, pd.DataFrame([row]))
    bar.close()
    queries = consolidate_localization(store)
    return LocalizeResult(store, len(todo), n_done, time.time() - t0, queries)


def _with_ident(df: pd.DataFrame, ident: dict[str, Any]) -> pd.DataFrame:
    out = df.copy()
    for i, (k, v) in enumerate(ident.items()):
        out.insert(i, k, pd.Series([v] * len(out), dtype="object"))
    return out


def consolidate_localization(store: RunStore) -> pd.DataFrame:
    """Write the consolidated, deterministically sorted localization tables."""
    queries = store.table("queries")
    if len(queries):
        store.consolidate("queries", sort_by=QUERY_SORT)
    if store.done_keys("timings"):
        store.consolidate("timings", sort_by=QUERY_SORT)
    for name in ("neuron_sets", "attributions"):
        if store.done_keys(name):
            store.consolidate(name, sort_by=NEURON_SORT)
    return queries


def seed_everything(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------ screening
def screen_key(model: Model, query: Query) -> str:
    return content_hash({"model": model_fingerprint(model), "prompt": query.prompt,
                         "answer": query.answer, "stage": "screen"})


@torch.no_grad()
def screen(model: Model, facts: FactSet, store: RunStore, *, progress: bool = True,
           known_per_relation: int | None = None,
           max_per_relation: int | None = None) -> pd.DataFrame:
    """One forward pass per query: P(answer), the model's top-1 and whether it is the answer.

    Cheap (no gradients); it decides the consistency population (METHODS §2: facts whose
    answer is top-1 on at least one query) before any attribution is spent on them.
    Stored per fact in the ``screen`` table. With ``known_per_relation``, facts are screened
    in order and a relation stops being screened once that many of its facts are known;
    ``max_per_relation`` caps the number of facts screened per relation.
    """
    done = store.done_keys("screen")
    known_count: dict[str, int] = {}
    seen_count: dict[str, int] = {}
    bar = tqdm(total=len(facts), desc="screening", unit="fact", disable=not progress)
    for fact in facts:
        bar.update(1)
        if known_per_relation is not None and known_count.get(fact.relation, 0) >= known_per_relation:
            continue
        if max_per_relation is not None and seen_count.get(fact.relation, 0) >= max_per_relation:
            continue
        seen_count[fact.relation] = seen_count.get(fact.relation, 0) + 1
        key = _fact_screen_key(model, fact)
        if key in done:
            part = store.get("screen", key)
        else:
            rows = _screen_fact(model, fact)
            part = pd.DataFrame(rows)
            store.put("screen", key, part)
        if bool(part["known"].any()):
            known_count[fact.relation] = known_count.get(fact.relation, 0) + 1
    bar.close()
    table = store.table("screen")
    ids = {q.query_id for q in facts.queries()}
    return table[table["query_id"].isin(ids)].reset_index(drop=True)


def _screen_fact(model: Model, fact) -> list[dict[str, Any]]:
    """Forward passes for a fact's queries, batched by token length, logits at the end only."""
    encoded = [(q, model.encode_prompt(q.prompt), model.target_id(q.prompt, q.answer))
               for q in fact.queries]
    by_len: dict[int, list[int]] = {}
    for i, (_, ids, _) in enumerate(encoded):
        by_len.setdefault(len(ids), []).append(i)
    probs: dict[int, torch.Tensor] = {}
    for idx in by_len.values():
        x = torch.tensor([encoded[i][1] for i in idx], device=model.device)
        for i, row in zip(idx, next_token_probs(model, x)):
            probs[i] = row
    rows = []
    for i, (q, _, target) in enumerate(encoded):
        p = probs[i]
        pred = int(p.argmax())
        rows.append({"relation": q.relation, "fact_id": q.fact_id, "query_id": q.query_id,
                     "prompt": q.prompt, "answer": q.answer, "target_id": target,
                     "prob": float(p[target]), "predicted": model.tokenizer.decode([pred]),
                     "known": pred == target})
    return rows


def _fact_screen_key(model: Model, fact) -> str:
    return content_hash({"model": model_fingerprint(model), "stage": "screen",
                         "queries": [(q.prompt, q.answer) for q in fact.queries]})


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


# ---------------------------------------------------------------------- consistency
@dataclass
class ConsistencyResult:
    scores: pd.DataFrame
    table1: pd.DataFrame
    table1_md: str
    skipped: pd.DataFrame
    figures: dict[str, tuple[Path, Path]]
    thresholds: dict[str, dict[str, float]]


def consistency(store: RunStore, *, population: str = "known", static_threshold: float = 0.1,
                query_ids: set[str] | None = None) -> ConsistencyResult:
    """CS1/CS2 per fact and method, K_I/K_II splits, Welch's t-test, Table 1 and Figure 3.

    Reads the ``queries`` and ``neuron_sets`` tables of a run; writes ``consistency.parquet``,
    ``table1.csv``/``table1.md`` and ``figures/cs2_violin_<method>.png`` (+ ``.csv``).
    """
    from . import consistency as cons
    from .plots import violin_cs2

    queries = store.table("queries")
    neurons = store.table("neuron_sets")
    if query_ids is not None:
        queries = queries[queries["query_id"].isin(query_ids)]
        neurons = neurons[neurons["query_id"].isin(query_ids)] if len(neurons) else neurons
    if queries.empty:
        from .errors import RunError

        raise RunError(f"run {store.root} has no localized queries; run `knowloc localize` first")
    if neurons.empty:
        neurons = pd.DataFrame(columns=["method", "fact_id", "relation", "query_id", "layer",
                                        "neuron", "attribution"])
    scores = cons.consistency_scores(queries, neurons, population=population)
    t1 = cons.table1(scores, thresholds=(("St", static_threshold), ("Ot", "otsu")))
    md = cons.table1_markdown(t1)
    skipped = cons.skipped_summary(scores)
    store.put("consistency", "all", scores)
    store.consolidate("consistency", sort_by=["method", "fact_id"])
    t1.to_csv(store.path("table1.csv"), index=False)
    store.path("table1.md").write_text(md + "\n")
    skipped.to_csv(store.path("consistency_skipped.csv"), index=False)
    figures: dict[str, tuple[Path, Path]] = {}
    thresholds: dict[str, dict[str, float]] = {}
    for method in [m for m in ("ig", "sig", "amig") if m in set(scores["method"])] + sorted(
        set(scores["method"]) - {"ig", "sig", "amig"}
    ):
        kept = scores[(scores["method"] == method) & scores["skipped"].isna()]
        ths = {"St": static_threshold}
        if len(kept):
            ths["Ot"] = float(cons.otsu_threshold(kept["cs2"].to_numpy()))
        thresholds[method] = ths
        png = store.path("figures", f"cs2_violin_{method}.png")
        violin_cs2(scores, method, png, static_threshold)
        figures[method] = (png, png.with_suffix(".csv"))
    return ConsistencyResult(scores, t1, md, skipped, figures, thresholds)


# ------------------------------------------------------------ knowledge modification
EDIT_SETS = ("local", "global", "cas")
DEFAULT_EDIT_SETS = ("local", "global")  # Table 2; "cas" (Table 3) is asked for explicitly
SET_LABELS = {"local": "N_i", "global": "N_g", "cas": "CAS"}
EDIT_OPS = ("erase", "update")
EDIT_SORT = ["method", "set", "op", "relation", "fact_id", "query_id"]
INTERVENTION_SORT = ["method", "relation", "fact_id", "query_id", "set", "op"]
MAPPING_SETS = ("Self", "Union", "Intersection", "Refine")


def _parse_threshold(value: float | str) -> float | str:
    if isinstance(value, str) and value != "otsu":
        try:
            return float(value)
        except ValueError:
            from .errors import ConfigError

            raise ConfigError(f"split threshold must be a number or 'otsu' (got {value!r})") from None
    return value


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
    # Consistency-Aware set (paper §3.3, eq. 7); candidates = ∪ N_i of the fact (see cas_sets)
    cas_beta1: float = 0.7
    cas_beta2: float = 0.3
    cas_threshold: float = 0.3

    def validate(self) -> ModifyConfig:
        from .errors import ConfigError

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
        self.split_threshold = _parse_threshold(self.split_threshold)
        return self

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


@dataclass
class _RunFacts:
    """What the modification/intervention stages read from a run."""

    queries: pd.DataFrame  # one row per (method, query)
    neurons: dict[tuple[str, str], list[tuple[int, int]]]  # (method, query_id) -> N_i
    split: pd.DataFrame  # method, fact_id, relation, cs2, kind
    catalog: pd.DataFrame  # relation, fact_id, query_id, prompt, answer (all known facts)
    methods: list[str]


def _read_run(store: RunStore, methods: Sequence[str] | None, threshold: float | str,
              query_ids: set[str] | None = None) -> _RunFacts:
    from .consistency import split_facts
    from .errors import ConfigError, RunError

    scores = store.table("consistency")
    if scores.empty:
        raise RunError(f"run {store.root} has no consistency results; run "
                       f"`knowloc consistency --run {store.root}` first")
    queries = store.table("queries")
    if queries.empty:
        raise RunError(f"run {store.root} has no localized queries; run `knowloc localize` first")
    if query_ids is not None:
        queries = queries[queries["query_id"].isin(query_ids)]
    run_methods = [m for m in ("ig", "sig", "amig") if m in set(scores["method"])] + sorted(
        set(scores["method"]) - {"ig", "sig", "amig"})
    if methods:
        unknown = [m for m in methods if m not in run_methods]
        if unknown:
            raise ConfigError(f"method(s) {', '.join(unknown)} not in the run's consistency "
                              f"results (it has {', '.join(run_methods)})")
        run_methods = [m for m in run_methods if m in methods]
    split = split_facts(scores, threshold)
    split = split[split["method"].isin(run_methods)][["method", "fact_id", "relation", "cs2",
                                                      "kind"]].reset_index(drop=True)
    neurons_df = store.table("neuron_sets")
    neurons: dict[tuple[str, str], list[tuple[int, int]]] = {}
    if len(neurons_df):
        for (m, qid), g in neurons_df.groupby(["method", "query_id"], sort=False):
            neurons[(str(m), str(qid))] = list(zip(g["layer"].astype(int), g["neuron"].astype(int)))
    cols = ["relation", "fact_id", "query_id", "prompt", "answer"]
    parts = [queries[cols]]
    screened = store.table("screen")
    if len(screened):
        parts.append(screened[cols])
    catalog = (pd.concat(parts, ignore_index=True).drop_duplicates("query_id")
               .sort_values(["relation", "fact_id", "query_id"], kind="mergesort")
               .reset_index(drop=True))
    return _RunFacts(queries, neurons, split, catalog, run_methods)


def _rng(*parts: Any) -> np.random.Generator:
    return np.random.default_rng(int(content_hash(list(parts), length=15), 16))


def _locality_pool(model: Model, catalog: pd.DataFrame, fact_id: str, relation: str, n: int,
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
    pick = sorted(_rng("locality", seed, fact_id).choice(len(pool), min(n, len(pool)),
                                                         replace=False))
    rows = pool.iloc[pick]
    return ([tuple(model.encode_prompt(p)) for p in rows["prompt"]],
            list(rows["query_id"].astype(str)), kind)


def _new_object(model: Model, catalog: pd.DataFrame, relation: str, fact_id: str, prompt: str,
                answer: str, seed: int) -> str | None:
    """o′: another object of the same relation whose first token differs from o's (seeded)."""
    target = model.target_id(prompt, answer)
    cands = sorted({a for a in catalog.loc[catalog["relation"] == relation, "answer"].astype(str)
                    if a.strip().lower() != answer.strip().lower()})
    cands = [a for a in cands if model.target_id(prompt, a) != target]
    if not cands:
        return None
    return cands[int(_rng("new-object", seed, fact_id).integers(len(cands)))]


@dataclass
class ModifyResult:
    edits: pd.DataFrame
    table2: pd.DataFrame
    table2_md: str
    computed: int
    skipped_done: int
    seconds: float
    ppl: dict[str, Any]
    table3: pd.DataFrame | None = None
    table3_md: str | None = None


def modify(
    model: Model,
    store: RunStore,
    cfg: ModifyConfig,
    *,
    ppl_text: str | Path | None = None,
    query_ids: set[str] | None = None,
    progress: bool = True,
) -> ModifyResult:
    """Erase/update the knowledge neurons of every known query of the run's K_I/K_II facts.

    For each method, fact and query q_i the unedited model answers correctly, edits the value
    vectors of N_i (``local``) or N_g = ∪_j N_j (``global``), evaluates Rel/Gen/Loc/Avg, their
    probability-based versions and ΔPPL (:func:`knowloc.evaluation.evaluate_edit`) and
    restores the weights. Work units are (method, fact, op, set), content-hashed and
    resumable. Writes ``edits.parquet``, ``metrics.parquet`` and ``table2.csv``/``table2.md``.
    """
    from .evaluation import Baseline, EvalQuery, PPLSampler, evaluate_edit, load_ppl_corpus
    from .interventions.weights import Edit, activation_signs

    t0 = time.time()
    cfg.validate()
    run = _read_run(store, cfg.methods, cfg.split_threshold, query_ids)
    corpus = load_ppl_corpus(ppl_text)
    ppl = PPLSampler(model, corpus, n_entries=cfg.ppl_entries, pool_size=cfg.ppl_pool,
                     max_tokens=cfg.ppl_max_tokens, seed=cfg.seed)
    baseline = Baseline()
    attributions: dict[tuple[str, str], pd.DataFrame] | None = None
    done = store.done_keys("edits")
    units = [(m, f, op, s) for m in run.methods
             for f in run.split[run.split["method"] == m].itertuples()
             for op in cfg.ops for s in cfg.sets]
    computed = n_done = 0
    bar = tqdm(units, desc="editing", unit="unit", disable=not progress)
    for method, fact, op, set_kind in bar:
        bar.set_postfix_str(f"{method} {op} {set_kind} {fact.fact_id[:30]}")
        fq = run.queries[(run.queries["method"] == method)
                         & (run.queries["fact_id"] == fact.fact_id)].sort_values("query_id")
        if fq.empty:
            continue
        first = fq.iloc[0]
        new_obj = (_new_object(model, run.catalog, fact.relation, fact.fact_id, first["prompt"],
                               first["answer"], cfg.seed) if op == "update" else None)
        loc_prompts, loc_ids, loc_kind = _locality_pool(model, run.catalog, fact.fact_id,
                                                        fact.relation, cfg.n_locality, cfg.seed)
        sets = {str(q.query_id): run.neurons.get((method, str(q.query_id)), [])
                for q in fq.itertuples()}
        key_parts: dict[str, Any] = {
            "stage": "modify", "model": model_fingerprint(model), "method": method,
            "queries": [(q.prompt, q.answer) for q in fq.itertuples()],
            "neurons": [sorted(sets[str(q.query_id)]) for q in fq.itertuples()],
            "op": op, "set": set_kind, "new_object": new_obj, "locality": loc_ids,
            "config": {k: v for k, v in cfg.as_dict().items()
                       if k not in ("ops", "sets", "methods", "split_threshold")
                       and not k.startswith("cas_")},
            "ppl": ppl.config()}
        cas: list[tuple[int, int]] = []
        if set_kind == "cas":
            if attributions is None:
                attributions = _attribution_maps(store, run.methods)
            cas = cas_set(attributions, run.neurons, method, list(sets), model.n_layers,
                          model.d_mlp, beta1=cfg.cas_beta1, beta2=cfg.cas_beta2,
                          threshold=cfg.cas_threshold)
            key_parts["cas"] = {"neurons": cas, "beta1": cfg.cas_beta1, "beta2": cfg.cas_beta2,
                                "threshold": cfg.cas_threshold}
        key = content_hash(key_parts)
        if key in done:
            n_done += 1
            continue
        equeries = [EvalQuery(str(q.query_id), tuple(model.encode_prompt(q.prompt)),
                              model.target_id(q.prompt, q.answer),
                              model.target_id(q.prompt, new_obj) if new_obj else None)
                    for q in fq.itertuples()]
        baseline.ensure(model, [(q.prompt_ids, [q.target_id] + ([q.new_target_id]
                                                               if q.new_target_id else []))
                                for q in equeries])
        known = [q.query_id for q in equeries if baseline.top1[q.prompt_ids] == q.target_id]
        rows: list[dict[str, Any]] = []
        nan = float("nan")
        for q in equeries:
            if q.query_id not in known:
                rows.append({"query_id": q.query_id, "status": "not known",
                             "n_neurons": len(cas) if set_kind == "cas"
                             else len(sets[q.query_id])})
        if op == "update" and new_obj is None:
            rows += [{"query_id": qid, "status": "no new object", "n_neurons": 0} for qid in known]
            known = []

        def make_edit(neurons: list[tuple[int, int]], q: EvalQuery,
                      read_by: list[EvalQuery], op: str = op) -> Edit:
            if op == "erase":
                return Edit.erase(neurons)
            signs = (activation_signs(model, [r.prompt_ids for r in read_by], neurons)
                     if cfg.update_sign == "activation" else None)
            return Edit.update(neurons, q.target_id, int(q.new_target_id),  # type: ignore[arg-type]
                               lambda1=cfg.lambda1, lambda2=cfg.lambda2, signs=signs)

        common: dict[str, Any] = {"fact_queries": equeries, "locality": loc_prompts,
                                  "baseline": baseline, "ppl": ppl, "gen_on": cfg.gen_on}
        if set_kind == "local":
            for qid in known:
                q = next(e for e in equeries if e.query_id == qid)
                rows += evaluate_edit(model, make_edit(sets[qid], q, [q]), rel_ids=[qid],
                                      ppl_key=f"{key}:{qid}", **common)
        elif known:
            union = cas if set_kind == "cas" else sorted({n for s in sets.values() for n in s})
            q = next(e for e in equeries if e.query_id == known[0])
            readers = [e for e in equeries if e.query_id in known]
            rows += evaluate_edit(model, make_edit(union, q, readers), rel_ids=known, ppl_key=key,
                                  **common)
        frame = pd.DataFrame(rows)
        for col in ("rel", "gen", "loc", "avg", "rel_prob", "gen_prob", "loc_prob", "avg_prob",
                    "ppl_before", "ppl_after", "dppl"):
            if col not in frame:
                frame[col] = nan
            frame[col] = frame[col].astype(float)
        frame["ppl_entries"] = frame.get("ppl_entries", pd.Series(dtype=object)).fillna("")
        for col in ("n_gen", "n_loc", "n_neurons"):
            frame[col] = frame.get(col, pd.Series(dtype=float)).fillna(0).astype("int64")
        ident = {"model": model.name, "method": method, "relation": fact.relation,
                 "fact_id": fact.fact_id, "op": op, "set": set_kind,
                 "answer": str(first["answer"]), "new_answer": new_obj or "",
                 "locality_query_ids": "|".join(loc_ids), "locality_pool": loc_kind}
        frame = _with_ident(frame, ident)
        store.put("edits", key, frame)
        computed += 1
    bar.close()
    edits = store.table("edits")
    keep = _current_units(edits, run, cfg)
    result_edits = edits[keep].reset_index(drop=True) if len(edits) else edits
    if len(edits):
        store.consolidate("edits", sort_by=EDIT_SORT)
    t2 = table2(result_edits, run.split)
    store.put("metrics", "table2", t2)
    store.consolidate("metrics")
    md = table2_markdown(t2, corpus_note=_corpus_note(ppl.config()))
    t2.to_csv(store.path("table2.csv"), index=False)
    store.path("table2.md").write_text(md + "\n")
    t3 = md3 = None
    if len(result_edits) and (result_edits["set"] == "cas").any():
        t3 = table3(result_edits, run.split)
        md3 = table3_markdown(t3, corpus_note=_corpus_note(ppl.config()))
        t3.to_csv(store.path("table3.csv"), index=False)
        store.path("table3.md").write_text(md3 + "\n")
    return ModifyResult(result_edits, t2, md, computed, n_done, time.time() - t0, ppl.config(),
                        t3, md3)


def _attribution_maps(store: RunStore, methods: Sequence[str]) -> dict[tuple[str, str], pd.DataFrame]:
    """(method, query_id) -> the stored attribution scores of that query (``layer, neuron,
    attribution``): the top ``keep_top`` of the ``attributions`` table together with every
    knowledge neuron of ``neuron_sets`` (so each N_i is complete even when larger)."""
    cols = ["method", "query_id", "layer", "neuron", "attribution"]
    parts = [t[cols] for t in (store.table("attributions"), store.table("neuron_sets")) if len(t)]
    if not parts:
        return {}
    df = pd.concat(parts, ignore_index=True)
    df = df[df["method"].isin(list(methods))].drop_duplicates(["method", "query_id", "layer",
                                                               "neuron"])
    return {(str(m), str(q)): g[["layer", "neuron", "attribution"]]
            for (m, q), g in df.groupby(["method", "query_id"], sort=False)}


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
    from .neurons import cas_neurons, consistency_aware_scores

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


def _current_units(edits: pd.DataFrame, run: _RunFacts, cfg: ModifyConfig) -> pd.Series:
    """Rows of facts/methods of this run's split (all ops/sets done so far in the run)."""
    if edits.empty:
        return pd.Series([], dtype=bool)
    pairs = set(zip(run.split["method"], run.split["fact_id"]))
    return pd.Series([(m, f) in pairs for m, f in zip(edits["method"], edits["fact_id"])],
                     index=edits.index)


def _corpus_note(ppl_cfg: dict[str, Any]) -> str:
    if ppl_cfg.get("builtin"):
        return ("ΔPPL measured on knowloc's small built-in English corpus (no --ppl-text "
                "given), not on WikiText-2: not comparable with the paper's numbers.")
    return f"ΔPPL measured on {ppl_cfg.get('source')}."


TABLE2_METRICS = ["rel", "gen", "loc", "avg", "dppl", "rel_prob", "gen_prob", "loc_prob",
                  "avg_prob"]


def table2(edits: pd.DataFrame, split: pd.DataFrame) -> pd.DataFrame:
    """Table 2: mean Rel/Gen/Loc/Avg/ΔPPL (and probability versions) per model, method,
    set (local N_i / global N_g), op and K_I/K_II, with the number of edits, of empty
    neuron sets (never counted as successes) and of skipped queries."""
    return _edit_means(edits[edits["set"].isin(DEFAULT_EDIT_SETS)] if len(edits) else edits,
                       split)


def table3(edits: pd.DataFrame, split: pd.DataFrame) -> pd.DataFrame:
    """Table 3: Table 2's means for N_i (local), N_g (global) and the Consistency-Aware set
    (cas) side by side, for the methods that have CAS edits."""
    if edits.empty:
        return _edit_means(edits, split)
    methods = set(edits.loc[edits["set"] == "cas", "method"])
    return _edit_means(edits[edits["method"].isin(methods)], split)


def _edit_means(edits: pd.DataFrame, split: pd.DataFrame) -> pd.DataFrame:
    cols = ["model", "method", "set", "op", "kind", "n_edits", "n_empty", "n_not_known",
            "n_no_new_object", *TABLE2_METRICS]
    if edits.empty:
        return pd.DataFrame(columns=cols)
    df = edits.merge(split[["method", "fact_id", "kind"]], on=["method", "fact_id"], how="inner")
    rows = []
    for (model_name, method, set_kind, op, kind), g in df.groupby(
            ["model", "method", "set", "op", "kind"], sort=False):
        ok = g[g["status"] == "ok"]
        row = {"model": model_name, "method": method, "set": set_kind, "op": op, "kind": kind,
               "n_edits": len(ok), "n_empty": int((g["status"] == "empty").sum()),
               "n_not_known": int((g["status"] == "not known").sum()),
               "n_no_new_object": int((g["status"] == "no new object").sum())}
        for m in TABLE2_METRICS:
            vals = ok[m].dropna()
            row[m] = float(vals.mean()) if len(vals) else float("nan")
        rows.append(row)
    out = pd.DataFrame(rows, columns=cols)
    order = {"set": {s: i for i, s in enumerate(EDIT_SETS)},
             "op": {o: i for i, o in enumerate(EDIT_OPS)},
             "kind": {"K_I": 0, "K_II": 1},
             "method": {m: i for i, m in enumerate(("ig", "sig", "amig"))}}
    keys = [out[c].map(lambda v, c=c: order[c].get(v, 99)) for c in ("method", "set", "op", "kind")]
    out = out.assign(_m=keys[0], _s=keys[1], _o=keys[2], _k=keys[3]).sort_values(
        ["model", "_m", "_s", "_o", "_k"], kind="mergesort").drop(columns=["_m", "_s", "_o", "_k"])
    return out.reset_index(drop=True)


def table2_markdown(t2: pd.DataFrame, corpus_note: str = "") -> str:
    """Table 2 as Markdown: one block per model and method, rows set × op × K_I/K_II."""
    def f(x: Any) -> str:
        return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.2f}"

    label = SET_LABELS
    lines = ["# Table 2: knowledge modification", ""]
    if corpus_note:
        lines += [corpus_note, ""]
    if t2.empty:
        return "\n".join(lines + ["(no edits)"])
    for (model_name, method), g in t2.groupby(["model", "method"], sort=False):
        lines += [f"## {model_name}, {str(method).upper()}", "",
                  "| set | op | kind | Rel | Gen | Loc | Avg | ΔPPL | edits | empty sets |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in g.itertuples():
            lines.append(f"| {label.get(r.set, r.set)} | {r.op} | {r.kind} | {f(r.rel)} | "
                         f"{f(r.gen)} | {f(r.loc)} | {f(r.avg)} | {f(r.dppl)} | {r.n_edits} | "
                         f"{r.n_empty} |")
        lines.append("")
    lines.append("Rel and Gen of erasure are 1 − accuracy; all metrics better when higher "
                 "except ΔPPL. Empty neuron sets are not edits and are not averaged.")
    return "\n".join(lines)


def table3_markdown(t3: pd.DataFrame, corpus_note: str = "") -> str:
    """Table 3 as Markdown: per model and method, rows K_I/K_II × {N_i, N_g, CAS}, columns
    Erasure and Update (Rel, Gen, Loc, Avg, ΔPPL)."""
    def f(x: Any) -> str:
        return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.2f}"

    lines = ["# Table 3: Consistency-Aware KN modification", ""]
    if corpus_note:
        lines += [corpus_note, ""]
    if t3.empty:
        return "\n".join(lines + ["(no edits)"])
    metrics = ("rel", "gen", "loc", "avg", "dppl")
    names = ("Rel", "Gen", "Loc", "Avg", "ΔPPL")
    for (model_name, method), g in t3.groupby(["model", "method"], sort=False):
        lines += [f"## {model_name}, {str(method).upper()}", "",
                  "| kind | set | " + " | ".join(f"Erasure {n}" for n in names) + " | "
                  + " | ".join(f"Update {n}" for n in names) + " | edits (erase/update) |",
                  "|---|---|" + "---|" * (2 * len(names) + 1)]
        for kind in ("K_I", "K_II"):
            for set_kind in EDIT_SETS:
                cells, counts = [], []
                for op in EDIT_OPS:
                    r = g[(g["kind"] == kind) & (g["set"] == set_kind) & (g["op"] == op)]
                    cells += [f(float(r[m].iloc[0])) if len(r) else "–" for m in metrics]
                    counts.append(str(int(r["n_edits"].iloc[0])) if len(r) else "–")
                if all(c == "–" for c in counts):
                    continue
                lines.append(f"| {kind} | {SET_LABELS[set_kind]} | " + " | ".join(cells)
                             + f" | {'/'.join(counts)} |")
        lines.append("")
    lines.append("CAS: neurons with CAS = 0.7 μ − 0.3 σ of the max-normalized attribution "
                 "over the fact's queries above 0.3 × max CAS, chosen among ∪ N_i (so the "
                 "set is a subset of N_g). Rel and Gen of erasure are 1 − accuracy; higher "
                 "is better except ΔPPL.")
    return "\n".join(lines)


# ------------------------------------------------------------------ query-KN mapping
@dataclass
class MappingConfig:
    """Query-KN mapping (METHODS §4, paper §3.1, Figure 4)."""

    methods: Sequence[str] | None = None
    split_threshold: float | str = 0.1
    suppress: float = 0.0
    enhance: float = 2.0
    only_known: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {"methods": list(self.methods) if self.methods else None,
                "split_threshold": self.split_threshold, "suppress": self.suppress,
                "enhance": self.enhance, "only_known": self.only_known}


@dataclass
class MappingResult:
    interventions: pd.DataFrame
    figure4: pd.DataFrame
    figures: dict[str, tuple[Path, Path]]
    computed: int
    skipped_done: int
    seconds: float


def neighbor_sets(sets: dict[str, list[tuple[int, int]]], query_id: str) -> dict[str, set]:
    """Self N_i and the neighbor sets N_i^N over j ≠ i (paper eq. 3)."""
    from .neurons import intersection, refine, union

    others = [s for q, s in sets.items() if q != query_id]
    return {"Self": set(sets[query_id]), "Union": union(others),
            "Intersection": intersection(others), "Refine": refine(others)}


def query_kn_mapping(
    model: Model,
    store: RunStore,
    cfg: MappingConfig,
    *,
    query_ids: set[str] | None = None,
    progress: bool = True,
) -> MappingResult:
    """Suppress (×0) / enhance (×2) the activations of Self N_i and of the neighbor sets
    Union / Intersection / Refine at the last position and record ΔProb (Figure 4).

    Writes ``interventions.parquet``, ``figure4.csv`` and ``figures/figure4_<method>.png``
    (+ CSV). Work units are (method, fact), content-hashed and resumable.
    """
    from .evaluation import delta_prob
    from .interventions.activations import intervention_probs
    from .plots import query_kn_bars

    t0 = time.time()
    cfg.split_threshold = _parse_threshold(cfg.split_threshold)
    run = _read_run(store, cfg.methods, cfg.split_threshold, query_ids)
    done = store.done_keys("interventions")
    computed = n_done = 0
    units = [(m, f) for m in run.methods for f in run.split[run.split["method"] == m].itertuples()]
    bar = tqdm(units, desc="intervening", unit="fact", disable=not progress)
    for method, fact in bar:
        fq = run.queries[(run.queries["method"] == method)
                         & (run.queries["fact_id"] == fact.fact_id)].sort_values("query_id")
        if fq.empty:
            continue
        sets = {str(q.query_id): run.neurons.get((method, str(q.query_id)), [])
                for q in fq.itertuples()}
        key = content_hash({"stage": "query_kn_mapping", "model": model_fingerprint(model),
                            "method": method,
                            "queries": [(q.prompt, q.answer) for q in fq.itertuples()],
                            "neurons": [sorted(sets[str(q.query_id)]) for q in fq.itertuples()],
                            "config": {k: v for k, v in cfg.as_dict().items()
                                       if k not in ("methods", "split_threshold")}})
        if key in done:
            n_done += 1
            continue
        rows = []
        for q in fq.itertuples():
            qid = str(q.query_id)
            ids = model.encode_prompt(q.prompt)
            target = model.target_id(q.prompt, q.answer)
            nsets = neighbor_sets(sets, qid)
            variants, labels = [], []
            for name in MAPPING_SETS:
                for op, scale in (("suppress", cfg.suppress), ("enhance", cfg.enhance)):
                    if nsets[name]:
                        variants.append((sorted(nsets[name]), scale))
                        labels.append((name, op))
            probs = intervention_probs(model, ids, variants, [target])[:, 0].double().cpu().numpy()
            p_b = float(probs[0])
            done_labels = dict(zip(labels, probs[1:]))
            for name in MAPPING_SETS:
                for op in ("suppress", "enhance"):
                    base = {"method": method, "relation": fact.relation, "fact_id": fact.fact_id,
                            "query_id": qid, "set": name, "op": op,
                            "n_neurons": len(nsets[name]), "p_before": p_b}
                    if (name, op) in done_labels:
                        p_a = float(done_labels[(name, op)])
                        rows.append({**base, "status": "ok", "p_after": p_a,
                                     "delta_prob": delta_prob(p_b, p_a, op)})
                    else:
                        rows.append({**base, "status": "empty", "p_after": float("nan"),
                                     "delta_prob": float("nan")})
        frame = pd.DataFrame(rows)
        store.put("interventions", key, frame)
        computed += 1
    bar.close()
    table = store.table("interventions")
    if len(table):
        store.consolidate("interventions", sort_by=INTERVENTION_SORT)
        pairs = set(zip(run.split["method"], run.split["fact_id"]))
        table = table[[(m, f) in pairs for m, f in zip(table["method"], table["fact_id"])]]
        if cfg.only_known:
            known = run.queries[run.queries["known"].astype(bool)]
            kq = set(zip(known["method"], known["query_id"]))
            table = table[[(m, q) in kq for m, q in zip(table["method"], table["query_id"])]]
    fig4 = figure4_table(table, run.split)
    fig4.to_csv(store.path("figure4.csv"), index=False)
    figures: dict[str, tuple[Path, Path]] = {}
    for method in run.methods:
        png = store.path("figures", f"figure4_{method}.png")
        query_kn_bars(fig4[fig4["method"] == method], png, method=method)
        figures[method] = (png, png.with_suffix(".csv"))
    return MappingResult(table.reset_index(drop=True), fig4, figures, computed, n_done,
                         time.time() - t0)


def figure4_table(interventions: pd.DataFrame, split: pd.DataFrame) -> pd.DataFrame:
    """Mean ΔProb per method, K_I/K_II and neuron set, for suppression and enhancement, and
    their average (Figure 4). Empty neuron sets are counted (``n_empty``), not averaged."""
    cols = ["method", "kind", "set", "suppress", "enhance", "avg", "suppress_median",
            "enhance_median", "n_queries", "n_empty"]
    if interventions.empty:
        return pd.DataFrame(columns=cols)
    df = interventions.merge(split[["method", "fact_id", "kind"]], on=["method", "fact_id"])
    rows = []
    for method in [m for m in ("ig", "sig", "amig") if m in set(df["method"])] + sorted(
            set(df["method"]) - {"ig", "sig", "amig"}):
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
                rows.append({"method": method, "kind": kind, "set": name, "suppress": s,
                             "enhance": e, "avg": (s + e) / 2,
                             "suppress_median": float(sup.median()) if len(sup) else float("nan"),
                             "enhance_median": float(enh.median()) if len(enh) else float("nan"),
                             "n_queries": int(g["query_id"].nunique()),
                             "n_empty": int(g.loc[g["status"] == "empty", "query_id"].nunique())})
    return pd.DataFrame(rows, columns=cols)


# ------------------------------------------------------- dynamic KN selection (attention)
ATTENTION_QUERY_SORT = ["relation", "fact_id", "query_id"]
PREDOMINANCE_SORT = ["relation", "fact_id", "first"]
SYNAPSE_EFFECT_SORT = ["method", "relation", "fact_id", "query_id", "first", "synapses",
                       "operation"]
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
        from .errors import ConfigError

        if self.rows not in ("all", "last"):
            raise ConfigError(f"rows must be 'all' or 'last' (got {self.rows!r})")
        if not self.alpha >= 0:
            raise ConfigError(f"alpha must be >= 0 (got {self.alpha})")
        if self.heatmap_neurons < 1:
            raise ConfigError("heatmap_neurons must be >= 1")
        self.split_threshold = _parse_threshold(self.split_threshold)
        return self

    def as_dict(self) -> dict[str, Any]:
        return {"methods": list(self.methods) if self.methods else None,
                "split_threshold": self.split_threshold, "alpha": self.alpha,
                "suppress": self.suppress, "enhance": self.enhance, "rows": self.rows,
                "only_known": self.only_known, "seed": self.seed,
                "heatmap_neurons": self.heatmap_neurons}


@dataclass
class AttentionResult:
    predominance: pd.DataFrame  # one row per fact and variant (first position allowed or not)
    queries: pd.DataFrame  # one row per query: most attended tokens, synapse counts
    effects: pd.DataFrame  # one row per method, query, variant, synapse set and operation
    figure5: pd.DataFrame
    figure6: pd.DataFrame
    figures: dict[str, tuple[Path, Path]]
    heatmaps: dict[str, dict[str, tuple[Path, Path]]]  # panel -> figure -> (png, csv)
    computed: int
    skipped_done: int
    seconds: float


def _irrelevant_query(catalog: pd.DataFrame, relation: str, fact_id: str, query_id: str,
                      seed: int) -> tuple[str, str] | None:
    """S_ir's source: a query of a fact of another relation (of another fact when the run has
    one relation), drawn with a seed per query. Returns (query_id, prompt)."""
    pool = catalog[catalog["relation"] != relation]
    if pool.empty:
        pool = catalog[catalog["fact_id"] != fact_id]
    if pool.empty:
        return None
    row = pool.iloc[int(_rng("irrelevant-synapses", seed, query_id).integers(len(pool)))]
    return str(row["query_id"]), str(row["prompt"])


def _attention_unit(model: Model, fact_id: str, relation: str, fq: pd.DataFrame,
                    kns: dict[str, dict[str, list[tuple[int, int]]]], catalog: pd.DataFrame,
                    cfg: AttentionConfig) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Predominance, synapses and synapse manipulations of one fact's queries."""
    from .interventions.attention import attention_map, eager_attention, scale_attention
    from .models.forward import activations_and_probs
    from .synapses import (
        knowledge_synapses,
        mean_activation,
        most_attended,
        predominance_both,
        signed_relative_change,
    )

    maps, qrows, erows = [], [], []
    irr_maps: dict[str, Any] = {}
    ops = (("sup", cfg.suppress), ("enh", cfg.enhance))
    with eager_attention(model):
        for q in fq.itertuples():
            qid = str(q.query_id)
            ids = model.encode_prompt(q.prompt)
            target = model.target_id(q.prompt, q.answer)
            amap = attention_map(model, ids, rows=cfg.rows, query_id=qid, fact_id=fact_id)
            maps.append(amap)
            own = {True: knowledge_synapses(amap, alpha=cfg.alpha),
                   False: knowledge_synapses(amap, alpha=cfg.alpha, exclude_first=True)}
            irr = _irrelevant_query(catalog, relation, fact_id, qid, cfg.seed)
            irr_sets: dict[bool, Any] = {}
            if irr is not None:
                if irr[0] not in irr_maps:
                    irr_maps[irr[0]] = attention_map(model, irr[1], rows=cfg.rows)
                im = irr_maps[irr[0]]
                irr_sets = {True: knowledge_synapses(im, alpha=cfg.alpha),
                            False: knowledge_synapses(im, alpha=cfg.alpha, exclude_first=True)}
            top = {f: most_attended(amap, skip_first=not f) for f in (True, False)}
            qrows.append({
                "relation": relation, "fact_id": fact_id, "query_id": qid,
                "prompt": q.prompt, "answer": q.answer, "known": bool(q.known),
                "n_positions": len(ids),
                "top_token": amap.tokens[top[True]] if top[True] is not None else None,
                "top_token_no_first": amap.tokens[top[False]] if top[False] is not None else None,
                "tau": float(own[True].tau), "n_synapses": len(own[True]),
                "n_synapses_first": len(own[True]) - len(own[False]),
                "n_synapses_no_first": len(own[False]),
                "irrelevant_query_id": irr[0] if irr else None,
            })
            acts_b, probs_b = activations_and_probs(model, ids)
            p_b = float(probs_b[target])
            for first in (True, False):
                sets = {"self": (own[first], 0)}
                if irr_sets:
                    s_ir = irr_sets[first]
                    clipped = s_ir.clip(len(ids))
                    sets["irrelevant"] = (clipped, len(s_ir) - len(clipped))
                for name, (syn, n_clipped) in sets.items():
                    for op, factor in ops:
                        with scale_attention(model, syn, factor, rows=cfg.rows):
                            acts_a, probs_a = activations_and_probs(model, ids)
                        p_a = float(probs_a[target])
                        for method, by_q in kns.items():
                            ns = by_q.get(qid, [])
                            vb, va = mean_activation(acts_b, ns), mean_activation(acts_a, ns)
                            erows.append({
                                "method": method, "relation": relation, "fact_id": fact_id,
                                "query_id": qid, "known": bool(q.known), "first": first,
                                "synapses": name, "operation": op, "factor": float(factor),
                                "n_synapses": len(syn), "n_clipped": int(n_clipped),
                                "n_neurons": len(ns), "value_before": vb, "value_after": va,
                                "prob_before": p_b, "prob_after": p_a,
                                "delta_value": signed_relative_change(vb, va, factor),
                                "delta_prob": signed_relative_change(p_b, p_a, factor),
                                "irrelevant_query_id": irr[0] if name == "irrelevant" else None,
                            })
    both = predominance_both(maps)
    prows = [{"relation": relation, "fact_id": fact_id, "first": key == "with_first",
              "P": pr.score, "token": None if pr.token is None else str(pr.token),
              "n_queries": pr.n_queries} for key, pr in both.items()]
    return pd.DataFrame(prows), pd.DataFrame(qrows), pd.DataFrame(erows)


def attention_experiment(
    model: Model,
    store: RunStore,
    cfg: AttentionConfig,
    *,
    query_ids: set[str] | None = None,
    heatmaps: bool = True,
    progress: bool = True,
) -> AttentionResult:
    """Predominance (Figure 5), knowledge synapses and their suppression/enhancement
    (Figure 6) for every fact of the run's K_I/K_II split, and the activation heatmaps of
    two neighbor queries of one K_I and one K_II fact (Figures 1, 7, 10).

    Per fact (one work unit, content-hashed and resumable): the attention map of each query
    (eager attention), the predominance score P with and without the first position, the
    query's synapses as defined and with position 0 excluded, the synapses of an unrelated
    query (another relation's, seeded, clipped to the prompt length), each × 0 and × 2:
    ΔProb and ΔValue (mean activation of the query's KNs, per method). Writes
    ``predominance.parquet``, ``attention_queries.parquet``, ``synapse_effects.parquet``,
    ``figure5.csv``, ``figure6.csv`` and the figures under ``figures/``.
    """
    t0 = time.time()
    cfg.validate()
    run = _read_run(store, cfg.methods, cfg.split_threshold, query_ids)
    done = store.done_keys("predominance")
    facts = run.split.drop_duplicates("fact_id")[["fact_id", "relation"]]
    computed = n_done = 0
    bar = tqdm(list(facts.itertuples()), desc="attention", unit="fact", disable=not progress)
    for fact in bar:
        fq = (run.queries[(run.queries["fact_id"] == fact.fact_id)
                          & run.queries["method"].isin(run.methods)]
              .drop_duplicates("query_id").sort_values("query_id"))
        if fq.empty:
            continue
        qids = [str(q) for q in fq["query_id"]]
        kns = {m: {q: sorted(run.neurons.get((m, q), [])) for q in qids} for m in run.methods}
        irr = {q: _irrelevant_query(run.catalog, fact.relation, fact.fact_id, q, cfg.seed)
               for q in qids}
        key = content_hash({"stage": "attention", "model": model_fingerprint(model),
                            "queries": [(q.prompt, q.answer, bool(q.known))
                                        for q in fq.itertuples()],
                            "neurons": kns, "irrelevant": irr,
                            "config": {k: v for k, v in cfg.as_dict().items()
                                       if k not in ("methods", "split_threshold", "only_known",
                                                    "heatmap_neurons")}})
        if key in done:
            n_done += 1
            continue
        pred, qrows, erows = _attention_unit(model, fact.fact_id, fact.relation, fq, kns,
                                             run.catalog, cfg)
        store.put("attention_queries", key, qrows)
        store.put("synapse_effects", key, erows)
        store.put("predominance", key, pred)  # the unit's completion marker: written last
        computed += 1
    bar.close()
    for name, sort in (("attention_queries", ATTENTION_QUERY_SORT),
                       ("synapse_effects", SYNAPSE_EFFECT_SORT),
                       ("predominance", PREDOMINANCE_SORT)):
        if store.done_keys(name):
            store.consolidate(name, sort_by=sort)
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
    fig5 = figure5_table(pred, run.split)
    fig5.to_csv(store.path("figure5.csv"), index=False)
    fig6 = figure6_table(eff, run.split, only_known=cfg.only_known)
    fig6.to_csv(store.path("figure6.csv"), index=False)
    figures = _attention_figures(store, fig5, eff, run, cfg)
    maps: dict[str, dict[str, tuple[Path, Path]]] = {}
    if heatmaps:
        maps = report_heatmaps(model, store, run, cfg)
    return AttentionResult(pred.reset_index(drop=True), aq.reset_index(drop=True),
                           eff.reset_index(drop=True), fig5, fig6, figures, maps, computed,
                           n_done, time.time() - t0)


def figure5_table(pred: pd.DataFrame, split: pd.DataFrame) -> pd.DataFrame:
    """Predominance P per method's K_I/K_II split: ``method, relation, fact_id, kind, first,
    P, token, n_queries`` (``first``: position 0 allowed)."""
    cols = ["method", "relation", "fact_id", "kind", "first", "P", "token", "n_queries"]
    if pred.empty:
        return pd.DataFrame(columns=cols)
    df = split[["method", "fact_id", "kind"]].merge(pred, on="fact_id", how="inner")
    order = {m: i for i, m in enumerate(("ig", "sig", "amig"))}
    df = df.assign(_m=df["method"].map(lambda m: order.get(m, 99)))
    df = df.sort_values(["_m", "method", "relation", "fact_id", "first"], kind="mergesort")
    return df[cols].reset_index(drop=True)


def figure6_table(effects: pd.DataFrame, split: pd.DataFrame, *,
                  only_known: bool = True) -> pd.DataFrame:
    """Mean ΔValue and ΔProb per method, synapse variant (``first``: as defined, position 0
    allowed; False: position 0 excluded), K_I/K_II, synapse set (self / irrelevant) and
    operation (sup, enh, and avg = their mean), as in Figure 6; plus the medians."""
    from .plots_attention import synapse_effect_summary

    cols = ["method", "first", "kind", "synapses", "operation", "metric", "value", "median", "n"]
    if effects.empty:
        return pd.DataFrame(columns=cols)
    df = effects.merge(split[["method", "fact_id", "kind"]], on=["method", "fact_id"])
    if only_known:
        df = df[df["known"].astype(bool)]
    out = []
    for (method, first), g in df.groupby(["method", "first"], sort=False):
        s = synapse_effect_summary(g)
        med = (g.melt(id_vars=["kind", "synapses", "operation"],
                      value_vars=["delta_value", "delta_prob"], var_name="metric")
               .groupby(["kind", "synapses", "operation", "metric"])["value"].median()
               .rename("median").reset_index())
        s = s.merge(med, on=["kind", "synapses", "operation", "metric"], how="left")
        out.append(s.assign(method=method, first=bool(first)))
    if not out:
        return pd.DataFrame(columns=cols)
    res = pd.concat(out, ignore_index=True)
    order = {m: i for i, m in enumerate(("ig", "sig", "amig"))}
    res = res.assign(_m=res["method"].map(lambda m: order.get(m, 99)), _f=~res["first"])
    res = res.sort_values(["_m", "_f"], kind="mergesort")
    return res[cols].reset_index(drop=True)


def _attention_figures(store: RunStore, fig5: pd.DataFrame, effects: pd.DataFrame,
                       run: _RunFacts, cfg: AttentionConfig) -> dict[str, tuple[Path, Path]]:
    from .plots_attention import bars_synapse_effects, violin_predominance

    figures: dict[str, tuple[Path, Path]] = {}
    eff = effects.merge(run.split[["method", "fact_id", "kind"]], on=["method", "fact_id"]) \
        if len(effects) else pd.DataFrame(columns=["method", "first", "kind", "synapses",
                                                   "operation", "delta_value", "delta_prob",
                                                   "known"])
    if cfg.only_known and len(eff):
        eff = eff[eff["known"].astype(bool)]
    for method in run.methods:
        png = store.path("figures", f"figure5_{method}.png")
        violin_predominance(fig5[fig5["method"] == method], png,
                            title=f"Predominance of the most attended token, {method.upper()} "
                                  "split (Figure 5)")
        figures[f"figure5_{method}"] = (png, png.with_suffix(".csv"))
        for first, variant in SYNAPSE_VARIANTS.items():
            sub = eff[(eff["method"] == method) & (eff["first"].astype(bool) == first)]
            png = store.path("figures", f"figure6_{method}_{variant}.png")
            what = "as defined" if first else "position 0 excluded"
            bars_synapse_effects(sub, png, title=f"Knowledge synapses ({what}) × 0 / × 2, "
                                                 f"{method.upper()} KNs (Figure 6)")
            figures[f"figure6_{method}_{variant}"] = (png, png.with_suffix(".csv"))
    return figures


# ---------------------------------------------------------------------------- heatmaps
HEATMAP_FIGURES = {"figure1": ("none",),
                   "figure7": ("suppress", "suppress (position 0 excluded)"),
                   "figure10": ("enhance", "enhance (position 0 excluded)")}


def heatmap_table(model: Model, prompts: Sequence[str], labels: Sequence[str],
                  neurons: Sequence[Sequence[tuple[int, int]]], *, alpha: float = 0.3,
                  n_neurons: int = 64, rows: str = "all", suppress: float = 0.0,
                  enhance: float = 2.0) -> pd.DataFrame:
    """Layer × neuron activation table of neighbor queries (Figures 1, 7, 10).

    For each prompt: last-position activations of every layer as is (``none``), with its
    knowledge synapses suppressed / enhanced as defined (``suppress`` / ``enhance``) and with
    position 0 excluded from them (``... (position 0 excluded)``). The neuron axis is cut to
    ``n_neurons`` columns, the same for every panel: the neuron indices of the prompts'
    knowledge neurons ``neurons[i]`` first, then those with the largest |activation| (any
    layer, unmanipulated). Columns: ``query, prompt, condition, layer, neuron, activation,
    is_kn`` (is_kn: (layer, neuron) is a knowledge neuron of that query).
    """
    from .interventions.attention import activation_matrix, attention_map
    from .synapses import knowledge_synapses

    if not (len(prompts) == len(labels) == len(neurons)):
        from .errors import ConfigError

        raise ConfigError("prompts, labels and neuron sets must have the same length")
    mats: dict[tuple[int, str], torch.Tensor] = {}
    for i, prompt in enumerate(prompts):
        amap = attention_map(model, prompt, rows=rows)  # type: ignore[arg-type]
        syn = {True: knowledge_synapses(amap, alpha=alpha),
               False: knowledge_synapses(amap, alpha=alpha, exclude_first=True)}
        mats[(i, "none")] = activation_matrix(model, prompt)
        for first, suffix in ((True, ""), (False, " (position 0 excluded)")):
            for cond, factor in (("suppress", suppress), ("enhance", enhance)):
                mats[(i, cond + suffix)] = activation_matrix(model, prompt, synapses=syn[first],
                                                             factor=factor, rows=rows)  # type: ignore[arg-type]
    cols: list[int] = sorted({int(p) for ns in neurons for _, p in ns})[:n_neurons]
    if len(cols) < n_neurons:
        peak = torch.stack([mats[(i, "none")].abs().max(0).values
                            for i in range(len(prompts))]).max(0).values
        for p in torch.argsort(peak, descending=True).tolist():
            if len(cols) >= n_neurons:
                break
            if p not in cols:
                cols.append(int(p))
    cols = sorted(cols)
    idx = torch.tensor(cols, dtype=torch.long)
    frames = []
    for (i, cond), m in mats.items():
        sub = m[:, idx].numpy()
        n_l = sub.shape[0]
        kn = {(int(l), int(p)) for l, p in neurons[i]}
        layer = np.repeat(np.arange(n_l, dtype=np.int32), len(cols))
        neuron = np.tile(np.asarray(cols, dtype=np.int32), n_l)
        frames.append(pd.DataFrame({
            "query": labels[i], "prompt": prompts[i], "condition": cond, "layer": layer,
            "neuron": neuron, "activation": sub.reshape(-1).astype(np.float64),
            "is_kn": [(int(a), int(b)) in kn for a, b in zip(layer, neuron)]}))
    return pd.concat(frames, ignore_index=True)


def heatmap_figures(table: pd.DataFrame, directory: Path, prefix: str = "",
                    title: str = "") -> dict[str, tuple[Path, Path]]:
    """Figures 1 (as is), 7 (synapses suppressed) and 10 (enhanced) from a
    :func:`heatmap_table`, each a PNG with its CSV."""
    from .plots_attention import activation_heatmaps

    out: dict[str, tuple[Path, Path]] = {}
    names = {"figure1": "Figure 1", "figure7": "Figure 7: synapses suppressed (× 0)",
             "figure10": "Figure 10: synapses enhanced (× 2)"}
    for fig, conds in HEATMAP_FIGURES.items():
        sub = table[table["condition"].isin(conds)]
        if sub.empty:
            continue
        png = Path(directory) / f"{prefix}{fig}.png"
        activation_heatmaps(sub, png, title=f"{names[fig]}{' — ' + title if title else ''}")
        out[fig] = (png, png.with_suffix(".csv"))
    return out


def _pick_heatmap_facts(run: _RunFacts, method: str) -> dict[str, tuple[str, list[Any]]]:
    """One K_I and one K_II fact (the first in order with >= 2 queries, known ones first)
    and two of its queries."""
    out: dict[str, tuple[str, list[Any]]] = {}
    sp = run.split[run.split["method"] == method].sort_values(["relation", "fact_id"])
    for kind in ("K_I", "K_II"):
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


def report_heatmaps(model: Model, store: RunStore, run: _RunFacts,
                    cfg: AttentionConfig) -> dict[str, dict[str, tuple[Path, Path]]]:
    """Heatmaps (Figures 1, 7, 10) of two neighbor queries of one K_I and one K_II fact of
    the first method's split, with that method's KNs circled. Stored in the ``heatmaps``
    table (content-hashed: a rerun recomputes nothing)."""
    if not run.methods:
        return {}
    method = run.methods[0]
    out: dict[str, dict[str, tuple[Path, Path]]] = {}
    done = store.done_keys("heatmaps")
    for kind, (fact_id, qs) in _pick_heatmap_facts(run, method).items():
        prompts = [str(q.prompt) for q in qs]
        labels = [f"{kind} q{j + 1}: {str(q.prompt)[-40:]} → {q.answer}" for j, q in enumerate(qs)]
        neurons = [sorted(run.neurons.get((method, str(q.query_id)), [])) for q in qs]
        key = content_hash({"stage": "heatmaps", "model": model_fingerprint(model),
                            "prompts": prompts, "labels": labels, "neurons": neurons,
                            "alpha": cfg.alpha, "rows": cfg.rows, "n": cfg.heatmap_neurons,
                            "factors": [cfg.suppress, cfg.enhance]})
        if key in done:
            table = store.get("heatmaps", key)
        else:
            table = heatmap_table(model, prompts, labels, neurons, alpha=cfg.alpha,
                                  n_neurons=cfg.heatmap_neurons, rows=cfg.rows,
                                  suppress=cfg.suppress, enhance=cfg.enhance)
            table.insert(0, "panel", kind)
            table.insert(1, "method", method)
            table.insert(2, "fact_id", fact_id)
            store.put("heatmaps", key, table)
        out[kind] = heatmap_figures(table, store.path("figures"), prefix=f"heatmap_{kind}_",
                                    title=f"{kind} fact {fact_id}, {method.upper()} KNs circled")
    return out
