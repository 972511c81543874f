"""Attention interventions: the eager switch, recording and scaling post-softmax weights.

Everything here works on the *post-softmax* weights of the model's eager attention; fused
kernels (``sdpa``, flash, flex) never materialize them, so reading or changing attention
under one raises :class:`AttentionImplementationError` (switch with
``with eager_attention(model): ...``). What the recorded weights mean (received attention,
predominance, knowledge synapses, ΔValue/ΔProb) is in :mod:`knowloc.synapses`.

* **manipulation**: the post-softmax weights of column ``c`` in head ``(l, h)`` are
  multiplied by a factor (× 0 suppresses, × 2 enhances), in every query row of the
  forward pass (``rows="all"``, the default) or only in the last one; rows are not
  renormalized (the paper scales "attention scores", nothing more). Synapses of another
  prompt are clipped to the current prompt's length. When answer tokens follow the prompt
  (a teacher-forced multi-token target), only the prompt's rows are scaled: the answer
  positions see the change through attention, as with the neurons' activations.

The package's modules:

- :mod:`~knowloc.interventions.attention.hooks`: the eager switch
  (:func:`eager_attention`), and recording (:func:`record_attention`) and scaling
  (:func:`scale_attention`) post-softmax weights through the interception of the eager
  attention function (how it works is told there);
- :mod:`~knowloc.interventions.attention.experiments`: what is measured with them: attention
  maps (:func:`attention_map`), ΔValue/ΔProb of synapse manipulations
  (:func:`synapse_effect`, :func:`synapse_effects`, :func:`synapse_experiment`) and
  activation heatmap tables (:func:`activation_matrix`, :func:`heatmap_frame`).
"""

from __future__ import annotations

from .experiments import (
    activation_matrix,
    attention_map,
    heatmap_frame,
    synapse_effect,
    synapse_effects,
    synapse_experiment,
)
from .hooks import (
    AttentionImplementationError,
    attention_implementation,
    eager_attention,
    record_attention,
    scale_attention,
)

__all__ = [
    "AttentionImplementationError",
    "activation_matrix",
    "attention_implementation",
    "attention_map",
    "eager_attention",
    "heatmap_frame",
    "record_attention",
    "scale_attention",
    "synapse_effect",
    "synapse_effects",
    "synapse_experiment",
]
