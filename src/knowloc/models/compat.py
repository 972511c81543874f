"""Every place knowloc touches transformers internals, behind a version guard.

knowloc supports transformers 5. What changed within 5.x, or is not public API, is read or
written here and nowhere else:

* the key/value cache argument of a model's ``forward``: ``cache`` from transformers
  ``CACHE_RENAMED_IN`` on (``past_key_values`` is deprecated there and warns on every
  call), ``past_key_values`` before; the same for the returned cache;
* duplicating the rows of a ``DynamicCache`` (its ``layers`` and their
  ``batch_repeat_interleave``);
* where a model was loaded from (``config._name_or_path``, ``config._commit_hash``);
* the attention implementation a model runs (``config._attn_implementation``) and the
  switch between implementations;
* the module-level ``eager_attention_forward`` of a modeling file, the function an attention
  module calls under eager attention (looked up at call time, so wrapping it in the module's
  namespace intercepts every eager call of that architecture).
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any

import transformers
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "CACHE_KWARG",
    "CACHE_RENAMED_IN",
    "EAGER_ATTENTION_NAME",
    "TRANSFORMERS_VERSION",
    "attn_implementation",
    "cache_kwargs",
    "eager_attention_namespace",
    "output_cache",
    "repeat_cache_rows",
    "set_attn_implementation",
    "source_name",
    "source_revision",
]


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


#: The installed transformers version as a tuple, e.g. ``(5, 24, 0)``.
TRANSFORMERS_VERSION: tuple[int, ...] = _version_tuple(transformers.__version__)

#: First transformers release whose models take the key/value cache as ``cache``.
CACHE_RENAMED_IN: tuple[int, ...] = (5, 24, 0)

#: The name of the cache argument (and output field) of the installed transformers.
CACHE_KWARG = "cache" if TRANSFORMERS_VERSION >= CACHE_RENAMED_IN else "past_key_values"

#: The module-level function an attention module calls under eager attention.
EAGER_ATTENTION_NAME = "eager_attention_forward"


# ------------------------------------------------------------------------ k/v cache
def cache_kwargs(cache: Any) -> dict[str, Any]:
    """The keyword argument that passes ``cache`` to a model's ``forward`` (nothing for None)."""
    return {} if cache is None else {CACHE_KWARG: cache}


def output_cache(output: Any) -> Any:
    """The key/value cache a model's ``forward`` returned (with ``use_cache=True``)."""
    return getattr(output, CACHE_KWARG)


def repeat_cache_rows(cache: Any, rows: Sequence[int]) -> Any:
    """A copy of a batch-1 ``DynamicCache`` whose layer ``k`` holds ``rows[k]`` copies of the
    row (the batch size that layer runs at); ``cache`` itself is left as it is."""
    out = copy.deepcopy(cache)
    for layer, n in zip(out.layers, rows):
        if n > 1:
            layer.batch_repeat_interleave(n)
    return out


# ------------------------------------------------------------------------ provenance
def source_name(config: Any) -> str:
    """Where the model was loaded from (hub id or directory), "" when built in memory."""
    return str(getattr(config, "_name_or_path", "") or "")


def source_revision(config: Any) -> str | None:
    """The hub commit the weights came from, None when unknown."""
    return getattr(config, "_commit_hash", None)


# ------------------------------------------------------------------------ attention
def attn_implementation(config: Any) -> str | None:
    """The attention implementation a model (or one module's config) runs now."""
    return getattr(config, "_attn_implementation", None)


def set_attn_implementation(hf_model: nn.Module) -> Callable[[str], Any] | None:
    """The model's implementation switch (``PreTrainedModel.set_attn_implementation``), or
    None when it has none."""
    return getattr(hf_model, "set_attn_implementation", None)


def eager_attention_namespace(module: nn.Module) -> dict[str, Any] | None:
    """The globals that ``module.forward`` resolves ``eager_attention_forward`` from, or None
    when its forward does not call such a module-level function."""
    fwd = inspect.unwrap(type(module).forward)
    ns = getattr(fwd, "__globals__", None)
    if ns is None or EAGER_ATTENTION_NAME not in ns:
        return None
    return ns
