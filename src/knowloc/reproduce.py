"""``knowloc reproduce``: every experiment end to end, then one self-contained report.html.

Presets (all documented in the README):

* ``quick``    built-in facts, 6 relations, 2 known facts each, 4 queries per fact,
               IG/SIG/AMIG at 20 steps; modification (Tables 2, 3), query-KN mapping
               (Figure 4) and the attention experiments (Figures 1, 5, 6, 7, 10) with AMIG's
               knowledge neurons only: under 30 min on a 2-core CPU.
* ``standard`` ParaRel (give ``--dataset pararel:<dir>``), every relation with >= 2 usable
               templates, the first 2 known facts of each, all their queries, all methods.
* ``paper``    ParaRel, every fact the model knows, all methods, 20 steps (the paper's
               setting; days on a CPU: use a GPU).
"""

from __future__ import annotations

import html
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import ConfigError
from .neurons import Selection

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    dataset: str = "builtin"
    relations: tuple[str, ...] | None = None
    known_per_relation: int | None = None
    max_queries_per_fact: int | None = None
    methods: tuple[str, ...] = ("ig", "sig", "amig")
    n_steps: int = 20
    population: str = "known"
    max_screen_per_relation: int | None = None
    static_threshold: float = 0.1
    selection: Selection = field(default_factory=Selection)
    # knowledge modification (Table 2) and query-KN mapping (Figure 4)
    modify: bool = True
    modify_methods: tuple[str, ...] | None = None  # None: every localized method
    ppl_max_tokens: int = 128
    ppl_pool: int = 25
    cas: bool = True  # Table 3: the Consistency-Aware set next to N_i, N_g
    # dynamic KN selection (Figures 1, 5, 6, 7, 10), with the modification methods' KNs
    attention: bool = True


PRESETS: dict[str, Preset] = {
    "quick": Preset(
        name="quick",
        description="built-in facts: 6 relations x 2 known facts x 4 queries, IG/SIG/AMIG, "
        "20 steps",
        dataset="builtin",
        relations=("P36", "P37", "P30", "P1376", "P103", "P495"),
        known_per_relation=2,
        max_queries_per_fact=4,
        modify_methods=("amig",),
        ppl_max_tokens=64,
        ppl_pool=30,
    ),
    "standard": Preset(
        name="standard",
        description="ParaRel: every relation with >= 2 usable templates, its first 2 known "
        "facts among its first 60, up to 4 queries each, IG/SIG/AMIG, 20 steps",
        dataset="pararel",
        known_per_relation=2,
        max_queries_per_fact=4,
        max_screen_per_relation=60,
    ),
    "paper": Preset(
        name="paper",
        description="ParaRel: every fact the model knows, all queries, IG/SIG/AMIG, 20 steps "
        "(the paper's setting)",
        dataset="pararel",
    ),
}


def resolve_preset(name: str, dataset: str | None = None, **overrides: Any) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    preset = PRESETS[name]
    if dataset is not None:
        preset = replace(preset, dataset=dataset)
        if not dataset.startswith("builtin") and name == "quick":
            preset = replace(preset, relations=None)
    if preset.dataset == "pararel":
        raise ConfigError(
            f"preset {name!r} runs on ParaRel: give --dataset pararel:<dir> "
            "(e.g. pararel:../shared/data/pararel)"
        )
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return replace(preset, **overrides)


def _timed(timings: dict[str, float], name: str):
    class _T:
        def __enter__(self):
            self.t = time.time()

        def __exit__(self, *a):
            timings[name] = round(time.time() - self.t, 1)
            return False

    return _T()


