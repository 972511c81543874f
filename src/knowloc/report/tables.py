"""Markdown and CSV renderings of the stages' tables: Tables 1-3, the Figure 4/5/6 tables
and the report's summaries. Each ``write_*`` function writes into the run directory and
returns what it wrote."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from .. import consistency as cons
from ..attribution import sort_methods
from ..pipeline.attention import AttentionResult
from ..pipeline.consistency import ConsistencyResult
from ..pipeline.mapping import MappingResult
from ..pipeline.modify import EDIT_OPS, EDIT_SETS, ModifyResult
from ..store import RunStore
from .figures import method_label

log = logging.getLogger(__name__)

SET_LABELS = {"local": "N_i", "global": "N_g", "cas": "CAS"}


def corpus_note(ppl_cfg: dict[str, Any]) -> str:
    """Where ΔPPL was measured, from the sampler's config (``ModifyResult.ppl``)."""
    if ppl_cfg.get("builtin"):
        return ("ΔPPL measured on knowloc's small built-in English corpus (no --ppl-text "
                "given), not on WikiText-2: not comparable with the paper's numbers.")
    return f"ΔPPL measured on {ppl_cfg.get('source')}."


def _f(x: Any) -> str:
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.2f}"


def table2_markdown(t2: pd.DataFrame, corpus_note: str = "") -> str:
    """Table 2 as Markdown: one block per model and method, rows set × op × K_I/K_II."""
    lines = ["# Table 2: knowledge modification", ""]
    if corpus_note:
        lines += [corpus_note, ""]
    if t2.empty:
        return "\n".join(lines + ["(no edits)"])
    for (model_name, method), g in t2.groupby(["model", "method"], sort=False):
        lines += [f"## {model_name}, {method_label(str(method))}", "",
                  "| set | op | kind | Rel | Gen | Loc | Avg | ΔPPL | edits | empty sets |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in g.itertuples():
            lines.append(f"| {SET_LABELS.get(r.set, r.set)} | {r.op} | {r.kind} | {_f(r.rel)} | "
                         f"{_f(r.gen)} | {_f(r.loc)} | {_f(r.avg)} | {_f(r.dppl)} | "
                         f"{r.n_edits} | {r.n_empty} |")
        lines.append("")
    lines.append("Rel and Gen of erasure are 1 − accuracy; all metrics better when higher "
                 "except ΔPPL. Empty neuron sets are not edits and are not averaged.")
    return "\n".join(lines)


def table3_markdown(t3: pd.DataFrame, corpus_note: str = "") -> str:
    """Table 3 as Markdown: per model and method, rows K_I/K_II × {N_i, N_g, CAS}, columns
    Erasure and Update (Rel, Gen, Loc, Avg, ΔPPL)."""
    lines = ["# Table 3: Consistency-Aware KN modification", ""]
    if corpus_note:
        lines += [corpus_note, ""]
    if t3.empty:
        return "\n".join(lines + ["(no edits)"])
    metrics = ("rel", "gen", "loc", "avg", "dppl")
    names = ("Rel", "Gen", "Loc", "Avg", "ΔPPL")
    for (model_name, method), g in t3.groupby(["model", "method"], sort=False):
        lines += [f"## {model_name}, {method_label(str(method))}", "",
                  "| kind | set | " + " | ".join(f"Erasure {n}" for n in names) + " | "
                  + " | ".join(f"Update {n}" for n in names) + " | edits (erase/update) |",
                  "|---|---|" + "---|" * (2 * len(names) + 1)]
        for kind in ("K_I", "K_II"):
            for set_kind in EDIT_SETS:
                cells, counts = [], []
                for op in EDIT_OPS:
                    r = g[(g["kind"] == kind) & (g["set"] == set_kind) & (g["op"] == op)]
                    cells += [_f(float(r[m].iloc[0])) if len(r) else "–" for m in metrics]
                    counts.append(str(int(r["n_edits"].iloc[0])) if len(r) else "–")
                if all(c == "–" for c in counts):
                    continue
                lines.append(f"| {kind} | {SET_LABELS[set_kind]} | " + " | ".join(cells)
                             + f" | {'/'.join(counts)} |")
        lines.append("")
    lines.append("CAS: neurons with CAS = 0.7 μ − 0.3 σ of the max-normalized attribution "
                 "over the fact's queries above 0.3 × max CAS, chosen among ∪ N_i (so the "
                 "set is a subset of N_g). Rel and Gen of erasure are 1 − accuracy; higher "
                 "is better except ΔPPL.")
    return "\n".join(lines)


def write_table1(store: RunStore, res: ConsistencyResult) -> str:
    """``table1.csv``, ``table1.md`` and ``consistency_skipped.csv``; returns the Markdown."""
    md = cons.table1_markdown(res.table1)
    res.table1.to_csv(store.path("table1.csv"), index=False)
    store.path("table1.md").write_text(md + "\n")
    res.skipped.to_csv(store.path("consistency_skipped.csv"), index=False)
    return md


def write_tables23(store: RunStore, res: ModifyResult) -> tuple[str, str | None]:
    """``table2.csv``/``.md`` and, with CAS edits, ``table3.csv``/``.md``; returns the
    Markdown of both (None for a missing Table 3)."""
    note = corpus_note(res.ppl)
    md2 = table2_markdown(res.table2, corpus_note=note)
    res.table2.to_csv(store.path("table2.csv"), index=False)
    store.path("table2.md").write_text(md2 + "\n")
    md3 = None
    if res.table3 is not None:
        md3 = table3_markdown(res.table3, corpus_note=note)
        res.table3.to_csv(store.path("table3.csv"), index=False)
        store.path("table3.md").write_text(md3 + "\n")
    return md2, md3


def write_figure4(store: RunStore, res: MappingResult) -> None:
    """``figure4.csv``."""
    res.figure4.to_csv(store.path("figure4.csv"), index=False)


def write_figures56(store: RunStore, res: AttentionResult) -> None:
    """``figure5.csv`` and ``figure6.csv``."""
    res.figure5.to_csv(store.path("figure5.csv"), index=False)
    res.figure6.to_csv(store.path("figure6.csv"), index=False)


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
