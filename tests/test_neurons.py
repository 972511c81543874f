"""Knowledge-neuron selection and set algebra on hand-made score maps (METHODS §1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from knowloc.attribution import Attribution
from knowloc.errors import ConfigError
from knowloc.neurons import (
    NeuronSet,
    Selection,
    intersection,
    knowledge_neurons,
    neurons_frame,
    refine,
    select,
    union,
)

# 2 layers x 4 neurons; max = 1.0 at (1, 0)
SCORES = np.array(
    [
        [0.10, 0.90, -0.50, 0.30],
        [1.00, 0.19, 0.25, 0.00],
    ]
)
# all 8 neurons by decreasing score
ALL_SORTED = [(1, 0), (0, 1), (0, 3), (1, 2), (1, 1), (0, 0), (1, 3), (0, 2)]


def as_list(idx: np.ndarray) -> list[tuple[int, int]]:
    assert idx.dtype == np.int64 and idx.ndim == 2 and idx.shape[1] == 2
    return [(int(l), int(p)) for l, p in idx]


# ------------------------------------------------------------------------- select
def test_relative_threshold_keeps_scores_above_t_times_max_in_decreasing_order():
    # > 0.2 * 1.0: 1.0, 0.9, 0.3, 0.25 (0.19 is below, 0.1 too)
    got = as_list(select(SCORES, Selection("relative", 0.2)))
    assert got == [(1, 0), (0, 1), (0, 3), (1, 2)]


def test_relative_threshold_is_relative_to_the_max():
    # scaling the whole map does not change the set
    assert as_list(select(SCORES * 7.5, Selection("relative", 0.2))) == [
        (1, 0), (0, 1), (0, 3), (1, 2)
    ]
    # t = 0.5: > 0.5 -> 1.0, 0.9
    assert as_list(select(SCORES, Selection("relative", 0.5))) == [(1, 0), (0, 1)]
    # t = 1: nothing is strictly above the max
    assert as_list(select(SCORES, Selection("relative", 1.0))) == []
    # t = 0: every strictly positive score
    assert as_list(select(SCORES, Selection("relative", 0.0))) == [
        (1, 0), (0, 1), (0, 3), (1, 2), (1, 1), (0, 0)
    ]


def test_relative_threshold_with_no_positive_score_is_empty():
    neg = -np.abs(SCORES) - 0.1
    assert as_list(select(neg, Selection("relative", 0.2))) == []
    assert select(neg, Selection("relative", 0.2)).shape == (0, 2)
    assert as_list(select(np.zeros((3, 5)), Selection("relative", 0.2))) == []


def test_absolute_threshold_is_strict():
    # > 0.25: 1.0, 0.9, 0.3 (0.25 itself is not above)
    assert as_list(select(SCORES, Selection("absolute", 0.25))) == [(1, 0), (0, 1), (0, 3)]
    # a negative absolute threshold admits negative scores
    assert as_list(select(SCORES, Selection("absolute", -0.6))) == ALL_SORTED
    assert as_list(select(SCORES, Selection("absolute", 5.0))) == []


def test_topk():
    assert as_list(select(SCORES, Selection("topk", 1))) == [(1, 0)]
    assert as_list(select(SCORES, Selection("topk", 3))) == [(1, 0), (0, 1), (0, 3)]
    assert as_list(select(SCORES, Selection("topk", 0))) == []
    # k larger than the map: everything, sorted; negative scores included
    assert as_list(select(SCORES, Selection("topk", 100))) == ALL_SORTED


def test_select_accepts_torch_tensors_and_keeps_layer_neuron_indexing():
    t = torch.tensor(SCORES, dtype=torch.float32)
    assert as_list(select(t, Selection("relative", 0.2))) == [(1, 0), (0, 1), (0, 3), (1, 2)]
    # a single spike in a wider map: (layer, neuron) recovered from the flat index
    big = torch.zeros(5, 37)
    big[3, 29] = 2.0
    big[0, 36] = 1.0
    big[4, 0] = 0.3
    assert as_list(select(big, Selection("relative", 0.2))) == [(3, 29), (0, 36)]


def test_relative_ties_keep_row_major_order():
    s = np.array([[0.5, 1.0, 0.5], [1.0, 0.0, 0.5]])
    assert as_list(select(s, Selection("relative", 0.2))) == [
        (0, 1), (1, 0), (0, 0), (0, 2), (1, 2)
    ]


# ---------------------------------------------------------------------- Selection
@pytest.mark.parametrize(
    "mode, value, match",
    [
        ("percentile", 0.2, "unknown selection mode"),
        ("relative", 1.5, r"\[0, 1\]"),
        ("relative", -0.1, r"\[0, 1\]"),
        ("topk", -1, "non-negative integer"),
        ("topk", 2.5, "non-negative integer"),
    ],
)
def test_selection_validation(mode, value, match):
    with pytest.raises(ConfigError, match=match):
        Selection(mode, value).validate()


@pytest.mark.parametrize(
    "mode, value", [("relative", 0.0), ("relative", 1.0), ("absolute", -3.0), ("topk", 0),
                    ("topk", 7)]
)
def test_valid_selections(mode, value):
    sel = Selection(mode, value)
    assert sel.validate() is sel
    assert sel.as_dict() == {"mode": mode, "value": value}


def test_default_selection_is_relative_0_2():
    assert Selection() == Selection("relative", 0.2)


# ---------------------------------------------------------------------- NeuronSet
def _attr(scores: np.ndarray, method: str = "ig") -> Attribution:
    s = torch.tensor(scores, dtype=torch.float32)
    return Attribution(
        prompt="p", answer="a", target_id=0, method=method, scores=s,
        activations=torch.arange(s.numel(), dtype=torch.float32).reshape(s.shape),
        prob=0.5, top1=True, predicted_id=0, predicted="a", config={},
        query_id="f1#0", fact_id="f1", relation="P1",
    )


def test_neuron_set_from_attribution():
    ns = NeuronSet.from_attribution(_attr(SCORES, "amig"))
    assert ns.neurons == frozenset({(1, 0), (0, 1), (0, 3), (1, 2)})
    assert (ns.method, ns.query_id, ns.fact_id) == ("amig", "f1#0", "f1")
    assert len(ns) == 4
    assert list(ns) == [(0, 1), (0, 3), (1, 0), (1, 2)]  # iteration is sorted
    assert (1, 2) in ns and (1, 1) not in ns
    assert all(isinstance(v, int) for n in ns for v in n)
    top2 = NeuronSet.from_attribution(_attr(SCORES), Selection("topk", 2))
    assert top2.neurons == {(1, 0), (0, 1)}


def test_knowledge_neurons_helper():
    attr = _attr(SCORES)
    assert knowledge_neurons(attr).neurons == {(1, 0), (0, 1), (0, 3), (1, 2)}
    assert knowledge_neurons(attr, 0.5).neurons == {(1, 0), (0, 1)}
    assert knowledge_neurons(attr, 0.25, mode="absolute").neurons == {(1, 0), (0, 1), (0, 3)}
    with pytest.raises(ConfigError):
        knowledge_neurons(attr, 2.0)
    with pytest.raises(ConfigError):
        knowledge_neurons(attr, 0.2, mode="bogus")


def test_neurons_frame_rows():
    df = neurons_frame(_attr(SCORES))
    assert list(df.columns) == ["layer", "neuron", "attribution", "activation", "rank"]
    assert list(zip(df.layer, df.neuron)) == [(1, 0), (0, 1), (0, 3), (1, 2)]
    np.testing.assert_allclose(df.attribution, [1.0, 0.9, 0.3, 0.25], rtol=1e-6)
    # activations were arange(8).reshape(2, 4): (l, p) -> 4 l + p
    np.testing.assert_array_equal(df.activation, [4.0, 1.0, 3.0, 6.0])
    assert list(df["rank"]) == [0, 1, 2, 3]
    empty = neurons_frame(_attr(-np.ones((2, 4))))
    assert len(empty) == 0 and list(empty.columns) == list(df.columns)


# -------------------------------------------------------------------- set algebra
A = {(0, 1), (1, 2)}
B = {(1, 2), (2, 3)}
C = {(1, 2), (0, 1), (5, 5)}


def test_union():
    assert union([A, B, C]) == {(0, 1), (1, 2), (2, 3), (5, 5)}
    assert union([A]) == A
    assert union([]) == set()


def test_intersection():
    assert intersection([A, B, C]) == {(1, 2)}
    assert intersection([A, C]) == {(0, 1), (1, 2)}
    assert intersection([A, {(9, 9)}]) == set()
    assert intersection([A]) == A
    assert intersection([]) == set()


def test_refine_keeps_neurons_in_more_than_one_set():
    assert refine([A, B, C]) == {(0, 1), (1, 2)}
    assert refine([A, B]) == {(1, 2)}
    assert refine([A]) == set()
    assert refine([]) == set()
    # a neuron repeated inside ONE set counts once
    assert refine([[(0, 1), (0, 1)], [(2, 2)]]) == set()


def test_set_algebra_does_not_mutate_inputs_and_accepts_neuron_sets():
    a, b = set(A), set(B)
    intersection([a, b])
    union([a, b])
    refine([a, b])
    assert a == A and b == B
    na = NeuronSet(frozenset(A), "ig")
    nb = NeuronSet(frozenset(B), "ig")
    assert intersection([na, nb]) == {(1, 2)}
    assert union([na, nb]) == A | B
    assert refine([na, nb, NeuronSet(frozenset(C))]) == {(0, 1), (1, 2)}
