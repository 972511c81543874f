"""`knowloc reproduce` and `knowloc consistency` end to end on a tiny model saved to disk."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pandas as pd

from knowloc.cli import main
from knowloc.report import report_manifest


def _args(model_dir, facts, out, methods="ig,amig"):
    return ["-q", "reproduce", "--model", str(model_dir), "--dataset", f"jsonl:{facts}",
            "--method", methods, "--n-steps", "3", "--population", "all", "--out", str(out)]


def test_reproduce_writes_a_complete_report(tiny_dir, facts_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(tiny_dir, facts_file, out)) == 0
    report = out / "report.html"
    assert report.exists()
    man = report_manifest(report)
    assert {"overview", "localization", "consistency-analysis-table-1"} <= set(man["sections"])
    assert man["has_run_info"]
    assert any("Table 1" in t for t in man["tables"])
    captions = " ".join(man["figures"])
    assert "CS2 per relation, IG" in captions and "CS2 per relation, AMIG" in captions
    assert "knowledge neurons per layer" in captions
    assert not man["missing_figures"] and not man["external_refs"]
    for link in man["csv_links"]:
        assert (out / link).exists(), link
    t1 = pd.read_csv(out / "table1.csv")
    assert set(t1["method"]) == {"ig", "amig"} and set(t1["T"]) == {"St", "Ot"}
    q = pd.read_parquet(out / "queries.parquet")
    # quick preset: 2 facts per relation -> 2 methods x (2 x 4 + 2 x 3) queries
    assert len(q) == 2 * (2 * 4 + 2 * 3)
    assert not q.duplicated(["method", "query_id"]).any()
    # the overview describes what ran, not the preset's text; timings add up every invocation
    text = report.read_text(encoding="utf-8")
    assert ("as run: 2 relations, 4 facts, 3–4 queries per fact (14 queries), IG/AMIG, 3 steps, "
            "target: first answer token") in text
    overview = text[text.index('id="overview"'):]
    assert "IG/SIG/AMIG" not in overview[:overview.index("</section>")]  # the preset's text
    assert "Localization compute, all invocations together" in text
    # the paper's headers in HTML and Markdown alike; the CSV keeps the machine names
    assert "<th>R: I</th>" in text and "<th>∩: II</th>" in text and "cap_II" not in text
    md1 = (out / "table1.md").read_text()
    assert md1.startswith("| method | T | threshold | n | R: I | S: I | R: II | S: II |")
    assert "cap_II" in t1.columns


def test_consistency_command_matches_reproduce(tiny_dir, facts_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(tiny_dir, facts_file, out, methods="ig")) == 0
    before = (out / "table1.csv").read_bytes()
    capsys.readouterr()
    assert main(["consistency", "--run", str(out), "--population", "all"]) == 0
    printed = capsys.readouterr().out
    assert "| ig | St |" in printed
    assert (out / "table1.csv").read_bytes() == before


def test_same_config_gives_byte_identical_tables(tiny_dir, facts_file, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_args(tiny_dir, facts_file, a, methods="ig")) == 0
    assert main(_args(tiny_dir, facts_file, b, methods="ig")) == 0
    for table in ("queries", "neuron_sets", "attributions", "consistency"):
        assert (a / f"{table}.parquet").read_bytes() == (b / f"{table}.parquet").read_bytes(), table


def test_killed_reproduce_resumes_to_the_same_tables(tiny_dir, facts_file, tmp_path):
    """SIGKILL a real `knowloc reproduce` mid-run, rerun it, compare with an uninterrupted run."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(_args(tiny_dir, facts_file, ref)) == 0
    cmd = [sys.executable, "-m", "knowloc.cli", *_args(tiny_dir, facts_file, run)]
    cmd[cmd.index("--n-steps") + 1] = "3"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    parts = run / "parts" / "queries"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if parts.exists() and len(list(parts.glob("*.parquet"))) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = len(list(parts.glob("*.parquet")))
    assert 0 < n_before < 2 * (2 * 4 + 2 * 3)
    done_mtimes = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.parquet")}
    res = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    # finished units were not recomputed
    for name, mtime in done_mtimes.items():
        assert (parts / name).stat().st_mtime_ns == mtime
    for table in ("queries", "neuron_sets", "attributions", "consistency"):
        assert (ref / f"{table}.parquet").read_bytes() == (run / f"{table}.parquet").read_bytes(), table


def test_consistency_localizes_what_is_missing(tiny_dir, facts_file, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["-q", "consistency", "--run", str(out), "--localize", "--model", str(tiny_dir),
            "--dataset", f"jsonl:{facts_file}", "--method", "ig", "--n-steps", "3",
            "--population", "all", "--max-queries-per-fact", "2"]
    assert main(args) == 0
    assert (out / "table1.csv").exists() and (out / "neuron_sets.parquet").exists()
    q = pd.read_parquet(out / "queries.parquet")
    assert len(q) == 9 * 2  # 9 facts x 2 queries, one method
    capsys.readouterr()
    assert main(args) == 0  # second time: nothing left to localize
    assert "localized 0 queries (18 already done)" in capsys.readouterr().out


def test_context_prefix_is_prepended(facts_file):
    from knowloc.data import load_facts, with_context

    fs = load_facts(f"jsonl:{facts_file}")
    ctx = with_context(fs, "Paris is the capital of France.")
    assert ctx.queries()[0].prompt == "Paris is the capital of France. " + fs.queries()[0].prompt
    assert [q.query_id for q in ctx.queries()] == [q.query_id for q in fs.queries()]
    assert with_context(fs, None) is fs


def test_reproduce_target_all_reaches_every_stage(tiny_dir, facts_file, tmp_path):
    """``reproduce --target all``: screening, localization and the stages after it score the
    whole answer (teacher-forced), the run records it and the report says so."""
    import json

    import yaml

    from knowloc.models import answer_scores, load_model

    facts = tmp_path / "facts.jsonl"  # two-word answers first (the preset keeps 2 facts per relation), then the tiny facts
    facts.write_text("".join(
        json.dumps({"relation": "P37", "subject": subj, "object": obj,
                    "templates": ["the official language of [X] is [Y]",
                                  "the people of [X] speak [Y]"]}) + "\n"
        for subj, obj in (("brazil", "portuguese language"), ("japan", "japanese language")))
        + facts_file.read_text())
    out = tmp_path / "run"
    assert main(_args(tiny_dir, facts, out, methods="ig")
                + ["--target", "all", "--no-attention"]) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["localize"]["target"] == "all" and config["preset"]["target"] == "all"
    model = load_model(str(tiny_dir))
    q = pd.read_parquet(out / "queries.parquet")
    multi = 0
    for row in q.itertuples():
        ids = model.target_ids(row.prompt, row.answer, "all")
        multi += len(ids) > 1
        want = float(answer_scores(model, [model.encode_prompt(row.prompt)], [ids]).prob[0])
        assert abs(row.prob - want) < 1e-6 * max(1.0, want), (row.prompt, row.answer)
    assert multi, "the facts file has no multi-token answer for this tokenizer"
    edits = pd.read_parquet(out / "edits.parquet")
    assert len(edits)
    assert "target: whole answer (teacher-forced)" in (out / "report.html").read_text()
