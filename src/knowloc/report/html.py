"""A single self-contained HTML report of a run.

:func:`build_report` writes one ``report.html`` that needs nothing else to display:
figures are embedded as base64 ``data:`` images, CSS is inline, no script, no font or
resource is fetched from anywhere. Each figure and table links (relative ``href``) to
the CSV behind it, so the numbers stay one click away.

Stable hooks for tests and tools:

* every section is ``<section class="kl-section" id="<slug of title>">``;
* every figure is ``<figure class="kl-figure" data-csv="<relative csv path>">`` with a
  ``<figcaption>``;
* every table is ``<table class="kl-table" data-name="<caption>">``;
* the run information is ``<section class="kl-run-info" id="run-info">``.

:func:`report_manifest` parses a report back (stdlib ``html.parser``) and lists what is
actually in it, so a test can check that everything promised is present.
"""

from __future__ import annotations

import base64
import html
import logging
import math
import numbers
import os
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from ..store.io import atomic_write_text

__all__ = ["Section", "build_report", "format_number", "report_manifest", "slugify"]

logger = logging.getLogger(__name__)

#: Tables longer than this show their first rows only; the CSV has them all.
MAX_TABLE_ROWS = 200

_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml",
         ".gif": "image/gif", ".webp": "image/webp"}


@dataclass
class Section:
    """One section of the report.

    Attributes:
        title: heading; its slug is the section's ``id``.
        html: trusted HTML body text placed under the heading (not escaped).
        tables: ``(caption, DataFrame, csv path or None)``.
        figures: ``(caption, image path (PNG), csv path behind it or None)``.
    """

    title: str
    html: str = ""
    tables: list[tuple[str, pd.DataFrame, Path | None]] = field(default_factory=list)
    figures: list[tuple[str, Path, Path | None]] = field(default_factory=list)


# --------------------------------------------------------------------------- helpers


def slugify(text: str) -> str:
    """Lower-case ASCII slug: ``"Table 1: CS (GPT-2)"`` -> ``"table-1-cs-gpt-2"``."""
    text = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug or "section"


class _Ids:
    """Hands out unique ids (``x``, ``x-2``, ``x-3`` ...)."""

    def __init__(self, reserved: Iterable[str] = ()) -> None:
        self._used: set[str] = set(reserved)

    def __call__(self, base: str) -> str:
        ident, n = base, 1
        while ident in self._used:
            n += 1
            ident = f"{base}-{n}"
        self._used.add(ident)
        return ident


