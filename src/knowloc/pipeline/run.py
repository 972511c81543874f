"""What every stage reads from a run directory, and the helpers they share.

:func:`read_run` gives the stages after consistency their input (:class:`RunFacts`): the
localized queries, each query's knowledge neurons, the K_I/K_II split and the catalog of
every query of the run (screened ones too, for locality and unrelated queries).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..attribution import sort_methods
from ..consistency import Threshold
from ..errors import ConfigError, RunError
from ..models import TARGETS, Model
from ..store import CONFIG_FILE, RunStore, content_hash

log = logging.getLogger(__name__)


def model_fingerprint(model: Model) -> dict[str, Any]:
    """The part of a model that determines results (hashed into every unit key)."""
    return {
        "name": model.name,
        "adapter": model.adapter.name,
        "dtype": str(model.dtype).replace("torch.", ""),
        "n_layers": model.n_layers,
        "d_mlp": model.d_mlp,
    }


def seed_everything(seed: int) -> None:
    """Seed numpy's and torch's global generators (at the start of a run)."""
    np.random.seed(seed)
    torch.manual_seed(seed)


def seeded_rng(*parts: Any) -> np.random.Generator:
    """A generator seeded by the content hash of ``parts`` (independent of call order)."""
    return np.random.default_rng(int(content_hash(list(parts), length=15), 16))


def with_ident(df: pd.DataFrame, ident: dict[str, Any]) -> pd.DataFrame:
    """``df`` with the ``ident`` columns (object dtype) in front, in their order."""
    out = df.copy()
    for i, (k, v) in enumerate(ident.items()):
        out.insert(i, k, pd.Series([v] * len(out), dtype="object"))
    return out


def run_target(store: RunStore) -> str:
    """The run's target mode (``localize.target`` of its ``config.yaml``, see
    :meth:`knowloc.models.Model.target_ids`): every stage scores answers the way the run's
    knowledge neurons were localized. ``"first"`` for a run that records none (made before
    the option existed, when every run was ``first``)."""
    if not (store.root / CONFIG_FILE).exists():
        return "first"
    target = (store.read_config().get("localize") or {}).get("target", "first")
    if target not in TARGETS:
        raise RunError(f"{store.root / CONFIG_FILE} names the unknown target {target!r} "
                       f"(localize.target; one of {', '.join(TARGETS)})")
    return str(target)


def record_target(store: RunStore, target: str) -> None:
    """Write ``target`` into ``localize.target`` of the run's ``config.yaml`` (created if
    absent) unless it is there already, so that :func:`run_target` reads it back."""
    config = store.read_config() if (store.root / CONFIG_FILE).exists() else {}
    section = config.get("localize") or {}
    if section.get("target") != target:
        config["localize"] = {**section, "target": target}
        store.write_config(config)


def target_key(target: str) -> dict[str, str]:
    """The part of a unit key that names the target mode: nothing for ``"first"`` (so the
    keys, and the runs made before the option existed, stay what they were), else
    ``{"target": target}``."""
    return {} if target == "first" else {"target": target}


def parse_threshold(value: float | str) -> Threshold:
    """A K_I/K_II split threshold: a number (also given as text) or ``"otsu"``."""
    if value == "otsu":
        return "otsu"
    if not isinstance(value, str):
        return value
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"split threshold must be a number or 'otsu' (got {value!r})") from None


@dataclass
class RunFacts:
    """What the modification, mapping and attention stages read from a run."""

    queries: pd.DataFrame  # one row per (method, query)
    neurons: dict[tuple[str, str], list[tuple[int, int]]]  # (method, query_id) -> N_i
    split: pd.DataFrame  # method, fact_id, relation, cs2, kind
    catalog: pd.DataFrame  # relation, fact_id, query_id, prompt, answer (all known facts)
    methods: list[str]
    target: str = "first"  # the run's target mode (run_target)


def read_run(store: RunStore, methods: Sequence[str] | None, threshold: float | str,
             query_ids: set[str] | None = None, *, allow_partial: bool = False) -> RunFacts:
    """The run's queries, knowledge neurons, K_I/K_II split (CS2 > ``threshold``), catalog
    and target mode, for ``methods`` (None: every method with consistency results).

    Refuses a run whose localization is unfinished unless ``allow_partial``."""
    from ..consistency import split_facts
    from .units import require_complete

    require_complete(store, "queries", stage="localize", allow_partial=allow_partial)

    scores = store.table("consistency")
    if scores.empty:
        raise RunError(f"run {store.root} has no consistency results; run "
                       f"`knowloc consistency --run {store.root}` first")
    queries = store.table("queries")
    if queries.empty:
        raise RunError(f"run {store.root} has no localized queries; run `knowloc localize` first")
    if query_ids is not None:
        queries = queries[queries["query_id"].isin(query_ids)]
    run_methods = sort_methods(set(scores["method"]))
    if methods:
        unknown = [m for m in methods if m not in run_methods]
        if unknown:
            raise ConfigError(f"method(s) {', '.join(unknown)} not in the run's consistency "
                              f"results (it has {', '.join(run_methods)})")
        run_methods = [m for m in run_methods if m in methods]
    split = split_facts(scores, parse_threshold(threshold))
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
    return RunFacts(queries, neurons, split, catalog, run_methods, run_target(store))


def attribution_maps(store: RunStore,
                     methods: Sequence[str]) -> dict[tuple[str, str], pd.DataFrame]:
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


def fact_queries(run: RunFacts, method: str, fact_id: str) -> pd.DataFrame:
    """The run's queries of one fact for one method, by query id."""
    q = run.queries
    return q[(q["method"] == method) & (q["fact_id"] == fact_id)].sort_values("query_id")
