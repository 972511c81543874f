"""The fast attribution engine against a plain reference, captum, and IG's completeness."""

from __future__ import annotations

import pytest
import torch
from reference_attribution import reference_attribute
from tiny import ARCHS, tiny_model

from knowloc import attribute
from knowloc.attribution import AttributionConfig
from knowloc.errors import ConfigError, DeviceError, ModelError, TokenizationError
from knowloc.models import find_adapter, load_model

PROMPT, ANSWER = "the official language of brazil is", "portuguese"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request):
    return tiny_model(request.param)


@pytest.mark.parametrize("method", ["ig", "sig", "amig"])
def test_fast_engine_matches_reference(tiny, method):
    ref = reference_attribute(tiny, PROMPT, ANSWER, method, n_steps=8)
    fast = attribute(tiny, (PROMPT, ANSWER), method, n_steps=8, progress=False)
    assert fast.scores.shape == (tiny.n_layers, tiny.d_mlp)
    assert rel_err(fast.scores, ref) < 1e-5


@pytest.mark.parametrize("method", ["ig", "sig", "amig"])
def test_fast_engine_equals_reference_in_float64(tiny, method):
    """In float64 rounding cannot hide a difference: the engine (prefix cache, staircase
    batches, fused head) computes the same numbers as the plain loop."""
    import copy

    from knowloc.models import wrap

    m64 = wrap(copy.deepcopy(tiny.hf).double(), tiny.tokenizer, name="tiny-f64", check=False)
    ref = reference_attribute(m64, PROMPT, ANSWER, method, n_steps=7)
    fast = attribute(m64, (PROMPT, ANSWER), method, n_steps=7, internal_batch_size=5, progress=False)
    assert ref.dtype == fast.scores.dtype == torch.float64
    assert rel_err(fast.scores, ref) < 1e-12


@pytest.mark.parametrize("batch", [3, 10_000])
def test_sig_per_token_equals_reference_in_float64(batch):
    """Several baselines share the alpha = 1 point (row 0 of the first pass); with a small
    batch their other points are spread over many passes."""
    import copy

    from knowloc.models import wrap

    tiny = tiny_model("gemma3")
    m64 = wrap(copy.deepcopy(tiny.hf).double(), tiny.tokenizer, name="tiny-f64", check=False)
    ref = reference_attribute(m64, PROMPT, ANSWER, "sig", n_steps=4, sig_mode="per_token")
    fast = attribute(m64, (PROMPT, ANSWER), "sig", n_steps=4, sig_mode="per_token",
                     internal_batch_size=batch, progress=False)
    assert rel_err(fast.scores, ref) < 1e-12


@pytest.mark.parametrize("block", [7, 8192])
def test_fused_head_matches_autograd_softmax(monkeypatch, block):
    """P(target), its gradient and the top token from the blocked online-softmax head equal
    a dense float64 softmax differentiated by autograd (blocks of 7 rows split the vocab
    into many blocks and a partial last one)."""
    import copy

    from knowloc.attribution import head as A
    from knowloc.models import wrap

    tiny = tiny_model("llama")
    model = wrap(copy.deepcopy(tiny.hf).double(), tiny.tokenizer, name="tiny-f64", check=False)
    monkeypatch.setattr(A, "HEAD_BLOCK", block)
    W = model.unembedding().weight
    torch.manual_seed(1)
    hidden = torch.randn(5, W.shape[1], dtype=torch.float64) * 3
    hidden[3] = W[11] * 50  # row 3: token 11 dominates, p close to 1
    for target in (0, 11, W.shape[0] - 1):
        p, g, top = A.target_prob_grad(model, hidden, target, max_rows=2, argmax_row=3)[:3]
        h = hidden.clone().requires_grad_(True)
        ref_p = torch.softmax(h @ W.t(), -1)[:, target]
        (ref_g,) = torch.autograd.grad(ref_p.sum(), h)
        assert torch.allclose(p, ref_p.detach(), rtol=1e-12, atol=1e-300)
        assert rel_err(g, ref_g) < 1e-10
        assert top == int((hidden[3] @ W.t()).argmax()) == 11


