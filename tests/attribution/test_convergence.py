"""The completeness-gap summary of one attribution (knowloc.attribution.convergence):
hand-made per-layer gaps, their printout and JSON fields."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from knowloc.attribution import Attribution
from knowloc.attribution.convergence import GAP_LIMIT, advice, format_gap, gap_summary


def test_gap_limit_is_five_percent() -> None:
    assert GAP_LIMIT == 0.05


def test_summary_of_hand_made_gaps() -> None:
    gaps = [0.01, 0.032, 0.2, 0.05, 0.06, 0.0]  # 0.05 itself is not above the limit
    s = gap_summary(gaps)
    assert s.computed and s.largest == 0.2 and s.layer == 2
    assert s.n_above == 2 and s.converged is False
    lines = s.lines("sig")
    assert lines[0] == ("completeness gap: 20.0% (largest over layers, layer 2); "
                        "2 of 6 layers above 5%")
    assert lines[1].startswith("the integral has not converged")
    assert "--n-steps" in lines[1] and "--rule gausslegendre" in lines[1]


def test_converged_attribution_prints_one_line() -> None:
    s = gap_summary(np.array([0.001, 0.032, 0.0049]))
    assert s.converged is True and s.n_above == 0 and s.layer == 1
    assert s.lines("amig") == [("completeness gap: 3.2% (largest over layers, layer 1); "
                                "0 of 3 layers above 5%")]
    assert gap_summary([0.05, 0.01]).converged is True  # the limit itself is not above


def test_first_layer_wins_a_tie() -> None:
    assert gap_summary([0.1, 0.3, 0.3]).layer == 1


def test_advice_per_method_and_rule() -> None:
    assert "--rule gausslegendre" in advice("sig", "riemann_right")
    assert "--rule gausslegendre" in advice("amig", None)
    assert "--rule gausslegendre" not in advice("amig", "gausslegendre")  # already used
    ig = advice("ig", "riemann_right")
    assert "--n-steps" in ig and "Gemma" in ig and "docs/methods.md" in ig
    assert "--rule gausslegendre" not in ig


def test_infinite_and_missing_gaps() -> None:
    s = gap_summary(torch.tensor([0.01, math.inf, 0.02], dtype=torch.float64))
    assert s.largest == math.inf and s.layer == 1 and s.n_above == 1
    assert "completeness gap: infinite (largest over layers, layer 1)" in s.lines("ig")[0]
    d = s.as_dict()
    assert d["completeness_gap"] is None and d["completeness_gap_per_layer"] == [0.01, None, 0.02]
    json.dumps(d, allow_nan=False)  # strict JSON
    none = gap_summary(None)
    assert not none.computed and none.converged is None and none.layer is None
    assert none.lines("ig") == ["completeness gap: not computed"]
    assert none.as_dict()["completeness_gap"] is None
    assert none.as_dict()["layers_above_gap_limit"] is None
    assert format_gap(math.nan) == "not computed" and format_gap(0.0321) == "3.2%"


def test_summary_of_an_attribution_is_its_own_gap() -> None:
    gap = torch.tensor([0.004, 0.07, 0.5], dtype=torch.float64)
    attr = Attribution(prompt="p", answer="a", target_id=1, method="ig",
                       scores=torch.zeros(3, 4), activations=torch.zeros(3, 4), prob=0.5,
                       top1=True, predicted_id=1, predicted="a", config={},
                       completeness_gap=gap)
    s = gap_summary(attr)
    assert s.per_layer == tuple(gap.tolist())
    d = s.as_dict()
    assert d == {"completeness_gap": 0.5, "completeness_gap_layer": 2,
                 "completeness_gap_per_layer": gap.tolist(), "layers_above_gap_limit": 2,
                 "gap_limit": 0.05}
    attr.completeness_gap = None
    assert not gap_summary(attr).computed


@pytest.mark.parametrize("limit", [0.01, 0.5])
def test_custom_limit(limit: float) -> None:
    s = gap_summary([0.02, 0.1], limit=limit)
    assert s.n_above == sum(g > limit for g in (0.02, 0.1))
    assert f"above {100 * limit:g}%" in s.lines("ig")[0]
