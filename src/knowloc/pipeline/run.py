"""What every stage reads from a run directory, and the helpers they share.

:func:`read_run` gives the stages after consistency their input (:class:`RunFacts`): the
localized queries, each query's knowledge neurons, the K_I/K_II split and the catalog of
every query of the run (screened ones too, for locality and unrelated queries).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..attribution import Attribution, sort_methods
from ..consistency import Threshold
from ..errors import ConfigError, RunError
from ..models import TARGETS, Model
from ..store import CONFIG_FILE, RunStore, content_hash, to_plain

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


def unit_key(model: Model, stage: str | None, **parts: Any) -> str:
    """The one way a stage names a work unit: the content hash of the model's fingerprint
    (:func:`model_fingerprint`), the stage's name and ``parts``, everything else that
    determines the unit's result (its queries, neuron sets and the fields of the stage's
    configuration that key its units, ``key_config()``).

    ``stage=None`` leaves the stage's name out: localization units were keyed without it
    before the other stages existed, and keep their keys so that every run resumes."""
    content: dict[str, Any] = {"model": model_fingerprint(model), **parts}
    if stage is not None:
        content["stage"] = stage
    return content_hash(content)


def key_config(config: Any, unkeyed: Sequence[str]) -> dict[str, Any]:
    """The fields of a stage configuration (its ``as_dict()``) that key its units: every
    field but ``unkeyed`` (those that choose which units exist, such as the methods or the
    split threshold, or how they are shown, but not what one unit computes)."""
    return {k: v for k, v in config.as_dict().items() if k not in unkeyed}


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


@dataclass(frozen=True)
class FactNeurons:
    """One fact of the run's split under one method: its queries and their neuron sets."""

    method: str
    relation: str
    fact_id: str
    queries: tuple[tuple[str, str, str], ...]  # (query_id, prompt, answer), by query id
    sets: dict[str, list[tuple[int, int]]]  # query_id -> N_i

    def key_parts(self) -> dict[str, Any]:
        """What a unit key hashes of it: the method, the queries and their neuron sets."""
        return {"method": self.method, "queries": [(p, a) for _, p, a in self.queries],
                "neurons": [sorted(self.sets[qid]) for qid, _, _ in self.queries]}

    def set_items(self) -> tuple[tuple[str, tuple[tuple[int, int], ...]], ...]:
        """The neuron sets as a unit payload holds them."""
        return tuple((qid, tuple(ns)) for qid, ns in self.sets.items())


def split_fact_neurons(run: RunFacts) -> Iterator[FactNeurons]:
    """Every (method, fact) of the run's K_I/K_II split that has queries, in method then
    split order: what the modification and mapping stages make their units of."""
    for method in run.methods:
        for fact in run.split[run.split["method"] == method].itertuples():
            fq = fact_queries(run, method, str(fact.fact_id))
            if fq.empty:
                continue
            queries = tuple((str(q.query_id), str(q.prompt), str(q.answer))
                            for q in fq.itertuples())
            yield FactNeurons(method, str(fact.relation), str(fact.fact_id), queries,
                              {qid: run.neurons.get((method, qid), []) for qid, _, _ in queries})


# ---------------------------------------------------------------- attribution maps
#: The table of full attribution maps (``localize --keep-maps``).
MAPS = "maps"


