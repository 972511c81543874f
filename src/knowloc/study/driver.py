"""One driver for every stage: ``knowloc reproduce``, each CLI stage command and the Python
API run their stages through :func:`run_stages`.

The driver records, beside ``config.yaml`` (each stage's configuration, written through
the :class:`~knowloc.study.spec.RunSpec`), a journal ``stages.json`` of what each stage
did when it last ran (when it finished, seconds, units computed / already done, and what it
noted, such as the facts screening removed) and the timings of the last invocation; the
report and ``knowloc status`` read it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from ..errors import RunError
from ..report.stages import Shown
from ..store import RunStore, atomic_write_text, to_plain
from .stages import Context, Stage

log = logging.getLogger(__name__)

JOURNAL_FILE = "stages.json"


def read_journal(store: RunStore) -> dict[str, Any]:
    """The run's journal (``{"stages": {...}, "last": {...}}``; empty when absent)."""
    path = store.root / JOURNAL_FILE
    if not path.exists():
        return {"stages": {}, "last": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RunError(f"{path} is not valid JSON ({exc}); delete it (it is rewritten by the "
                       "next stage that runs)") from exc
    if not isinstance(data, dict):
        raise RunError(f"{path} does not hold a mapping; delete it")
    data.setdefault("stages", {})
    data.setdefault("last", {})
    return data


def write_journal(store: RunStore, journal: dict[str, Any]) -> None:
    text = json.dumps(to_plain(journal), indent=2, ensure_ascii=False, allow_nan=True) + "\n"
    atomic_write_text(store.root / JOURNAL_FILE, text, fsync=store.fsync)


def note_stage(store: RunStore, name: str, **entry: Any) -> None:
    """Record (merge) ``entry`` as what stage ``name`` did in the journal."""
    journal = read_journal(store)
    journal["stages"][name] = {**journal["stages"].get(name, {}), **to_plain(entry)}
    write_journal(store, journal)


def note_timings(store: RunStore, command: str, timings: dict[str, float]) -> None:
    """Record the timings of this invocation, step by step (the report's overview)."""
    journal = read_journal(store)
    journal["last"] = {"command": command, "timings": to_plain(timings)}
    write_journal(store, journal)


@contextmanager
def timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Add the seconds the block takes to ``timings[name]`` (rounded to 0.1 s)."""
    t = time.time()
    try:
        yield
    finally:
        timings[name] = round(time.time() - t, 1)


@dataclass
class StageRun:
    """What one stage did in :func:`run_stages`: its result and what it presented."""

    stage: Stage
    result: Any
    shown: Shown | None
    seconds: float


def run_stages(stages: Sequence[Stage], ctx: Context, *, present: bool = True,
               timings: dict[str, float] | None = None,
               labels: dict[str, str] | None = None) -> dict[str, StageRun]:
    """Run ``stages`` in order on ``ctx``'s run; return each one's :class:`StageRun`.

    Each stage's configuration goes into the run's ``config.yaml`` (through the spec) before
    it runs, and what it did into the journal once it finished. With ``present`` each
    stage writes its tables and figures right after it ran. ``timings`` collects seconds
    per stage, under ``labels[stage.name]`` when given.
    """
    out: dict[str, StageRun] = {}
    for stage in stages:
        if stage.needs_model and ctx.model is None:
            raise RunError(f"the {stage.name} stage needs a model")
        stage.record(ctx.spec)
        ctx.spec.write(ctx.store)
        t0 = time.time()
        result = stage.run(ctx)
        seconds = time.time() - t0
        if timings is not None:
            timings[(labels or {}).get(stage.name, stage.name)] = round(seconds, 1)
        notes = ctx.notes.get(stage.name, {})
        if stage.name == "modify" and "ppl" in notes:
            ctx.spec.modify_extra["ppl"] = notes["ppl"]
            ctx.spec.write(ctx.store)
        note_stage(ctx.store, stage.name,
                   finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   seconds=round(seconds, 1), computed=getattr(result, "computed", None),
                   skipped_done=getattr(result, "skipped_done", None), **notes)
        shown = stage.present(ctx.store, result) if present else None
        out[stage.name] = StageRun(stage, result, shown, seconds)
    return out
