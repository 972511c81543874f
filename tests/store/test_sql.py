"""The read-only query sandbox reads exactly the run's files, whatever the run is called."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

from knowloc.errors import RunError
from knowloc.store import RunStore

#: Run names that are glob patterns, each beside a sibling the pattern would match.
GLOB_NAMES = [("r[1]", "r1"), ("a*b", "aXb"), ("q?z", "qqz")]


@pytest.mark.skipif(sys.platform == "win32", reason="'*' and '?' are not allowed in Windows names")
@pytest.mark.parametrize(("name", "sibling"), GLOB_NAMES)
def test_query_reads_a_run_named_like_a_glob(tmp_path: Path, name: str, sibling: str) -> None:
    """Bug report (issue 16): ``knowloc query "runs/r[1]"`` failed when ``runs/r1`` existed,
    because the run's file paths were read as glob patterns."""
    runs = tmp_path / "runs"
    for run_name in (name, sibling):
        store = RunStore(runs / run_name)
        store.put("t", "k", pd.DataFrame({"run": [run_name], "n": [len(run_name)]}))
    ours = RunStore(runs / name, create=False)
    assert ours.query("SELECT run FROM t")["run"].tolist() == [name]
    assert RunStore(runs / sibling).query("SELECT run FROM t")["run"].tolist() == [sibling]
    # the consolidated file alone (no parts) is read literally too
    ours.consolidate("t")
    import shutil

    shutil.rmtree(runs / name / "parts")
    assert ours.query("SELECT run FROM t")["run"].tolist() == [name]


@pytest.mark.skipif(sys.platform == "win32", reason="'*' and '?' are not allowed in Windows names")
def test_query_of_a_glob_named_run_cannot_read_its_sibling(tmp_path: Path) -> None:
    """The sandbox still holds: a query of ``a*b`` cannot read ``aXb`` by a pattern."""
    runs = tmp_path / "runs"
    for run_name in ("a*b", "aXb"):
        RunStore(runs / run_name).put("t", "k", pd.DataFrame({"run": [run_name]}))
    store = RunStore(runs / "a*b")
    for path in (runs / "a*b" / "parts" / "t" / "k.parquet", runs / "aXb" / "parts" / "t" /
                 "k.parquet", runs / "a[*]b" / ".." / "aXb" / "parts" / "t" / "k.parquet"):
        with pytest.raises(RunError, match="query failed"):
            store.query(f"SELECT * FROM read_parquet('{path}')")
