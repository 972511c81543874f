"""The loaded model: its structure (layers, MLPs, value vectors, unembedding), its
tokenization (prompts, answers, targets) and its activation hooks.

Nothing here runs the model: the forward passes live in :mod:`knowloc.models.forward`, the
load-time self-check in :mod:`knowloc.models.selfcheck`, the weights identity in
:mod:`knowloc.models.weights`, loading in :mod:`knowloc.models.load`. Import order inside
the package: ``adapters``, ``compat``, ``device`` < ``model`` < ``forward``, ``weights`` <
``selfcheck`` < ``load``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, ModelError, TokenizationError
from ..store.io import file_sha256  # re-exported: it moved to knowloc.store.io
from .adapters import Adapter
from .device import DTYPES, resolve_device, resolve_dtype

log = logging.getLogger(__name__)

__all__ = ["DTYPES", "TARGETS", "ActivationFn", "Model", "file_sha256", "resolve_device",
           "resolve_dtype"]

#: ``fn(layer, h) -> h'``: what an activation hook does with the down-projection input
#: ``h`` ``[batch, seq, d_mlp]`` of one layer.
ActivationFn = Callable[[int, torch.Tensor], torch.Tensor]


def _get(root: Any, path: str) -> Any:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


#: What is attributed (and screened): ``"first"``, the answer's first token (extended
#: through a leading whitespace-only or partial-byte token, :meth:`Model.target_ids`), or
#: ``"all"``, the teacher-forced probability of the whole answer.
TARGETS = ("first", "all")


@dataclass
class Model:
    """A loaded causal LM with its tokenizer and adapter: structure, tokenization, hooks.

    ``checked`` is set by the load-time self-check (:mod:`knowloc.models.selfcheck`).
    """

    hf: nn.Module
    tokenizer: Any
    adapter: Adapter
    name: str
    revision: str | None = None
    checked: bool = field(default=False)
    #: The files the weights were loaded from (:func:`knowloc.models.load_model`); empty for
    #: a model built in memory, whose :meth:`weights_identity` hashes the state dict instead.
    weights_from: tuple[Path, ...] = ()
    #: The weights identity once computed (:func:`knowloc.models.weights.weights_identity`).
    _identity: dict[str, Any] | None = field(default=None, init=False, repr=False, compare=False)

    def weights_identity(self) -> dict[str, Any]:
        """What identifies the model's weights (:func:`knowloc.models.weights.weights_identity`):
        ``sha256``, ``source``, ``files``, ``revision`` and, embedded, ``gguf_sha256``."""
        from .weights import weights_identity

        return weights_identity(self)

    # ----------------------------------------------------------------- structure
    @property
    def config(self) -> Any:
        return self.hf.config

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers(self.config)

    @property
    def d_mlp(self) -> int:
        return self.adapter.d_mlp(self.config)

    @property
    def d_model(self) -> int:
        """Width of the residual stream (hidden size)."""
        return self.adapter.d_model(self.config)

    @property
    def n_heads(self) -> int:
        """Attention (query) heads per layer."""
        return self.adapter.n_heads(self.config)

    @property
    def n_kv_heads(self) -> int:
        """Key/value heads per layer (fewer than ``n_heads`` with grouped-query attention)."""
        return self.adapter.n_kv_heads(self.config)

    @property
    def head_dim(self) -> int:
        return self.adapter.head_dim(self.config)

    @property
    def context_length(self) -> int | None:
        """Maximum sequence length of the model (None when its config has none)."""
        return self.adapter.context_length(self.config)

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    def layers(self) -> Sequence[nn.Module]:
        return _get(self.hf, self.adapter.layers)

    def down_proj(self, layer: int) -> nn.Module:
        return _get(self.layers()[layer], self.adapter.down_proj)

    def mlp(self, layer: int) -> nn.Module:
        """The MLP block of ``layer`` (the down projection is its last operation)."""
        return _get(self.layers()[layer], self.adapter.mlp)

    def attention(self, layer: int) -> nn.Module:
        return _get(self.layers()[layer], self.adapter.attention)

    def base_model(self) -> nn.Module:
        """The decoder stack without the unembedding; its output is the final-normed hidden state."""
        return _get(self.hf, self.adapter.base)

    def unembedding(self) -> nn.Module:
        """The output projection (``get_output_embeddings()``, else the adapter's path)."""
        head = self.hf.get_output_embeddings()  # type: ignore[operator]
        out = head if head is not None else _get(self.hf, self.adapter.unembedding)
        assert isinstance(out, nn.Module)
        return out

    def logit_softcap(self) -> float | None:
        """Final logit soft-capping (Gemma 2 style), or None."""
        return self.adapter.logit_softcap(self.config)

    def unembedding_matrix(self) -> torch.Tensor:
        """[vocab, d_model]: row v maps the final hidden state to logit v (E in METHODS §3)."""
        weight = self.unembedding().weight
        assert isinstance(weight, torch.Tensor)
        return weight

    def value_vectors(self, layer: int) -> torch.Tensor:
        """[d_mlp, d_model] view of the value vectors of ``layer`` (writes go to the weight)."""
        w = self.down_proj(layer).weight
        assert isinstance(w, torch.Tensor)
        return w if self.adapter.down_proj_conv1d else w.t()

    # ---------------------------------------------------------------- tokenizing
    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of a prompt, with the special tokens the tokenizer adds by default."""
        if not prompt or not prompt.strip():
            raise TokenizationError("empty prompt")
        ids = self.tokenizer(prompt)["input_ids"]
        if len(ids) < 1:
            raise TokenizationError(f"prompt {prompt!r} tokenizes to nothing")
        return list(ids)

    def answer_ids(self, prompt: str, answer: str) -> list[int]:
        """Token ids of ``answer`` as it continues ``prompt`` (leading space, no specials).

        An answer that contains a special token (``<eos>``, ``<pad>``, ...) raises
        :class:`TokenizationError`: a special token is never an answer.
        """
        if not answer or not answer.strip():
            raise TokenizationError(f"empty answer for prompt {prompt!r}")
        answer = answer.strip()
        tok = self.tokenizer
        special = self.special_ids()
        named = [t for t in tok(" " + answer, add_special_tokens=False)["input_ids"] if t in special]
        if named:
            raise TokenizationError(
                f"answer {answer!r} contains the special token "
                f"{tok.convert_ids_to_tokens(named[0])!r}; an answer must be text"
            )
        full = tok(prompt + " " + answer)["input_ids"]
        head = tok(prompt)["input_ids"]
        if full[: len(head)] == head and len(full) > len(head):
            ids = list(full[len(head):])
        else:
            ids = list(tok(" " + answer, add_special_tokens=False)["input_ids"])
        ids = [i for i in ids if i not in special]
        if not ids:
            raise TokenizationError(
                f"answer {answer!r} tokenizes to nothing for prompt {prompt!r}"
            )
        return ids

    def target_ids(self, prompt: str, answer: str, target: str = "first") -> list[int]:
        """The answer tokens whose teacher-forced probability is attributed.

        ``target="all"``: every token of the answer. ``"first"``: the answer's first token
        -- extended through the following tokens when it names nothing by itself, i.e. the
        shortest prefix of the answer that decodes to a complete (no partial UTF-8 byte)
        text with a non-whitespace character. On most answers that is the first token; on
        Gemma, ``" 1961"`` starts with a bare space token and ``first`` is space + ``"1"``,
        so a target is never a whitespace-only token or a lone byte of an emoji.
        """
        if target not in TARGETS:
            raise ConfigError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
        ids = self.answer_ids(prompt, answer)
        if target == "all":
            return ids
        for k in range(1, len(ids) + 1):
            text = self.tokenizer.decode(ids[:k])
            if text.strip() and "\ufffd" not in text:
                return ids[:k]
        return ids

    def eos_id(self) -> int:
        tok = self.tokenizer
        for attr in ("eos_token_id", "pad_token_id"):
            v = getattr(tok, attr, None)
            if v is not None:
                return int(v)
        v = self.adapter.eos_token_id(self.config)
        if v is None:
            raise ModelError("the tokenizer has no EOS or pad token (needed for baselines)")
        return int(v)

    def mask_id(self) -> int:
        """The token used to mask a word (SIG): mask, else pad, else EOS."""
        tok = self.tokenizer
        for attr in ("mask_token_id", "pad_token_id"):
            v = getattr(tok, attr, None)
            if v is not None:
                return int(v)
        return self.eos_id()

    def special_ids(self) -> set[int]:
        return set(getattr(self.tokenizer, "all_special_ids", []) or [])

    # ------------------------------------------------------------ hooks and shortcuts
    @contextlib.contextmanager
    def hook_activations(self, fn: ActivationFn,
                         layers: Sequence[int] | None = None) -> Iterator[None]:
        """Temporarily replace the down-projection input of ``layers`` by ``fn(layer, h)``.

        ``h`` is ``[batch, seq, d_mlp]``; ``fn`` returns the tensor to use instead. The hooks
        are removed on exit, also on error.
        """
        handles = []
        try:
            for layer in range(self.n_layers) if layers is None else layers:
                def pre(module: nn.Module, args: tuple[Any, ...], _l: int = layer) -> tuple[Any, ...]:
                    return (fn(_l, args[0]),) + tuple(args[1:])

                handles.append(self.down_proj(layer).register_forward_pre_hook(pre))
            yield
        finally:
            for h in handles:
                h.remove()
