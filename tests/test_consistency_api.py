"""knowloc.consistency_of: CS1/CS2 from attributions or neuron sets, checked against
hand-computed toy cases and against the numbers a localized run directory stores."""

from __future__ import annotations

import math
import shutil

import pandas as pd
import pytest

import knowloc
from knowloc.consistency import (
    SCORE_COLUMNS,
    SKIP_EMPTY_UNION,
    SKIP_FEW_QUERIES,
    SKIP_NOT_KNOWN,
    Consistency,
    FactConsistency,
    consistency_of,
    table1,
)
from knowloc.errors import ConfigError, DataError, KnowlocError
from knowloc.neurons import NeuronSet

# fact A: union {(0,1),(0,2),(1,5),(2,7),(3,3)} (5), in all three {(0,1)} (1),
#         in more than one {(0,1),(1,5)} (2): CS1 = 1/5, CS2 = 2/5
A = [{(0, 1), (0, 2), (1, 5)}, {(0, 1), (1, 5), (2, 7)}, {(0, 1), (3, 3)}]
# fact B: two equal sets: CS1 = CS2 = 1
B = [{(1, 1), (1, 2)}, {(1, 2), (1, 1)}]
# fact C: disjoint sets: CS1 = CS2 = 0
C = [{(0, 0)}, {(0, 1)}, {(0, 2)}, {(0, 3)}]


def test_hand_computed_toy_facts_from_plain_sets():
    res = consistency_of({"A": A, "B": B, "C": C, "one": [{(0, 1)}], "none": [set(), set()]})
    assert isinstance(res, Consistency)
    assert list(res.scores.columns) == SCORE_COLUMNS
    got = {f.fact_id: f for f in res}
    assert all(isinstance(f, FactConsistency) for f in got.values())
    a = got["A"]
    assert (a.n_queries, a.n_union, a.n_intersection, a.n_shared) == (3, 5, 1, 2)
    assert a.cs1 == pytest.approx(1 / 5) and a.cs2 == pytest.approx(2 / 5)
    assert a.skipped is None and a.relation is None
    assert (got["B"].cs1, got["B"].cs2) == (1.0, 1.0)
    assert (got["C"].cs1, got["C"].cs2, got["C"].n_union) == (0.0, 0.0, 4)
    assert got["one"].skipped == SKIP_FEW_QUERIES and math.isnan(got["one"].cs2)
    assert got["none"].skipped == SKIP_EMPTY_UNION and math.isnan(got["none"].cs1)
    assert res.population == "all"  # neuron sets do not say whether the model knew the fact
    assert res.fact("A") == a


def test_neuron_sets_are_grouped_by_fact_and_method():
    items = [NeuronSet(frozenset(s), method="ig", query_id=f"A#{i}", fact_id="A")
             for i, s in enumerate(A)]
    items += [NeuronSet(frozenset(s), method="amig", query_id=f"A#{i}", fact_id="A")
              for i, s in enumerate(B)]
    res = consistency_of(items)
    by_method = {f.method: f for f in res}
    assert by_method["ig"].cs2 == pytest.approx(0.4)
    assert by_method["amig"].cs2 == 1.0 and by_method["amig"].n_queries == 2
    with pytest.raises(ConfigError, match="method="):
        res.fact("A")
    assert res.fact("A", method="ig").cs1 == pytest.approx(0.2)
    with pytest.raises(DataError, match="no scores for fact 'Z'"):
        res.fact("Z")


def test_table1_is_the_pure_function_on_the_scores():
    # D: union {(0,1),(0,2),(0,3),(0,4)} (4), shared {(0,1)}: CS2 = 1/4.
    # CS2 of A, B, C, D = 0.4, 1, 0, 0.25 -> static 0.1: K_I = {0.4, 1, 0.25}, K_II = {0}
    d = [{(0, 1), (0, 2)}, {(0, 1), (0, 3)}, {(0, 4)}]
    res = consistency_of({"A": A, "B": B, "C": C, "D": d})
    cs2 = {f.fact_id: f.cs2 for f in res}
    assert cs2["D"] == pytest.approx(1 / 4)
    t1 = res.table1()
    pd.testing.assert_frame_equal(t1, table1(res.scores, (("St", 0.1), ("Ot", "otsu"))))
    st = t1[t1["T"] == "St"].iloc[0]
    assert st["n_facts"] == 4 and st["R_I"] == 0.75 and st["R_II"] == 0.25
    assert st["S_I"] == pytest.approx((0.4 + 1 + 0.25) / 3) and st["S_II"] == 0.0
    assert list(res.table1(0.3, otsu=False)["T"]) == ["St"]
    assert res.table1(0.3, otsu=False)["R_I"].iloc[0] == pytest.approx(0.5)  # 0.4 and 1
    skipped = res.skipped()
    assert int(skipped.loc[skipped["reason"] == "kept", "n_facts"].iloc[0]) == 4


