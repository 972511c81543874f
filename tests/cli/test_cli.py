"""``knowloc`` command line: error paths (fast) and localize on the embedded Gemma (slow)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from knowloc.cli import main

NO_CUDA = not torch.cuda.is_available()
PROMPT = "The official language of Brazil is"


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "knowloc.cli", *args], capture_output=True, check=False,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the CLI tries to load a model."""
    import knowloc.models

    def refuse(*a, **k):
        raise AssertionError("the CLI loaded a model before validating its arguments")

    monkeypatch.setattr(knowloc.models, "load_model", refuse)


@pytest.fixture
def cached_gemma(monkeypatch, gemma):
    """Serve the session's Gemma to the in-process CLI instead of loading it again."""
    import knowloc.models

    calls = []

    def load(name, *, device="cpu", dtype="float32", **kwargs):
        assert (name, str(device), str(dtype)) == ("gemma3-270m", "cpu", "float32")
        calls.append(name)
        return gemma

    monkeypatch.setattr(knowloc.models, "load_model", load)
    return calls


def one_line_error(err: str, match: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("knowloc: error: "), err
    assert re.search(match, lines[0]), lines[0]
    assert "Traceback" not in err


# ------------------------------------------------------------------- error paths
@pytest.mark.parametrize(
    "argv, match",
    [
        (["localize", "--n-steps", "1", "--prompt", "x", "--answer", "y"], "n_steps"),
        (["localize", "--method", "lrp", "--prompt", "x", "--answer", "y"],
         "unknown attribution method 'lrp'"),
        (["localize", "--method", "ig,foo", "--out", "RUN"], "unknown attribution method 'foo'"),
        (["localize", "--prompt", "The capital of France is"], "--prompt and --answer go together"),
        (["localize", "--answer", "Paris"], "--prompt and --answer go together"),
        (["localize", "--relations", "P37"], "dataset mode needs --out"),
        (["localize", "--threshold", "1.5", "--out", "RUN"], r"relative threshold"),
        (["localize", "--dataset", "pararel:/nonexistent/pararel", "--out", "RUN"],
         "ParaRel directory not found"),
        (["localize", "--relations", "P99999", "--out", "RUN"], "unknown relation.*P99999"),
        (["localize", "--dataset", "jsonl:/nonexistent/facts.jsonl", "--out", "RUN"],
         "not found"),
    ],
)
def test_errors_before_any_model_is_loaded(argv, match, capsys, tmp_path, no_model_load):
    run = tmp_path / "run"
    argv = [str(run) if a == "RUN" else a for a in argv]
    rc = main(["-q", *argv])
    out, err = capsys.readouterr()
    assert rc == 2
    one_line_error(err, match)
    assert out == ""
    assert not run.exists()  # no run directory left behind


@pytest.mark.parametrize("command", [
    ["localize", "--prompt", "x", "--answer", "y"],
    ["reproduce", "--out", "RUN"],
    ["heatmap", "--prompt", "x", "--answer", "y"],
])
def test_method_names_come_from_the_registry_at_call_time(command, monkeypatch, capsys, tmp_path,
                                                          no_model_load):
    """A method registered after import is offered; the check is not frozen into argparse."""
    import knowloc.attribution

    names = knowloc.attribution.method_names()
    monkeypatch.setattr(knowloc.attribution, "method_names", lambda: (*names, "toy"))
    argv = [str(tmp_path / "run") if a == "RUN" else a for a in command]
    assert main(["-q", *argv, "--method", "nope"]) == 2
    one_line_error(capsys.readouterr().err, r"unknown attribution method 'nope'; choose from "
                                            r"ig, sig, amig, toy")


def test_common_options_before_and_after_the_subcommand():
    from knowloc.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["models"]).quiet is False
    assert parser.parse_args(["-q", "models"]).quiet is True
    assert parser.parse_args(["models", "-q"]).quiet is True
    assert parser.parse_args(["localize", "-vv"]).verbose == 2
    assert parser.parse_args(["-v", "consistency", "--run", "r"]).verbose == 1


def test_query_on_a_missing_run_dir(capsys, tmp_path):
    rc = main(["query", str(tmp_path / "nope"), "select 1"])
    _, err = capsys.readouterr()
    assert rc == 2
    one_line_error(err, "does not exist")
    assert not (tmp_path / "nope").exists()


