"""``knowloc compare``: the Table 1 of several runs, one block of rows per model; each block is
the run's own ``table1.csv``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import cli_error

from knowloc.cli import main
from knowloc.errors import RunError
from knowloc.study.compare import compare


@pytest.fixture()
def two_runs(localized, tmp_path) -> tuple[Path, Path]:
    """Two runs of the tiny model: every fact with the static threshold 0.1, and the known
    facts with 0.2."""
    a, b = tmp_path / "run_a", tmp_path / "run_b"
    shutil.copytree(localized, a)
    shutil.copytree(localized, b)
    assert main(["-q", "consistency", "--run", str(a), "--population", "all"]) == 0
    assert main(["-q", "consistency", "--run", str(b), "--population", "all",
                 "--static-threshold", "0.2"]) == 0
    return a, b


@pytest.fixture()
def gpt2_run(tmp_path, facts_file) -> Path:
    """A run of another architecture (a tiny GPT-2), one relation, IG only."""
    from tiny import tiny_model

    model_dir = tmp_path / "tiny-gpt2"
    m = tiny_model("gpt2")
    m.hf.save_pretrained(model_dir)
    m.tokenizer.save_pretrained(model_dir)
    run = tmp_path / "gpt2"
    assert main(["-q", "localize", "--model", str(model_dir), "--dataset", f"jsonl:{facts_file}",
                 "--relations", "P1376", "--method", "ig,amig", "--n-steps", "3",
                 "--out", str(run)]) == 0
    assert main(["-q", "consistency", "--run", str(run), "--population", "all"]) == 0
    return run


def test_blocks_are_each_runs_table1(two_runs, gpt2_run, tmp_path, capsys):
    a, b = two_runs
    out = tmp_path / "cmp"
    capsys.readouterr()
    assert main(["-q", "compare", str(a), str(b), str(gpt2_run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    table = pd.read_csv(out / "compare.csv")
    assert list(table.columns[:2]) == ["model", "run"]
    # one block per run, in the order given, each the run's own table1.csv
    assert list(dict.fromkeys(table["run"])) == [str(a.resolve()), str(b.resolve()),
                                                 str(gpt2_run.resolve())]
    for run in (a, b, gpt2_run):
        block = table[table["run"] == str(run.resolve())].drop(columns=["model", "run"])
        own = pd.read_csv(run / "table1.csv")
        pd.testing.assert_frame_equal(block.reset_index(drop=True), own)
    # the same model twice is told apart by its run; another model by its name
    labels = list(dict.fromkeys(table["model"]))
    assert len(set(labels)) == 3
    assert labels[0].endswith("(run_a)") and labels[1].endswith("(run_b)")
    assert "tiny-gpt2" in labels[2] and "(" not in labels[2]
    md = (out / "compare.md").read_text(encoding="utf-8")
    assert md in printed
    lines = md.strip().splitlines()
    assert lines[0].startswith("| model | T | method |")
    assert len(lines) == 2 + len(table)
    assert sum(label in md for label in labels) == 3  # each model named once, on its block
    assert all(md.count(label) == 1 for label in labels)
    assert "[" in md  # shares and means with their intervals
    for suffix in (".png", ".pdf", ".svg"):
        assert (out / f"compare{suffix}").stat().st_size > 0


def test_python_api(two_runs):
    a, b = two_runs
    cmp = compare([a, b])
    assert cmp.runs == [a.resolve(), b.resolve()]
    st = cmp.table[cmp.table["T"] == "St"]
    assert sorted(set(st["threshold"])) == [0.1, 0.2]


def test_refusals_are_one_line(localized, run, tmp_path, capsys):
    line = cli_error(capsys, ["compare", str(run), str(localized), "--out",
                              str(tmp_path / "c")])
    assert "no consistency results" in line and "knowloc consistency" in line
    line = cli_error(capsys, ["compare", str(tmp_path / "nowhere"), "--out",
                              str(tmp_path / "c")])
    assert "does not exist" in line
    with pytest.raises(Exception, match="given twice"):
        compare([run, run])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RunError, match="not a knowloc run directory"):
        compare([empty])


PAPER = Path(__file__).resolve().parents[3] / "shared" / "paper" / \
    "knowledge-localization-paper.txt"


def _paper_text_rows() -> dict[tuple[str, str], list[float]]:
    """(model, T) -> the 15 numbers of that row of the paper's Table 1, read from the
    paper's text (model headers ``T\\tGPT-2``, rows ``St\\t0.56\\t...``)."""
    rows: dict[tuple[str, str], list[float]] = {}
    model = None
    for line in PAPER.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.split("\t") if c.strip()]
        if len(cells) == 2 and cells[0] == "T":
            model = cells[1]
        elif model and cells and cells[0] in ("St", "Ot") and len(cells) == 16:
            rows[(model, cells[0])] = [float(c) for c in cells[1:]]
    return rows


@pytest.mark.skipif(not PAPER.exists(), reason="the paper's text is not beside the project")
def test_paper_rows_are_the_papers_table1():
    from knowloc.study.compare import paper_table1

    text = _paper_text_rows()
    assert len(text) == 6
    table = paper_table1()
    for (model, kind), nums in text.items():
        block = table[(table["model"] == f"{model} (paper)") & (table["T"] == kind)]
        got = block.set_index("method")
        ig, sig, amig = nums[0:5], nums[5:10], nums[10:15]
        for method, vals in (("ig", ig), ("sig", sig)):
            assert list(got.loc[method, ["R_I", "S_I", "R_II", "S_II", "t"]]) == vals
        # AMIG's last column is ∩: II, not t
        assert list(got.loc["amig", ["R_I", "S_I", "R_II", "S_II"]]) == amig[:4]
        assert set(block["cap_II"]) == {amig[4]}


def test_paper_blocks_come_first(two_runs, tmp_path, capsys):
    a, _ = two_runs
    out = tmp_path / "cmp"
    assert main(["-q", "compare", str(a), "--paper", "--out", str(out)]) == 0
    table = pd.read_csv(out / "compare.csv")
    assert list(dict.fromkeys(table["run"])) == ["paper", str(a.resolve())]
    assert list(dict.fromkeys(table["model"]))[:3] == [
        "GPT-2 (paper)", "LLaMA2-7b (paper)", "LLaMA3-8b (paper)"]
    md = (out / "compare.md").read_text(encoding="utf-8").splitlines()
    gpt2_st_ig = md[2]
    assert gpt2_st_ig.startswith("| GPT-2 (paper) | St | IG |")
    assert "| 0.56 |" in gpt2_st_ig and "| 236.0 |" in gpt2_st_ig and "–" in gpt2_st_ig
    # the run's own block is unchanged by the paper's rows
    block = table[table["run"] == str(a.resolve())].drop(columns=["model", "run"])
    pd.testing.assert_frame_equal(block.reset_index(drop=True), pd.read_csv(a / "table1.csv"),
                                  check_dtype=False)
