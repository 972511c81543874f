"""Facts and their neighbor queries: ParaRel, the built-in set, and users' own JSONL files.

A *fact* ⟨s, r, o⟩ comes with *neighbor queries*: paraphrased cloze prompts that end right
before the object (METHODS.md §0). Every source is turned into the same shape:
:class:`FactSet` → :class:`Fact` → :class:`Query`.

Template rule (one rule for every source; see ``docs/data.md``):

* whitespace is normalized (runs collapsed to one space, ends stripped);
* ``[X]`` and ``[Y]`` each occur exactly once;
* ``[Y]`` is the last token: nothing may follow it except one optional ``.`` (with or
  without a space before it, as in ParaRel's ``"[Y] ."`` and ``"[Y]."``), which is removed;
* ``[Y]`` is a separate word (whitespace right before it), so the answer is predicted as a
  new word after the prompt.

The stored :attr:`Query.template` therefore always ends with ``" [Y]"``, and
:attr:`Query.prompt` is the template up to (not including) the space before ``[Y]``, with
``[X]`` replaced by the subject. ParaRel patterns that break the rule are dropped and
counted in :attr:`FactSet.skipped`; in JSONL files (built-in or user) they are an error.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from knowloc.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

__all__ = [
    "SOURCE_FORMS",
    "Fact",
    "FactSet",
    "Query",
    "builtin_path",
    "load_facts",
    "make_prompt",
    "normalize_template",
    "pararel_relations",
]

#: Human-readable list of the accepted ``source`` forms (used in error messages).
SOURCE_FORMS = (
    '"builtin" (the packaged facts), "pararel:<dir>" or a directory containing '
    'graphs_json/ (ParaRel), "jsonl:<file>" or a path ending in ".jsonl" (your own facts)'
)

_X = "[X]"
_Y = "[Y]"
_WS = re.compile(r"\s+")
# After whitespace normalization: something, whitespace, [Y], optionally " ." or ".".
_Y_LAST = re.compile(r"^(?P<head>.*\S)\s\[Y\](?:\s?\.)?$")

# Keys of FactSet.skipped (the unit is part of the wording).
SKIP_TEMPLATE_NOT_LAST = "templates dropped: [Y] not last"
SKIP_TEMPLATE_BAD = "templates dropped: not exactly one [X] and one [Y]"
SKIP_TEMPLATE_DUP = "templates dropped: duplicate after normalization"
SKIP_RELATION_NO_TEMPLATES = "relations skipped: no usable template"
SKIP_RELATION_NO_FACT_FILE = "relations skipped: no trex_lms_vocab file"


def _skip_few(min_queries: int) -> str:
    """Reason key for facts with too few usable templates."""
    return f"fewer than {min_queries} usable templates"


# --------------------------------------------------------------------------------------
# Data classes
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    """One cloze query (a neighbor query of a fact).

    Attributes:
        fact_id: id of the fact this query asks about.
        query_id: ``f"{fact_id}#{i}"`` where ``i`` is this query's index in
            :attr:`Fact.queries`; unique within a :class:`FactSet`.
        relation: relation id, e.g. ``"P36"``.
        template: whitespace-normalized template containing ``[X]`` once and ending with
            ``" [Y]"`` (a trailing ``.`` after ``[Y]`` has been removed).
        prompt: the template with ``[X]`` replaced by the subject and the final ``" [Y]"``
            removed; never ends with whitespace.
        answer: the gold object label, e.g. ``"Portuguese"`` (no leading space).
    """

    fact_id: str
    query_id: str
    relation: str
    template: str
    prompt: str
    answer: str


@dataclass(frozen=True)
class Fact:
    """A fact ⟨subject, relation, object⟩ and its neighbor queries (at least ``min_queries``)."""

    fact_id: str
    relation: str
    subject: str
    object: str
    queries: tuple[Query, ...]


@dataclass
class FactSet:
    """The facts loaded from one source, plus what was skipped and why.

    Attributes:
        facts: the facts, grouped by relation in the source's order (ParaRel: relations
            sorted, facts in file order; JSONL: file order).
        source: human-readable description, e.g. ``"pararel:/data/pararel"``.
        skipped: reason → count. The reason says what is counted (facts, templates,
            relations), e.g. ``{"fewer than 2 usable templates": 3}``.
        relations: the relations that have at least one fact in :attr:`facts`, sorted.
        relation_labels: relation id → human-readable label where the source gives one.
    """

    facts: list[Fact]
    source: str
    skipped: dict[str, int]
    relations: list[str]
    relation_labels: dict[str, str] = field(default_factory=dict)

    def queries(self) -> list[Query]:
        """All queries of all facts, in fact order then query order."""
        return [q for f in self.facts for q in f.queries]

    def by_relation(self) -> dict[str, list[Fact]]:
        """Facts grouped by relation (keys in :attr:`relations` order)."""
        out: dict[str, list[Fact]] = {r: [] for r in self.relations}
        for f in self.facts:
            out.setdefault(f.relation, []).append(f)
        return out

    def __len__(self) -> int:
        return len(self.facts)

    def __iter__(self) -> Iterator[Fact]:
        return iter(self.facts)


# --------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------


class _TemplateRejected(ValueError):
    """A template breaks the template rule; ``reason`` is a FactSet.skipped key."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _check_template(pattern: str) -> str:
    """Return the normalized template (ending with ``" [Y]"``) or raise _TemplateRejected."""
    norm = _WS.sub(" ", pattern).strip()
    if norm.count(_X) != 1 or norm.count(_Y) != 1:
        raise _TemplateRejected(
            f"template {pattern!r} must contain [X] exactly once and [Y] exactly once",
            SKIP_TEMPLATE_BAD,
        )
    m = _Y_LAST.match(norm)
    if m is None:
        raise _TemplateRejected(
            f"template {pattern!r} must end with [Y] as a separate last word "
            '(only a final "." may follow it), e.g. "The capital of [X] is [Y]"',
            SKIP_TEMPLATE_NOT_LAST,
        )
    return f"{m.group('head')} {_Y}"


