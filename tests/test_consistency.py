"""Tests for knowloc.consistency (CS1/CS2, Otsu, Welch, Table 1)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats
from skimage.filters import threshold_otsu

from knowloc.consistency import (
    SCORE_COLUMNS,
    SKIP_EMPTY_UNION,
    SKIP_FEW_QUERIES,
    SKIP_NOT_KNOWN,
    TABLE1_COLUMNS,
    consistency_scores,
    otsu_threshold,
    skipped_summary,
    split_facts,
    table1,
    table1_markdown,
    welch_t,
)
from knowloc.errors import ConfigError, DataError

# neuron ids used in hand-made sets: (layer, neuron)
A, B, C, D = (0, 1), (0, 2), (3, 7), (5, 1)


def make_tables(
    facts: dict[tuple[str, str], list[set[tuple[int, int]]]],
    *,
    relation: dict[str, str] | None = None,
    known: dict[tuple[str, str], list[bool]] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """queries/neurons tables from {(method, fact_id): [N_1, N_2, ...]}."""
    qrows, nrows = [], []
    for (method, fact), sets in facts.items():
        rel = (relation or {}).get(fact, "P1")
        kn = (known or {}).get((method, fact), [True] * len(sets))
        for i, s in enumerate(sets):
            qid = f"{fact}-q{i}"
            qrows.append(
                {
                    "method": method,
                    "fact_id": fact,
                    "relation": rel,
                    "query_id": qid,
                    "known": kn[i],
                    "prob": 0.5,
                    "n_neurons": len(s),
                }
            )
            for layer, neuron in sorted(s):
                nrows.append(
                    {
                        "method": method,
                        "fact_id": fact,
                        "relation": rel,
                        "query_id": qid,
                        "layer": layer,
                        "neuron": neuron,
                        "attribution": 1.0,
                    }
                )
    neurons = pd.DataFrame(
        nrows,
        columns=["method", "fact_id", "relation", "query_id", "layer", "neuron", "attribution"],
    )
    return pd.DataFrame(qrows), neurons


def scores_from_cs2(values: dict[str, dict[str, float]], relation: str = "P1") -> pd.DataFrame:
    """A scores table directly from {method: {fact_id: cs2}} (for split/table tests)."""
    rows = []
    for m, d in values.items():
        for f, v in d.items():
            rows.append(
                {
                    "method": m,
                    "fact_id": f,
                    "relation": relation,
                    "n_queries": 3,
                    "n_union": 10,
                    "n_intersection": 0,
                    "n_shared": round(v * 10),
                    "cs1": 0.0,
                    "cs2": v,
                    "skipped": None,
                }
            )
    return pd.DataFrame(rows, columns=SCORE_COLUMNS)


# ------------------------------------------------------------------------------ CS1 / CS2
def test_hand_computed_scores() -> None:
    q, n = make_tables(
        {
            ("ig", "f1"): [{A, B, C}, {A, B}, {A, D}],  # ∪=4, ∩={a}, shared={a,b}
            ("ig", "f2"): [{A, B}, {A, B}],  # identical sets
            ("ig", "f3"): [{A}, {B}, {C}],  # disjoint
            ("ig", "f4"): [{A, B}, set(), {A}],  # empty set kills the intersection
        }
    )
    s = consistency_scores(q, n).set_index("fact_id")
    assert list(consistency_scores(q, n).columns) == SCORE_COLUMNS
    f1 = s.loc["f1"]
    assert (f1.n_queries, f1.n_union, f1.n_intersection, f1.n_shared) == (3, 4, 1, 2)
    assert f1.cs1 == pytest.approx(0.25) and f1.cs2 == pytest.approx(0.5)
    assert f1.skipped is None
    assert s.loc["f2", "cs1"] == 1.0 and s.loc["f2", "cs2"] == 1.0
    assert s.loc["f3", "cs1"] == 0.0 and s.loc["f3", "cs2"] == 0.0
    f4 = s.loc["f4"]
    assert (f4.n_queries, f4.n_union, f4.n_intersection, f4.n_shared) == (3, 2, 0, 1)
    assert f4.cs1 == 0.0 and f4.cs2 == pytest.approx(0.5)


def test_neuron_identity_is_layer_and_index() -> None:
    # same neuron index in different layers is a different neuron
    q, n = make_tables({("ig", "f"): [{(0, 5)}, {(1, 5)}]})
    s = consistency_scores(q, n).iloc[0]
    assert s.n_union == 2 and s.n_shared == 0 and s.cs2 == 0.0


def test_duplicate_neuron_rows_counted_once() -> None:
    q, n = make_tables({("ig", "f"): [{A, B}, {A}]})
    n2 = pd.concat([n, n], ignore_index=True)
    pd.testing.assert_frame_equal(consistency_scores(q, n), consistency_scores(q, n2))


def test_skip_reasons_and_order() -> None:
    q, n = make_tables(
        {
            ("sig", "z"): [{A, B}, {A}],
            ("ig", "single"): [{A, B}],
            ("ig", "empty"): [set(), set(), set()],
            ("ig", "ok"): [{A}, {A, B}],
            ("ig", "unknown"): [{A}, {A}],
        },
        known={("ig", "unknown"): [False, False]},
    )
    s = consistency_scores(q, n)
    assert list(zip(s.method, s.fact_id)) == sorted(zip(s.method, s.fact_id))
    by = s.set_index(["method", "fact_id"])["skipped"].to_dict()
    assert by[("ig", "single")] == SKIP_FEW_QUERIES
    assert by[("ig", "empty")] == SKIP_EMPTY_UNION
    assert by[("ig", "unknown")] == SKIP_NOT_KNOWN
    assert by[("ig", "ok")] is None and by[("sig", "z")] is None
    skipped = s[s.skipped.notna()]
    assert skipped.cs1.isna().all() and skipped.cs2.isna().all()
    assert s[s.skipped.isna()].cs2.notna().all()

    summ = skipped_summary(s)
    assert list(summ.columns) == ["method", "reason", "n_facts"]
    got = summ.set_index(["method", "reason"])["n_facts"].to_dict()
    assert got[("ig", SKIP_NOT_KNOWN)] == 1
    assert got[("ig", SKIP_FEW_QUERIES)] == 1
    assert got[("ig", SKIP_EMPTY_UNION)] == 1
    assert got[("ig", "kept")] == 1
    assert got[("sig", SKIP_NOT_KNOWN)] == 0 and got[("sig", "kept")] == 1
    assert list(summ.method.unique()) == ["ig", "sig"]  # paper order


def test_population_filter() -> None:
    facts = {("ig", "a"): [{A}, {A}], ("ig", "b"): [{A}, {B}], ("sig", "b"): [{A}, {A}]}
    # "b" is known by sig on one query only, never by ig: the filter works per method
    known = {("ig", "a"): [True, False], ("ig", "b"): [False, False], ("sig", "b"): [False, True]}
    q, n = make_tables(facts, known=known)
    s = consistency_scores(q, n).set_index(["method", "fact_id"])
    assert s.loc[("ig", "a"), "skipped"] is None
    assert s.loc[("ig", "b"), "skipped"] == SKIP_NOT_KNOWN
    assert s.loc[("sig", "b"), "skipped"] is None
    s_all = consistency_scores(q, n, population="all").set_index(["method", "fact_id"])
    assert s_all.skipped.isna().all()
    assert s_all.loc[("ig", "b"), "cs2"] == 0.0
    # counts are filled even for skipped facts
    assert s.loc[("ig", "b"), "n_union"] == 2
    with pytest.raises(ConfigError):
        consistency_scores(q, n, population="some")


def test_bad_inputs() -> None:
    q, n = make_tables({("ig", "f"): [{A}, {A}]})
    with pytest.raises(DataError):
        consistency_scores(q.drop(columns="known"), n)
    orphan = n.assign(query_id="nope")
    with pytest.raises(DataError):
        consistency_scores(q, orphan)
    empty = consistency_scores(q.iloc[:0], n.iloc[:0])
    assert list(empty.columns) == SCORE_COLUMNS and empty.empty


neuron_sets = st.lists(
    st.sets(st.tuples(st.integers(0, 3), st.integers(0, 5)), max_size=8), min_size=2, max_size=6
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(neuron_sets)
def test_property_cs1_le_cs2_and_brute_force(sets: list[set[tuple[int, int]]]) -> None:
    q, n = make_tables({("ig", "f"): sets})
    row = consistency_scores(q, n).iloc[0]
    union = set().union(*sets)
    inter = set.intersection(*sets)
    shared = {x for x in union if sum(x in s for s in sets) > 1}
    assert row.n_union == len(union)
    assert row.n_intersection == len(inter)
    assert row.n_shared == len(shared)
    if not union:
        assert row.skipped == SKIP_EMPTY_UNION
        return
    assert row.cs1 == pytest.approx(len(inter) / len(union))
    assert row.cs2 == pytest.approx(len(shared) / len(union))
    assert 0.0 <= row.cs1 <= row.cs2 <= 1.0


# ------------------------------------------------------------------------------ Otsu
def brute_force_otsu(values: list[float], nbins: int = 256) -> tuple[float, list[set[int]]]:
    """Every split of the equal-width histogram, tried one by one.

    Bins are closed on the right (bin k holds e_k < v <= e_(k+1); bin 0 also holds the
    minimum), each value stands for its bin centre, and the split after bin k puts bins
    0..k in the lower class. Returns the largest between-class variance
    ``w0 · w1 · (μ0 − μ1)²`` and every partition (as the set of indices of the lower class)
    that reaches it.
    """
    edges = np.linspace(min(values), max(values), nbins + 1).tolist()
    bins = []
    for v in values:
        k = 0
        while k < nbins - 1 and v > edges[k + 1]:
            k += 1
        bins.append(k)
    centre = [(edges[b] + edges[b + 1]) / 2 for b in bins]
    scored: dict[frozenset[int], float] = {}
    for k in range(nbins - 1):
        low = frozenset(i for i, b in enumerate(bins) if b <= k)
        if not low or len(low) == len(values):
            continue
        high = [i for i in range(len(values)) if i not in low]
        mu0 = sum(centre[i] for i in low) / len(low)
        mu1 = sum(centre[i] for i in high) / len(high)
        scored[low] = len(low) * len(high) * (mu0 - mu1) ** 2
    best = max(scored.values())
    return best, [set(p) for p, v in scored.items() if v >= best * (1 - 1e-9)]


def lower_class(values: list[float], threshold: float) -> set[int]:
    return {i for i, v in enumerate(values) if not v > threshold}


cs2_like = st.lists(
    st.tuples(st.integers(0, 12), st.integers(1, 12)).map(lambda t: min(t[0], t[1]) / t[1]),
    min_size=2,
    max_size=30,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(cs2_like, st.lists(st.floats(0.0, 1.0), min_size=2, max_size=30)))
def test_otsu_split_is_the_brute_force_maximiser(values: list[float]) -> None:
    # K_II = {CS2 <= threshold} must be a partition that maximizes the between-class variance
    if min(values) == max(values):
        assert otsu_threshold(values) == values[0]
        return
    _, partitions = brute_force_otsu(values)
    assert lower_class(values, otsu_threshold(values)) in partitions
    # with few bins the histogram is coarse: the split still follows the bins
    _, partitions4 = brute_force_otsu(values, nbins=4)
    assert lower_class(values, otsu_threshold(values, nbins=4)) in partitions4


def test_otsu_whole_optimal_bin_goes_to_k_ii() -> None:
    # two clear clusters; 1/5 lies in the upper half of the optimal bin, so splitting at
    # that bin's centre put it in K_I although the maximizing split counts it in K_II
    values = [1 / 9, 1 / 5, 9 / 10, 1.0]
    _, partitions = brute_force_otsu(values)
    assert partitions == [{0, 1}]
    thr = otsu_threshold(values)
    assert 1 / 5 <= thr < 9 / 10
    assert lower_class(values, thr) == {0, 1}

    s = scores_from_cs2({"ig": dict(zip("abcd", values))})
    kinds = split_facts(s, "otsu").set_index("fact_id")["kind"].to_dict()
    assert kinds == {"a": "K_II", "b": "K_II", "c": "K_I", "d": "K_I"}
    row = table1(s, thresholds=(("Ot", "otsu"),)).iloc[0]
    assert row.R_I == 0.5 and row.S_II == pytest.approx((1 / 9 + 1 / 5) / 2)


def test_otsu_value_on_a_bin_edge() -> None:
    # 0.5 is exactly the edge between bins 127 and 128 of [0, 1]: bins are closed on the
    # right, so 0.5 is in the lower bin and "CS2 > threshold" keeps it there
    values = [0.0, 0.5, 1.0, 1.0]
    _, partitions = brute_force_otsu(values)
    assert partitions == [{0, 1}]
    assert otsu_threshold(values) == 0.5
    assert lower_class(values, 0.5) == {0, 1}


@pytest.mark.parametrize("seed", range(5))
def test_otsu_matches_skimage_random(seed: int) -> None:
    # same optimal bin as scikit-image; we return its upper edge where skimage returns
    # its centre (random floats never sit exactly on an edge)
    rng = np.random.default_rng(seed)
    x = rng.random(300) * rng.uniform(0.1, 1.0)
    ours = otsu_threshold(x, nbins=256)
    ref = float(threshold_otsu(x, nbins=256))
    bin_width = (x.max() - x.min()) / 256
    assert abs(ours - ref) <= bin_width + 1e-12
    assert ours == pytest.approx(ref + bin_width / 2, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_otsu_matches_skimage_bimodal(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    x = np.clip(np.r_[rng.normal(0.03, 0.02, 400), rng.normal(0.3, 0.08, 150)], 0, 1)
    ours = otsu_threshold(x)
    ref = float(threshold_otsu(x, nbins=256))
    assert abs(ours - ref) <= (x.max() - x.min()) / 256 + 1e-12
    assert 0.08 < ours < 0.25  # separates the two modes


def test_otsu_degenerate_and_errors() -> None:
    assert otsu_threshold([0.2, 0.2, 0.2]) == 0.2
    assert otsu_threshold([0.7]) == 0.7
    # skimage: centre of bin 0; ours: its upper edge
    assert otsu_threshold([0.0, 1.0]) == pytest.approx(
        threshold_otsu(np.array([0.0, 1.0])) + 1 / 512
    )
    assert otsu_threshold([0.1, np.nan, 0.1]) == 0.1
    with pytest.raises(ValueError):
        otsu_threshold([])
    with pytest.raises(ValueError):
        otsu_threshold([0.1, 0.2], nbins=1)


# ------------------------------------------------------------------------------ Welch
@pytest.mark.parametrize("seed", range(6))
def test_welch_matches_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.normal(0.2, rng.uniform(0.01, 0.2), rng.integers(2, 60))
    b = rng.normal(0.05, rng.uniform(0.01, 0.2), rng.integers(2, 60))
    t, p = welch_t(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert t == pytest.approx(float(ref.statistic), rel=1e-10)
    assert p == pytest.approx(float(ref.pvalue), rel=1e-8, abs=1e-300)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_welch_edge_cases() -> None:
    assert all(math.isnan(v) for v in welch_t([1.0], [0.0, 1.0]))
    assert all(math.isnan(v) for v in welch_t([], []))
    t, p = welch_t([1.0, 1.0, 1.0], [0.0, 0.0])  # zero variance, different means
    ref = stats.ttest_ind([1.0, 1.0, 1.0], [0.0, 0.0], equal_var=False)
    assert t == float(ref.statistic) == math.inf and p == float(ref.pvalue) == 0.0
    assert all(math.isnan(v) for v in welch_t([1.0, 1.0], [1.0, 1.0]))


# ------------------------------------------------------------------------------ split / Table 1
def test_split_static_and_otsu() -> None:
    s = scores_from_cs2({"ig": {"a": 0.05, "b": 0.1, "c": 0.3}, "sig": {"a": 0.5, "b": 0.9}})
    s = pd.concat(
        [
            s,
            pd.DataFrame(
                [
                    {
                        "method": "ig",
                        "fact_id": "x",
                        "relation": "P1",
                        "n_queries": 1,
                        "n_union": 1,
                        "n_intersection": 1,
                        "n_shared": 0,
                        "cs1": np.nan,
                        "cs2": np.nan,
                        "skipped": SKIP_FEW_QUERIES,
                    }
                ]
            ),
        ],
        ignore_index=True,
    )
    sp = split_facts(s, 0.1)
    assert "x" not in set(sp.fact_id)  # skipped facts excluded
    kinds = dict(zip(zip(sp.method, sp.fact_id), sp.kind))
    assert kinds[("ig", "b")] == "K_II"  # at the threshold -> K_II
    assert kinds[("ig", "a")] == "K_II" and kinds[("ig", "c")] == "K_I"
    assert (sp.threshold == 0.1).all()

    so = split_facts(s, "otsu")
    thr = so.groupby("method").threshold.first()
    assert thr["ig"] == pytest.approx(otsu_threshold([0.05, 0.1, 0.3]))
    assert thr["sig"] == pytest.approx(otsu_threshold([0.5, 0.9]))
    assert thr["ig"] != thr["sig"]  # computed per method
    for bad in ("median", True, float("nan"), None):
        with pytest.raises(ConfigError):
            split_facts(s, bad)  # type: ignore[arg-type]


def test_table1_hand_checked() -> None:
    ig = {"f1": 0.5, "f2": 0.4, "f3": 0.05, "f4": 0.02, "f5": 0.0}
    sig = {"f1": 0.6, "f2": 0.08, "f3": 0.01, "f4": 0.03, "f5": 0.2}
    amig = {"f1": 0.3, "f2": 0.05, "f3": 0.02, "f4": 0.2, "f5": 0.09}
    s = scores_from_cs2({"sig": sig, "ig": ig, "amig": amig})
    # a fact skipped in one method drops out of ∩:II but counts for the other methods
    extra = {
        "method": "ig",
        "fact_id": "f6",
        "relation": "P1",
        "n_queries": 3,
        "n_union": 10,
        "n_intersection": 0,
        "n_shared": 0,
        "cs1": 0.0,
        "cs2": 0.0,
        "skipped": None,
    }
    extra_sk = dict(extra, method="sig", cs1=np.nan, cs2=np.nan, skipped=SKIP_EMPTY_UNION)
    s = pd.concat([s, pd.DataFrame([extra, extra_sk])], ignore_index=True)

    t1 = table1(s)
    assert list(t1.columns) == TABLE1_COLUMNS
    assert list(zip(t1["T"], t1.method)) == [
        ("St", "ig"),
        ("St", "sig"),
        ("St", "amig"),
        ("Ot", "ig"),
        ("Ot", "sig"),
        ("Ot", "amig"),
    ]
    st_ = t1[t1["T"] == "St"].set_index("method")
    # ig: K_I = {f1, f2}, K_II = {f3, f4, f5, f6}
    assert st_.loc["ig", "n_facts"] == 6
    assert st_.loc["ig", "R_I"] == pytest.approx(2 / 6)
    assert st_.loc["ig", "R_II"] == pytest.approx(4 / 6)
    assert st_.loc["ig", "S_I"] == pytest.approx(0.45)
    assert st_.loc["ig", "S_II"] == pytest.approx((0.05 + 0.02 + 0.0 + 0.0) / 4)
    ref = stats.ttest_ind([0.5, 0.4], [0.05, 0.02, 0.0, 0.0], equal_var=False)
    assert st_.loc["ig", "t"] == pytest.approx(ref.statistic)
    assert st_.loc["ig", "p"] == pytest.approx(ref.pvalue)
    # sig: K_I = {f1, f5}; amig: K_I = {f1, f4}
    assert st_.loc["sig", "R_I"] == pytest.approx(2 / 5)
    assert st_.loc["amig", "S_I"] == pytest.approx(0.25)
    # ∩:II over f1..f5 (f6 skipped in sig): all-K_II facts are f3 only -> 1/5
    assert np.allclose(st_.cap_II, 1 / 5)
    assert (st_.threshold == 0.1).all()
    ot = t1[t1["T"] == "Ot"].set_index("method")
    assert ot.loc["ig", "threshold"] == pytest.approx(otsu_threshold(list(ig.values()) + [0.0]))
    # R_I + R_II = 1
    assert np.allclose(t1.R_I + t1.R_II, 1.0)

    md = table1_markdown(t1)
    header = md.splitlines()[0]
    for col in (
        "method",
        "T",
        "threshold",
        "n",
        "R: I",
        "S: I",
        "R: II",
        "S: II",
        "t",
        "p",
        "∩: II",
    ):
        assert f"| {col} |" in header or header.startswith(f"| {col} ")
    assert len(md.strip().splitlines()) == 2 + len(t1)
    assert "e-" in md.splitlines()[2].split("|")[10]  # p in scientific notation
    assert "0.20" in md  # cap_II with 2 decimals


def test_table1_edge_cases() -> None:
    s = scores_from_cs2({"ig": {"a": 0.5}, "sig": {"b": 0.05}})
    t1 = table1(s, thresholds=(("St", 0.1),))
    assert t1.t.isna().all() and t1.p.isna().all()  # groups of < 2 facts
    assert t1.cap_II.isna().all()  # no fact common to both methods
    assert "–" in table1_markdown(t1)
    with pytest.raises(ConfigError):
        table1(s, thresholds=())
    with pytest.raises(ConfigError):
        table1(s, thresholds=(("St", 0.1), ("St", 0.2)))


# ------------------------------------------------------------------------------ end to end
def test_pipeline_scores_to_table1() -> None:
    rng = np.random.default_rng(7)
    facts, relation = {}, {}
    for m in ("ig", "sig", "amig"):
        for f in range(40):
            base = {(int(rng.integers(0, 4)), int(rng.integers(0, 50))) for _ in range(6)}
            sets = []
            for _ in range(int(rng.integers(2, 5))):
                own = {(int(rng.integers(0, 4)), int(rng.integers(0, 50))) for _ in range(5)}
                keep = {x for x in base if rng.random() < (0.8 if f % 3 == 0 else 0.1)}
                sets.append(own | keep)
            facts[(m, f"fact{f:02d}")] = sets
            relation[f"fact{f:02d}"] = f"P{f % 4 + 17}"
    q, n = make_tables(facts, relation=relation)
    s = consistency_scores(q, n)
    assert s.skipped.isna().all() and len(s) == 120
    t1 = table1(s)
    assert len(t1) == 6 and (t1.n_facts == 40).all()
    assert (t1.S_I > t1.S_II).all() and (t1.t > 0).all()


# ------------------------------------------------------------------------------ intervals
def _table1_case() -> pd.DataFrame:
    ig = {f"f{i}": v for i, v in enumerate([0.5, 0.4, 0.35, 0.05, 0.02, 0.0, 0.08, 0.3])}
    sig = {f"f{i}": v for i, v in enumerate([0.6, 0.08, 0.01, 0.03, 0.2, 0.25, 0.0, 0.4])}
    return scores_from_cs2({"ig": ig, "sig": sig})


def test_table1_intervals_hand_checked() -> None:
    """R: I / R: II / ∩: II carry Wilson's interval of their count of facts (against scipy),
    S: I / S: II the bootstrap over the facts of their group, seeded per statistic."""
    from knowloc.intervals import boot_seed, fact_bootstrap

    t1 = table1(_table1_case(), thresholds=(("St", 0.1),), n_boot=500, seed=4)
    ig = t1.set_index("method").loc["ig"]
    # ig: K_I = {f0, f1, f2, f7} (0.5, 0.4, 0.35, 0.3), K_II = {f3, f4, f5, f6}
    assert (ig.n_facts, ig.n_I, ig.n_II) == (8, 4, 4)
    for col, k in (("R_I", 4), ("R_II", 4)):
        ci = stats.binomtest(k, 8).proportion_ci(method="wilson")
        assert (ig[f"{col}_lo"], ig[f"{col}_hi"]) == pytest.approx((ci.low, ci.high))
    lo, hi, n = fact_bootstrap([0.5, 0.4, 0.35, 0.3], ["f0", "f1", "f2", "f7"], n_boot=500,
                               seed=boot_seed(4, "table1", "St", "ig", "S_I"))
    assert (ig.S_I_lo, ig.S_I_hi) == (lo, hi) and n == 4
    assert 0.3 <= ig.S_I_lo <= ig.S_I <= ig.S_I_hi <= 0.5
    # ∩: II: facts K_II in both methods: f3 (0.05, 0.03), f6 (0.08, 0.0) -> 2 of 8
    ci = stats.binomtest(2, 8).proportion_ci(method="wilson")
    assert (t1.n_common == 8).all() and np.allclose(t1.cap_II, 2 / 8)
    assert np.allclose(t1.cap_II_lo, ci.low) and np.allclose(t1.cap_II_hi, ci.high)
    for col in ("R_I", "S_I", "R_II", "S_II", "cap_II"):  # each bound beside its column
        i = TABLE1_COLUMNS.index(col)
        assert TABLE1_COLUMNS[i + 1: i + 3] == [f"{col}_lo", f"{col}_hi"]
    md = table1_markdown(t1)
    r_i = f"{ig.R_I:.2f} [{ig.R_I_lo:.2f}, {ig.R_I_hi:.2f}]"
    assert f"| {r_i} |" in md and "| n: I | n: II | n: ∩ |" in md.splitlines()[0]


def test_table1_point_estimates_do_not_depend_on_the_bootstrap() -> None:
    s = _table1_case()
    a = table1(s, n_boot=200, seed=0)
    b = table1(s, n_boot=300, seed=1)
    point = [c for c in TABLE1_COLUMNS if not c.endswith(("_lo", "_hi"))]
    pd.testing.assert_frame_equal(a[point], b[point])
    pd.testing.assert_frame_equal(a, table1(s, n_boot=200, seed=0))  # deterministic
    assert not np.allclose(a.S_I_lo, b.S_I_lo)
    assert (a.R_I_lo == b.R_I_lo).all()  # Wilson: no resampling
    with pytest.raises(ConfigError):
        table1(s, n_boot=0)


def test_table1_intervals_undefined_for_small_groups() -> None:
    s = scores_from_cs2({"ig": {"a": 0.5, "b": 0.05, "c": 0.02}})
    t1 = table1(s, thresholds=(("St", 0.1),)).iloc[0]
    assert t1.n_I == 1 and math.isnan(t1.S_I_lo) and math.isnan(t1.S_I_hi)
    assert t1.n_II == 2 and 0.02 <= t1.S_II_lo <= t1.S_II_hi <= 0.05
    assert 0 < t1.R_I_lo < 1 / 3 < t1.R_I_hi < 1