def format_number(value: Any) -> str:
    """Human precision: ints as is, floats with 4 significant digits, tiny/huge in e-notation."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        x = float(value)
        if math.isnan(x):
            return "–"
        if math.isinf(x):
            return "∞" if x > 0 else "−∞"
        if x == 0:
            return "0"
        ax = abs(x)
        if ax < 1e-3 or ax >= 1e6:
            return f"{x:.3e}"
        if ax >= 1e4:
            return f"{x:,.0f}"
        return f"{x:.4g}"
    return str(value)


def _is_missing(value: Any) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


#: A number already formatted for display: ``0.52``, ``−1.3e-05``, ``0.52 ± 0.10``, ``45%``.
_FORMATTED = re.compile(r"^[−+-]?\d[\d,]*(\.\d+)?(e[−+-]?\d+)?%?( ± \d+(\.\d+)?)?$|^–$")


def _formatted_numbers(column: pd.Series) -> bool:
    """Whether a text column holds numbers formatted for display (right-aligned)."""
    values = [v for v in column if isinstance(v, str)]
    return bool(values) and len(values) == len(column) and all(_FORMATTED.match(v) for v in values) \
        and any(v != "–" for v in values)


def _cell(value: Any, numeric_column: bool) -> tuple[str, bool]:
    """(escaped text, right-align) of one table cell; missing values show as a dash."""
    if _is_missing(value):
        return "–", numeric_column
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return html.escape(format_number(value)), True
    return html.escape(str(value)), numeric_column


def _rel_href(target: Path, base_dir: Path) -> str:
    """Relative, URL-style path from ``base_dir`` to ``target``."""
    rel = os.path.relpath(Path(target).resolve(), base_dir.resolve())
    return "/".join(rel.split(os.sep))


def _csv_link(csv: Path | None, base_dir: Path, what: str) -> tuple[str, str]:
    """(relative href or "", HTML of the link or of a note) for a CSV behind a table/figure."""
    if csv is None:
        return "", ""
    csv = Path(csv)
    if not csv.exists():
        logger.warning("report: CSV %s behind %s does not exist; not linked", csv, what)
        return "", f'<span class="kl-missing">CSV {html.escape(csv.name)} missing</span>'
    href = _rel_href(csv, base_dir)
    return href, f'<a class="kl-csv" href="{html.escape(href)}">CSV: {html.escape(csv.name)}</a>'


def _render_table(caption: str, df: pd.DataFrame, csv: Path | None, base_dir: Path,
                  ident: str) -> str:
    href, link = _csv_link(csv, base_dir, f"table {caption!r}")
    shown = df.head(MAX_TABLE_ROWS)
    index_named = any(n is not None for n in df.index.names)
    if index_named:
        shown = shown.reset_index()
    cols = [str(c) for c in shown.columns]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    numeric_cols = [
        (pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype))
        or _formatted_numbers(shown[col])
        for col, dtype in zip(shown.columns, shown.dtypes, strict=True)
    ]
    rows = []
    for values in shown.itertuples(index=False, name=None):
        cells = []
        for v, is_num in zip(values, numeric_cols, strict=True):
            text, numeric = _cell(v, is_num)
            cells.append(f'<td class="num">{text}</td>' if numeric else f"<td>{text}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    note = ""
    if len(df) > len(shown):
        note = (f'<p class="kl-note">Showing {len(shown)} of {len(df)} rows; '
                "the CSV has all of them.</p>")
    if not len(df):
        rows.append(f'<tr><td colspan="{max(len(cols), 1)}" class="kl-empty">(no rows)</td></tr>')
    cap = f"<caption>{html.escape(caption)} {link}</caption>\n" if caption else ""
    id_attr = f' id="{ident}"' if ident else ""
    return (
        f'<div class="kl-table-wrap"{id_attr}>\n'
        f'<table class="kl-table" data-name="{html.escape(caption)}" '
        f'data-csv="{html.escape(href)}">\n'
        f"{cap}<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody></table>\n"
        f"{note}</div>"
    )


def _render_figure(caption: str, image: Path, csv: Path | None, base_dir: Path,
                   ident: str) -> str:
    image = Path(image)
    href, link = _csv_link(csv, base_dir, f"figure {caption!r}")
    if not image.exists():
        logger.warning("report: image %s of figure %r does not exist", image, caption)
        return (
            f'<figure class="kl-figure" data-missing="true" data-csv="{html.escape(href)}" '
            f'id="{ident}"><p class="kl-missing">Figure image {html.escape(str(image))} '
            f'is missing.</p><figcaption><span class="kl-caption">{html.escape(caption)}</span> '
            f"{link}</figcaption></figure>"
        )
    mime = _MIME.get(image.suffix.lower(), "image/png")
    data = base64.b64encode(image.read_bytes()).decode("ascii")
    return (
        f'<figure class="kl-figure" data-csv="{html.escape(href)}" id="{ident}">\n'
        f'<img src="data:{mime};base64,{data}" alt="{html.escape(caption)}">\n'
        f'<figcaption><span class="kl-caption">{html.escape(caption)}</span> {link}'
        "</figcaption>\n</figure>"
    )


def _plain(value: Any) -> Any:
    """Value as plain YAML-able Python (falls back to ``str``)."""
    try:
        from knowloc.store import to_plain

        return to_plain(value)
    except (TypeError, ImportError):
        return str(value)


def _render_value(value: Any, base_dir: Path) -> str:
    """HTML for one run-info value: scalars inline, DataFrames and records as tables,
    nested structures as YAML."""
    if isinstance(value, pd.DataFrame):
        return _render_table("", value, None, base_dir, "")
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, Mapping) for v in value):
        df = pd.DataFrame([_plain(v) for v in value])
        return _render_table("", df, None, base_dir, "")
    if isinstance(value, (Mapping, list, tuple, set)):
        text = yaml.safe_dump(_plain(value), sort_keys=False, allow_unicode=True,
                              default_flow_style=False).rstrip()
        return f"<pre>{html.escape(text)}</pre>"
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return html.escape(format_number(value))
    text = "" if value is None else str(value)
    if "\n" in text:
        return f"<pre>{html.escape(text)}</pre>"
    return html.escape(text)


def _render_run_info(run_info: Mapping[str, Any], base_dir: Path) -> str:
    items = []
    for key, value in run_info.items():
        body = _render_value(value, base_dir)
        label = html.escape(str(key))
        if isinstance(value, (Mapping, list, tuple, set, pd.DataFrame)):
            n = len(value)
            open_attr = "" if str(key).lower() == "config" or n > 12 else " open"
            items.append(
                f"<dt>{label}</dt><dd><details{open_attr}><summary>{label} "
                f"({n} {'entry' if n == 1 else 'entries'})</summary>{body}</details></dd>"
            )
        else:
            items.append(f"<dt>{label}</dt><dd>{body}</dd>")
    return '<dl class="kl-run-info-list">\n' + "\n".join(items) + "\n</dl>"


_CSS = """
:root { --fg:#1d232a; --muted:#5b6570; --line:#d8dde3; --zebra:#f5f7f9; --accent:#2456a6; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1100px; padding: 1.5rem 2rem 4rem; color: var(--fg);
  font: 15px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
  sans-serif; }
