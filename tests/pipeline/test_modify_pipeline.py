"""`knowloc modify` / `knowloc intervene` stages and commands on a tiny model run."""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import WIKITEXT, cli_error
from tiny import CAPITAL_FACTS, LANGUAGE_FACTS, tiny_model

from knowloc.cli import main
from knowloc.models.forward import prompt_probs


def test_modify_writes_table2_and_resumes(run, capsys):
    assert main(["-q", "modify", "--run", str(run), "--ppl-pool", "6",
                 "--ppl-max-tokens", "24"]) == 0
    out = capsys.readouterr()
    assert "# Table 2" in out.out and "built-in English corpus" in out.out
    assert "built-in English corpus" in out.err
    edits = pd.read_parquet(run / "edits.parquet")
    t2 = pd.read_csv(run / "table2.csv")
    assert set(edits["op"]) == {"erase", "update"} and set(edits["set"]) == {"local", "global"}
    assert set(t2["kind"]) <= {"K_I", "K_II"} and {"rel", "gen", "loc", "avg", "dppl"} <= set(t2)
    # Table 2 = mean over the ok rows of each (method, set, op, kind), recomputed here
    split = pd.read_parquet(run / "consistency.parquet")
    split = split[split["skipped"].isna()]
    split = split.assign(kind=["K_I" if c > 0.1 else "K_II" for c in split["cs2"]])
    ok = edits[edits["status"] == "ok"].merge(split[["method", "fact_id", "kind"]])
    means = ok.groupby(["method", "set", "op", "kind"])["loc"].mean()
    for r in t2.itertuples():
        if r.n_edits:
            assert r.loc == pytest.approx(means[(r.method, r.set, r.op, r.kind)])
    # the neuron count of each edit is the size of N_i (local) or of the fact's union (global)
    ns = pd.read_parquet(run / "neuron_sets.parquet")
    size = ns.groupby(["method", "query_id"]).size()
    union = ns.drop_duplicates(["method", "fact_id", "layer", "neuron"]).groupby(
        ["method", "fact_id"]).size()
    for r in ok.itertuples():
        expect = size.get((r.method, r.query_id), 0) if r.set == "local" else union[(r.method, r.fact_id)]
        assert r.n_neurons == expect
    # ΔPPL draws recorded: 5 entries per edit, locality from the other relation
    assert all(len(e.split("|")) == 5 for e in ok["ppl_entries"])
    assert set(ok["locality_pool"]) == {"other relations"}
    q = pd.read_parquet(run / "queries.parquet").drop_duplicates("query_id").set_index("query_id")
    for r in ok.head(5).itertuples():
        rel = q.loc[r.query_id, "relation"]
        assert all(q.loc[i, "relation"] != rel for i in r.locality_query_ids.split("|"))
    # rerun: nothing recomputed, identical tables
    before = (run / "edits.parquet").read_bytes()
    assert main(["-q", "modify", "--run", str(run), "--ppl-pool", "6",
                 "--ppl-max-tokens", "24"]) == 0
    assert "edited 0 unit(s)" in capsys.readouterr().out
    assert (run / "edits.parquet").read_bytes() == before


def test_modify_stage_leaves_the_model_untouched(run):
    from knowloc.interventions.weights import weights_digest
    from knowloc.models import load_model
    from knowloc.pipeline.modify import ModifyConfig, modify
    from knowloc.store import RunStore

    cfg = __import__("yaml").safe_load((run / "config.yaml").read_text())
    model = load_model(cfg["model"]["name"])
    before = weights_digest(model)
    res = modify(model, RunStore(run), ModifyConfig(ops=["update"], sets=["global"],
                                                    methods=["amig"], ppl_pool=4,
                                                    ppl_max_tokens=16), progress=False)
    assert weights_digest(model) == before
    assert (res.edits["status"] == "ok").any()
    assert set(res.edits["new_answer"]) - {""} <= {o for _, o in LANGUAGE_FACTS} | {o for _, o in CAPITAL_FACTS}
    assert (res.edits["new_answer"] != res.edits["answer"]).all()


@pytest.mark.skipif(not WIKITEXT.exists(), reason="WikiText-2 test file not available")
def test_modify_with_wikitext(run, capsys):
    assert main(["-q", "modify", "--run", str(run), "--op", "erase", "--set", "local",
                 "--method", "ig", "--ppl-text", str(WIKITEXT), "--ppl-pool", "5",
                 "--ppl-max-tokens", "16"]) == 0
    md = (run / "table2.md").read_text()
    assert "wiki.test.raw" in md and "built-in" not in md
    assert "wiki.test.raw" in (run / "config.yaml").read_text()


