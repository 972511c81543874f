"""Facts and their neighbor queries as data (:class:`FactSet` → :class:`Fact` → :class:`Query`),
and the template rule every source follows (stated in :mod:`knowloc.data`)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from knowloc.errors import DataError

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


class TemplateRejected(ValueError):
    """A template breaks the template rule; ``reason`` is a FactSet.skipped key."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def check_template(pattern: str) -> str:
    """Return the normalized template (ending with ``" [Y]"``) or raise TemplateRejected."""
    norm = _WS.sub(" ", pattern).strip()
    if norm.count(_X) != 1 or norm.count(_Y) != 1:
        raise TemplateRejected(
            f"template {pattern!r} must contain [X] exactly once and [Y] exactly once",
            SKIP_TEMPLATE_BAD,
        )
    m = _Y_LAST.match(norm)
    if m is None:
        raise TemplateRejected(
            f"template {pattern!r} must end with [Y] as a separate last word "
            '(only a final "." may follow it), e.g. "The capital of [X] is [Y]"',
            SKIP_TEMPLATE_NOT_LAST,
        )
    return f"{m.group('head')} {_Y}"


def normalize_template(pattern: str) -> str:
    """Normalize a template and check the template rule (:mod:`knowloc.data`).

    Returns the whitespace-normalized template ending with ``" [Y]"`` (a final ``.`` after
    ``[Y]`` removed). Raises :class:`DataError` if the template breaks the rule.

    >>> normalize_template("The capital of  [X] is [Y] .")
    'The capital of [X] is [Y]'
    """
    try:
        return check_template(pattern)
    except TemplateRejected as e:
        raise DataError(str(e)) from None


def make_prompt(template: str, subject: str) -> str:
    """Prompt for a normalized template: ``[X]`` → subject, the final ``" [Y]"`` removed."""
    if not template.endswith(" " + _Y):
        raise DataError(f"template {template!r} is not normalized; call normalize_template first")
    return template[: -len(_Y) - 1].rstrip().replace(_X, subject)


# --------------------------------------------------------------------------------------
# Derived fact sets and ordering
# --------------------------------------------------------------------------------------


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
