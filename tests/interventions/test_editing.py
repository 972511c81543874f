"""Weight edits and activation interventions: exact restore, equivalence, real effects."""

from __future__ import annotations

import hashlib

import pytest
import torch
from tiny import ARCHS, tiny_model

from knowloc.errors import ConfigError
from knowloc.interventions.activations import intervene, intervention_probs
from knowloc.interventions.weights import Edit, weights_digest
from knowloc.models.forward import prompt_probs

PROMPT = "the official language of brazil is"


def _logits(model, prompt=PROMPT):
    ids = torch.tensor([model.encode_prompt(prompt)])
    with torch.no_grad():
        return model.hf(input_ids=ids).logits[0, -1].double()


def _neurons(model, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    layers = torch.randint(0, model.n_layers, (k,), generator=g)
    cols = torch.randint(0, model.d_mlp, (k,), generator=g)
    return [(int(a), int(b)) for a, b in zip(layers, cols)]


@pytest.mark.parametrize("arch", ARCHS)
def test_update_is_restored_bit_for_bit_also_after_an_exception(arch):
    m = tiny_model(arch)
    before = weights_digest(m)
    tok = m.tokenizer
    o, o2 = tok.convert_tokens_to_ids("portuguese"), tok.convert_tokens_to_ids("french")
    edit = Edit.update(_neurons(m), o, o2)
    with edit.applied(m):
        assert weights_digest(m) != before  # the edit really changed the weights
    assert weights_digest(m) == before
    with pytest.raises(RuntimeError, match="boom"), edit.applied(m):
        assert weights_digest(m) != before
        raise RuntimeError("boom")
    assert weights_digest(m) == before
    with pytest.raises(KeyboardInterrupt), Edit.erase(_neurons(m, 7, seed=3)).applied(m):
        raise KeyboardInterrupt
    assert weights_digest(m) == before


def test_weights_digest_sees_a_one_ulp_change():
    m = tiny_model("llama")
    before = weights_digest(m)
    w = m.down_proj(1).weight
    with torch.no_grad():
        w[3, 5] = torch.nextafter(w[3, 5], torch.tensor(float("inf")))
    assert weights_digest(m) != before


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_update_writes_the_formula_into_the_right_weight_orientation(arch):
    m = tiny_model(arch)
    tok = m.tokenizer
    o, o2 = tok.convert_tokens_to_ids("portuguese"), tok.convert_tokens_to_ids("french")
    layer, neuron = 1, 7
    E = m.hf.get_output_embeddings().weight.detach().clone()
    # read the raw weight ourselves: GPT-2 Conv1D is [d_mlp, d_model], nn.Linear [d_model, d_mlp]
    W = m.down_proj(layer).weight
    raw = (lambda w: w[neuron]) if arch == "gpt2" else (lambda w: w[:, neuron])
    old = raw(W).detach().clone()
    other = W.detach().clone()
    with Edit.update([(layer, neuron)], o, o2).applied(m):
        torch.testing.assert_close(raw(W), old - 2 * E[o] + 2 * E[o2])
        diff = (W != other)
        if arch == "gpt2":
            diff[neuron] = False
        else:
            diff[:, neuron] = False
        assert not diff.any()  # nothing else moved
    with Edit.erase([(layer, neuron)]).applied(m):
        assert torch.count_nonzero(raw(W)) == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_activation_times_zero_equals_weight_erasure(arch):
    m = tiny_model(arch)
    neurons = _neurons(m, 6, seed=1)
    base = _logits(m)
    with intervene(m, neurons, 0.0, positions="all"):
        via_act = _logits(m)
    with Edit.erase(neurons).applied(m):
        via_weight = _logits(m)
    assert (via_act - base).abs().max() > 1e-4  # the neurons matter
    torch.testing.assert_close(via_act, via_weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(m), base, atol=0, rtol=0)  # hooks removed


def test_last_position_intervention_equals_erasure_on_a_one_token_prompt():
    m = tiny_model("gpt2")  # no BOS: "brazil" is one token
    neurons = _neurons(m, 6, seed=2)
    with intervene(m, neurons, 0.0):
        a = _logits(m, "brazil")
    with Edit.erase(neurons).applied(m):
        b = _logits(m, "brazil")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_enhancement_scales_only_the_last_position():
    m = tiny_model("llama")
    neurons = [(0, 3), (2, 11)]
    seen = {}

    def grab(layer, h):
        seen[layer] = h.detach().clone()
        return h

    ids = torch.tensor([m.encode_prompt(PROMPT)])
    with m.hook_activations(grab):
        m.hf(input_ids=ids)
    plain = dict(seen)
    with intervene(m, neurons, 2.0), m.hook_activations(grab):
        m.hf(input_ids=ids)
    # layer 2's input at neuron 11, last position, doubled; earlier positions of layer 0 unchanged
    torch.testing.assert_close(seen[0][0, :-1], plain[0][0, :-1])
    # (grab runs after intervene's hook in registration order, so it sees the scaled value)
    torch.testing.assert_close(seen[0][0, -1, 3], 2 * plain[0][0, -1, 3])


def test_batched_intervention_probs_match_one_at_a_time():
    m = tiny_model("gemma3")
    ids = m.encode_prompt(PROMPT)
    target = m.answer_ids(PROMPT, "portuguese")[0]
    variants = [(_neurons(m, 5, seed=s), scale) for s, scale in ((0, 0.0), (1, 2.0), (2, 0.0))]
    probs = intervention_probs(m, ids, variants, [target]).float()
    assert probs.shape == (4,)
    torch.testing.assert_close(probs[0], prompt_probs(m, [PROMPT])[0, target], atol=1e-6,
                               rtol=1e-5)
    for row, (neurons, scale) in enumerate(variants, start=1):
        with intervene(m, neurons, scale):
            ref = prompt_probs(m, [PROMPT])[0, target]
        torch.testing.assert_close(probs[row], ref, atol=1e-6, rtol=1e-5)


def test_empty_edit_is_a_noop_and_says_so():
    m = tiny_model("llama")
    e = Edit.erase([])
    assert e.empty and len(e) == 0
    before = weights_digest(m)
    with e.applied(m):
        assert weights_digest(m) == before
    with intervene(m, [], 0.0):
        torch.testing.assert_close(_logits(m), _logits(m))


def test_bad_edits_are_clean_errors():
    m = tiny_model("llama")
    with pytest.raises(ConfigError, match="outside"), Edit.erase([(m.n_layers, 0)]).applied(m):
        pass
    with pytest.raises(ConfigError, match="unknown edit operation"):
        Edit("scramble", ((0, 1),))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="needs target_id"):
        Edit("update", ((0, 1),))


