"""The stages of a run, each one object: how it runs, what it holds, how it is shown.

Every stage answers the same questions, so that one driver (:func:`.driver.run_stages`)
runs any list of them and ``knowloc report`` / ``knowloc status`` read any run directory:

* ``run(ctx)``: plan the stage's units from the run and compute the missing ones through
  the unit runner (:func:`knowloc.pipeline.units.run_units`: resume, the lock, parts,
  consolidation, the executor), returning the stage's result;
* ``collect(store, spec)``: the same result from the run directory alone (no model), or
  None when the stage was not run;
* ``present(store, result)``: the files beside its tables (CSV/Markdown tables, figures);
* ``sections(store, result, shown, ...)``: its report sections, each with an order key;
* ``marker`` / ``tables``: the table whose parts mark its units done, and all it writes;
* ``command(run)``: the command line that adds (or finishes) it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from ..errors import ConfigError, RunError
from ..pipeline.attention import AttentionConfig, attention_experiment, attention_result
from ..pipeline.consistency import ConsistencyConfig, consistency, consistency_result
from ..pipeline.localize import LocalizeConfig, localize, screen, select_population
from ..pipeline.mapping import MappingConfig, mapping_result, query_kn_mapping
from ..pipeline.modify import ModifyConfig, modify, modify_result
from ..pipeline.run import read_run
from ..pipeline.units import Executor
from ..report.html import Section
from ..report.sections import (
    attention_sections,
    consistency_section,
    localization_section,
    modification_sections,
)
from ..report.stages import (
    Shown,
    present_attention,
    present_consistency,
    present_mapping,
    present_modification,
)
from ..store import RunStore
from .spec import RunSpec

log = logging.getLogger(__name__)


@dataclass
class Context:
    """What the stages of one invocation share: the run directory and its spec, the model
    (None for stages that need none), the executor, the population's query ids (set by
    localization when it screens), the facts to localize and the PPL text."""

    store: RunStore
    spec: RunSpec
    model: Any = None
    executor: Executor | None = None
    progress: bool = True
    allow_partial: bool = False
    query_ids: set[str] | None = None
    facts: Any = None  # FactSet to localize
    ppl_text: str | Path | None = None
    heatmaps: bool = True
    #: what a stage records about itself for the report and status (stages.json)
    notes: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Localization:
    """The localization a run holds: one row per (method, query) with the seconds it
    took, and the screened queries."""

    queries: pd.DataFrame
    screened: pd.DataFrame
    computed: int = 0
    skipped_done: int = 0


class Stage:
    """The stage protocol (see the module docstring). Subclasses set the class attributes
    and implement :meth:`run`, :meth:`collect` and :meth:`sections`."""

    name: ClassVar[str]  # its section of config.yaml
    title: ClassVar[str]  # what the report calls it
    marker: ClassVar[str]
    tables: ClassVar[tuple[str, ...]]
    needs_model: ClassVar[bool] = True
    #: the report sections it fills, for the "not run" list: (order, title)
    slots: ClassVar[tuple[tuple[int, str], ...]] = ()

    def __init__(self, config: Any) -> None:
        self.config = config

    def run(self, ctx: Context) -> Any:
        raise NotImplementedError

    def collect(self, store: RunStore, spec: RunSpec) -> Any | None:
        raise NotImplementedError

    def present(self, store: RunStore, result: Any) -> Shown:
        return Shown()

    def sections(self, store: RunStore, result: Any, shown: Shown,
                 spec: RunSpec) -> list[tuple[int, Section]]:
        raise NotImplementedError

    def command(self, run: Path) -> str:
        return f"knowloc {self.name} --run {run}"

    def record(self, spec: RunSpec) -> None:
        """Put this stage's configuration into ``spec``."""
        setattr(spec, self.name, self.config)

    @classmethod
    def from_spec(cls, spec: RunSpec) -> Stage:
        """The stage as the run's ``config.yaml`` configures it (defaults if it does not)."""
        config = getattr(spec, cls.name, None)
        return cls(config if config is not None else cls.default_config())

    @classmethod
    def default_config(cls) -> Any:
        raise NotImplementedError


@dataclass
class ScreenSettings:
    """Screening before localization (reproduce): keep the facts the model knows."""

    population: str = "known"
    known_per_relation: int | None = None
    max_per_relation: int | None = None


class LocalizeStage(Stage):
    name = "localize"
    title = "Localization"
    marker = "queries"
    tables = ("queries", "neuron_sets", "attributions", "timings", "screen", "maps")
    slots = ((10, "Localization"),)

    def __init__(self, config: LocalizeConfig, screening: ScreenSettings | None = None) -> None:
        super().__init__(config)
        self.screening = screening

    @classmethod
    def default_config(cls) -> LocalizeConfig:
        return LocalizeConfig()

    def command(self, run: Path) -> str:
        return f"knowloc localize --dataset SOURCE --out {run}"

    def run(self, ctx: Context) -> Localization:
        if ctx.facts is None:
            raise ConfigError("localization needs facts (a dataset)")
        facts, screened = ctx.facts, None
        cfg: LocalizeConfig = self.config
        if self.screening is not None:
            s = self.screening
            screened = screen(ctx.model, facts, ctx.store, progress=ctx.progress,
                              known_per_relation=s.known_per_relation
                              if s.population == "known" else None,
                              max_per_relation=s.max_per_relation, executor=ctx.executor,
                              target=cfg.target)
            facts, removed = select_population(facts, screened, population=s.population,
                                               known_per_relation=s.known_per_relation)
            if not facts.facts:
                raise ConfigError(f"no fact of {ctx.facts.source} passes the population "
                                  f"filter ({s.population}); try --population all or another "
                                  "dataset")
            log.info("population: %d facts, %d queries (removed: %s)", len(facts),
                     len(facts.queries()), removed or "none")
            ctx.notes.setdefault("localize", {})["population_removed"] = removed
            ctx.query_ids = {q.query_id for q in facts.queries()}
        res = localize(ctx.model, facts, ctx.store, cfg, progress=ctx.progress,
                       executor=ctx.executor)
        return Localization(res.queries, screened if screened is not None else pd.DataFrame(),
                            res.computed, res.skipped_done)

    def collect(self, store: RunStore, spec: RunSpec) -> Localization | None:
        queries = store.table("queries")
        if queries.empty:
            return None
        tt = store.table("timings")
        if len(tt):
            queries = queries.merge(tt[["method", "query_id", "seconds"]].drop_duplicates(
                ["method", "query_id"]), on=["method", "query_id"], how="left")
        else:
            queries = queries.assign(seconds=float("nan"))
        return Localization(queries, store.table("screen"))

    def sections(self, store: RunStore, result: Localization, shown: Shown,
                 spec: RunSpec) -> list[tuple[int, Section]]:
        n_layers = int(spec.model_info.get("n_layers") or 0)
        if not n_layers:  # a run without a fingerprint: the deepest layer with a neuron
            layers = store.table("neuron_sets").get("layer")
            n_layers = int(layers.max()) + 1 if layers is not None and len(layers) else 0
        return [(10, localization_section(store, result.queries, result.screened, n_layers))]


class ConsistencyStage(Stage):
    name = "consistency"
    title = "Consistency analysis (Table 1)"
    marker = "consistency"
    tables = ("consistency",)
    needs_model = False
    slots = ((20, "Consistency analysis (Table 1)"),)

    @classmethod
    def default_config(cls) -> ConsistencyConfig:
        return ConsistencyConfig()

    def run(self, ctx: Context) -> Any:
        cfg: ConsistencyConfig = self.config.validate()
        return consistency(ctx.store, population=cfg.population,
                           static_threshold=cfg.static_threshold, query_ids=ctx.query_ids,
                           allow_partial=ctx.allow_partial, n_boot=cfg.n_boot,
                           boot_seed=cfg.boot_seed)

    def collect(self, store: RunStore, spec: RunSpec) -> Any | None:
        scores = store.table("consistency")
        if scores.empty:
            return None
        cfg: ConsistencyConfig = self.config
        return consistency_result(scores, cfg.static_threshold, n_boot=cfg.n_boot,
                                  boot_seed=cfg.boot_seed)

    def present(self, store: RunStore, result: Any) -> Shown:
        return present_consistency(store, result)

    def sections(self, store: RunStore, result: Any, shown: Shown,
                 spec: RunSpec) -> list[tuple[int, Section]]:
        return [(20, consistency_section(store, result, shown))]


def _split_run(store: RunStore, methods: Any, threshold: Any) -> Any | None:
    """The run's facts and split for a stage after consistency, or None when the run has
    no consistency results (the stage cannot have run)."""
    try:
        return read_run(store, methods, threshold, allow_partial=True)
    except (RunError, ConfigError) as exc:
        log.debug("no split: %s", exc)
        return None


