"""Write the results tables of the README (and any Markdown file with result markers) from
run directories, so that the published numbers are always those of the code and the runs.

Usage::

    python tools/results.py --quick runs/quick \\
        --standard runs/standard-gemma runs/standard-smollm2 \\
        --quadrature quad-gemma.json quad-smollm2.json   # rewrite README.md's result blocks
    python tools/results.py ... --check               # exit 1 if a block is out of date

Each run directory is first rendered again with :func:`knowloc.render_report` (its tables,
figures and report are recomputed from its stored results by the current code), then its
tables are pasted into the blocks::

    <!-- results:NAME -->
    ... (written by this script) ...
    <!-- /results:NAME -->

Blocks (a block whose input is not given is left as it is):

* ``table1-standard``: Table 1 of the ``--standard`` runs beside the paper's rows
  (``knowloc compare --paper``), with n and 95% intervals;
* ``convergence-standard``: the completeness gap of their attributions, per model and
  method (each run's ``convergence_summary.csv``, as its report shows it);
* ``table1-quick``, ``table2-quick``, ``table3-quick``: Tables 1, 2 and 3 of the ``--quick``
  run; ``figure4-quick``, ``figure6-quick``: the numbers behind its Figures 4 (query-KN
  mapping) and 6 (knowledge synapses), as its report shows them;
* ``quadrature``: the table of ``benchmarks/quadrature.py --json FILE`` (one or more
  files, summarized together).

Every block starts with a line naming the run(s) it comes from: the model, preset, data,
methods, steps and rule, as recorded in each run's ``config.yaml``. A change of formula in
the code thus shows up as a diff of the README when the script is run again.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: ``<!-- results:NAME -->`` ... ``<!-- /results:NAME -->``
BLOCK = re.compile(r"(<!-- results:(?P<name>[a-z0-9-]+) -->\n)(?P<body>.*?)"
                   r"(<!-- /results:(?P=name) -->)", re.DOTALL)
BLOCK_NAMES = re.compile(r"<!-- results:([a-z0-9-]+) -->")
#: Every block this script writes.
NAMES = ("table1-standard", "convergence-standard", "table1-quick", "table2-quick", "table3-quick", "figure4-quick",
         "figure6-quick", "quadrature")


def replace_blocks(text: str, blocks: dict[str, str]) -> tuple[str, list[str]]:
    """``text`` with the body of every marked block named in ``blocks`` replaced (the
    markers kept), and the names of the blocks found in ``text``."""
    found: list[str] = []

    def sub(m: re.Match[str]) -> str:
        name = m.group("name")
        found.append(name)
        if name not in blocks:
            return m.group(0)
        body = blocks[name].rstrip("\n") + "\n"
        return m.group(1) + body + m.group(4)

    return BLOCK.sub(sub, text), found


def provenance(run: Path) -> str:
    """One line on where a run's numbers come from, from its ``config.yaml`` alone."""
    from knowloc.store import RunStore
    from knowloc.study.spec import read_spec

    spec = read_spec(RunStore(run, create=False))
    model = spec.model_info.get("name") or spec.model.get("name") or "?"
    preset = (spec.preset or {}).get("name", "none")
    loc = spec.localize
    methods = "/".join(m.upper() for m in loc.methods) if loc is not None else "?"
    steps = f"{loc.n_steps} steps ({loc.rule})" if loc is not None else "?"
    data = spec.dataset.get("source") or spec.dataset.get("spec") or "?"
    data = re.sub(r"^pararel:.*", "ParaRel", str(data))
    return f"`{run.name}`: {model}, preset `{preset}`, {data}, {methods}, {steps}"


def demote(markdown: str) -> str:
    """A run's table Markdown for inclusion under a README heading: its ``# title`` line
    dropped, ``## subheadings`` as bold lines, the directories of an absolute path after
    "measured on" (the ΔPPL text file on the machine of the run) left out."""
    markdown = re.sub(r"(measured on )/(?:[^/\s]+/)+", r"\1", markdown)
    lines = []
    for line in markdown.strip("\n").splitlines():
        if line.startswith("# "):
            continue
        if line.startswith("## "):
            lines.append(f"**{line[3:].strip()}**")
            continue
        lines.append(line)
    return "\n".join(lines).strip("\n")


def _refresh(run: Path) -> None:
    """Recompute the run's tables, figures and report from its stored results."""
    from knowloc import render_report

    render_report(run)


def _with_source(source: str, body: str) -> str:
    return f"*From {source}; written by `tools/results.py`.*\n\n{body.strip()}\n"


def standard_block(runs: Sequence[Path]) -> str:
    from knowloc.study.compare import compare, compare_markdown

    table = compare(runs, paper=True).table
    sources = "; ".join(provenance(r) for r in runs)
    note = ("The paper's rows have no n or intervals (the paper gives p < 1e-6 in every "
            "case and no t for AMIG); [lo, hi]: 95% intervals with facts as the unit "
            "(docs/methods.md §7).")
    return _with_source(sources, compare_markdown(table) + "\n" + note)


