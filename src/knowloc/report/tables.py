"""Markdown and CSV renderings of the stages' tables: Tables 1-3, the Figure 4/5/6 tables
and the report's summaries. Each ``write_*`` function writes into the run directory and
returns what it wrote."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from ..attribution import sort_methods
from ..pipeline.attention import AttentionResult
from ..pipeline.consistency import ConsistencyResult
from ..pipeline.mapping import MappingResult
from ..pipeline.modify import EDIT_OPS, EDIT_SETS, ModifyResult
from ..store import RunStore
from ..store.io import atomic_write_text, write_csv
from .figures import method_label
from .stats import SPREAD_NOTE

log = logging.getLogger(__name__)

SET_LABELS = {"local": "N_i", "global": "N_g", "cas": "CAS"}


def corpus_note(ppl_cfg: dict[str, Any]) -> str:
    """Where ΔPPL was measured, from the sampler's config (``ModifyResult.ppl``)."""
    if ppl_cfg.get("builtin"):
        return ("ΔPPL measured on knowloc's small built-in English corpus (no --ppl-text "
                "given), not on WikiText-2: not comparable with the paper's numbers.")
    return f"ΔPPL measured on {ppl_cfg.get('source')}."


#: A displayed column: (column of the machine table, the paper's header, format). Formats:
#: ``""`` text, ``"d"`` integer, ``".2f"``-style specs, ``"%"`` a share in percent,
#: ``"yes"`` a boolean.
Column = tuple[str, str, str]

TABLE1_DISPLAY: list[Column] = [
    ("method", "method", ""), ("T", "T", ""), ("threshold", "threshold", ".3f"),
    ("n_facts", "n", "d"), ("R_I", "R: I", ".2f"), ("S_I", "S: I", ".3f"),
    ("R_II", "R: II", ".2f"), ("S_II", "S: II", ".3f"), ("t", "t", ".1f"), ("p", "p", ".1e"),
    ("cap_II", "∩: II", ".2f"), ("n_I", "n: I", "d"), ("n_II", "n: II", "d"),
    ("n_common", "n: ∩", "d"),
]
OP_TITLES = {"erase": "Erasure", "update": "Update"}
METRICS_DISPLAY: list[tuple[str, str]] = [("rel", "Rel"), ("gen", "Gen"), ("loc", "Loc"),
                                          ("avg", "Avg"), ("dppl", "ΔPPL")]