def test_intervene_writes_figure4_with_checkable_rows(run, capsys):
    from knowloc.interventions.activations import intervene
    from knowloc.models import load_model

    assert main(["-q", "intervene", "--run", str(run), "--all-queries"]) == 0
    fig4 = pd.read_csv(run / "figure4.csv")
    assert set(fig4["set"]) == {"Self", "Union", "Intersection", "Refine"}
    for m in ("ig", "amig"):
        assert (run / "figures" / f"figure4_{m}.png").exists()
        assert (run / "figures" / f"figure4_{m}.csv").exists()
    rows = pd.read_parquet(run / "interventions.parquet")
    assert ((rows["status"] == "empty") == (rows["n_neurons"] == 0)).all()
    ok = rows[(rows["status"] == "ok") & (rows["set"] == "Self")].iloc[0]
    q = pd.read_parquet(run / "queries.parquet")
    q = q[(q["query_id"] == ok["query_id"]) & (q["method"] == ok["method"])].iloc[0]
    ns = pd.read_parquet(run / "neuron_sets.parquet")
    ns = ns[(ns["query_id"] == ok["query_id"]) & (ns["method"] == ok["method"])]
    cfg = __import__("yaml").safe_load((run / "config.yaml").read_text())
    model = load_model(cfg["model"]["name"])
    t = model.answer_ids(q["prompt"], q["answer"])[0]
    p_b = float(prompt_probs(model, [q["prompt"]])[0, t])
    scale = 0.0 if ok["op"] == "suppress" else 2.0
    with intervene(model, list(zip(ns["layer"], ns["neuron"])), scale):
        p_a = float(prompt_probs(model, [q["prompt"]])[0, t])
    assert ok["p_before"] == pytest.approx(p_b, rel=1e-5)
    assert ok["p_after"] == pytest.approx(p_a, rel=1e-4, abs=1e-7)
    sign = -1 if ok["op"] == "suppress" else 1
    assert ok["delta_prob"] == pytest.approx(sign * (p_a - p_b) / p_b, rel=1e-3, abs=1e-6)


def test_reproduce_adds_the_modification_sections(tiny_dir, facts_file, tmp_path):
    from knowloc.report import report_manifest

    facts = facts_file
    out = tmp_path / "rep"
    assert main(["-q", "reproduce", "--model", str(tiny_dir), "--dataset", f"jsonl:{facts}",
                 "--method", "ig,amig", "--n-steps", "3", "--population", "all",
                 "--out", str(out)]) == 0
    man = report_manifest(out / "report.html")
    assert {"knowledge-modification-table-2", "query-kn-mapping-figure-4"} <= set(man["sections"])
    assert "Table 2" in man["tables"]
    assert any("Figure 4" in c for c in man["figures"]) and not man["missing_figures"]
    html = (out / "report.html").read_text()
    assert "built-in English corpus" in html
    edits = pd.read_parquet(out / "edits.parquet")
    assert set(edits["method"]) == {"amig"}  # quick preset: modification with AMIG only


# ------------------------------------------------------------------------ clean errors
def test_missing_run_dir(capsys, tmp_path):
    assert "does not exist" in cli_error(capsys, ["modify", "--run", str(tmp_path / "nope")])
    assert "does not exist" in cli_error(capsys, ["intervene", "--run", str(tmp_path / "nope")])


def test_run_without_consistency(localized, capsys):
    err = cli_error(capsys, ["modify", "--run", str(localized)])
    assert "no consistency results" in err and "knowloc consistency" in err
    assert "no consistency results" in cli_error(capsys, ["intervene", "--run", str(localized)])


def test_unknown_op_and_set(run, capsys):
    assert "unknown --op scramble" in cli_error(capsys, ["modify", "--run", str(run), "--op",
                                                      "scramble"])
    assert "unknown --set everywhere" in cli_error(capsys, ["modify", "--run", str(run), "--set",
                                                         "everywhere"])


def test_missing_ppl_text(run, capsys, tmp_path):
    err = cli_error(capsys, ["modify", "--run", str(run), "--ppl-text", str(tmp_path / "w.raw")])
    assert "does not exist" in err and "--ppl-text" in err


def test_wrong_model_for_the_run(run, capsys, tmp_path):
    other = tmp_path / "other"
    m = tiny_model("gpt2")
    m.hf.save_pretrained(other)
    m.tokenizer.save_pretrained(other)
    assert "is not the model of run" in cli_error(capsys, ["modify", "--run", str(run),
                                                        "--model", str(other)])

