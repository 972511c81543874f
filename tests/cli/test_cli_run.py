"""``knowloc`` as a user runs it on a tiny model: ``--config``, single-query ``--out``/``--json``,
the run's log file, ``-q`` summary lines, progress labels, executors closed, read-only
``query``."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import cli_error

from knowloc.attribution import Attribution
from knowloc.cli import main

LOCALIZE = ["--method", "ig,amig", "--n-steps", "3"]


def tables(run: Path) -> dict[str, str]:
    """Consolidated table -> sha256 of its bytes (not the timings: wall-clock seconds)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.glob("*.parquet")
            if p.name != "timings.parquet"}


def every_file(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file()}


# ------------------------------------------------------------------- --config
def test_config_round_trip_gives_identical_tables(localized, tmp_path, capsys):
    """A run's own config.yaml given to a fresh --out reproduces its consolidated tables
    byte for byte."""
    fresh = tmp_path / "fresh"
    assert main(["-q", "localize", "--config", str(localized / "config.yaml"),
                 "--out", str(fresh)]) == 0
    assert tables(localized) and tables(fresh) == tables(localized)
    assert yaml.safe_load((fresh / "config.yaml").read_text()) == \
        yaml.safe_load((localized / "config.yaml").read_text())


def test_config_options_on_the_command_line_win(localized, tmp_path, capsys):
    fresh = tmp_path / "fresh"
    assert main(["-q", "localize", "--config", str(localized / "config.yaml"),
                 "--method", "ig", "--n-steps", "2", "--out", str(fresh)]) == 0
    cfg = yaml.safe_load((fresh / "config.yaml").read_text())
    assert cfg["localize"]["methods"] == ["ig"] and cfg["localize"]["n_steps"] == 2
    assert cfg["dataset"]["source"] == yaml.safe_load(
        (localized / "config.yaml").read_text())["dataset"]["source"]


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.update(sed=1), r"unknown key 'sed'"),
    (lambda c: c["localize"].update(n_stepz=3), r"unknown key 'localize\.n_stepz'"),
    (lambda c: c["localize"].update(n_steps="many"), r"localize\.n_steps = 'many' is not a valid"),
    (lambda c: c["model"].update(dtype="float8"), r"model\.dtype = 'float8' is not a valid"),
    (lambda c: c["localize"].update(keep_top=7), r"localize\.keep_top = 7 has no command-line"),
])
def test_bad_config_is_one_line_before_the_model_loads(edit, match, localized, tmp_path,
                                                      capsys, monkeypatch):
    import knowloc.models

    monkeypatch.setattr(knowloc.models, "load_model", lambda *a, **k: pytest.fail("loaded"))
    cfg = yaml.safe_load((localized / "config.yaml").read_text())
    edit(cfg)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    line = cli_error(capsys, ["localize", "--config", str(path), "--out", str(tmp_path / "o")])
    assert re.search(match, line), line
    assert not (tmp_path / "o").exists()


def test_reproduce_config_round_trip(tiny_dir, facts_file, tmp_path, capsys):
    """reproduce's config.yaml (its resolved preset) reruns to the same tables."""
    first = tmp_path / "first"
    assert main(["-q", "reproduce", "--model", str(tiny_dir), "--dataset", f"jsonl:{facts_file}",
                 "--method", "ig", "--n-steps", "2", "--population", "all",
                 "--known-per-relation", "2", "--max-queries-per-fact", "2", "--no-modify",
                 "--no-attention", "--out", str(first)]) == 0
    second = tmp_path / "second"
    assert main(["-q", "reproduce", "--config", str(first / "config.yaml"),
                 "--out", str(second)]) == 0
    assert {"queries.parquet", "attributions.parquet", "consistency.parquet"} <= set(tables(first))
    assert tables(second) == tables(first)


