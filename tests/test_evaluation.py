"""Metrics of edits and interventions, perplexity, the ΔPPL sampler."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import WIKITEXT
from tiny import WORDS, tiny_model

from knowloc.errors import DataError
from knowloc.evaluation import (
    Baseline,
    EvalQuery,
    PPLSampler,
    delta_prob,
    evaluate_edit,
    load_ppl_corpus,
    modification_metrics,
    nll_sum,
    perplexity,
    probability_metrics,
)
from knowloc.interventions.weights import Edit
from knowloc.models.forward import prompt_probs


# ------------------------------------------------------------ hand-made predictions
def test_erasure_metrics_are_one_minus_accuracy():
    # edited query still answers o -> Rel 0; 1 of 4 neighbors still answers o -> Gen 0.75;
    # 3 of 4 unrelated queries unchanged -> Loc 0.75; Avg = (0 + .75 + .75) / 3
    m = modification_metrics("erase", rel_hit=True, gen_hits=[True, False, False, False],
                             loc_same=[True, True, True, False])
    assert m == {"rel": 0.0, "gen": 0.75, "loc": 0.75, "avg": 0.5}
    m = modification_metrics("erase", rel_hit=False, gen_hits=[], loc_same=[True] * 5)
    assert m["rel"] == 1.0 and math.isnan(m["gen"]) and m["loc"] == 1.0 and m["avg"] == 1.0


def test_update_metrics_are_accuracy_of_the_new_object():
    m = modification_metrics("update", rel_hit=True, gen_hits=[True, False],
                             loc_same=[True, False, False, False, False])
    assert m == {"rel": 1.0, "gen": 0.5, "loc": 0.2, "avg": pytest.approx(1.7 / 3)}


def test_probability_metrics_by_hand():
    # erase: drops of P(o) 0.9->0.3 and neighbors 0.5->0.4, 0.6->0.6; unrelated moved by .1, 0
    m = probability_metrics("erase", rel=(0.9, 0.3), gen=[(0.5, 0.4), (0.6, 0.6)],
                            loc=[(0.7, 0.6), (0.2, 0.2)])
    assert m["rel_prob"] == pytest.approx(0.6)
    assert m["gen_prob"] == pytest.approx(0.05)
    assert m["loc_prob"] == pytest.approx(0.95)
    assert m["avg_prob"] == pytest.approx((0.6 + 0.05 + 0.95) / 3)
    # update: gains of P(o′)
    u = probability_metrics("update", rel=(0.01, 0.41), gen=[(0.0, 0.2)], loc=[])
    assert u["rel_prob"] == pytest.approx(0.4) and u["gen_prob"] == pytest.approx(0.2)
    assert math.isnan(u["loc_prob"]) and u["avg_prob"] == pytest.approx(0.3)


def test_delta_prob_signs():
    assert delta_prob(0.5, 0.1, "suppress") == pytest.approx(0.8)  # fell by 80 %
    assert delta_prob(0.2, 0.5, "enhance") == pytest.approx(1.5)  # rose by 150 %
    assert delta_prob(0.5, 0.6, "suppress") == pytest.approx(-0.2)  # suppression backfired
    assert math.isnan(delta_prob(0.0, 0.3, "enhance"))


def test_evaluate_edit_matches_direct_predictions():
    """Rows of evaluate_edit recomputed independently with full HF forwards under the edit."""
    m = tiny_model("llama", seed=3)
    prompts = ["the official language of brazil is", "the language spoken in brazil is",
               "people in brazil speak", "in brazil people speak"]
    # make the fact "known": use the model's own top-1 as o, and another token as o′
    top = [int(prompt_probs(m, [p])[0].argmax()) for p in prompts]
    o = top[0]
    o2 = (o + 7) % len(m.tokenizer)
    qs = [EvalQuery(f"q{i}", tuple(m.encode_prompt(p)), o, o2) for i, p in enumerate(prompts)]
    loc_prompts = ["paris is the capital of", "the capital of japan is", "berlin is in"]
    loc = [tuple(m.encode_prompt(p)) for p in loc_prompts]
    neurons = [(0, 1), (1, 5), (2, 9), (2, 30)]
    for op, edit in (("erase", Edit.erase(neurons)), ("update", Edit.update(neurons, o, o2))):
        rows = evaluate_edit(m, edit, fact_queries=qs, rel_ids=["q0"], locality=loc,
                             baseline=Baseline(), gen_on="all")
        (row,) = rows
        with edit.applied(m):
            after = [prompt_probs(m, [p])[0] for p in prompts]
            loc_after = [int(prompt_probs(m, [p])[0].argmax()) for p in loc_prompts]
        loc_before = [int(prompt_probs(m, [p])[0].argmax()) for p in loc_prompts]
        tgt = o if op == "erase" else o2
        hits = [int(a.argmax()) == tgt for a in after]
        rel = float(hits[0]) if op == "update" else 1 - float(hits[0])
        gen = sum(hits[1:]) / 3 if op == "update" else 1 - sum(hits[1:]) / 3
        assert row["status"] == "ok" and row["n_neurons"] == 4 and row["n_gen"] == 3
        assert row["rel"] == rel and row["gen"] == pytest.approx(gen)
        assert row["loc"] == pytest.approx(sum(a == b for a, b in zip(loc_after, loc_before)) / 3)
        p_b = float(prompt_probs(m, [prompts[0]])[0, tgt])
        change = p_b - float(after[0][tgt]) if op == "erase" else float(after[0][tgt]) - p_b
        assert row["rel_prob"] == pytest.approx(change, abs=1e-6)


def test_empty_edit_is_reported_not_counted():
    m = tiny_model("gpt2")
    q = EvalQuery("q0", tuple(m.encode_prompt("brazil")), 5, 6)
    (row,) = evaluate_edit(m, Edit.erase([]), fact_queries=[q], rel_ids=["q0"], locality=[],
                           baseline=Baseline())
    assert row["status"] == "empty" and row["n_neurons"] == 0
    assert all(math.isnan(row[k]) for k in ("rel", "gen", "loc", "avg", "dppl"))


# ------------------------------------------------------------------------ perplexity
def _hf_ppl(m, ids):
    x = torch.tensor([ids])
    with torch.no_grad():
        return math.exp(float(m.hf(input_ids=x, labels=x).loss))


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3"])
def test_perplexity_equals_full_sequence_exp_mean_nll(arch):
    m = tiny_model(arch)
    text = " ".join(WORDS[:30])
    ids = m.tokenizer(text)["input_ids"]
    assert len(ids) < 64
    assert perplexity(m, text) == pytest.approx(_hf_ppl(m, ids), rel=1e-5)
    # two texts: exp of the token-weighted mean NLL
    t2 = " ".join(WORDS[5:17])
    ids2 = m.tokenizer(t2)["input_ids"]
    nll = (math.log(_hf_ppl(m, ids)) * (len(ids) - 1) + math.log(_hf_ppl(m, ids2)) * (len(ids2) - 1))
    assert perplexity(m, [text, t2]) == pytest.approx(math.exp(nll / (len(ids) + len(ids2) - 2)),
                                                      rel=1e-5)


def _reference_windowed_nll(m, ids, window, stride):
    """Plain sliding window with HF's labels (-100 = not scored)."""
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        x = torch.tensor([ids[begin:end]])
        labels = x.clone()
        n_new = end - prev_end
        labels[0, : x.shape[1] - n_new] = -100
        n_scored = int((labels[0, 1:] != -100).sum())
        with torch.no_grad():
            loss = float(m.hf(input_ids=x, labels=labels).loss)
        total += loss * n_scored
        count += n_scored
        prev_end = end
        if end == len(ids):
            break
    return total, count


