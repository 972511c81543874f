"""The run specification: the one owner of a run's identity and of ``config.yaml``.

A :class:`RunSpec` holds what determines a run's results: the model (name, device, dtype,
and once loaded its fingerprint and weights hash), the dataset selection, the seed, the
preset a run was made from (if any) and each stage's configuration. The CLI, the Python API
and ``knowloc reproduce`` write ``config.yaml`` through :meth:`RunSpec.write` and read it
through :func:`read_spec`, in one schema (:func:`config_schema`), so a run directory says
in one place how it was made::

    fingerprint   model fingerprint, n_steps, sig_mode, selection, weights sha256
    model         name, device, dtype
    dataset       source, relations, facts_per_relation, max_queries_per_fact, context,
                  n_facts, n_queries, skipped
    preset        the preset's fields (runs made by reproduce)
    localize      LocalizeConfig
    consistency   ConsistencyConfig
    modify        ModifyConfig, ppl_text, ppl (the ΔPPL sample as measured)
    intervene     MappingConfig
    attention     AttentionConfig
    seed

The fields of a stage configuration that key its units are declared by the configuration
itself (``key_config()``), and every unit key comes from
:func:`knowloc.pipeline.run.unit_key`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import RunError
from ..neurons import Selection
from ..pipeline.attention import AttentionConfig
from ..pipeline.consistency import ConsistencyConfig
from ..pipeline.localize import LocalizeConfig
from ..pipeline.mapping import MappingConfig
from ..pipeline.modify import ModifyConfig
from ..pipeline.run import model_fingerprint
from ..store import CONFIG_FILE, RunStore, to_plain
from .presets import Preset

log = logging.getLogger(__name__)

#: The sections of ``config.yaml``, in the order they are written.
SECTIONS = ("fingerprint", "model", "dataset", "preset", "localize", "consistency", "modify",
            "intervene", "attention", "seed")

#: The keys of the ``dataset`` section.
DATASET_KEYS = ("source", "relations", "facts_per_relation", "max_queries_per_fact", "context",
                "n_facts", "n_queries", "skipped")

#: Keys older runs wrote, read as their current name.
_RENAMED = {("dataset", "n_facts_loaded"): "n_facts", ("dataset", "n_queries_loaded"): "n_queries"}


def config_schema() -> dict[str, dict[str, Any] | None]:
    """Section -> its keys with their defaults (None for a value that is not a mapping):
    the schema every run's ``config.yaml`` is written in."""
    return {
        "fingerprint": None,
        "model": dict.fromkeys(("name", "device", "dtype")),
        "dataset": dict.fromkeys(DATASET_KEYS),
        "preset": {f.name: None for f in fields(Preset)},
        "localize": LocalizeConfig().as_dict(),
        "consistency": ConsistencyConfig().as_dict(),
        "modify": {**ModifyConfig().as_dict(), "ppl": None, "ppl_text": None},
        "intervene": MappingConfig().as_dict(),
        "attention": AttentionConfig().as_dict(),
        "seed": None,
    }


def fingerprint(model: Any, localize: LocalizeConfig) -> dict[str, Any]:
    """The part of a run that determines its results and must never change under it: the
    model's fingerprint and weights hash, and the attribution settings. A run directory
    refuses another one (``--overwrite`` allows all but the weights)."""
    return {"model": model_fingerprint(model), "n_steps": localize.n_steps,
            "sig_mode": localize.sig_mode, "selection": localize.selection.as_dict(),
            "weights": model.weights_identity()["sha256"]}


def localize_config(section: dict[str, Any]) -> LocalizeConfig:
    """A :class:`LocalizeConfig` from its ``config.yaml`` section."""
    values = dict(section)
    if isinstance(values.get("selection"), dict):
        values["selection"] = Selection(**values["selection"]).validate()
    if isinstance(values.get("methods"), list):
        values["methods"] = tuple(values["methods"])
    known = {f.name for f in fields(LocalizeConfig)}
    return LocalizeConfig(**{k: v for k, v in values.items() if k in known})


def _config_of(cls: type, section: dict[str, Any]) -> Any:
    known = {f.name for f in fields(cls)}
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in section.items()
              if k in known}
    return cls(**values)


