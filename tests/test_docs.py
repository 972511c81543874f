"""The user documentation against the code: docs/run-directory.md lists every table of a run
directory and its columns; a real run (tiny model, every stage) must have exactly those."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RUN_DOC = DOCS / "run-directory.md"

_SECTION = re.compile(r"^### `([^`]+)`\s*$", re.MULTILINE)
_ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|", re.MULTILINE)


def documented_columns(text: str) -> dict[str, list[str]]:
    """``### `name` `` section -> the columns its table lists (first cell in backticks)."""
    heads = list(_SECTION.finditer(text))
    out: dict[str, list[str]] = {}
    for i, head in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        body = text[head.end():end].split("\n## ", 1)[0]  # a section ends at the next heading
        out[head.group(1)] = _ROW.findall(body)
    return out


def test_the_parser_reads_sections_and_their_columns() -> None:
    text = ("### `t`\n\n| column | meaning |\n|---|---|\n| `a` | x |\n| `b` | y `z` |\n\n"
            "## Next\n\n| `not` | a column |\n### `f/x_<m>.csv`\n| `c` | 1 |\n")
    assert documented_columns(text) == {"t": ["a", "b"], "f/x_<m>.csv": ["c"]}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path, facts_file: Path) -> Path:
    """A tiny run with every stage: localization (with the full maps), consistency,
    modification, mapping, attention and heatmaps."""
    from knowloc.cli import main

    run = tmp_path_factory.mktemp("docs") / "run"
    assert main(["-q", "reproduce", "--model", str(tiny_dir), "--dataset", f"jsonl:{facts_file}",
                 "--method", "ig,amig", "--n-steps", "3", "--population", "all", "--keep-maps",
                 "--out", str(run)]) == 0
    return run


def _pattern(name: str) -> str:
    return re.sub(r"<[^>]+>", "*", name)


def test_run_directory_doc_lists_every_table_and_column(full_run: Path) -> None:
    from knowloc.store import RunStore

    doc = documented_columns(RUN_DOC.read_text(encoding="utf-8"))
    tables = {name: cols for name, cols in doc.items() if "." not in name}
    files = {name: cols for name, cols in doc.items() if "." in name}
    for name, cols in doc.items():
        assert cols, f"docs/run-directory.md: section {name!r} lists no columns"
        assert len(cols) == len(set(cols)), f"{name}: a column is listed twice"

    store = RunStore(full_run, create=False)
    assert set(store.tables()) == set(tables), "tables of a run vs the documented ones"
    problems = []
    for name, cols in tables.items():
        real = list(store.query(f"select * from {name} limit 0").columns)
        if set(real) != set(cols):
            problems.append(f"{name}: undocumented {sorted(set(real) - set(cols))}, "
                            f"documented but absent {sorted(set(cols) - set(real))}")
    # every CSV the run wrote is documented, and every documented CSV was written
    written = sorted(p.relative_to(full_run).as_posix() for p in full_run.rglob("*.csv"))
    for path in written:
        if not any(fnmatch.fnmatchcase(path, _pattern(name)) for name in files):
            problems.append(f"{path}: written but not documented")
    for name, cols in files.items():
        matching = [p for p in written if fnmatch.fnmatchcase(p, _pattern(name))]
        if not matching:
            problems.append(f"{name}: documented but not written")
        for path in matching:
            real = list(pd.read_csv(full_run / path, nrows=0).columns)
            if set(real) != set(cols):
                problems.append(f"{path}: undocumented {sorted(set(real) - set(cols))}, "
                                f"documented but absent {sorted(set(cols) - set(real))}")
    assert not problems, "docs/run-directory.md is out of date:\n" + "\n".join(problems)


def test_run_directory_doc_names_every_file_of_a_run(full_run: Path) -> None:
    text = RUN_DOC.read_text(encoding="utf-8")
    for path in sorted(full_run.iterdir()):
        if path.is_file() and path.suffix not in (".parquet", ".csv"):
            assert f"`{path.name}`" in text or path.name in text, path.name
    # every figure is written in the three formats the page names
    pngs = sorted((full_run / "figures").glob("*.png"))
    assert pngs and "PNG, PDF and SVG" in text
    for png in pngs:
        for suffix in (".pdf", ".svg", ".csv"):
            assert png.with_suffix(suffix).is_file(), png.with_suffix(suffix).name


def test_config_doc_lists_every_section_and_key(full_run: Path) -> None:
    """docs/config.md against the config.yaml a run with every stage writes, both ways."""
    import yaml

    doc = documented_columns((DOCS / "config.md").read_text(encoding="utf-8"))
    config = yaml.safe_load((full_run / "config.yaml").read_text(encoding="utf-8"))
    assert list(doc) == list(config), "sections of config.yaml vs docs/config.md"
    problems = []
    for section, value in config.items():
        real = list(value) if isinstance(value, dict) else [section]
        if set(real) != set(doc[section]):
            problems.append(f"{section}: undocumented {sorted(set(real) - set(doc[section]))}, "
                            f"documented but absent {sorted(set(doc[section]) - set(real))}")
    assert not problems, "docs/config.md is out of date:\n" + "\n".join(problems)


def test_docs_links_resolve() -> None:
    """Every relative link of README.md and docs/*.md points at a file that exists."""
    pages = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken
