"""knowloc: knowledge localization, consistency analysis and query localization.

Implements Chen et al., "Knowledge Localization: Mission Not Accomplished? Enter Query
Localization!" (ICLR 2025). Typical use::

    from knowloc import load_model, load_facts, attribute, knowledge_neurons

    model = load_model()                       # embedded Gemma 3 270M, offline
    attr = attribute(model, ("The official language of Brazil is", "Portuguese"), "ig")
    kns = knowledge_neurons(attr, threshold=0.2)

    import knowloc
    knowloc.reproduce("runs/quick", preset="quick")   # every experiment + report.html
    knowloc.run_status("runs/quick")                   # what a run directory holds
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "knowloc.models",
    "wrap": "knowloc.models",
    "Model": "knowloc.models",
    "load_facts": "knowloc.data",
    "Fact": "knowloc.data",
    "Query": "knowloc.data",
    "FactSet": "knowloc.data",
    "attribute": "knowloc.attribution",
    "Attribution": "knowloc.attribution",
    "knowledge_neurons": "knowloc.neurons",
    "NeuronSet": "knowloc.neurons",
    "consistency_of": "knowloc.consistency",
    "Consistency": "knowloc.consistency",
    "KnowlocError": "knowloc.errors",
    "RunSpec": "knowloc.study",
    "render_report": "knowloc.study",
    "run_status": "knowloc.study",
}

__all__ = [  # noqa: RUF022 - grouped like _EXPORTS
    "load_model",
    "wrap",
    "Model",
    "load_facts",
    "Fact",
    "Query",
    "FactSet",
    "attribute",
    "Attribution",
    "knowledge_neurons",
    "NeuronSet",
    "consistency_of",
    "Consistency",
    "KnowlocError",
    "RunSpec",
    "render_report",
    "run_status",
    "reproduce",
    "__version__",
]


def __getattr__(name: str) -> Any:  # lazy: importing knowloc does not import torch
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    if name == "reproduce":  # the module, callable as knowloc.reproduce.reproduce
        return import_module("knowloc.reproduce")
    raise AttributeError(f"module 'knowloc' has no attribute {name!r}")
