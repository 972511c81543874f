"""Consistency-Aware Score (paper §3.3, eq. 7; METHODS §6) on hand-made maps and a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import tiny_model

from knowloc import attribute, knowledge_neurons
from knowloc.attribution import Attribution
from knowloc.errors import ConfigError
from knowloc.neurons import (
    NeuronSet,
    cas_neurons,
    consistency_aware_scores,
    normalize_map,
    union,
)

# two queries, 1 layer x 4 neurons, each map's max is 1
M1 = np.array([[1.0, 0.5, 0.2, 0.0]])
M2 = np.array([[0.8, 1.0, 0.0, 0.1]])


def _attr(scores, method="ig", fact_id="f", query_id="q") -> Attribution:
    s = torch.as_tensor(np.asarray(scores), dtype=torch.float32)
    return Attribution(
        prompt="p", answer="a", target_id=0, method=method, scores=s, activations=torch.zeros_like(s),
        prob=0.5, top1=True, predicted_id=0, predicted="a", config={}, query_id=query_id, fact_id=fact_id,
    )


def test_cas_by_hand():
    # mu = [0.9, 0.75, 0.1, 0.05]; population sigma (1/k, eq. 7) = [0.1, 0.25, 0.1, 0.05]
    # CAS = 0.7 mu - 0.3 sigma = [0.60, 0.45, 0.04, 0.02]
    cas = consistency_aware_scores([M1, M2])
    np.testing.assert_allclose(cas, [[0.60, 0.45, 0.04, 0.02]], atol=1e-12)
    # threshold 0.3 * 0.60 = 0.18
    s = cas_neurons([M1, M2])
    assert isinstance(s, NeuronSet) and s.neurons == {(0, 0), (0, 1)} and s.query_id is None
    # a sample sigma (1/(k-1)) would give 0.63 - 0.3 * sqrt(2) * 0.1 for neuron 0: not what we use
    assert cas[0, 0] != pytest.approx(0.63 - 0.3 * np.sqrt(2) * 0.1)
    # beta1 / beta2 / threshold are honoured
    np.testing.assert_allclose(
        consistency_aware_scores([M1, M2], beta1=1.0, beta2=0.0), [[0.9, 0.75, 0.1, 0.05]], atol=1e-12
    )
    assert cas_neurons([M1, M2], threshold=0.8).neurons == {(0, 0)}  # 0.45 < 0.48
    assert cas_neurons([M1, M2], threshold=0.05).neurons == {(0, 0), (0, 1), (0, 2)}  # 0.04 > 0.03


def test_cas_rewards_consistency_over_a_single_peak():
    # neuron 0 peaks in one query only, neuron 1 is moderate in all three (normalize="none")
    maps = [np.array([[1.0, 0.5]]), np.array([[0.0, 0.5]]), np.array([[0.0, 0.5]])]
    cas = consistency_aware_scores(maps, normalize="none")
    # n0: mu 1/3, sigma sqrt(2)/3 -> 0.7/3 - 0.3 sqrt(2)/3; n1: 0.35
    np.testing.assert_allclose(cas, [[0.7 / 3 - 0.1 * np.sqrt(2), 0.35]], atol=1e-12)
    assert cas_neurons(maps, normalize="none").neurons == {(0, 1)}


def test_cas_normalization():
    # an unnormalized IG map three times larger: max-normalization makes it weigh the same
    assert cas_neurons([M1, 3 * M2]).neurons == cas_neurons([M1, M2]).neurons
    np.testing.assert_allclose(consistency_aware_scores([M1, 3 * M2]), consistency_aware_scores([M1, M2]))
    raw = consistency_aware_scores([M1, 3 * M2], normalize="none")
    assert raw[0, 1] == pytest.approx(0.7 * 1.75 - 0.3 * 1.25)
    np.testing.assert_allclose(normalize_map(np.array([[-1.0, 2.0]])), [[-0.5, 1.0]])
    np.testing.assert_allclose(normalize_map(np.array([[-1.0, -2.0]])), [[-1.0, -2.0]])  # no positive max
    with pytest.raises(ConfigError):
        consistency_aware_scores([M1], normalize="sum")


def test_cas_empty_and_errors():
    neg = [np.array([[-1.0, -0.5]]), np.array([[-0.2, -0.1]])]
    assert len(cas_neurons(neg)) == 0
    with pytest.raises(ConfigError):
        cas_neurons([])
    with pytest.raises(ConfigError):
        cas_neurons([M1, np.zeros((2, 4))])
    with pytest.raises(ConfigError):
        cas_neurons([M1, M2], threshold=1.5)
    with pytest.raises(ConfigError):
        cas_neurons([_attr(M1, "ig"), _attr(M2, "amig")])


def test_cas_from_attributions_keeps_method_and_fact():
    s = cas_neurons([_attr(M1, "amig", "fact7", "fact7#0"), _attr(M2, "amig", "fact7", "fact7#1")])
    assert (s.method, s.fact_id, s.query_id) == ("amig", "fact7", None)
    assert s.neurons == {(0, 0), (0, 1)}
    assert cas_neurons([M1, M2], fact_id="x").fact_id == "x"


def test_cas_can_leave_the_union_and_candidates_restrict_it():
    # N_1 = {0}, N_2 = {1} (0.19 is below 0.2 x max); neuron 2 is consistent but never a KN
    m1, m2 = np.array([[1.0, 0.0, 0.19]]), np.array([[0.0, 1.0, 0.19]])
    sets = [knowledge_neurons(_attr(m)) for m in (m1, m2)]
    u = union(sets)
    assert u == {(0, 0), (0, 1)}
    # CAS = [0.35 - 0.15, 0.2, 0.133]; threshold 0.06: all three, neuron 2 outside the union
    np.testing.assert_allclose(consistency_aware_scores([m1, m2]), [[0.2, 0.2, 0.7 * 0.19]], atol=1e-12)
    assert cas_neurons([m1, m2]).neurons == {(0, 0), (0, 1), (0, 2)}
    assert cas_neurons([m1, m2], candidates=u).neurons == u
    # threshold relative to the best candidate: only neuron 2 allowed -> {neuron 2}
    assert cas_neurons([m1, m2], candidates=[(0, 2)]).neurons == {(0, 2)}
    assert len(cas_neurons([m1, m2], candidates=[])) == 0
    with pytest.raises(ConfigError):
        cas_neurons([m1, m2], candidates=[(0, 3)])


FACTS = {
    "brazil": [("the official language of brazil is", "portuguese"),
               ("the language spoken in brazil is", "portuguese"),
               ("people in brazil speak", "portuguese")],
    "france": [("the capital of france is", "paris"),
               ("the capital city of france is", "paris"),
               ("france capital is", "paris")],
    "japan": [("the capital of japan is", "tokyo"),
              ("japan capital city is", "tokyo"),
              ("the city known as capital of japan is", "tokyo")],
    "germany": [("people in germany speak", "german"),
                ("the language of germany is", "german"),
                ("the official language of germany is", "german")],
}


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3"])
def test_cas_sets_and_the_union_on_a_tiny_model(arch):
    """CAS ⊆ ∪ N_i whenever the sufficient condition holds (threshold · max CAS ≥ β1 · t),
    always with ``candidates=∪ N_i``; a neuron outside ∪ N_i never scores above β1 · t;
    non-empty for facts with knowledge neurons."""
    m = tiny_model(arch)
    t, beta1 = 0.2, 0.7
    for qs in FACTS.values():
        attrs = attribute(m, qs, "ig", n_steps=4, progress=False)
        sets = [knowledge_neurons(a, threshold=t) for a in attrs]
        u = union(sets)
        assert u  # every query has knowledge neurons
        cas = consistency_aware_scores(attrs)
        outside = np.ones(cas.shape, dtype=bool)
        for l, p in u:
            outside[l, p] = False
        assert cas[outside].max() <= beta1 * t + 1e-12
        literal = cas_neurons(attrs)
        assert len(literal) > 0
        if 0.3 * cas.max() >= beta1 * t:
            assert set(literal) <= u
        restricted = cas_neurons(attrs, candidates=u)
        assert len(restricted) > 0 and set(restricted) <= u
        if cas[~outside].max() == cas.max():  # the best neuron is a KN: same threshold
            assert set(restricted) == set(literal) & u
