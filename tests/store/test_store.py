"""Tests of the run directory: atomic, resumable, deterministic, queryable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from knowloc.errors import RunError
from knowloc.store import RunStore, content_hash, environment_info

SRC = Path(__file__).resolve().parents[2] / "src"


def unit_frame(i: int) -> pd.DataFrame:
    """Content of unit i: i % 4 rows (so some units are empty), values derived from i."""
    n = i % 4
    return pd.DataFrame(
        {
            "layer": pd.Series([i] * n, dtype="int64"),
            "neuron": pd.Series(range(n), dtype="int64"),
            "score": pd.Series([i * 0.5 + j for j in range(n)], dtype="float64"),
            "name": pd.Series([f"u{i}"] * n, dtype=object),
        }
    )


# --------------------------------------------------------------------------- hashing


def test_content_hash_is_stable_and_exact() -> None:
    a = {"model": "gpt2", "method": {"n_steps": 20, "baseline": "zero", "t": 0.2}}
    b = {"method": {"t": 0.2, "baseline": "zero", "n_steps": 20}, "model": "gpt2"}
    assert content_hash(a) == content_hash(b)
    assert len(content_hash(a)) == 16
    assert content_hash({"x": (1, 2)}) == content_hash({"x": [1, 2]})
    assert content_hash({"t": 0.2}) != content_hash({"t": 0.2000000000000001})
    assert content_hash({"t": 1}) != content_hash({"t": 1.0})
    assert content_hash({"p": Path("a/b")}) == content_hash({"p": "a/b"})
    # Pinned value: the hash must not change between processes, platforms or releases.
    # sha256 of the canonical JSON '{"a":1,"b":[0.1,"x"]}'.
    assert content_hash({"b": [0.1, "x"], "a": 1}) == "f70a6722f07a5c22"


def test_environment_info_has_versions() -> None:
    env = environment_info({"seed": 3}, probe_devices=False)
    for key in ("python", "platform", "hostname", "time", "packages", "cpu", "cuda"):
        assert key in env
    assert env["seed"] == 3
    assert env["packages"]["pandas"] == pd.__version__


# --------------------------------------------------------------------------- units


def test_put_done_keys_table_roundtrip(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "run")
    assert store.done_keys("attributions") == set()
    assert store.table("attributions").empty
    for i in (3, 1, 2):
        store.put("attributions", f"k{i}", unit_frame(i))
    assert store.done_keys("attributions") == {"k1", "k2", "k3"}
    df = store.table("attributions")
    expected = pd.concat([unit_frame(1), unit_frame(2), unit_frame(3)], ignore_index=True)
    pd.testing.assert_frame_equal(df, expected, check_dtype=False)
    assert df["layer"].dtype == "int64"
    pd.testing.assert_frame_equal(store.get("attributions", "k2"), unit_frame(2),
                                  check_dtype=False)
    keyed = store.table("attributions", with_key=True)
    assert list(keyed["_key"]) == ["k1", "k2", "k2", "k3", "k3", "k3"]


def test_rewriting_a_key_does_not_duplicate(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.put("t", "a", unit_frame(3))
    store.put("t", "a", unit_frame(2))
    store.put("t", "a", unit_frame(2))
    assert store.done_keys("t") == {"a"}
    assert len(store.table("t")) == 2
    assert len(store.query("SELECT * FROM t")) == 2


def test_leftover_tmp_file_is_ignored(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.put("t", "a", unit_frame(1))
    tdir = tmp_path / "parts" / "t"
    (tdir / ".b.parquet.123.abcd.tmp").write_bytes(b"PAR1 half written")
    (tdir / "c.parquet.tmp").write_bytes(b"garbage")
    assert store.done_keys("t") == {"a"}
    assert len(store.table("t")) == 1
    assert store.query("SELECT count(*) AS n FROM t")["n"].iloc[0] == 1


def test_crash_mid_write_leaves_key_undone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = RunStore(tmp_path)
    store.put("t", "a", unit_frame(1))

    def crash(src: object, dst: object) -> None:
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        store.put("t", "b", unit_frame(2))
    with pytest.raises(OSError, match="simulated"):
        store.put("t", "a", unit_frame(3))  # a rewrite that crashes keeps the old unit
    monkeypatch.undo()
    assert store.done_keys("t") == {"a"}
    pd.testing.assert_frame_equal(store.table("t"), unit_frame(1), check_dtype=False)
    assert not [p for p in (tmp_path / "parts" / "t").iterdir() if p.name.endswith(".tmp")]
    store.put("t", "b", unit_frame(2))
    assert store.done_keys("t") == {"a", "b"}


def test_empty_unit_counts_as_done(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.put("neurons", "zero_rows", unit_frame(0))  # schema, no rows
    store.put("neurons", "no_columns", pd.DataFrame())  # not even columns
    assert store.done_keys("neurons") == {"zero_rows", "no_columns"}
    # Restart-safe: a fresh store over the same directory sees the same.
    again = RunStore(tmp_path, create=False)
    assert again.done_keys("neurons") == {"zero_rows", "no_columns"}
    assert again.has("neurons", "no_columns")
    df = again.table("neurons")
    assert len(df) == 0 and list(df.columns) == ["layer", "neuron", "score", "name"]
    assert again.query("SELECT count(*) AS n FROM neurons")["n"].iloc[0] == 0
    # An empty unit later rewritten with data is one unit, with the data.
    again.put("neurons", "no_columns", unit_frame(1))
    assert again.done_keys("neurons") == {"zero_rows", "no_columns"}
    assert len(again.table("neurons")) == 1


def test_invalid_names_rejected(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    with pytest.raises(ValueError):
        store.put("t", "../escape", unit_frame(1))
    with pytest.raises(ValueError):
        store.put("bad-name; drop", "a", unit_frame(1))


# ------------------------------------------------------------------- consolidate / SQL


def test_consolidate_is_byte_identical(tmp_path: Path) -> None:
    s1, s2 = RunStore(tmp_path / "one"), RunStore(tmp_path / "two")
    for i in range(8):
        s1.put("t", f"k{i}", unit_frame(i))
    for i in reversed(range(8)):  # other write order, other mtimes
        s2.put("t", f"k{i}", unit_frame(i))
    p1 = s1.consolidate("t", sort_by=["layer", "neuron"])
    b1 = p1.read_bytes()
    time.sleep(1.1)
    assert s1.consolidate("t", sort_by=["layer", "neuron"]).read_bytes() == b1
    assert s2.consolidate("t", sort_by=["layer", "neuron"]).read_bytes() == b1
    assert p1 == tmp_path / "one" / "t.parquet"
    back = pd.read_parquet(p1)
    assert len(back) == sum(i % 4 for i in range(8))
    assert list(back.columns) == ["layer", "neuron", "score", "name"]


def test_query_counts(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    for i in range(10):
        store.put("attributions", f"k{i:02d}", unit_frame(i))
    store.put("metrics", "m", pd.DataFrame({"metric": ["rel", "gen"], "value": [0.9, 0.5]}))
    n_rows = sum(i % 4 for i in range(10))
    got = store.query("SELECT count(*) AS n, count(DISTINCT layer) AS units FROM attributions")
    assert int(got["n"].iloc[0]) == n_rows
    assert int(got["units"].iloc[0]) == sum(1 for i in range(10) if i % 4)
    per = store.query("SELECT layer, count(*) AS n FROM attributions GROUP BY layer ORDER BY layer")
    assert dict(zip(per["layer"], per["n"], strict=True)) == {i: i % 4 for i in range(10) if i % 4}
    assert store.query("SELECT value FROM metrics WHERE metric='rel'")["value"].iloc[0] == 0.9
    with pytest.raises(RunError, match="attributions"):
        store.query("SELECT * FROM no_such_table")


def test_query_consolidated_only(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.put("t", "a", unit_frame(3))
    store.consolidate("t")
    import shutil

    shutil.rmtree(tmp_path / "parts")
    assert int(store.query("SELECT count(*) AS n FROM t")["n"].iloc[0]) == 3
    assert len(store.table("t")) == 3


# --------------------------------------------------------------------- config / env


def test_config_fingerprint_mismatch(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    cfg = {"fingerprint": {"model": "gpt2", "n_steps": 20, "methods": ("ig", "amig")},
           "device": "cpu"}
    store.write_config(cfg)
    # Same fingerprint, other non-fingerprint settings: fine (resume on another device).
    store.write_config({**cfg, "device": "cuda"})
    assert store.read_config()["device"] == "cuda"
    assert store.read_config()["fingerprint"]["methods"] == ["ig", "amig"]
    bad = {**cfg, "fingerprint": {**cfg["fingerprint"], "n_steps": 50}}
    with pytest.raises(RunError, match=r"--out.*--overwrite"):
        store.write_config(bad)
    assert store.read_config()["fingerprint"]["n_steps"] == 20
    store.write_config(bad, overwrite=True)
    assert store.read_config()["fingerprint"]["n_steps"] == 50


def test_missing_run_dir_and_config(tmp_path: Path) -> None:
    with pytest.raises(RunError):
        RunStore(tmp_path / "nope", create=False)
    with pytest.raises(RunError, match="config.yaml"):
        RunStore(tmp_path).read_config()


def test_env_history_appends(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.write_env(environment_info({"seed": 1}, probe_devices=False))
    store.write_env(environment_info({"seed": 2}, probe_devices=False))
    runs = store.read_env()["runs"]
    assert [r["seed"] for r in runs] == [1, 2]


# ----------------------------------------------------------------- real SIGKILL


WORKER = textwrap.dedent(
    """
    import sys, time
    import pandas as pd
    from knowloc.store import RunStore

    root, n, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    store = RunStore(root)
    done = store.done_keys("units")
    computed = 0
    for i in range(n):
        key = f"unit{i:04d}"
        if key in done:
            continue
        k = i % 4
        df = pd.DataFrame({"i": [i] * k, "j": list(range(k)), "v": [i * 0.5 + j for j in range(k)]})
        store.put("units", key, df)
        computed += 1
        time.sleep(delay)
    print("computed", computed, flush=True)
    """
)


def test_sigkill_midway_then_resume(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    root = tmp_path / "run"
    pythonpath = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": pythonpath}
    n = 200
    proc = subprocess.Popen([sys.executable, str(script), str(root), str(n), "0.02"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    store = RunStore(root)
    deadline = time.monotonic() + 60
    try:
        while len(store.done_keys("units")) < 40:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "worker made no progress"
            time.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done_at_kill = store.done_keys("units")
    assert 40 <= len(done_at_kill) < n

    out = subprocess.run([sys.executable, str(script), str(root), str(n), "0"], env=env,
                         capture_output=True, text=True, timeout=120, check=True)
    computed = int(out.stdout.split()[-1])
    assert computed == n - len(done_at_kill)  # nothing done twice

    keys = store.done_keys("units")
    assert keys == {f"unit{i:04d}" for i in range(n)}
    df = store.table("units", with_key=True)
    assert df["_key"].nunique() == sum(1 for i in range(n) if i % 4)
    for i in range(n):
        unit = store.get("units", f"unit{i:04d}")
        k = i % 4
        assert list(unit["i"]) == [i] * k
        assert list(unit["j"]) == list(range(k))
        assert list(unit["v"]) == [i * 0.5 + j for j in range(k)]
    assert len(df) == sum(i % 4 for i in range(n))
    assert int(store.query("SELECT count(DISTINCT i) AS n FROM units")["n"].iloc[0]) == \
        sum(1 for i in range(n) if i % 4)
