"""tools/results.py: the README's result blocks are written from run directories by the
current code, only between their markers, and --check finds a stale block."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


results = _load("knowloc_results_script", ROOT / "tools" / "results.py")

DOC = """# Title

Text before, kept.

<!-- results:table1-standard -->
old standard
<!-- /results:table1-standard -->

Between.

<!-- results:convergence-standard -->
<!-- /results:convergence-standard -->

<!-- results:table1-quick -->
old quick
<!-- /results:table1-quick -->

<!-- results:table2-quick -->
<!-- /results:table2-quick -->

<!-- results:figure6-quick -->
<!-- /results:figure6-quick -->

<!-- results:quadrature -->
old quadrature
<!-- /results:quadrature -->

After, kept.
"""


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path, facts_file: Path) -> Path:
    """A tiny reproduce with every stage."""
    from knowloc.cli import main

    run = tmp_path_factory.mktemp("results") / "quick"
    assert main(["-q", "reproduce", "--model", str(tiny_dir), "--dataset", f"jsonl:{facts_file}",
                 "--method", "ig,amig", "--n-steps", "3", "--population", "all",
                 "--out", str(run)]) == 0
    return run


@pytest.fixture()
def quad_json(tmp_path: Path) -> Path:
    bench = _load("knowloc_quadrature_bench", ROOT / "benchmarks" / "quadrature.py")
    cells = [{"model": "m", "method": "ig", "query": f"q{i}", "rule": rule, "points": n,
              "seconds": 1.0, "err": err * (1 + i), "jaccard": 0.5, "gap": 0.1}
             for i in range(3)
             for rule, n, err in (("riemann_right", 20, 0.1), ("gausslegendre", 8, 0.05))]
    path = tmp_path / "quad.json"
    path.write_text(json.dumps({"header": "3 queries", "cells": cells,
                                "rows": bench.summarize(cells)}))
    return path


def test_blocks_are_the_runs_tables_and_only_the_blocks_change(quick_run, quad_json, tmp_path):
    from knowloc.study.compare import compare, compare_markdown

    doc = tmp_path / "README.md"
    doc.write_text(DOC, encoding="utf-8")
    other = shutil.copytree(quick_run, tmp_path / "other")  # a second "model"
    argv = ["--quick", str(quick_run), "--standard", str(quick_run), str(other),
            "--quadrature", str(quad_json), "--files", str(doc)]
    assert results.main(argv) == 0
    text = doc.read_text(encoding="utf-8")
    # the text around the blocks is untouched
    for kept in ("# Title\n\nText before, kept.\n", "\nBetween.\n", "\nAfter, kept.\n"):
        assert kept in text
    assert "old standard" not in text and "old quick" not in text
    # Table 1 of the quick run as `knowloc compare` computes it, intervals included
    assert compare_markdown(compare([quick_run]).table) in text
    # the standard block: the paper's rows first, then each run
    standard = text.split("<!-- results:table1-standard -->")[1].split("<!-- /results")[0]
    assert standard.index("GPT-2 (paper)") < standard.index("LLaMA3-8b (paper)") \
        < standard.index("(quick)") < standard.index("(other)")
    assert "preset `none" not in standard and "`quick`:" in standard
    # the completeness gap of each run, as its report summarizes it
    from knowloc.report.convergence import convergence_summary

    conv = text.split("<!-- results:convergence-standard -->")[1].split("<!-- /results")[0]
    queries = pd.read_parquet(quick_run / "queries.parquet")
    summary = convergence_summary(queries).set_index("method")
    assert "| median gap |" in conv and conv.count("| ig |") == 2  # one row per run
    assert f"{100 * summary.loc['ig', 'median_gap']:.1f}%" in conv
    # Table 2 as the run writes it, without its title line
    table2 = (quick_run / "table2.md").read_text(encoding="utf-8")
    rows = [line for line in table2.splitlines() if line.startswith("| N_")]
    assert rows and all(row in text for row in rows)
    assert "# Table 2" not in text
    # Figure 6 as the report shows it (from the figure6.csv rendered again)
    from knowloc.report.tables import figure6_display, markdown_table

    fig6 = markdown_table(figure6_display(pd.read_csv(quick_run / "figure6.csv")))
    assert fig6 in text
    assert "| m | ig | gausslegendre | 8 |" in text  # the quadrature table
    # a second run changes nothing; --check agrees
    assert results.main(argv) == 0
    assert doc.read_text(encoding="utf-8") == text
    assert results.main([*argv, "--check"]) == 0
    # a stale block: --check says so and writes nothing
    doc.write_text(text.replace("GPT-2 (paper)", "GPT-2 (old)", 1), encoding="utf-8")
    assert results.main([*argv, "--check"]) == 1
    assert "GPT-2 (old)" in doc.read_text(encoding="utf-8")


def test_a_table_change_shows_in_the_block(quick_run, tmp_path):
    """The runs are rendered again: a table1.csv edited by hand does not survive, the block
    is what the stored results give."""
    run = shutil.copytree(quick_run, tmp_path / "run")
    doc = tmp_path / "README.md"
    doc.write_text(DOC, encoding="utf-8")
    (run / "table1.md").write_text("stale\n", encoding="utf-8")
    assert results.main(["--quick", str(run), "--files", str(doc)]) == 0
    assert (run / "table1.md").read_text(encoding="utf-8") != "stale\n"


def test_markers(quick_run, tmp_path, capsys):
    """A block without its marker is not written (and said so); an unknown marker -- a
    typo -- is an error, and nothing is written."""
    doc = tmp_path / "README.md"
    doc.write_text("no markers here\n", encoding="utf-8")
    assert results.main(["--quick", str(quick_run), "--files", str(doc)]) == 0
    assert "no <!-- results:table1-quick --> block" in capsys.readouterr().out
    assert doc.read_text(encoding="utf-8") == "no markers here\n"
    typo = "<!-- results:tabel1-quick -->\nx\n<!-- /results:tabel1-quick -->\n"
    doc.write_text(typo, encoding="utf-8")
    with pytest.raises(SystemExit, match="unknown result block.*tabel1-quick"):
        results.main(["--quick", str(quick_run), "--files", str(doc)])
    assert doc.read_text(encoding="utf-8") == typo
