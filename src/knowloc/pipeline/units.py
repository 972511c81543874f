"""The unit runner: every stage says what a unit is and how to compute it; this does the rest.

A stage hands :func:`run_units` a list of :class:`Unit` (a content-hash ``key``, a picklable
``payload`` and a ``label`` for the progress bar) and a ``compute(model, payload)`` function
that returns the unit's tables (``{table name: DataFrame}``). The runner owns:

* resume: a unit whose ``marker`` part exists is done and skipped;
* progress: one tqdm bar, the running unit's label in its postfix;
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
from tqdm.auto import tqdm

from ..store import RunStore

log = logging.getLogger(__name__)

Tables = dict[str, pd.DataFrame]
Compute = Callable[[Any, Any], Tables]


@dataclass(frozen=True)
class Unit:
    """One piece of work: ``key`` names its parts, ``payload`` is what ``compute`` needs."""

    key: str
    payload: Any
    label: str = ""


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
) -> UnitStats:
    """Compute the units not done yet, write their parts, consolidate the named tables.

    ``marker`` is the table whose part marks a unit as done (with ``resume=False`` every unit
    is computed again and its parts replaced). ``consolidate`` maps a table to the columns
    its consolidated file is stably sorted by (``None``: part order); a table is consolidated
    when it has parts. ``model`` is only handed to the executor.
    """
    t0 = time.time()
    done = store.done_keys(marker) if resume else set()
    todo = [u for u in units if u.key not in done]
    n_done = len(units) - len(todo)
    if n_done and todo:
        log.info("%s: %d of %d %ss already done; resuming", desc, n_done, len(units), unit_name)
    if todo:
        _run(todo, compute, store, model, marker, executor or LocalExecutor(), desc, unit_name,
             progress)
    for table, sort in (consolidate or {}).items():
        if store.done_keys(table):
            store.consolidate(table, sort_by=list(sort) if sort else None)
    return UnitStats(len(todo), n_done, time.time() - t0)


def _run(todo: Sequence[Unit], compute: Compute, store: RunStore, model: Any, marker: str,
         executor: Executor, desc: str, unit_name: str, progress: bool) -> None:
    bar = tqdm(total=len(todo), desc=desc, unit=unit_name, disable=not progress)
    finished = [False] * len(todo)
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
            for name, frame in tables.items():
                if name != marker:
                    store.put(name, unit.key, frame)
            store.put(marker, unit.key, tables[marker])  # the completion marker: written last
            finished[i] = True
            bar.update(1)
            show_next()
    finally:
        bar.close()
