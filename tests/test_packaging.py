"""Tests of the files that ship with the package: license, citation metadata, typing marker."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import SHARED

ROOT = Path(__file__).resolve().parents[1]


def test_citation_cff_is_valid_yaml_with_required_keys() -> None:
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert cff["cff-version"] == "1.2.0"
    for key in ("message", "title"):  # required by CFF 1.2.0, non-empty strings
        assert isinstance(cff[key], str) and cff[key].strip()
    assert "knowloc" in cff["title"]
    assert cff["authors"] and all(
        isinstance(a, dict) and (a.get("name") or a.get("family-names")) for a in cff["authors"]
    )
    paper = cff["preferred-citation"]
    assert paper["title"] == (
        "Knowledge Localization: Mission Not Accomplished? Enter Query Localization!"
    )
    assert [(a["given-names"], a["family-names"]) for a in paper["authors"]] == [
        ("Yuheng", "Chen"),
        ("Pengfei", "Cao"),
        ("Yubo", "Chen"),
        ("Kang", "Liu"),
        ("Jun", "Zhao"),
    ]
    assert paper["year"] == 2025 and "ICLR" in paper["collection-title"]


def test_citation_matches_the_paper_text() -> None:
    # title and author line as printed on the paper's first page
    paper_txt = SHARED / "paper" / "knowledge-localization-paper.txt"
    if not paper_txt.exists():
        pytest.skip(f"the paper's text is not at {paper_txt}")
    head = paper_txt.read_text(encoding="utf-8")[:400]
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert cff["preferred-citation"]["title"] in head
    for a in cff["preferred-citation"]["authors"]:
        assert f"{a['given-names']} {a['family-names']}" in head


def test_license_is_apache_2_0_full_text() -> None:
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert cff["license"] == "Apache-2.0"


def test_py_typed_marker_is_in_the_package() -> None:
    import knowloc

    assert (Path(knowloc.__file__).parent / "py.typed").is_file()
