"""Adapters, hooks, value vectors, answer tokenization and device/dtype resolution."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from tiny import ARCHS, configs, make_tokenizer, tiny_model

from knowloc.errors import DeviceError, ModelError, TokenizationError
from knowloc.models import (
    Model,
    find_adapter,
    resolve_device,
    resolve_dtype,
    self_check,
    supported_architectures,
    wrap,
)
from knowloc.models.forward import prompt_activations

PROMPT = "the official language of brazil is"

EXPECTED_ADAPTER = {
    "gpt2": "gpt2",
    "llama": "llama",
    "qwen2": "llama",
    "mistral": "llama",
    "gemma3": "gemma3",
    "gpt_neox": "gpt_neox",
}
# tiny configs: GPT-2 n_inner=48, the others intermediate_size=40; hidden size 32 everywhere
EXPECTED_D_MLP = {"gpt2": 48, "llama": 40, "qwen2": 40, "mistral": 40, "gemma3": 40,
                  "gpt_neox": 40}
EXPECTED_KV_HEADS = {"gpt2": 4, "llama": 2, "qwen2": 2, "mistral": 2, "gemma3": 1,
                     "gpt_neox": 4}
# a module of each architecture whose input is NOT the neuron (wrong hook site)
WRONG_SITE = {
    "gpt2": "mlp.c_fc",
    "llama": "mlp.up_proj",
    "qwen2": "mlp.gate_proj",
    "mistral": "mlp.up_proj",
    "gemma3": "mlp.up_proj",
    "gpt_neox": "mlp.dense_h_to_4h",
}


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request):
    return tiny_model(request.param)


def _arch(model: Model) -> str:
    return model.name.removeprefix("tiny-")


def _no_hooks_left(model: Model) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.hf.modules())


@torch.no_grad()
def _logits(model: Model, prompt: str = PROMPT) -> torch.Tensor:
    ids = torch.tensor([model.encode_prompt(prompt)])
    return model.hf(input_ids=ids).logits[0].float()


# ----------------------------------------------------------------------- adapters
def test_every_tiny_arch_is_covered():
    assert set(ARCHS) == set(EXPECTED_ADAPTER)


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_lookup_by_model_type(arch):
    cfg = configs()[arch]
    assert find_adapter(cfg).name == EXPECTED_ADAPTER[arch]
    assert cfg.model_type in supported_architectures()


def test_adapter_lookup_falls_back_to_architectures():
    cfg = SimpleNamespace(model_type="my_private_llama", architectures=["Qwen2ForCausalLM"])
    assert find_adapter(cfg).name == "llama"
    cfg = SimpleNamespace(model_type="my_gpt", architectures=["GPT2LMHeadModel"])
    assert find_adapter(cfg).name == "gpt2"
    with pytest.raises(ModelError, match="unsupported architecture"):
        find_adapter(SimpleNamespace(model_type="my_gpt", architectures=["MyForCausalLM"]))


def test_adapter_lookup_never_uses_the_model_name():
    cfg = SimpleNamespace(model_type="bert", architectures=["BertModel"],
                          _name_or_path="meta-llama/Llama-2-7b-hf")
    with pytest.raises(ModelError):
        find_adapter(cfg)


def test_structure_is_read_from_the_config(tiny):
    arch = _arch(tiny)
    assert tiny.adapter.name == EXPECTED_ADAPTER[arch]
    assert tiny.n_layers == 3
    assert tiny.d_mlp == EXPECTED_D_MLP[arch]
    assert tiny.d_mlp != 4 * 32  # not the 4 x hidden default
    for layer in range(tiny.n_layers):
        assert tuple(tiny.value_vectors(layer).shape) == (tiny.d_mlp, 32)
    assert tuple(prompt_activations(tiny, tiny.encode_prompt(PROMPT)).shape) == (3, tiny.d_mlp)
    # attention sizes from the tiny configs: 4 heads of width 8; kv heads as configured
    assert (tiny.d_model, tiny.n_heads, tiny.head_dim) == (32, 4, 8)
    assert tiny.n_kv_heads == EXPECTED_KV_HEADS[arch]
    assert tiny.context_length == 64


def test_gpt2_without_n_inner_means_four_times_hidden():
    from transformers import GPT2Config

    cfg = GPT2Config(n_layer=2, n_embd=24, n_head=4, n_inner=None)
    assert find_adapter(cfg).d_mlp(cfg) == 96
    cfg = GPT2Config(n_layer=2, n_embd=24, n_head=4, n_inner=50)
    assert find_adapter(cfg).d_mlp(cfg) == 50


def test_self_check_passes(tiny):
    tiny.checked = False
    self_check(tiny)
    assert tiny.checked
    assert _no_hooks_left(tiny)


@pytest.mark.parametrize("arch", ARCHS)
def test_self_check_catches_a_wrong_hook_site(arch):
    good = tiny_model(arch)
    bad_adapter = dataclasses.replace(good.adapter, down_proj=WRONG_SITE[arch])
    bad = Model(hf=good.hf, tokenizer=good.tokenizer, adapter=bad_adapter, name="broken")
    with pytest.raises(ModelError, match="self-check failed"):
        self_check(bad)
    assert not bad.checked
    assert _no_hooks_left(good)
    self_check(good)  # the model itself is untouched


def test_self_check_catches_a_wrong_weight_orientation():
    good = tiny_model("llama")
    bad = Model(hf=good.hf, tokenizer=good.tokenizer,
                adapter=dataclasses.replace(good.adapter, down_proj_conv1d=True), name="broken")
    with pytest.raises(ModelError, match="self-check failed"):
        self_check(bad)
    assert _no_hooks_left(good)


def _square_llama() -> Model:
    """A LLaMA whose MLP width equals its hidden size: shapes cannot tell modules apart."""
    from tiny import VOCAB
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.3, vocab_size=VOCAB, pad_token_id=0, eos_token_id=1,
                      bos_token_id=2)
    return wrap(AutoModelForCausalLM.from_config(cfg), make_tokenizer(True), name="square")


@pytest.mark.parametrize("site", ["mlp.up_proj", "self_attn.o_proj"])
def test_self_check_catches_a_wrong_site_of_the_right_shape(site):
    good = _square_llama()
    bad = Model(hf=good.hf, tokenizer=good.tokenizer,
                adapter=dataclasses.replace(good.adapter, down_proj=site), name="broken")
    with pytest.raises(ModelError):
        self_check(bad)


# ---------------------------------------------------------- hooks and value vectors
def test_value_vector_zeroing_equals_activation_zeroing(tiny):
    base = _logits(tiny)
    acts = prompt_activations(tiny, tiny.encode_prompt(PROMPT))
    gen = torch.Generator().manual_seed(1)
    for layer in range(tiny.n_layers):
        neurons = [int(acts[layer].abs().argmax())] + torch.randint(
            tiny.d_mlp, (2,), generator=gen).tolist()

        def zero(_l, h, neurons=neurons):
            h = h.clone()
            h[..., neurons] = 0
            return h

        with tiny.hook_activations(zero, [layer]):
            via_act = _logits(tiny)
        vv = tiny.value_vectors(layer)
        saved = vv[neurons].clone()
        try:
            vv[neurons] = 0
            via_weight = _logits(tiny)
        finally:
            vv[neurons] = saved
        assert torch.allclose(via_act, via_weight, atol=1e-5, rtol=1e-5)
        assert (via_act - base).abs().max() > 1e-4  # the intervention did something
    assert torch.equal(_logits(tiny), base)  # weights restored
    assert _no_hooks_left(tiny)


def test_value_vectors_is_a_view_of_the_down_projection(tiny):
    layer = 1
    vv = tiny.value_vectors(layer)
    w = tiny.down_proj(layer).weight
    assert vv.data_ptr() == w.data_ptr()
    if tiny.adapter.down_proj_conv1d:
        assert torch.equal(vv, w)
    else:
        assert torch.equal(vv, w.t())


def test_hook_activations_sees_and_replaces_the_neurons(tiny):
    ids = tiny.encode_prompt(PROMPT)
    acts = prompt_activations(tiny, ids)
    seen = {}

    def grab(layer, h):
        seen[layer] = h[0, -1].clone()
        return h

    with tiny.hook_activations(grab):
        _logits(tiny)
    assert sorted(seen) == [0, 1, 2]
    for layer in range(3):
        assert torch.equal(seen[layer], acts[layer])
    # replacing the last layer's activations by zeros = zeroing all its value vectors
    with tiny.hook_activations(lambda l, h: torch.zeros_like(h), [2]):
        zeroed = _logits(tiny)
    vv = tiny.value_vectors(2)
    saved = vv.clone()
    try:
        vv.zero_()
        expect = _logits(tiny)
    finally:
        vv.copy_(saved)
    assert torch.allclose(zeroed, expect, atol=1e-5)


def test_hooks_are_removed_after_an_exception(tiny):
    base = _logits(tiny)

    class Boom(RuntimeError):
        pass

    with pytest.raises(Boom), tiny.hook_activations(lambda l, h: h * 0):
        raise Boom()
    assert _no_hooks_left(tiny)
    assert torch.equal(_logits(tiny), base)

    def explode(layer, h):
        if layer == 1:
            raise Boom()
        return h

    with pytest.raises(Boom), tiny.hook_activations(explode):
        _logits(tiny)
    assert _no_hooks_left(tiny)
    assert torch.equal(_logits(tiny), base)


def test_activations_do_not_track_gradients(tiny):
    acts = prompt_activations(tiny, tiny.encode_prompt(PROMPT))
    assert not acts.requires_grad
    assert all(not p.requires_grad for p in tiny.hf.parameters())


# ----------------------------------------------------------- answer tokenization
@pytest.mark.parametrize("bos", [False, True])
def test_answer_ids_tiny_tokenizer(bos):
    model = tiny_model("gpt2" if not bos else "llama")
    tok = model.tokenizer
    portuguese = tok.convert_tokens_to_ids("portuguese")
    assert model.answer_ids(PROMPT, "portuguese") == [portuguese]
    assert model.answer_ids(PROMPT, "  Portuguese ") == [portuguese]  # stripped, lower-cased
    assert model.answer_ids(PROMPT, "portuguese language") == [
        portuguese, tok.convert_tokens_to_ids("language")]
    assert model.target_ids(PROMPT, "portuguese") == [portuguese]
    ids = model.encode_prompt(PROMPT)
    if bos:
        assert ids[0] == tok.bos_token_id
        assert tok.bos_token_id not in model.answer_ids(PROMPT, "portuguese")
    else:
        assert tok.convert_tokens_to_ids("<bos>") not in ids
    with pytest.raises(TokenizationError):
        model.answer_ids(PROMPT, " ")
    with pytest.raises(TokenizationError):
        model.encode_prompt("   ")


def test_special_token_ids(tiny):
    tok = tiny.tokenizer
    assert tiny.eos_id() == tok.eos_token_id == 1
    assert tiny.mask_id() == tok.mask_token_id
    assert {0, 1, 3, 4} <= tiny.special_ids()


@pytest.mark.slow
def test_gemma_answer_tokenization(gemma):
    prompt = "The official language of Brazil is"
    ids = gemma.answer_ids(prompt, "Portuguese")
    assert ids == [41082]
    assert gemma.tokenizer.decode(ids) == " Portuguese"
    assert gemma.target_ids(prompt, " Portuguese ") == [41082]
    bos = gemma.tokenizer.bos_token_id
    assert gemma.encode_prompt(prompt)[0] == bos
    assert bos not in ids
    assert gemma.special_ids().isdisjoint(gemma.answer_ids(prompt, "Rio de Janeiro"))


# ------------------------------------------------------------------ device/dtype
def test_cuda_without_cuda_is_a_device_error():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    for dev in ("cuda", "cuda:0", torch.device("cuda")):
        with pytest.raises(DeviceError, match="CUDA"):
            resolve_device(dev)


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type in ("cpu", "cuda")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(DeviceError, match="unsupported device"):
        resolve_device("mps")


def test_unknown_device_string_is_a_device_error():
    # torch.device("foo") raises a bare RuntimeError; it must become a DeviceError so the
    # CLI prints one line instead of a traceback
    for bad in ("foo", "gpu"):
        with pytest.raises(DeviceError):
            resolve_device(bad)


def test_dtypes():
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype(torch.float16) is torch.float16
    for bad in ("float64", "fp32", "int8"):
        with pytest.raises(DeviceError, match="unsupported dtype"):
            resolve_dtype(bad)


def test_load_model_bad_device_or_dtype_fails_before_loading(monkeypatch):
    import transformers

    from knowloc.models import load_model

    def boom(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    with pytest.raises(DeviceError):
        load_model("gemma3-270m", dtype="float64")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError):
            load_model("gemma3-270m", device="cuda")


def test_load_model_unknown_name_is_a_model_error(tmp_path):
    from knowloc.models import load_model

    with pytest.raises(ModelError, match="cannot load model"):
        load_model(str(tmp_path / "no-such-model"))


def test_package_exports_are_listed_and_resolve():
    import knowloc

    assert set(knowloc.__all__) == set(knowloc._EXPORTS) | {"__version__", "reproduce"}
    for name in knowloc.__all__:
        assert getattr(knowloc, name) is not None
    assert callable(knowloc.reproduce)  # the module, callable like its function
