"""Attention experiments (Figures 1, 5, 6, 7, 10) and CAS modification (Table 3) as run
stages, commands and report sections, on a tiny LLaMA-architecture model saved to disk."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import cli_error

from knowloc.cli import main


@pytest.fixture(scope="module")
def analyzed(localized, tmp_path_factory) -> Path:
    """The run with consistency results and the attention stage done once."""
    out = tmp_path_factory.mktemp("analyzed") / "run"
    shutil.copytree(localized, out)
    assert main(["-q", "consistency", "--run", str(out), "--population", "all"]) == 0
    assert main(["-q", "attention", "--run", str(out), "--all-queries"]) == 0
    return out


def _model(run: Path):
    from knowloc.models import load_model

    cfg = __import__("yaml").safe_load((run / "config.yaml").read_text())
    return load_model(cfg["model"]["name"])




# ------------------------------------------------------------------------ attention stage
def test_attention_writes_its_tables_and_figures(analyzed):
    pred = pd.read_parquet(analyzed / "predominance.parquet")
    aq = pd.read_parquet(analyzed / "attention_queries.parquet")
    eff = pd.read_parquet(analyzed / "synapse_effects.parquet")
    split = pd.read_parquet(analyzed / "consistency.parquet")
    kept = split[split["skipped"].isna()]
    facts = set(kept["fact_id"])
    # two predominance rows per fact (first position allowed / excluded)
    assert set(pred["fact_id"]) == facts and len(pred) == 2 * len(facts)
    assert set(pred["first"]) == {True, False}
    assert pred["P"].between(0, 1).all()
    # one row per query; methods x queries x {as defined, no first} x {self, irr} x {sup, enh}
    assert len(aq) == aq["query_id"].nunique()
    methods = sorted(set(kept["method"]))
    assert len(eff) == len(methods) * len(aq) * 2 * 2 * 2
    assert set(eff["synapses"]) == {"self", "irrelevant"} and set(eff["operation"]) == {"sup", "enh"}
    assert (eff.loc[eff["first"], "n_synapses"] >= eff.loc[~eff["first"], "n_synapses"].values).all()
    # S_ir comes from a query of another relation
    rel = aq.set_index("query_id")["relation"]
    cat = pd.read_parquet(analyzed / "queries.parquet").drop_duplicates("query_id")
    rel_all = cat.set_index("query_id")["relation"]
    assert all(rel_all[i] != rel[q] for q, i in zip(aq["query_id"], aq["irrelevant_query_id"]))
    # Figure 5 / 6 tables and figures
    f5 = pd.read_csv(analyzed / "figure5.csv")
    assert set(f5["method"]) == set(methods) and set(f5["kind"]) <= {"K_I", "K_II"}
    f6 = pd.read_csv(analyzed / "figure6.csv")
    assert set(f6["operation"]) == {"sup", "enh", "avg"}
    assert set(f6["metric"]) == {"delta_value", "delta_prob"} and set(f6["first"]) == {True, False}
    for m in methods:
        for name in (f"figure5_{m}", f"figure6_{m}_as-defined", f"figure6_{m}_no-first"):
            assert (analyzed / "figures" / f"{name}.png").exists()
            assert (analyzed / "figures" / f"{name}.csv").exists()
    heat = list((analyzed / "figures").glob("heatmap_K_*_figure*.png"))
    assert heat and all(p.with_suffix(".csv").exists() for p in heat)
    # the figure 6 means are the means of the stored rows
    ok = eff.merge(kept.assign(kind=["K_I" if c > 0.1 else "K_II" for c in kept["cs2"]])[
        ["method", "fact_id", "kind"]])
    for r in f6[f6["operation"] != "avg"].head(8).itertuples():
        g = ok[(ok["method"] == r.method) & (ok["first"] == r.first) & (ok["kind"] == r.kind)
               & (ok["synapses"] == r.synapses) & (ok["operation"] == r.operation)]
        assert r.value == pytest.approx(g[r.metric].dropna().mean())


def test_attention_rows_match_the_library(analyzed):
    """A stored row equals synapse_effect computed directly (own synapses, x0 and x2)."""
    from knowloc.interventions.attention import attention_map, synapse_effect
    from knowloc.synapses import knowledge_synapses

    eff = pd.read_parquet(analyzed / "synapse_effects.parquet")
    ns = pd.read_parquet(analyzed / "neuron_sets.parquet")
    aq = pd.read_parquet(analyzed / "attention_queries.parquet").set_index("query_id")
    model = _model(analyzed)
    row = eff[(eff["synapses"] == "self") & (eff["n_neurons"] > 0)].iloc[0]
    q = aq.loc[row["query_id"]]
    kns = ns[(ns["method"] == row["method"]) & (ns["query_id"] == row["query_id"])]
    syn = knowledge_synapses(attention_map(model, q["prompt"]), exclude_first=not row["first"])
    e = synapse_effect(model, q["prompt"], q["answer"], syn, row["factor"],
                       list(zip(kns["layer"], kns["neuron"])))
    assert row["n_synapses"] == len(syn)
    assert row["prob_before"] == pytest.approx(e.prob_before, rel=1e-5)
    assert row["delta_prob"] == pytest.approx(e.delta_prob, rel=1e-4, abs=1e-6)
    assert row["delta_value"] == pytest.approx(e.delta_value, rel=1e-4, abs=1e-6)
    # unrelated synapses: clipped to the prompt, the clipped count recorded
    irr = eff[(eff["synapses"] == "irrelevant") & (eff["query_id"] == row["query_id"])
              & (eff["first"] == row["first"])].iloc[0]
    other = pd.read_parquet(analyzed / "queries.parquet").drop_duplicates("query_id")
    other = other.set_index("query_id").loc[irr["irrelevant_query_id"], "prompt"]
    s_ir = knowledge_synapses(attention_map(model, other), exclude_first=not row["first"])
    n = q["n_positions"]
    assert irr["n_synapses"] == len(s_ir.clip(n))
    assert irr["n_synapses"] + irr["n_clipped"] == len(s_ir)


def test_attention_rerun_computes_nothing(analyzed, capsys):
    before = {t: (analyzed / f"{t}.parquet").read_bytes()
              for t in ("predominance", "attention_queries", "synapse_effects")}
    heat = {p.name: p.stat().st_mtime_ns for p in (analyzed / "parts" / "heatmaps").glob("*")}
    capsys.readouterr()
    assert main(["-q", "attention", "--run", str(analyzed), "--all-queries"]) == 0
    out = capsys.readouterr().out
    assert "analyzed 0 fact(s)" in out and "Predominance P" in out
    for t, b in before.items():
        assert (analyzed / f"{t}.parquet").read_bytes() == b, t
    assert heat and {p.name: p.stat().st_mtime_ns
                     for p in (analyzed / "parts" / "heatmaps").glob("*")} == heat
    assert "attention" in __import__("yaml").safe_load((analyzed / "config.yaml").read_text())


# ----------------------------------------------------------------------------- CAS, Table 3
def test_modify_cas_table3_subsets_and_resume(run, capsys):
    from knowloc.pipeline.modify import cas_set
    from knowloc.pipeline.run import attribution_maps, read_run
    from knowloc.store import RunStore

    args = ["-q", "modify", "--run", str(run), "--set", "local,global,cas", "--ppl-pool", "6",
            "--ppl-max-tokens", "16"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "# Table 2" in out
    edits = pd.read_parquet(run / "edits.parquet")
    assert set(edits["set"]) == {"local", "global", "cas"}
    t2 = pd.read_csv(run / "table2.csv")
    assert set(t2["set"]) == {"local", "global"}  # Table 2 keeps N_i / N_g only
    t3 = pd.read_csv(run / "table3.csv")
    assert set(t3["set"]) == {"local", "global", "cas"} and set(t3["op"]) == {"erase", "update"}
    md = (run / "table3.md").read_text()
    assert "# Table 3" in md and "| CAS |" in md and "Erasure ΔPPL" in md and "Update Rel" in md
    # CAS sets: subsets of the union of the fact's query sets, non-empty when it has KNs
    model = _model(run)
    store = RunStore(run, create=False)
    facts = read_run(store, None, 0.1)
    att = attribution_maps(store, facts.methods)
    ok = edits[(edits["set"] == "cas") & (edits["status"] == "ok")]
    n_checked = 0
    for sp in facts.split.itertuples():
        qids = sorted(facts.queries.loc[(facts.queries["method"] == sp.method)
                                        & (facts.queries["fact_id"] == sp.fact_id), "query_id"])
        union = {n for q in qids for n in facts.neurons.get((sp.method, q), [])}
        cas = cas_set(att, facts.neurons, sp.method, qids, model.n_layers, model.d_mlp)
        assert set(cas) <= union
        assert bool(cas) == bool(union)
        rows = ok[(ok["method"] == sp.method) & (ok["fact_id"] == sp.fact_id)]
        assert (rows["n_neurons"] == len(cas)).all()
        n_checked += len(rows)
    assert n_checked
    # rerun: nothing recomputed
    before = (run / "edits.parquet").read_bytes()
    assert main(args) == 0
    assert "edited 0 unit(s)" in capsys.readouterr().out
    assert (run / "edits.parquet").read_bytes() == before


def test_cas_keys_leave_local_and_global_units_alone(run, capsys):
    """Asking for CAS later does not recompute the Table 2 units."""
    base = ["-q", "modify", "--run", str(run), "--op", "erase", "--method", "amig",
            "--ppl-pool", "4", "--ppl-max-tokens", "12"]
    assert main(base) == 0
    n = len([p for p in (run / "parts" / "edits").glob("*") if not p.name.startswith(".")])
    capsys.readouterr()
    assert main(base + ["--set", "local,global,cas"]) == 0
    out = capsys.readouterr().out
    facts = pd.read_parquet(run / "edits.parquet").query("method == 'amig'")["fact_id"].nunique()
    assert f"edited {facts} unit(s) ({n} already done)" in out


def test_cas_set_falls_back_to_the_best_candidate():
    """With queries whose KNs are disjoint, no CAS is positive (k >= 7): still non-empty."""
    import numpy as np

    from knowloc.neurons import consistency_aware_scores
    from knowloc.pipeline.modify import cas_set

    k, att, neurons = 8, {}, {}
    for i in range(k):
        q = f"q{i}"
        att[("ig", q)] = pd.DataFrame({"layer": [0], "neuron": [i], "attribution": [1.0]})
        neurons[("ig", q)] = [(0, i)]
    # query 0 also has neuron 9 at 0.9 x max: CAS 0.9 x that of the others, the least negative
    att[("ig", "q0")] = pd.DataFrame({"layer": [0, 0], "neuron": [0, 9], "attribution": [1.0, 0.9]})
    neurons[("ig", "q0")] = [(0, 0), (0, 9)]
    maps = [np.zeros((2, 10)) for _ in range(k)]
    for i in range(k):
        maps[i][0, i] = 1.0
    maps[0][0, 9] = 0.9
    assert (consistency_aware_scores(maps) <= 0).all()
    assert cas_set(att, neurons, "ig", [f"q{i}" for i in range(k)], 2, 10) == [(0, 9)]


# ------------------------------------------------------------------------------- heatmap
def test_heatmap_command(tiny_dir, tmp_path, capsys):
    out = tmp_path / "hm"
    assert main(["-q", "heatmap", "--model", str(tiny_dir), "--prompt",
                 "the official language of brazil is", "--prompt", "people in brazil speak",
                 "--answer", "portuguese", "--n-steps", "3", "--neurons", "16",
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "q1: P('portuguese')" in err and "knowledge neuron" in err
    f1 = pd.read_csv(out / "figure1.csv")
    assert len(f1) == 2 * 3 * 16 and set(f1["condition"]) == {"none"}  # 2 prompts x 3 layers
    assert f1["is_kn"].any()
    f7 = pd.read_csv(out / "figure7.csv")
    # the unchanged panel is kept beside the manipulated ones for the difference panels
    assert set(f7["condition"]) == {"none", "suppress", "suppress (position 0 excluded)"}
    f10 = pd.read_csv(out / "figure10.csv")
    assert set(f10["condition"]) == {"none", "enhance", "enhance (position 0 excluded)"}
    for name in ("figure1", "figure7", "figure10"):
        assert (out / f"{name}.png").stat().st_size > 1000
    # the unmanipulated activations are the model's
    from knowloc.interventions.attention import activation_matrix
    from knowloc.models import load_model

    acts = activation_matrix(load_model(str(tiny_dir)), "people in brazil speak")
    r = f1[f1["query"].str.startswith("q2")].iloc[5]
    assert r["activation"] == pytest.approx(float(acts[r["layer"], r["neuron"]]), rel=1e-5, abs=1e-6)


def test_heatmap_without_attribution(tiny_dir, tmp_path):
    out = tmp_path / "hm"
    assert main(["-q", "heatmap", "--model", str(tiny_dir), "--prompt", "people in spain speak",
                 "--answer", "spanish", "--method", "none", "--neurons", "8", "--out",
                 str(out)]) == 0
    assert not pd.read_csv(out / "figure1.csv")["is_kn"].any()


# ------------------------------------------------------------------------------ reproduce
def test_reproduce_adds_the_attention_and_cas_sections(tiny_dir, facts_file, tmp_path):
    from knowloc.report import report_manifest

    out = tmp_path / "rep"
    assert main(["-q", "reproduce", "--model", str(tiny_dir), "--dataset", f"jsonl:{facts_file}",
                 "--method", "ig,amig", "--n-steps", "3", "--population", "all",
                 "--out", str(out)]) == 0
    man = report_manifest(out / "report.html")
    assert {"dynamic-kn-selection-predominance-figure-5", "knowledge-synapses-figure-6",
            "activation-heatmaps-figures-1-7-10",
            "consistency-aware-kn-modification-table-3"} <= set(man["sections"])
    assert {"Table 3", "Figure 5 data (P per fact)",
            "Figure 6 data (mean ΔValue / ΔProb)"} <= set(man["tables"])
    captions = " ".join(man["figures"])
    for want in ("(Figure 5)", "(Figure 6)", "Figure 1", "Figure 7", "Figure 10"):
        assert want in captions, want
    assert not man["missing_figures"]
    for link in man["csv_links"]:
        assert (out / link).exists(), link
    # quick preset: attention and CAS with AMIG's neuron sets only
    assert set(pd.read_parquet(out / "synapse_effects.parquet")["method"]) == {"amig"}
    edits = pd.read_parquet(out / "edits.parquet")
    assert set(edits["set"]) == {"local", "global", "cas"} and set(edits["method"]) == {"amig"}
    cfg = __import__("yaml").safe_load((out / "config.yaml").read_text())
    assert cfg["attention"]["methods"] == ["amig"] and "cas" in cfg["modify"]["sets"]


def test_reproduce_no_attention(tiny_dir, facts_file, tmp_path):
    from knowloc.report import report_manifest

    out = tmp_path / "rep"
    assert main(["-q", "reproduce", "--model", str(tiny_dir), "--dataset", f"jsonl:{facts_file}",
                 "--method", "amig", "--n-steps", "3", "--population", "all", "--no-modify",
                 "--no-attention", "--out", str(out)]) == 0
    sections = set(report_manifest(out / "report.html")["sections"])
    assert "knowledge-synapses-figure-6" not in sections
    assert not (out / "synapse_effects.parquet").exists()


# --------------------------------------------------------------------------- clean errors
def test_attention_errors(localized, run, capsys, tmp_path):
    assert "does not exist" in cli_error(capsys, ["attention", "--run", str(tmp_path / "nope")])
    err = cli_error(capsys, ["attention", "--run", str(localized)])
    assert "no consistency results" in err and "knowloc consistency" in err
    assert "method(s) xyz not in the run" in cli_error(capsys, ["attention", "--run", str(run),
                                                             "--method", "xyz"])
    assert "unknown --set bogus" in cli_error(capsys, ["modify", "--run", str(run), "--set",
                                                    "cas,bogus"])
    assert "no consistency results" in cli_error(capsys, ["modify", "--run", str(localized),
                                                       "--set", "cas"])


def test_heatmap_errors(tiny_dir, capsys, tmp_path):
    base = ["heatmap", "--model", str(tiny_dir), "--prompt", "people in spain speak",
            "--prompt", "in spain people speak", "--out", str(tmp_path / "h")]
    assert "one --answer for all prompts or one per --prompt" in cli_error(
        capsys, base + ["--answer", "spanish", "--answer", "x", "--answer", "y"])
    assert "method" in cli_error(capsys, base + ["--answer", "spanish", "--method", "nope"])
    assert "--neurons must be >= 1" in cli_error(capsys, base + ["--answer", "spanish",
                                                              "--neurons", "0"])
