"""``knowloc status``: what a run directory holds and how far it is, read only.

It reads ``config.yaml``, the journal, each stage's current unit list and finished parts,
the run lock's holder record and the end of ``knowloc.log``; it writes nothing, takes no
lock and works while another process is computing in the run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..pipeline.units import finish_command, plan_groups
from ..store import RunStore
from .driver import read_journal
from .spec import RunSpec, read_spec
from .stages import stages_of

LOG_FILE = "knowloc.log"


def describe_configuration(spec: RunSpec) -> str:
    """The run's configuration in one paragraph."""
    model = spec.model_info
    parts = [f"Model {model.get('name')}"
             + (f" ({model.get('adapter')}, {model.get('n_layers')} layers x "
                f"{model.get('d_mlp')} neurons, {model.get('dtype')})" if "adapter" in model
                else "")
             + f" on {spec.model.get('device')}."]
    ds = spec.dataset
    if ds:
        rel = ds.get("relations")
        parts.append(f"Dataset {ds.get('source')}: {ds.get('n_facts')} facts, "
                     f"{ds.get('n_queries')} queries"
                     + (f" of {len(rel)} relations" if isinstance(rel, list) else "") + ".")
    if spec.preset:
        parts.append(f"Preset {spec.preset.get('name')}.")
    if spec.localize is not None:
        loc = spec.localize
        parts.append(f"Localization: {', '.join(loc.methods)}, {loc.n_steps} steps, target "
                     f"{loc.target}, knowledge neurons {loc.selection.mode} > "
                     f"{loc.selection.value}" + (", full maps kept" if loc.keep_maps else "")
                     + ".")
    if spec.consistency is not None:
        parts.append(f"Consistency: population {spec.consistency.population}, static "
                     f"threshold {spec.consistency.static_threshold} and Otsu.")
    if spec.modify is not None:
        m = spec.modify
        parts.append(f"Modification: {', '.join(m.ops)} of {', '.join(m.sets)} sets, split at "
                     f"{m.split_threshold}.")
    if spec.intervene is not None:
        parts.append(f"Query-KN mapping: split at {spec.intervene.split_threshold}.")
    if spec.attention is not None:
        parts.append(f"Attention: alpha {spec.attention.alpha}, split at "
                     f"{spec.attention.split_threshold}.")
    parts.append(f"Seed {spec.seed}.")
    return " ".join(parts)


def run_status(run: str | Path | RunStore, *, log_lines: int = 10) -> dict[str, Any]:
    """What the run holds, as a JSON-able mapping: ``run``, ``configuration`` (a
    paragraph), ``stages`` (per stage: present, planned and done units, by method where
    the units have one, complete, the command that finishes it), ``holder`` (the process
    computing in it: pid, host, since, command; None when none), ``log`` (the last lines of
    ``knowloc.log``)."""
    store = run if isinstance(run, RunStore) else RunStore(run, create=False)
    spec = read_spec(store)
    journal = read_journal(store)
    stages = []
    for stage in stages_of(spec):
        planned = store.current_keys(stage.marker)
        done_all = store.done_keys(stage.marker)
        entry: dict[str, Any] = {"stage": stage.name, "title": stage.title,
                                 "present": planned is not None or bool(done_all)}
        if planned is None:
            planned = done_all
        done = planned & done_all
        entry.update(planned=len(planned), done=len(done),
                     complete=bool(planned) and len(done) == len(planned))
        groups = plan_groups(store, stage.marker)
        if groups:
            by: dict[str, dict[str, int]] = {}
            for key in planned:
                g = by.setdefault(str(groups.get(key, "?")), {"planned": 0, "done": 0})
                g["planned"] += 1
                g["done"] += key in done
            entry["by_method"] = dict(sorted(by.items()))
        noted = journal["stages"].get(stage.name)
        if noted:
            entry["last_run"] = {k: noted.get(k) for k in ("finished", "seconds", "computed",
                                                            "skipped_done")}
        if entry["present"] and not entry["complete"]:
            entry["finish"] = finish_command(store, stage.name, stage.command(store.root))
        elif not entry["present"]:
            entry["add"] = stage.command(store.root)
        stages.append(entry)
    log_path = store.root / LOG_FILE
    tail: list[str] = []
    if log_path.exists():
        with open(log_path, encoding="utf-8", errors="replace") as fh:
            tail = [line.rstrip("\n") for line in fh.readlines()[-log_lines:]]
    return {"run": str(store.root), "configuration": describe_configuration(spec),
            "stages": stages, "holder": store.holder(), "log": tail}


def format_status(status: dict[str, Any]) -> str:
    """The status as text for a terminal."""
    lines = [f"run {status['run']}", "", status["configuration"], ""]
    holder = status["holder"]
    if holder:
        lines.append(f"in progress: pid {holder.get('pid')} on {holder.get('host')} since "
                     f"{holder.get('since')}" + (f" ({' '.join(holder['command'])})"
                                                 if holder.get("command") else ""))
    else:
        lines.append("no process is computing in this run")
    lines.append("")
    lines.append(f"{'stage':<12} {'units':>15}  state")
    for s in status["stages"]:
        if not s["present"]:
            lines.append(f"{s['stage']:<12} {'-':>15}  not run; add it with: {s['add']}")
            continue
        state = ("complete" if s["complete"] else
                 f"in progress (pid {holder.get('pid')})" if holder else
                 f"incomplete; finish with: {s['finish']}")
        lines.append(f"{s['stage']:<12} {s['done']:>7} / {s['planned']:<7}  {state}")
        for method, g in (s.get("by_method") or {}).items():
            if method != "None":
                lines.append(f"  {method:<10} {g['done']:>7} / {g['planned']:<7}")
    if status["log"]:
        lines += ["", "knowloc.log (last lines):"] + [f"  {line}" for line in status["log"]]
    return "\n".join(lines)


def status_json(status: dict[str, Any]) -> str:
    return json.dumps(status, indent=2, ensure_ascii=False, default=str)
