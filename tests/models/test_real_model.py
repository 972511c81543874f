"""Real pretrained weights: embedded Gemma 3 270M and SmolLM2 135M (LLaMA), and ParaRel."""

from __future__ import annotations

import pytest
import torch
from conftest import PARAREL
from reference_attribution import reference_attribute

from knowloc import attribute, knowledge_neurons, load_facts
from knowloc.models.forward import prompt_probs

pytestmark = pytest.mark.slow

BRAZIL = ("The official language of Brazil is", "Portuguese")
FRANCE = ("The capital of France is", "Paris")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------------- Gemma
def test_gemma_knows_brazil(gemma):
    prompt, answer = BRAZIL
    target = gemma.answer_ids(prompt, answer)[0]
    assert target == 41082
    p = prompt_probs(gemma, [prompt])[0]
    assert int(p.argmax()) == target
    assert float(p[target]) == pytest.approx(0.886, abs=0.02)


def test_gemma_ig_finds_knowledge_neurons(gemma):
    attr = attribute(gemma, BRAZIL, "ig", n_steps=20, progress=False)
    assert attr.scores.shape == (gemma.n_layers, gemma.d_mlp) == (18, 2048)
    assert attr.top1 and attr.predicted == " Portuguese"
    assert attr.prob == pytest.approx(0.886, abs=0.02)
    assert torch.isfinite(attr.scores).all()
    kn = knowledge_neurons(attr)
    assert 1 <= len(kn) < 0.01 * attr.scores.numel()
    assert all(0 <= l < 18 and 0 <= p < 2048 for l, p in kn)
    best = attr.top(1)[0]
    assert (best[0], best[1]) in kn


# Exactness is checked where rounding cannot hide a bug: the fast engine and the plain
# reference (tests/reference_attribution.py) both run on a float64 copy of the model and must
# agree to F64_TOL. In float32 two implementations of a deep model's gradients differ by
# rounding alone, so the float32 engine is checked against that float64 truth instead: it
# must be within float32 accuracy and closer to it than the float32 plain loop is (measured
# here: SmolLM2 ig 3.5e-6 vs 2.7e-5, amig 1.3e-5 vs 3.1e-4; 3.7e-5 for amig on another CPU).
# transformers' LLaMA RMSNorm computes in float32 even in a float64 model, so the two
# implementations' different batchings leave float32 rounding in the last bits: SmolLM2 IG
# measured 3.7e-9 on an AVX-512 CPU (below 1e-9 on others). A different integral (n_steps
# 5 instead of 4) is 1e-3 away, six orders above this tolerance.
F64_TOL = 1e-8
FLOAT32_AGREE = 1e-3


def _f64(model):
    import copy

    from knowloc.models import wrap

    return wrap(copy.deepcopy(model.hf).double(), model.tokenizer, name=f"{model.name}-f64",
                check=False)


@pytest.fixture(scope="module")
def gemma_f64(gemma):
    return _f64(gemma)


@pytest.fixture(scope="module")
def smollm2_f64(smollm2):
    return _f64(smollm2)


def test_gemma_fast_engine_equals_reference_float64(gemma_f64):
    ref = reference_attribute(gemma_f64, *BRAZIL, "ig", n_steps=3)
    fast = attribute(gemma_f64, BRAZIL, "ig", n_steps=3, progress=False)
    assert fast.scores.dtype == torch.float64
    err = rel_err(fast.scores, ref)
    print(f"gemma ig n_steps=3, float64: fast vs reference relative max-abs error {err:.2e}")
    assert err < F64_TOL


def test_gemma_fast_engine_matches_float32_reference(gemma):
    ref = reference_attribute(gemma, *BRAZIL, "ig", n_steps=3)
    fast = attribute(gemma, BRAZIL, "ig", n_steps=3, progress=False)
    err = rel_err(fast.scores, ref)
    print(f"gemma ig n_steps=3: fast vs float32 reference relative max-abs error {err:.2e}")
    assert err < FLOAT32_AGREE


# ----------------------------------------------------------------------- SmolLM2
def test_smollm2_is_llama_and_knows_paris(smollm2):
    assert smollm2.adapter.name == "llama" and smollm2.config.model_type == "llama"
    assert smollm2.checked
    p = prompt_probs(smollm2, [FRANCE[0]])[0]
    assert int(p.argmax()) == smollm2.answer_ids(*FRANCE)[0]


_REF: dict[tuple[str, str], torch.Tensor] = {}


def _ref(model, method: str) -> torch.Tensor:
    key = (model.name, method)
    if key not in _REF:
        _REF[key] = reference_attribute(model, *FRANCE, method, n_steps=4)
    return _REF[key]


@pytest.mark.parametrize("method", ["ig", "sig", "amig"])
def test_smollm2_fast_engine_equals_reference_float64(smollm2_f64, method):
    ref = _ref(smollm2_f64, method)
    fast = attribute(smollm2_f64, FRANCE, method, n_steps=4, progress=False)
    assert fast.scores.shape == (smollm2_f64.n_layers, smollm2_f64.d_mlp) == ref.shape
    err = rel_err(fast.scores, ref)
    print(f"smollm2 {method} n_steps=4, float64: fast vs reference {err:.2e}")
    assert err < F64_TOL
    if method == "ig":  # the tolerance does tell a different integral apart
        other = attribute(smollm2_f64, FRANCE, method, n_steps=5, progress=False)
        assert rel_err(other.scores, ref) > 1e-3


# float32 accuracy: IG's map is checked at 1e-5. AMIG divides by the sum of the map, which
# cancels (positive and negative scores); with SmolLM2's large activations (|a| ~ 1e2-1e3)
# its float32 floor is a few 1e-5 on any implementation.
FLOAT32_TOL = {"ig": 1e-5, "sig": 1e-4, "amig": 1e-4}