def test_bootstrap_settings_from_the_command_line_and_config(tiny_dir, facts_file, localized,
                                                            tmp_path, capsys):
    """--n-boot/--boot-seed set the bootstrap of every interval and are recorded; a run's
    config.yaml given to --config carries them (they used to fall back to 1000/0)."""
    import pandas as pd

    from knowloc.pipeline.consistency import consistency_result
    from knowloc.store import RunStore

    first = tmp_path / "first"
    assert main(["-q", "reproduce", "--model", str(tiny_dir), "--dataset", f"jsonl:{facts_file}",
                 "--method", "ig,amig", "--n-steps", "2", "--population", "all",
                 "--no-modify", "--no-attention", "--n-boot", "200", "--boot-seed", "7",
                 "--out", str(first)]) == 0
    cfg = yaml.safe_load((first / "config.yaml").read_text())
    assert (cfg["consistency"]["n_boot"], cfg["consistency"]["boot_seed"]) == (200, 7)
    scores = RunStore(first, create=False).table("consistency")
    own = consistency_result(scores, 0.1, n_boot=200, boot_seed=7).table1
    default = consistency_result(scores, 0.1).table1
    written = pd.read_csv(first / "table1.csv")
    assert written["R_I_lo"].tolist() == pytest.approx(own["R_I_lo"].tolist(), nan_ok=True)
    assert written["S_I_lo"].tolist() == pytest.approx(own["S_I_lo"].tolist(), nan_ok=True)
    assert written["S_I_lo"].tolist() != pytest.approx(default["S_I_lo"].tolist(), nan_ok=True)
    second = tmp_path / "second"
    assert main(["-q", "reproduce", "--config", str(first / "config.yaml"),
                 "--out", str(second)]) == 0
    again = yaml.safe_load((second / "config.yaml").read_text())
    assert (again["consistency"]["n_boot"], again["consistency"]["boot_seed"]) == (200, 7)
    assert (second / "table1.csv").read_bytes() == (first / "table1.csv").read_bytes()
    # the consistency command alone
    run = shutil.copytree(localized, tmp_path / "run")
    assert main(["-q", "consistency", "--run", str(run), "--population", "all",
                 "--n-boot", "200", "--boot-seed", "7"]) == 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert (cfg["consistency"]["n_boot"], cfg["consistency"]["boot_seed"]) == (200, 7)
    line = cli_error(capsys, ["consistency", "--run", str(run), "--n-boot", "0"])
    assert "n_boot" in line


def test_stage_config_sets_the_stage_options(run, capsys):
    cfg = {"attention": {"alpha": 0.5, "only_known": False, "split_threshold": 0.2}}
    path = run / "stage.yaml"
    path.write_text(yaml.safe_dump(cfg))
    from knowloc.cli import build_parser, config_defaults

    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices["attention"]
    assert config_defaults("attention", path, sub) == {"alpha": 0.5, "all_queries": True,
                                                       "split_threshold": "0.2"}


# ------------------------------------------------------------------- single query
ONE = ["--prompt", "paris is the capital of", "--answer", "france"]


def test_single_query_json_is_the_only_stdout(tiny_dir, capsys):
    assert main(["localize", "--model", str(tiny_dir), *ONE, "--method", "ig",
                 "--n-steps", "3", "--json"]) == 0
    out = capsys.readouterr().out
    obj = json.loads(out)  # exactly one JSON document and nothing else
    assert out.count("\n") == 1
    assert obj["prompt"] == ONE[1] and obj["answer"] == "france" and obj["method"] == "ig"
    assert obj["n_steps"] == 3 and obj["target_tokens"] == "france"
    assert 0 <= obj["P"] <= 1 and isinstance(obj["known"], bool) and obj["predicted"]
    assert obj["neurons"] and all(len(n) == 3 for n in obj["neurons"])
    assert obj["neurons"][0][2] == max(n[2] for n in obj["neurons"])


