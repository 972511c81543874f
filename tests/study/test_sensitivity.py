"""``knowloc sensitivity``: Table 1 against the neuron threshold (read off kept maps, no
model) and the split threshold. The neuron-threshold rows at t are the Table 1 of a run
localized afresh with ``--threshold t``; the split-threshold rows are checked against a
hand-computed toy run and scipy."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import cli_error
from scipy import stats

from knowloc.cli import main
from knowloc.consistency import otsu_threshold
from knowloc.errors import RunError
from knowloc.report.html import report_manifest
from knowloc.store import RunStore
from knowloc.study.sensitivity import (
    NEURON_THRESHOLDS,
    SENSITIVITY_COLUMNS,
    sensitivity,
)

LOCALIZE = ["-q", "localize", "--method", "ig,amig", "--n-steps", "3"]
FRESH_T = 0.3  # a neuron threshold other than the run's (0.2)


def _localize(tiny_dir: Path, facts_file: Path, out: Path, *extra: str) -> Path:
    assert main([*LOCALIZE, "--model", str(tiny_dir), "--dataset", f"jsonl:{facts_file}",
                 *extra, "--out", str(out)]) == 0
    assert main(["-q", "consistency", "--run", str(out), "--population", "all"]) == 0
    return out


@pytest.fixture(scope="module")
def kept(tmp_path_factory, tiny_dir, facts_file) -> Path:
    """A tiny run localized with its maps kept (relative 0.2), with consistency results."""
    return _localize(tiny_dir, facts_file, tmp_path_factory.mktemp("kept") / "run",
                     "--keep-maps")


@pytest.fixture(scope="module")
def fresh(tmp_path_factory, tiny_dir, facts_file) -> Path:
    """The same run localized afresh (no maps) at the neuron threshold FRESH_T."""
    return _localize(tiny_dir, facts_file, tmp_path_factory.mktemp("fresh") / "run",
                     "--threshold", str(FRESH_T))


def _no_model(monkeypatch) -> None:
    """Any attribution, model load or forward pass fails the test."""
    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("the model was used")

    # knowloc.load_model first: it resolves lazily through knowloc.models, and patched after
    # it would record (and restore) the refusing stand-in as its original
    for target in ("knowloc.load_model", "knowloc.attribution.attribute",
                   "knowloc.pipeline.localize.attribute", "knowloc.models.load_model",
                   "knowloc.models.load.load_model"):
        monkeypatch.setattr(target, refuse, raising=False)
    monkeypatch.setattr(torch.nn.Module, "__call__", refuse)


def _same_as_table1(rows: pd.DataFrame, t1: pd.DataFrame) -> None:
    """Sensitivity rows (one split kind) against Table 1 rows (one T), value for value."""
    rows = rows.sort_values("method").reset_index(drop=True)
    t1 = t1.sort_values("method").reset_index(drop=True)
    assert list(rows["method"]) == list(t1["method"])
    pairs = {"n_facts": "n_facts", "n_II": "n_II", "split_threshold": "threshold",
             "k2_share": "R_II", "s_I": "S_I", "s_II": "S_II", "welch_t": "t",
             "welch_p": "p", "cap_II": "cap_II"}
    for ours, theirs in pairs.items():
        for end in ("", "_lo", "_hi"):
            if f"{theirs}{end}" in t1.columns and f"{ours}{end}" in rows.columns:
                np.testing.assert_array_equal(rows[f"{ours}{end}"].to_numpy(dtype=float),
                                              t1[f"{theirs}{end}"].to_numpy(dtype=float),
                                              err_msg=f"{ours}{end}")
    np.testing.assert_array_equal(rows["cs2_gap"].to_numpy(dtype=float),
                                  (t1["S_I"] - t1["S_II"]).to_numpy(dtype=float))


def test_neuron_axis_is_a_fresh_run_at_that_threshold_without_the_model(kept, fresh,
                                                                       tmp_path, monkeypatch,
                                                                       capsys):
    _no_model(monkeypatch)
    out = tmp_path / "out"
    assert main(["-q", "sensitivity", str(kept), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "no model" in printed
    table = pd.read_csv(out / "sensitivity.csv")
    assert list(table.columns[:2]) == ["method", "axis"]
    assert set(SENSITIVITY_COLUMNS) <= set(table.columns)
    assert {"k2_share_lo", "k2_share_hi", "cs2_gap_lo", "cs2_gap_hi"} <= set(table.columns)
    assert (out / "figures" / "sensitivity.png").stat().st_size > 0
    pd.testing.assert_frame_equal(pd.read_csv(out / "figures" / "sensitivity.csv"), table)
    neuron = table[table["axis"] == "neuron"]
    assert sorted(set(neuron["threshold"])) == list(NEURON_THRESHOLDS)
    assert len(neuron) == len(NEURON_THRESHOLDS) * 2 * 2  # thresholds x splits x methods

    fresh_t1 = pd.read_csv(fresh / "table1.csv")
    at = neuron[neuron["threshold"] == FRESH_T]
    _same_as_table1(at[at["split"] == "static"], fresh_t1[fresh_t1["T"] == "St"])
    _same_as_table1(at[at["split"] == "otsu"], fresh_t1[fresh_t1["T"] == "Ot"])
    # the run's own threshold gives its own Table 1
    own_t1 = pd.read_csv(kept / "table1.csv")
    at = neuron[neuron["threshold"] == 0.2]
    _same_as_table1(at[at["split"] == "static"], own_t1[own_t1["T"] == "St"])
    _same_as_table1(at[at["split"] == "otsu"], own_t1[own_t1["T"] == "Ot"])
    # and so do the split axis at the static threshold 0.1 and Otsu with 256 bins
    split = table[table["axis"] == "split"]
    _same_as_table1(split[(split["split"] == "static") & (split["threshold"] == 0.1)],
                    own_t1[own_t1["T"] == "St"])
    _same_as_table1(split[(split["split"] == "otsu") & (split["bins"] == 256)],
                    own_t1[own_t1["T"] == "Ot"])


def test_python_api_and_report_section(kept, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(kept, run)
    _no_model(monkeypatch)
    res = sensitivity(run)
    assert res.axes == ("neuron", "split") and res.note is None
    assert res.n_maps == len(RunStore(run, create=False).table("queries"))
    assert main(["-q", "report", str(run)]) == 0
    manifest = report_manifest(run / "report.html")
    assert "threshold-sensitivity" in manifest["sections"]
    assert manifest["sections"].index("threshold-sensitivity") == \
        manifest["sections"].index("consistency-analysis-table-1") + 1
    assert "Table 1 against the neuron and the split threshold" in manifest["figures"]
    assert "Threshold sensitivity" in manifest["tables"]
    pd.testing.assert_frame_equal(pd.read_csv(run / "sensitivity.csv"),
                                  res.table.reset_index(drop=True), check_dtype=False)


def test_a_run_without_maps_gets_the_split_axis_and_one_line(run, capsys, tmp_path):
    capsys.readouterr()
    assert main(["-q", "sensitivity", str(run)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    notes = [line for line in err if line.startswith("knowloc: note:")]
    assert len(notes) == 1 and "kept no attribution maps" in notes[0]
    assert "--keep-maps" in notes[0]
    table = pd.read_csv(run / "sensitivity.csv")
    assert set(table["axis"]) == {"split"}
    line = cli_error(capsys, ["sensitivity", str(run), "--axis", "neuron"])
    assert "kept no attribution maps" in line and "--keep-maps" in line
    with pytest.raises(RunError, match="kept no attribution maps"):
        sensitivity(run, axes=["neuron"])
    # the report of a run without maps has no such section
    assert main(["-q", "report", str(run)]) == 0
    assert "threshold-sensitivity" not in report_manifest(run / "report.html")["sections"]


def test_a_run_without_consistency_is_refused(localized, capsys):
    line = cli_error(capsys, ["sensitivity", str(localized)])
    assert "no consistency results" in line and "knowloc consistency" in line


def test_bad_thresholds_are_one_line(run, capsys):
    line = cli_error(capsys, ["sensitivity", str(run), "--split-thresholds", "0.1,2"])
    assert "[0, 1]" in line
    line = cli_error(capsys, ["sensitivity", str(run), "--otsu-bins", "1"])
    assert ">= 2" in line


# ------------------------------------------------------------------ split axis by hand
def _toy_run(root: Path) -> tuple[Path, pd.DataFrame]:
    """A run directory holding only a config and hand-made consistency scores: two methods,
    eight facts, one of them skipped by method b."""
    store = RunStore(root, fsync=False)
    store.write_config({"model": {"name": "toy", "device": "cpu", "dtype": "float32"},
                        "consistency": {"population": "all", "static_threshold": 0.1},
                        "seed": 0})
    cs2 = {"ig": [0.02, 0.05, 0.08, 0.12, 0.3, 0.35, 0.4, 0.5],
           "amig": [0.01, 0.2, 0.09, 0.25, 0.28, 0.33, 0.45, np.nan]}
    rows = []
    for method, values in cs2.items():
        for i, v in enumerate(values):
            rows.append({"method": method, "fact_id": f"f{i}", "relation": "P1",
                         "n_queries": 3, "n_union": 10, "n_intersection": 1, "n_shared": 2,
                         "cs1": 0.1, "cs2": v,
                         "skipped": None if not np.isnan(v) else "empty union"})
    scores = pd.DataFrame(rows)
    store.put("consistency", "all", scores)
    return root, scores


def test_split_axis_by_hand(tmp_path):
    root, scores = _toy_run(tmp_path / "toy")
    res = sensitivity(root, split_thresholds=[0.1, 0.3], otsu_bins=[4, 256])
    assert res.axes == ("split",) and res.note is not None and "kept no" in res.note
    t = res.table
    kept = scores[scores["skipped"].isna()]
    for s in (0.1, 0.3):
        rows = t[(t["split"] == "static") & (t["threshold"] == s)].set_index("method")
        all_ii = None
        for m, g in kept.groupby("method"):
            v = g["cs2"].to_numpy()
            hi, lo = v[v > s], v[v <= s]
            r = rows.loc[m]
            assert r["n_facts"] == len(v) and r["n_II"] == len(lo)
            assert r["k2_share"] == len(lo) / len(v)
            assert r["cs2_gap"] == pytest.approx(hi.mean() - lo.mean(), abs=1e-15)
            ref = stats.ttest_ind(hi, lo, equal_var=False)
            assert r["welch_t"] == pytest.approx(ref.statistic, rel=1e-12)
            assert r["welch_p"] == pytest.approx(ref.pvalue, rel=1e-9)
            assert r["cs2_gap_lo"] <= r["cs2_gap"] <= r["cs2_gap_hi"]
            ii = set(g.loc[g["cs2"] <= s, "fact_id"])
            all_ii = ii if all_ii is None else all_ii & ii
        common = set(kept[kept["method"] == "ig"]["fact_id"]) & \
            set(kept[kept["method"] == "amig"]["fact_id"])
        assert (rows["cap_II"] == len(all_ii & common) / len(common)).all()
    for bins in (4, 256):
        rows = t[(t["split"] == "otsu") & (t["bins"] == bins)].set_index("method")
        for m, g in kept.groupby("method"):
            thr = otsu_threshold(g["cs2"].to_numpy(), nbins=bins)
            assert rows.loc[m, "threshold"] == rows.loc[m, "split_threshold"] == thr
            assert rows.loc[m, "k2_share"] == (g["cs2"] <= thr).mean()
    # the same call gives the same table (seeded intervals)
    again = sensitivity(root, split_thresholds=[0.1, 0.3], otsu_bins=[4, 256]).table
    pd.testing.assert_frame_equal(again, t)


def test_the_bootstrap_settings_of_the_run_are_used(tmp_path):
    """The intervals follow the run's consistency.n_boot and boot_seed, as its Table 1's do."""
    from knowloc.consistency import table1

    root, scores = _toy_run(tmp_path / "toy")
    store = RunStore(root, fsync=False)
    config = store.read_config()
    config["consistency"].update({"n_boot": 200, "boot_seed": 7})
    store.write_config(config)
    rows = sensitivity(root, split_thresholds=[0.1], otsu_bins=[256]).table
    rows = rows[rows["split"] == "static"]
    own = table1(scores, [("St", 0.1)], n_boot=200, seed=7)
    _same_as_table1(rows, own)
    default = table1(scores, [("St", 0.1)])
    assert not np.array_equal(own["S_I_lo"].to_numpy(), default["S_I_lo"].to_numpy())


def test_maps_that_are_not_the_localizations_are_not_used(kept, tmp_path, capsys):
    """A map whose largest score is not the one its query was localized with (here: the
    queries table says otherwise) is not read as that query's map."""
    run = tmp_path / "run"
    shutil.copytree(kept, run)
    store = RunStore(run, fsync=False)
    key = min(store.current_files("queries"))
    changed = store.get("queries", key)
    changed["max_attribution"] = changed["max_attribution"] + 1.0
    store.put("queries", key, changed)
    res = sensitivity(run)
    assert res.axes == ("split",)
    assert "no kept map matching their localization" in res.note
    line = cli_error(capsys, ["sensitivity", str(run), "--axis", "both"])
    assert "matching their localization" in line and "--keep-maps" in line


def test_the_cli_help_lists_both_commands(capsys):
    from knowloc.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert "sensitivity" in out and "compare" in out