@pytest.mark.skipif(not NO_CUDA, reason="a CUDA device is present")
def test_cuda_without_cuda(capsys):
    # the device is resolved before any weights are read
    rc = main(["-q", "localize", "--device", "cuda", "--prompt", PROMPT, "--answer", "Portuguese"])
    _, err = capsys.readouterr()
    assert rc == 2
    one_line_error(err, "CUDA was requested")


def test_unknown_device_string_is_a_one_line_error(capsys):
    """``--device foo``: torch.device raises RuntimeError; the user sees one line."""
    rc = main(["-q", "localize", "--device", "foo", "--prompt", PROMPT, "--answer", "P"])
    _, err = capsys.readouterr()
    assert rc == 2
    one_line_error(err, "device")


@pytest.mark.parametrize("k", ["2.5", "-0.5"])
def test_topk_selection_needs_an_integer_k(k, capsys, no_model_load):
    """``--selection topk --threshold 2.5`` must not silently become k = 2 (nor -0.5 -> 0):
    Selection.validate rejects a non-integer or negative k, the CLI truncates it first."""
    rc = main(["-q", "localize", "--selection", "topk", "--threshold", k, "--prompt", "x",
               "--answer", "y"])
    _, err = capsys.readouterr()
    assert rc == 2
    one_line_error(err, "integer")


