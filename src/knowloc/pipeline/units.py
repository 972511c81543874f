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

``compute`` is a pure function of the model and the payload (a module-level function), so
an :class:`Executor` may run it anywhere: :class:`LocalExecutor` (default) runs the units in
order in this process; a distributed executor runs them on workers that hold their own model.
Results come back to the driver, which alone writes them.

Per-worker state (``setup``). A stage whose units share something costly to build (the
modification stage's unedited predictions and ΔPPL baselines) gives ``setup``, as Ray Data's
actor classes do with their ``__init__``: ``setup(model)`` returns the worker's state, and
``compute(state, payload)`` then gets that state instead of the model. The contract:

* an executor calls ``setup`` once per worker per :meth:`Executor.run` call (so once per
  stage call and worker), on that worker, before the worker's first unit of the call, and
  never when it has no unit to compute; the state never leaves the worker and is dropped
  when the call ends (the next stage call builds a new one);
* the state may only memoize: the tables of a unit must be the same bytes whichever units
  ran before it on the same worker, and in whatever order (a cache is filled by what it is
  asked, and each value it returns is computed as if it had been asked first);
* without ``setup``, ``compute(model, payload)`` gets the model itself.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..errors import RunError, RunIncompleteError
from ..store import RunStore, atomic_write_text

log = logging.getLogger(__name__)

Tables = dict[str, pd.DataFrame]
#: ``compute(model or state, payload) -> tables``: one unit's work (see the module docstring).
Compute = Callable[[Any, Any], Tables]
#: ``setup(model) -> state``: a worker's state for one stage call (see the module docstring).
Setup = Callable[[Any], Any]


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
    """Runs ``compute`` for each payload and yields ``(index, tables)`` as results arrive (in
    any order); it never writes anything.

    Without ``setup``, each unit is ``compute(model, payload)``. With it, each worker builds
    its state ``setup(model)`` once per call (before its first unit; not at all without
    units) and each unit is ``compute(state, payload)``; the state is dropped when the call
    ends (the contract is in the module docstring). :func:`run_units` passes ``setup`` only
    to stages that have one, so an executor written for stages without state may leave the
    argument out.
    """

    def run(self, compute: Compute, model: Any, payloads: Sequence[Any], *,
            setup: Setup | None = None) -> Iterator[tuple[int, Tables]]: ...


class LocalExecutor:
    """In this process, one unit after the other, in order (this process is the one worker:
    ``setup`` runs once per call, before the first unit)."""

    def run(self, compute: Compute, model: Any, payloads: Sequence[Any], *,
            setup: Setup | None = None) -> Iterator[tuple[int, Tables]]:
        state: Any = model
        for i, payload in enumerate(payloads):
            if i == 0 and setup is not None:
                state = setup(model)
            yield i, compute(state, payload)


class UnitError(RuntimeError):
    """A compute function broke the unit contract (a bug, not a user error)."""


class WorkersLost(RunError):
    """An executor has no worker left and cannot get one (the nodes of a Ray cluster died):
    the units not computed yet cannot be. :func:`run_units` adds what was saved and how to
    resume."""


#: The command-line options of the Ray executor (dropped from a command resumed locally).
RAY_OPTIONS = ("--executor", "--ray-address", "--workers", "--gpus-per-worker",
               "--threads-per-worker")


def cli_command(argv: Sequence[str] | None = None) -> list[str] | None:
    """This process's command line as ``["knowloc", ...]`` when it is the ``knowloc``
    command (the console script, ``python -m knowloc`` or ``python -m knowloc.cli``),
    else None (the Python API, a test)."""
    argv = list(sys.argv if argv is None else argv)
    if not argv or len(argv) < 2:
        return None
    path = Path(argv[0])
    parts = path.parts[-2:]
    if path.stem == "knowloc" or parts in (("knowloc", "__main__.py"), ("cli", "__main__.py")):
        return ["knowloc", *argv[1:]]
    return None


def local_command(command: Sequence[str]) -> list[str]:
    """``command`` without its Ray executor options, with ``--executor local``."""
    out: list[str] = []
    skip = False
    for arg in command:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in RAY_OPTIONS:
            skip = "=" not in arg
            continue
        out.append(arg)
    return [*out, "--executor", "local"]


def resume_hint(argv: Sequence[str] | None = None) -> str:
    """How to finish a run whose executor lost its workers: the same command on this machine
    (``--executor local``) or on a cluster with live nodes (it resumes)."""
    command = cli_command(argv)
    if command is None:
        return ("rerun the same command to resume it, on this machine (`--executor local`, "
                "or executor=LocalExecutor()) or once the Ray cluster has live nodes")
    return (f"resume on this machine with `{shlex.join(local_command(command))}`, or rerun "
            f"`{shlex.join(command)}` once the Ray cluster has live nodes")


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
    setup: Setup | None = None,
) -> UnitStats:
    """Compute the units not done yet, write their parts, consolidate the named tables.

    ``marker`` is the table whose part marks a unit as done (with ``resume=False`` every unit
    is computed again and its parts replaced). ``consolidate`` maps a table to the columns
    its consolidated file is stably sorted by (``None``: part order). The keys of ``units``
    become the current keys of the marker and of the consolidated tables, which then hold
    exactly these units' rows. ``model`` is only handed to the executor. ``summary``: log
    the stage's one summary line (:func:`summary_line`; a stage that calls this several
    times logs its own). ``setup``: the stage's per-worker state (module docstring).

    When the executor loses every worker for good (:class:`WorkersLost`, e.g. a Ray cluster
    whose nodes died), the units finished so far are written and the error says how many,
    and how to resume.
    """
    t0 = time.time()
    groups: dict[str, list[Unit]] = {}
    for u in units:
        groups.setdefault(u.key, []).append(u)
    with store.lock():
        for table in {marker, *(consolidate or {})}:
            store.set_current(table, list(groups))
        record_plan(store, marker, units)
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
                 executor or LocalExecutor(), desc, unit_name, progress, setup)
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
           f"finish it with `{finish_command(store, stage)}` (it resumes)")
    if not allow_partial:
        raise RunIncompleteError(f"{msg}, or pass --allow-partial to use the "
                                 f"{n_all - n_missing} finished ones")
    log.warning("%s; using the %d finished ones (allow_partial)", msg, n_all - n_missing)