def test_edits_never_touch_the_model_files(tmp_path):
    from knowloc.models import load_model

    m = tiny_model("llama")
    m.hf.save_pretrained(tmp_path)
    m.tokenizer.save_pretrained(tmp_path)

    def files():
        return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
                for p in sorted(tmp_path.iterdir())}

    before = files()
    loaded = load_model(str(tmp_path))
    with Edit.erase(_neurons(loaded, 8)).applied(loaded):
        assert files() == before
    with Edit.update(_neurons(loaded, 8), 5, 6).applied(loaded):
        pass
    assert files() == before


# ----------------------------------------------------------------- real model (slow)
FACTS = [
    ("The official language of Brazil is", "Portuguese", "Spanish"),
    ("The capital of France is", "Paris", "Berlin"),
    ("The capital of Japan is", "Tokyo", "Madrid"),
    ("The official language of Germany is", "German", "French"),
    ("The capital of Italy is", "Rome", "Vienna"),
]


@pytest.fixture(scope="module")
def gemma_kns(gemma):
    from knowloc.attribution import attribute
    from knowloc.neurons import knowledge_neurons

    out = []
    for prompt, answer, new in FACTS:
        attr = attribute(gemma, (prompt, answer), "amig", n_steps=6, progress=False)
        out.append((prompt, answer, new, sorted(knowledge_neurons(attr, 0.2))))
    return out


@pytest.mark.slow
def test_erasing_knowledge_neurons_lowers_p_answer_on_gemma(gemma, gemma_kns):
    before_digest = weights_digest(gemma)
    lowered = 0
    for prompt, answer, _, kns in gemma_kns:
        t = gemma.answer_ids(prompt, answer)[0]
        p_b = float(prompt_probs(gemma, [prompt])[0, t])
        with Edit.erase(kns).applied(gemma):
            p_a = float(prompt_probs(gemma, [prompt])[0, t])
        lowered += p_a < p_b
    assert lowered >= 4, f"erasure lowered P(answer) on only {lowered} of {len(gemma_kns)} facts"
    assert weights_digest(gemma) == before_digest


@pytest.mark.slow
def test_update_raises_p_new_object_on_gemma(gemma, gemma_kns):
    """With the sign of each neuron's activation, update raises P(o′) on most facts. The
    paper's unsigned formula does not on Gemma: its strongest knowledge neurons often read
    their value vectors with a negative activation (gated MLP), which turns +2E(o′) into
    −2|a|E(o′); pinned here so that a change of behaviour is noticed."""
    from knowloc.interventions.weights import activation_signs

    signed = plain = 0
    for prompt, answer, new, kns in gemma_kns:
        t, t2 = gemma.answer_ids(prompt, answer)[0], gemma.answer_ids(prompt, new)[0]
        p_b = float(prompt_probs(gemma, [prompt])[0, t2])
        signs = activation_signs(gemma, [gemma.encode_prompt(prompt)], kns)
        with Edit.update(kns, t, t2, signs=signs).applied(gemma):
            signed += float(prompt_probs(gemma, [prompt])[0, t2]) > p_b
        with Edit.update(kns, t, t2).applied(gemma):
            plain += float(prompt_probs(gemma, [prompt])[0, t2]) > p_b
    assert signed >= 4, f"signed update raised P(o') on only {signed} of {len(gemma_kns)} facts"
    assert plain < signed
