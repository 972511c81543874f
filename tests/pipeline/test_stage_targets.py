"""The stages after localization score answers in the run's target mode: teacher-forced
P(target tokens), "known" = greedy decoding reproduces every target token, interventions at
the last prompt position only. Checked against plain full forwards written here."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch
from tiny import tiny_model

from knowloc.data import Fact, Query
from knowloc.evaluation import Baseline, EvalQuery, evaluate_edit
from knowloc.interventions.attention import (
    attention_map,
    eager_attention,
    scale_attention,
    synapse_effect,
)
from knowloc.interventions.weights import Edit
from knowloc.models.compat import cache_kwargs, output_cache
from knowloc.models.forward import prompt_activations, prompt_probs
from knowloc.pipeline.localize import ScreenUnit, screen_fact, screen_key
from knowloc.pipeline.mapping import MappingUnit, intervene_fact, neighbor_sets
from knowloc.pipeline.modify import EditState, EditUnit, PPLSpec, edit_fact, new_object
from knowloc.synapses import knowledge_synapses

# on the tiny llama (seed 0) greedy decoding continues "the official is" with
# "portuguese and official", and "official language is" with "portuguese and tokyo"
Q1, Q2, ANSWER = "the official is", "official language is", "portuguese and official"
NEW = "french spoken english"
LOCALITY = ("the rome is", "the brazil is", "the is is")
NEURONS = [(0, 3), (1, 5), (2, 9), (2, 33), (2, 17)]


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama")


def plain(hf, prompt_ids, answer, pre_hooks=()):
    """(teacher-forced P(answer), greedy reproduces it) from one full forward of the HF
    model over prompt + answer[:-1], with forward pre-hooks ``(module, fn)`` installed."""
    handles = [mod.register_forward_pre_hook(fn) for mod, fn in pre_hooks]
    try:
        with torch.no_grad():
            x = torch.tensor([list(prompt_ids) + list(answer[:-1])])
            logits = hf(input_ids=x).logits[0, len(prompt_ids) - 1:].double()
    finally:
        for h in handles:
            h.remove()
    probs = logits.softmax(-1)
    p = float(torch.stack([probs[i, t] for i, t in enumerate(answer)]).prod())
    return p, bool(all(int(probs[i].argmax()) == t for i, t in enumerate(answer)))


def scale_at(model, neurons, scale, pos):
    """Pre-hooks scaling ``neurons``' down-projection inputs at position ``pos`` only."""
    hooks = []
    for layer in sorted({l for l, _ in neurons}):
        idx = [p for l, p in neurons if l == layer]

        def fn(mod, args, idx=idx):
            h = args[0].clone()
            h[:, pos, idx] = h[:, pos, idx] * scale
            return (h,)

        hooks.append((model.down_proj(layer), fn))
    return hooks


def edited_copy(model, neurons, delta=None):
    """A deep copy of the HF model with the value vectors of ``neurons`` zeroed (delta None)
    or shifted by ``delta`` (llama: the value vector of neuron p is column p of down_proj)."""
    hf = copy.deepcopy(model.hf)
    with torch.no_grad():
        for layer, p in neurons:
            w = hf.model.layers[layer].mlp.down_proj.weight
            w[:, p] = 0 if delta is None else w[:, p] + delta
    return hf


# ------------------------------------------------------------------------ screening
def test_screening_under_all_needs_the_whole_answer(tiny):
    queries = tuple(Query("f", f"f#{i}", "R", f"[X] {p} [Y]", p, ANSWER)
                    for i, p in enumerate((Q1, Q2)))
    fact = Fact("f", "R", "x", ANSWER, queries)
    first = screen_fact(tiny, ScreenUnit(fact, "first"))["screen"]
    whole = screen_fact(tiny, ScreenUnit(fact, "all"))["screen"]
    assert first["known"].tolist() == [True, True]  # both start with "portuguese"
    assert whole["known"].tolist() == [True, False]  # Q2 continues "... and tokyo"
    for row, prompt in zip(whole.itertuples(), (Q1, Q2)):
        p, known = plain(tiny.hf, tiny.encode_prompt(prompt), tiny.target_ids(prompt, ANSWER, "all"))
        assert row.prob == pytest.approx(p, rel=1e-5) and row.known == known
    assert first["prob"].tolist() != whole["prob"].tolist()
    # the screening unit of another target is another unit; `first` keeps its old key
    assert screen_key(tiny, fact, "all") != screen_key(tiny, fact, "first") == screen_key(tiny, fact)


