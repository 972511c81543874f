"""Benchmark: seconds per fact to edit and evaluate knowledge neurons on the embedded model.

Usage::

    python benchmarks/modification.py                        # 3 facts, built-in PPL corpus
    python benchmarks/modification.py --facts 5 --ppl-text wikitext2/wiki.test.raw
    python benchmarks/modification.py --ops erase --sets local --json runs/bench_modify.json

One unit of work is what ``knowloc modify`` does for one fact: for every query of the fact
the unedited model answers correctly, apply the edit (erase or update of N_i, ``local``; or one
edit of N_g, ``global``), evaluate Rel/Gen/Loc on all the fact's queries and on a locality set
of 20 facts of other relations, measure ΔPPL on 5 entries drawn for the edit, and restore
the weights. The model is loaded once; unedited predictions and the unedited NLL of each
text entry are computed once and reused (the first fact pays for the entries it draws
first: reported separately as "cold"). Knowledge neurons come from AMIG (``--n-steps``),
computed before the clock starts.

This is a benchmark, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from knowloc.models.forward import prompt_probs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--facts", type=int, default=3)
    ap.add_argument("--relations", default="P37,P36,P1376")
    ap.add_argument("--ops", default="erase,update")
    ap.add_argument("--sets", default="local,global")
    ap.add_argument("--n-steps", type=int, default=20)
    ap.add_argument("--ppl-text", default=None)
    ap.add_argument("--ppl-max-tokens", type=int, default=128)
    ap.add_argument("--ppl-pool", type=int, default=25)
    ap.add_argument("--n-locality", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from knowloc import load_facts, load_model
    from knowloc.attribution import attribute
    from knowloc.evaluation import Baseline, EvalQuery, PPLSampler, evaluate_edit, load_ppl_corpus
    from knowloc.interventions.weights import Edit, weights_digest
    from knowloc.neurons import knowledge_neurons

    t = time.time()
    model = load_model("gemma3-270m")
    print(f"model loaded in {time.time() - t:.1f} s; torch threads: {torch.get_num_threads()}, "
          f"load average before: {os.getloadavg()[0]:.2f}")
    rels = args.relations.split(",")
    facts = load_facts("builtin", max_queries_per_fact=4)
    pool = [f for f in facts if f.relation not in rels]
    edited = []
    for f in facts:
        if f.relation in rels and len(edited) < args.facts:
            probs = prompt_probs(model, [q.prompt for q in f.queries])
            known = [int(p.argmax()) == model.target_ids(q.prompt, q.answer)[0]
                     for q, p in zip(f.queries, probs)]
            if any(known):
                edited.append(f)
    others = [f for f in facts if f.relation == edited[0].relation and f is not edited[0]]
    print(f"computing AMIG knowledge neurons ({args.n_steps} steps) for {len(edited)} facts ...")
    kns = {q.query_id: sorted(knowledge_neurons(attribute(model, q, "amig", n_steps=args.n_steps,
                                                          progress=False)))
           for f in edited for q in f.queries}
    corpus = load_ppl_corpus(args.ppl_text)
    ppl = PPLSampler(model, corpus, max_tokens=args.ppl_max_tokens, pool_size=args.ppl_pool)
    baseline = Baseline()
    loc = [tuple(model.encode_prompt(f.queries[0].prompt)) for f in pool[: args.n_locality]]
    digest = weights_digest(model)
    per_fact = []
    for k, f in enumerate(edited):
        new = next(o.object for o in others if model.target_ids(f.queries[0].prompt, o.object)
                   != model.target_ids(f.queries[0].prompt, f.object))
        qs = [EvalQuery(q.query_id, tuple(model.encode_prompt(q.prompt)),
                        tuple(model.target_ids(q.prompt, q.answer)),
                        tuple(model.target_ids(q.prompt, new)))
              for q in f.queries]
        t0 = time.time()
        n_edits = 0
        before = baseline.observe(model, qs, loc)
        known = [q for q in qs if before.hit[(q.query_id, q.target_ids)]]
        for op in args.ops.split(","):
            for s in args.sets.split(","):
                groups = ([(kns[q.query_id], [q]) for q in known] if s == "local" else
                          [(sorted({n for q in qs for n in kns[q.query_id]}), known)])
                for neurons, rel in groups:
                    if not rel:
                        continue
                    e = (Edit.erase(neurons) if op == "erase" else
                         Edit.update(neurons, rel[0].target_ids,
                                     rel[0].new_target_ids))  # type: ignore[arg-type]
                    evaluate_edit(model, e, fact_queries=qs, rel_ids=[q.query_id for q in rel],
                                  locality=loc, baseline=baseline, ppl=ppl,
                                  ppl_key=f"{f.fact_id}:{op}:{s}:{rel[0].query_id}")
                    n_edits += 1
        dt = time.time() - t0
        per_fact.append(dt)
        print(f"fact {k + 1}: {f.subject!r} ({len(qs)} queries, {len(known)} known), "
              f"{n_edits} edits: {dt:.1f} s ({dt / max(1, n_edits):.2f} s per edit)")
    assert weights_digest(model) == digest, "weights not restored"
    warm = per_fact[1:] or per_fact
    result = {"facts": len(per_fact), "seconds_per_fact": statistics.mean(per_fact),
              "seconds_per_fact_warm": statistics.mean(warm), "cold_first_fact": per_fact[0],
              "ops": args.ops, "sets": args.sets, "ppl_corpus": corpus.source,
              "ppl_max_tokens": args.ppl_max_tokens, "n_locality": len(loc),
              "load_average_after": os.getloadavg()[0]}
    print(f"\nseconds per fact: {result['seconds_per_fact']:.1f} (first, cold: "
          f"{per_fact[0]:.1f}; later, warm: {result['seconds_per_fact_warm']:.1f}); "
          f"load average after: {result['load_average_after']:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
