"""Presentation of a run: tables (Markdown, CSV), figures, the HTML report and its prose.

* :mod:`knowloc.report.tables`   Tables 1-3 and the figure tables as Markdown / CSV
* :mod:`knowloc.report.figures`  every plot (PNG + the CSV behind it)
* :mod:`knowloc.report.stages`   what each stage writes beside its tables
* :mod:`knowloc.report.sections` the report's sections and prose
* :mod:`knowloc.report.html`     the self-contained ``report.html``
"""

from __future__ import annotations

from .html import Section, build_report, format_number, report_manifest, slugify

__all__ = ["Section", "build_report", "format_number", "report_manifest", "slugify"]