def format_value(value: Any, fmt: str) -> str:
    """One cell in the column's format; a missing value is a dash."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return "–"
    if fmt == "":
        return str(value)
    if fmt == "d":
        return str(int(value))
    if fmt == "%":
        return f"{100 * float(value):.0f}%"
    if fmt == "yes":
        return "yes" if bool(value) else "no"
    text = f"{float(value):{fmt}}"
    return "−" + text[1:] if text.startswith("-") else text


def format_interval(value: Any, lo: Any, hi: Any, fmt: str) -> str:
    """``value [lo, hi]`` (a 95% interval) in the format ``fmt``, e.g. ``0.52 [0.41, 0.63]``;
    the value alone when the interval is undefined."""
    text = format_value(value, fmt)
    if text == "–" or any(v is None or pd.isna(v) for v in (lo, hi)):
        return text
    return f"{text} [{format_value(lo, fmt)}, {format_value(hi, fmt)}]"


def format_table(df: pd.DataFrame, columns: list[Column]) -> pd.DataFrame:
    """``df`` with the paper's headers and one format per column (text cells). A numeric
    column ``c`` of ``df`` with the columns ``c_lo`` and ``c_hi`` beside it is shown with its
    interval, ``value [lo, hi]``."""
    def cells(col: str, fmt: str) -> list[str]:
        if fmt not in ("", "d", "%", "yes") and {f"{col}_lo", f"{col}_hi"} <= set(df.columns):
            return [format_interval(v, lo, hi, fmt)
                    for v, lo, hi in zip(df[col], df[f"{col}_lo"], df[f"{col}_hi"])]
        return [format_value(v, fmt) for v in df[col]]

    return pd.DataFrame({header: cells(col, fmt) for col, header, fmt in columns
                         if col in df.columns})


def markdown_table(display: pd.DataFrame) -> str:
    """A display table (:func:`format_table`) as a Markdown table."""
    lines = ["| " + " | ".join(display.columns) + " |",
             "|" + "|".join("---" for _ in display.columns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in display.itertuples(index=False)]
    return "\n".join(lines)


def edit_display(table: pd.DataFrame) -> pd.DataFrame:
    """Table 2/3 rows for display: set, op, kind, n (edits), facts, each metric as mean
    [95% interval] (the table's ``<metric>_lo`` / ``_hi``: a bootstrap over facts), empty
    sets. A table without intervals (made before they existed) shows the means alone."""
    with_ci = all(f"{col}_lo" in table.columns for col, _ in METRICS_DISPLAY)
    rows = []
    for r in table.itertuples():
        row = {"method": method_label(str(r.method)), "set": SET_LABELS.get(r.set, r.set),
               "op": r.op, "kind": r.kind, "n": str(int(r.n_edits))}
        if with_ci:
            row["facts"] = format_value(getattr(r, "n_facts", None), "d")
        for col, header in METRICS_DISPLAY:
            row[header] = (format_interval(getattr(r, col), getattr(r, f"{col}_lo"),
                                           getattr(r, f"{col}_hi"), ".2f") if with_ci
                           else format_value(getattr(r, col), ".2f"))
        row["empty sets"] = str(int(r.n_empty))
        rows.append(row)
    return pd.DataFrame(rows)


def table2_markdown(t2: pd.DataFrame, corpus_note: str = "") -> str:
    """Table 2 as Markdown: one block per model and method, rows set × op × K_I/K_II, each
    metric as mean [95% interval] (a bootstrap over facts, :func:`edit_display`)."""
    lines = ["# Table 2: knowledge modification", ""]
    if corpus_note:
        lines += [corpus_note, ""]
    if t2.empty:
        return "\n".join(lines + ["(no edits)"])
    for (model_name, method), g in t2.groupby(["model", "method"], sort=False):
        lines += [f"## {model_name}, {method_label(str(method))}", "",
                  markdown_table(edit_display(g).drop(columns="method")), ""]
    lines.append("Rel and Gen of erasure are 1 − accuracy; all metrics better when higher "
                 "except ΔPPL. Empty neuron sets are not edits and are not averaged. "
                 + SPREAD_NOTE + ".")
    return "\n".join(lines)


def table3_display(t3: pd.DataFrame) -> pd.DataFrame:
    """Table 3 in the paper's layout: rows method × K_I/K_II × {N_i, N_g, CAS}, columns
    Erasure and Update (Rel, Gen, Loc, Avg, ΔPPL as mean [95% interval]), n (edits) and
    facts."""
    shown = edit_display(t3)
    out = []
    for (method, kind, set_label), g in shown.groupby(["method", "kind", "set"], sort=False):
        row = {"method": method, "kind": kind, "set": set_label}
        for op in EDIT_OPS:
            r = g[g["op"] == op]
            for _, header in METRICS_DISPLAY:
                row[f"{OP_TITLES[op]} {header}"] = r[header].iloc[0] if len(r) else "–"
            row[f"{OP_TITLES[op]} n"] = r["n"].iloc[0] if len(r) else "–"
            if "facts" in shown.columns:
                row[f"{OP_TITLES[op]} facts"] = r["facts"].iloc[0] if len(r) else "–"
        out.append(row)
    order = {SET_LABELS[k]: i for i, k in enumerate(EDIT_SETS)}
    df = pd.DataFrame(out)
    if df.empty:
        return df
    return df.assign(_k=df["kind"].map({"K_I": 0, "K_II": 1}), _s=df["set"].map(order)) \
        .sort_values(["method", "_k", "_s"], kind="mergesort").drop(columns=["_k", "_s"]) \
        .reset_index(drop=True)


def table3_markdown(t3: pd.DataFrame, corpus_note: str = "") -> str:
    """Table 3 as Markdown: per model and method, rows K_I/K_II × {N_i, N_g, CAS}, columns
    Erasure and Update (Rel, Gen, Loc, Avg, ΔPPL) with n."""
    lines = ["# Table 3: Consistency-Aware KN modification", ""]
    if corpus_note:
        lines += [corpus_note, ""]
    if t3.empty:
        return "\n".join(lines + ["(no edits)"])
    for (model_name, method), g in t3.groupby(["model", "method"], sort=False):
        lines += [f"## {model_name}, {method_label(str(method))}", "",
                  markdown_table(table3_display(g).drop(columns="method")), ""]
    lines.append("CAS: neurons with CAS = 0.7 μ − 0.3 σ of the max-normalized attribution "
                 "over the fact's queries above 0.3 × max CAS, chosen among ∪ N_i (so the "
                 "set is a subset of N_g). Rel and Gen of erasure are 1 − accuracy; higher "
                 "is better except ΔPPL. " + SPREAD_NOTE + ".")
    return "\n".join(lines)


def table1_display(t1: pd.DataFrame) -> pd.DataFrame:
    """Table 1 with the paper's headers and formats."""
    return format_table(t1, TABLE1_DISPLAY)


def write_table1(store: RunStore, res: ConsistencyResult) -> str:
    """``table1.csv``, ``table1.md`` and ``consistency_skipped.csv``; returns the Markdown."""
    md = markdown_table(table1_display(res.table1)) + "\n"
    write_csv(store.path("table1.csv"), res.table1)
    atomic_write_text(store.path("table1.md"), md + "\n")
    write_csv(store.path("consistency_skipped.csv"), res.skipped)
    return md


def write_tables23(store: RunStore, res: ModifyResult) -> tuple[str, str | None]:
    """``table2.csv``/``.md`` and, with CAS edits, ``table3.csv``/``.md``; returns the
    Markdown of both (None for a missing Table 3)."""
    note = corpus_note(res.ppl)
    md2 = table2_markdown(res.table2, corpus_note=note)
    write_csv(store.path("table2.csv"), res.table2)
    atomic_write_text(store.path("table2.md"), md2 + "\n")
    md3 = None
    if res.table3 is not None:
        md3 = table3_markdown(res.table3, corpus_note=note)
        write_csv(store.path("table3.csv"), res.table3)
        atomic_write_text(store.path("table3.md"), md3 + "\n")
    return md2, md3


def write_figure4(store: RunStore, res: MappingResult) -> None:
    """``figure4.csv``."""
    write_csv(store.path("figure4.csv"), res.figure4)


def write_figures56(store: RunStore, res: AttentionResult) -> None:
    """``figure5.csv`` and ``figure6.csv``."""
    write_csv(store.path("figure5.csv"), res.figure5)
    write_csv(store.path("figure6.csv"), res.figure6)


def localization_summary(queries: pd.DataFrame) -> pd.DataFrame:
    """Knowledge neurons per query by method: count, known share, mean P, |N_i|, seconds."""
    g = queries.groupby("method", sort=False)
    out = g.agg(queries=("query_id", "count"), known_share=("known", "mean"),
                mean_prob=("prob", "mean"), mean_neurons=("n_neurons", "mean"),
                median_neurons=("n_neurons", "median"),
                empty_sets=("n_neurons", lambda s: int((s == 0).sum())),
                seconds_per_query=("seconds", "mean")).reset_index()
    order = {m: i for i, m in enumerate(sort_methods(out["method"]))}
    return out.sort_values("method", key=lambda s: s.map(order)).reset_index(drop=True)


def screen_summary(screened: pd.DataFrame) -> pd.DataFrame:
    """Screened queries per relation: count, known share, mean P."""
    return (screened.groupby("relation").agg(queries=("query_id", "count"),
                                             known_share=("known", "mean"),
                                             mean_prob=("prob", "mean")).reset_index())


LOCALIZATION_DISPLAY: list[Column] = [
    ("method", "method", ""), ("queries", "queries", "d"), ("known_share", "known", "%"),
    ("mean_prob", "mean P(answer)", ".3f"), ("mean_neurons", "mean |N_i|", ".1f"),
    ("median_neurons", "median |N_i|", ".1f"), ("empty_sets", "empty N_i", "d"),
    ("seconds_per_query", "s / query", ".2f"),
]
SCREEN_DISPLAY: list[Column] = [("relation", "relation", ""), ("queries", "queries", "d"),
                                ("known_share", "known", "%"),
                                ("mean_prob", "mean P(answer)", ".3f")]
EXAMPLES_DISPLAY: list[Column] = [
    ("method", "method", ""), ("relation", "relation", ""), ("prompt", "query", ""),
    ("answer", "answer", ""), ("predicted", "top-1", ""), ("prob", "P(answer)", ".3f"),
    ("known", "known", "yes"), ("n_neurons", "|N_i|", "d"),
]
FIGURE5_DISPLAY: list[Column] = [
    ("method", "method", ""), ("relation", "relation", ""), ("fact_id", "fact", ""),
    ("kind", "kind", ""), ("first", "position 0", "yes"), ("P", "P", ".2f"),
    ("token", "most attended token", ""), ("n_queries", "queries", "d"),
]
METRIC_LABELS = {"delta_value": "ΔValue", "delta_prob": "ΔProb"}


def figure4_display(figure4: pd.DataFrame) -> pd.DataFrame:
    """Figure 4's means (ΔProb of Sup / Enh, their Avg) as mean [95% interval] (the table's
    bootstrap over facts, the figure's error bars), with n (queries), facts and the empty
    sets. A table without intervals (made before they existed) shows the means alone."""
    with_ci = "suppress_lo" in figure4.columns
    return pd.DataFrame([{
        "method": method_label(str(r.method)), "kind": r.kind, "set": r.set,
        "n": str(int(r.n_queries) - int(r.n_empty)),
        **({"facts": format_value(r.n_facts, "d")} if with_ci else {}),
        **{head: (format_interval(getattr(r, col), getattr(r, f"{col}_lo"),
                                  getattr(r, f"{col}_hi"), ".2f") if with_ci
                  else format_value(getattr(r, col), ".2f"))
           for col, head in (("suppress", "Sup ΔProb"), ("enhance", "Enh ΔProb"),
                             ("avg", "Avg"))},
        "empty sets": str(int(r.n_empty))} for r in figure4.itertuples()])


def figure6_display(figure6: pd.DataFrame) -> pd.DataFrame:
    """Figure 6's means (ΔValue, ΔProb per kind, synapse set and operation) as mean [95%
    interval] (the table's bootstrap over facts, the figure's error bars), with n (queries)
    and facts. A table without intervals (made before they existed) shows the means alone."""
    with_ci = "value_lo" in figure6.columns
    return pd.DataFrame([{
        "method": method_label(str(r.method)),
        "synapses": "as defined" if r.first else "position 0 excluded",
        "kind": r.kind, "set": r.synapses, "op": r.operation,
        "metric": METRIC_LABELS.get(r.metric, r.metric), "n": str(int(r.n)),
        **({"facts": format_value(r.n_facts, "d"),
            "mean [95% interval]": format_interval(r.value, r.value_lo, r.value_hi, ".3f")}
           if with_ci else {"mean": format_value(r.value, ".3f")})}
        for r in figure6.itertuples()])
