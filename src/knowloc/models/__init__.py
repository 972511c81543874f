"""Models: architecture adapters, the loaded :class:`Model` (structure, tokenization,
hooks), every forward pass (``forward``), the load-time self-check (``selfcheck``), the
weights identity (``weights``), devices and dtypes (``device``), loading (``load``), and
the transformers touch points (``compat``).

Import order inside the package: ``adapters``, ``compat``, ``device`` < ``model`` <
``forward``, ``weights`` < ``selfcheck`` < ``load``. ``forward`` uses only the model's
structure and hooks; nothing it calls on a :class:`Model` runs a forward pass.
"""

from __future__ import annotations

from . import compat, forward
from .adapters import ADAPTERS, Adapter, find_adapter, supported_architectures
from .device import DTYPES, cpu_has_bf16, resolve_device, resolve_dtype
from .forward import (
    AnswerScores,
    activations_and_probs,
    answer_scores,
    last_activations,
    next_token_probs,
    prompt_activations,
    prompt_probs,
)
from .load import load_model, wrap
from .model import TARGETS, ActivationFn, Model
from .selfcheck import self_check
from .weights import weights_identity

__all__ = [
    "ADAPTERS",
    "DTYPES",
    "TARGETS",
    "ActivationFn",
    "Adapter",
    "AnswerScores",
    "Model",
    "activations_and_probs",
    "answer_scores",
    "compat",
    "cpu_has_bf16",
    "find_adapter",
    "forward",
    "last_activations",
    "load_model",
    "next_token_probs",
    "prompt_activations",
    "prompt_probs",
    "resolve_device",
    "resolve_dtype",
    "self_check",
    "supported_architectures",
    "weights_identity",
    "wrap",
]
