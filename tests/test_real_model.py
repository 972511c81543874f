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


# Two float32 implementations of a deep model's gradients do not agree to 1e-5: measured on
# this machine, the plain float32 reference itself is off the exact (float64) values by
# 2.7e-5 (ig), 5.0e-5 (sig), 3.1e-4 (amig) on SmolLM2 and 7.6e-5 (ig) on Gemma, while the fast
# engine is off by 3.5e-6, 3.1e-6, 1.3e-5 and 3.4e-5. So the fast engine is checked against
# the float32 reference at float32 agreement (FLOAT32_AGREE, still far below the change made
# by a one-step-off Riemann sum, checked below), and against an exact float64 oracle.
FLOAT32_AGREE = 1e-3


def test_gemma_fast_engine_matches_reference(gemma):
    prompt, answer = BRAZIL
    ref = reference_attribute(gemma, prompt, answer, "ig", n_steps=3)
    fast = attribute(gemma, BRAZIL, "ig", n_steps=3, progress=False)
    err = rel_err(fast.scores, ref)
    print(f"gemma ig n_steps=3: fast vs reference relative max-abs error {err:.2e}")
    assert err < FLOAT32_AGREE


# ----------------------------------------------------------------------- SmolLM2
def test_smollm2_is_llama_and_knows_paris(smollm2):
    assert smollm2.adapter.name == "llama" and smollm2.config.model_type == "llama"
    assert smollm2.checked
    p = smollm2.next_token_probs([FRANCE[0]])[0]
    assert int(p.argmax()) == smollm2.target_id(*FRANCE)


_REF32: dict[str, torch.Tensor] = {}


def _ref32(model, method: str) -> torch.Tensor:
    if method not in _REF32:
        _REF32[method] = reference_attribute(model, *FRANCE, method, n_steps=4)
    return _REF32[method]


@pytest.mark.parametrize("method", ["ig", "sig", "amig"])
def test_smollm2_fast_engine_matches_reference(smollm2, method):
    ref = _ref32(smollm2, method)
    fast = attribute(smollm2, FRANCE, method, n_steps=4, progress=False)
    assert fast.scores.shape == (smollm2.n_layers, smollm2.d_mlp) == ref.shape
    err = rel_err(fast.scores, ref)
    print(f"smollm2 {method} n_steps=4: fast vs float32 reference, relative max-abs error "
          f"{err:.2e}")
    assert err < FLOAT32_AGREE
    if method == "ig":  # the tolerance does tell a different integral apart
        other = attribute(smollm2, FRANCE, method, n_steps=5, progress=False)
        assert rel_err(other.scores, ref) > 10 * FLOAT32_AGREE


# ---- exact oracle: the plain loop in float64 end to end (weights, baselines, logits)
def _last_acts64(model, ids: list[int]) -> torch.Tensor:
    out, handles = {}, []
    for l in range(model.n_layers):
        def hook(mod, args, l=l):
            out[l] = args[0][:, -1].detach().double()
        handles.append(model.down_proj(l).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model.hf(input_ids=torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    return torch.stack([out[l] for l in range(model.n_layers)], 1)[0]


def _oracle64(model, prompt: str, answer: str, method: str, n_steps: int) -> torch.Tensor:
    tok = model.tokenizer
    ids = tok(prompt)["input_ids"]
    target = tok(prompt + " " + answer)["input_ids"][len(ids)]
    special = set(tok.all_special_ids)
    a = _last_acts64(model, ids)
    if method == "ig":
        b = torch.zeros_like(a)
    elif method == "amig":
        b = _last_acts64(model, [t if t in special else tok.eos_token_id for t in ids])
    else:  # sig, mean mode
        mask = next(v for v in (tok.mask_token_id, tok.pad_token_id, tok.eos_token_id)
                    if v is not None)
        b = torch.stack([_last_acts64(model, ids[:j] + [mask] + ids[j + 1:])
                         for j, t in enumerate(ids) if t not in special]).mean(0)
    alphas = torch.arange(1, n_steps + 1, dtype=torch.float64) / n_steps
    x_ids = torch.tensor([ids]).repeat(n_steps, 1)
    scores = torch.zeros_like(a)
    for l in range(model.n_layers):
        x = (b[l] + alphas[:, None] * (a[l] - b[l])).requires_grad_(True)

        def patch(mod, args, x=x):
            h = args[0].clone()
            h[:, -1] = x
            return (h,) + tuple(args[1:])

        handle = model.down_proj(l).register_forward_pre_hook(patch)
        try:
            with torch.enable_grad():
                logits = model.hf(input_ids=x_ids).logits[:, -1].double()
                (g,) = torch.autograd.grad(torch.softmax(logits, -1)[:, target].sum(), x)
        finally:
            handle.remove()
        scores[l] = (a[l] - b[l]) * g.mean(0)
    if method == "sig":
        scores = scores / scores.norm()
    elif method == "amig":
        scores = scores / scores.sum()
    return scores


@pytest.fixture(scope="module")
def smollm2_f64(smollm2):
    import copy

    from knowloc.models import wrap

    return wrap(copy.deepcopy(smollm2.hf).double(), smollm2.tokenizer, name="smollm2-f64",
                check=False)


# AMIG divides by the sum of the map; SmolLM2's large activations (|a| ~ 1e2-1e3) make
# a - b lose digits in float32, so its float32 floor is ~1.3e-5 (any float32 implementation)
EXACT_TOL = {"ig": 1e-5, "amig": 3e-5}


@pytest.mark.parametrize("method", ["ig", "amig"])
def test_smollm2_fast_engine_is_exact(smollm2, smollm2_f64, method):
    """The float32 fast engine against the float64 plain loop: within float32 precision,
    and closer to it than the float32 plain reference is."""
    exact = _oracle64(smollm2_f64, *FRANCE, method, n_steps=4)
    fast = attribute(smollm2, FRANCE, method, n_steps=4, progress=False).scores.double()
    ref = _ref32(smollm2, method).double()
    e_fast, e_ref = rel_err(fast, exact), rel_err(ref, exact)
    print(f"smollm2 {method} n_steps=4 vs float64 oracle: fast engine {e_fast:.2e}, "
          f"float32 reference {e_ref:.2e}")
    assert e_fast < EXACT_TOL[method]
    assert e_fast < e_ref


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
