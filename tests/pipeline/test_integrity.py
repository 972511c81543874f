"""Integrity of a run directory: tables hold the current configuration only, duplicate facts
keep their rows, unfinished runs are refused, bad parts are recomputed, one process at a
time, one torch thread count per run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
import yaml
from conftest import cli_error

from knowloc.cli import main
from knowloc.errors import RunBusyError, RunError
from knowloc.pipeline.units import Unit, run_units
from knowloc.store import RunStore


def _intervene(run, *extra):
    assert main(["-q", "intervene", "--run", str(run), "--all-queries", *extra]) == 0
    return pd.read_parquet(run / "interventions.parquet")


def test_intervene_reports_only_the_current_enhance_factor(run, tmp_path):
    fresh = tmp_path / "fresh"
    shutil.copytree(run, fresh)
    _intervene(run)
    _intervene(run)
    mixed = _intervene(run, "--enhance", "3")
    alone = _intervene(fresh, "--enhance", "3")
    assert (run / "interventions.parquet").read_bytes() == \
        (fresh / "interventions.parquet").read_bytes()
    assert len(mixed) == len(alone)
    assert pd.read_csv(run / "figure4.csv").equals(pd.read_csv(fresh / "figure4.csv"))
    assert yaml.safe_load((run / "config.yaml").read_text())["intervene"]["enhance"] == 3.0
    # the ×2 parts stay as a cache: back to ×2 computes nothing
    main(["-q", "intervene", "--run", str(run), "--all-queries"])


def test_modify_reports_only_the_current_ppl_setting(run, tmp_path, capsys):
    fresh = tmp_path / "fresh"
    shutil.copytree(run, fresh)
    base = ["-q", "modify", "--ppl-pool", "6", "--op", "erase", "--set", "local"]
    assert main([*base, "--run", str(run), "--ppl-max-tokens", "24"]) == 0
    assert main([*base, "--run", str(run), "--ppl-max-tokens", "16"]) == 0
    assert main([*base, "--run", str(fresh), "--ppl-max-tokens", "16"]) == 0
    assert (run / "edits.parquet").read_bytes() == (fresh / "edits.parquet").read_bytes()
    assert pd.read_csv(run / "table2.csv").equals(pd.read_csv(fresh / "table2.csv"))
    assert yaml.safe_load((run / "config.yaml").read_text())["modify"]["ppl_max_tokens"] == 16


def test_attention_reports_only_the_current_enhance_factor(run, tmp_path):
    fresh = tmp_path / "fresh"
    shutil.copytree(run, fresh)
    base = ["-q", "attention", "--no-heatmaps", "--all-queries"]
    assert main([*base, "--run", str(run)]) == 0
    assert main([*base, "--run", str(run), "--enhance", "3"]) == 0
    assert main([*base, "--run", str(fresh), "--enhance", "3"]) == 0
    for name in ("synapse_effects.parquet", "predominance.parquet", "figure6.csv"):
        assert (run / name).read_bytes() == (fresh / name).read_bytes(), name


def test_another_relation_selection_replaces_the_tables(tiny_dir, facts_file, tmp_path):
    out = tmp_path / "run"
    loc = ["-q", "localize", "--model", str(tiny_dir), "--dataset", f"jsonl:{facts_file}",
           "--method", "ig", "--n-steps", "3", "--out", str(out)]
    assert main([*loc, "--relations", "P37"]) == 0
    assert main(["-q", "consistency", "--run", str(out), "--population", "all"]) == 0
    assert main(["-q", "intervene", "--run", str(out)]) == 0
    assert main([*loc, "--relations", "P1376"]) == 0
    assert set(pd.read_parquet(out / "queries.parquet")["relation"]) == {"P1376"}
    assert set(RunStore(out).table("neuron_sets")["relation"]) <= {"P1376"}
    assert yaml.safe_load((out / "config.yaml").read_text())["dataset"]["relations"] == ["P1376"]
    # what was computed from P37's localization is retired, not shown with P1376's
    assert not (out / "interventions.parquet").exists()
    assert RunStore(out).table("consistency").empty
    assert main(["-q", "consistency", "--run", str(out), "--population", "all"]) == 0
    assert set(pd.read_parquet(out / "consistency.parquet")["relation"]) == {"P1376"}
    assert set(RunStore(out).query("SELECT DISTINCT relation FROM queries")["relation"]) == \
        {"P1376"}


def _dup_facts(path):
    from tiny import CAPITAL_FACTS, CAPITAL_TEMPLATES

    (subj, obj), (subj2, obj2) = CAPITAL_FACTS[:2]
    rows = [{"relation": "P36", "subject": subj, "object": obj, "fact_id": fid,
             "templates": CAPITAL_TEMPLATES} for fid in ("uuid-a", "uuid-b")]
    rows.append({"relation": "P36", "subject": subj2, "object": obj2, "fact_id": "uuid-c",
                 "templates": CAPITAL_TEMPLATES})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_facts_with_the_same_prompt_and_answer_keep_their_rows(tiny_dir, tmp_path, capsys):
    facts = _dup_facts(tmp_path / "dup.jsonl")
    out = tmp_path / "run"
    argv = ["-q", "localize", "--model", str(tiny_dir), "--dataset", f"jsonl:{facts}",
            "--method", "ig", "--n-steps", "3", "--out", str(out)]
    assert main(argv) == 0
    q = pd.read_parquet(out / "queries.parquet")
    assert len(q) == 9 and q.groupby("fact_id").size().to_dict() == \
        {"uuid-a": 3, "uuid-b": 3, "uuid-c": 3}
    ns = pd.read_parquet(out / "neuron_sets.parquet")
    a = ns[ns["fact_id"] == "uuid-a"].drop(columns=["fact_id", "query_id"]).reset_index(drop=True)
    b = ns[ns["fact_id"] == "uuid-b"].drop(columns=["fact_id", "query_id"]).reset_index(drop=True)
    assert len(a) and a.equals(b)
    capsys.readouterr()
    assert main(argv) == 0  # resume: nothing recomputed
    assert "localized 0 queries (9 already done)" in capsys.readouterr().out
    assert main(["-q", "consistency", "--run", str(out), "--population", "all"]) == 0
    assert set(pd.read_parquet(out / "consistency.parquet")["fact_id"]) == \
        {"uuid-a", "uuid-b", "uuid-c"}
    assert main(["-q", "intervene", "--run", str(out), "--all-queries"]) == 0
    assert set(pd.read_parquet(out / "interventions.parquet")["fact_id"]) == \
        {"uuid-a", "uuid-b", "uuid-c"}


def _drop_units(run, n):
    store = RunStore(run)
    keys = sorted(store.current_keys("queries"))[:n]
    for k in keys:
        (run / "parts" / "queries" / f"{k}.parquet").unlink()
    return len(store.current_keys("queries"))


def test_an_unfinished_localization_is_refused_downstream(localized, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(localized, run)
    total = _drop_units(run, 3)
    line = cli_error(capsys, ["-q", "consistency", "--run", str(run), "--population", "all"])
    assert f"incomplete: 3 of {total} localize units are missing" in line
    assert "knowloc" in line and "localize" in line and "--allow-partial" in line
    assert main(["-q", "consistency", "--run", str(run), "--population", "all",
                 "--allow-partial"]) == 0
    line = cli_error(capsys, ["-q", "intervene", "--run", str(run)])
    assert "incomplete: 3 of" in line
    assert main(["-q", "intervene", "--run", str(run), "--allow-partial"]) == 0


def test_a_part_without_its_rows_is_not_done(localized, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(localized, run)
    store = RunStore(run)
    key = min(store.current_keys("queries"))
    before = store.get("queries", key)
    store.put("queries", key, before.iloc[:0])  # a zero-row part written by someone else
    config = yaml.safe_load((run / "config.yaml").read_text())
    cfg = config["dataset"]
    argv = ["-q", "localize", "--model", config["model"]["name"],
            "--dataset", cfg["source"], "--method", "ig,amig", "--n-steps", "3",
            "--out", str(run)]
    capsys.readouterr()
    assert main(argv) == 0
    assert "localized 1 queries" in capsys.readouterr().out
    assert store.get("queries", key).equals(before)
    assert (run / "queries.parquet").read_bytes() == (localized / "queries.parquet").read_bytes()


def _square(model, n):
    return {"done": pd.DataFrame({"n": [n]})}


def test_a_second_process_finds_the_run_busy(tmp_path, localized, capsys):
    run = tmp_path / "run"
    shutil.copytree(localized, run)
    holder = subprocess.Popen(
        [sys.executable, "-c", ("import sys, time\nfrom knowloc.store import RunStore\n"
                                "with RunStore(sys.argv[1]).lock():\n"
                                "    print('locked', flush=True)\n    time.sleep(60)\n"),
         str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunBusyError, match=f"pid {holder.pid}"):
            run_units([Unit("k1", 1)], _square, RunStore(run), model=None, marker="done",
                      progress=False)
        line = cli_error(capsys, ["-q", "consistency", "--run", str(run)])
        assert "is busy: another knowloc process" in line
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    stats = run_units([Unit("k1", 1)], _square, RunStore(run), model=None, marker="done",
                      progress=False)
    assert stats.computed == 1


def test_a_run_keeps_one_torch_thread_count(tmp_path):
    store = RunStore(tmp_path / "run")
    n = torch.get_num_threads()
    run_units([Unit("k1", 1)], _square, store, model={}, marker="done", progress=False)
    assert json.loads((store.root / "threads.json").read_text()) == {"torch_threads": n}
    other = n + 1
    torch.set_num_threads(other)
    try:
        with pytest.raises(RunError, match=f"computed with {n} torch thread"):
            run_units([Unit("k1", 1), Unit("k2", 2)], _square, store, model={}, marker="done",
                      progress=False)
        # reading finished units needs no computation and is allowed
        assert run_units([Unit("k1", 1)], _square, store, model={}, marker="done",
                         progress=False).computed == 0
    finally:
        torch.set_num_threads(n)
    assert run_units([Unit("k1", 1), Unit("k2", 2)], _square, store, model={}, marker="done",
                     progress=False).computed == 1