def normalize_template(pattern: str) -> str:
    """Normalize a template and check the template rule (module docstring).

    Returns the whitespace-normalized template ending with ``" [Y]"`` (a final ``.`` after
    ``[Y]`` removed). Raises :class:`DataError` if the template breaks the rule.

    >>> normalize_template("The capital of  [X] is [Y] .")
    'The capital of [X] is [Y]'
    """
    try:
        return _check_template(pattern)
    except _TemplateRejected as e:
        raise DataError(str(e)) from None


def make_prompt(template: str, subject: str) -> str:
    """Prompt for a normalized template: ``[X]`` → subject, the final ``" [Y]"`` removed."""
    if not template.endswith(" " + _Y):
        raise DataError(f"template {template!r} is not normalized; call normalize_template first")
    return template[: -len(_Y) - 1].rstrip().replace(_X, subject)


# --------------------------------------------------------------------------------------
# Raw facts (before selection) shared by all sources
# --------------------------------------------------------------------------------------


@dataclass
class _RawFact:
    fact_id: str
    relation: str
    subject: str
    object: str
    templates: list[str]


@dataclass
class _RawSet:
    facts: list[_RawFact]
    source: str
    available: list[str]  # relations the source offers (for error messages)
    skipped: Counter[str]
    labels: dict[str, str] = field(default_factory=dict)


def _dedupe(templates: Sequence[str], skipped: Counter[str]) -> list[str]:
    """Drop repeated templates (keeping the first), counting them."""
    seen: set[str] = set()
    out: list[str] = []
    for t in templates:
        if t in seen:
            skipped[SKIP_TEMPLATE_DUP] += 1
            continue
        seen.add(t)
        out.append(t)
    return out


def _read_jsonl_objects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (1-based line number, object) for each non-blank line; DataError on bad lines."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"file not found: {path}") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark
        data = data[3:]
    # lines end at "\n" only: JSON strings may hold other Unicode line separators
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte "
                            f"{e.start})") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); "
                "each line must be one JSON object"
            ) from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def _str_field(obj: dict[str, Any], key: str, where: str, *, required: bool = True) -> str | None:
    """A non-empty string field (stripped), or None when absent and not required."""
    if key not in obj or obj[key] is None:
        if required:
            raise DataError(f"{where}: missing key {key!r}")
        return None
    val = obj[key]
    if not isinstance(val, str) or not val.strip():
        raise DataError(f"{where}: {key!r} must be a non-empty string, got {val!r}")
    return val.strip()


# --------------------------------------------------------------------------------------
# ParaRel
# --------------------------------------------------------------------------------------


def pararel_relations(directory: str | os.PathLike[str]) -> list[str]:
    """Relations that a ParaRel directory offers (one per ``graphs_json/<REL>.jsonl``), sorted."""
    root = Path(directory)
    graphs = root / "graphs_json"
    if not root.is_dir():
        raise DataError(f"ParaRel directory not found: {root}")
    if not graphs.is_dir():
        raise DataError(
            f"not a ParaRel directory: {graphs} is missing "
            "(expected graphs_json/<REL>.jsonl and trex_lms_vocab/<REL>.jsonl)"
        )
    return sorted(p.stem for p in graphs.glob("*.jsonl") if p.is_file())


