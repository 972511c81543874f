"""The documented JSONL format (``docs/data.md``): the packaged built-in facts and users' own
files."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from knowloc.errors import DataError

from .facts import TemplateRejected, check_template
from .sources import RawFact, RawSet, dedupe_templates, read_jsonl_objects, str_field


def builtin_path() -> Path:
    """Path of the packaged built-in facts file."""
    return Path(__file__).resolve().parents[1] / "resources" / "builtin_facts.jsonl"


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
            out.append(check_template(t))
        except TemplateRejected as e:
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


def load_jsonl(path: Path, kind: str) -> RawSet:
    """Parse the documented JSONL format (docs/data.md). ``kind`` prefixes default fact ids."""
    if not path.exists():
        raise DataError(f"facts file not found: {path}")
    if not path.is_file():
        raise DataError(f"not a file: {path}")
    skipped: Counter[str] = Counter()
    rel_templates: dict[str, tuple[list[str], str]] = {}  # relation -> (templates, where)
    labels: dict[str, str] = {}
    pending: list[_PendingFact] = []
    for lineno, obj in read_jsonl_objects(path):
        where = f"{path}:{lineno}"
        rel = str_field(obj, "relation", where)
        assert rel is not None
        if "subject" in obj or "object" in obj:
            subject = str_field(obj, "subject", where)
            object_ = str_field(obj, "object", where)
            assert subject is not None and object_ is not None
            fact_id = str_field(obj, "fact_id", where, required=False)
            if fact_id is not None and "#" in fact_id:
                raise DataError(f"{where}: fact_id {fact_id!r} must not contain '#'")
            templates = _templates_field(obj, where)
            if templates is not None:
                templates = dedupe_templates(templates, skipped)
            pending.append(_PendingFact(where, rel, subject, object_, fact_id, templates))
        elif "templates" in obj:
            templates = _templates_field(obj, where)
            assert templates is not None
            if rel in rel_templates:
                raise DataError(
                    f"{where}: templates for relation {rel} were already given at "
                    f"{rel_templates[rel][1]}; give each relation's template line once"
                )
            rel_templates[rel] = (dedupe_templates(templates, skipped), where)
            label = str_field(obj, "label", where, required=False)
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

    facts: list[RawFact] = []
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
        facts.append(RawFact(fact_id, p.relation, p.subject, p.object, list(templates)))
    available = sorted({f.relation for f in facts})
    return RawSet(facts, f"{kind}:{path}", available, skipped, labels)