def test_user_errors_are_one_line_knowloc_errors():
    with pytest.raises(DataError, match="has no fact_id"):
        consistency_of([NeuronSet(frozenset({(0, 1)}), method="ig")])
    with pytest.raises(DataError, match="consistency_of takes"):
        consistency_of([{(0, 1)}])  # a plain set outside a mapping has no fact
    with pytest.raises(DataError, match="consistency_of takes"):
        consistency_of({"A": ["not a set"]})
    with pytest.raises(DataError, match="not a collection of"):
        consistency_of({"A": [{1, 2}]})
    with pytest.raises(DataError, match="given twice"):
        consistency_of([NeuronSet(frozenset({(0, 1)}), "ig", "q", "A")] * 2)
    with pytest.raises(ConfigError, match="population"):
        consistency_of({"A": A}, population="some")
    with pytest.raises(ConfigError, match="population='all'"):
        consistency_of({"A": A}, population="known")
    with pytest.raises(ConfigError):
        consistency_of({"A": A}, threshold=1.5)
    with pytest.raises(DataError):
        consistency_of(42)  # type: ignore[arg-type]
    for exc in (ConfigError, DataError):
        assert issubclass(exc, KnowlocError)


def test_top_level_export():
    assert knowloc.consistency_of is consistency_of
    assert knowloc.Consistency is Consistency


# ------------------------------------------------------------------ against a run directory
@pytest.fixture(scope="module")
def mapped_run(tmp_path_factory, tiny_dir, facts_file):
    """A tiny-model run localized with full maps (IG, AMIG), 3 facts per relation, 3 steps."""
    from knowloc.cli import main

    run = tmp_path_factory.mktemp("runs") / "maps"
    assert main(["-q", "localize", "--model", str(tiny_dir), "--dataset", f"jsonl:{facts_file}",
                 "--method", "ig,amig", "--n-steps", "3",
                 "--facts-per-relation", "3", "--keep-maps", "--out", str(run)]) == 0
    return run


@pytest.mark.parametrize("population", ["known", "all"])
def test_attributions_give_the_run_directory_numbers(mapped_run, tmp_path, population):
    """The stored maps through consistency_of give exactly the scores (and Table 1) that
    `knowloc consistency` computed from the run's tables."""
    from knowloc.cli import main
    from knowloc.pipeline.run import load_maps
    from knowloc.store import RunStore

    run = tmp_path / "run"
    shutil.copytree(mapped_run, run)
    assert main(["-q", "consistency", "--run", str(run), "--population", population]) == 0
    stored = RunStore(run, create=False).table("consistency")
    stored = stored.sort_values(["method", "fact_id"], kind="mergesort").reset_index(drop=True)

    attrs = list(load_maps(run).values())
    assert {a.method for a in attrs} == {"ig", "amig"} and len(attrs) == 2 * (3 * 4 + 3 * 3)
    res = consistency_of(attrs, population=None if population == "known" else population)
    assert res.population == population
    got = res.scores
    assert len(got) == len(stored) == 2 * 6
    cols = ["method", "fact_id", "relation", "n_queries", "n_union", "n_intersection",
            "n_shared", "skipped"]
    assert got[cols].astype(object).equals(stored[cols].astype(object))
    pd.testing.assert_series_equal(got["cs1"], stored["cs1"], check_exact=True)
    pd.testing.assert_series_equal(got["cs2"], stored["cs2"], check_exact=True)
    pd.testing.assert_frame_equal(res.table1(), table1(stored), check_exact=True)
    if population == "known":  # the tiny random model knows some facts, not all
        assert (got["skipped"] == SKIP_NOT_KNOWN).any() and got["skipped"].isna().any()
    else:
        assert got["skipped"].isna().all()

    # grouping by a mapping gives the same numbers
    by_fact: dict[str, list] = {}
    for a in attrs:
        by_fact.setdefault(a.fact_id, []).append(a)
    res2 = consistency_of(by_fact, population=population)
    pd.testing.assert_frame_equal(res2.scores, got)
