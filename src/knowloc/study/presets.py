"""The presets of ``knowloc reproduce`` (all documented in the README).

* ``quick``    built-in facts, 6 relations, 2 known facts each, 4 queries per fact,
               IG/SIG/AMIG at 20 steps; modification (Tables 2, 3), query-KN mapping
               (Figure 4) and the attention experiments (Figures 1, 5, 6, 7, 10) with AMIG's
               knowledge neurons only.
* ``standard`` ParaRel (give ``--dataset pararel:<dir>``), every relation with >= 2 usable
               templates, the first 2 known facts among its first 60, up to 4 queries each,
               all methods.
* ``paper``    ParaRel, every fact the model knows, all methods, 20 steps (the paper's
               setting; days on a CPU: use a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..attribution import method_names
from ..errors import ConfigError
from ..neurons import Selection


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
    rule: str = "riemann_right"  # integration rule (knowloc.attribution.quadrature)
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
