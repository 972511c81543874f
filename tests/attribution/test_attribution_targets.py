"""Attribution targets (first token / whole answer), AMIG's |sum| normalization, and
saving attributions."""

from __future__ import annotations

import copy

import pytest
import torch
from reference_attribution import reference_answer_prob, reference_attribute
from tiny import tiny_model

from knowloc import attribute
from knowloc.attribution import Attribution, AttributionConfig
from knowloc.errors import ConfigError, DataError, TokenizationError
from knowloc.models import answer_scores, next_token_probs, wrap

PROMPT, ANSWER = "the official language of brazil is", "portuguese"
# a multi-token answer in the tiny vocabulary (every word is one token)
LONG_PROMPT, LONG_ANSWER = "paris is", "the capital of france"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def f64(model):
    return wrap(copy.deepcopy(model.hf).double(), model.tokenizer, name="tiny-f64", check=False)


def plain_answer_prob(model, prompt, answer, layer=None, acts=None):
    """Teacher-forced P(answer) by a plain full-sequence forward, with the last prompt
    position's activations of ``layer`` replaced by ``acts`` [batch, d_mlp]."""
    ids = model.encode_prompt(prompt)
    ans = model.target_ids(prompt, answer, "all")
    x = torch.tensor([ids + ans[:-1]])
    n = 1 if acts is None else acts.shape[0]

    def patch(l, h):
        h = h.expand(n, *h.shape[1:]).clone()
        h[:, len(ids) - 1] = acts
        return h

    if acts is None:
        logits = model.hf(input_ids=x).logits
    else:
        with model.hook_activations(patch, [layer]):
            logits = model.hf(input_ids=x.expand(n, -1)).logits
    return reference_answer_prob(logits.to(torch.promote_types(model.dtype, torch.float32)),
                                 len(ids), ans)


# --------------------------------------------------------------- whole-answer target
@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3", "gpt_neox"])
@pytest.mark.parametrize("method", ["ig", "amig"])
def test_all_target_equals_reference_in_float64(arch, method):
    """The teacher-forced suffix on the prefix cache (staircase batches, one fused head per
    answer position, product rule) computes what the plain full-sequence loop computes."""
    m64 = f64(tiny_model(arch))
    assert len(m64.target_ids(LONG_PROMPT, LONG_ANSWER, "all")) == 4
    ref = reference_attribute(m64, LONG_PROMPT, LONG_ANSWER, method, n_steps=5, target="all")
    fast = attribute(m64, (LONG_PROMPT, LONG_ANSWER), method, n_steps=5, target="all",
                     internal_batch_size=4, progress=False)
    assert fast.scores.dtype == torch.float64
    assert rel_err(fast.scores, ref) < 1e-10
    assert fast.target_ids == tuple(m64.target_ids(LONG_PROMPT, LONG_ANSWER, "all"))
    assert fast.config["target"] == "all"
    # P(answer) and "known" agree with a plain forward and with greedy decoding
    with torch.no_grad():
        p = plain_answer_prob(m64, LONG_PROMPT, LONG_ANSWER)
        ids = torch.tensor([m64.encode_prompt(LONG_PROMPT)])
        out = m64.hf.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert fast.prob == pytest.approx(float(p[0]), rel=1e-10)
    assert fast.top1 == (out[0, ids.shape[1]:].tolist() == list(fast.target_ids))


def test_all_target_is_the_first_target_for_a_one_token_answer():
    model = tiny_model("llama")
    first = attribute(model, (PROMPT, ANSWER), "ig", n_steps=4, progress=False)
    whole = attribute(model, (PROMPT, ANSWER), "ig", n_steps=4, target="all", progress=False)
    assert torch.equal(first.scores, whole.scores) and first.prob == whole.prob
    assert first.config["target"] == "first" and whole.config["target"] == "all"


