"""What every source is read into before selection: raw facts (a fact with all its usable
templates), the JSONL line reader, string fields and the check of requested relations."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from knowloc.errors import ConfigError, DataError

from .facts import SKIP_TEMPLATE_DUP


@dataclass
class RawFact:
    """A fact as read from a source, with all its usable templates (before selection)."""

    fact_id: str
    relation: str
    subject: str
    object: str
    templates: list[str]


@dataclass
class RawSet:
    """Everything a source holds (before selection), with what was skipped while reading."""

    facts: list[RawFact]
    source: str
    available: list[str]  # relations the source offers (for error messages)
    skipped: Counter[str]
    labels: dict[str, str] = field(default_factory=dict)


def dedupe_templates(templates: Sequence[str], skipped: Counter[str]) -> list[str]:
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


def read_jsonl_objects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
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


def str_field(obj: dict[str, Any], key: str, where: str, *, required: bool = True) -> str | None:
    """A non-empty string field (stripped), or None when absent and not required."""
    if key not in obj or obj[key] is None:
        if required:
            raise DataError(f"{where}: missing key {key!r}")
        return None
    val = obj[key]
    if not isinstance(val, str) or not val.strip():
        raise DataError(f"{where}: {key!r} must be a non-empty string, got {val!r}")
    return val.strip()


def check_relations(
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
