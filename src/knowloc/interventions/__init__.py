"""Interventions on a loaded model: weight edits of value vectors (:mod:`.weights`),
activation scaling of knowledge neurons (:mod:`.activations`), and recording or scaling
post-softmax attention weights under eager attention (:mod:`.attention`). Every one is a
scope that restores the model on exit, also on error."""

from __future__ import annotations

from .activations import intervene, intervention_probs
from .attention import (
    AttentionImplementationError,
    activation_matrix,
    attention_implementation,
    attention_map,
    eager_attention,
    heatmap_frame,
    record_attention,
    scale_attention,
    synapse_effect,
    synapse_experiment,
)
from .weights import OPS, Edit, activation_signs, weights_digest

__all__ = [
    "OPS",
    "AttentionImplementationError",
    "Edit",
    "activation_matrix",
    "activation_signs",
    "attention_implementation",
    "attention_map",
    "eager_attention",
    "heatmap_frame",
    "intervene",
    "intervention_probs",
    "record_attention",
    "scale_attention",
    "synapse_effect",
    "synapse_experiment",
    "weights_digest",
]
