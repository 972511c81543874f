"""On the embedded Gemma, a year answer starts with a bare space token (" 1912" is " ",
"1", "9", "1", "2"): the stages after localization must not score that space alone."""

from __future__ import annotations

import pytest
import torch
from test_targets_stages import plain, scale_at

from knowloc.evaluation import Baseline, EvalQuery, evaluate_edit
from knowloc.interventions.attention import synapse_effect
from knowloc.interventions.weights import Edit
from knowloc.pipeline.mapping import MappingUnit, intervene_fact
from knowloc.pipeline.modify import EditUnit, PPLSpec, edit_fact

TURING = "Alan Turing was born in the year"

pytestmark = pytest.mark.slow


def strong_neurons(model, ids, k=8):
    """The k neurons of layers 8-15 with the largest |activation| at the last prompt token."""
    acts = model.activations(ids)[8:16].abs()
    top = torch.topk(acts.flatten(), k).indices
    return sorted((8 + int(i) // model.d_mlp, int(i) % model.d_mlp) for i in top)


def modify_unit(prompt, answer, neurons, target, op="erase"):
    return EditUnit(key="k", scope=f"gemma-{target}-{answer}-{op}", method="ig", relation="R",
                    fact_id="f", op=op, set_kind="local", queries=(("q", prompt, answer),),
                    sets=(("q", tuple(neurons)),), cas=(), new_object=None, locality=(),
                    locality_ids=(), locality_kind="none", lambda1=2.0, lambda2=2.0,
                    update_sign="none", gen_on="known", ppl=PPLSpec(None, 1, 2, 16, 0),
                    target=target)


@pytest.mark.parametrize(("answer", "target", "n_tokens", "known"),
                         [("1912", "first", 2, True), ("1961", "all", 5, False),
                          ("1912", "all", 5, True)])
def test_gemma_year_facts_are_scored_by_their_target(gemma, answer, target, n_tokens, known):
    ids = gemma.encode_prompt(TURING)
    tgt = gemma.target_ids(TURING, answer, target)
    assert len(tgt) == n_tokens and gemma.tokenizer.decode(tgt[:1]) == " "
    ns = strong_neurons(gemma, ids)
    p_b, greedy = plain(gemma.hf, ids, tgt)
    assert greedy == known
    # intervene: P(target) teacher-forced, the neurons scaled at the last prompt position
    unit = MappingUnit("ig", "R", "f", (("q", TURING, answer),), (("q", tuple(ns)),), 0.0, 2.0,
                       target)
    rows = intervene_fact(gemma, unit)["interventions"]
    for r in rows[(rows["set"] == "Self") & (rows["status"] == "ok")].itertuples():
        scale = 0.0 if r.op == "suppress" else 2.0
        p_a, _ = plain(gemma.hf, ids, tgt, scale_at(gemma, ns, scale, len(ids) - 1))
        assert r.p_before == pytest.approx(p_b, rel=1e-4)
        assert r.p_after == pytest.approx(p_a, rel=2e-3)
    # modify: "known" is greedy reproduction of every target token
    edits = edit_fact(gemma, modify_unit(TURING, answer, ns, target))["edits"]
    assert edits["status"].tolist() == (["ok"] if known else ["not known"])
    if known:
        q = EvalQuery("q", tuple(ids), tuple(tgt))
        (row,) = evaluate_edit(gemma, Edit.erase(ns), fact_queries=[q], rel_ids=["q"],
                               locality=[], baseline=Baseline())
        saved = {}
        with torch.no_grad():
            for layer, p in ns:
                vv = gemma.value_vectors(layer)
                saved[(layer, p)] = vv[p].clone()
                vv[p] = 0
            try:
                p_a, hit = plain(gemma.hf, ids, tgt)
            finally:
                for (layer, p), v in saved.items():
                    gemma.value_vectors(layer)[p] = v
        assert row["rel_prob"] == pytest.approx(p_b - p_a, rel=2e-3, abs=1e-6)
        assert row["rel"] == 1.0 - hit
    # attention: ΔProb of the same target (no synapses: nothing changes)
    e = synapse_effect(gemma, TURING, answer, [], 0.0, ns, target=target)
    assert e.prob_before == pytest.approx(p_b, rel=1e-4) and e.prob_after == e.prob_before