class ModifyStage(Stage):
    name = "modify"
    title = "Knowledge modification (Tables 2, 3)"
    marker = "edits"
    tables = ("edits", "metrics")
    slots = ((30, "Knowledge modification (Table 2)"),
             (80, "Consistency-Aware KN modification (Table 3)"))

    @classmethod
    def default_config(cls) -> ModifyConfig:
        return ModifyConfig()

    def command(self, run: Path) -> str:
        return f"knowloc modify --run {run} --ppl-text wiki.test.raw"

    def run(self, ctx: Context) -> Any:
        res = modify(ctx.model, ctx.store, self.config, ppl_text=ctx.ppl_text,
                     query_ids=ctx.query_ids, progress=ctx.progress, executor=ctx.executor,
                     allow_partial=ctx.allow_partial)
        ctx.notes.setdefault("modify", {})["ppl"] = res.ppl
        return res

    def record(self, spec: RunSpec) -> None:
        spec.modify = self.config

    def collect(self, store: RunStore, spec: RunSpec) -> Any | None:
        if store.table("edits").empty:
            return None
        run = _split_run(store, self.config.methods, self.config.split_threshold)
        if run is None:
            return None
        boot = spec.consistency or ConsistencyConfig()  # the run's bootstrap (Table 1's)
        return modify_result(store, run, dict(spec.modify_extra.get("ppl") or {}),
                             n_boot=boot.n_boot, boot_seed=boot.boot_seed)

    def present(self, store: RunStore, result: Any) -> Shown:
        return present_modification(store, result)

    def sections(self, store: RunStore, result: Any, shown: Shown,
                 spec: RunSpec) -> list[tuple[int, Section]]:
        first = modification_sections(store, result, None, None)
        last = attention_sections(store, result, None, None)
        return [(30, s) for s in first] + [(80, s) for s in last]


class MappingStage(Stage):
    name = "intervene"
    title = "Query-KN mapping (Figure 4)"
    marker = "interventions"
    tables = ("interventions",)
    slots = ((40, "Query-KN mapping (Figure 4)"),)

    @classmethod
    def default_config(cls) -> MappingConfig:
        return MappingConfig()

    def run(self, ctx: Context) -> Any:
        return query_kn_mapping(ctx.model, ctx.store, self.config, query_ids=ctx.query_ids,
                                progress=ctx.progress, executor=ctx.executor,
                                allow_partial=ctx.allow_partial)

    def collect(self, store: RunStore, spec: RunSpec) -> Any | None:
        if store.table("interventions").empty:
            return None
        run = _split_run(store, self.config.methods, self.config.split_threshold)
        boot = spec.consistency or ConsistencyConfig()  # the run's bootstrap (Table 1's)
        return None if run is None else mapping_result(store, run, self.config,
                                                       n_boot=boot.n_boot,
                                                       boot_seed=boot.boot_seed)

    def present(self, store: RunStore, result: Any) -> Shown:
        return present_mapping(store, result)

    def sections(self, store: RunStore, result: Any, shown: Shown,
                 spec: RunSpec) -> list[tuple[int, Section]]:
        return [(40, s) for s in modification_sections(store, None, result, shown)]


class AttentionStage(Stage):
    name = "attention"
    title = "Attention: predominance, knowledge synapses (Figures 1, 5, 6, 7, 10)"
    marker = "predominance"
    tables = ("predominance", "attention_queries", "synapse_effects", "heatmaps")
    slots = ((50, "Dynamic KN selection: predominance (Figure 5)"),
             (60, "Knowledge synapses (Figure 6)"),
             (70, "Activation heatmaps (Figures 1, 7, 10)"))

    @classmethod
    def default_config(cls) -> AttentionConfig:
        return AttentionConfig()

    def run(self, ctx: Context) -> Any:
        return attention_experiment(ctx.model, ctx.store, self.config, query_ids=ctx.query_ids,
                                    heatmaps=ctx.heatmaps, progress=ctx.progress,
                                    executor=ctx.executor, allow_partial=ctx.allow_partial)

    def collect(self, store: RunStore, spec: RunSpec) -> Any | None:
        if store.table("predominance").empty:
            return None
        cfg: AttentionConfig = self.config.validate()
        run = _split_run(store, cfg.methods, cfg.split_threshold)
        boot = spec.consistency or ConsistencyConfig()  # the run's bootstrap (Table 1's)
        return None if run is None else attention_result(store, run, cfg, n_boot=boot.n_boot,
                                                         boot_seed=boot.boot_seed)

    def present(self, store: RunStore, result: Any) -> Shown:
        return present_attention(store, result)

    def sections(self, store: RunStore, result: Any, shown: Shown,
                 spec: RunSpec) -> list[tuple[int, Section]]:
        order = iter((50, 60, 70))
        return [(next(order), s) for s in attention_sections(store, None, result, shown)]


#: Every stage, in the order a run makes them.
STAGES: tuple[type[Stage], ...] = (LocalizeStage, ConsistencyStage, ModifyStage, MappingStage,
                                   AttentionStage)


def stages_of(spec: RunSpec) -> list[Stage]:
    """Every stage as the run's ``config.yaml`` configures it."""
    return [cls.from_spec(spec) for cls in STAGES]