def _load_pararel(root: Path, relations: Sequence[str] | None) -> _RawSet:
    available = pararel_relations(root)
    if not available:
        raise DataError(f"no relation files (*.jsonl) in {root / 'graphs_json'}")
    facts_dir = root / "trex_lms_vocab"
    if not facts_dir.is_dir():
        raise DataError(f"not a ParaRel directory: {facts_dir} is missing")
    wanted = _check_relations(relations, available, f"pararel:{root}")
    explicit = relations is not None
    skipped: Counter[str] = Counter()
    facts: list[_RawFact] = []
    for rel in wanted:
        graph_file = root / "graphs_json" / f"{rel}.jsonl"
        templates: list[str] = []
        for lineno, obj in _read_jsonl_objects(graph_file):
            pattern = obj.get("pattern")
            if not isinstance(pattern, str):
                raise DataError(f"{graph_file}:{lineno}: missing string key 'pattern'")
            try:
                templates.append(_check_template(pattern))
            except _TemplateRejected as e:
                skipped[e.reason] += 1
                logger.debug("%s:%d: dropped pattern %r (%s)", graph_file, lineno, pattern, e)
        templates = _dedupe(templates, skipped)
        if not templates:
            skipped[SKIP_RELATION_NO_TEMPLATES] += 1
            logger.warning("relation %s has no usable template ([Y] last); skipped", rel)
            continue
        fact_file = facts_dir / f"{rel}.jsonl"
        if not fact_file.is_file():
            if explicit:
                raise DataError(f"relation {rel} has patterns but no fact file {fact_file}")
            skipped[SKIP_RELATION_NO_FACT_FILE] += 1
            logger.warning("relation %s: %s missing; skipped", rel, fact_file)
            continue
        seen_uuids: dict[str, int] = {}
        for lineno, obj in _read_jsonl_objects(fact_file):
            where = f"{fact_file}:{lineno}"
            sub = _str_field(obj, "sub_label", where)
            obj_label = _str_field(obj, "obj_label", where)
            uuid = _str_field(obj, "uuid", where)
            assert sub is not None and obj_label is not None and uuid is not None
            if uuid in seen_uuids:
                raise DataError(
                    f"{where}: duplicate uuid {uuid!r} (first at line {seen_uuids[uuid]})"
                )
            seen_uuids[uuid] = lineno
            facts.append(_RawFact(f"{rel}:{uuid}", rel, sub, obj_label, list(templates)))
    return _RawSet(facts, f"pararel:{root}", available, skipped)


# --------------------------------------------------------------------------------------
# JSONL (built-in and users' own facts)
# --------------------------------------------------------------------------------------


def builtin_path() -> Path:
    """Path of the packaged built-in facts file."""
    return Path(__file__).resolve().parent / "resources" / "builtin_facts.jsonl"


def _templates_field(obj: dict[str, Any], where: str) -> list[str] | None:
    """Validated, normalized, order-kept templates of a line, or None if absent."""
    if "templates" not in obj:
        return None
    raw = obj["templates"]
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: 'templates' must be a non-empty list of strings")
    out: list[str] = []
    for t in raw:
        if not isinstance(t, str):
            raise DataError(f"{where}: every template must be a string, got {t!r}")
        try:
            out.append(_check_template(t))
        except _TemplateRejected as e:
            raise DataError(f"{where}: {e}") from None
    return out


@dataclass
class _PendingFact:
    where: str
    relation: str
    subject: str
    object: str
    fact_id: str | None
    templates: list[str] | None


