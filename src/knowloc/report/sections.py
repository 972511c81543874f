"""The sections and prose of ``knowloc reproduce``'s report (rendered by :mod:`.html`)."""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from ..attribution import get_method, method_names, sort_methods
from ..neurons import Selection
from ..pipeline.attention import AttentionResult
from ..pipeline.consistency import ConsistencyResult
from ..pipeline.mapping import MappingResult
from ..pipeline.modify import ModifyResult
from ..store import RunStore, write_csv
from .figures import kn_layers, method_label
from .html import Section, build_report
from .stages import Shown
from .stats import SPREAD_NOTE
from .tables import (
    EXAMPLES_DISPLAY,
    FIGURE5_DISPLAY,
    LOCALIZATION_DISPLAY,
    SCREEN_DISPLAY,
    corpus_note,
    edit_display,
    figure4_display,
    figure6_display,
    format_table,
    localization_summary,
    screen_summary,
    table1_display,
    table3_display,
)

log = logging.getLogger(__name__)

HEATMAP_CAPTIONS = {"figure1": "Figure 1: as is", "figure7": "Figure 7: synapses suppressed",
                    "figure10": "Figure 10: synapses enhanced"}


def violin_caption(method: str) -> str:
    """Caption of a method's CS2 violin, with the paper's figure number when it has one."""
    figure = get_method(method).figure if method in method_names() else None
    return f"CS2 per relation, {method_label(method)}" + (f" (Figure {figure})" if figure else "")


def effective_configuration(config: dict[str, Any], queries: pd.DataFrame) -> str:
    """What the run actually computed, in words: from its ``config.yaml`` (methods, steps)
    and its tables (relations, facts, queries per fact)."""
    loc = config.get("localize", {})
    methods = sort_methods(queries["method"]) if len(queries) else list(loc.get("methods", []))
    per_fact = queries.drop_duplicates("query_id").groupby("fact_id").size() \
        if len(queries) else pd.Series(dtype=int)
    n_rel = queries["relation"].nunique() if len(queries) else 0
    qpf = (f"{per_fact.min()}" if per_fact.min() == per_fact.max()
           else f"{per_fact.min()}–{per_fact.max()}") if len(per_fact) else "0"
    steps = config.get("fingerprint", {}).get("n_steps", loc.get("n_steps"))
    target = ("whole answer (teacher-forced)" if loc.get("target") == "all"
              else "first answer token")
    return (f"{n_rel} relation{'s' if n_rel != 1 else ''}, {len(per_fact)} facts, "
            f"{qpf} queries per fact ({queries['query_id'].nunique() if len(queries) else 0} "
            f"queries), {'/'.join(method_label(m).split(' ')[0] for m in methods)}, "
            f"{steps} steps, target: {target}")


def timing_text(timings: pd.DataFrame, last: dict[str, float]) -> str:
    """Cumulative localization time over every invocation (the ``timings`` table) and what
    the last invocation took, stage by stage."""
    total = float(timings["seconds"].sum()) if len(timings) else 0.0
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in last.items() if k != "total")
    return (f"Localization compute, all invocations together: {total:.0f} s over "
            f"{len(timings)} (method, query) pairs. The last invocation took "
            f"{last.get('total', float('nan')):.0f} s ({stages}).")


def overview_section(model: dict[str, Any], preset: str, effective: str, selection: Selection,
                     population: str, timing: str = "") -> Section:
    """The run in a paragraph: model, what was computed (``effective``), selection,
    population, and (``timing``) how long it took."""
    return Section(
        title="Overview",
        html=(
            f"<p>Model <b>{html.escape(model['name'])}</b> ({model['adapter']} adapter, "
            f"{model['n_layers']} layers &times; {model['d_mlp']} MLP neurons). Preset "
            f"<b>{html.escape(preset)}</b>, as run: {html.escape(effective)}. Knowledge "
            f"neurons of a query: attribution &gt; {selection.value} &times; max "
            f"({selection.mode}). Population: facts whose answer is the model's top-1 on at "
            f"least one query ({'applied' if population == 'known' else 'not applied: all facts'}"
            f").</p>" + (f"<p>{html.escape(timing)}</p>" if timing else "") +
            "<p>The paper (Chen et al., ICLR 2025) reports that most facts are K<sub>II</sub>: "
            "their paraphrased queries do not share knowledge neurons, against the "
            "knowledge-localization assumption.</p>"
        ),
    )


