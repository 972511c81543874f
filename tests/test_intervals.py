"""knowloc.intervals: Wilson's interval against known values and scipy, the bootstrap over
facts against an enumerated bootstrap distribution and scipy.stats.bootstrap, and the
facts-as-units property."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from knowloc.errors import ConfigError
from knowloc.intervals import (
    boot_seed,
    bootstrap_ratios,
    fact_bootstrap,
    fact_sums,
    grouped_mean_intervals,
    mean_intervals,
    percentile_interval,
    wilson,
)


# ------------------------------------------------------------------------------ Wilson
def test_wilson_known_value() -> None:
    lo, hi = wilson(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)


@pytest.mark.parametrize(("k", "n"), [(0, 1), (1, 1), (0, 7), (3, 7), (7, 7), (12, 42),
                                      (41, 42), (250, 1000)])
def test_wilson_matches_scipy(k: int, n: int) -> None:
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12)


def test_wilson_edges_and_errors() -> None:
    assert all(math.isnan(v) for v in wilson(0, 0))
    assert wilson(0, 5)[0] == 0.0 and wilson(5, 5)[1] == 1.0
    lo90, hi90 = wilson(3, 10, level=0.90)
    lo95, hi95 = wilson(3, 10)
    assert lo95 < lo90 < 0.3 < hi90 < hi95
    for bad in ((6, 5), (-1, 5)):
        with pytest.raises(ConfigError):
            wilson(*bad)
    with pytest.raises(ConfigError):
        wilson(1, 2, level=1.0)


# ------------------------------------------------------------------------------ bootstrap
def test_bootstrap_distribution_matches_the_enumerated_one() -> None:
    """With 4 facts there are 4**4 equally likely resamples: the bootstrap distribution of
    the mean and its percentile interval are known exactly."""
    x = np.array([0.0, 1.0, 2.0, 10.0])
    means = np.array([np.mean(x[list(i)]) for i in itertools.product(range(4), repeat=4)])
    atoms, counts = np.unique(means, return_counts=True)
    exact = dict(zip(atoms, counts / counts.sum()))

    samples = bootstrap_ratios(fact_sums(x, ["a", "b", "c", "d"]), n_boot=40000, seed=7)[:, 0]
    got_atoms, got_counts = np.unique(samples, return_counts=True)
    assert set(np.round(got_atoms, 12)) <= set(np.round(atoms, 12))
    for a, c in zip(got_atoms, got_counts):
        assert c / samples.size == pytest.approx(exact[min(exact, key=lambda e: abs(e - a))],
                                                 abs=0.006)

    # the exact 2.5% / 97.5% quantiles sit well inside one atom each
    cdf = np.cumsum(counts) / counts.sum()
    lo_exact = atoms[np.searchsorted(cdf, 0.025)]
    hi_exact = atoms[np.searchsorted(cdf, 0.975)]
    lo, hi, n = fact_bootstrap(x, ["a", "b", "c", "d"], n_boot=40000, seed=7)
    assert (lo, hi, n) == (pytest.approx(lo_exact), pytest.approx(hi_exact), 4)


def test_bootstrap_equals_scipy_with_the_same_draws() -> None:
    """One value per fact: the same generator draws the same resamples as scipy's."""
    x = np.random.default_rng(3).normal(size=25)
    ref = stats.bootstrap((x,), np.mean, n_resamples=1000, method="percentile",
                          rng=np.random.default_rng(11))
    lo, hi, n = fact_bootstrap(x, n_boot=1000, seed=11)
    assert n == 25
    assert (lo, hi) == (pytest.approx(ref.confidence_interval.low, abs=1e-12),
                        pytest.approx(ref.confidence_interval.high, abs=1e-12))


def test_bootstrap_agrees_with_scipy_within_monte_carlo_error() -> None:
    x = np.random.default_rng(4).exponential(size=40)
    ref = stats.bootstrap((x,), np.mean, n_resamples=4000, method="percentile",
                          rng=np.random.default_rng(1)).confidence_interval
    lo, hi, _ = fact_bootstrap(x, n_boot=4000, seed=boot_seed(0, "other draws"))
    half = (ref.high - ref.low) / 2
    assert abs(lo - ref.low) < 0.1 * half and abs(hi - ref.high) < 0.1 * half


