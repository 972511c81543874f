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