# ------------------------------------------------------------------------- intervene
def test_intervene_measures_the_teacher_forced_answer(tiny):
    sets = {"q1": [(0, 3), (1, 5), (2, 9)], "q2": [(1, 5), (2, 17)]}
    unit = MappingUnit("ig", "R", "f", (("q1", Q1, ANSWER), ("q2", Q2, ANSWER)),
                       tuple((q, tuple(ns)) for q, ns in sets.items()), 0.0, 2.0, "all")
    rows = intervene_fact(tiny, unit)["interventions"]
    ok = rows[rows["status"] == "ok"]
    assert {"Self", "Union"} <= set(ok["set"])
    for r in ok.itertuples():
        prompt = Q1 if r.query_id == "q1" else Q2
        ids = tiny.encode_prompt(prompt)
        target = tiny.target_ids(prompt, ANSWER, "all")
        assert len(target) == 3
        ns = sorted(neighbor_sets(sets, r.query_id)[r.set])
        scale = 0.0 if r.op == "suppress" else 2.0
        p_b, _ = plain(tiny.hf, ids, target)
        p_a, _ = plain(tiny.hf, ids, target, scale_at(tiny, ns, scale, len(ids) - 1))
        assert r.p_before == pytest.approx(p_b, rel=1e-5)
        assert r.p_after == pytest.approx(p_a, rel=1e-4)
        # scaling at the last position of the whole pass (an answer position) is not it
        p_wrong, _ = plain(tiny.hf, ids, target, scale_at(tiny, ns, scale, -1))
        assert abs(p_wrong - p_a) > 1e-3 * p_a


# ------------------------------------------------------------------------- attention
def test_synapse_effect_scales_the_prompt_rows_only(tiny):
    """Reference: the scaled prompt pass fills the key/value cache, the answer tokens are
    then decoded from that cache without any scaling."""
    ids = tiny.encode_prompt(Q2)
    target = tiny.target_ids(Q2, ANSWER, "all")
    with eager_attention(tiny):
        syn = knowledge_synapses(attention_map(tiny, ids))

        def cached(factor):
            with torch.no_grad():
                with scale_attention(tiny, syn, factor):
                    out = tiny.hf(input_ids=torch.tensor([ids]), use_cache=True)
                rest = tiny.hf(input_ids=torch.tensor([target[:-1]]),
                               **cache_kwargs(output_cache(out)), use_cache=True).logits[0]
            logits = torch.cat([out.logits[0, -1:], rest]).double()
            return float(torch.stack([logits[i].softmax(-1)[t]
                                      for i, t in enumerate(target)]).prod())

        refs = {f: cached(f) for f in (1.0, 0.0, 2.0)}
    assert len(syn) > 0
    for factor in (0.0, 2.0):
        e = synapse_effect(tiny, Q2, ANSWER, syn, factor, NEURONS, target="all")
        assert e.prob_before == pytest.approx(refs[1.0], rel=1e-5)
        assert e.prob_after == pytest.approx(refs[factor], rel=1e-4)
        same = synapse_effect(tiny, ids, target, syn, factor, NEURONS)
        assert same.prob_after == e.prob_after and same.value_after == e.value_after
    # a one-token target is the next-token probability, exactly as before
    one = synapse_effect(tiny, Q2, "portuguese", syn, 0.0, NEURONS, target="all")
    with torch.no_grad():
        p = float(prompt_probs(tiny, [Q2])[0, tiny.answer_ids(Q2, "portuguese")[0]])
    assert one.prob_before == pytest.approx(p, rel=1e-5)


# ---------------------------------------------------------------------------- modify
def edit_unit(queries, target, *, op="erase", set_kind="local", new=NEW, key="k",
              locality=LOCALITY, model=None):
    return EditUnit(
        key=key, method="ig", relation="R", fact_id="f", op=op,
        set_kind=set_kind, queries=tuple(queries),
        sets=tuple((q[0], tuple(NEURONS)) for q in queries), cas=(), new_object=new,
        locality=tuple(tuple(model.encode_prompt(p)) for p in locality),
        locality_ids=tuple(f"u{i}" for i in range(len(locality))), locality_kind="test",
        lambda1=2.0, lambda2=2.0, update_sign="none", gen_on="known",
        ppl=PPLSpec(None, 2, 4, 16, 0), target=target)


