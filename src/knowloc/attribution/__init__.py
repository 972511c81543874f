"""Knowledge-neuron attribution: IG (Dai et al.), SIG (Enguehard, adapted), AMIG (Chen et al.)
and any method registered later.

``attribute(model, query, "ig")`` scores every MLP neuron of every layer at the last prompt
position by integrated gradients of the probability of the gold answer's first token
(METHODS §1). The methods differ in baselines and normalization only; each is one
:class:`AttributionMethod` in the registry (:mod:`.methods`), and the engine
(:mod:`.engine`, with the fused output head of :mod:`.head`) runs all of them. The plain
reference the engine is tested against lives in the tests.
"""

from __future__ import annotations

from .engine import attribute, auto_batch_size
from .head import HeadOutput, target_prob_grad, work_dtype
from .methods import (
    SIG_MODES,
    AttributionConfig,
    AttributionMethod,
    baselines,
    get_method,
    maskable_positions,
    method_names,
    normalize,
    register_method,
    sort_methods,
    unregister_method,
)
from .result import Attribution

__all__ = [
    "SIG_MODES",
    "Attribution",
    "AttributionConfig",
    "AttributionMethod",
    "HeadOutput",
    "attribute",
    "auto_batch_size",
    "baselines",
    "get_method",
    "maskable_positions",
    "method_names",
    "normalize",
    "register_method",
    "sort_methods",
    "target_prob_grad",
    "unregister_method",
    "work_dtype",
]