def test_all_target_matches_captum_on_a_layer():
    captum_attr = pytest.importorskip("captum.attr")
    model = tiny_model("gemma3")
    m = 10
    ours = attribute(model, (LONG_PROMPT, LONG_ANSWER), "ig", n_steps=m, target="all",
                     progress=False)
    for layer in range(model.n_layers):
        ig = captum_attr.IntegratedGradients(
            lambda acts, layer=layer: plain_answer_prob(model, LONG_PROMPT, LONG_ANSWER,
                                                        layer, acts))
        a = ours.activations[layer][None]
        theirs = ig.attribute(a, baselines=torch.zeros_like(a), n_steps=m,
                              method="riemann_right")[0].detach()
        assert rel_err(ours.scores[layer], theirs) < 1e-5


def test_all_target_ig_completeness():
    """Sum over a layer of IG of P(answer) -> P(a) - P(layer zeroed), first-order in 1/m."""
    model = f64(tiny_model("gpt2"))  # P(answer) ~ 1e-8 on this random model: float64
    ids = model.encode_prompt(LONG_PROMPT)
    with torch.no_grad():
        deltas = torch.tensor([
            float(plain_answer_prob(model, LONG_PROMPT, LONG_ANSWER)[0]
                  - plain_answer_prob(model, LONG_PROMPT, LONG_ANSWER, layer,
                                      torch.zeros(1, model.d_mlp, dtype=torch.float64))[0])
            for layer in range(model.n_layers)], dtype=torch.float64)
    assert len(ids) > 1 and deltas.abs().min() > 1e-3 * deltas.abs().max()
    errs = []
    for m in (25, 200):
        attr = attribute(model, (LONG_PROMPT, LONG_ANSWER), "ig", n_steps=m, target="all",
                         progress=False)
        errs.append(float((attr.scores.sum(1) - deltas).abs().max() / deltas.abs().max()))
    assert errs[1] < 0.01 and errs[0] > 3 * errs[1]


def test_answer_scores_is_teacher_forcing_and_greedy_decoding():
    model = tiny_model("llama")
    ids = model.encode_prompt(LONG_PROMPT)
    ans = model.target_ids(LONG_PROMPT, LONG_ANSWER, "all")
    s = answer_scores(model, [ids], [ans])
    with torch.no_grad():
        p = plain_answer_prob(model, LONG_PROMPT, LONG_ANSWER)
        out = model.hf.generate(torch.tensor([ids]), max_new_tokens=len(ans), do_sample=False,
                                pad_token_id=0)[0, len(ids):]
    assert float(s.prob[0]) == pytest.approx(float(p[0]), rel=1e-5)
    assert bool(s.known[0]) == (out.tolist() == ans)
    # the greedy token at the first answer position is the model's next token
    assert int(s.greedy[0, 0]) == int(out[0])
    # a known answer: the model's own greedy continuation
    own = answer_scores(model, [ids], [out.tolist()])
    assert bool(own.known[0])
    # one token: exactly next_token_probs (screening's numbers do not change)
    one = answer_scores(model, [ids], [ans[:1]])
    assert float(one.prob[0]) == float(next_token_probs(model, [ids])[0, ans[0]])


# --------------------------------------------------------------------- target choice
@pytest.fixture(scope="module")
def gemma_tokenizer_model():
    from transformers import AutoTokenizer

    from knowloc import embedded
    from knowloc.models import Model
    from knowloc.models.adapters import ADAPTERS

    tok = AutoTokenizer.from_pretrained(embedded.embedded_model_dir("gemma3-270m"))
    return Model(hf=None, tokenizer=tok, adapter=ADAPTERS[2], name="gemma-tokenizer")


def test_first_target_is_never_a_bare_space_or_a_partial_byte(gemma_tokenizer_model):
    """Gemma splits " 1961" into " " + digits: ``first`` goes through the space to the first
    digit; ``all`` is every token."""
    m = gemma_tokenizer_model
    tok = m.tokenizer
    prompt = "Alan Turing was born in the year"
    for answer in ("1961", "🇫🇷 France", "😀", "Paris", "New York City"):
        ids = m.target_ids(prompt, answer, "first")
        text = tok.decode(ids)
        assert text.strip() and "\ufffd" not in text
        assert not tok.decode(ids[:-1]).strip() or "\ufffd" in tok.decode(ids[:-1])
        assert m.target_ids(prompt, answer, "all")[: len(ids)] == ids
    assert [tok.decode([i]) for i in m.target_ids(prompt, "1961", "first")] == [" ", "1"]
    assert tok.decode(m.target_ids(prompt, "1961", "all")) == " 1961"
    assert len(m.target_ids(prompt, "Paris", "first")) == 1


