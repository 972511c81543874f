"""The run model: one spec for config.yaml, one driver, and a run directory that renders its own
report and tells its status (tiny model saved to disk)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from knowloc.cli import main
from knowloc.pipeline.localize import query_key, screen_key
from knowloc.pipeline.run import model_fingerprint
from knowloc.report import report_manifest
from knowloc.store import RunStore, content_hash
from knowloc.study import read_spec, render_report, run_status
from knowloc.study.spec import RunSpec, config_schema


def _reproduce(model_dir, facts, out):
    return ["-q", "reproduce", "--model", str(model_dir), "--dataset", f"jsonl:{facts}",
            "--method", "ig,amig", "--n-steps", "3", "--population", "all", "--out", str(out)]


@pytest.fixture(scope="module")
def reproduced(tiny_dir, facts_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reproduced") / "run"
    assert main(_reproduce(tiny_dir, facts_file, out)) == 0
    return out


def test_knowloc_report_equals_the_report_reproduce_wrote(reproduced, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reproduced, run)
    written = (run / "report.html").read_bytes()
    (run / "report.html").unlink()
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").read_bytes() == written
    # every stage is there: no section says "not run"
    sections = report_manifest(run / "report.html")["sections"]
    assert not [s for s in sections if s.endswith("not-run")]
    assert {"knowledge-modification-table-2", "query-kn-mapping-figure-4",
            "knowledge-synapses-figure-6"} <= set(sections)


def test_report_of_a_run_built_stage_by_stage(run, tmp_path, capsys):
    """`knowloc localize` + `knowloc consistency`, then `knowloc report`: Table 1, the
    violins, and the later stages listed as not run with the command that adds them."""
    assert main(["report", str(run), "--out", str(tmp_path / "r.html")]) == 0
    man = report_manifest(tmp_path / "r.html")
    assert {"overview", "localization", "consistency-analysis-table-1"} <= set(man["sections"])
    assert any("Table 1" in t for t in man["tables"])
    assert "CS2 per relation, IG" in " ".join(man["figures"])
    not_run = [s for s in man["sections"] if s.endswith("not-run")]
    assert "knowledge-modification-table-2-not-run" in not_run
    assert "query-kn-mapping-figure-4-not-run" in not_run
    assert "knowledge-synapses-figure-6-not-run" in not_run
    text = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert f"knowloc modify --run {run.resolve()}" in text
    assert not man["missing_figures"]


def test_report_of_a_localized_run_only(localized, tmp_path):
    out = tmp_path / "r.html"
    render_report(localized, out)
    sections = report_manifest(out)["sections"]
    assert "localization" in sections
    assert "consistency-analysis-table-1-not-run" in sections


def test_status_of_a_finished_run(reproduced, capsys):
    capsys.readouterr()
    assert main(["status", str(reproduced), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    stages = {s["stage"]: s for s in status["stages"]}
    assert set(stages) == {"localize", "consistency", "modify", "intervene", "attention"}
    loc = stages["localize"]
    assert loc["present"] and loc["complete"] and loc["planned"] == loc["done"] == 28
    assert loc["by_method"] == {"amig": {"planned": 14, "done": 14},
                                "ig": {"planned": 14, "done": 14}}
    assert status["holder"] is None
    assert "Localization: ig, amig, 3 steps" in status["configuration"]
    assert any("reproduce ended" in line for line in status["log"])
    assert main(["status", str(reproduced)]) == 0
    text = capsys.readouterr().out
    assert "no process is computing in this run" in text and "complete" in text


def test_status_of_a_stage_by_stage_run_names_the_missing_stages(run, capsys):
    capsys.readouterr()
    assert main(["status", str(run), "--json"]) == 0
    stages = {s["stage"]: s for s in json.loads(capsys.readouterr().out)["stages"]}
    assert stages["consistency"]["complete"]
    assert not stages["modify"]["present"]
    assert stages["modify"]["add"].startswith(f"knowloc modify --run {run.resolve()}")


_HOLD = """
import sys, time
from knowloc.store import RunStore
from knowloc.pipeline.units import Unit, record_plan
store = RunStore(sys.argv[1], create=False)
with store.lock():
    keys = ["a1", "a2", "a3"]
    store.set_current("queries", keys)
    record_plan(store, "queries", [Unit(k, None, ident={"method": "ig"}) for k in keys])
    import pandas as pd
    store.put("queries", "a1", pd.DataFrame({"method": ["ig"], "query_id": ["q"]}))
    print("holding", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_status_while_another_process_computes(localized, tmp_path):
    """A run another process holds: its pid, host and start, the stage as incomplete with
    the command that finishes it; status itself changes nothing and takes no lock."""
    run = tmp_path / "busy"
    shutil.copytree(localized, run)
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(run), "60"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "holding"
        before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
        status = run_status(run)
        after = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
        assert before == after  # read only
        holder = status["holder"]
        assert holder is not None and holder["pid"] == proc.pid
        assert holder["host"] and holder["since"]
        loc = next(s for s in status["stages"] if s["stage"] == "localize")
        assert (loc["planned"], loc["done"], loc["complete"]) == (3, 1, False)
        assert loc["by_method"] == {"ig": {"planned": 3, "done": 1}}
        assert loc["finish"].startswith("knowloc ") and "localize" in loc["finish"]
    finally:
        proc.kill()
        proc.wait()


def test_status_of_a_missing_or_foreign_directory_is_one_line(tmp_path, capsys):
    from conftest import cli_error

    assert "does not exist" in cli_error(capsys, ["status", str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    assert "not a knowloc run directory" in cli_error(capsys, ["status", str(tmp_path / "empty")])
    assert "not a knowloc run directory" in cli_error(capsys, ["report", str(tmp_path / "empty")])


# ---------------------------------------------------------------- one spec, one schema
def test_cli_and_reproduce_write_config_yaml_in_one_schema(reproduced, localized):
    schema = config_schema()
    for run in (reproduced, localized):
        config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
        for section, content in config.items():
            assert section in schema, section
            if isinstance(content, dict) and schema[section] is not None:
                assert set(content) <= set(schema[section]), (section, set(content))
        assert set(config["dataset"]) == set(schema["dataset"])
    # the spec reads back what it wrote
    spec = read_spec(reproduced)
    again = RunSpec.from_config(spec.to_config())
    assert again.to_config() == spec.to_config() == read_spec(reproduced).to_config()
    assert spec.modify is not None and spec.modify_extra["ppl"]["n_entries"] >= 1


def test_old_config_keys_are_read_under_their_names():
    spec = RunSpec.from_config({"dataset": {"source": "builtin", "n_facts_loaded": 3,
                                            "n_queries_loaded": 9}, "seed": 1})
    assert spec.dataset["n_facts"] == 3 and spec.dataset["n_queries"] == 9


def test_unknown_config_key_is_refused():
    from knowloc.errors import RunError

    with pytest.raises(RunError, match="unknown key 'localize.steps'"):
        RunSpec.from_config({"localize": {"steps": 3}})


def test_unit_keys_are_what_they_were(tiny_dir):
    """Keys from the one function equal the hashes earlier versions wrote by hand, so every
    existing run resumes (the formulas below are the old code's)."""
    from knowloc import load_model
    from knowloc.attribution import AttributionConfig
    from knowloc.data import Fact, Query
    from knowloc.neurons import Selection

    model = load_model(str(tiny_dir))
    q = Query(fact_id="f", query_id="f#0", relation="R", template="[X] capital is [Y]",
              prompt="the capital is", answer="rome")
    fact = Fact(fact_id="f", relation="R", subject="the", object="rome", queries=(q,))
    fp = model_fingerprint(model)
    acfg = AttributionConfig(method="ig", n_steps=3)
    sel = Selection()
    assert query_key(model, q, acfg, sel, 200) == content_hash(
        {"model": fp, "prompt": q.prompt, "answer": q.answer, "attribution": acfg.as_dict(),
         "selection": sel.as_dict(), "keep_top": 200})
    assert screen_key(model, fact, "all") == content_hash(
        {"model": fp, "stage": "screen", "queries": [(q.prompt, q.answer)], "target": "all"})


def test_python_api_runs_stages_through_the_driver(localized, tmp_path):
    """The stages from Python: consistency on a localized run via run_stages, then the
    report; the journal records what ran."""
    from knowloc.pipeline.consistency import ConsistencyConfig
    from knowloc.study import ConsistencyStage, Context, run_stages

    run = tmp_path / "py"
    shutil.copytree(localized, run)
    store = RunStore(run, create=False)
    ctx = Context(store, read_spec(store))
    done = run_stages([ConsistencyStage(ConsistencyConfig("all", 0.2))], ctx)
    assert len(done["consistency"].result.table1)
    assert read_spec(store).consistency == ConsistencyConfig("all", 0.2)
    journal = json.loads((run / "stages.json").read_text(encoding="utf-8"))
    assert journal["stages"]["consistency"]["finished"]
    assert "consistency-analysis-table-1" in report_manifest(render_report(store))["sections"]
    assert os.path.exists(run / "table1.csv")
