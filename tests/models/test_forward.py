"""The one forward path (models/forward.py) and the transformers touch points (compat.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from tiny import ARCHS, tiny_model

from knowloc import attribute
from knowloc.models import compat, forward
from knowloc.models.forward import prompt_activations, prompt_probs

PROMPT = "the official language of brazil is"
OTHER = "people in japan speak the language"  # another prompt of the same length (6 words)


@pytest.mark.parametrize("arch", ARCHS)
def test_next_token_probs_equal_the_full_model_softmax(arch):
    m = tiny_model(arch)
    ids = [m.encode_prompt(PROMPT), m.encode_prompt(OTHER)]
    assert len(ids[0]) == len(ids[1])
    probs = forward.next_token_probs(m, ids)
    with torch.no_grad():
        ref = torch.softmax(m.hf(input_ids=torch.tensor(ids)).logits[:, -1].float(), -1)
    assert probs.dtype == torch.float32 and probs.shape == ref.shape
    torch.testing.assert_close(probs, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2), atol=1e-5, rtol=0)
    # Model.next_token_probs runs each prompt on its own through the same path
    torch.testing.assert_close(prompt_probs(m, [PROMPT, OTHER]), probs, atol=1e-6, rtol=1e-5)


def test_softcap_is_applied_once_and_matches_transformers():
    m = tiny_model("gemma3")
    m.hf.config.final_logit_softcapping = 0.5
    try:
        ids = [m.encode_prompt(PROMPT)]
        logits = forward.next_token_logits(m, ids)
        with torch.no_grad():
            ref = m.hf(input_ids=torch.tensor(ids)).logits[:, -1].float()  # capped by the model
        assert float(logits.abs().max()) <= 0.5
        torch.testing.assert_close(logits, ref, atol=1e-6, rtol=1e-5)
    finally:
        m.hf.config.final_logit_softcapping = None
    assert forward.apply_softcap(torch.tensor([3.0]), None).item() == 3.0
    assert forward.apply_softcap(torch.tensor([300.0]), 2.0).item() == pytest.approx(2.0)


def test_activations_and_probs_with_a_hook():
    m = tiny_model("llama")
    ids = m.encode_prompt(PROMPT)
    acts, probs = forward.activations_and_probs(m, ids)
    assert acts.device.type == "cpu" and probs.device.type == "cpu"
    torch.testing.assert_close(acts, prompt_activations(m, ids).float())
    torch.testing.assert_close(probs, prompt_probs(m, [ids])[0].cpu())

    def zero_layer_1(layer, h):
        return h * 0 if layer == 1 else h

    acts0, probs0 = forward.activations_and_probs(m, ids, act_fn=zero_layer_1)
    assert float(acts0[1].abs().max()) == 0  # recorded after the hook
    torch.testing.assert_close(acts0[0], acts[0])  # earlier layers untouched
    assert float((probs0 - probs).abs().max()) > 1e-4
    batch = forward.last_activations(m, torch.tensor([ids, m.encode_prompt(OTHER)]))
    assert tuple(batch.shape) == (2, m.n_layers, m.d_mlp)
    torch.testing.assert_close(batch[0], prompt_activations(m, ids), atol=1e-4, rtol=1e-4)


def test_cache_argument_follows_the_installed_transformers():
    installed = tuple(int(p) for p in transformers.__version__.split(".")[:2])
    assert compat.TRANSFORMERS_VERSION[:2] == installed
    renamed = compat.TRANSFORMERS_VERSION >= compat.CACHE_RENAMED_IN
    assert compat.CACHE_KWARG == ("cache" if renamed else "past_key_values")
    assert compat.cache_kwargs(None) == {}
    m = tiny_model("llama")
    ids = torch.tensor([m.encode_prompt(PROMPT)])
    with torch.no_grad():
        out = m.base_model()(input_ids=ids[:, :-1], use_cache=True)
        cache = compat.output_cache(out)
        rows = compat.repeat_cache_rows(cache, [3] * m.n_layers)
        step = m.base_model()(input_ids=ids[:, -1:].repeat(3, 1), use_cache=True,
                              **compat.cache_kwargs(rows))
        full = m.base_model()(input_ids=ids, use_cache=False)
    assert cache.get_seq_length() == ids.shape[1] - 1  # the original is left as it was
    for r in range(3):  # the cached continuation equals the full pass
        torch.testing.assert_close(step.last_hidden_state[r, -1], full.last_hidden_state[0, -1],
                                   atol=1e-5, rtol=1e-5)


def _localize_with_warnings_as_errors(model, prompt: str, answer: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for method in ("ig", "sig", "amig"):
            attr = attribute(model, (prompt, answer), method, n_steps=3, progress=False)
            assert torch.isfinite(attr.scores).all()
        prompt_probs(model, [prompt])


@pytest.mark.parametrize("arch", ARCHS)
def test_localization_emits_no_warning(arch):
    """No deprecation (or any other) warning from a localization: the cache goes through
    the argument the installed transformers supports."""
    _localize_with_warnings_as_errors(tiny_model(arch), PROMPT, "portuguese")


@pytest.mark.slow
def test_localization_on_gemma_emits_no_warning(gemma):
    _localize_with_warnings_as_errors(gemma, "The official language of Brazil is", "Portuguese")