@pytest.mark.parametrize("op", ["erase", "update"])
def test_modify_scores_the_whole_answer_under_all(tiny, op):
    unit = edit_unit((("q1", Q1, ANSWER), ("q2", Q2, ANSWER)), "all", op=op, model=tiny)
    rows = edit_fact(tiny, unit)["edits"].set_index("query_id")
    assert rows.loc["q2", "status"] == "not known" and rows.loc["q1", "status"] == "ok"
    ids = tiny.encode_prompt(Q1)
    old, new = tiny.target_ids(Q1, ANSWER, "all"), tiny.target_ids(Q1, NEW, "all")
    if op == "erase":
        hf = edited_copy(tiny, NEURONS)
    else:  # E(o) = mean of the target tokens' unembedding rows
        E = tiny.unembedding_matrix().detach().float()
        hf = edited_copy(tiny, NEURONS, -2 * E[old].mean(0) + 2 * E[new].mean(0))
    watched = old if op == "erase" else new
    p_b, _ = plain(tiny.hf, ids, watched)
    p_a, hit = plain(hf, ids, watched)
    row = rows.loc["q1"]
    expect = p_b - p_a if op == "erase" else p_a - p_b
    assert row["rel_prob"] == pytest.approx(expect, rel=1e-4, abs=1e-9)
    assert row["rel"] == (1.0 - hit if op == "erase" else float(hit))
    # locality: the top-1 next token of the unrelated prompts
    same = []
    for p in LOCALITY:
        x = torch.tensor([tiny.encode_prompt(p)])
        with torch.no_grad():
            same.append(int(tiny.hf(input_ids=x).logits[0, -1].argmax())
                        == int(hf(input_ids=x).logits[0, -1].argmax()))
    assert row["loc"] == pytest.approx(sum(same) / len(same))
    # the same edit under `first` scores the first token only
    first = edit_fact(tiny, edit_unit((("q1", Q1, ANSWER), ("q2", Q2, ANSWER)), "first", op=op,
                                      model=tiny))["edits"].set_index("query_id")
    assert first.loc["q2", "status"] == "ok" and first.loc["q1", "rel_prob"] != row["rel_prob"]


def test_evaluate_edit_of_a_multi_token_target_matches_plain_forwards(tiny):
    qs = [EvalQuery(f"q{i}", tuple(tiny.encode_prompt(p)), tuple(tiny.target_ids(p, ANSWER, "all")),
                    tuple(tiny.target_ids(p, NEW, "all"))) for i, p in enumerate((Q1, Q2))]
    loc = [tuple(tiny.encode_prompt(p)) for p in LOCALITY]
    (row,) = evaluate_edit(tiny, Edit.erase(NEURONS), fact_queries=qs, rel_ids=["q0"],
                           locality=loc, baseline=Baseline(), gen_on="all")
    hf = edited_copy(tiny, NEURONS)
    drops, hits = [], []
    for q in qs:
        p_b, _ = plain(tiny.hf, q.prompt_ids, q.target_ids)
        p_a, hit = plain(hf, q.prompt_ids, q.target_ids)
        drops.append(p_b - p_a)
        hits.append(hit)
    assert row["rel_prob"] == pytest.approx(drops[0], rel=1e-4, abs=1e-9)
    assert row["gen_prob"] == pytest.approx(drops[1], rel=1e-4, abs=1e-9)
    assert row["rel"] == 1.0 - hits[0] and row["gen"] == 1.0 - hits[1]


def test_update_needs_a_new_object_with_another_target(tiny):
    catalog = pd.DataFrame({"relation": ["R", "R", "R"],
                            "answer": [ANSWER, "portuguese and tokyo", NEW]})
    # under `first` "portuguese and tokyo" shares o's target ("portuguese"): never o′
    for seed in range(8):
        assert new_object(tiny, catalog, "R", "f", Q1, ANSWER, seed, "first") == NEW
    assert {new_object(tiny, catalog, "R", "f", Q1, ANSWER, s, "all") for s in range(16)} == {
        NEW, "portuguese and tokyo"}


