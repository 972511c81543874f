"""Loading a model: by embedded name, local directory or Hugging Face id
(:func:`load_model`), or wrapping one already in memory (:func:`wrap`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelError
from . import compat
from .adapters import find_adapter
from .device import resolve_device, resolve_dtype, warn_slow_bf16
from .model import Model
from .selfcheck import self_check
from .weights import hub_weight_files, weight_files

log = logging.getLogger(__name__)

__all__ = ["load_model", "wrap"]


def wrap(hf_model: nn.Module, tokenizer: Any, *, name: str | None = None, check: bool = True) -> Model:
    """Wrap an in-memory transformers causal LM (frozen, eval mode) as a :class:`Model`.

    With ``check`` the adapter is verified (:func:`knowloc.models.selfcheck.self_check`).
    A bfloat16 model on a CPU without bfloat16 kernels logs one warning
    (:func:`knowloc.models.device.warn_slow_bf16`).
    """
    adapter = find_adapter(hf_model.config)
    hf_model.eval()
    for p in hf_model.parameters():
        p.requires_grad_(False)
    model = Model(
        hf=hf_model,
        tokenizer=tokenizer,
        adapter=adapter,
        name=name or compat.source_name(hf_model.config) or adapter.name,
        revision=compat.source_revision(hf_model.config),
    )
    warn_slow_bf16(model.device, model.dtype)
    if check:
        self_check(model)
    return model


def load_model(
    name: str = "gemma3-270m",
    *,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype = "float32",
    attn_implementation: str | None = None,
    check: bool = True,
) -> Model:
    """Load a model by embedded name (``gemma3-270m``, ``smollm2-135m``), local dir or HF id.

    Nothing is downloaded unless a hub is reachable; an id that is neither embedded nor a
    local directory and cannot be fetched raises :class:`ModelError`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .. import embedded

    dev = resolve_device(device)
    dt = resolve_dtype(dtype)
    source = name
    if name in embedded.EMBEDDED:
        source = str(embedded.embedded_model_dir(name))
    elif not Path(name).exists() and os.environ.get("HF_HUB_OFFLINE") is None:
        log.info("loading %s from the Hugging Face hub (or its local cache)", name)
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as exc:
        raise ModelError(
            f"cannot load model {name!r}: {exc}. Use an embedded model "
            f"({', '.join(embedded.EMBEDDED)}), a local directory, or a cached Hugging Face id"
        ) from exc
    find_adapter(config)  # fail early with the list of supported architectures
    kwargs: dict[str, Any] = {"dtype": dt}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        hf = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tok = AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        raise ModelError(f"cannot load model {name!r}: {exc}") from exc
    hf.to(dev)  # type: ignore[arg-type]
    model = wrap(hf, tok, name=name, check=check)
    model.weights_from = (weight_files(source) if Path(source).is_dir()
                          else hub_weight_files(source, model.revision))
    return model