def test_single_query_out_writes_map_neurons_and_summary(tiny_dir, tmp_path, capsys):
    import pandas as pd

    out = tmp_path / "one"
    assert main(["-q", "localize", "--model", str(tiny_dir), *ONE, "--method", "ig,amig",
                 "--n-steps", "3", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"ig", "amig"}
    for method in ("ig", "amig"):
        attr = Attribution.load(out / f"attribution_{method}.pt")
        assert attr.method == method and attr.prompt == ONE[1]
        kn = pd.read_csv(out / f"neurons_{method}.csv")
        assert len(kn) == summary["methods"][method]["n_neurons"] > 0
        top = attr.scores.flatten().argmax().item()
        assert (kn.iloc[0].layer, kn.iloc[0].neuron) == divmod(top, attr.scores.shape[1])


def test_json_needs_one_method(capsys, tiny_dir):
    line = cli_error(capsys, ["localize", "--model", str(tiny_dir), *ONE, "--method", "ig,amig",
                              "--json"])
    assert "give one --method" in line


# ------------------------------------------------------------------- log, -q, labels
def test_quiet_prints_one_summary_line_per_stage_and_the_log_holds_the_run(
        localized, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(localized, run)
    (run / "knowloc.log").unlink(missing_ok=True)
    capsys.readouterr()
    assert main(["-q", "consistency", "--run", str(run), "--population", "all"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"^consistency: 1 run, 1 computed, 0 already done, [0-9.]+ s$", err,
                     re.MULTILINE), err
    assert "%|" not in err  # no progress bar
    text = (run / "knowloc.log").read_text()
    assert "consistency --run" in text and "command: knowloc -q consistency" in text
    assert re.search(r"knowloc \S+.*, torch \d", text) and "transformers" in text
    assert re.search(r"consistency: 1 run, 1 computed", text)
    assert re.search(r"consistency ended .*: exit status 0", text)


def test_localize_log_and_summary(tiny_dir, facts_file, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["-q", "localize", "--model", str(tiny_dir), "--dataset", f"jsonl:{facts_file}",
            "--relations", "P1376", *LOCALIZE, "--out", str(run)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert re.search(r"^localizing: 18 queries, 18 computed, 0 already done, [0-9.]+ s$", err,
                     re.MULTILINE), err
    assert main(argv) == 0  # appended, and resumed
    assert re.search(r"^localizing: 18 queries, 0 computed, 18 already done",
                     capsys.readouterr().err, re.MULTILINE)
    text = (run / "knowloc.log").read_text()
    assert text.count("---- localize started") == 2 and text.count("exit status 0") == 2
    assert f"model: {tiny_dir}" in text and "loaded " in text
    assert "localizing: 18 queries, 18 computed" in text


def test_warnings_go_to_the_log(run, capsys, monkeypatch):
    import warnings

    import knowloc.pipeline.consistency as stage

    original = stage.consistency_scores

    def noisy(*a, **k):
        warnings.warn("a library warning", FutureWarning, stacklevel=1)
        return original(*a, **k)

    monkeypatch.setattr(stage, "consistency_scores", noisy)
    assert main(["-q", "consistency", "--run", str(run), "--population", "all"]) == 0
    assert "a library warning" in (run / "knowloc.log").read_text()


def test_labels_show_the_start_of_the_prompt():
    from knowloc.pipeline.units import short_label

    assert short_label("The official language of Brazil is", 20) == "The official langua…"
    assert len(short_label("x" * 50, 30)) == 30
    assert short_label("short", 30) == "short"


def test_failed_command_leaves_no_log_behind(tmp_path, capsys):
    out = tmp_path / "run"
    cli_error(capsys, ["localize", "--relations", "P99999", "--out", str(out)])
    assert not out.exists()


# ------------------------------------------------------------------- executors closed
class FakeExecutor:
    def __init__(self, closed: list) -> None:
        self.closed = closed

    def run(self, compute, model, payloads):
        for i, p in enumerate(payloads):
            yield i, compute(model, p)

    def close(self) -> None:
        self.closed.append(True)


@pytest.mark.parametrize("failure", [None, "error", "interrupt"])
def test_cli_closes_its_executor(failure, tiny_dir, facts_file, tmp_path, capsys,
                                 monkeypatch):
    import knowloc.models
    from knowloc.errors import ModelError
    from knowloc.pipeline import distributed

    closed: list = []
    monkeypatch.setattr(distributed, "make_executor", lambda *a, **k: FakeExecutor(closed))
    if failure:
        exc = ModelError("cannot load") if failure == "error" else KeyboardInterrupt()

        def fail(*a, **k):
            raise exc

        monkeypatch.setattr(knowloc.models, "load_model", fail)
    rc = main(["-q", "localize", "--model", str(tiny_dir), "--dataset", f"jsonl:{facts_file}",
               "--relations", "P1376", "--method", "ig", "--n-steps", "2",
               "--out", str(tmp_path / "run")])
    assert rc == {None: 0, "error": 2, "interrupt": 130}[failure]
    assert closed == [True]


# ------------------------------------------------------------------- read-only query
@pytest.mark.parametrize("sql", [
    "COPY (SELECT * FROM queries) TO '{run}/x.csv'",
    "ATTACH '{run}/x.db' AS x",
    "INSTALL httpfs",
    "LOAD httpfs",
    "CREATE TABLE t AS SELECT * FROM queries",
    "INSERT INTO queries SELECT * FROM queries",
    "EXPORT DATABASE '{run}/export'",
    "SET threads = 1",
    "EXPLAIN ANALYZE COPY (SELECT 1) TO '{run}/y.csv'",
    "SELECT 1; COPY (SELECT 1) TO '{run}/z.csv'",
    "DROP VIEW queries",
])
def test_query_refuses_writing_statements(sql, localized, capsys):
    before = every_file(localized)
    line = cli_error(capsys, ["query", str(localized), sql.format(run=localized)])
    assert "read-only" in line or "one SQL statement" in line
    assert every_file(localized) == before


@pytest.mark.parametrize("sql", [
    "SELECT count(*) AS n FROM queries",
    "WITH q AS (SELECT * FROM queries) SELECT count(*) AS n FROM q",
    "DESCRIBE queries",
    "SHOW TABLES",
    "EXPLAIN SELECT * FROM queries",
    "SUMMARIZE queries",
])
def test_query_runs_reading_statements(sql, localized, capsys):
    before = every_file(localized)
    assert main(["query", str(localized), sql]) == 0
    assert capsys.readouterr().out.strip()
    assert every_file(localized) == before


def test_query_reads_no_file_outside_the_run(localized, capsys, tmp_path):
    other = tmp_path / "other.csv"
    other.write_text("a\n1\n")
    line = cli_error(capsys, ["query", str(localized), f"SELECT * FROM read_csv('{other}')"])
    assert "query failed" in line


def test_heatmap_target_all_scores_the_whole_answer(tiny_dir, tmp_path, capsys):
    """``heatmap --target all`` prints the teacher-forced P of the whole answer (the product
    over its tokens), ``first`` that of its first token."""
    from knowloc.models import answer_scores, load_model

    model = load_model(str(tiny_dir))
    prompt, answer = "the official language of brazil is", "portuguese language"
    printed = {}
    for target in ("first", "all"):
        assert main(["heatmap", "--model", str(tiny_dir), "--prompt", prompt, "--answer", answer,
                     "--method", "none", "--target", target,
                     "--out", str(tmp_path / target)]) == 0
        out = capsys.readouterr()
        line = next(s for s in (out.out + out.err).splitlines() if s.startswith("q1: P("))
        printed[target] = float(line.split("= ")[1].split(",")[0])
        ids = model.target_ids(prompt, answer, target)
        want = float(answer_scores(model, [model.encode_prompt(prompt)], [ids]).prob[0])
        assert printed[target] == pytest.approx(want, abs=1e-4)
    assert len(model.target_ids(prompt, answer, "all")) == 2
    assert printed["all"] < printed["first"]
