"""The report as a reader sees it, in a real headless Chromium (skipped only without one)."""

from __future__ import annotations

from pathlib import Path

import pytest
from browser import Browser, find_chromium
from PIL import Image

from knowloc.cli import main

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed")

#: What a reader sees, measured in the page: images (decoded size), tables (body rows),
#: contents links (their targets) and text running past the right edge of the window.
PAGE_FACTS = """(() => {
  const W = document.documentElement.clientWidth;
  const scrolls = el => el.closest('.kl-table-wrap, pre, details:not([open])');
  const overflow = [];
  for (const el of document.querySelectorAll('h1, h2, p, li, figcaption, caption, dt, dd, th, td')) {
    if (scrolls(el)) continue;
    const r = el.getBoundingClientRect();
    if (r.width && r.right > W + 1) overflow.push(el.tagName + ': ' + el.textContent.slice(0, 60));
  }
  return {
    width: W,
    scrollWidth: document.documentElement.scrollWidth,
    images: [...document.images].map(i => ({alt: i.alt, complete: i.complete,
      w: i.naturalWidth, h: i.naturalHeight, shownW: i.getBoundingClientRect().width})),
    tables: [...document.querySelectorAll('table.kl-table')].map(t => ({
      name: t.dataset.name, rows: t.tBodies[0] ? t.tBodies[0].rows.length : 0,
      empty: !!t.querySelector('td.kl-empty')})),
    links: [...document.querySelectorAll('nav.kl-toc a')].map(a => ({
      href: a.getAttribute('href'),
      target: !!document.getElementById(a.getAttribute('href').slice(1))})),
    overflow: overflow,
  };
})()"""


@pytest.fixture(scope="module")
def full_report(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path,
                facts_file: Path) -> Path:
    """``knowloc reproduce`` on the tiny model: every section, table and figure."""
    out = tmp_path_factory.mktemp("browser") / "run"
    assert main(["-q", "reproduce", "--model", str(tiny_dir), "--dataset",
                 f"jsonl:{facts_file}", "--method", "ig,amig", "--n-steps", "3",
                 "--population", "all", "--out", str(out)]) == 0
    return out / "report.html"


@pytest.fixture(scope="module")
def browser() -> Browser:
    assert CHROMIUM is not None
    b = Browser(CHROMIUM)
    yield b
    b.close()


@pytest.mark.parametrize("width", [700, 1400])
def test_report_reads_well_in_chromium(full_report: Path, browser: Browser, width: int,
                                       tmp_path: Path) -> None:
    browser.errors.clear()
    browser.open(full_report.as_uri(), width)
    facts = browser.evaluate(PAGE_FACTS)
    assert facts["width"] <= width
    # every image decodes and is big enough to read
    assert len(facts["images"]) >= 10
    for img in facts["images"]:
        assert img["complete"] and img["w"] >= 300 and img["h"] >= 150, img
        assert img["shownW"] <= facts["width"], img
    # every table has rows (the skipped-facts table may say "(no rows)")
    assert len(facts["tables"]) >= 8
    for t in facts["tables"]:
        assert t["rows"] >= 1, t
        if not t["name"].startswith("Facts skipped"):
            assert not t["empty"], t
    # every contents link has its target
    assert len(facts["links"]) >= 10
    assert all(link["target"] for link in facts["links"]), facts["links"]
    # no horizontal overflow of the page or of its text
    assert facts["scrollWidth"] <= facts["width"], facts["scrollWidth"]
    assert facts["overflow"] == []
    assert browser.errors == []
    shot = browser.screenshot(tmp_path / f"report-{width}.png")
    with Image.open(shot) as im:
        assert width - 20 <= im.width <= width and im.height > 2000  # less a scrollbar


def test_small_report_in_chromium(tmp_path: Path, browser: Browser) -> None:
    """A hand-made report: a broken image shows as not decoded (the check can fail)."""
    from knowloc.report import Section, build_report

    good = tmp_path / "good.png"
    Image.new("RGB", (400, 200), "white").save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    out = build_report(tmp_path / "report.html", title="t", run_info={},
                       sections=[Section("S", figures=[("good", good, None),
                                                       ("bad", bad, None)])])
    browser.errors.clear()
    browser.open(out.as_uri(), 700)
    images = {i["alt"]: i for i in browser.evaluate(PAGE_FACTS)["images"]}
    assert images["good"]["w"] == 400 and images["good"]["h"] == 200
    assert images["bad"]["w"] == 0
