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
            "seconds": round(seconds, 3),
        }
        # the queries row is the unit's completion marker: written last
        store.put("queries", key, pd.DataFrame([row]))
    bar.close()
    queries = consolidate_localization(store)
    return LocalizeResult(store, len(todo), n_done, time.time() - t0, queries)


def _with_ident(df: pd.DataFrame, ident: dict[str, Any]) -> pd.DataFrame:
    out = df.copy()
    for i, (k, v) in enumerate(ident.items()):
        out.insert(i, k, pd.Series([v] * len(out), dtype="object" if len(out) else "object"))
    return out


def consolidate_localization(store: RunStore) -> pd.DataFrame:
    """Write the consolidated, deterministically sorted localization tables."""
    queries = store.table("queries")
    if len(queries):
        store.consolidate("queries", sort_by=QUERY_SORT)
    for name in ("neuron_sets", "attributions"):
        if store.done_keys(name):
            store.consolidate(name, sort_by=NEURON_SORT)
    return queries


def query_frame(queries: pd.DataFrame, facts: FactSet | None = None) -> pd.DataFrame:
    """The ``queries`` table restricted to the facts of ``facts`` (if given)."""
    if facts is None or queries.empty:
        return queries
    ids = {q.query_id for q in facts.queries()}
    return queries[queries["query_id"].isin(ids)].reset_index(drop=True)


def seed_everything(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)


def default_run_dir(name: str) -> Path:
    return Path("runs") / name
