"""Real pretrained weights: embedded Gemma 3 270M and SmolLM2 135M (LLaMA), and ParaRel."""

from __future__ import annotations

import pytest
import torch
from conftest import PARAREL
from reference_attribution import reference_attribute

from knowloc import attribute, knowledge_neurons, load_facts

pytestmark = pytest.mark.slow

BRAZIL = ("The official language of Brazil is", "Portuguese")
FRANCE = ("The capital of France is", "Paris")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------------- Gemma
def test_gemma_knows_brazil(gemma):
    prompt, answer = BRAZIL
    target = gemma.target_id(prompt, answer)
    assert target == 41082
    p = gemma.next_token_probs([prompt])[0]
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


def test_gemma_fast_engine_matches_reference(gemma):
    prompt, answer = BRAZIL
    ref = reference_attribute(gemma, prompt, answer, "ig", n_steps=3)
    fast = attribute(gemma, BRAZIL, "ig", n_steps=3, progress=False)
    err = rel_err(fast.scores, ref)
    print(f"gemma ig n_steps=3: fast vs reference relative max-abs error {err:.2e}")
    assert err < 1e-5


# ----------------------------------------------------------------------- SmolLM2
def test_smollm2_is_llama_and_knows_paris(smollm2):
    assert smollm2.adapter.name == "llama" and smollm2.config.model_type == "llama"
    assert smollm2.checked
    p = smollm2.next_token_probs([FRANCE[0]])[0]
    assert int(p.argmax()) == smollm2.target_id(*FRANCE)


@pytest.mark.parametrize("method", ["ig", "sig", "amig"])
def test_smollm2_fast_engine_matches_reference(smollm2, method):
    ref = reference_attribute(smollm2, *FRANCE, method, n_steps=4)
    fast = attribute(smollm2, FRANCE, method, n_steps=4, progress=False)
    assert fast.scores.shape == (smollm2.n_layers, smollm2.d_mlp)
    err = rel_err(fast.scores, ref)
    print(f"smollm2 {method} n_steps=4: fast vs reference relative max-abs error {err:.2e}")
    assert err < 1e-5


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
    prompt, answer = FRANCE
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