def localization_section(store: RunStore, queries: pd.DataFrame, screened: pd.DataFrame,
                         n_layers: int) -> Section:
    """Knowledge neurons per query by method, convergence of the attributions, screening
    per relation, KNs per layer."""
    from .convergence import convergence_display, convergence_note, convergence_summary

    neurons = store.table("neuron_sets")
    if len(neurons):
        neurons = neurons[neurons["query_id"].isin(set(queries["query_id"]))]
    summary = localization_summary(queries)
    write_csv(store.path("localization_summary.csv"), summary)
    layer_png, layer_csv = kn_layers(store, neurons, n_layers)
    tables: list[tuple[str, pd.DataFrame, Path | None]] = [
        ("Knowledge neurons per query, by method", format_table(summary, LOCALIZATION_DISPLAY),
         store.path("localization_summary.csv"))]
    convergence = convergence_summary(queries)
    write_csv(store.path("convergence_summary.csv"), convergence)
    tables.append(("Convergence of the attributions (completeness gap), by method",
                   convergence_display(convergence),
                   store.path("convergence_summary.csv")))
    if len(screened):  # a run localized without screening (knowloc localize) has none
        screened_summary = screen_summary(screened)
        write_csv(store.path("screen_summary.csv"), screened_summary)
        tables.append(("Screened queries per relation (one forward pass each)",
                       format_table(screened_summary, SCREEN_DISPLAY),
                       store.path("screen_summary.csv")))
    examples = queries.sort_values(["method", "relation", "query_id"]).head(30)[
        ["method", "relation", "prompt", "answer", "predicted", "prob", "known", "n_neurons"]]
    tables.append(("Example queries (first 30)", format_table(examples, EXAMPLES_DISPLAY), None))
    return Section(
        title="Localization",
        html=convergence_note(convergence),
        tables=tables,
        figures=[("Share of knowledge neurons per layer", layer_png, layer_csv)],
    )


def consistency_section(store: RunStore, cres: ConsistencyResult, shown: Shown) -> Section:
    return Section(
        title="Consistency analysis (Table 1)",
        html=(
            "<p>CS<sub>1</sub> = |&cap; N<sub>i</sub>| / |&cup; N<sub>i</sub>|, "
            "CS<sub>2</sub> = share of the union found in more than one query's set. Facts "
            f"with CS<sub>2</sub> &gt; T are K<sub>I</sub>; St: static T = "
            f"{cres.static_threshold}, Ot: Otsu's threshold per method. t, p: Welch's t-test "
            "between the CS<sub>2</sub> of K<sub>I</sub> and K<sub>II</sub>. &cap;:II: share "
            "of facts every method puts in K<sub>II</sub>.</p>"
        ),
        tables=[("Table 1", table1_display(cres.table1), store.path("table1.csv")),
                ("Facts skipped by the consistency analysis", cres.skipped,
                 store.path("consistency_skipped.csv"))],
        figures=[(violin_caption(m), png, csv) for m, (png, csv) in shown.figures.items()],
    )