@pytest.mark.parametrize("method", ["ig", "sig", "amig"])
def test_smollm2_float32_engine_is_accurate(smollm2, smollm2_f64, method):
    exact = _ref(smollm2_f64, method)
    fast = attribute(smollm2, FRANCE, method, n_steps=4, progress=False).scores.double()
    ref = _ref(smollm2, method).double()
    e_fast, e_ref = rel_err(fast, exact), rel_err(ref, exact)
    print(f"smollm2 {method} n_steps=4 vs float64 truth: float32 fast engine {e_fast:.2e}, "
          f"float32 reference {e_ref:.2e}, fast vs float32 reference {rel_err(fast, ref):.2e}")
    assert e_fast < FLOAT32_TOL[method]
    assert e_fast < e_ref
    assert rel_err(fast, ref) < FLOAT32_AGREE


def _prob_with_layer_zeroed(model, prompt: str, target: int, layer: int) -> float:
    ids = torch.tensor([model.encode_prompt(prompt)])

    def zero(_l, h):
        h = h.clone()
        h[:, -1] = 0
        return h

    with torch.no_grad(), model.hook_activations(zero, [layer]):
        return float(torch.softmax(model.hf(input_ids=ids).logits[0, -1].float(), -1)[target])


def test_smollm2_ig_completeness(smollm2):
    """Per layer, sum_p IG(l, p) = P(a) - P(layer's last-position activations zeroed), up to
    the Riemann-sum error: < 1% of the largest |delta| at m = 100."""
    prompt = FRANCE[0]
    attr = attribute(smollm2, FRANCE, "ig", n_steps=100, progress=False)
    deltas = torch.tensor([attr.prob - _prob_with_layer_zeroed(smollm2, prompt, attr.target_id, l)
                           for l in range(smollm2.n_layers)])
    sums = attr.scores.sum(1)
    err = float((sums - deltas).abs().max() / deltas.abs().max())
    print(f"smollm2 IG completeness at m=100: max |sum - delta| / max |delta| = {err:.4%} "
          f"(max |delta| = {float(deltas.abs().max()):.4f})")
    assert deltas.abs().max() > 1e-3  # zeroing a layer matters
    assert err < 0.01


# ----------------------------------------------------------------------- ParaRel
@pytest.fixture(scope="module")
def pararel():
    if not (PARAREL / "graphs_json").is_dir():
        pytest.skip(f"ParaRel not present at {PARAREL}")
    return PARAREL


def test_pararel_has_39_relations(pararel):
    from knowloc.data import pararel_relations

    rels = pararel_relations(pararel)
    assert len(rels) == 39
    assert "P36" in rels and "P37" in rels
    assert rels == sorted(rels)


def test_pararel_load_p36(pararel):
    fs = load_facts(f"pararel:{pararel}", relations=["P36"], facts_per_relation=3)
    assert len(fs) == 3
    assert fs.relations == ["P36"]
    assert fs.source.startswith("pararel")
    qids = [q.query_id for q in fs.queries()]
    assert len(qids) == len(set(qids))
    for f in fs:
        assert f.relation == "P36" and len(f.queries) >= 2
        assert len({q.prompt for q in f.queries}) == len(f.queries)  # distinct paraphrases
        for q in f.queries:
            assert q.answer == f.object and q.fact_id == f.fact_id
            assert f.subject in q.prompt
            assert q.template.endswith(" [Y]") and "[X]" in q.template
            assert q.prompt == q.prompt.strip() and "[Y]" not in q.prompt
    # the same source given as a plain directory
    same = load_facts(pararel, relations=["P36"], facts_per_relation=3)
    assert [q.query_id for q in same.queries()] == qids


def test_gemma_amig_negative_sum_selects_positive_contributions(gemma):
    """"The government of France is based in the city of" -> Paris: the raw AMIG map sums
    to < 0 on the embedded Gemma; divided by |sum| the knowledge neurons are the neurons
    with the largest positive contribution (the raw sum's sign would pick the opposite)."""
    from knowloc.attribution.methods import (
        AttributionMethod,
        amig_baseline,
        register_method,
        unregister_method,
    )

    q = ("The government of France is based in the city of", "Paris")
    amig = attribute(gemma, q, "amig", n_steps=20, progress=False)
    register_method(AttributionMethod(name="amig_raw", label="raw", baseline=amig_baseline))
    try:
        raw = attribute(gemma, q, "amig_raw", n_steps=20, progress=False)
    finally:
        unregister_method("amig_raw")
    assert amig.top1 and float(raw.scores.sum()) < 0
    assert float(amig.scores.sum()) == pytest.approx(-1.0, rel=1e-4)
    kn = knowledge_neurons(amig, threshold=0.2)
    top = {(layer, n) for layer, n, _, _ in raw.top(len(kn))}
    assert kn and set(kn) == top
    assert all(float(raw.scores[layer, n]) > 0 for layer, n in kn)


def test_gemma_numeric_answer_target(gemma):
    """" 1961" is a space token then digits on Gemma: ``first`` is never the bare space, and
    ``all`` is the product over the five tokens."""
    prompt = "Alan Turing was born in the year"
    first = attribute(gemma, (prompt, "1912"), "ig", n_steps=4, progress=False)
    assert gemma.tokenizer.decode(first.target_ids) == " 1"
    whole = attribute(gemma, (prompt, "1912"), "ig", n_steps=4, target="all", progress=False)
    assert gemma.tokenizer.decode(whole.target_ids) == " 1912"
    assert whole.prob < first.prob