h1 { font-size: 1.7rem; margin: .5rem 0 1rem; }
h2 { font-size: 1.3rem; margin-top: 2.5rem; padding-bottom: .25rem;
  border-bottom: 1px solid var(--line); }
a { color: var(--accent); }
nav.kl-toc { background: var(--zebra); border: 1px solid var(--line); border-radius: 6px;
  padding: .5rem 1.25rem; }
nav.kl-toc ol { margin: .3rem 0; padding-left: 1.2rem; }
nav.kl-toc ol ol { font-size: .92em; color: var(--muted); }
.kl-table-wrap { overflow-x: auto; margin: 1.25rem 0; }
table.kl-table { border-collapse: collapse; font-size: .9rem;
  font-variant-numeric: tabular-nums; }
table.kl-table caption { caption-side: top; text-align: left; font-weight: 600;
  padding: .3rem 0; }
table.kl-table th, table.kl-table td { padding: .3rem .7rem; border-bottom: 1px solid var(--line);
  text-align: left; vertical-align: top; }
table.kl-table th { background: #eef1f4; border-bottom: 2px solid var(--line); }
table.kl-table tbody tr:nth-child(even) { background: var(--zebra); }
table.kl-table td.num { text-align: right; white-space: nowrap; }
figure.kl-figure { margin: 1.5rem 0; }
figure.kl-figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: .92rem; margin-top: .35rem; }
a.kl-csv { font-size: .82rem; font-weight: normal; margin-left: .5rem; }
.kl-missing { color: #a3261b; font-size: .85rem; }
.kl-note { color: var(--muted); font-size: .85rem; }
dl.kl-run-info-list { display: grid; grid-template-columns: max-content 1fr; gap: .3rem 1.2rem; }
dl.kl-run-info-list dt { font-weight: 600; }
dl.kl-run-info-list dd { margin: 0; }
pre { background: var(--zebra); border: 1px solid var(--line); border-radius: 4px;
  padding: .6rem .8rem; overflow-x: auto; font-size: .85rem; }
summary { cursor: pointer; color: var(--muted); }
@media (max-width: 760px) {
  body { padding: 1rem 1rem 3rem; }
  table.kl-table th, table.kl-table td { padding: .25rem .45rem; }
}
"""


# ---------------------------------------------------------------------------- public


def build_report(path: Path, *, title: str, sections: list[Section], run_info: dict) -> Path:
    """Write one self-contained HTML report and return its path.

    Args:
        path: the file to write (``report.html``), or a directory to write
            ``report.html`` into. CSV links are relative to its directory.
        title: page title and heading.
        sections: rendered in order, each with its id (slug of the title), its HTML, its
            figures (embedded base64 images) and its tables.
        run_info: rendered as a definition list (config, model, dataset sizes, skipped
            items with reasons, timings...). Mappings and lists appear as YAML, lists of
            records as tables.

    A missing image or CSV is logged and shown as missing in the report (never silently
    dropped). The file is written atomically.
    """
    path = Path(path)
    if path.is_dir() or path.suffix == "":
        path = path / "report.html"
    base_dir = path.parent
    base_dir.mkdir(parents=True, exist_ok=True)

    ids = _Ids(reserved=("run-info", "contents"))
    toc: list[str] = []
    body: list[str] = []
    for section in sections:
        sid = ids(slugify(section.title))
        sub_toc: list[str] = []
        parts = [f'<section class="kl-section" id="{sid}">',
                 f"<h2>{html.escape(section.title)}</h2>"]
        if section.html:
            parts.append(f'<div class="kl-text">{section.html}</div>')
        for caption, image, csv in section.figures:
            fid = ids(f"{sid}-fig-{slugify(caption)}")
            parts.append(_render_figure(caption, image, csv, base_dir, fid))
            sub_toc.append(f'<li><a href="#{fid}">{html.escape(caption)}</a></li>')
        for caption, df, csv in section.tables:
            tid = ids(f"{sid}-table-{slugify(caption)}")
            parts.append(_render_table(caption, df, csv, base_dir, tid))
            sub_toc.append(f'<li><a href="#{tid}">{html.escape(caption)}</a></li>')
        parts.append("</section>")
        body.append("\n".join(parts))
        sub = f"<ol>{''.join(sub_toc)}</ol>" if sub_toc else ""
        toc.append(f'<li><a href="#{sid}">{html.escape(section.title)}</a>{sub}</li>')
    toc.append('<li><a href="#run-info">Run information</a></li>')

    run_block = (
        '<section class="kl-run-info" id="run-info">\n<h2>Run information</h2>\n'
        + _render_run_info(run_info or {}, base_dir) + "\n</section>"
    )
    doc = (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="generator" content="knowloc">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n"
        '<nav class="kl-toc" id="contents"><strong>Contents</strong>'
        f'<ol>{"".join(toc)}</ol></nav>\n'
        + "\n".join(body) + "\n" + run_block + "\n</body>\n</html>\n"
    )
    atomic_write_text(path, doc)
    n_fig = sum(len(s.figures) for s in sections)
    n_tab = sum(len(s.tables) for s in sections)
    logger.info("report: %d sections, %d figures, %d tables -> %s",
                len(sections), n_fig, n_tab, path)
    return path


class _ManifestParser(HTMLParser):
    """Collects the report's sections, figures, tables, links and resource references."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.title = ""
        self.sections: list[str] = []
        self.figures: list[dict[str, Any]] = []
        self.tables: list[dict[str, Any]] = []
        self.links: list[str] = []
        self.resources: list[str] = []
        self.has_run_info = False
        self._in_title = False
        self._figure: dict[str, Any] | None = None
        self._in_figcaption = False
        self._caption_parts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: (v or "") for k, v in attrs}
        classes = a.get("class", "").split()
        if tag == "title":
            self._in_title = True
        elif tag == "section" and "kl-section" in classes:
            self.sections.append(a.get("id", ""))
        elif tag == "section" and "kl-run-info" in classes:
            self.has_run_info = True
        elif tag == "figure" and "kl-figure" in classes:
            self._figure = {"id": a.get("id", ""), "csv": a.get("data-csv", ""), "caption": "",
                            "images": [], "missing": a.get("data-missing") == "true"}
        elif tag == "span" and "kl-caption" in classes and self._figure is not None:
            self._in_figcaption = True
            self._caption_parts = []
        elif tag == "table" and "kl-table" in classes and a.get("data-name"):
            self.tables.append({"name": a["data-name"], "csv": a.get("data-csv", "")})
        if tag == "img" and self._figure is not None:
            self._figure["images"].append(a.get("src", "")[:40])
        if tag == "a" and "href" in a:
            self.links.append(a["href"])
        for attr in ("src", "href", "srcset", "data"):
            if attr in a and tag != "a":
                self.resources.append(a[attr])
        if "style" in a and "url(" in a["style"]:
            self.resources.append(a["style"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        elif tag == "span" and self._in_figcaption:
            self._in_figcaption = False
        elif tag == "figure" and self._figure is not None:
            self._figure["caption"] = " ".join("".join(self._caption_parts).split())
            self.figures.append(self._figure)
            self._figure = None

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        if self._in_figcaption:
            self._caption_parts.append(data)


_EXTERNAL = re.compile(r"^\s*(https?:)?//|url\(\s*['\"]?\s*(https?:)?//", re.IGNORECASE)


def report_manifest(html_path: str | Path) -> dict:
    """List what a report produced by :func:`build_report` actually contains.

    Returns a dict with ``title``; ``sections`` (section ids, in order); ``figures``
    (captions of figures whose image is present); ``figure_records`` (id, caption, csv, images,
    missing); ``missing_figures`` (captions); ``tables`` (table names = captions);
    ``table_records`` (name, csv); ``csv_links`` (relative hrefs of all CSV links);
    ``embedded_images`` (number of ``data:image/...;base64`` images); ``external_refs``
    (any src/href pointing off the page to http(s) or protocol-relative URLs);
    ``has_run_info``.
    """
    parser = _ManifestParser()
    parser.feed(Path(html_path).read_text(encoding="utf-8"))
    parser.close()
    present = [f for f in parser.figures if not f["missing"]]
    csv_links = [h for h in parser.links if h.lower().endswith(".csv")]
    external = [r for r in parser.resources + parser.links if _EXTERNAL.search(r)]
    return {
        "title": parser.title.strip(),
        "sections": parser.sections,
        "figures": [f["caption"] for f in present],
        "figure_records": parser.figures,
        "missing_figures": [f["caption"] for f in parser.figures if f["missing"]],
        "tables": [t["name"] for t in parser.tables],
        "table_records": parser.tables,
        "csv_links": csv_links,
        "embedded_images": sum(
            1 for f in parser.figures for src in f["images"]
            if re.match(r"data:image/[a-z+.-]+;base64,", src)
        ),
        "external_refs": external,
        "has_run_info": parser.has_run_info,
    }

