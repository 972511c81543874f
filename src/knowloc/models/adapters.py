"""Architecture adapters: where things live inside one family of Hugging Face models.

A *knowledge neuron* ``(layer, neuron)`` is the ``neuron``-th input of the MLP down
projection of ``layer`` (METHODS §0): GPT-2 ``mlp.c_proj`` input = GELU(c_fc x);
LLaMA/Gemma/Qwen/Mistral ``mlp.down_proj`` input = act(gate x) * (up x); GPT-NeoX
``mlp.dense_4h_to_h`` input. Its *value vector* is the matching column of the down
projection's ``nn.Linear`` weight (row of GPT-2's ``Conv1D`` weight).

Adapters are frozen dataclasses looked up by ``config.model_type`` (then
``config.architectures[0]``), never by a substring of a model name. Every read of a
transformers config key happens here: the rest of knowloc asks the adapter (or the
:class:`~knowloc.models.Model`, which asks the adapter).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ..errors import ModelError

log = logging.getLogger(__name__)

__all__ = ["ADAPTERS", "Adapter", "find_adapter", "supported_architectures"]


@dataclass(frozen=True)
class Adapter:
    """Where things live inside one architecture family, and which config keys size it."""

    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    base: str  # attribute path of the base model (returns the final-normed hidden state)
    layers: str  # attribute path of the decoder layer list
    down_proj: str  # path, relative to a layer, of the MLP down projection
    down_proj_conv1d: bool  # GPT-2 Conv1D: weight is [d_mlp, d_model]
    attention: str  # path, relative to a layer, of the attention module
    unembedding: str  # path of the output projection (lm_head)
    n_layers_key: str = "num_hidden_layers"
    d_mlp_key: str = "intermediate_size"
    # when the config stores None under d_mlp_key: d_mlp = this factor x d_model (GPT-2's
    # n_inner=None means 4 * n_embd); None: the key is required
    d_mlp_default_factor: int | None = None
    d_model_key: str = "hidden_size"
    n_heads_key: str = "num_attention_heads"
    n_kv_heads_key: str | None = "num_key_value_heads"  # None: no GQA (kv heads = heads)
    head_dim_key: str | None = "head_dim"  # None or missing: d_model // heads
    logit_softcap_key: str = "final_logit_softcapping"
    context_keys: tuple[str, ...] = ("max_position_embeddings",)
    mlp: str = "mlp"  # path, relative to a layer, of the MLP block (down_proj is its last op)

    # ------------------------------------------------------------------ sizes
    def n_layers(self, config: Any) -> int:
        return int(getattr(config, self.n_layers_key))

    def d_model(self, config: Any) -> int:
        """Width of the residual stream (hidden size)."""
        return int(getattr(config, self.d_model_key))

    def d_mlp(self, config: Any) -> int:
        """Number of neurons per layer (inputs of the down projection)."""
        value = getattr(config, self.d_mlp_key, None)
        if value is None:
            if self.d_mlp_default_factor is not None:
                return self.d_mlp_default_factor * self.d_model(config)
            raise ModelError(f"config has no {self.d_mlp_key!r}; cannot size the MLP")
        return int(value)

    def n_heads(self, config: Any) -> int:
        """Attention (query) heads per layer."""
        return int(getattr(config, self.n_heads_key))

    def n_kv_heads(self, config: Any) -> int:
        """Key/value heads per layer (fewer than :meth:`n_heads` with grouped-query attention)."""
        value = getattr(config, self.n_kv_heads_key, None) if self.n_kv_heads_key else None
        return int(value) if value else self.n_heads(config)

    def head_dim(self, config: Any) -> int:
        """Width of one attention head."""
        value = getattr(config, self.head_dim_key, None) if self.head_dim_key else None
        return int(value) if value else self.d_model(config) // self.n_heads(config)

    def logit_softcap(self, config: Any) -> float | None:
        """Final logit soft-cap c (logits -> c tanh(logits / c), Gemma 2 style), or None."""
        value = getattr(config, self.logit_softcap_key, None)
        return float(value) if value else None

    def eos_token_id(self, config: Any) -> int | None:
        """The config's end-of-sequence token (the first one when it lists several)."""
        value = getattr(config, "eos_token_id", None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        return None if value is None else int(value)

    def context_length(self, config: Any) -> int | None:
        """Maximum sequence length the model was built for, None when the config has none."""
        for key in self.context_keys:
            value = getattr(config, key, None)
            if value:
                return int(value)
        return None


ADAPTERS: tuple[Adapter, ...] = (
    Adapter(
        name="gpt2",
        model_types=("gpt2",),
        architectures=("GPT2LMHeadModel",),
        base="transformer",
        layers="transformer.h",
        down_proj="mlp.c_proj",
        down_proj_conv1d=True,
        attention="attn",
        unembedding="lm_head",
        n_layers_key="n_layer",
        d_mlp_key="n_inner",
        d_mlp_default_factor=4,
        d_model_key="n_embd",
        n_heads_key="n_head",
        n_kv_heads_key=None,
        head_dim_key=None,
        context_keys=("n_positions", "n_ctx"),
    ),
    Adapter(
        name="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3"),
        architectures=(
            "LlamaForCausalLM",
            "MistralForCausalLM",
            "Qwen2ForCausalLM",
            "Qwen3ForCausalLM",
        ),
        base="model",
        layers="model.layers",
        down_proj="mlp.down_proj",
        down_proj_conv1d=False,
        attention="self_attn",
        unembedding="lm_head",
    ),
    Adapter(
        name="gemma3",
        model_types=("gemma3_text", "gemma2", "gemma"),
        architectures=("Gemma3ForCausalLM", "Gemma2ForCausalLM", "GemmaForCausalLM"),
        base="model",
        layers="model.layers",
        down_proj="mlp.down_proj",
        down_proj_conv1d=False,
        attention="self_attn",
        unembedding="lm_head",
    ),
    Adapter(
        name="gpt_neox",
        model_types=("gpt_neox",),
        architectures=("GPTNeoXForCausalLM",),
        base="gpt_neox",
        layers="gpt_neox.layers",
        down_proj="mlp.dense_4h_to_h",
        down_proj_conv1d=False,
        attention="attention",
        unembedding="lm_head",
        n_kv_heads_key=None,
        head_dim_key=None,
    ),
)


def supported_architectures() -> list[str]:
    return sorted({t for a in ADAPTERS for t in a.model_types})


def find_adapter(config: Any) -> Adapter:
    """The adapter for a transformers config, by ``model_type`` then ``architectures[0]``."""
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    archs = getattr(config, "architectures", None) or []
    if archs:
        for adapter in ADAPTERS:
            if archs[0] in adapter.architectures:
                return adapter
    raise ModelError(
        f"unsupported architecture (model_type={model_type!r}, architectures={archs}); "
        f"supported model types: {', '.join(supported_architectures())}"
    )