def test_edit_rows_do_not_depend_on_the_order_units_run_in(tiny):
    """The unedited baseline of a prompt is computed in the batches of its own edit, so
    units give byte-identical rows in any order (a baseline cache shared in run order gave
    other last bits when a prompt was first batched with other neighbours)."""
    facts = [(("a1", Q1, ANSWER), ("a2", Q2, ANSWER)),
             (("b1", "the rome is", "paris"), ("b2", "the brazil is", "official")),
             (("c1", "the is is", "french"), ("c2", "official of is", "portuguese"))]
    locs = [("the rome is", "the brazil is", "official of is"),
            (Q1, "the is is", "official of is"),
            (Q2, "the rome is", "the official is")]
    units = [edit_unit(f, t, op=op, set_kind=s, key=f"{i}{op}{s}{t}", locality=loc, model=tiny,
                       new=NEW)
             for i, (f, loc) in enumerate(zip(facts, locs)) for op in ("erase", "update")
             for s in ("local", "global") for t in ("first", "all")]

    def run(order, *, shared=True):
        state = EditState(tiny)  # one worker's state (the stage's setup), shared by its units
        frames = [edit_fact(tiny, u, state if shared else None)["edits"].assign(unit=u.key)
                  for u in order]
        return pd.concat(frames).sort_values(["unit", "query_id"]).reset_index(drop=True)

    a = run(units)
    b = run(units[::-1])
    assert (a["status"] == "ok").sum() >= 8
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    alone = run(units[::5], shared=False)  # a fresh state per unit, as if it ran first
    pd.testing.assert_frame_equal(a[a["unit"].isin(alone["unit"])].reset_index(drop=True),
                                  alone, check_exact=True)


# ---- embedded Gemma: a year answer starts with a bare space token (" 1912" is " ",
# "1", "9", "1", "2"): the stages after localization must not score that space alone.

TURING = "Alan Turing was born in the year"



def strong_neurons(model, ids, k=8):
    """The k neurons of layers 8-15 with the largest |activation| at the last prompt token."""
    acts = prompt_activations(model, ids)[8:16].abs()
    top = torch.topk(acts.flatten(), k).indices
    return sorted((8 + int(i) // model.d_mlp, int(i) % model.d_mlp) for i in top)


def modify_unit(prompt, answer, neurons, target, op="erase"):
    return EditUnit(key="k", method="ig", relation="R",
                    fact_id="f", op=op, set_kind="local", queries=(("q", prompt, answer),),
                    sets=(("q", tuple(neurons)),), cas=(), new_object=None, locality=(),
                    locality_ids=(), locality_kind="none", lambda1=2.0, lambda2=2.0,
                    update_sign="none", gen_on="known", ppl=PPLSpec(None, 1, 2, 16, 0),
                    target=target)


@pytest.mark.slow
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


# ---- bug report (fails on the code before the fix): on the embedded Gemma, " 2012" begins
# with the bare space token " " -- the model's top-1 after the prompt (P = 0.92) -- so
# `modify` counted the wrong year "2012" as known and `intervene` measured P(" "). With the
# default target (``first``: the space extended to the first digit) the fact is not known
# and P is P(" ") P("2" | " ").
@pytest.mark.slow
def test_a_year_is_not_known_through_its_leading_space(gemma):
    ids = gemma.encode_prompt(TURING)
    space, two = gemma.answer_ids(TURING, "2012")[:2]
    assert gemma.tokenizer.decode([space]) == " " and gemma.tokenizer.decode([two]) == "2"
    with torch.no_grad():
        logits = gemma.hf(input_ids=torch.tensor([ids + [space]])).logits[0, -2:].double()
    p_space = float(logits[0].softmax(-1)[space])
    p_two = float(logits[1].softmax(-1)[two])
    assert int(logits[0].argmax()) == space and p_space > 0.8
    assert int(logits[1].argmax()) != two
    unit = EditUnit(key="k", method="ig", relation="R", fact_id="f", op="erase",
                    set_kind="local", queries=(("q", TURING, "2012"),),
                    sets=(("q", ((10, 5),)),), cas=(), new_object=None, locality=(),
                    locality_ids=(), locality_kind="none", lambda1=2.0, lambda2=2.0,
                    update_sign="none", gen_on="known", ppl=PPLSpec(None, 1, 2, 16, 0))
    assert edit_fact(gemma, unit)["edits"]["status"].tolist() == ["not known"]
    rows = intervene_fact(gemma, MappingUnit("ig", "R", "f", (("q", TURING, "2012"),),
                                             (("q", ((10, 5),)),), 0.0, 2.0))["interventions"]
    assert rows["p_before"].iloc[0] == pytest.approx(p_space * p_two, rel=1e-4)
