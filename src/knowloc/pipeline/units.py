"""The unit runner: every stage says what a unit is and how to compute it; this does the rest.

A stage hands :func:`run_units` a list of :class:`Unit` (a content-hash ``key``, a picklable
``payload`` and a ``label`` for the progress bar) and a ``compute(model, payload)`` function
that returns the unit's tables (``{table name: DataFrame}``). The runner owns:

* the current configuration: the keys of ``units`` become the current key list of the
  marker and of every consolidated table (:meth:`~knowloc.store.RunStore.set_current`), so
  the tables show exactly this call's units; parts of other settings stay as a cache;
* resume: a unit whose ``marker`` part exists and holds its rows is done and skipped (a
  part without the rows of the unit's ``ident``, e.g. a zero-row file, is computed again);
* units with the same key (the same content under several identities, such as two facts
  with the same prompt and answer): each is computed, and their tables share one part;
* exclusion: the run directory's lock is held while computing (a second process gets
  :class:`~knowloc.errors.RunBusyError`), and the torch thread count is checked against the
  run's (:meth:`~knowloc.store.RunStore.check_threads`);
* progress: one tqdm bar, the running unit's label in its postfix, and one summary line
  per call (``localizing: 24 querys ...`` logged at INFO with ``extra={"summary": True}``,
  which the command line prints even with ``-q``);
* writing: every table the compute returns becomes ``parts/<table>/<key>.parquet``, the
  marker table last (a unit is done only once all its tables are written);
* consolidation: ``<table>.parquet`` per table named in ``consolidate``, deterministically
  sorted.

``compute`` is a pure function of the model and the payload (a module-level function; at
most pure memoization, such as caches of unedited predictions), so an :class:`Executor` may
run it anywhere: :class:`LocalExecutor` (default) runs the units in order in this process; a
distributed executor runs them on workers that hold their own model. Results come back to
the driver, which alone writes them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..errors import RunIncompleteError
from ..store import RunStore

log = logging.getLogger(__name__)

Tables = dict[str, pd.DataFrame]
Compute = Callable[[Any, Any], Tables]


@dataclass(frozen=True)
class Unit:
    """One piece of work: ``key`` names its parts, ``payload`` is what ``compute`` needs.

    ``ident`` names the rows the unit's marker table must hold (column -> value, e.g. the
    fact and query id): a marker part without them does not count as done. None: any
    readable marker part with at least one row counts.
    """

    key: str
    payload: Any
    label: str = ""
    ident: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class UnitStats:
    """What one :func:`run_units` call did."""

    computed: int
    skipped_done: int
    seconds: float


class Executor(Protocol):
    """Runs ``compute(model, payload)`` for each payload and yields ``(index, tables)`` as
    results arrive (in any order); it never writes anything."""

    def run(self, compute: Compute, model: Any,
            payloads: Sequence[Any]) -> Iterator[tuple[int, Tables]]: ...


class LocalExecutor:
    """In this process, one unit after the other, in order."""

    def run(self, compute: Compute, model: Any,
            payloads: Sequence[Any]) -> Iterator[tuple[int, Tables]]:
        for i, payload in enumerate(payloads):
            yield i, compute(model, payload)


class UnitError(RuntimeError):
    """A compute function broke the unit contract (a bug, not a user error)."""


def run_units(
    units: Sequence[Unit],
    compute: Compute,
    store: RunStore,
    *,
    model: Any,
    marker: str,
    consolidate: Mapping[str, Sequence[str] | None] | None = None,
    executor: Executor | None = None,
    desc: str = "computing",
    unit_name: str = "unit",
    progress: bool = True,
    resume: bool = True,
    summary: bool = True,
) -> UnitStats:
    """Compute the units not done yet, write their parts, consolidate the named tables.

    ``marker`` is the table whose part marks a unit as done (with ``resume=False`` every unit
    is computed again and its parts replaced). ``consolidate`` maps a table to the columns
    its consolidated file is stably sorted by (``None``: part order). The keys of ``units``
    become the current keys of the marker and of the consolidated tables, which then hold
    exactly these units' rows. ``model`` is only handed to the executor. ``summary``: log
    the stage's one summary line (:func:`summary_line`; a stage that calls this several
    times logs its own).
    """
    t0 = time.time()
    groups: dict[str, list[Unit]] = {}
    for u in units:
        groups.setdefault(u.key, []).append(u)
    with store.lock():
        for table in {marker, *(consolidate or {})}:
            store.set_current(table, list(groups))
        done = store.done_keys(marker) if resume else set()
        todo = [k for k in groups if k not in done or not _holds(store, marker, groups[k])]
        n_done = len(units) - sum(len(groups[k]) for k in todo)
        if n_done and todo:
            log.info("%s: %d of %d %s already done; resuming", desc, n_done, len(units),
                     plural(unit_name))
        if todo:
            if model is not None:
                store.check_threads(torch.get_num_threads())
            _run([u for k in todo for u in groups[k]], compute, store, model, marker,
                 executor or LocalExecutor(), desc, unit_name, progress)
        for table, sort in (consolidate or {}).items():
            if store.done_keys(table):
                store.consolidate(table, sort_by=list(sort) if sort else None)
    stats = UnitStats(len(units) - n_done, n_done, time.time() - t0)
    if summary:
        log_summary(desc, unit_name, stats, len(units))
    return stats


def log_summary(desc: str, unit_name: str, stats: UnitStats, n_units: int) -> None:
    """Log a stage's summary line, which the CLI shows even with ``-q``."""
    log.info("%s", summary_line(desc, unit_name, stats, n_units), extra={"summary": True})