def modification_sections(store: RunStore, mres: ModifyResult | None,
                          ires: MappingResult | None, ishown: Shown | None) -> list[Section]:
    """Table 2 and Figure 4."""
    sections = []
    if mres is not None:
        note = html.escape(corpus_note(mres.ppl))
        sections.append(Section(
            title="Knowledge modification (Table 2)",
            html=(
                "<p>For each known query q<sub>i</sub> of a K<sub>I</sub>/K<sub>II</sub> fact, "
                "the value vectors of its knowledge neurons N<sub>i</sub> (local) or of the "
                "union N<sub>g</sub> over the fact's queries (global) are erased (set to 0) or "
                "updated (v &minus; 2E(o) + 2E(o&prime;), o&prime; another object of the same "
                "relation), evaluated, and restored bit for bit. Rel and Gen of erasure are "
                "1 &minus; accuracy on q<sub>i</sub> and on the neighbor queries the unedited "
                "model answers correctly; update: accuracy of o&prime;. Loc: share of "
                f"{mres.edits['n_loc'].max() if len(mres.edits) else 0} unrelated queries "
                "(facts of other relations) whose top-1 is unchanged. "
                f"&Delta;PPL on {mres.ppl['n_entries']} entries drawn per edit (first "
                f"{mres.ppl['max_tokens']} tokens each). <b>{note}</b> Empty neuron sets "
                "are counted, never averaged as successes. " + SPREAD_NOTE + ".</p>"),
            tables=[("Table 2", edit_display(mres.table2), store.path("table2.csv"))],
        ))
    if ires is not None and ishown is not None:
        sections.append(Section(
            title="Query-KN mapping (Figure 4)",
            html=(
                "<p>Activations of the knowledge neurons at the last position are suppressed "
                "(&times;0) or enhanced (&times;2), for the query's own set (Self N<sub>i</sub>) "
                "and for neighbor sets over the other queries j &ne; i: Union, Intersection, "
                "Refine (in more than one N<sub>j</sub>). &Delta;Prob = &plusmn;(P<sub>a</sub> "
                "&minus; P<sub>b</sub>)/P<sub>b</sub>, &minus; for suppression; Avg is their "
                "mean. Known queries only; a query whose neighbor set is empty is counted in "
                "n_empty and left out of the means. " + SPREAD_NOTE + "; the figures' error "
                "bars are these intervals.</p>"),
            tables=[("Figure 4 data (mean ΔProb)", figure4_display(ires.figure4),
                     store.path("figure4.csv"))],
            figures=[(f"Query-KN mapping, {method_label(m)} (Figure 4)", png, csv)
                     for m, (png, csv) in ishown.figures.items()],
        ))
    return sections


