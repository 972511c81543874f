""":func:`load_facts`: resolve a source, read it, and select its facts and queries."""

from __future__ import annotations

import logging
import os
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from knowloc.errors import ConfigError, DataError

from .facts import Fact, FactSet, Query, make_prompt
from .jsonl import builtin_path, load_jsonl
from .pararel import load_pararel
from .sources import RawFact, check_relations

logger = logging.getLogger(__name__)

#: Human-readable list of the accepted ``source`` forms (used in error messages).
SOURCE_FORMS = (
    '"builtin" (the packaged facts), "pararel:<dir>" or a directory containing '
    'graphs_json/ (ParaRel), "jsonl:<file>" or a path ending in ".jsonl" (your own facts)'
)


def _skip_few(min_queries: int) -> str:
    """Reason key for facts with too few usable templates."""
    return f"fewer than {min_queries} usable templates"


def _resolve_source(source: str | os.PathLike[str]) -> tuple[str, Path]:
    """Map a ``source`` argument to (kind, path); kind is builtin, pararel or jsonl."""
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source.strip():
        raise DataError(f"invalid data source {source!r}; accepted forms: {SOURCE_FORMS}")
    s = source.strip()
    if s == "builtin":
        return "builtin", builtin_path()
    if s.startswith("pararel:"):
        return "pararel", Path(s[len("pararel:") :]).expanduser()
    if s.startswith("jsonl:"):
        return "jsonl", Path(s[len("jsonl:") :]).expanduser()
    path = Path(s).expanduser()
    if path.suffix == ".jsonl":
        return "jsonl", path
    if path.is_dir():
        if (path / "graphs_json").is_dir():
            return "pararel", path
        raise DataError(
            f"{path} is a directory without graphs_json/, so it is not a ParaRel directory; "
            f"accepted forms: {SOURCE_FORMS}"
        )
    if not path.exists():
        raise DataError(f"data source {s!r} not found; accepted forms: {SOURCE_FORMS}")
    raise DataError(f"cannot tell what kind of data {s!r} is; accepted forms: {SOURCE_FORMS}")


def _check_int(name: str, value: int | None, minimum: int, *, optional: bool) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def load_facts(
    source: str | os.PathLike[str] = "builtin",
    *,
    relations: Sequence[str] | None = None,
    facts_per_relation: int | None = None,
    seed: int = 0,
    min_queries: int = 2,
    max_queries_per_fact: int | None = None,
    shuffle: bool = False,
) -> FactSet:
    """Load facts and their neighbor queries.

    Args:
        source: ``"builtin"``; ``"pararel:<dir>"`` or a directory containing
            ``graphs_json/``; ``"jsonl:<file>"`` or a path ending in ``.jsonl``.
        relations: keep only these relation ids (unknown ids raise :class:`DataError`
            listing the available ones). ``None``: all.
        facts_per_relation: keep at most this many facts per relation: the first N in
            source order among the facts that have at least ``min_queries`` usable
            templates (after shuffling when ``shuffle`` is true). ``None``: all.
        seed: seed of the shuffle (``random.Random(f"{seed}:{relation}")`` per relation,
            so a relation's selection does not depend on which other relations are loaded).
            Unused unless ``shuffle`` is true.
        min_queries: facts with fewer usable (distinct, rule-abiding) templates are skipped
            and counted under ``"fewer than {min_queries} usable templates"``.
        max_queries_per_fact: keep at most this many queries per fact (the first ones, in
            template order). ``None``: all.
        shuffle: shuffle each relation's facts before taking ``facts_per_relation``.

    Raises:
        DataError: missing or malformed files, unknown relations, bad templates in JSONL.
        ConfigError: an option has an invalid value.
    """
    _check_int("min_queries", min_queries, 1, optional=False)
    _check_int("facts_per_relation", facts_per_relation, 1, optional=True)
    _check_int("max_queries_per_fact", max_queries_per_fact, 1, optional=True)
    _check_int("seed", seed, -(2**63), optional=False)
    if max_queries_per_fact is not None and max_queries_per_fact < min_queries:
        raise ConfigError(
            f"max_queries_per_fact ({max_queries_per_fact}) must be >= min_queries ({min_queries})"
        )

    kind, path = _resolve_source(source)
    if kind == "pararel":
        raw = load_pararel(path, relations)
        wanted = check_relations(relations, raw.available, raw.source)
    else:
        raw = load_jsonl(path, kind)
        if kind == "builtin":
            raw.source = "builtin"
        wanted = check_relations(relations, raw.available, raw.source)

    skipped = raw.skipped
    few = _skip_few(min_queries)
    groups: dict[str, list[RawFact]] = {r: [] for r in wanted}
    too_few: Counter[str] = Counter()
    for rf in raw.facts:
        if rf.relation not in groups:
            continue
        if len(rf.templates) < min_queries:
            too_few[rf.relation] += 1
            continue
        groups[rf.relation].append(rf)
    for rel, n in too_few.items():
        skipped[few] += n
        level = logging.WARNING if not groups[rel] else logging.INFO
        logger.log(level, "relation %s: %d facts skipped (%s)", rel, n, few)

    chosen: set[int] = set()
    for rel, group in groups.items():
        if shuffle:
            group = list(group)
            random.Random(f"{seed}:{rel}").shuffle(group)
        if facts_per_relation is not None:
            group = group[:facts_per_relation]
        chosen.update(id(rf) for rf in group)
        groups[rel] = group
    # Keep source order (relations grouped as in the source); shuffled order within a relation.
    if shuffle:
        ordered = [rf for rel in _order_of(raw.facts, groups) for rf in groups[rel]]
    else:
        ordered = [rf for rf in raw.facts if id(rf) in chosen]

    facts = [_build_fact(rf, max_queries_per_fact) for rf in ordered]
    if not facts:
        raise DataError(
            f"no facts left in {raw.source} for relations {', '.join(wanted)} "
            f"(skipped: {dict(skipped) or 'nothing'}); a fact needs at least "
            f"min_queries={min_queries} usable templates"
        )
    present = sorted({f.relation for f in facts})
    labels = {r: raw.labels[r] for r in present if r in raw.labels}
    out = FactSet(facts, raw.source, dict(skipped), present, labels)
    logger.info(
        "loaded %d facts (%d queries) in %d relations from %s; skipped: %s",
        len(facts),
        sum(len(f.queries) for f in facts),
        len(present),
        raw.source,
        dict(skipped) or "nothing",
    )
    return out


def _order_of(facts: Sequence[RawFact], groups: dict[str, list[RawFact]]) -> list[str]:
    """Relations in order of first appearance in the source."""
    return [r for r in dict.fromkeys(f.relation for f in facts) if r in groups]


def _build_fact(rf: RawFact, max_queries: int | None) -> Fact:
    templates = rf.templates if max_queries is None else rf.templates[:max_queries]
    queries = tuple(
        Query(
            fact_id=rf.fact_id,
            query_id=f"{rf.fact_id}#{i}",
            relation=rf.relation,
            template=t,
            prompt=make_prompt(t, rf.subject),
            answer=rf.object,
        )
        for i, t in enumerate(templates)
    )
    return Fact(rf.fact_id, rf.relation, rf.subject, rf.object, queries)
