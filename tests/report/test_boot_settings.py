"""Every interval of a run follows the run's bootstrap settings (``consistency.n_boot``,
``consistency.boot_seed`` of its config.yaml), and every figure's error bars are its table's
interval.

The tiny run here is made of facts the tiny random model "knows" (each object is the model's
own top-1 for one of the fact's queries), so that Table 2 and Figures 4 and 6 have rows over
several facts, where an interval exists."""

from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.container import ErrorbarContainer
from tiny import CAPITAL_TEMPLATES, LANGUAGE_TEMPLATES

from knowloc.cli import main
from knowloc.errors import ConfigError
from knowloc.pipeline.attention import figure6_table
from knowloc.pipeline.mapping import figure4_table
from knowloc.pipeline.modify import table2, table3
from knowloc.pipeline.resampling import run_bootstrap
from knowloc.pipeline.run import read_run
from knowloc.report.figures import bars_synapse_effects, query_kn_bars
from knowloc.store import RunStore
from knowloc.study.spec import read_spec

N_BOOT, SEED = 200, 7
SUBJECTS = ["brazil", "france", "spain", "germany", "italy", "japan", "paris", "madrid",
            "berlin", "rome", "tokyo", "english"]


def _known_facts(model_dir: Path, path: Path) -> None:
    """Facts whose object is the tiny model's most frequent top-1 over the fact's queries."""
    from knowloc.models import load_model

    model = load_model(str(model_dir))
    rows = []
    for rel, templates in (("P37", LANGUAGE_TEMPLATES), ("P1376", CAPITAL_TEMPLATES)):
        for subject in SUBJECTS:
            preds = []
            for t in templates:
                ids = model.encode_prompt(t.replace("[X]", subject).split(" [Y]")[0])
                with torch.no_grad():
                    logits = model.hf(torch.tensor([ids])).logits[0, -1]
                preds.append(model.tokenizer.decode([int(logits.argmax())]).strip())
            preds = [p for p in preds if p and not p.startswith("<")]
            if preds:
                obj = collections.Counter(preds).most_common(1)[0][0]
                rows.append({"relation": rel, "subject": subject, "object": obj,
                             "templates": templates})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def default_run(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run with every stage and the default bootstrap (1000 resamples, seed 0)."""
    root = tmp_path_factory.mktemp("boot")
    facts = root / "known.jsonl"
    _known_facts(tiny_dir, facts)
    run = root / "run"
    assert main(["-q", "reproduce", "--model", str(tiny_dir), "--dataset", f"jsonl:{facts}",
                 "--method", "ig,amig", "--n-steps", "3", "--population", "all",
                 "--out", str(run)]) == 0
    return run


@pytest.fixture()
def boot_run(default_run: Path, tmp_path: Path) -> Path:
    """A copy of ``default_run`` whose config.yaml says n_boot 200, boot_seed 7."""
    run = tmp_path / "run"
    shutil.copytree(default_run, run)
    store = RunStore(run, create=False)
    spec = read_spec(store)
    assert spec.consistency is not None
    spec.consistency.n_boot, spec.consistency.boot_seed = N_BOOT, SEED
    spec.write(store)
    return run


def _direct(run: Path, n_boot: int, boot_seed: int) -> dict[str, pd.DataFrame]:
    """Tables 2, 3 and Figures 4, 6 computed here from the run's stored rows with the given
    bootstrap (the table functions, called with explicit settings)."""
    store = RunStore(run, create=False)
    spec = read_spec(store)
    assert spec.modify is not None and spec.intervene is not None and spec.attention is not None
    split = read_run(store, spec.modify.methods, spec.modify.split_threshold).split
    edits = store.table("edits")
    inter = store.table("interventions")
    known = read_run(store, spec.intervene.methods, spec.intervene.split_threshold).queries
    known = known[known["known"].astype(bool)]
    pairs = set(zip(known["method"], known["query_id"]))
    inter = inter[[(m, q) in pairs for m, q in zip(inter["method"], inter["query_id"])]]
    asplit = read_run(store, spec.attention.methods, spec.attention.split_threshold).split
    effects = store.table("synapse_effects")
    effects = effects[[(m, f) in set(zip(asplit["method"], asplit["fact_id"]))
                       for m, f in zip(effects["method"], effects["fact_id"])]]
    boot = {"n_boot": n_boot, "boot_seed": boot_seed}
    return {"table2": table2(edits, split, **boot), "table3": table3(edits, split, **boot),
            "figure4": figure4_table(inter, read_run(store, spec.intervene.methods,
                                                     spec.intervene.split_threshold).split,
                                     **boot),
            "figure6": figure6_table(effects, asplit, only_known=spec.attention.only_known,
                                     **boot)}


def _bounds(df: pd.DataFrame) -> pd.DataFrame:
    return df[[c for c in df.columns if c.endswith(("_lo", "_hi"))]].astype(float)


def _same(written: pd.DataFrame, expected: pd.DataFrame) -> None:
    """The written CSV equals the expected table (up to the CSV's text round trip)."""
    assert list(written.columns) == list(expected.columns)
    pd.testing.assert_frame_equal(written.reset_index(drop=True),
                                  expected.reset_index(drop=True), check_dtype=False,
                                  rtol=1e-12, atol=0)


# ------------------------------------------------------------------ the settings
def test_run_bootstrap_reads_the_runs_config(boot_run: Path, tmp_path: Path) -> None:
    store = RunStore(boot_run, create=False)
    assert run_bootstrap(store) == (N_BOOT, SEED)
    assert run_bootstrap(store, 50) == (50, SEED)
    assert run_bootstrap(store, boot_seed=np.int64(3)) == (N_BOOT, 3)
    assert run_bootstrap(RunStore(tmp_path / "bare")) == (1000, 0)  # no config.yaml
    with pytest.raises(ConfigError, match="n_boot"):
        run_bootstrap(store, 0)
    with pytest.raises(ConfigError, match="boot_seed"):
        run_bootstrap(store, boot_seed="7")  # type: ignore[arg-type]


# ------------------------------------------------------------------ tables and figures
def test_the_defaults_are_unchanged(default_run: Path, tmp_path: Path) -> None:
    """A run with the default settings: its tables are the tables of n_boot 1000, seed 0,
    and ``knowloc report`` writes them again byte for byte."""
    direct = _direct(default_run, 1000, 0)
    for name, expected in direct.items():
        _same(pd.read_csv(default_run / f"{name}.csv"), expected)
    run = tmp_path / "copy"
    shutil.copytree(default_run, run)
    assert main(["report", str(run)]) == 0
    for name in ("table1", "table2", "table3", "figure4", "figure5", "figure6"):
        assert (run / f"{name}.csv").read_bytes() == (default_run / f"{name}.csv").read_bytes()


def test_report_follows_the_runs_bootstrap(boot_run: Path, default_run: Path) -> None:
    """``knowloc report`` (the stages' collect) on a run whose config.yaml says n_boot 200,
    seed 7: Tables 2, 3 and Figures 4, 6 have the intervals of n_boot 200, seed 7, not the
    defaults', and the same point estimates."""
    assert main(["report", str(boot_run)]) == 0
    direct = _direct(boot_run, N_BOOT, SEED)
    defaults = _direct(boot_run, 1000, 0)
    for name, expected in direct.items():
        written = pd.read_csv(boot_run / f"{name}.csv")
        _same(written, expected)
        assert _bounds(written).notna().any().any(), f"{name}: no interval to compare"
        assert not np.allclose(_bounds(written), _bounds(defaults[name]), equal_nan=True), name
        before = pd.read_csv(default_run / f"{name}.csv")
        _same(written.drop(columns=_bounds(written).columns),
              before.drop(columns=_bounds(before).columns))
    # the figures' CSVs are their tables' rows, with the same bounds
    f4, f6 = direct["figure4"], direct["figure6"]
    for png in sorted((boot_run / "figures").glob("figure4_*.csv")):
        method = png.stem.removeprefix("figure4_")
        _same(pd.read_csv(png), f4[f4["method"] == method])
    variants = {"as-defined": True, "no-first": False}
    shown = sorted((boot_run / "figures").glob("figure6_*.csv"))
    assert shown
    for csv in shown:
        method, variant = csv.stem.removeprefix("figure6_").rsplit("_", 1)
        _same(pd.read_csv(csv), f6[(f6["method"] == method) & (f6["first"] == variants[variant])])


def test_the_stages_follow_the_runs_bootstrap(boot_run: Path) -> None:
    """The pipeline functions, called as a stage calls them (no bootstrap given), take the
    run's settings from its config.yaml."""
    from knowloc.models import load_model
    from knowloc.pipeline.attention import attention_experiment
    from knowloc.pipeline.mapping import query_kn_mapping
    from knowloc.pipeline.modify import modify

    store = RunStore(boot_run, create=False)
    spec = read_spec(store)
    assert spec.modify is not None and spec.intervene is not None and spec.attention is not None
    model = load_model(str(spec.model["name"]))
    direct = _direct(boot_run, N_BOOT, SEED)
    mres = modify(model, store, spec.modify, progress=False)
    assert mres.computed == 0  # nothing recomputed: the tables come from the stored rows
    _same(mres.table2, direct["table2"])
    assert mres.table3 is not None
    _same(mres.table3, direct["table3"])
    _same(store.table("metrics"), direct["table2"])
    ires = query_kn_mapping(model, store, spec.intervene, progress=False)
    _same(ires.figure4, direct["figure4"])
    ares = attention_experiment(model, store, spec.attention, heatmaps=False, progress=False)
    _same(ares.figure6, direct["figure6"])
    # explicit settings win over the run's
    again = query_kn_mapping(model, store, spec.intervene, progress=False, n_boot=1000,
                             boot_seed=0)
    _same(again.figure4, _direct(boot_run, 1000, 0)["figure4"])


# ------------------------------------------------------------------ error bars
def _error_segments(fig) -> list[tuple[float, float, float]]:
    """(x, low end, high end) of every error bar drawn on the figure's first axes."""
    out = []
    for c in fig.axes[0].containers:
        if isinstance(c, ErrorbarContainer):
            for seg in c.lines[2][0].get_segments():
                out.append((float(seg[0][0]), float(seg[0][1]), float(seg[1][1])))
    return sorted(out)


def test_figure4_error_bars_are_the_tables_intervals(tmp_path: Path) -> None:
    f4 = pd.DataFrame({
        "method": "ig", "kind": ["K_I", "K_I"], "set": ["Self", "Union"],
        "suppress": [0.5, 0.2], "suppress_lo": [0.1, np.nan], "suppress_hi": [0.55, np.nan],
        "enhance": [2.0, 1.0], "enhance_lo": [1.5, 0.9], "enhance_hi": [2.6, 1.2],
        "avg": [1.25, 0.6], "avg_lo": [0.9, 0.55], "avg_hi": [1.5, 0.7],
        "n_queries": [3, 3], "n_empty": [0, 0], "n_facts": [3, 1]})
    fig = query_kn_bars(f4, tmp_path / "f4.png", method="ig")
    # bars at x = group + (j - 1) * 0.26 for suppress (j=0), enhance (1), avg (2); an
    # interval with a NaN bound (one fact) draws nothing; the interval need not be
    # symmetric about the mean (0.1 to 0.55 around 0.5)
    expected = sorted([(-0.26, 0.1, 0.55), (0.0, 1.5, 2.6), (0.26, 0.9, 1.5),
                       (1.0, 0.9, 1.2), (1.26, 0.55, 0.7)])
    assert np.allclose(_error_segments(fig), expected)
    assert "bootstrap over facts" in fig.texts[0].get_text()
    csv = pd.read_csv(tmp_path / "f4.csv")
    assert list(csv.columns) == list(f4.columns)  # the table's rows, no other spread
    # a table without intervals: bars without error bars, and the title says none
    plain = query_kn_bars(f4[["kind", "set", "suppress", "enhance", "avg"]],
                          tmp_path / "plain.png")
    assert _error_segments(plain) == [] and "error bars" not in plain.texts[0].get_text()


def test_figure6_error_bars_are_the_tables_intervals(tmp_path: Path) -> None:
    rows = []
    for op, (v, lo, hi) in {"enh": (0.4, 0.2, 0.7), "sup": (0.1, -0.2, 0.3),
                            "avg": (0.25, 0.1, 0.45)}.items():
        for metric, shift in (("delta_value", 0.0), ("delta_prob", 1.0)):
            rows.append({"method": "ig", "first": True, "kind": "K_I", "synapses": "self",
                         "operation": op, "metric": metric, "value": v + shift,
                         "value_lo": lo + shift, "value_hi": hi + shift, "median": v,
                         "n": 4, "n_facts": 3})
    f6 = pd.DataFrame(rows)
    fig = bars_synapse_effects(f6, tmp_path / "f6.png")
    width = 0.8 / 3  # operations enh, sup, avg around the group at x = 0
    expected = sorted([(-width, 0.2, 0.7), (0.0, -0.2, 0.3), (width, 0.1, 0.45)])
    assert np.allclose(_error_segments(fig), expected)
    assert "bootstrap over facts" in fig.texts[0].get_text()
    _same(pd.read_csv(tmp_path / "f6.csv"), f6)


def test_figure6_of_per_query_effects_bootstraps_over_facts(tmp_path: Path) -> None:
    """Raw effects with their facts: the bars are the intervals of the bootstrap over facts
    (:func:`synapse_effect_summary` with ``n_boot``), the same as the summary's bounds."""
    from knowloc.pipeline.attention import synapse_effect_summary

    rng = np.random.default_rng(0)
    eff = pd.DataFrame({"kind": "K_I", "synapses": "self",
                        "operation": ["sup", "enh"] * 6,
                        "fact_id": np.repeat(["a", "b", "c"], 4),
                        "delta_value": rng.normal(size=12), "delta_prob": rng.normal(size=12)})
    fig = bars_synapse_effects(eff, tmp_path / "f6.png", n_boot=N_BOOT, boot_seed=SEED)
    summary = synapse_effect_summary(eff, n_boot=N_BOOT, boot_seed=SEED)
    _same(pd.read_csv(tmp_path / "f6.csv"), summary)
    dv = summary[summary["metric"] == "delta_value"].set_index("operation")
    assert dv[["value_lo", "value_hi"]].notna().all().all()
    width = 0.8 / 3
    expected = [(x, dv.at[op, "value_lo"], dv.at[op, "value_hi"])
                for x, op in ((-width, "enh"), (0.0, "sup"), (width, "avg"))]
    assert np.allclose(_error_segments(fig), expected)
