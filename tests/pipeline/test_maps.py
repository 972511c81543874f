"""Full attribution maps kept in a run (``keep_maps``): another neuron selection is read off
them without a model, giving the rows a fresh computation with that selection gives."""

from __future__ import annotations

import shutil

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from tiny import tiny_model

from knowloc.attribution import attribute
from knowloc.cli import main
from knowloc.data import load_facts
from knowloc.neurons import Selection, neurons_frame
from knowloc.pipeline.localize import LocalizeConfig, localize
from knowloc.pipeline.run import load_maps
from knowloc.store import RunStore

TABLES = ("queries", "neuron_sets", "attributions")
METHODS = ("ig", "amig")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def facts(facts_file):
    return load_facts(f"jsonl:{facts_file}", relations=["P1376"])


@pytest.fixture(scope="module")
def kept_run(model, facts, tmp_path_factory) -> RunStore:
    """A run localized with maps kept (relative 0.2); tests copy it before changing it."""
    return _run(model, facts, tmp_path_factory.mktemp("kept") / "run",
                Selection("relative", 0.2), keep_maps=True)


def _copy(store: RunStore, root) -> RunStore:
    shutil.copytree(store.root, root)
    return RunStore(root, fsync=False)


def _run(model, facts, root, selection: Selection, *, keep_maps: bool = False,
         progress: bool = False) -> RunStore:
    store = RunStore(root, fsync=False)
    localize(model, facts, store, LocalizeConfig(methods=METHODS, n_steps=3,
                                                 selection=selection, keep_maps=keep_maps),
             progress=progress)
    return store


def _no_attribution(monkeypatch) -> list[int]:
    calls: list[int] = []

    def refuse(*args, **kwargs):
        calls.append(1)
        raise AssertionError("an attribution ran")

    monkeypatch.setattr("knowloc.pipeline.localize.attribute", refuse)
    return calls


def _same_tables(a: RunStore, b: RunStore) -> None:
    for table in TABLES:
        assert (a.root / f"{table}.parquet").read_bytes() == \
            (b.root / f"{table}.parquet").read_bytes(), table


def test_keeping_maps_changes_no_result(model, facts, tmp_path, kept_run):
    plain = _run(model, facts, tmp_path / "plain", Selection("relative", 0.2))
    kept = kept_run
    _same_tables(plain, kept)
    assert "maps" not in plain.tables() and not (plain.root / "parts" / "maps").exists()
    maps = kept.table("maps")
    assert len(maps) == len(METHODS) * len(facts.queries())
    assert {len(s) for s in maps["scores"]} == {model.n_layers * model.d_mlp}
    assert not (kept.root / "maps.parquet").exists()  # the parts only, no second copy
    part = next((kept.root / "parts" / "maps").glob("*.parquet"))
    columns = pq.ParquetFile(part).metadata.row_group(0)
    encodings = {columns.column(i).path_in_schema: columns.column(i).encodings
                 for i in range(columns.num_columns)}
    # a dictionary of distinct floats would make a map half as large again
    assert "RLE_DICTIONARY" not in encodings["scores.list.element"]
    assert "RLE_DICTIONARY" not in encodings["activations.list.element"]
    assert "RLE_DICTIONARY" in encodings["prompt"]


@pytest.mark.parametrize("selection", [Selection("relative", 0.5), Selection("topk", 7),
                                       Selection("absolute", 0.0)])
def test_another_selection_is_read_off_the_maps(model, facts, tmp_path, monkeypatch,
                                                selection, kept_run):
    fresh = _run(model, facts, tmp_path / "fresh", selection)
    kept = _copy(kept_run, tmp_path / "kept")
    timings = pd.read_parquet(kept.root / "timings.parquet")
    calls = _no_attribution(monkeypatch)
    res = localize(model, facts, kept, LocalizeConfig(methods=METHODS, n_steps=3,
                                                      selection=selection), progress=False)
    assert calls == [] and res.computed == len(METHODS) * len(facts.queries())
    _same_tables(fresh, kept)
    # the timings are those of the attributions, measured by the first call
    assert pd.read_parquet(kept.root / "timings.parquet").equals(timings)


