"""The keyed parts store: one Parquet file per finished work unit, and their tables.

Layout under a run directory::

    parts/<table>/<key>.parquet one finished work unit (``put``)
    parts/<table>/<key>.empty   a finished work unit whose DataFrame has no columns
    parts/<table>/.current.json the keys of the table's current configuration (``set_current``)
    <table>.parquet             the current parts of a table, consolidated (``consolidate``)

A *work unit* is identified by a key, normally :func:`~knowloc.store.io.content_hash` of
everything that determines its result (model, adapter, prompt, target, method config). A
unit is written with the one atomic write, so a unit file either exists complete or not at
all: a run killed at any point resumes by skipping ``done_keys(table)``, and nothing is
computed twice. Writing a key again replaces it.

Parts are the source of truth; ``<table>.parquet`` is a derived, deterministic
(byte-identical for identical content) snapshot for sharing and fast loading. A table that
has a current key list (written by the unit runner for each stage's configuration) shows
only those parts; parts of earlier configurations stay as a cache, so switching back to a
configuration recomputes nothing.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import RunError
from .io import TMP_SUFFIX, atomic_write, atomic_write_bytes, atomic_write_text

__all__ = ["CURRENT_FILE", "PARQUET_OPTIONS", "PARTS_DIR", "PartsStore"]

logger = logging.getLogger(__name__)

PARTS_DIR = "parts"
CURRENT_FILE = ".current.json"
PART_SUFFIX = ".parquet"
EMPTY_SUFFIX = ".empty"

#: Fixed Parquet writer options: identical content gives identical bytes.
PARQUET_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 3,
    "version": "2.6",
    "data_page_version": "1.0",
    "use_dictionary": True,
    "write_statistics": True,
    "row_group_size": 1 << 20,
}

TABLE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=+-]{0,199}$")


def frame_to_arrow(df: pd.DataFrame) -> pa.Table:
    """Arrow table of ``df`` without index metadata; a *named* index is kept as columns."""
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"expected a pandas DataFrame, got {type(df).__name__}")
    if any(name is not None for name in df.index.names):
        df = df.reset_index()
    if not df.columns.is_unique:
        raise ValueError(f"DataFrame has duplicate column names: {list(df.columns)}")
    if any(not isinstance(c, str) for c in df.columns):
        df = df.rename(columns=str)
    return pa.Table.from_pandas(df, preserve_index=False)


def write_parquet(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` with the fixed options (not atomic: give it the temporary
    path of :func:`~knowloc.store.io.atomic_write`); columns of float lists (attribution maps)
    are written without a dictionary, which would make their files half as large again."""
    options = dict(PARQUET_OPTIONS)
    floats = {f.name for f in table.schema
              if pa.types.is_list(f.type) and pa.types.is_floating(f.type.value_type)}
    if floats:
        options["use_dictionary"] = [
            f"{f.name}.list.element" if pa.types.is_list(f.type) else f.name
            for f in table.schema if f.name not in floats]
    pq.write_table(table, path, **options)


def concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate parts; zero-row parts contribute columns but never change dtypes."""
    if not frames:
        return pd.DataFrame()
    columns: list[str] = []
    seen: set[str] = set()
    for frame in frames:
        for col in frame.columns:
            if col not in seen:
                seen.add(col)
                columns.append(col)
    nonempty = [f for f in frames if len(f)]
    if not nonempty:
        out = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
        return out.reindex(columns=columns).reset_index(drop=True)
    out = pd.concat(nonempty, ignore_index=True) if len(nonempty) > 1 else nonempty[0]
    if list(out.columns) != columns:
        out = out.reindex(columns=columns)
    return out.reset_index(drop=True)


class PartsStore:
    """The keyed result tables of one run directory ``root`` (see the module docstring).

    Args:
        root: the run directory; it must exist.
        fsync: flush every file to disk before it is moved into place.
    """

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = root
        self.fsync = fsync

    # ---------------------------------------------------------------- names
    def _table_dir(self, table: str) -> Path:
        if not isinstance(table, str) or not TABLE_RE.match(table):
            raise ValueError(
                f"invalid table name {table!r}: use letters, digits and '_' (a SQL identifier)"
            )
        return self.root / PARTS_DIR / table

    @staticmethod
    def _check_key(key: str) -> str:
        if not isinstance(key, str) or not KEY_RE.match(key) or key.endswith(TMP_SUFFIX):
            raise ValueError(
                f"invalid work-unit key {key!r}: use 1-200 characters from [A-Za-z0-9_.=+-], "
                "starting with a letter or digit (e.g. a content_hash)"
            )
        return key

    def consolidated_path(self, table: str) -> Path:
        """``<root>/<table>.parquet``, the consolidated file of ``table``."""
        self._table_dir(table)  # checks the name
        return self.root / f"{table}{PART_SUFFIX}"

    # ---------------------------------------------------------------- listing
    def tables(self) -> list[str]:
        """Names of tables with parts or a consolidated file, sorted."""
        names: set[str] = set()
        parts = self.root / PARTS_DIR
        if parts.is_dir():
            names.update(p.name for p in parts.iterdir() if p.is_dir() and TABLE_RE.match(p.name))
        names.update(
            p.stem for p in self.root.glob(f"*{PART_SUFFIX}") if TABLE_RE.match(p.stem)
        )
        return sorted(names)

    def _unit_files(self, table: str) -> dict[str, Path]:
        """key -> file of every finished unit (``.parquet`` wins over ``.empty``)."""
        tdir = self._table_dir(table)
        units: dict[str, Path] = {}
        if not tdir.is_dir():
            return units
        for entry in os.scandir(tdir):
            name = entry.name
            if name.startswith(".") or name.endswith(TMP_SUFFIX) or not entry.is_file():
                continue
            if name.endswith(PART_SUFFIX):
                units[name[: -len(PART_SUFFIX)]] = Path(entry.path)
            elif name.endswith(EMPTY_SUFFIX):
                units.setdefault(name[: -len(EMPTY_SUFFIX)], Path(entry.path))
        return units

    def done_keys(self, table: str) -> set[str]:
        """Keys of the finished work units of ``table`` (empty set if none)."""
        return set(self._unit_files(table))

    def has(self, table: str, key: str) -> bool:
        """Whether the unit ``key`` of ``table`` is finished."""
        self._check_key(key)
        tdir = self._table_dir(table)
        return (tdir / f"{key}{PART_SUFFIX}").exists() or (tdir / f"{key}{EMPTY_SUFFIX}").exists()

    # ---------------------------------------------------------------- current keys
    def set_current(self, table: str, keys: Sequence[str]) -> None:
        """Record ``keys`` as the units of ``table``'s current configuration: from now on
        :meth:`table`, :meth:`consolidate` and the query views show only their parts (the
        others stay on disk as a cache)."""
        tdir = self._table_dir(table)
        tdir.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"keys": sorted({self._check_key(k) for k in keys})}) + "\n"
        path = tdir / CURRENT_FILE
        if path.exists() and path.read_text(encoding="utf-8") == text:
            return  # a rerun of the same configuration leaves the directory untouched
        atomic_write_text(path, text, fsync=self.fsync)

    def current_keys(self, table: str) -> set[str] | None:
        """The keys of ``table``'s current configuration; None when it has no key list
        (then every part is current)."""
        path = self._table_dir(table) / CURRENT_FILE
        if not path.exists():
            return None
        try:
            keys = json.loads(path.read_text(encoding="utf-8"))["keys"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise RunError(f"{path} is not a key list ({exc}); delete it and rerun the stage "
                           f"that writes {table}") from exc
        return {str(k) for k in keys}

    def retire(self, table: str) -> None:
        """Make ``table`` show nothing (its configuration is stale): an empty current key
        list, and no consolidated file. Its parts stay as a cache."""
        self.set_current(table, [])
        self.consolidated_path(table).unlink(missing_ok=True)

    def current_files(self, table: str) -> dict[str, Path]:
        """key -> file (``.parquet`` or ``.empty``) of the current finished units of ``table``."""
        units = self._unit_files(table)
        current = self.current_keys(table)
        if current is None:
            return units
        return {k: p for k, p in units.items() if k in current}

    # ---------------------------------------------------------------- units
    def put(self, table: str, key: str, df: pd.DataFrame) -> None:
        """Record ONE finished work unit, atomically; writing the same key again replaces it.

        A DataFrame with rows or columns becomes ``parts/<table>/<key>.parquet`` (a
        zero-row frame keeps its schema); a frame without columns is recorded as a
        ``<key>.empty`` marker, so it still counts as done.
        """
        if not isinstance(df, pd.DataFrame):
            raise TypeError(f"put() needs a pandas DataFrame, got {type(df).__name__}")
        self._check_key(key)
        tdir = self._table_dir(table)
        tdir.mkdir(parents=True, exist_ok=True)
        part = tdir / f"{key}{PART_SUFFIX}"
        marker = tdir / f"{key}{EMPTY_SUFFIX}"
        if len(df.columns) == 0 and not any(n is not None for n in df.index.names):
            atomic_write_bytes(marker, b"", fsync=self.fsync)
            part.unlink(missing_ok=True)
        else:
            arrow = frame_to_arrow(df)
            atomic_write(part, lambda p: write_parquet(arrow, p), fsync=self.fsync)
            marker.unlink(missing_ok=True)
        logger.debug("stored %s/%s (%d rows)", table, key, len(df))

    def get(self, table: str, key: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """The DataFrame stored for one unit (only ``columns`` when given); KeyError if it is
        not done, RunError if its file is unreadable or lacks one of ``columns``."""
        self._check_key(key)
        tdir = self._table_dir(table)
        part = tdir / f"{key}{PART_SUFFIX}"
        if part.exists():
            try:
                return pq.read_table(part, columns=list(columns) if columns else None).to_pandas()
            except (OSError, pa.ArrowException) as exc:
                raise RunError(f"unit file {part} is unreadable ({exc}); delete it and rerun "
                               "to recompute it") from exc
        if (tdir / f"{key}{EMPTY_SUFFIX}").exists():
            return pd.DataFrame()
        raise KeyError(f"{table}/{key}")

    def table(self, table: str, *, with_key: bool = False) -> pd.DataFrame:
        """The current parts of ``table`` concatenated: ordered by key, then by row within a
        part (all parts when the table has no current key list, see :meth:`set_current`).

        Returns an empty DataFrame if there are no parts. With ``with_key`` a ``_key``
        column tells which unit each row came from. If the table has no parts but a
        consolidated ``<table>.parquet`` exists, that file is returned.
        """
        units = self.current_files(table)
        if not units:
            consolidated = self.consolidated_path(table)
            if consolidated.exists() and self.current_keys(table) is None:
                return pq.read_table(consolidated).to_pandas()
            return pd.DataFrame()
        frames: list[pd.DataFrame] = []
        for key in sorted(units):
            path = units[key]
            if path.suffix != PART_SUFFIX:
                continue
            try:
                frame = pq.read_table(path).to_pandas()
            except (OSError, pa.ArrowException) as exc:
                raise RunError(
                    f"unit file {path} is unreadable ({exc}); delete it and rerun to recompute it"
                ) from exc
            if with_key:
                frame.insert(0, "_key", pd.Series([key] * len(frame), dtype=object))
            frames.append(frame)
        return concat(frames)

    def consolidate(self, table: str, sort_by: list[str] | None = None) -> Path:
        """Write ``<root>/<table>.parquet`` from the current parts, atomically and
        deterministically.

        Rows are in :meth:`table` order, or stably sorted by ``sort_by``. Identical
        content gives a byte-identical file (fixed writer options, no index metadata).
        """
        df = self.table(table)
        if sort_by:
            missing = [c for c in sort_by if c not in df.columns]
            if missing:
                raise ValueError(f"cannot sort {table} by missing columns {missing}")
            df = df.sort_values(list(sort_by), kind="mergesort", ignore_index=True)
        else:
            df = df.reset_index(drop=True)
        out = self.consolidated_path(table)
        arrow = frame_to_arrow(df)
        atomic_write(out, lambda p: write_parquet(arrow, p), fsync=self.fsync)
        logger.info("consolidated %s: %d rows -> %s", table, len(df), out)
        return out