def reproduce(
    out: str | Path,
    *,
    model: Any = "gemma3-270m",
    preset: Preset | str = "quick",
    device: str = "cpu",
    dtype: str = "float32",
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    ppl_text: str | Path | None = None,
) -> Path:
    """Run the preset's experiments into ``out`` and write ``out/report.html``."""
    from .data import load_facts
    from .evaluation import load_ppl_corpus
    from .experiments import (
        AttentionConfig,
        LocalizeConfig,
        MappingConfig,
        ModifyConfig,
        attention_experiment,
        consistency,
        localize,
        model_fingerprint,
        modify,
        query_kn_mapping,
        screen,
        seed_everything,
        select_population,
    )
    from .models import load_model
    from .store import RunStore, environment_info

    p = resolve_preset(preset) if isinstance(preset, str) else preset
    timings: dict[str, float] = {}
    t0 = time.time()
    with _timed(timings, "load data"):
        facts = load_facts(p.dataset, relations=p.relations,
                           max_queries_per_fact=p.max_queries_per_fact, seed=seed)
    seed_everything(seed)
    with _timed(timings, "load model"):
        if isinstance(model, str):
            model = load_model(model, device=device, dtype=dtype)
    model_name = model.name
    store = RunStore(out)
    cfg = LocalizeConfig(methods=p.methods, n_steps=p.n_steps, selection=p.selection)
    edit_methods = [m for m in p.methods if p.modify_methods is None or m in p.modify_methods]
    edit_methods = edit_methods or list(p.methods[:1])
    mcfg = ModifyConfig(methods=edit_methods, split_threshold=p.static_threshold,
                        sets=("local", "global", "cas") if p.cas else ("local", "global"),
                        ppl_max_tokens=p.ppl_max_tokens, ppl_pool=p.ppl_pool, seed=seed).validate()
    icfg = MappingConfig(methods=edit_methods, split_threshold=p.static_threshold)
    acfg = AttentionConfig(methods=edit_methods, split_threshold=p.static_threshold,
                           seed=seed).validate()
    corpus = load_ppl_corpus(ppl_text) if p.modify else None  # fail before any work
    config = {
        "fingerprint": {"model": model_fingerprint(model), "n_steps": p.n_steps,
                        "sig_mode": cfg.sig_mode, "selection": p.selection.as_dict()},
        "preset": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(p).items()},
        "model": {"name": model_name, "device": device, "dtype": dtype},
        "dataset": {"source": facts.source, "n_facts_loaded": len(facts),
                    "n_queries_loaded": len(facts.queries()), "skipped": dict(facts.skipped)},
        "localize": cfg.as_dict(),
        "seed": seed,
    }
    if p.modify:
        config["modify"] = {**mcfg.as_dict(), "ppl_text": corpus.source if corpus else None}
        config["intervene"] = icfg.as_dict()
    if p.attention:
        config["attention"] = acfg.as_dict()
    store.write_config(config, overwrite=overwrite)
    store.write_env(environment_info({"command": "reproduce", "preset": p.name}))

    with _timed(timings, "screen (one forward per query)"):
        screened = screen(model, facts, store, progress=progress,
                          known_per_relation=p.known_per_relation
                          if p.population == "known" else None,
                          max_per_relation=p.max_screen_per_relation)
    population, removed = select_population(facts, screened, population=p.population,
                                            known_per_relation=p.known_per_relation)
    if not population.facts:
        raise ConfigError(
            f"no fact of {facts.source} passes the population filter ({p.population}); "
            "try --population all or another dataset"
        )
    log.info("population: %d facts, %d queries (removed: %s)", len(population),
             len(population.queries()), removed or "none")
    with _timed(timings, "localize"):
        loc = localize(model, population, store, cfg, progress=progress)
    query_ids = {q.query_id for q in population.queries()}
    with _timed(timings, "consistency"):
        cres = consistency(store, population=p.population, static_threshold=p.static_threshold,
                           query_ids=query_ids)
    mres = ires = ares = None
    has_split = bool(cres.scores["skipped"].isna().any())
    if (p.modify or p.attention) and not has_split:
        log.warning("no fact passed the consistency filters: knowledge modification and "
                    "attention experiments skipped")
    if p.modify and has_split:
        with _timed(timings, "modify (Tables 2, 3)" if p.cas else "modify (Table 2)"):
            mres = modify(model, store, mcfg, ppl_text=ppl_text, query_ids=query_ids,
                          progress=progress)
        with _timed(timings, "query-KN mapping (Figure 4)"):
            ires = query_kn_mapping(model, store, icfg, query_ids=query_ids, progress=progress)
    if p.attention and has_split:
        with _timed(timings, "attention (Figures 1, 5, 6, 7, 10)"):
            ares = attention_experiment(model, store, acfg, query_ids=query_ids,
                                        progress=progress)
    timings["total"] = round(time.time() - t0, 1)

    sizes = {
        "facts loaded": len(facts),
        "queries loaded": len(facts.queries()),
        "relations": len(population.relations),
        "facts localized": len(population),
        "queries localized": len(population.queries()),
        "methods": ", ".join(p.methods),
    }
    skipped_items = [{"stage": "dataset", "reason": k, "count": v} for k, v in facts.skipped.items()]
    skipped_items += [{"stage": "population", "reason": k, "count": v} for k, v in removed.items()]
    sk = cres.skipped
    skipped_items += [{"stage": f"consistency ({r.method})", "reason": r.reason,
                       "count": int(r.n_facts)} for r in sk.itertuples()
                      if r.reason != "kept" and r.n_facts]
    queries = loc.queries[loc.queries["query_id"].isin(query_ids)]
    tt = store.table("timings")
    if len(tt):
        queries = queries.merge(tt[["method", "query_id", "seconds"]].drop_duplicates(
            ["method", "query_id"]), on=["method", "query_id"], how="left")
    else:
        queries = queries.assign(seconds=float("nan"))
    path = _write_report(store, p, model, config, sizes, skipped_items, timings, screened,
                         queries, cres, mres, ires, ares)
    print(f"report: {path}")
    return path