def test_special_token_answers_are_rejected(gemma_tokenizer_model):
    for answer in ("<eos>", "<pad>", "Paris <eos>"):
        with pytest.raises(TokenizationError, match="special token"):
            gemma_tokenizer_model.target_ids("The capital of France is", answer)
    model = tiny_model("llama")
    with pytest.raises(TokenizationError, match="special token '<eos>'"):
        attribute(model, (PROMPT, "<eos>"), "ig", n_steps=2, progress=False)
    with pytest.raises(ConfigError, match="target"):
        attribute(model, (PROMPT, ANSWER), "ig", n_steps=2, target="last", progress=False)
    with pytest.raises(ConfigError, match="target"):
        AttributionConfig(target="both").validate()


# ------------------------------------------------------------------------- AMIG sign
def test_amig_with_a_negative_sum_keeps_the_sign_of_each_contribution():
    """On this tiny query the raw AMIG map sums to < 0: dividing by the raw sum would make
    the neurons that push against the answer the top ones. Divided by |sum|, the knowledge
    neurons are those with the largest positive contribution."""
    from knowloc.attribution.methods import (
        AttributionMethod,
        amig_baseline,
        register_method,
        unregister_method,
    )

    model = f64(tiny_model("llama"))
    amig = attribute(model, (PROMPT, ANSWER), "amig", n_steps=6, progress=False)
    ref = reference_attribute(model, PROMPT, ANSWER, "amig", n_steps=6)
    assert rel_err(amig.scores, ref) < 1e-12
    # the raw map: AMIG's baseline without a normalization
    register_method(AttributionMethod(name="amig_raw", label="raw", baseline=amig_baseline))
    try:
        raw = attribute(model, (PROMPT, ANSWER), "amig_raw", n_steps=6, progress=False)
    finally:
        unregister_method("amig_raw")
    raw_sum = float(raw.scores.sum())
    assert raw_sum < 0
    assert float(amig.scores.sum()) == pytest.approx(-1.0, rel=1e-12)
    assert rel_err(amig.scores, raw.scores / abs(raw_sum)) < 1e-12
    assert torch.equal(amig.scores.flatten().argsort(), raw.scores.flatten().argsort())
    assert amig.top(1)[0][:2] == raw.top(1)[0][:2] and amig.top(1)[0][2] > 0
    assert amig.config["normalization"] == "abs_sum"


# ------------------------------------------------------------------------- save/load
def test_attribution_save_load_round_trip(tmp_path):
    model = tiny_model("gpt2")
    attr = attribute(model, (LONG_PROMPT, LONG_ANSWER), "sig", n_steps=3, target="all",
                     progress=False)
    attr.extra["note"] = "x"
    path = attr.save(tmp_path / "a.pt")
    back = Attribution.load(path)
    assert torch.equal(back.scores, attr.scores) and back.scores.dtype == attr.scores.dtype
    assert torch.equal(back.activations, attr.activations)
    for name in ("prompt", "answer", "target_id", "target_ids", "method", "prob", "top1",
                 "predicted_id", "predicted", "config", "query_id", "fact_id", "relation",
                 "extra"):
        assert getattr(back, name) == getattr(attr, name), name
    assert back.top(5) == attr.top(5)
    with pytest.raises(DataError, match="no such attribution file"):
        Attribution.load(tmp_path / "missing.pt")
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(DataError, match="not a saved knowloc attribution"):
        Attribution.load(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_text("junk")
    with pytest.raises(DataError, match="not a saved knowloc attribution"):
        Attribution.load(tmp_path / "junk.pt")
