"""The 95% intervals of Tables 2/3 and Figures 4-6 on synthetic stage tables: the means are
the plain means (unchanged), the bounds come from a bootstrap over facts (a fact's edits or
queries are drawn together), and displays show ``mean [lo, hi]``."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from knowloc.intervals import boot_seed, fact_bootstrap, grouped_mean_intervals, wilson
from knowloc.pipeline.attention import figure5_table, figure6_table
from knowloc.pipeline.mapping import figure4_table
from knowloc.pipeline.modify import TABLE2_COLUMNS, TABLE2_METRICS, table2, table3
from knowloc.report.tables import edit_display, figure4_display, figure6_display

FACTS = [f"f{i}" for i in range(10)]


def _split() -> pd.DataFrame:
    return pd.DataFrame({"method": "ig", "fact_id": FACTS,
                         "kind": ["K_I"] * 5 + ["K_II"] * 5})


def _edits(rng: np.random.Generator, copies: int = 1) -> pd.DataFrame:
    rows = []
    for f in FACTS:
        for q in range(3):
            vals = {m: float(rng.random()) for m in TABLE2_METRICS}
            for set_ in ("local", "global", "cas"):
                rows += [{"model": "m", "method": "ig", "set": set_, "op": "erase",
                          "fact_id": f, "query_id": f"{f}q{q}", "status": "ok", **vals}] * copies
    rows.append({"model": "m", "method": "ig", "set": "local", "op": "erase", "fact_id": "f0",
                 "query_id": "f0q9", "status": "empty", **dict.fromkeys(TABLE2_METRICS,
                                                                         math.nan)})
    return pd.DataFrame(rows)


def test_table2_means_unchanged_and_bootstrap_over_facts() -> None:
    edits = _edits(np.random.default_rng(0))
    t2 = table2(edits, _split(), n_boot=300, boot_seed=5)
    assert list(t2.columns) == TABLE2_COLUMNS
    row = t2[(t2["set"] == "local") & (t2["kind"] == "K_I")].iloc[0]
    ok = edits[(edits["set"] == "local") & (edits["status"] == "ok")
               & edits["fact_id"].isin(FACTS[:5])]
    assert (row.n_edits, row.n_facts, row.n_empty) == (15, 5, 1)
    for m in TABLE2_METRICS:
        assert row[m] == ok[m].mean()  # bit for bit the plain mean
        lo, hi, _ = fact_bootstrap(ok[m], ok["fact_id"], n_boot=300, seed=boot_seed(
            5, "edits", "m", "ig", "local", "erase", "K_I"))
        assert (row[f"{m}_lo"], row[f"{m}_hi"]) == pytest.approx((lo, hi), abs=1e-12)
        assert row[f"{m}_lo"] <= row[m] <= row[f"{m}_hi"]
    # Table 3 repeats Table 2's rows (same seed per row) beside the CAS rows
    t3 = table3(edits, _split(), n_boot=300, boot_seed=5)
    pd.testing.assert_frame_equal(
        t3[t3["set"] != "cas"].reset_index(drop=True), t2.reset_index(drop=True))
    shown = edit_display(t2)
    assert shown["Rel"].iloc[0] == (f"{t2.rel.iloc[0]:.2f} [{t2.rel_lo.iloc[0]:.2f}, "
                                    f"{t2.rel_hi.iloc[0]:.2f}]")
    assert shown["facts"].iloc[0] == "5"


def test_table2_duplicated_queries_do_not_narrow_the_interval() -> None:
    once = table2(_edits(np.random.default_rng(1)), _split(), n_boot=300)
    twice = table2(_edits(np.random.default_rng(1), copies=2), _split(), n_boot=300)
    for m in TABLE2_METRICS:
        for c in (m, f"{m}_lo", f"{m}_hi"):
            assert np.allclose(once[c], twice[c], rtol=0, atol=1e-12)


def test_figure4_joint_average() -> None:
    rng = np.random.default_rng(2)
    rows = [{"method": "ig", "fact_id": f, "query_id": f"{f}q{q}", "set": "Self", "op": op,
             "status": "ok", "delta_prob": float(rng.normal() + (op == "enhance"))}
            for f in FACTS for q in range(2) for op in ("suppress", "enhance")]
    inter = pd.DataFrame(rows)
    f4 = figure4_table(inter, _split(), n_boot=400, boot_seed=3)
    r = f4[(f4["kind"] == "K_II")].iloc[0]
    g = inter[inter["fact_id"].isin(FACTS[5:])]
    sup = g.loc[g["op"] == "suppress", "delta_prob"].mean()
    enh = g.loc[g["op"] == "enhance", "delta_prob"].mean()
    assert (r.suppress, r.enhance, r.avg, r.n_facts) == (sup, enh, (sup + enh) / 2, 5)
    ci = grouped_mean_intervals(g["delta_prob"], g["fact_id"], g["op"],
                                averages={"avg": ("suppress", "enhance")}, n_boot=400,
                                seed=boot_seed(3, "figure4", "ig", "K_II", "Self"))
    for col in ("suppress", "enhance", "avg"):
        assert (r[f"{col}_lo"], r[f"{col}_hi"]) == pytest.approx(ci[col][:2])
    assert r.avg_lo < r.avg < r.avg_hi
    assert "[" in figure4_display(f4)["Avg"].iloc[0]


def test_figure5_wilson_per_fact() -> None:
    pred = pd.DataFrame({"relation": "P1", "fact_id": ["f0", "f5"], "first": True,
                         "P": [0.75, 1.0], "token": ["a", "b"], "n_queries": [4, 3]})
    f5 = figure5_table(pred, _split()).set_index("fact_id")
    assert (f5.loc["f0", "P_lo"], f5.loc["f0", "P_hi"]) == pytest.approx(wilson(3, 4))
    assert (f5.loc["f5", "P_lo"], f5.loc["f5", "P_hi"]) == pytest.approx(wilson(3, 3))


def test_figure6_intervals() -> None:
    rng = np.random.default_rng(4)
    rows = [{"method": "ig", "fact_id": f, "query_id": f"{f}q{q}", "known": True,
             "first": True, "synapses": "self", "operation": op,
             "delta_value": float(rng.normal()), "delta_prob": float(rng.normal())}
            for f in FACTS for q in range(2) for op in ("sup", "enh")]
    eff = pd.DataFrame(rows)
    f6 = figure6_table(eff, _split(), n_boot=300, boot_seed=0)
    assert {"value_lo", "value_hi", "n_facts"} <= set(f6.columns)
    r = f6[(f6["kind"] == "K_I") & (f6["operation"] == "avg")
           & (f6["metric"] == "delta_prob")].iloc[0]
    g = eff[eff["fact_id"].isin(FACTS[:5])]
    means = g.groupby("operation")["delta_prob"].mean()
    assert r.value == pytest.approx((means["sup"] + means["enh"]) / 2)
    ci = grouped_mean_intervals(g["delta_prob"], g["fact_id"], g["operation"],
                                averages={"avg": ("sup", "enh")}, n_boot=300,
                                seed=boot_seed(0, "figure6", "ig", True, "K_I", "self",
                                               "delta_prob"))
    assert (r.value_lo, r.value_hi, r.n_facts) == pytest.approx(ci["avg"])
    assert "[" in figure6_display(f6)["mean [95% interval]"].iloc[0]
