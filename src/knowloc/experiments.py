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
            "n_neurons": int(len(kn)),
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
        logits = model.hf(input_ids=x, logits_to_keep=1).logits[:, -1].float()
        for i, row in zip(idx, torch.softmax(logits, -1)):
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
EDIT_SETS = ("local", "global")
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
    sets: Sequence[str] = EDIT_SETS
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
                "seed": self.seed, "update_sign": self.update_sign}


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
    from .editing import Edit, activation_signs
    from .evaluation import Baseline, EvalQuery, PPLSampler, evaluate_edit, load_ppl_corpus

    t0 = time.time()
    cfg.validate()
    run = _read_run(store, cfg.methods, cfg.split_threshold, query_ids)
    corpus = load_ppl_corpus(ppl_text)
    ppl = PPLSampler(model, corpus, n_entries=cfg.ppl_entries, pool_size=cfg.ppl_pool,
                     max_tokens=cfg.ppl_max_tokens, seed=cfg.seed)
    baseline = Baseline()
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
        key = content_hash({
            "stage": "modify", "model": model_fingerprint(model), "method": method,
            "queries": [(q.prompt, q.answer) for q in fq.itertuples()],
            "neurons": [sorted(sets[str(q.query_id)]) for q in fq.itertuples()],
            "op": op, "set": set_kind, "new_object": new_obj, "locality": loc_ids,
            "config": {k: v for k, v in cfg.as_dict().items()
                       if k not in ("ops", "sets", "methods", "split_threshold")},
            "ppl": ppl.config()})
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
                             "n_neurons": len(sets[q.query_id])})
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
            union = sorted({n for s in sets.values() for n in s})
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
    return ModifyResult(result_edits, t2, md, computed, n_done, time.time() - t0, ppl.config())


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

    label = {"local": "N_i", "global": "N_g"}
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
    from .editing import intervention_probs
    from .evaluation import delta_prob
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
