"""Tests of the self-contained HTML report."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib
import pandas as pd
import pytest

from knowloc.report import Section, build_report, format_number, report_manifest, slugify

matplotlib.use("Agg")


def make_figure(tmp: Path) -> tuple[Path, Path]:
    import matplotlib.pyplot as plt

    data = pd.DataFrame({"threshold": [0.1, 0.2, 0.3], "cs": [0.5, 0.42, 0.31]})
    csv = tmp / "figures" / "fig3_cs.csv"
    csv.parent.mkdir(parents=True, exist_ok=True)
    data.to_csv(csv, index=False)
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot(data["threshold"], data["cs"], marker="o")
    ax.set_xlabel("threshold")
    ax.set_ylabel("CS")
    png = tmp / "figures" / "fig3_cs.png"
    fig.savefig(png, dpi=60)
    plt.close(fig)
    return png, csv


@pytest.fixture()
def report(tmp_path: Path) -> tuple[Path, dict]:
    png, fig_csv = make_figure(tmp_path)
    table = pd.DataFrame({
        "model": ["gpt2", "llama"],
        "CS1": [0.123456789, 1.5e-5],
        "n_facts": [1200, 35000],
        "note": ["ok", None],
    })
    tab_csv = tmp_path / "tables" / "table1.csv"
    tab_csv.parent.mkdir()
    table.to_csv(tab_csv, index=False)
    sections = [
        Section("Table 1: consistency (CS)", html="<p>Consistency <em>scores</em>.</p>",
                tables=[("Table 1", table, tab_csv)]),
        Section("Figure 3 & friends", figures=[("Figure 3: CS vs threshold", png, fig_csv)],
                tables=[("No CSV table", table.head(1), None)]),
    ]
    run_info = {
        "model": "gpt2",
        "dataset sizes": {"P101": 300, "P19": 120},
        "skipped": [{"fact": "P19/7", "reason": "answer tokenizes to nothing"}],
        "timings_s": {"attribution": 12.5},
        "config": {"fingerprint": {"model": "gpt2", "n_steps": 20}},
    }
    out = build_report(tmp_path / "report.html", title="knowloc <run>", sections=sections,
                       run_info=run_info)
    return out, report_manifest(out)


def test_report_promises_are_present(report: tuple[Path, dict]) -> None:
    path, man = report
    assert path.name == "report.html" and path.exists()
    assert man["title"] == "knowloc <run>"
    assert man["sections"] == ["table-1-consistency-cs", "figure-3-friends"]
    assert man["figures"] == ["Figure 3: CS vs threshold"]
    assert man["missing_figures"] == []
    assert man["tables"] == ["Table 1", "No CSV table"]
    assert man["has_run_info"]
    assert man["embedded_images"] == 1


def test_report_image_embedded_and_links_resolve(report: tuple[Path, dict]) -> None:
    path, man = report
    text = path.read_text(encoding="utf-8")
    m = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert m, "figure not embedded as base64 PNG"
    assert base64.b64decode(m.group(1)).startswith(b"\x89PNG")
    assert sorted(man["csv_links"]) == ["figures/fig3_cs.csv", "tables/table1.csv"]
    for href in man["csv_links"]:
        assert not href.startswith("/")
        assert (path.parent / href).is_file()
    assert man["figure_records"][0]["csv"] == "figures/fig3_cs.csv"
    assert man["table_records"][0]["csv"] == "tables/table1.csv"


def test_report_is_self_contained(report: tuple[Path, dict]) -> None:
    path, man = report
    text = path.read_text(encoding="utf-8")
    assert man["external_refs"] == []
    assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:)?//', text, re.IGNORECASE)
    assert "@import" not in text and "<script" not in text.lower()


def test_report_content(report: tuple[Path, dict]) -> None:
    path, _ = report
    text = path.read_text(encoding="utf-8")
    assert "0.1235" in text and "1.500e-05" in text and ">35000<" in text
    assert "answer tokenizes to nothing" in text  # skipped items with reasons
    assert "n_steps: 20" in text  # config as YAML
    assert 'href="#table-1-consistency-cs"' in text  # table of contents
    assert "<em>scores</em>" in text  # section html is kept
    assert "knowloc &lt;run&gt;" in text  # titles are escaped


def test_missing_figure_is_reported_not_hidden(tmp_path: Path) -> None:
    sec = Section("S", figures=[("Ghost", tmp_path / "nope.png", tmp_path / "nope.csv")])
    out = build_report(tmp_path, title="t", sections=[sec], run_info={})
    man = report_manifest(out)
    assert out == tmp_path / "report.html"
    assert man["figures"] == [] and man["missing_figures"] == ["Ghost"]
    assert man["csv_links"] == []


def test_duplicate_titles_get_unique_ids(tmp_path: Path) -> None:
    out = build_report(tmp_path / "r.html", title="t",
                       sections=[Section("Results"), Section("Results")], run_info={})
    assert report_manifest(out)["sections"] == ["results", "results-2"]


def test_helpers() -> None:
    assert slugify("Table 1: CS (GPT-2)") == "table-1-cs-gpt-2"
    assert format_number(3) == "3"
    assert format_number(0.123456) == "0.1235"
    assert format_number(2e-7) == "2.000e-07"
    assert format_number(float("nan")) == "–"


def test_screenshot(report: tuple[Path, dict], tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium not installed")
    path, _ = report
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox",
                    f"--screenshot={shot}", "--window-size=1200,1600", path.as_uri()],
                   check=True, capture_output=True, timeout=60)
    assert shot.exists() and shot.stat().st_size > 0