@pytest.mark.parametrize("window,stride", [(64, 32), (64, 64), (40, 13)])
def test_sliding_window_matches_a_plain_reference(window, stride):
    m = tiny_model("llama")
    text = " ".join(WORDS * 3)
    ids = m.tokenizer(text)["input_ids"]
    assert len(ids) > 64  # longer than the tiny model's context
    got, n = nll_sum(m, ids, window=window, stride=stride)
    ref, n_ref = _reference_windowed_nll(m, ids, window, stride)
    assert n == n_ref == len(ids) - 1 - (0 if stride < window else (len(ids) - 1) // window)
    assert got == pytest.approx(ref, rel=1e-5)


def test_default_window_is_the_model_context():
    m = tiny_model("gpt2")  # n_positions = 64
    ids = m.tokenizer(" ".join(WORDS * 3))["input_ids"]
    assert nll_sum(m, ids) == pytest.approx(nll_sum(m, ids, window=64, stride=32))


# ----------------------------------------------------------------- corpus and sampler
def test_builtin_corpus_is_used_and_flagged_without_a_file():
    c = load_ppl_corpus()
    assert c.builtin and c.source.startswith("builtin") and len(c) >= 25
    assert all(len(e.split()) >= 20 for e in c.entries)


@pytest.mark.skipif(not WIKITEXT.exists(), reason="WikiText-2 test file not available")
def test_wikitext_entries_drop_headings_and_blank_lines():
    c = load_ppl_corpus(WIKITEXT)
    assert not c.builtin and len(c) > 1000
    assert not any(e.startswith("=") and e.endswith("=") for e in c.entries)
    assert c.entries[0].startswith("Robert Boulter is an English film")


def test_missing_ppl_file_is_a_clean_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_ppl_corpus(tmp_path / "nope.txt")
    empty = tmp_path / "short.txt"
    empty.write_text(" = Title = \n\nshort line\n")
    with pytest.raises(DataError, match="no paragraph"):
        load_ppl_corpus(empty)


def test_ppl_sampler_draws_are_seeded_and_baselines_computed_once(monkeypatch):
    import knowloc.evaluation as ev

    m = tiny_model("llama")
    corpus = load_ppl_corpus()
    s = PPLSampler(m, corpus, n_entries=5, pool_size=8, max_tokens=20, seed=1)
    d1, d2 = s.draw("edit-a"), s.draw("edit-b")
    assert len(d1) == 5 == len(set(d1)) and set(d1) <= set(s.pool) and len(s.pool) == 8
    assert d1 == PPLSampler(m, corpus, n_entries=5, pool_size=8, max_tokens=20, seed=1).draw("edit-a")
    calls = []
    real = ev.nll_sum
    monkeypatch.setattr(ev, "nll_sum", lambda *a, **k: calls.append(1) or real(*a, **k))
    b1 = s.baseline(d1)
    n1 = len(calls)
    assert n1 == 5
    assert s.baseline(d1) == b1 and len(calls) == n1  # reused, not recomputed
    s.baseline(d2)
    assert len(calls) == n1 + len(set(d2) - set(d1))
    # baseline PPL equals perplexity() over the same truncated entries
    texts = [corpus.entries[i] for i in d1]
    assert b1 == pytest.approx(perplexity(m, texts, max_tokens=20), rel=1e-9)
    # and an edit changes the current PPL
    with Edit.erase([(1, i) for i in range(20)]).applied(m):
        assert s.current(d1) != pytest.approx(b1, rel=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(not WIKITEXT.exists(), reason="WikiText-2 test file not available")
def test_gemma_wikitext_perplexity_is_plausible(gemma):
    c = load_ppl_corpus(WIKITEXT)
    ppl = perplexity(gemma, list(c.entries[:3]), max_tokens=96)
    # a 270M-parameter LM on encyclopedic English: tens, far from the vocabulary size (262k)
    assert 5 < ppl < 150, ppl