def test_interval_shrinks_with_more_facts() -> None:
    rng = np.random.default_rng(5)
    widths = []
    for n in (10, 40, 160, 640):
        lo, hi, _ = fact_bootstrap(rng.normal(size=n), n_boot=2000, seed=0)
        widths.append(hi - lo)
    assert widths == sorted(widths, reverse=True)
    # about 2·1.96/sqrt(n) for unit variance
    assert widths[-1] == pytest.approx(2 * 1.96 / math.sqrt(640), rel=0.15)


def test_facts_are_the_unit() -> None:
    """Duplicating every query of a fact leaves the interval as it is (a per-query
    bootstrap would narrow it), and the row order does not matter."""
    rng = np.random.default_rng(6)
    facts = np.repeat([f"f{i}" for i in range(12)], 3)
    values = rng.normal(size=facts.size) + np.repeat(rng.normal(size=12), 3)
    base = fact_bootstrap(values, facts, n_boot=1000, seed=9)
    doubled = fact_bootstrap(np.concatenate([values, values]), np.concatenate([facts, facts]),
                             n_boot=1000, seed=9)
    order = rng.permutation(facts.size)
    shuffled = fact_bootstrap(values[order], facts[order], n_boot=1000, seed=9)
    assert doubled == pytest.approx(base, abs=1e-12)
    assert shuffled == pytest.approx(base, abs=1e-12)
    naive = fact_bootstrap(np.concatenate([values, values]), n_boot=1000, seed=9)
    assert naive[1] - naive[0] < 0.8 * (base[1] - base[0])
    assert base[2] == 12


def test_means_over_queries_resample_facts_with_all_their_queries() -> None:
    """A fact with many queries weighs by its queries in the mean, and is drawn whole."""
    values = np.array([1.0, 1.0, 1.0, 1.0, 0.0])
    facts = np.array(["a", "a", "a", "a", "b"])
    samples = bootstrap_ratios(fact_sums(values, facts), n_boot=2000, seed=0)[:, 0]
    # resamples: {a, a} -> 1, {a, b} / {b, a} -> 4/5, {b, b} -> 0
    assert set(np.round(samples, 12)) == {1.0, 0.8, 0.0}
    assert np.mean(samples == 0.8) == pytest.approx(0.5, abs=0.04)


def test_few_facts_nan_and_nan_values() -> None:
    assert all(math.isnan(v) for v in fact_bootstrap([0.3], n_boot=10, seed=0)[:2])
    assert fact_bootstrap([], n_boot=10, seed=0)[2] == 0
    lo, hi, n = fact_bootstrap([0.1, np.nan, 0.5], ["a", "b", "c"], n_boot=200, seed=0)
    assert n == 2 and 0.1 <= lo <= hi <= 0.5
    with pytest.raises(ConfigError):
        fact_bootstrap([1.0, 2.0], n_boot=0)


def test_seeds_are_deterministic_per_statistic() -> None:
    assert boot_seed(0, "table1", "ig", "St", "S_I") == boot_seed(0, "table1", "ig", "St", "S_I")
    assert boot_seed(0, "table1", "ig", "St", "S_I") != boot_seed(1, "table1", "ig", "St", "S_I")
    assert boot_seed(0, "a") != boot_seed(0, "b")
    x = np.random.default_rng(0).normal(size=20)
    assert fact_bootstrap(x, seed=boot_seed(0, "x")) == fact_bootstrap(x, seed=boot_seed(0, "x"))


def test_mean_intervals_and_joint_averages() -> None:
    rng = np.random.default_rng(8)
    facts = np.repeat([f"f{i}" for i in range(15)], 4)
    ops = np.tile(["sup", "sup", "enh", "enh"], 15)
    v = rng.normal(size=facts.size) + (ops == "enh")
    table = pd.DataFrame({"sup": np.where(ops == "sup", v, np.nan),
                          "enh": np.where(ops == "enh", v, np.nan)})
    ci = mean_intervals(table, facts, n_boot=500, seed=3)
    got = grouped_mean_intervals(v, facts, ops, averages={"avg": ("sup", "enh")}, n_boot=500,
                                 seed=3)
    # the same draws (columns in another order share them): the same bounds
    for op in ("sup", "enh"):
        assert got[op] == pytest.approx((ci.at[op, "lo"], ci.at[op, "hi"], 15))
    samples = bootstrap_ratios(fact_sums(table.to_numpy(), facts), n_boot=500, seed=3)
    lo, hi = percentile_interval(samples.mean(axis=1)[:, None])
    assert got["avg"] == pytest.approx((lo[0], hi[0], 15))
    assert got["avg"][0] < (np.nanmean(table["sup"]) + np.nanmean(table["enh"])) / 2 < got["avg"][1]
