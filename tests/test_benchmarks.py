"""Tests for the benchmark scripts' behaviour on a machine without optional engines."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "attribution.py"


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_attribution", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_absent_optional_engine_has_a_skip_reason(tmp_path: Path) -> None:
    bench = load_bench()
    reason = bench.skip_reason("knowledge-neurons", tmp_path)
    assert reason is not None and "not installed" in reason
    assert f"--target {tmp_path} knowledge-neurons==0.0.2" in reason
    (tmp_path / "knowledge_neurons").mkdir()
    assert bench.skip_reason("knowledge-neurons", tmp_path) is None
    for engine in ("knowloc", "loop", "loop-tuned"):
        assert bench.skip_reason(engine, tmp_path / "nowhere") is None


def test_only_absent_engine_skips_without_a_worker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # no worker starts (that would load a model): the call returns at once, status 0
    bench = load_bench()
    rc = bench.main(
        ["--models", "gpt2-small-random", "--engines", "knowledge-neurons",
         "--kn-site", str(tmp_path), "--repeats", "1", "--json", str(tmp_path / "r.json")]
    )  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "gpt2-small-random: knowledge-neurons skipped (not installed" in out
    assert "not run" not in out
    rec = json.loads((tmp_path / "r.json").read_text())["results"]
    assert [(r["engine"], r["status"]) for r in rec] == [("knowledge-neurons", "skipped")]


def test_benchmark_runs_other_engines_when_one_is_absent(tmp_path: Path) -> None:
    # the script as a user runs it (smallest settings): knowloc timed, knowledge-neurons
    # skipped, exit status 0
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(BENCH.parents[1] / "src"), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--models", "gpt2-small-random",
         "--engines", "knowloc", "knowledge-neurons", "--repeats", "1", "--steps", "2",
         "--kn-site", str(tmp_path / "kn_site")],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    knowloc_row = next(ln for ln in lines if ln.startswith("gpt2-small-random   knowloc"))
    assert float(knowloc_row.split()[2]) > 0  # a measured s/query
    assert any("knowledge-neurons 0.0.2" in ln and "skipped (not installed" in ln for ln in lines)
    assert "gpt2-small-random: knowloc " in proc.stdout
    assert "skipping gpt2-small-random / knowledge-neurons" in proc.stderr


THROUGHPUT = BENCH.parent / "throughput.py"


def test_throughput_runs_without_a_dataset_argument(tiny_dir: Path, tmp_path: Path) -> None:
    """A user's checkout has no ../shared: with no --dataset the benchmark takes knowloc's
    built-in facts (smallest settings, the tiny model, this process only)."""
    import shutil

    checkout = tmp_path / "checkout" / "benchmarks"  # nothing beside it but the scripts
    shutil.copytree(BENCH.parent, checkout, ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(BENCH.parents[1] / "src"), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, str(checkout / "throughput.py"), "--model", str(tiny_dir),
         "--executors", "local", "--queries", "3", "--steps", "2", "--warmup", "0",
         "--device", "none", "--json", str(tmp_path / "tp.json")],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "work: 3 queries of builtin" in proc.stdout
    rec = json.loads((tmp_path / "tp.json").read_text())
    assert rec["dataset"] == "builtin" and rec["queries"] == 3
    from knowloc.data import load_facts

    assert rec["dataset_queries"] == len(load_facts("builtin").queries())
    assert rec["phases"] and all(p["q/s"] > 0 for p in rec["phases"])
    assert "shared" not in proc.stdout + proc.stderr


def test_benchmarks_default_to_nothing_outside_the_repository() -> None:
    # every benchmark's defaults stay inside the checkout
    for script in sorted(BENCH.parent.glob("*.py")):
        text = script.read_text(encoding="utf-8")
        assert "REPO.parent" not in text and '"shared"' not in text, script.name