@dataclass
class RunSpec:
    """What a run is: model, dataset, seed, preset and each stage's configuration.

    ``fingerprint`` is filled in once the model is loaded (:meth:`with_model`). A stage's
    configuration is None until that stage is part of the run.
    """

    model: dict[str, Any] = field(default_factory=lambda: {"name": None, "device": "cpu",
                                                           "dtype": "float32"})
    dataset: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    fingerprint: dict[str, Any] | None = None
    preset: dict[str, Any] | None = None
    localize: LocalizeConfig | None = None
    consistency: ConsistencyConfig | None = None
    modify: ModifyConfig | None = None
    modify_extra: dict[str, Any] = field(default_factory=dict)  # ppl_text, ppl
    intervene: MappingConfig | None = None
    attention: AttentionConfig | None = None

    # ------------------------------------------------------------------ building
    def with_model(self, model: Any) -> RunSpec:
        """This spec with the loaded model's fingerprint (needs ``localize``)."""
        if self.localize is None:
            raise RunError("a run's fingerprint needs its localization settings")
        self.fingerprint = fingerprint(model, self.localize)
        return self

    def describe_dataset(self, facts: Any, **selection: Any) -> RunSpec:
        """Record the dataset a run loaded (``facts``: a FactSet) and how it was selected
        (relations, facts_per_relation, max_queries_per_fact, context)."""
        self.dataset = {"source": facts.source,
                        "relations": selection.get("relations", facts.relations),
                        "facts_per_relation": selection.get("facts_per_relation"),
                        "max_queries_per_fact": selection.get("max_queries_per_fact"),
                        "context": selection.get("context"),
                        "n_facts": len(facts), "n_queries": len(facts.queries()),
                        "skipped": dict(facts.skipped)}
        return self

    # ------------------------------------------------------------------ config.yaml
    def to_config(self) -> dict[str, Any]:
        """The ``config.yaml`` mapping (plain values, sections in :data:`SECTIONS` order)."""
        out: dict[str, Any] = {}
        if self.fingerprint is not None:
            out["fingerprint"] = self.fingerprint
        out["model"] = dict(self.model)
        if self.dataset:
            out["dataset"] = {k: self.dataset.get(k) for k in DATASET_KEYS}
        if self.preset is not None:
            out["preset"] = self.preset
        if self.localize is not None:
            out["localize"] = self.localize.as_dict()
        if self.consistency is not None:
            out["consistency"] = self.consistency.as_dict()
        if self.modify is not None:
            out["modify"] = {**self.modify.as_dict(), **self.modify_extra}
        if self.intervene is not None:
            out["intervene"] = self.intervene.as_dict()
        if self.attention is not None:
            out["attention"] = self.attention.as_dict()
        out["seed"] = self.seed
        return to_plain(out)

    @classmethod
    def from_config(cls, config: dict[str, Any], *, where: str = "config.yaml") -> RunSpec:
        """The spec of a ``config.yaml`` mapping; RunError naming an unknown section or key.
        Keys older versions wrote are read under their current names."""
        schema = config_schema()
        sections: dict[str, Any] = {}
        for name, content in config.items():
            if name not in schema:
                raise RunError(f"{where}: unknown section {name!r} (known: {', '.join(schema)})")
            keys = schema[name]
            if keys is None or content is None:
                sections[name] = content
                continue
            if not isinstance(content, dict):
                raise RunError(f"{where}: {name} must be a mapping of keys")
            section = {}
            for key, value in content.items():
                key = _RENAMED.get((name, key), key)
                if key not in keys:
                    raise RunError(f"{where}: unknown key '{name}.{key}' (known in {name}: "
                                   f"{', '.join(keys)})")
                section[key] = value
            sections[name] = section
        spec = cls(model={**cls().model, **(sections.get("model") or {})},
                   dataset=dict(sections.get("dataset") or {}),
                   seed=int(sections.get("seed") or 0),
                   fingerprint=sections.get("fingerprint"),
                   preset=sections.get("preset"))
        if sections.get("localize") is not None:
            spec.localize = localize_config(sections["localize"])
        if sections.get("consistency") is not None:
            spec.consistency = _config_of(ConsistencyConfig, sections["consistency"])
        if sections.get("modify") is not None:
            mod = dict(sections["modify"])
            spec.modify_extra = {k: mod.pop(k) for k in ("ppl_text", "ppl") if k in mod}
            spec.modify = _config_of(ModifyConfig, mod)
        if sections.get("intervene") is not None:
            spec.intervene = _config_of(MappingConfig, sections["intervene"])
        if sections.get("attention") is not None:
            spec.attention = _config_of(AttentionConfig, sections["attention"])
        return spec

    def write(self, store: RunStore, *, overwrite: bool = False) -> None:
        """Write ``config.yaml`` (the fingerprint rule of
        :meth:`~knowloc.store.RunStore.write_config` applies)."""
        store.write_config(self.to_config(), overwrite=overwrite)

    # ------------------------------------------------------------------ reading
    @property
    def target(self) -> str:
        """The run's target mode (``first`` when it records none)."""
        return self.localize.target if self.localize is not None else "first"

    @property
    def model_info(self) -> dict[str, Any]:
        """The model as the fingerprint records it (name, adapter, dtype, n_layers, d_mlp),
        or what ``model`` says when the run has no fingerprint yet."""
        fp = (self.fingerprint or {}).get("model")
        return dict(fp) if isinstance(fp, dict) else {"name": self.model.get("name")}


def read_spec(run: str | Path | RunStore) -> RunSpec:
    """The :class:`RunSpec` of a run directory (RunError when it has no ``config.yaml``)."""
    store = run if isinstance(run, RunStore) else RunStore(run, create=False)
    if not (store.root / CONFIG_FILE).exists():
        raise RunError(f"{store.root} is not a knowloc run directory (no {CONFIG_FILE}); "
                       "make one with `knowloc localize --dataset ... --out RUN` or "
                       "`knowloc reproduce --out RUN`")
    return RunSpec.from_config(store.read_config(), where=str(store.root / CONFIG_FILE))


def record_stage(store: RunStore, name: str, config: Any, **extra: Any) -> None:
    """Write one stage's configuration into the run's ``config.yaml`` (the other sections
    unchanged)."""
    spec = read_spec(store)
    if name == "modify":
        spec.modify = config
        spec.modify_extra = {**spec.modify_extra, **extra}
    elif name in ("localize", "consistency", "intervene", "attention"):
        setattr(spec, name, config)
    else:
        raise ValueError(f"unknown stage section {name!r}")
    spec.write(store)
