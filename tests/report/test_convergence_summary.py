"""The report's convergence summary (knowloc.report.convergence): hand-built queries frames
with known medians, percentiles and shares, NaN (not computed) and infinite gaps, and the
Localization section of a tiny run."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from knowloc.report.convergence import (
    CONVERGENCE_COLUMNS,
    convergence_display,
    convergence_note,
    convergence_summary,
    gap_quantile,
)

NAN, INF = math.nan, math.inf


def hand_frame() -> pd.DataFrame:
    rows = [  # method, fact, gap
        ("ig", "F1", 0.01), ("ig", "F1", 0.2),    # F1: one query above -> fact above
        ("ig", "F2", 0.03), ("ig", "F2", NAN),    # F2: none above, one missing -> unknown
        ("ig", "F3", 0.04), ("ig", "F3", 0.02),   # F3: converged
        ("ig", "F4", NAN), ("ig", "F4", NAN),     # F4: nothing computed
        ("amig", "G1", INF), ("amig", "G1", 0.01),
        ("amig", "G2", 0.06),
    ]
    return pd.DataFrame({"method": [r[0] for r in rows], "fact_id": [r[1] for r in rows],
                         "query_id": [f"{r[1]}#{i}" for i, r in enumerate(rows)],
                         "completeness_gap": [r[2] for r in rows]})


def test_summary_of_a_hand_built_frame() -> None:
    s = convergence_summary(hand_frame())
    assert list(s.columns) == CONVERGENCE_COLUMNS
    assert list(s["method"]) == ["ig", "amig"]  # the registry's order
    ig = s.iloc[0].to_dict()
    # gaps with a value: 0.01 0.02 0.03 0.04 0.2 -> median 0.03; 90th: 0.04 + 0.6 * 0.16
    assert ig["queries"] == 8 and ig["with_gap"] == 5 and ig["not_computed"] == 3
    assert ig["median_gap"] == pytest.approx(0.03)
    assert ig["p90_gap"] == pytest.approx(0.136)
    assert ig["above"] == 1 and ig["above_share"] == pytest.approx(1 / 5)  # NaN not in it
    assert ig["facts"] == 4 and ig["facts_above"] == 1
    assert ig["facts_not_computed"] == 2  # F2 and F4: never counted as converged
    assert ig["facts_above_share"] == pytest.approx(1 / 2)  # F1 above, F3 converged
    assert ig["gap_limit"] == 0.05
    amig = s.iloc[1].to_dict()
    assert amig["with_gap"] == 3 and amig["not_computed"] == 0
    assert amig["median_gap"] == pytest.approx(0.06)
    assert amig["p90_gap"] == INF  # interpolates towards the infinite gap
    assert amig["above"] == 2 and amig["above_share"] == pytest.approx(2 / 3)
    assert amig["facts_above"] == 2 and amig["facts_above_share"] == 1.0
    assert amig["facts_not_computed"] == 0
    shown = convergence_display(s)
    assert list(shown["90th percentile"]) == ["13.6%", "∞"]
    assert list(shown["queries above 5%"]) == ["20.0%", "66.7%"]
    assert list(shown["facts above 5%"]) == ["50.0%", "100.0%"]


def test_an_old_run_without_gaps_is_not_computed() -> None:
    q = hand_frame().drop(columns="completeness_gap")
    s = convergence_summary(q)
    assert (s["with_gap"] == 0).all() and (s["not_computed"] == s["queries"]).all()
    assert (s["above"] == 0).all() and s["above_share"].isna().all()
    assert s["median_gap"].isna().all() and s["p90_gap"].isna().all()
    assert s["facts_above_share"].isna().all()
    assert (s["facts_not_computed"] == s["facts"]).all()
    assert "11 queries were localized without it" in convergence_note(s)


def test_limit_is_exclusive() -> None:
    q = pd.DataFrame({"method": ["ig"] * 2, "fact_id": ["F", "F"], "query_id": ["a", "b"],
                      "completeness_gap": [0.05, 0.0]})
    s = convergence_summary(q).iloc[0]
    assert s["above"] == 0 and s["facts_above_share"] == 0.0


def test_quantile_matches_numpy_on_finite_gaps() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 50):
        x = rng.exponential(0.1, n)
        for q in (0.5, 0.9):
            assert gap_quantile(x, q) == pytest.approx(float(np.quantile(x, q)), rel=1e-12)
    assert math.isnan(gap_quantile(np.array([]), 0.5))
    # infinite gaps sort last: the finite quantiles below them are numpy's on the finite part
    assert gap_quantile(np.array([0.1, 0.3, INF, INF]), 0.5) == INF
    assert gap_quantile(np.array([0.1, 0.3, 0.5, INF, INF]), 0.25) == pytest.approx(0.3)
    assert gap_quantile(np.array([0.1, 0.3, 0.5, 0.7, INF]), 0.5) == pytest.approx(0.5)


@pytest.fixture()
def reported(localized: Path, tmp_path: Path) -> Path:
    """A copy of the tiny localized run (IG, AMIG, 3 steps) with its report rendered."""
    from knowloc.study.report import render_report

    run = tmp_path / "run"
    shutil.copytree(localized, run)
    render_report(run)
    return run


def test_report_localization_section_has_the_convergence_table(reported: Path) -> None:
    from knowloc.report import report_manifest
    from knowloc.store import RunStore

    man = report_manifest(reported / "report.html")
    assert "Convergence of the attributions (completeness gap), by method" in man["tables"]
    csv = reported / "convergence_summary.csv"
    assert csv.is_file()
    written = pd.read_csv(csv)
    queries = RunStore(reported, create=False).table("queries")
    assert queries["completeness_gap"].notna().all()  # every query of a fresh run has one
    expected = convergence_summary(queries)
    pd.testing.assert_frame_equal(written, expected, check_dtype=False)
    assert (written["not_computed"] == 0).all()
    assert list(written["queries"]) == list(queries.groupby("method", sort=False).size()
                                           .reindex(written["method"]))
    text = (reported / "report.html").read_text(encoding="utf-8")
    assert "Convergence: the completeness gap of a query" in text


def test_localization_section_counts_an_old_runs_queries_as_not_computed(
        localized: Path, tmp_path: Path) -> None:
    from knowloc.report.sections import localization_section
    from knowloc.store import RunStore

    run = tmp_path / "run"
    shutil.copytree(localized, run)
    store = RunStore(run, create=False)
    queries = store.table("queries").assign(completeness_gap=np.nan, seconds=1.0)
    section = localization_section(store, queries, pd.DataFrame(), 3)
    written = pd.read_csv(run / "convergence_summary.csv")
    assert (written["with_gap"] == 0).all() and written["above_share"].isna().all()
    assert "not computed" in section.html
    shown = {c: df for c, df, _ in section.tables}[
        "Convergence of the attributions (completeness gap), by method"]
    assert list(shown["not computed"]) == [str(n) for n in written["queries"]]
    assert set(shown["queries above 5%"]) == {"–"}
