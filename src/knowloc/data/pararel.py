"""ParaRel directories: ``graphs_json/<REL>.jsonl`` (templates) and
``trex_lms_vocab/<REL>.jsonl`` (facts)."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from knowloc.errors import DataError

from .facts import (
    SKIP_RELATION_NO_FACT_FILE,
    SKIP_RELATION_NO_TEMPLATES,
    TemplateRejected,
    check_template,
)
from .sources import (
    RawFact,
    RawSet,
    check_relations,
    dedupe_templates,
    read_jsonl_objects,
    str_field,
)

logger = logging.getLogger(__name__)


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


def load_pararel(root: Path, relations: Sequence[str] | None) -> RawSet:
    available = pararel_relations(root)
    if not available:
        raise DataError(f"no relation files (*.jsonl) in {root / 'graphs_json'}")
    facts_dir = root / "trex_lms_vocab"
    if not facts_dir.is_dir():
        raise DataError(f"not a ParaRel directory: {facts_dir} is missing")
    wanted = check_relations(relations, available, f"pararel:{root}")
    explicit = relations is not None
    skipped: Counter[str] = Counter()
    facts: list[RawFact] = []
    for rel in wanted:
        graph_file = root / "graphs_json" / f"{rel}.jsonl"
        templates: list[str] = []
        for lineno, obj in read_jsonl_objects(graph_file):
            pattern = obj.get("pattern")
            if not isinstance(pattern, str):
                raise DataError(f"{graph_file}:{lineno}: missing string key 'pattern'")
            try:
                templates.append(check_template(pattern))
            except TemplateRejected as e:
                skipped[e.reason] += 1
                logger.debug("%s:%d: dropped pattern %r (%s)", graph_file, lineno, pattern, e)
        templates = dedupe_templates(templates, skipped)
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
        for lineno, obj in read_jsonl_objects(fact_file):
            where = f"{fact_file}:{lineno}"
            sub = str_field(obj, "sub_label", where)
            obj_label = str_field(obj, "obj_label", where)
            uuid = str_field(obj, "uuid", where)
            assert sub is not None and obj_label is not None and uuid is not None
            if uuid in seen_uuids:
                raise DataError(
                    f"{where}: duplicate uuid {uuid!r} (first at line {seen_uuids[uuid]})"
                )
            seen_uuids[uuid] = lineno
            facts.append(RawFact(f"{rel}:{uuid}", rel, sub, obj_label, list(templates)))
    return RawSet(facts, f"pararel:{root}", available, skipped)