def finish_command(store: RunStore, stage: str, default: str | None = None) -> str:
    """The last recorded command line that ran ``stage`` (or reproduce) on the run; without
    one, ``default`` (or a ``knowloc <stage> ... --out RUN`` template)."""
    runs = store.read_env()["runs"]
    for env in reversed(runs):
        argv = env.get("argv") or []
        if env.get("command") in (stage, "reproduce") and len(argv) > 1:
            return "knowloc " + " ".join(str(a) for a in argv[1:])
    return default or f"knowloc {stage} ... --out {store.root}"


def _run(todo: Sequence[Unit], compute: Compute, store: RunStore, model: Any, marker: str,
         executor: Executor, desc: str, unit_name: str, progress: bool,
         setup: Setup | None) -> None:
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

    payloads = [u.payload for u in todo]
    # setup only where the stage has one: executors written for stateless stages keep working
    results_of = (executor.run(compute, model, payloads) if setup is None
                  else executor.run(compute, model, payloads, setup=setup))
    written = 0
    try:
        show_next()
        for i, tables in results_of:
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
                written += len(group)
    except WorkersLost as exc:
        left = len(todo) - written
        raise WorkersLost(f"{desc}: {exc}; {left} of {len(todo)} {plural(unit_name)} were "
                          f"not computed, the {written} finished ones are saved in "
                          f"{store.root}; {resume_hint()}") from exc
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


#: Per table, the method of each current unit (``knowloc status`` counts units by method).
PLAN_FILE = ".plan.json"


def record_plan(store: RunStore, marker: str, units: Sequence[Unit]) -> None:
    """Record the method of each unit (from its ``ident``, when it names one) beside the
    marker table's parts, so that ``knowloc status`` counts planned units by method."""
    methods = {u.key: str(u.ident["method"]) for u in units
               if u.ident is not None and "method" in u.ident}
    if not methods:
        return
    path = store.root / "parts" / marker / PLAN_FILE
    text = json.dumps({"methods": dict(sorted(methods.items()))}) + "\n"
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    atomic_write_text(path, text, fsync=store.fsync)


def plan_groups(store: RunStore, marker: str) -> dict[str, str]:
    """The method of each unit of the marker table's current plan (:func:`record_plan`);
    empty when the stage's units name no method."""
    path = store.root / "parts" / marker / PLAN_FILE
    if not path.exists():
        return {}
    try:
        return {str(k): str(v) for k, v in
                json.loads(path.read_text(encoding="utf-8")).get("methods", {}).items()}
    except (json.JSONDecodeError, AttributeError):
        return {}