def attention_sections(store: RunStore, mres: ModifyResult | None, ares: AttentionResult | None,
                       ashown: Shown | None) -> list[Section]:
    """Figures 5, 6, the heatmaps (1, 7, 10) and Table 3."""
    sections = []
    if ares is not None and ashown is not None:
        pred = ares.figure5
        share = (ares.queries["n_synapses_first"].sum() / max(1, ares.queries["n_synapses"].sum())
                 if len(ares.queries) else float("nan"))
        what = {"as-defined": " as defined", "no-first": ", position 0 excluded"}
        fig5: list[tuple[str, Path, Path | None]] = [
            (f"Predominance, {method_label(m)} split (Figure 5)", *ashown.figures[f"figure5_{m}"])
            for m in ares.methods]
        fig6: list[tuple[str, Path, Path | None]] = [
            (f"Knowledge synapses{what[v]}, {method_label(m)} KNs (Figure 6)",
             *ashown.figures[f"figure6_{m}_{v}"])
            for m in ares.methods for v in ("as-defined", "no-first")]
        sections.append(Section(
            title="Dynamic KN selection: predominance (Figure 5)",
            html=(
                "<p>For each query, the most attended token t<sub>i</sub>: the argmax over "
                "positions c of the attention it receives, &Sigma;<sub>r</sub> "
                "A<sup>(r,c)</sup> averaged over layers and heads (eager attention). "
                "Predominance P of a fact = the largest share of its queries that agree on "
                "t<sub>i</sub> (tokens compared by text). Shown with the first position "
                "(BOS / attention sink), which wins almost every query in models with a sink, "
                "and without it. Split K<sub>I</sub>/K<sub>II</sub> by CS<sub>2</sub> of the "
                f"method's knowledge neurons. {len(set(pred['fact_id']))} facts.</p>"),
            tables=[("Figure 5 data (P per fact)", format_table(pred, FIGURE5_DISPLAY),
                     store.path("figure5.csv"))],
            figures=fig5,
        ))
        sections.append(Section(
            title="Knowledge synapses (Figure 6)",
            html=(
                "<p>Knowledge synapses S = {(c, l, h) : &Sigma;<sub>r</sub> "
                "A<sub>(l,h)</sub><sup>(r,c)</sup> &gt; &tau;}, &tau; = 0.3 &middot; mean column "
                "mass. Their post-softmax weights are suppressed (&times;0) or enhanced "
                "(&times;2) in every row, for the query's own synapses (Self) and, for "
                "comparison, for those of a query of a fact of another relation (Irrelevant, "
                "seeded, clipped to the prompt length). &Delta;Value: relative change of the "
                "mean activation of the query's knowledge neurons; &Delta;Prob: of P(answer); "
                "sign &minus; for suppression (positive = the expected direction). "
                f"<b>{share:.0%} of the synapses as defined sit at position 0</b> (the "
                "BOS / sink token, one per head), so suppressing them disables attention for "
                "any prompt and the Self / Irrelevant comparison saturates; the variant with "
                "position 0 excluded from both sets is shown beside it. Known queries only "
                "(unless the stage ran with --all-queries). " + SPREAD_NOTE + "; the "
                "figures' error bars are these intervals.</p>"),
            tables=[("Figure 6 data (mean ΔValue / ΔProb)", figure6_display(ares.figure6),
                     store.path("figure6.csv"))],
            figures=fig6,
        ))
        figs: list[tuple[str, Path, Path | None]] = []
        for kind, by_fig in ashown.heatmaps.items():
            for fig, (png, csv) in by_fig.items():
                figs.append((f"{kind} fact, two neighbor queries — {HEATMAP_CAPTIONS[fig]}",
                             png, csv))
        if figs:
            sections.append(Section(
                title="Activation heatmaps (Figures 1, 7, 10)",
                html=(
                    "<p>Last-position activations (layers &times; a window of neurons: the "
                    "knowledge neurons' indices, circled, then the largest |activation|) of two "
                    "neighbor queries of one K<sub>I</sub> and one K<sub>II</sub> fact, as is "
                    "(Figure 1) and with each query's knowledge synapses suppressed (Figure 7) "
                    "or enhanced (Figure 10), as defined and with position 0 excluded.</p>"),
                figures=figs,
            ))
    if mres is not None and mres.table3 is not None:
        sections.append(Section(
            title="Consistency-Aware KN modification (Table 3)",
            html=(
                "<p>CAS<sub>lp</sub> = 0.7 &mu;<sub>lp</sub> &minus; 0.3 &sigma;<sub>lp</sub> of "
                "the max-normalized attribution of neuron (l, p) over the fact's queries; the "
                "edit set is the neurons with CAS &gt; 0.3 &middot; max CAS, chosen among the "
                "union of the queries' knowledge neurons (a subset of N<sub>g</sub>; the "
                "paper's unrestricted version is <code>knowloc.neurons.cas_neurons</code> "
                "without <code>candidates</code>), edited for all the fact's known queries "
                "at once like N<sub>g</sub>. Same erasure / update evaluation as Table 2. "
                f"<b>{html.escape(corpus_note(mres.ppl))}</b></p>"),
            tables=[("Table 3", table3_display(mres.table3), store.path("table3.csv"))],
        ))
    return sections


def write_report(store: RunStore, *, title: str, overview: Section, queries: pd.DataFrame,
                 screened: pd.DataFrame, n_layers: int, consistency: tuple[ConsistencyResult, Shown],
                 modification: ModifyResult | None = None,
                 mapping: tuple[MappingResult, Shown] | None = None,
                 attention: tuple[AttentionResult, Shown] | None = None,
                 run_info: dict[str, Any]) -> Path:
    """Write ``report.html``: overview, localization, Table 1, then what the run computed."""
    ires, ishown = mapping if mapping is not None else (None, None)
    ares, ashown = attention if attention is not None else (None, None)
    sections = [overview, localization_section(store, queries, screened, n_layers),
                consistency_section(store, *consistency)]
    sections += modification_sections(store, modification, ires, ishown)
    sections += attention_sections(store, modification, ares, ashown)
    return build_report(store.path("report.html"), title=title, sections=sections,
                        run_info=run_info)