def _localization_summary(queries: pd.DataFrame) -> pd.DataFrame:
    g = queries.groupby("method", sort=False)
    out = g.agg(queries=("query_id", "count"), known_share=("known", "mean"),
                mean_prob=("prob", "mean"), mean_neurons=("n_neurons", "mean"),
                median_neurons=("n_neurons", "median"), empty_sets=("n_neurons", lambda s: int((s == 0).sum())),
                seconds_per_query=("seconds", "mean")).reset_index()
    order = {m: i for i, m in enumerate(("ig", "sig", "amig"))}
    return out.sort_values("method", key=lambda s: s.map(lambda m: order.get(m, 99))).reset_index(drop=True)


def _layer_figure(store, neurons: pd.DataFrame, n_layers: int) -> tuple[Path, Path]:
    from matplotlib.figure import Figure

    from .plots import save_figure

    counts = (neurons.groupby(["method", "layer"]).size().rename("n").reset_index()
              if len(neurons) else pd.DataFrame(columns=["method", "layer", "n"]))
    fig = Figure(figsize=(8, 3.6))
    ax = fig.add_subplot()
    methods = [m for m in ("ig", "sig", "amig") if m in set(counts["method"])]
    width = 0.8 / max(1, len(methods))
    rows = []
    for i, m in enumerate(methods):
        c = counts[counts["method"] == m].set_index("layer")["n"].reindex(range(n_layers), fill_value=0)
        share = c / max(1, c.sum())
        ax.bar([x + i * width for x in range(n_layers)], share.values, width=width, label=m.upper())
        rows += [{"method": m, "layer": int(k), "n_neurons": int(c[k]), "share": float(share[k])}
                 for k in range(n_layers)]
    ax.set_xlabel("layer")
    ax.set_ylabel("share of knowledge neurons")
    ax.set_title("Where knowledge neurons sit (all localized queries)")
    ax.legend()
    fig.tight_layout()
    png = store.path("figures", "kn_layers.png")
    save_figure(fig, png, pd.DataFrame(rows))
    return png, png.with_suffix(".csv")


def _modification_sections(store, mres, ires) -> list:
    from .experiments import _corpus_note
    from .report import Section

    sections = []
    if mres is not None:
        note = html.escape(_corpus_note(mres.ppl))
        t2 = mres.table2
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
                "are counted, never averaged as successes.</p>"),
            tables=[("Table 2", t2, store.path("table2.csv"))],
        ))
    if ires is not None:
        sections.append(Section(
            title="Query-KN mapping (Figure 4)",
            html=(
                "<p>Activations of the knowledge neurons at the last position are suppressed "
                "(&times;0) or enhanced (&times;2), for the query's own set (Self N<sub>i</sub>) "
                "and for neighbor sets over the other queries j &ne; i: Union, Intersection, "
                "Refine (in more than one N<sub>j</sub>). &Delta;Prob = &plusmn;(P<sub>a</sub> "
                "&minus; P<sub>b</sub>)/P<sub>b</sub>, &minus; for suppression; Avg is their "
                "mean. Known queries only; a query whose neighbor set is empty is counted in "
                "n_empty and left out of the means.</p>"),
            tables=[("Figure 4 data (mean ΔProb)", ires.figure4, store.path("figure4.csv"))],
            figures=[(f"Query-KN mapping, {m.upper()} (Figure 4)", png, csv)
                     for m, (png, csv) in ires.figures.items()],
        ))
    return sections