def test_a_unit_without_a_map_is_attributed(model, facts, tmp_path, monkeypatch):
    """Maps of one method only: the other method's units run their attribution."""
    kept = RunStore(tmp_path / "kept", fsync=False)
    localize(model, facts, kept, LocalizeConfig(methods=("ig",), n_steps=3, keep_maps=True),
             progress=False)
    fresh = _run(model, facts, tmp_path / "fresh", Selection("topk", 3))
    seen: list[str] = []
    real = attribute

    def counting(model, query, method, **kwargs):
        seen.append(method)
        return real(model, query, method, **kwargs)

    monkeypatch.setattr("knowloc.pipeline.localize.attribute", counting)
    localize(model, facts, kept, LocalizeConfig(methods=METHODS, n_steps=3,
                                                selection=Selection("topk", 3)),
             progress=False)
    assert seen == ["amig"] * len(facts.queries())
    _same_tables(fresh, kept)


def test_load_maps_gives_the_attributions_back(model, facts, tmp_path, kept_run):
    store = kept_run
    maps = load_maps(store.root)
    queries = facts.queries()
    assert set(maps) == {(m, q.query_id) for m in METHODS for q in queries}
    q = queries[0]
    direct = attribute(model, q, "amig", n_steps=3, progress=False)
    loaded = maps["amig", q.query_id]
    assert torch.equal(loaded.scores, direct.scores)
    assert torch.equal(loaded.activations, direct.activations)
    assert (loaded.prob, loaded.target_ids, loaded.predicted, loaded.config) == \
        (direct.prob, direct.target_ids, direct.predicted, direct.config)
    # re-thresholding in a notebook gives the rows the run stores for that selection
    sets = store.table("neuron_sets")
    stored = sets[(sets["method"] == "amig") & (sets["query_id"] == q.query_id)]
    again = neurons_frame(loaded, Selection("relative", 0.2))
    assert stored[list(again.columns)].reset_index(drop=True).equals(again)
    assert set(load_maps(store, methods=["ig"], query_ids=[q.query_id])) == {("ig", q.query_id)}
    assert load_maps(_run(model, facts, tmp_path / "none", Selection())) == {}


def test_cli_rethreshold_without_recomputing(tiny_dir, facts_file, tmp_path, monkeypatch,
                                           capsys):
    base = ["-q", "localize", "--model", str(tiny_dir), "--dataset", f"jsonl:{facts_file}",
            "--relations", "P1376", "--method", "ig", "--n-steps", "3"]
    run, fresh = tmp_path / "run", tmp_path / "fresh"
    assert main([*base, "--keep-maps", "--out", str(run)]) == 0
    assert main([*base, "--selection", "topk", "--threshold", "4", "--out", str(fresh)]) == 0
    calls = _no_attribution(monkeypatch)
    assert main([*base, "--selection", "topk", "--threshold", "4", "--overwrite",
                 "--out", str(run)]) == 0
    assert calls == []
    _same_tables(RunStore(fresh, create=False), RunStore(run, create=False))


def test_another_keep_top_is_not_read_from_old_parts(model, facts, tmp_path):
    """Bug report: ``keep_top`` was not in the unit key, so a run localized again with another
    ``keep_top`` reported the old number of top scores per query."""
    store = RunStore(tmp_path / "run", fsync=False)
    localize(model, facts, store, LocalizeConfig(methods=METHODS, n_steps=3, keep_top=12,
                                                 selection=Selection("relative", 0.2)),
             progress=False)
    assert store.table("attributions").groupby(["method", "query_id"]).size().eq(12).all()
    localize(model, facts, store, LocalizeConfig(methods=METHODS, n_steps=3, keep_top=7,
                                                 selection=Selection("relative", 0.2)),
             progress=False)
    sizes = store.table("attributions").groupby(["method", "query_id"]).size()
    assert sizes.eq(7).all(), sizes.value_counts()
    fresh = RunStore(tmp_path / "fresh", fsync=False)
    localize(model, facts, fresh, LocalizeConfig(methods=METHODS, n_steps=3, keep_top=7,
                                                 selection=Selection("relative", 0.2)),
             progress=False)
    pd.testing.assert_frame_equal(pd.read_parquet(store.root / "attributions.parquet"),
                                  pd.read_parquet(fresh.root / "attributions.parquet"))