def map_frame(attr: Attribution, ident: dict[str, Any], seconds: float) -> pd.DataFrame:
    """The ``maps`` row of one attribution: ``ident``, the query and its prediction, the
    attribution's config (JSON text, and ``n_steps``), the seconds it took, and the full
    ``scores`` and ``activations`` maps flattened (``n_layers`` x ``d_mlp``, in the maps'
    dtype: float32, float64 for a float64 model). :func:`map_attribution` reads it back."""
    scores = attr.scores.detach().cpu().numpy()
    acts = attr.activations.detach().cpu().numpy()
    row = {"prompt": attr.prompt, "answer": attr.answer, "target_id": int(attr.target_id),
           "target_ids": np.asarray(attr.target_ids, dtype=np.int64),
           "prob": float(attr.prob), "top1": bool(attr.top1),
           "predicted_id": int(attr.predicted_id), "predicted": attr.predicted,
           "n_steps": attr.config.get("n_steps"),
           "config": json.dumps(to_plain(attr.config), sort_keys=True),
           "extra": json.dumps(to_plain(attr.extra), sort_keys=True),
           "seconds": float(seconds), "n_layers": int(scores.shape[0]),
           "d_mlp": int(scores.shape[1]), "dtype": str(scores.dtype),
           "scores": scores.reshape(-1), "activations": acts.reshape(-1)}
    if attr.completeness_gap is not None:  # per layer (float64)
        row["completeness_gap"] = attr.completeness_gap.double().cpu().numpy()
    return with_ident(pd.DataFrame([row]), ident)


def map_attribution(row: Any) -> tuple[Attribution, float]:
    """The :class:`Attribution` of one ``maps`` row (a named tuple or Series, see
    :func:`map_frame`), bit-identical to the one stored, and the seconds it took."""
    shape = (int(row.n_layers), int(row.d_mlp))
    dtype = np.dtype(str(row.dtype))
    attr = Attribution(
        prompt=str(row.prompt), answer=str(row.answer), target_id=int(row.target_id),
        method=str(row.method),
        scores=torch.from_numpy(np.asarray(row.scores, dtype=dtype).reshape(shape).copy()),
        activations=torch.from_numpy(
            np.asarray(row.activations, dtype=dtype).reshape(shape).copy()),
        prob=float(row.prob), top1=bool(row.top1), predicted_id=int(row.predicted_id),
        predicted=str(row.predicted), config=json.loads(row.config),
        query_id=str(row.query_id), fact_id=str(row.fact_id), relation=str(row.relation),
        extra=json.loads(row.extra), target_ids=tuple(int(t) for t in row.target_ids),
        completeness_gap=_stored_gap(getattr(row, "completeness_gap", None)))
    return attr, float(row.seconds)


def _stored_gap(value: Any) -> torch.Tensor | None:
    """A ``maps`` row's per-layer completeness gap; None for a map stored without one."""
    if value is None or np.ndim(value) == 0:  # absent, or NaN beside newer parts
        return None
    return torch.from_numpy(np.asarray(value, dtype=np.float64).copy())


def read_map(store: RunStore, key: str, query_id: str) -> tuple[Attribution, float]:
    """The stored map ``key`` of query ``query_id`` (a map shared by queries with the same
    prompt and answer holds a row for each) and the seconds it took."""
    part = store.get(MAPS, key)
    rows = part[part["query_id"].astype(str) == query_id]
    return map_attribution(next((rows if len(rows) else part).itertuples(index=False)))


def load_maps(run: str | Path | RunStore, methods: Sequence[str] | None = None,
              query_ids: Sequence[str] | None = None) -> dict[tuple[str, str], Attribution]:
    """The full attribution maps a run kept (``knowloc localize --keep-maps``), as
    (method, query_id) -> :class:`~knowloc.attribution.Attribution`, for ``methods`` and
    ``query_ids`` (default: all of the run's current localization).

    Re-threshold them without a model, e.g.
    ``neurons_frame(maps["ig", qid], Selection("relative", 0.3))``. A run without kept maps
    gives an empty dict.
    """
    store = run if isinstance(run, RunStore) else RunStore(run, create=False)
    table = store.table(MAPS)
    if table.empty:
        return {}
    if methods is not None:
        table = table[table["method"].isin(list(methods))]
    if query_ids is not None:
        table = table[table["query_id"].isin(list(query_ids))]
    out: dict[tuple[str, str], Attribution] = {}
    for row in table.itertuples(index=False):
        attr, _ = map_attribution(row)
        out[(attr.method, str(row.query_id))] = attr
    return out
