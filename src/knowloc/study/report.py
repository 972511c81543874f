"""``knowloc report``: a run directory renders its own ``report.html``, for whatever stages
it holds, from its files alone (no model, no computation but the tables' summaries).

``knowloc reproduce`` writes its report through the same function, so the report of a
reproduced run and ``knowloc report`` on it are the same document.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Any

from ..neurons import Selection
from ..report.html import Section, build_report
from ..report.sections import effective_configuration, overview_section, timing_text
from ..store import RunStore
from .driver import read_journal
from .sensitivity_report import sensitivity_section
from .spec import RunSpec, read_spec
from .stages import Localization, Stage, stages_of

log = logging.getLogger(__name__)


def _preset_name(spec: RunSpec) -> str:
    return str(spec.preset["name"]) if spec.preset else "none (built stage by stage)"


def _population(spec: RunSpec) -> str:
    if spec.consistency is not None:
        return spec.consistency.population
    return str((spec.preset or {}).get("population", "known"))


def _not_run(stage: Stage, title: str, root: Path) -> Section:
    return Section(
        title=f"{title}: not run",
        html=(f"<p>This run has no results of this stage yet. Add them with "
              f"<code>{html.escape(stage.command(root))}</code>, then render the report "
              f"again with <code>knowloc report {html.escape(str(root))}</code>.</p>"))


def render_report(run: str | Path | RunStore, out: str | Path | None = None) -> Path:
    """Write the report of the run directory ``run`` to ``out`` (default
    ``<run>/report.html``) and return its path.

    Sections: an overview, then each stage the run holds (localization, Table 1, Tables 2
    and 3, Figures 4-7 and 10), each stage that it does not hold listed as "not run" with
    the command that adds it, and the run information (sizes, timings, skipped items,
    ``config.yaml``). Stage files (CSV/Markdown tables, figures) are written again from the
    run's tables, byte-identical when the tables did not change.
    """
    store = run if isinstance(run, RunStore) else RunStore(run, create=False)
    spec = read_spec(store)
    journal = read_journal(store)
    results: dict[str, Any] = {}
    sections: list[tuple[int, Section]] = []
    localization: Localization | None = None
    for stage in stages_of(spec):
        result = stage.collect(store, spec)
        if result is None:
            for order, title in stage.slots:
                sections.append((order, _not_run(stage, title, store.root)))
            continue
        results[stage.name] = result
        if isinstance(result, Localization):
            localization = result
        shown = stage.present(store, result)
        sections += stage.sections(store, result, shown, spec)
    threshold_section = sensitivity_section(store, spec)  # only a run that kept its maps
    if threshold_section is not None:
        sections.append((25, threshold_section))
    sections.sort(key=lambda pair: pair[0])
    model = spec.model_info
    queries = localization.queries if localization is not None else None
    config = store.read_config()
    last = dict(journal.get("last", {}).get("timings") or {})
    tt = store.table("timings")
    selection = spec.localize.selection if spec.localize is not None else Selection()
    overview = overview_section(
        {"name": model.get("name"), "adapter": model.get("adapter", "?"),
         "n_layers": model.get("n_layers", "?"), "d_mlp": model.get("d_mlp", "?")},
        _preset_name(spec),
        effective_configuration(config, queries) if queries is not None else "nothing localized",
        selection, _population(spec), timing_text(tt, last) if last else "")
    title = (f"knowloc report: {model.get('name')}, preset {spec.preset['name']}" if spec.preset
             else f"knowloc report: {model.get('name')}")
    path = Path(out) if out is not None else store.root / "report.html"
    return build_report(path, title=title, sections=[overview] + [s for _, s in sections],
                        run_info=run_info(store, spec, journal, localization, results, config))


def run_info(store: RunStore, spec: RunSpec, journal: dict[str, Any],
             localization: Localization | None, results: dict[str, Any],
             config: dict[str, Any]) -> dict[str, Any]:
    """The report's run information: model, dataset, sizes, timings, skipped items and the
    run's ``config.yaml``."""
    ds = spec.dataset
    q = localization.queries if localization is not None else None
    methods = (list(spec.localize.methods) if spec.localize is not None else [])
    sizes = {
        "facts loaded": ds.get("n_facts"),
        "queries loaded": ds.get("n_queries"),
        "relations": int(q["relation"].nunique()) if q is not None else 0,
        "facts localized": int(q["fact_id"].nunique()) if q is not None else 0,
        "queries localized": int(q["query_id"].nunique()) if q is not None else 0,
        "methods": ", ".join(methods),
    }
    skipped = [{"stage": "dataset", "reason": k, "count": v}
               for k, v in (ds.get("skipped") or {}).items()]
    removed = journal["stages"].get("localize", {}).get("population_removed") or {}
    skipped += [{"stage": "population", "reason": k, "count": v} for k, v in removed.items()]
    cres = results.get("consistency")
    if cres is not None:
        skipped += [{"stage": f"consistency ({r.method})", "reason": r.reason,
                     "count": int(r.n_facts)} for r in cres.skipped.itertuples()
                    if r.reason != "kept" and r.n_facts]
    return {"model": spec.model_info.get("name"), "dataset": ds.get("source"), "sizes": sizes,
            "timings (s)": dict(journal.get("last", {}).get("timings") or {}),
            "skipped": skipped, "config": config}