def test_argparse_rejects_bad_dtype_and_unknown_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["localize", "--dtype", "float64", "--prompt", "x", "--answer", "y"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_models_command_lists_models(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "gemma3-270m" in out and "smollm2-135m" in out
    assert re.search(r"supported model types: .*gpt2.*llama", out)


def test_subprocess_exit_codes(tmp_path):
    """The real entry point: non-zero exit, one line on stderr, no traceback, fast."""
    t = time.time()
    p = run_cli("localize", "--n-steps", "1", "--prompt", "x", "--answer", "y", timeout=120)
    assert p.returncode == 2, p.stderr
    one_line_error(p.stderr, "n_steps must be an integer >= 2")
    assert p.stdout == ""
    p = run_cli("query", str(tmp_path / "missing"), "select 1", timeout=120)
    assert p.returncode == 2
    one_line_error(p.stderr, "does not exist")
    if NO_CUDA:
        p = run_cli("localize", "--device", "cuda", "--prompt", PROMPT, "--answer", "Portuguese",
                    timeout=120)
        assert p.returncode == 2
        one_line_error(p.stderr, "CUDA")
    p = run_cli("localize", "--method", "nope", "--prompt", "x", "--answer", "y", timeout=120)
    assert p.returncode == 2
    one_line_error(p.stderr, "unknown attribution method")
    # none of these loaded a model (a Gemma load alone takes several seconds)
    assert time.time() - t < 90


# ------------------------------------------------------------- slow: real Gemma
@pytest.mark.slow
def test_localize_one_prompt(capsys, cached_gemma):
    rc = main(["-q", "localize", "--prompt", PROMPT, "--answer", "Portuguese", "--method", "ig",
               "--n-steps", "4", "--top", "5"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert cached_gemma == ["gemma3-270m"]
    m = re.search(r"P\(answer\) = ([0-9.]+)\s+top-1 = ' Portuguese' \(correct\)", out)
    assert m, out
    assert float(m.group(1)) == pytest.approx(0.886, abs=0.02)
    assert "-> ' Portuguese'" in out
    n = int(re.search(r"knowledge neurons \(relative threshold 0.2\): (\d+)", out).group(1))
    assert n >= 1
    assert re.search(r"layer\s+neuron\s+attribution\s+activation", out)
    rows = re.findall(r"^\s+(\d+)\s+(\d+)\s+(\S+)\s+(\S+)$", out, flags=re.MULTILINE)
    assert len(rows) == min(n, 5)
    layers = [int(r[0]) for r in rows]
    assert all(0 <= l < 18 for l in layers)
    attrs = [float(r[2]) for r in rows]
    assert attrs == sorted(attrs, reverse=True) and attrs[0] > 0
    if n > 5:
        assert f"... {n - 5} more" in out


DATASET_ARGS = ["--dataset", "builtin", "--relations", "P37", "--method", "ig", "--n-steps", "4",
                "--max-queries-per-fact", "2"]


def expected_query_ids(n_facts: int) -> set[str]:
    from knowloc.data import load_facts

    fs = load_facts("builtin", relations=["P37"], facts_per_relation=n_facts,
                    max_queries_per_fact=2)
    return {q.query_id for q in fs.queries()}


@pytest.mark.slow
def test_localize_dataset_and_rerun(capsys, tmp_path, cached_gemma):
    run = tmp_path / "run"
    argv = ["-q", "localize", *DATASET_ARGS, "--facts-per-relation", "2", "--out", str(run)]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "localized 4 queries (0 already done)" in out, out
    for name in ("config.yaml", "env.json", "queries.parquet", "neuron_sets.parquet"):
        assert (run / name).is_file(), name
    json.loads((run / "env.json").read_text())
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["dataset"]["n_queries"] == 4 and cfg["fingerprint"]["n_steps"] == 4
    q = pd.read_parquet(run / "queries.parquet")
    assert len(q) == 4 and set(q.query_id) == expected_query_ids(2)
    assert set(q.method) == {"ig"}
    assert q.query_id.is_unique
    assert q.prob.between(0, 1).all()
    brazil = q.set_index("query_id").loc["builtin:P37:0#0"]
    assert brazil.prob == pytest.approx(0.886, abs=0.02) and bool(brazil.known)
    ns = pd.read_parquet(run / "neuron_sets.parquet")
    assert {"method", "query_id", "layer", "neuron", "attribution", "rank"} <= set(ns.columns)
    counts = ns.groupby("query_id").size()
    assert (counts == q.set_index("query_id").n_neurons[counts.index]).all()
    assert not ns.duplicated(["method", "query_id", "layer", "neuron"]).any()

    # rerun: nothing is computed again
    before = sorted(p.name for p in (run / "parts" / "queries").iterdir())
    assert main(argv) == 0
    out, _ = capsys.readouterr()
    assert "localized 0 queries (4 already done)" in out, out
    assert sorted(p.name for p in (run / "parts" / "queries").iterdir()) == before
    assert pd.read_parquet(run / "queries.parquet").equals(q)

    # the run can be queried with SQL
    assert main(["query", str(run), "select count(*) as n_rows from queries"]) == 0
    out, _ = capsys.readouterr()
    assert re.search(r"n_rows\s+4", out), out

    # another configuration into the same run directory is refused (one line, no traceback)
    rc = main(["-q", "localize", *DATASET_ARGS[:-4], "--n-steps", "5",
               "--max-queries-per-fact", "2", "--facts-per-relation", "2", "--out", str(run)])
    _, err = capsys.readouterr()
    assert rc != 0
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("knowloc: error:")


@pytest.mark.slow
def test_killed_run_resumes_without_duplicates(tmp_path, cached_gemma, capsys):
    """SIGKILL a dataset run after its first finished query, rerun, check the tables."""
    run = tmp_path / "run"
    argv = ["-q", "localize", *DATASET_ARGS, "--facts-per-relation", "3", "--out", str(run)]
    parts = run / "parts" / "queries"
    proc = subprocess.Popen([sys.executable, "-m", "knowloc.cli", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if parts.is_dir() and any(p.suffix == ".parquet" for p in parts.iterdir()):
                break
            time.sleep(0.05)
        alive = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert alive, f"the run ended before it could be killed: rc={proc.returncode} {err}"
    assert proc.returncode == -signal.SIGKILL
    n_done = len([p for p in parts.iterdir() if p.suffix == ".parquet"])
    assert 1 <= n_done < 6
    assert not (run / "queries.parquet").exists()  # nothing looks complete

    # resume (in-process, same Gemma weights) to completion
    assert main(argv) == 0
    out, _ = capsys.readouterr()
    m = re.search(r"localized (\d+) queries \((\d+) already done\)", out)
    assert m, out
    computed, done = int(m.group(1)), int(m.group(2))
    assert done >= n_done and computed + done == 6

    q = pd.read_parquet(run / "queries.parquet")
    assert len(q) == 6
    assert not q.duplicated(["method", "query_id"]).any()
    assert set(q.query_id) == expected_query_ids(3)
    assert set(q.method) == {"ig"}
    assert len(list(parts.glob("*.parquet"))) == 6
    ns = pd.read_parquet(run / "neuron_sets.parquet")
    assert not ns.duplicated(["method", "query_id", "rank"]).any()
    assert set(ns.query_id) <= expected_query_ids(3)
    counts = ns.groupby("query_id").size()
    assert (counts == q.set_index("query_id").n_neurons[counts.index]).all()