@pytest.mark.parametrize("block", [7, 8192])
@pytest.mark.parametrize("cap", [None, 0.5])
def test_forward_only_head_rows_match_dense_softmax(monkeypatch, block, cap):
    """P(target) of forward-only rows -- alone (target_prob) or riding on a fused head call
    (``extra``) -- equals a dense float64 softmax, soft-capped or not; and the riding rows
    leave the fused call's own outputs unchanged to the bit."""
    import copy

    from knowloc.attribution import head as A
    from knowloc.models import wrap

    tiny = tiny_model("llama")
    model = wrap(copy.deepcopy(tiny.hf).double(), tiny.tokenizer, name="tiny-f64", check=False)
    monkeypatch.setattr(A, "HEAD_BLOCK", block)
    monkeypatch.setattr(type(model), "logit_softcap", lambda self: cap)
    W = model.unembedding().weight
    torch.manual_seed(2)
    hidden = torch.randn(5, W.shape[1], dtype=torch.float64) * 3
    extra = torch.randn(4, W.shape[1], dtype=torch.float64) * 3
    extra[1] = W[5] * 50  # p close to 1
    for target in (0, 5, W.shape[0] - 1):
        z = extra @ W.t()
        if cap:
            z = torch.tanh(z / cap) * cap
        ref = torch.softmax(z, -1)[:, target]
        alone = A.target_prob(model, extra, target, max_rows=3)
        assert torch.allclose(alone, ref, rtol=1e-12, atol=1e-300)
        plain = A.target_prob_grad(model, hidden, target, max_rows=2, argmax_row=1)
        riding = A.target_prob_grad(model, hidden, target, max_rows=2, argmax_row=1,
                                    extra=extra)
        assert plain.extra is None
        assert torch.equal(riding.prob, plain.prob) and torch.equal(riding.grad, plain.grad)
        assert riding.top == plain.top
        # the same products as one target_prob call over the same rows
        assert torch.equal(riding.extra, A.target_prob(model, extra, target))


def test_soft_capped_logits_match_reference():
    """Gemma 2 style final-logit soft-capping goes through the fused head's chain rule."""
    model = tiny_model("gemma3")
    model.hf.config.final_logit_softcapping = 0.5  # small: tanh far from linear
    assert model.logit_softcap() == 0.5
    refs = {}
    for method in ("ig", "amig"):
        refs[method] = reference_attribute(model, PROMPT, ANSWER, method, n_steps=6)
        fast = attribute(model, (PROMPT, ANSWER), method, n_steps=6, progress=False)
        assert rel_err(fast.scores, refs[method]) < 1e-5
    model.hf.config.final_logit_softcapping = None
    uncapped = attribute(model, (PROMPT, ANSWER), "ig", n_steps=6, progress=False)
    assert rel_err(uncapped.scores, refs["ig"]) > 1e-3  # the cap does change the result


def test_sig_per_token_matches_reference(tiny):
    ref = reference_attribute(tiny, PROMPT, ANSWER, "sig", n_steps=5, sig_mode="per_token")
    fast = attribute(tiny, (PROMPT, ANSWER), "sig", n_steps=5, sig_mode="per_token", progress=False)
    assert rel_err(fast.scores, ref) < 1e-5
    mean = attribute(tiny, (PROMPT, ANSWER), "sig", n_steps=5, progress=False)
    assert rel_err(mean.scores, fast.scores) > 1e-4  # the two SIG readings really differ


@pytest.mark.parametrize("method", ["ig", "amig"])
@pytest.mark.parametrize("batch", [1, 5, 13, 10_000])
def test_internal_batch_size_does_not_change_results(method, batch):
    model = tiny_model("llama")
    base = attribute(model, (PROMPT, ANSWER), method, n_steps=6, internal_batch_size=6, progress=False)
    other = attribute(model, (PROMPT, ANSWER), method, n_steps=6, internal_batch_size=batch,
                      progress=False)
    assert rel_err(other.scores, base.scores) < 1e-5


def test_tiny_memory_budget_blocks_the_head_without_changing_results():
    model = tiny_model("gpt2")
    base = attribute(model, (PROMPT, ANSWER), "ig", n_steps=4, progress=False)
    tiny_budget = attribute(model, (PROMPT, ANSWER), "ig", n_steps=4, memory_budget_gb=1e-6,
                            progress=False)  # one point per pass, one head row per block
    assert rel_err(tiny_budget.scores, base.scores) < 1e-5


def test_probability_and_prediction_match_a_plain_forward(tiny):
    attr = attribute(tiny, (PROMPT, ANSWER), "ig", n_steps=2, progress=False)
    ids = torch.tensor([tiny.encode_prompt(PROMPT)])
    with torch.no_grad():
        p = torch.softmax(tiny.hf(input_ids=ids).logits[0, -1], -1)
    assert attr.target_id == tiny.tokenizer.convert_tokens_to_ids("portuguese")
    assert attr.prob == pytest.approx(float(p[attr.target_id]), rel=1e-5)
    assert attr.predicted_id == int(p.argmax())
    assert attr.top1 == (attr.predicted_id == attr.target_id)


def _prob_with_layer_zeroed(model, layer):
    ids = torch.tensor([model.encode_prompt(PROMPT)])
    target = model.target_ids(PROMPT, ANSWER)[0]

    def zero(l, h):
        h = h.clone()
        h[:, -1] = 0
        return h

    with torch.no_grad(), model.hook_activations(zero, [layer]):
        return float(torch.softmax(model.hf(input_ids=ids).logits[0, -1], -1)[target])


