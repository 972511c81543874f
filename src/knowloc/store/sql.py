"""The read-only DuckDB query sandbox over a run's tables (``knowloc query``).

Every table of the run is a view of the same name, read from its current parts (or its
consolidated file). Only queries run, and once the views exist the connection reads no
file outside the run directory and its configuration is locked.

DuckDB reads every file path given to ``read_parquet`` as a glob pattern (``*``, ``?``,
``[...]``). Run paths are literal, so their glob characters are escaped as one-character
classes (``[`` -> ``[[]``, ``*`` -> ``[*]``, ``?`` -> ``[?]``): a run called ``runs/r[1]``
reads its own files, never those of a sibling ``runs/r1``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import RunError
from .parts import PART_SUFFIX

if TYPE_CHECKING:
    import pandas as pd

    from .parts import PartsStore

__all__ = ["glob_literal", "query"]

_GLOB_CHARS = re.compile(r"[\[*?]")


def glob_literal(path: str) -> str:
    """A DuckDB glob pattern that matches exactly the file ``path``."""
    return _GLOB_CHARS.sub(lambda m: f"[{m.group(0)}]", path)


def sql_str(text: str) -> str:
    """A single-quoted SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def _refused(statement: Any) -> str | None:
    """The type of a statement that is not a query (None: a query). ``EXPLAIN`` is a query
    when what it explains is one (``EXPLAIN ANALYZE`` runs it)."""
    import duckdb

    if statement.type == duckdb.StatementType.SELECT:
        return None
    if statement.type != duckdb.StatementType.EXPLAIN:
        return str(statement.type.name)
    inner = re.fullmatch(r"\s*explain\s+(?:analy[sz]e\s+)?(.*)", statement.query,
                         flags=re.IGNORECASE | re.DOTALL)
    try:
        explained = duckdb.extract_statements(inner.group(1)) if inner else []
    except duckdb.Error:
        explained = []
    ok = len(explained) == 1 and _refused(explained[0]) is None
    return None if ok else "EXPLAIN"


def query(parts: PartsStore, sql: str) -> pd.DataFrame:
    """Run one read-only DuckDB statement in which every table of ``parts`` is a view of the
    same name.

    A table is read from its current parts (the source of truth) when it has any, otherwise
    from its consolidated ``<table>.parquet``. Tables whose units are all empty
    (no columns) have no view. Only queries run: ``SELECT`` (with ``WITH``, ``DESCRIBE``,
    ``SHOW``, ``SUMMARIZE``, ``FROM ...``) and ``EXPLAIN`` of one; anything else
    (``COPY``, ``ATTACH``, ``CREATE``, ``INSERT``, ``SET``, ``INSTALL`` ...) is a
    :class:`~knowloc.errors.RunError`. Once the views exist the connection reads no file
    outside the run directory and its configuration is locked.
    """
    import duckdb

    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise RunError(f"query failed: {exc}") from exc
    if len(statements) != 1:
        raise RunError(f"knowloc query runs one SQL statement (got {len(statements)})")
    kind = _refused(statements[0])
    if kind:
        raise RunError(f"knowloc query is read-only: {kind} statements are refused "
                       "(use SELECT, WITH, DESCRIBE, SHOW, SUMMARIZE or EXPLAIN)")
    root = parts.root
    con = duckdb.connect(database=":memory:")
    try:
        views: list[str] = []
        for name in parts.tables():
            files = sorted(str(p) for p in parts.current_files(name).values()
                           if p.suffix == PART_SUFFIX)
            consolidated = parts.consolidated_path(name)
            if files:
                source = "[" + ", ".join(sql_str(glob_literal(f)) for f in files) + "]"
                con.execute(f'CREATE VIEW "{name}" AS SELECT * FROM '
                            f"read_parquet({source}, union_by_name=true)")
            elif consolidated.exists() and parts.current_keys(name) is None:
                source = sql_str(glob_literal(str(consolidated)))
                con.execute(f'CREATE VIEW "{name}" AS SELECT * FROM read_parquet({source})')
            else:
                continue
            views.append(name)
        # DuckDB checks the pattern a view reads (escaped) and each file it matches (literal)
        roots = [f"{r}{os.sep}" for r in _unique((root.absolute(), root.resolve()))]
        allowed = list(dict.fromkeys([*roots, *map(glob_literal, roots)]))
        con.execute(f"SET allowed_directories = [{', '.join(map(sql_str, allowed))}]")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        try:
            return con.execute(sql).fetchdf()
        except duckdb.Error as exc:
            raise RunError(
                f"query failed: {exc}\n(tables in {root}: {', '.join(views) or 'none'})"
            ) from exc
    finally:
        con.close()


def _unique(paths: tuple[Path, ...]) -> list[str]:
    return list(dict.fromkeys(str(p) for p in paths))