def _attention_sections(store, mres, ares) -> list:
    from .experiments import _corpus_note
    from .report import Section

    sections = []
    if ares is not None:
        pred = ares.figure5
        share = (ares.queries["n_synapses_first"].sum() / max(1, ares.queries["n_synapses"].sum())
                 if len(ares.queries) else float("nan"))
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
            tables=[("Figure 5 data (P per fact)", pred, store.path("figure5.csv"))],
            figures=[(f"Predominance, {k.split('_', 1)[1].upper()} split (Figure 5)", png, csv)
                     for k, (png, csv) in ares.figures.items() if k.startswith("figure5_")],
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
                "(unless the stage ran with --all-queries).</p>"),
            tables=[("Figure 6 data (mean ΔValue / ΔProb)", ares.figure6,
                     store.path("figure6.csv"))],
            figures=[(("Knowledge synapses as defined, " if k.endswith("as-defined") else
                       "Knowledge synapses, position 0 excluded, ")
                      + f"{k.split('_')[1].upper()} KNs (Figure 6)", png, csv)
                     for k, (png, csv) in ares.figures.items() if k.startswith("figure6_")],
        ))
        figs = []
        names = {"figure1": "Figure 1: as is", "figure7": "Figure 7: synapses suppressed",
                 "figure10": "Figure 10: synapses enhanced"}
        for kind, by_fig in ares.heatmaps.items():
            for fig, (png, csv) in by_fig.items():
                figs.append((f"{kind} fact, two neighbor queries — {names[fig]}", png, csv))
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
                f"<b>{html.escape(_corpus_note(mres.ppl))}</b></p>"),
            tables=[("Table 3", mres.table3, store.path("table3.csv"))],
        ))
    return sections


def _write_report(store, p, model, config, sizes, skipped_items, timings, screened, queries, cres,
                  mres=None, ires=None, ares=None):
    from .report import Section, build_report

    neurons = store.table("neuron_sets")
    if len(neurons):
        neurons = neurons[neurons["query_id"].isin(set(queries["query_id"]))]
    summary = _localization_summary(queries)
    summary.to_csv(store.path("localization_summary.csv"), index=False)
    layer_png, layer_csv = _layer_figure(store, neurons, model.n_layers)
    screened_summary = (screened.groupby("relation").agg(queries=("query_id", "count"),
                                                         known_share=("known", "mean"),
                                                         mean_prob=("prob", "mean")).reset_index())
    screened_summary.to_csv(store.path("screen_summary.csv"), index=False)
    examples = queries.sort_values(["method", "relation", "query_id"]).head(30)[
        ["method", "relation", "prompt", "answer", "predicted", "prob", "known", "n_neurons"]]

    sections = [
        Section(
            title="Overview",
            html=(
                f"<p>Model <b>{html.escape(model.name)}</b> ({model.adapter.name} adapter, "
                f"{model.n_layers} layers &times; {model.d_mlp} MLP neurons). Preset "
                f"<b>{p.name}</b>: {html.escape(p.description)}. Knowledge neurons of a query: "
                f"attribution &gt; {p.selection.value} &times; max ({p.selection.mode}). "
                f"Population: facts whose answer is the model's top-1 on at least one query "
                f"({'applied' if p.population == 'known' else 'not applied: all facts'}).</p>"
                "<p>The paper (Chen et al., ICLR 2025) reports that most facts are K<sub>II</sub>: "
                "their paraphrased queries do not share knowledge neurons, against the "
                "knowledge-localization assumption.</p>"
            ),
        ),
        Section(
            title="Localization",
            tables=[("Knowledge neurons per query, by method", summary,
                     store.path("localization_summary.csv")),
                    ("Screened queries per relation (one forward pass each)", screened_summary,
                     store.path("screen_summary.csv")),
                    ("Example queries (first 30)", examples, None)],
            figures=[("Share of knowledge neurons per layer", layer_png, layer_csv)],
        ),
        Section(
            title="Consistency analysis (Table 1)",
            html=(
                "<p>CS<sub>1</sub> = |&cap; N<sub>i</sub>| / |&cup; N<sub>i</sub>|, "
                "CS<sub>2</sub> = share of the union found in more than one query's set. Facts "
                f"with CS<sub>2</sub> &gt; T are K<sub>I</sub>; St: static T = {p.static_threshold}, "
                "Ot: Otsu's threshold per method. t, p: Welch's t-test between the CS<sub>2</sub> "
                "of K<sub>I</sub> and K<sub>II</sub>. &cap;:II: share of facts every method "
                "puts in K<sub>II</sub>.</p>"
            ),
            tables=[("Table 1", cres.table1, store.path("table1.csv")),
                    ("Facts skipped by the consistency analysis", cres.skipped,
                     store.path("consistency_skipped.csv"))],
            figures=[(f"CS2 per relation, {m.upper()} (Figure {3 if m == 'ig' else 8 if m == 'sig' else 9})",
                      png, csv) for m, (png, csv) in cres.figures.items()],
        ),
    ]
    sections += _modification_sections(store, mres, ires)
    sections += _attention_sections(store, mres, ares)
    run_info = {
        "model": model.name,
        "dataset": config["dataset"]["source"],
        "sizes": sizes,
        "timings (s)": timings,
        "skipped": skipped_items,
        "config": config,
    }
    return build_report(store.path("report.html"), title=f"knowloc report: {model.name}, "
                        f"preset {p.name}", sections=sections, run_info=run_info)
