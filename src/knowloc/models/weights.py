"""The identity of a model's weights: which files they were loaded from and one digest for
all of them (or, for a model built in memory, for its state dict)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..store.io import file_sha256

if TYPE_CHECKING:
    from .model import Model

log = logging.getLogger(__name__)

__all__ = ["WEIGHT_PATTERNS", "hub_weight_files", "state_dict_sha256", "weight_files",
           "weights_identity"]

#: Weight files ``from_pretrained`` reads, by preference: safetensors, else PyTorch pickles.
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


def weight_files(directory: str | Path) -> tuple[Path, ...]:
    """The weight files of a model directory (sorted), the first of
    :data:`WEIGHT_PATTERNS` that matches; empty when there are none."""
    root = Path(directory)
    for pattern in WEIGHT_PATTERNS:
        found = sorted(p for p in root.glob(pattern) if p.is_file())
        if found:
            return tuple(found)
    return ()


def hub_weight_files(name: str, revision: str | None) -> tuple[Path, ...]:
    """The weight files of a hub id in the local Hugging Face cache (empty when unknown)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json", revision=revision)
    except Exception as exc:  # noqa: BLE001 - any failure only means "files unknown"
        log.debug("cannot locate %s in the Hugging Face cache: %s", name, exc)
        return ()
    return weight_files(Path(found).parent) if isinstance(found, str) else ()


def state_dict_sha256(module: nn.Module) -> str:
    """sha256 of every state-dict tensor: name, dtype, shape and bytes, in name order."""
    sha = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        sha.update(f"{name}\t{str(t.dtype).replace('torch.', '')}\t"
                   f"{list(tensor.shape)}\n".encode())
        sha.update(t.view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def weights_identity(model: Model) -> dict[str, Any]:
    """What identifies ``model``'s weights: ``sha256`` (one hex digest for all of them),
    ``source`` (``"files"`` or ``"state_dict"``), the ``files`` with their own sha256, the
    hub ``revision`` when known, and for an embedded model the ``gguf_sha256`` of the GGUF
    it was dequantized from.

    Loaded from files (``model.weights_from``), ``sha256`` hashes the names and digests of
    the weight files (:func:`file_sha256`, cached by path, size and mtime, so a re-load
    costs nothing); built in memory, it hashes every state-dict tensor (name, dtype, shape,
    bytes). Computed on the first call and kept on the model: ask before editing the
    weights in place. Returns a copy.
    """
    if model._identity is None:
        ident: dict[str, Any] = {"revision": model.revision}
        if model.weights_from:
            files = {p.name: file_sha256(p) for p in model.weights_from}
            listing = "".join(f"{n}\t{h}\n" for n, h in sorted(files.items()))
            ident.update(source="files", files=files,
                         sha256=hashlib.sha256(listing.encode("utf-8")).hexdigest())
            from .. import embedded

            provenance = embedded.read_provenance(model.weights_from[0].parent)
            if provenance and provenance.get("gguf_sha256"):
                ident["gguf_sha256"] = str(provenance["gguf_sha256"])
        else:
            ident.update(source="state_dict", sha256=state_dict_sha256(model.hf))
        model._identity = ident
    return dict(model._identity)