def summary_line(desc: str, unit_name: str, stats: UnitStats, n_units: int) -> str:
    """``localizing: 24 queries, 20 computed, 4 already done, 31.2 s``."""
    noun = unit_name if n_units == 1 else plural(unit_name)
    return (f"{desc}: {n_units} {noun}, {stats.computed} computed, {stats.skipped_done} "
            f"already done, {stats.seconds:.1f} s")


def plural(noun: str) -> str:
    """``query`` -> ``queries``, ``fact`` -> ``facts``."""
    return noun[:-1] + "ies" if noun.endswith("y") and noun[-2:-1] not in "aeiou" else noun + "s"


def short_label(text: str, width: int) -> str:
    """The start of ``text`` in at most ``width`` characters, cut on the right with "…"."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


def _holds(store: RunStore, marker: str, group: Sequence[Unit]) -> bool:
    """Whether the marker part of ``group``'s key holds the rows of every unit in it (and
    of no other identity)."""
    idents = [u.ident for u in group]
    key = group[0].key
    if any(i is None for i in idents):
        try:
            return len(store.get(marker, key)) > 0
        except KeyError:
            return False
    cols = list(idents[0])  # type: ignore[arg-type]
    try:
        part = store.get(marker, key)
    except KeyError:
        return False
    if any(c not in part.columns for c in cols):
        return False
    have = {tuple(str(v) for v in row) for row in part[cols].itertuples(index=False)}
    want = {tuple(str(i[c]) for c in cols) for i in idents}  # type: ignore[index]
    return have == want


def missing_units(store: RunStore, table: str) -> tuple[int, int]:
    """(units of ``table``'s current configuration without a part, all of its units);
    (0, 0) when the table has no current key list."""
    current = store.current_keys(table)
    if current is None:
        return 0, 0
    return len(current - store.done_keys(table)), len(current)


def require_complete(store: RunStore, table: str, *, stage: str, allow_partial: bool) -> None:
    """Raise :class:`~knowloc.errors.RunIncompleteError` when units of ``table``'s current
    configuration are missing (a run stopped before the end), naming how many and the
    command that finishes it; with ``allow_partial`` only warn."""
    n_missing, n_all = missing_units(store, table)
    if not n_missing:
        return
    msg = (f"run {store.root} is incomplete: {n_missing} of {n_all} {stage} units are missing; "
           f"finish it with `{_finish_command(store, stage)}` (it resumes)")
    if not allow_partial:
        raise RunIncompleteError(f"{msg}, or pass --allow-partial to use the "
                                 f"{n_all - n_missing} finished ones")
    log.warning("%s; using the %d finished ones (allow_partial)", msg, n_all - n_missing)


def _finish_command(store: RunStore, stage: str) -> str:
    """The last recorded command line that ran ``stage`` (or reproduce) on the run."""
    runs = store.read_env()["runs"]
    for env in reversed(runs):
        argv = env.get("argv") or []
        if env.get("command") in (stage, "reproduce") and len(argv) > 1:
            return "knowloc " + " ".join(str(a) for a in argv[1:])
    return f"knowloc {stage} ... --out {store.root}"


def _run(todo: Sequence[Unit], compute: Compute, store: RunStore, model: Any, marker: str,
         executor: Executor, desc: str, unit_name: str, progress: bool) -> None:
    bar = tqdm(total=len(todo), desc=desc, unit=unit_name, disable=not progress)
    finished = [False] * len(todo)
    members: dict[str, list[int]] = {}
    for i, u in enumerate(todo):
        members.setdefault(u.key, []).append(i)
    results: dict[int, Tables] = {}
    nxt = 0

    def show_next() -> None:
        nonlocal nxt
        while nxt < len(todo) and finished[nxt]:
            nxt += 1
        if nxt < len(todo) and todo[nxt].label:
            bar.set_postfix_str(todo[nxt].label)

    try:
        show_next()
        for i, tables in executor.run(compute, model, [u.payload for u in todo]):
            unit = todo[i]
            if marker not in tables:
                raise UnitError(f"{desc}: unit {unit.key} returned no {marker!r} table "
                                f"(got {sorted(tables)})")
            results[i] = tables
            finished[i] = True
            bar.update(1)
            show_next()
            group = members[unit.key]
            if all(j in results for j in group):
                _write(store, unit.key, marker, [results.pop(j) for j in group])
    finally:
        bar.close()


def _write(store: RunStore, key: str, marker: str, results: Sequence[Tables]) -> None:
    """Write one key's parts: the tables of the units sharing it, concatenated in unit
    order; the marker last (the completion marker)."""
    names = [n for n in dict.fromkeys(n for r in results for n in r) if n != marker]
    for name in [*names, marker]:
        frames = [r[name] for r in results if name in r]
        frame = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
        store.put(name, key, frame)