def _completeness_error(model, m):
    attr = attribute(model, (PROMPT, ANSWER), "ig", n_steps=m, progress=False)
    deltas = torch.tensor([attr.prob - _prob_with_layer_zeroed(model, l)
                           for l in range(model.n_layers)])
    sums = attr.scores.sum(1)
    return float((sums - deltas).abs().max() / deltas.abs().max())


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
def test_ig_completeness(arch):
    """Sum over a layer's neurons of IG -> P(a) - P(layer zeroed), with O(1/m) error.

    The tiny models are deliberately very non-linear (init std 0.3); the real-model test
    checks the < 1% error at m = 100 on SmolLM2.
    """
    model = tiny_model(arch)
    e10, e100, e400 = (_completeness_error(model, m) for m in (10, 100, 400))
    assert e100 < 0.03 and e400 < 0.008
    assert e10 > 5 * e100 and e100 > 3 * e400  # first-order convergence of the Riemann sum


def test_gemma_post_mlp_norm_makes_layer_ig_scale_invariant():
    """Gemma normalizes the MLP output (post_feedforward_layernorm), so P is constant along
    alpha * a for alpha in (0, 1]: per-layer IG sums are ~0 although P(a) != P(0)."""
    model = tiny_model("gemma3")
    attr = attribute(model, (PROMPT, ANSWER), "ig", n_steps=50, progress=False)
    deltas = torch.tensor([attr.prob - _prob_with_layer_zeroed(model, l)
                           for l in range(model.n_layers)])
    assert deltas.abs().min() > 1e-3
    assert attr.scores.sum(1).abs().max() < 1e-2 * deltas.abs().min()
    assert attr.scores.abs().max() > 1e-5  # individual neurons still get attributions


@pytest.mark.parametrize("method", ["ig", "amig", "sig"])
def test_captum_integrated_gradients_oracle(method):
    """Per-neuron IG of one layer equals captum's IntegratedGradients on the same target."""
    captum_attr = pytest.importorskip("captum.attr")
    model = tiny_model("gemma3")
    m = 12
    ours = attribute(model, (PROMPT, ANSWER), method, n_steps=m, progress=False)
    # undo the method's normalization to compare the raw per-layer integrals
    from reference_attribution import reference_baselines

    ids = model.encode_prompt(PROMPT)
    base = reference_baselines(model, ids, method)[0]
    target = model.target_ids(PROMPT, ANSWER)[0]
    x_ids = torch.tensor([ids])
    raw = torch.zeros(model.n_layers, model.d_mlp)
    for layer in range(model.n_layers):
        def forward(acts, layer=layer):
            def patch(l, h):
                h = h.expand(acts.shape[0], *h.shape[1:]).clone()
                h[:, -1] = acts
                return h

            with model.hook_activations(patch, [layer]):
                logits = model.hf(input_ids=x_ids.expand(acts.shape[0], -1)).logits[:, -1]
            return torch.softmax(logits, -1)[:, target]

        ig = captum_attr.IntegratedGradients(forward)
        a = ours.activations[layer][None]
        raw[layer] = ig.attribute(a, baselines=base[layer][None], n_steps=m,
                                  method="riemann_right")[0].detach()
    if method == "sig":
        raw = raw / raw.norm()
    elif method == "amig":
        raw = raw / raw.sum().abs()
    assert rel_err(ours.scores, raw) < 1e-5


def test_queries_objects_and_lists():
    from knowloc.data import load_facts

    model = tiny_model("gpt2")
    single = attribute(model, (PROMPT, ANSWER), "ig", n_steps=2, progress=False)
    many = attribute(model, [(PROMPT, ANSWER), ("the capital of france is", "paris")], "ig",
                     n_steps=2, progress=False)
    assert isinstance(many, list) and len(many) == 2
    assert torch.equal(many[0].scores, single.scores)
    fs = load_facts("builtin", relations=["P37"], facts_per_relation=1)
    q = fs.queries()[0]
    a = attribute(model, q, "ig", n_steps=2, progress=False)
    assert a.query_id == q.query_id and a.fact_id == q.fact_id


# ------------------------------------------------------------------- bad input
def test_n_steps_below_two_is_an_error():
    model = tiny_model("gpt2")
    for bad in (0, 1):
        with pytest.raises(ConfigError, match="n_steps"):
            attribute(model, (PROMPT, ANSWER), "ig", n_steps=bad, progress=False)
    with pytest.raises(ConfigError, match="unknown attribution method"):
        AttributionConfig(method="lrp").validate()


def test_answer_that_tokenizes_to_nothing():
    model = tiny_model("llama")
    with pytest.raises(TokenizationError, match="answer"):
        attribute(model, (PROMPT, "   "), "ig", n_steps=2, progress=False)


def test_cuda_requested_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(DeviceError, match="CUDA"):
        load_model("gemma3-270m", device="cuda")


def test_unsupported_architecture_lists_supported():
    from transformers import BertConfig

    with pytest.raises(ModelError, match="supported model types: .*gemma3_text.*gpt2.*llama"):
        find_adapter(BertConfig())