def _load_jsonl(path: Path, kind: str) -> _RawSet:
    """Parse the documented JSONL format (docs/data.md). ``kind`` prefixes default fact ids."""
    if not path.exists():
        raise DataError(f"facts file not found: {path}")
    if not path.is_file():
        raise DataError(f"not a file: {path}")
    skipped: Counter[str] = Counter()
    rel_templates: dict[str, tuple[list[str], str]] = {}  # relation -> (templates, where)
    labels: dict[str, str] = {}
    pending: list[_PendingFact] = []
    for lineno, obj in _read_jsonl_objects(path):
        where = f"{path}:{lineno}"
        rel = _str_field(obj, "relation", where)
        assert rel is not None
        if "subject" in obj or "object" in obj:
            subject = _str_field(obj, "subject", where)
            object_ = _str_field(obj, "object", where)
            assert subject is not None and object_ is not None
            fact_id = _str_field(obj, "fact_id", where, required=False)
            if fact_id is not None and "#" in fact_id:
                raise DataError(f"{where}: fact_id {fact_id!r} must not contain '#'")
            templates = _templates_field(obj, where)
            if templates is not None:
                templates = _dedupe(templates, skipped)
            pending.append(_PendingFact(where, rel, subject, object_, fact_id, templates))
        elif "templates" in obj:
            templates = _templates_field(obj, where)
            assert templates is not None
            if rel in rel_templates:
                raise DataError(
                    f"{where}: templates for relation {rel} were already given at "
                    f"{rel_templates[rel][1]}; give each relation's template line once"
                )
            rel_templates[rel] = (_dedupe(templates, skipped), where)
            label = _str_field(obj, "label", where, required=False)
            if label is not None:
                labels[rel] = label
        else:
            raise DataError(
                f"{where}: a line must be either a fact "
                '{"relation", "subject", "object", optional "templates", optional "fact_id"} '
                'or a relation template line {"relation", "templates", optional "label"}'
            )
    if not pending:
        raise DataError(f"{path}: no facts found (a fact line has relation, subject and object)")

    facts: list[_RawFact] = []
    seen_ids: dict[str, str] = {}
    per_relation: Counter[str] = Counter()
    for p in pending:
        templates = p.templates
        if templates is None:
            if p.relation not in rel_templates:
                raise DataError(
                    f"{p.where}: fact has no 'templates' and the file has no template line "
                    f'for relation {p.relation} (add {{"relation": "{p.relation}", '
                    '"templates": ["... [X] ... [Y]", ...]})'
                )
            templates = rel_templates[p.relation][0]
        fact_id = p.fact_id or f"{kind}:{p.relation}:{per_relation[p.relation]}"
        per_relation[p.relation] += 1
        if fact_id in seen_ids:
            raise DataError(
                f"{p.where}: duplicate fact_id {fact_id!r} (first at {seen_ids[fact_id]})"
            )
        seen_ids[fact_id] = p.where
        facts.append(_RawFact(fact_id, p.relation, p.subject, p.object, list(templates)))
    available = sorted({f.relation for f in facts})
    return _RawSet(facts, f"{kind}:{path}", available, skipped, labels)


# --------------------------------------------------------------------------------------
# Selection and public entry point
# --------------------------------------------------------------------------------------


def _check_relations(
    relations: Sequence[str] | None, available: Sequence[str], source: str
) -> list[str]:
    """The requested relations (all available ones if None); DataError on unknown ids."""
    if relations is None:
        return list(available)
    if isinstance(relations, str):
        relations = [relations]
    wanted = list(dict.fromkeys(relations))
    if not wanted:
        raise ConfigError("relations= is an empty list; pass None to use all relations")
    unknown = [r for r in wanted if r not in set(available)]
    if unknown:
        raise DataError(
            f"unknown relation(s) {', '.join(map(str, unknown))} in {source}; "
            f"available: {', '.join(available)}"
        )
    return wanted


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
        raw = _load_pararel(path, relations)
        wanted = _check_relations(relations, raw.available, raw.source)
    else:
        raw = _load_jsonl(path, kind)
        if kind == "builtin":
            raw.source = "builtin"
        wanted = _check_relations(relations, raw.available, raw.source)

    skipped = raw.skipped
    few = _skip_few(min_queries)
    groups: dict[str, list[_RawFact]] = {r: [] for r in wanted}
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


def _order_of(facts: Sequence[_RawFact], groups: dict[str, list[_RawFact]]) -> list[str]:
    """Relations in order of first appearance in the source."""
    return [r for r in dict.fromkeys(f.relation for f in facts) if r in groups]


def _build_fact(rf: _RawFact, max_queries: int | None) -> Fact:
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


def with_context(facts: FactSet, context: str | None) -> FactSet:
    """The same facts with ``context`` (e.g. a short few-shot prefix) before every prompt.

    Small models such as SmolLM2 recall facts better after a few solved examples; the
    prefix is part of the prompt, so it changes the work-unit keys of a run.
    """
    if not context or not context.strip():
        return facts
    prefix = " ".join(context.split())
    new = [
        replace(f, queries=tuple(replace(q, prompt=f"{prefix} {q.prompt}") for q in f.queries))
        for f in facts.facts
    ]
    return replace(facts, facts=new)


def natural_key(s: object) -> tuple[object, ...]:
    """Sort key that orders embedded numbers numerically (``P17`` before ``P101``)."""
    parts = re.split(r"(\d+)", str(s))
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts if p != "")