def convergence_block(runs: Sequence[Path]) -> str:
    """Each run's convergence summary (its report's table), one block of rows per model."""
    import pandas as pd

    from knowloc.report.convergence import convergence_display
    from knowloc.report.tables import markdown_table
    from knowloc.store import RunStore
    from knowloc.study.spec import read_spec

    parts = []
    for run in runs:
        spec = read_spec(RunStore(run, create=False))
        model = spec.model_info.get("name") or spec.model.get("name") or run.name
        shown = convergence_display(pd.read_csv(run / "convergence_summary.csv"))
        shown.insert(0, "model", [str(model)] + [""] * (len(shown) - 1))
        parts.append(shown)
    return _with_source("; ".join(provenance(r) for r in runs),
                        markdown_table(pd.concat(parts, ignore_index=True)))


def quick_blocks(run: Path) -> dict[str, str]:
    from knowloc.study.compare import compare, compare_markdown

    out = {"table1-quick": _with_source(provenance(run),
                                        compare_markdown(compare([run]).table))}
    for n in (2, 3):
        md = run / f"table{n}.md"
        if md.exists():
            out[f"table{n}-quick"] = _with_source(provenance(run),
                                                  demote(md.read_text(encoding="utf-8")))
    import pandas as pd

    from knowloc.report.tables import figure4_display, figure6_display, markdown_table

    for name, display in (("figure4", figure4_display), ("figure6", figure6_display)):
        csv = run / f"{name}.csv"
        if csv.exists():
            out[f"{name}-quick"] = _with_source(
                provenance(run), markdown_table(display(pd.read_csv(csv))))
    return out


def quadrature_block(paths: Sequence[Path]) -> str:
    """The quadrature benchmark's table of one or more ``--json`` files (e.g. one per model,
    run side by side), their cells summarized together."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import quadrature  # the benchmark script: its own summary and Markdown of its numbers

    data = [json.loads(p.read_text(encoding="utf-8")) for p in paths]
    cells = [c for d in data for c in d["cells"]]
    rows = quadrature.summarize(cells)
    per_model: dict[str, set[str]] = {}
    for c in cells:
        per_model.setdefault(c["model"], set()).add(c["query"])
    counts = ", ".join(f"{model}: {len(q)} queries" for model, q in per_model.items())
    # each file's header without its own count ("N queries of ..."): the counts are the sum's
    rest = dict.fromkeys(re.sub(r"^\d+ queries of ", "", d["header"]) for d in data)
    header = f"{counts}; " + " / ".join(rest)
    names = ", ".join(p.name for p in paths)
    return _with_source(f"`benchmarks/quadrature.py` ({names})",
                        quadrature.markdown(rows, quadrature.verdicts(rows), header))


def build_blocks(quick: Path | None, standard: Sequence[Path], quad: Sequence[Path],
                 refresh: Callable[[Path], None] = _refresh) -> dict[str, str]:
    """Every block the given inputs make, the runs rendered again first."""
    blocks: dict[str, str] = {}
    for run in ([quick] if quick else []) + list(standard):
        refresh(run)
    if standard:
        blocks["table1-standard"] = standard_block(standard)
        blocks["convergence-standard"] = convergence_block(standard)
    if quick:
        blocks.update(quick_blocks(quick))
    if quad:
        blocks["quadrature"] = quadrature_block(quad)
    return blocks


def default_files() -> list[Path]:
    """README.md and every docs/*.md that holds a result block."""
    docs = [p for p in sorted((ROOT / "docs").glob("*.md"))
            if BLOCK_NAMES.search(p.read_text(encoding="utf-8"))]
    return [ROOT / "README.md", *docs]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", type=Path, help="a run of `knowloc reproduce --preset quick`")
    ap.add_argument("--standard", type=Path, nargs="*", default=[],
                    help="runs of `knowloc reproduce --preset standard`, one per model")
    ap.add_argument("--quadrature", type=Path, nargs="*", default=[],
                    help="JSON files of benchmarks/quadrature.py --json (e.g. one per model)")
    ap.add_argument("--files", type=Path, nargs="+", default=None,
                    help="Markdown files with result blocks (default: README.md and every "
                         "docs/*.md with a block)")
    ap.add_argument("--check", action="store_true",
                    help="change nothing; exit 1 if a block differs from what the runs give")
    args = ap.parse_args(argv)
    if not (args.quick or args.standard or args.quadrature):
        ap.error("give --quick, --standard and/or --quadrature")
    files = args.files if args.files is not None else default_files()
    blocks = build_blocks(args.quick, args.standard, args.quadrature)
    stale, texts, seen = [], {}, set()
    for path in files:
        texts[path] = path.read_text(encoding="utf-8")
        seen |= set(BLOCK_NAMES.findall(texts[path]))
    unknown = sorted(seen - set(NAMES))
    if unknown:  # a typo in a marker would otherwise go unnoticed
        raise SystemExit(f"unknown result block(s) {', '.join(unknown)}; known: "
                         f"{', '.join(NAMES)}")
    for name in sorted(set(blocks) - seen):
        print(f"note: no <!-- results:{name} --> block in {', '.join(map(str, files))}; "
              "not written")
    for path, text in texts.items():
        new, found = replace_blocks(text, blocks)
        if new != text:
            stale.append(path)
            if not args.check:
                path.write_text(new, encoding="utf-8")
        print(f"{path}: blocks {', '.join(found) or '(none)'}"
              f"{' changed' if new != text else ' unchanged'}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
