"""Models: architecture adapters, the loaded :class:`Model`, the one forward path, and the
transformers touch points (``compat``).

Import order inside the package: ``adapters`` and ``compat`` < ``forward`` < ``model``.
"""

from __future__ import annotations

from . import compat, forward
from .adapters import ADAPTERS, Adapter, find_adapter, supported_architectures
from .forward import (
    AnswerScores,
    activations_and_probs,
    answer_scores,
    last_activations,
    next_token_probs,
)
from .model import (
    DTYPES,
    TARGETS,
    ActivationFn,
    Model,
    load_model,
    resolve_device,
    resolve_dtype,
    wrap,
)

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
    "find_adapter",
    "forward",
    "last_activations",
    "load_model",
    "next_token_probs",
    "resolve_device",
    "resolve_dtype",
    "supported_architectures",
    "wrap",
]
