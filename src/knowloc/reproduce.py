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
import sys
import time
import types
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .study.presets import PRESETS, Preset, preset_values, resolve_preset

if TYPE_CHECKING:
    from .pipeline.units import Executor

log = logging.getLogger(__name__)

__all__ = ["PRESETS", "Preset", "preset_values", "reproduce", "resolve_preset"]


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
    n_boot: int = 1000,
    boot_seed: int = 0,
) -> Path:
    """Run the preset's experiments into ``out`` and write ``out/report.html``.

    The stages run through the one driver (:func:`knowloc.study.run_stages`) and the report
    is rendered from the run directory (:func:`knowloc.study.render_report`), exactly as
    ``knowloc report`` renders it later. ``executor`` computes every stage's units (default:
    in this process, see :func:`knowloc.pipeline.distributed.make_executor`). ``argv``: the
    command line recorded in ``env.json`` (default: this process's). ``keep_maps``: keep every
    query's full attribution map in the run (see
    :class:`~knowloc.pipeline.localize.LocalizeConfig`). ``n_boot``, ``boot_seed``: the
    bootstrap over facts behind every interval (Tables 1-3, Figures 4 and 6), recorded in
    ``config.yaml``'s consistency section.
    """
    from .data import load_facts
    from .evaluation import load_ppl_corpus
    from .models import load_model
    from .pipeline.attention import AttentionConfig
    from .pipeline.consistency import ConsistencyConfig
    from .pipeline.localize import LocalizeConfig
    from .pipeline.mapping import MappingConfig
    from .pipeline.modify import ModifyConfig
    from .pipeline.run import seed_everything
    from .store import RunStore, environment_info
    from .study.driver import note_timings, run_stages, timed
    from .study.report import render_report
    from .study.spec import RunSpec
    from .study.stages import (
        AttentionStage,
        ConsistencyStage,
        Context,
        LocalizeStage,
        MappingStage,
        ModifyStage,
        ScreenSettings,
    )

    p = resolve_preset(preset) if isinstance(preset, str) else preset
    timings: dict[str, float] = {}
    t0 = time.time()
    with timed(timings, "load data"):
        facts = load_facts(p.dataset, relations=p.relations,
                           max_queries_per_fact=p.max_queries_per_fact, seed=seed)
    seed_everything(seed)
    with timed(timings, "load model"):
        if isinstance(model, str):
            model = load_model(model, device=device, dtype=dtype)
    store = RunStore(out)
    cfg = LocalizeConfig(methods=p.methods, n_steps=p.n_steps, selection=p.selection,
                         target=p.target, keep_maps=keep_maps, rule=p.rule)
    edit_methods = [m for m in p.methods if p.modify_methods is None or m in p.modify_methods]
    edit_methods = edit_methods or list(p.methods[:1])
    mcfg = ModifyConfig(methods=edit_methods, split_threshold=p.static_threshold,
                        sets=("local", "global", "cas") if p.cas else ("local", "global"),
                        ppl_max_tokens=p.ppl_max_tokens, ppl_pool=p.ppl_pool, seed=seed).validate()
    icfg = MappingConfig(methods=edit_methods, split_threshold=p.static_threshold)
    acfg = AttentionConfig(methods=edit_methods, split_threshold=p.static_threshold,
                           seed=seed).validate()
    corpus = load_ppl_corpus(ppl_text) if p.modify else None  # fail before any work
    spec = RunSpec(model={"name": model.name, "device": device, "dtype": dtype}, seed=seed,
                   preset={k: (list(v) if isinstance(v, tuple) else v)
                           for k, v in asdict(p).items()},
                   localize=cfg)
    spec.describe_dataset(facts, relations=list(p.relations) if p.relations else None,
                          max_queries_per_fact=p.max_queries_per_fact)
    spec.with_model(model)
    if p.modify:
        spec.modify, spec.intervene = mcfg, icfg
        spec.modify_extra = {"ppl_text": corpus.source if corpus else None}
    if p.attention:
        spec.attention = acfg
    spec.write(store, overwrite=overwrite)
    store.write_env(environment_info({"command": "reproduce", "preset": p.name,
                                      "weights": model.weights_identity(),
                                      **({"argv": list(argv)} if argv else {})}))
    ctx = Context(store, spec, model=model, executor=executor, progress=progress, facts=facts,
                  ppl_text=ppl_text)
    screening = ScreenSettings(p.population, p.known_per_relation, p.max_screen_per_relation)
    run_stages([LocalizeStage(cfg, screening),
                ConsistencyStage(ConsistencyConfig(p.population, p.static_threshold,
                                                   n_boot=n_boot, boot_seed=boot_seed))],
               ctx, present=False, timings=timings,
               labels={"localize": "screen + localize"})
    cres = store.table("consistency")
    has_split = bool(len(cres) and cres["skipped"].isna().any())
    if (p.modify or p.attention) and not has_split:
        log.warning("no fact passed the consistency filters: knowledge modification and "
                    "attention experiments skipped")
    later = []
    if p.modify and has_split:
        later += [ModifyStage(mcfg), MappingStage(icfg)]
    if p.attention and has_split:
        later.append(AttentionStage(acfg))
    run_stages(later, ctx, present=False, timings=timings, labels={
        "modify": "modify (Tables 2, 3)" if p.cas else "modify (Table 2)",
        "intervene": "query-KN mapping (Figure 4)",
        "attention": "attention (Figures 1, 5, 6, 7, 10)"})
    timings["total"] = round(time.time() - t0, 1)
    note_timings(store, "reproduce", timings)
    path = render_report(store)
    print(f"report: {path}")
    return path


class _CallableModule(types.ModuleType):
    """``knowloc.reproduce(...)`` calls :func:`reproduce`: the module is callable, so the name
    means the same whether the module was imported first or not."""

    def __call__(self, out: str | Path, **kwargs: Any) -> Path:
        return reproduce(out, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
