"""``knowloc reproduce``: every experiment end to end, then one self-contained report.html.

Presets (all documented in the README):

* ``quick``    built-in facts, 6 relations, 2 known facts each, 4 queries per fact,
               IG/SIG/AMIG at 20 steps; modification (Tables 2, 3), query-KN mapping
               (Figure 4) and the attention experiments (Figures 1, 5, 6, 7, 10) with AMIG's
               knowledge neurons only: under 30 min on a 2-core CPU.
* ``standard`` ParaRel (give ``--dataset pararel:<dir>``), every relation with >= 2 usable
               templates, the first 2 known facts of each, all their queries, all methods.
* ``paper``    ParaRel, every fact the model knows, all methods, 20 steps (the paper's
               setting; days on a CPU: use a GPU).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .attribution import method_names
from .errors import ConfigError
from .neurons import Selection

if TYPE_CHECKING:
    from .pipeline.units import Executor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    dataset: str = "builtin"
    relations: tuple[str, ...] | None = None
    known_per_relation: int | None = None
    max_queries_per_fact: int | None = None
    methods: tuple[str, ...] = field(default_factory=method_names)  # every registered method
    n_steps: int = 20
    target: str = "first"  # the answer's first token, or "all" of it (teacher-forced)
    population: str = "known"
    max_screen_per_relation: int | None = None
    static_threshold: float = 0.1
    selection: Selection = field(default_factory=Selection)
    # knowledge modification (Table 2) and query-KN mapping (Figure 4)
    modify: bool = True
    modify_methods: tuple[str, ...] | None = None  # None: every localized method
    ppl_max_tokens: int = 128
    ppl_pool: int = 25
    cas: bool = True  # Table 3: the Consistency-Aware set next to N_i, N_g
    # dynamic KN selection (Figures 1, 5, 6, 7, 10), with the modification methods' KNs
    attention: bool = True


PRESETS: dict[str, Preset] = {
    "quick": Preset(
        name="quick",
        description="built-in facts: 6 relations x 2 known facts x 4 queries, IG/SIG/AMIG, "
        "20 steps",
        dataset="builtin",
        relations=("P36", "P37", "P30", "P1376", "P103", "P495"),
        known_per_relation=2,
        max_queries_per_fact=4,
        modify_methods=("amig",),
        ppl_max_tokens=64,
        ppl_pool=30,
    ),
    "standard": Preset(
        name="standard",
        description="ParaRel: every relation with >= 2 usable templates, its first 2 known "
        "facts among its first 60, up to 4 queries each, IG/SIG/AMIG, 20 steps",
        dataset="pararel",
        known_per_relation=2,
        max_queries_per_fact=4,
        max_screen_per_relation=60,
    ),
    "paper": Preset(
        name="paper",
        description="ParaRel: every fact the model knows, all queries, IG/SIG/AMIG, 20 steps "
        "(the paper's setting)",
        dataset="pararel",
    ),
}


def resolve_preset(name: str, dataset: str | None = None, **overrides: Any) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    preset = PRESETS[name]
    if dataset is not None:
        preset = replace(preset, dataset=dataset)
        if not dataset.startswith("builtin") and name == "quick":
            preset = replace(preset, relations=None)
    if preset.dataset == "pararel":
        raise ConfigError(
            f"preset {name!r} runs on ParaRel: give --dataset pararel:<dir> "
            "(e.g. pararel:data/pararel; see docs/data.md to get ParaRel)"
        )
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return replace(preset, **overrides)


def preset_values(values: dict[str, Any]) -> dict[str, Any]:
    """Preset fields as a run's ``config.yaml`` records them (lists, the selection as a
    mapping) -> the values :func:`resolve_preset` takes as overrides."""
    known = {f.name for f in fields(Preset)}
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown preset field {key!r}; known: {', '.join(sorted(known))}")
        if key == "selection" and isinstance(value, dict):
            value = Selection(**value).validate()
        elif isinstance(value, list):
            value = tuple(value)
        out[key] = value
    return out


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    t = time.time()
    try:
        yield
    finally:
        timings[name] = round(time.time() - t, 1)


def reproduce(
    out: str | Path,
    *,
    model: Any = "gemma3-270m",
    preset: Preset | str = "quick",
    device: str = "cpu",
    dtype: str = "float32",
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    ppl_text: str | Path | None = None,
    executor: Executor | None = None,
    argv: Sequence[str] | None = None,
    keep_maps: bool = False,
) -> Path:
    """Run the preset's experiments into ``out`` and write ``out/report.html``.

    ``executor`` computes every stage's units (default: in this process, see
    :func:`knowloc.pipeline.distributed.make_executor`). ``argv``: the command line recorded
    in ``env.json`` (default: this process's). ``keep_maps``: keep every query's full
    attribution map in the run (see :class:`~knowloc.pipeline.localize.LocalizeConfig`).
    """
    from .data import load_facts
    from .evaluation import load_ppl_corpus
    from .models import load_model
    from .pipeline.attention import AttentionConfig, attention_experiment
    from .pipeline.consistency import consistency
    from .pipeline.localize import LocalizeConfig, localize, screen, select_population
    from .pipeline.mapping import MappingConfig, query_kn_mapping
    from .pipeline.modify import ModifyConfig, modify
    from .pipeline.run import model_fingerprint, seed_everything
    from .report.sections import (
        effective_configuration,
        overview_section,
        timing_text,
        write_report,
    )
    from .report.stages import (
        present_attention,
        present_consistency,
        present_mapping,
        present_modification,
    )
    from .store import RunStore, environment_info

    p = resolve_preset(preset) if isinstance(preset, str) else preset
    timings: dict[str, float] = {}
    t0 = time.time()
    with _timed(timings, "load data"):
        facts = load_facts(p.dataset, relations=p.relations,
                           max_queries_per_fact=p.max_queries_per_fact, seed=seed)
    seed_everything(seed)
    with _timed(timings, "load model"):
        if isinstance(model, str):
            model = load_model(model, device=device, dtype=dtype)
    store = RunStore(out)
    cfg = LocalizeConfig(methods=p.methods, n_steps=p.n_steps, selection=p.selection,
                         target=p.target, keep_maps=keep_maps)
    edit_methods = [m for m in p.methods if p.modify_methods is None or m in p.modify_methods]
    edit_methods = edit_methods or list(p.methods[:1])
    mcfg = ModifyConfig(methods=edit_methods, split_threshold=p.static_threshold,
                        sets=("local", "global", "cas") if p.cas else ("local", "global"),
                        ppl_max_tokens=p.ppl_max_tokens, ppl_pool=p.ppl_pool, seed=seed).validate()
    icfg = MappingConfig(methods=edit_methods, split_threshold=p.static_threshold)
    acfg = AttentionConfig(methods=edit_methods, split_threshold=p.static_threshold,
                           seed=seed).validate()
    corpus = load_ppl_corpus(ppl_text) if p.modify else None  # fail before any work
    fingerprint = model_fingerprint(model)
    config = {
        "fingerprint": {"model": fingerprint, "n_steps": p.n_steps,
                        "sig_mode": cfg.sig_mode, "selection": p.selection.as_dict(),
                        "weights": model.weights_identity()["sha256"]},
        "preset": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(p).items()},
        "model": {"name": model.name, "device": device, "dtype": dtype},
        "dataset": {"source": facts.source, "n_facts_loaded": len(facts),
                    "n_queries_loaded": len(facts.queries()), "skipped": dict(facts.skipped)},
        "localize": cfg.as_dict(),
        "seed": seed,
    }
    if p.modify:
        config["modify"] = {**mcfg.as_dict(), "ppl_text": corpus.source if corpus else None}
        config["intervene"] = icfg.as_dict()
    if p.attention:
        config["attention"] = acfg.as_dict()
    store.write_config(config, overwrite=overwrite)
    store.write_env(environment_info({"command": "reproduce", "preset": p.name,
                                      "weights": model.weights_identity(),
                                      **({"argv": list(argv)} if argv else {})}))

    with _timed(timings, "screen (one forward per query)"):
        screened = screen(model, facts, store, progress=progress,
                          known_per_relation=p.known_per_relation
                          if p.population == "known" else None,
                          max_per_relation=p.max_screen_per_relation,
                          executor=executor, target=cfg.target)
    population, removed = select_population(facts, screened, population=p.population,
                                            known_per_relation=p.known_per_relation)
    if not population.facts:
        raise ConfigError(
            f"no fact of {facts.source} passes the population filter ({p.population}); "
            "try --population all or another dataset"
        )
    log.info("population: %d facts, %d queries (removed: %s)", len(population),
             len(population.queries()), removed or "none")
    with _timed(timings, "localize"):
        loc = localize(model, population, store, cfg, progress=progress, executor=executor)
    query_ids = {q.query_id for q in population.queries()}
    with _timed(timings, "consistency"):
        cres = consistency(store, population=p.population, static_threshold=p.static_threshold,
                           query_ids=query_ids)
        cshown = present_consistency(store, cres)
    mres = mapping = attention = None
    has_split = bool(cres.scores["skipped"].isna().any())
    if (p.modify or p.attention) and not has_split:
        log.warning("no fact passed the consistency filters: knowledge modification and "
                    "attention experiments skipped")
    if p.modify and has_split:
        with _timed(timings, "modify (Tables 2, 3)" if p.cas else "modify (Table 2)"):
            mres = modify(model, store, mcfg, ppl_text=ppl_text, query_ids=query_ids,
                          progress=progress, executor=executor)
            present_modification(store, mres)
        with _timed(timings, "query-KN mapping (Figure 4)"):
            ires = query_kn_mapping(model, store, icfg, query_ids=query_ids, progress=progress,
                                    executor=executor)
            mapping = (ires, present_mapping(store, ires))
    if p.attention and has_split:
        with _timed(timings, "attention (Figures 1, 5, 6, 7, 10)"):
            ares = attention_experiment(model, store, acfg, query_ids=query_ids,
                                        progress=progress, executor=executor)
            attention = (ares, present_attention(store, ares))
    timings["total"] = round(time.time() - t0, 1)

    sizes = {
        "facts loaded": len(facts),
        "queries loaded": len(facts.queries()),
        "relations": len(population.relations),
        "facts localized": len(population),
        "queries localized": len(population.queries()),
        "methods": ", ".join(p.methods),
    }
    skipped_items = [{"stage": "dataset", "reason": k, "count": v} for k, v in facts.skipped.items()]
    skipped_items += [{"stage": "population", "reason": k, "count": v} for k, v in removed.items()]
    skipped_items += [{"stage": f"consistency ({r.method})", "reason": r.reason,
                       "count": int(r.n_facts)} for r in cres.skipped.itertuples()
                      if r.reason != "kept" and r.n_facts]
    queries = loc.queries[loc.queries["query_id"].isin(query_ids)]
    tt = store.table("timings")
    if len(tt):
        queries = queries.merge(tt[["method", "query_id", "seconds"]].drop_duplicates(
            ["method", "query_id"]), on=["method", "query_id"], how="left")
    else:
        queries = queries.assign(seconds=float("nan"))
    path = write_report(
        store, title=f"knowloc report: {model.name}, preset {p.name}",
        overview=overview_section(fingerprint, p.name, effective_configuration(config, queries),
                                  p.selection, p.population, timing_text(tt, timings)),
        queries=queries, screened=screened, n_layers=model.n_layers,
        consistency=(cres, cshown), modification=mres, mapping=mapping, attention=attention,
        run_info={"model": model.name, "dataset": facts.source, "sizes": sizes,
                  "timings (s)": timings, "skipped": skipped_items, "config": config})
    print(f"report: {path}")
    return path
