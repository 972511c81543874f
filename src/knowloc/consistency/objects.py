"""KN-consistency straight from Python objects (attributions or neuron sets), no tables:
:func:`consistency_of`, its result :class:`Consistency` and one fact's row
:class:`FactConsistency`."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import pandas as pd

from ..errors import ConfigError, DataError
from ..intervals import N_BOOT
from .scores import POPULATIONS, QUERY_COLUMNS, consistency_scores
from .split import Threshold
from .table import skipped_summary, table1


@dataclass(frozen=True)
class FactConsistency:
    """CS1 and CS2 of one fact under one method: a row of :data:`SCORE_COLUMNS`.

    ``cs1`` and ``cs2`` are NaN when ``skipped`` (the reason) is not None; ``relation`` is
    None when the inputs did not carry one.
    """

    method: str
    fact_id: str
    relation: str | None
    n_queries: int
    n_union: int
    n_intersection: int
    n_shared: int
    cs1: float
    cs2: float
    skipped: str | None


@dataclass(frozen=True)
class Consistency:
    """The KN-consistency of a set of facts, as computed by :func:`consistency_of`.

    Attributes:
        scores: one row per (method, fact), columns :data:`SCORE_COLUMNS` (exactly
            :func:`consistency_scores` of ``queries`` and ``neurons``).
        queries: the query table built from the inputs (``method, fact_id, relation,
            query_id, known, prob, n_neurons``; ``prob`` is NaN for neuron sets).
        neurons: the knowledge-neuron table built from the inputs (``method, fact_id,
            relation, query_id, layer, neuron, attribution``; ``attribution`` is NaN for
            neuron sets).
        population: the population the scores were computed for (``"known"`` or ``"all"``).

    Iterating gives one :class:`FactConsistency` per row of ``scores``.
    """

    scores: pd.DataFrame
    queries: pd.DataFrame
    neurons: pd.DataFrame
    population: str

    def __len__(self) -> int:
        return len(self.scores)

    def __iter__(self) -> Iterator[FactConsistency]:
        for rec in self.scores.to_dict("records"):
            yield _fact_consistency(rec)

    def fact(self, fact_id: str, method: str | None = None) -> FactConsistency:
        """The scores of one fact (``method`` is needed when the fact has several)."""
        rows = self.scores[self.scores["fact_id"] == str(fact_id)]
        if method is not None:
            rows = rows[rows["method"] == method]
        if rows.empty:
            known = sorted(set(self.scores["fact_id"]))
            raise DataError(f"no scores for fact {fact_id!r}"
                            + (f" and method {method!r}" if method is not None else "")
                            + f"; the facts are {known[:10]}")
        if len(rows) > 1:
            raise ConfigError(f"fact {fact_id!r} has scores for several methods "
                              f"{sorted(rows['method'])}; pass method=")
        return _fact_consistency(rows.iloc[0].to_dict())

    def table1(self, static_threshold: float = 0.1, *, otsu: bool = True,
               n_boot: int = N_BOOT, seed: int = 0) -> pd.DataFrame:
        """The paper's Table 1 of these scores (:func:`table1`): the static threshold
        (label ``St``) and, with ``otsu``, Otsu's threshold per method (label ``Ot``), with
        95% intervals (``n_boot`` resamples of the bootstrap seeded by ``seed``)."""
        thresholds: list[tuple[str, Threshold]] = [("St", static_threshold)]
        if otsu:
            thresholds.append(("Ot", "otsu"))
        return table1(self.scores, thresholds, n_boot=n_boot, seed=seed)

    def skipped(self) -> pd.DataFrame:
        """Skipped facts per method and reason (:func:`skipped_summary`)."""
        return skipped_summary(self.scores)

    def _repr_html_(self) -> str:
        return str(self.scores.to_html(index=False, float_format=lambda v: f"{v:.3f}"))


def _fact_consistency(rec: dict[str, object]) -> FactConsistency:
    def opt(v: object) -> str | None:
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)

    return FactConsistency(
        method=str(rec["method"]),
        fact_id=str(rec["fact_id"]),
        relation=opt(rec["relation"]),
        n_queries=int(rec["n_queries"]),  # type: ignore[call-overload]
        n_union=int(rec["n_union"]),  # type: ignore[call-overload]
        n_intersection=int(rec["n_intersection"]),  # type: ignore[call-overload]
        n_shared=int(rec["n_shared"]),  # type: ignore[call-overload]
        cs1=float(rec["cs1"]),  # type: ignore[arg-type]
        cs2=float(rec["cs2"]),  # type: ignore[arg-type]
        skipped=opt(rec["skipped"]),
    )


def consistency_of(
    items: Iterable[object] | Mapping[str, Iterable[object]],
    *,
    threshold: float = 0.2,
    mode: str = "relative",
    population: str | None = None,
) -> Consistency:
    """KN-consistency (CS1, CS2; paper eq. 1) straight from attributions or neuron sets.

    Args:
        items: the neighbor queries' results, either

            * an iterable of :class:`~knowloc.attribution.Attribution` or
              :class:`~knowloc.neurons.NeuronSet` objects, grouped by their ``fact_id``
              (attribute :class:`~knowloc.data.Query` objects from
              :func:`~knowloc.data.load_facts` and the ids are set), or
            * a mapping ``fact_id -> [items of that fact]``; the key is the fact, whatever
              the items say. Here an item may also be a plain collection of
              ``(layer, neuron)`` pairs.

            Items are grouped by method too (each method gets its own scores).
        threshold, mode: how the knowledge neurons of an attribution are read off its map,
            as in :func:`knowloc.knowledge_neurons` (default: above 0.2 × its largest
            score). Neuron sets are taken as they are.
        population: ``"known"`` keeps only facts whose answer is the model's top-1 on at
            least one of their attributions (the others get ``skipped = "not known by the
            model"``); ``"all"`` keeps every fact. Default: ``"known"`` when every item is an
            attribution, ``"all"`` otherwise (a neuron set does not record whether the model
            knew the answer).

    Returns:
        A :class:`Consistency`: ``.scores`` is the same table as :func:`consistency_scores`
        on the run tables of these queries; ``.table1()`` the paper's Table 1; iterating
        gives one :class:`FactConsistency` per (method, fact).

    Raises:
        ConfigError: a bad ``threshold``, ``mode`` or ``population``, or
            ``population="known"`` with neuron sets.
        DataError: an item that is neither an attribution nor a neuron set, an item without
            ``fact_id`` outside a mapping, or the same query twice for one method.
    """
    from ..attribution import Attribution
    from ..neurons import NeuronSet, Selection, as_neurons, select

    selection = Selection(mode, threshold).validate()
    if population is not None and population not in POPULATIONS:
        raise ConfigError(f"population must be one of {list(POPULATIONS)}, got {population!r}")
    grouped: list[tuple[str | None, object]]
    if isinstance(items, Mapping):
        grouped = [(str(f), it) for f, group in items.items() for it in group]
    elif isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise DataError(f"consistency_of needs attributions or neuron sets, got "
                        f"{type(items).__name__}")
    else:
        grouped = [(None, it) for it in items]

    query_rows: list[dict[str, object]] = []
    neuron_rows: list[dict[str, object]] = []
    n_sets = 0
    seen: set[tuple[str, str, str]] = set()
    position: dict[tuple[str, str], int] = {}
    for i, (key, it) in enumerate(grouped):
        if isinstance(it, Attribution):
            method, qid, fid, rel = it.method, it.query_id, it.fact_id, it.relation
            idx = select(it.scores, selection)
            sc = it.scores.detach().cpu().double().numpy()
            pairs = [(int(layer), int(neuron)) for layer, neuron in idx]
            attrib = [float(sc[p]) for p in pairs]
            known, prob = bool(it.top1), float(it.prob)
        elif isinstance(it, NeuronSet) or (key is not None and isinstance(
                it, (set, frozenset, list, tuple))):
            n_sets += 1
            if isinstance(it, NeuronSet):
                method, qid, fid = it.method, it.query_id, it.fact_id
                members: Iterable[object] = it.neurons
            else:
                method, qid, fid, members = "", None, None, it
            try:
                pairs = list(as_neurons(members))  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise DataError(f"item {i} of fact {key!r} is not a collection of "
                                "(layer, neuron) pairs") from None
            rel, attrib, known, prob = None, [math.nan] * len(pairs), True, math.nan
        else:
            what = ("an Attribution, a NeuronSet or a set of (layer, neuron) pairs"
                    if key is not None else "an Attribution or a NeuronSet")
            raise DataError(f"item {i} is a {type(it).__name__}; consistency_of takes {what}")
        fact = key if key is not None else fid
        if fact is None:
            raise DataError(f"item {i} ({type(it).__name__}) has no fact_id; attribute Query "
                            "objects from load_facts, or pass a mapping {fact_id: [items]}")
        fact, method = str(fact), str(method)
        n = position.get((method, fact), 0)
        position[(method, fact)] = n + 1
        query = str(qid) if qid is not None else f"{fact}#{n}"
        if (method, fact, query) in seen:
            raise DataError(f"query {query!r} of fact {fact!r} is given twice for method "
                            f"{method!r}; pass each query's result once")
        seen.add((method, fact, query))
        query_rows.append({"method": method, "fact_id": fact, "relation": rel,
                           "query_id": query, "known": known, "prob": prob,
                           "n_neurons": len(pairs)})
        neuron_rows.extend({"method": method, "fact_id": fact, "relation": rel,
                            "query_id": query, "layer": layer, "neuron": neuron,
                            "attribution": a}
                           for (layer, neuron), a in zip(pairs, attrib))

    if population is None:
        population = "all" if n_sets else "known"
    elif population == "known" and n_sets:
        raise ConfigError("a neuron set does not record whether the model knew the answer; "
                          "pass population='all', or pass the attributions")
    queries = pd.DataFrame(query_rows, columns=[*QUERY_COLUMNS, "prob", "n_neurons"])
    queries = queries.astype({"known": bool, "n_neurons": "int64", "prob": "float64"})
    neurons = pd.DataFrame(neuron_rows, columns=["method", "fact_id", "relation", "query_id",
                                                 "layer", "neuron", "attribution"])
    neurons = neurons.astype({"layer": "int64", "neuron": "int64", "attribution": "float64"})
    scores = consistency_scores(queries, neurons, population=population)
    return Consistency(scores, queries, neurons, population)
