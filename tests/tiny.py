"""Tiny random models of every supported architecture, built in-process (no download)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from knowloc.models import Model, wrap

WORDS = ["the", "official", "language", "of", "brazil", "is", "portuguese", "capital", "france", "paris", "spain", "madrid", "german", "germany", "berlin", "italy", "rome", "italian", "spanish", "french", "english", "japan", "tokyo", "japanese", "city", "country", "born", "in", "a", "an", "and", "was", "by", "to", "language", "spoken", "people", "speak", "known", "as"]
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]


def make_tokenizer(bos: bool) -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = None
    from tokenizers import normalizers

    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tk.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>" if bos else None,
        unk_token="<unk>",
        mask_token="<mask>",
    )


VOCAB = len(SPECIALS) + len(WORDS)


def configs() -> dict:
    common = {"vocab_size": VOCAB, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
    return {
        "gpt2": GPT2Config(n_layer=3, n_embd=32, n_head=4, n_positions=64, n_inner=48,
                           initializer_range=0.3, **common),
        "llama": LlamaConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=64, initializer_range=0.3, **common),
        "gemma3": Gemma3TextConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                                   sliding_window=3,
                                   layer_types=["sliding_attention", "full_attention",
                                                "sliding_attention"],
                                   max_position_embeddings=64, initializer_range=0.3,
                                   query_pre_attn_scalar=8, **common),
        "gpt_neox": GPTNeoXConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                                  num_attention_heads=4, max_position_embeddings=64,
                                  initializer_range=0.3, **common),
        "qwen2": Qwen2Config(hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=64, initializer_range=0.3, **common),
        "mistral": MistralConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=64, initializer_range=0.3, **common),
    }


ARCHS = tuple(configs())


def tiny_model(arch: str, seed: int = 0, dtype=torch.float32, check: bool = True) -> Model:
    torch.manual_seed(seed)
    cfg = configs()[arch]
    hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    tok = make_tokenizer(bos=arch != "gpt2")
    return wrap(hf, tok, name=f"tiny-{arch}", check=check)


# ------------------------------------------------------------- a small facts file (JSONL)
LANGUAGE_TEMPLATES = ["the official language of [X] is [Y]", "the language spoken in [X] is [Y]",
                      "people in [X] speak [Y]", "in [X] people speak [Y]"]
LANGUAGE_FACTS = [("brazil", "portuguese"), ("france", "french"), ("spain", "spanish"),
                  ("germany", "german"), ("italy", "italian"), ("japan", "japanese")]
CAPITAL_TEMPLATES = ["[X] is the capital of [Y]", "[X] is the capital city of [Y]",
                     "[X] , the capital of [Y]"]
CAPITAL_FACTS = [("paris", "france"), ("madrid", "spain"), ("berlin", "germany")]


def write_facts_jsonl(path) -> None:
    """Six P37 facts (4 templates each) and three P1376 facts (3 templates each)."""
    import json

    with open(path, "w") as f:
        for rel, facts, templates in (("P37", LANGUAGE_FACTS, LANGUAGE_TEMPLATES),
                                      ("P1376", CAPITAL_FACTS, CAPITAL_TEMPLATES)):
            f.writelines(json.dumps({"relation": rel, "subject": subj, "object": obj,
                                     "templates": templates}) + "\n" for subj, obj in facts)
