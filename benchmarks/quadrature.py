"""Benchmark: integration rules at equal numbers of points, against a 256-point reference.

Usage::

    python benchmarks/quadrature.py                                   # 24 built-in queries
    python benchmarks/quadrature.py --dataset pararel:data/pararel --out quadrature.md
    python benchmarks/quadrature.py --queries 3 --models smollm2-135m --methods ig \\
        --points 4 8 20                                               # a small run
    python benchmarks/quadrature.py --overhead 5         # cost of the completeness gap

Every query (``--queries``, one per fact and relation of ``--dataset`` in turn, so a small
run still spans many relations) is attributed with each method (``--methods``) on each model
(``--models``) once with the reference rule (Gauss-Legendre, 256 points:
``--reference-rule``/``--reference-points``) and once per rule and number of points
(``--rules`` x ``--points``). Each row of the table is one (model, method, rule, points):

* ``err`` -- the map error: relative L2 distance over the whole normalized map,
  ``||S - S_ref||_2 / ||S_ref||_2``; the median over the queries (the 90th percentile in
  brackets);
* ``KN Jaccard`` -- Jaccard index between the knowledge neurons (score > 0.2 x the map's
  maximum, the library's default selection) and the reference's: mean (minimum);
* ``gap`` -- the completeness gap (largest over layers; see docs/methods.md): the median
  over the queries; it needs no reference;
* ``s/attr`` -- mean seconds per attribution.

Below the table, for every (model, method): the Riemann-20 error (the paper's setting) and,
per rule, the fewest points of the grid whose median error is at most that.

``--overhead N`` instead times the completeness gap's extra cost (the forward-only baseline
point of every layer) on the first model, method and query: ``N`` interleaved rounds of
``attribute()`` with and without it (the order alternating each round), and prints the
median of the per-round time ratios.

Results are written as they come (``--out``, Markdown; ``--json``), query by query (every
model and method of a query before the next query), so a stopped run keeps what it finished.
A query whose answer a model cannot tokenize is skipped for that model. Nothing here
asserts a bound.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from throughput import dataset_spec, print_table  # the sibling benchmark script

from knowloc import Attribution, attribute, load_model
from knowloc.attribution.quadrature import RULES
from knowloc.data import Query, load_facts
from knowloc.errors import TokenizationError
from knowloc.models import Model
from knowloc.neurons import Selection, select

MODELS = ("gemma3-270m", "smollm2-135m")
METHODS = ("ig", "sig", "amig")
POINTS = (4, 8, 12, 16, 20, 32)
THRESHOLD = 0.2  # the library's default relative selection


def pick_queries(dataset: str, n: int) -> list[Query]:
    """``n`` queries: the first query of one fact of every relation, then their second
    queries, and so on (relations in the dataset's order)."""
    facts = load_facts(dataset_spec(dataset), facts_per_relation=1)
    per_fact = [f.queries for f in facts]
    out: list[Query] = []
    depth = 0
    while len(out) < n and any(depth < len(qs) for qs in per_fact):
        out += [qs[depth] for qs in per_fact if depth < len(qs)]
        depth += 1
    if len(out) < n:
        raise SystemExit(f"{dataset} has only {len(out)} queries (one fact per relation)")
    return out[:n]


def knowledge_neurons(scores: torch.Tensor) -> set[tuple[int, int]]:
    return {(int(layer), int(p)) for layer, p in select(scores, Selection("relative",
                                                                          THRESHOLD))}


def compare(ref: Attribution, other: Attribution) -> dict[str, float]:
    """The map error and KN Jaccard of ``other`` against ``ref``, and ``other``'s gap."""
    a, b = ref.scores.double(), other.scores.double()
    norm = float(a.norm())
    kn_a, kn_b = knowledge_neurons(a), knowledge_neurons(b)
    union = kn_a | kn_b
    gap = other.completeness_gap
    return {
        "err": float((b - a).norm()) / norm if norm > 0 else float("nan"),
        "jaccard": len(kn_a & kn_b) / len(union) if union else 1.0,
        "gap": float(gap.max()) if gap is not None else float("nan"),
    }


def timed(model: Model, q: Query, method: str, rule: str, n: int,
          memory_gb: float) -> tuple[Attribution, float]:
    t = time.perf_counter()
    a = attribute(model, q, method, n_steps=n, rule=rule, memory_budget_gb=memory_gb,
                  progress=False)
    assert isinstance(a, Attribution)
    return a, time.perf_counter() - t


def summarize(cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, method, rule, points) over its queries."""
    groups: dict[tuple[str, str, str, int], list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["model"], c["method"], c["rule"], c["points"]), []).append(c)
    rows = []
    for (model, method, rule, n), cs in groups.items():
        errs = sorted(c["err"] for c in cs)
        p90 = errs[min(len(errs) - 1, int(0.9 * len(errs)))]
        rows.append({
            "model": model, "method": method, "rule": rule, "points": n, "queries": len(cs),
            "err": statistics.median(errs), "err_p90": p90,
            "jaccard": statistics.fmean(c["jaccard"] for c in cs),
            "jaccard_min": min(c["jaccard"] for c in cs),
            "gap": statistics.median(c["gap"] for c in cs),
            "seconds": statistics.fmean(c["seconds"] for c in cs),
        })
    order = {r: i for i, r in enumerate(RULES)}
    return sorted(rows, key=lambda r: (r["model"], METHODS.index(r["method"])
                                       if r["method"] in METHODS else 99,
                                       order.get(r["rule"], 99), r["points"]))


def verdicts(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, method): the Riemann-20 median error and, per rule, the fewest points
    whose median error is at most that (None: no number of points of the grid)."""
    out = []
    keys = dict.fromkeys((r["model"], r["method"]) for r in rows)
    for model, method in keys:
        mine = [r for r in rows if r["model"] == model and r["method"] == method]
        r20 = next((r for r in mine if r["rule"] == "riemann_right" and r["points"] == 20),
                   None)
        if r20 is None:
            continue
        v: dict[str, Any] = {"model": model, "method": method, "riemann-20 err": r20["err"]}
        for rule in RULES:
            ok = [r["points"] for r in mine if r["rule"] == rule and r["err"] <= r20["err"]]
            v[rule] = min(ok) if ok else None
        out.append(v)
    return out


def markdown(rows: Sequence[dict[str, Any]], verdict: Sequence[dict[str, Any]],
             header: str) -> str:
    lines = [header, "",
             ("| model | method | rule | points | err median (p90) | KN Jaccard mean (min) "
              "| gap median | s/attr |"), "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['rule']} | {r['points']} | "
                     f"{r['err']:.2e} ({r['err_p90']:.2e}) | {r['jaccard']:.3f} "
                     f"({r['jaccard_min']:.3f}) | {r['gap']:.3g} | {r['seconds']:.1f} |")
    if verdict:
        lines += ["", "Fewest points whose median error is at most the Riemann-20 error:", "",
                  "| model | method | Riemann-20 err | " + " | ".join(RULES) + " |",
                  "|---|---|---:|" + "---:|" * len(RULES)]
        for v in verdict:
            lines.append(f"| {v['model']} | {v['method']} | {v['riemann-20 err']:.2e} | "
                         + " | ".join("-" if v[r] is None else str(v[r]) for r in RULES)
                         + " |")
    return "\n".join(lines) + "\n"


def overhead(model: Model, q: Query, method: str, rounds: int, memory_gb: float) -> dict[str, Any]:
    """CPU seconds of ``attribute()`` (20 points, the paper's rule) with and without the
    completeness gap's baseline pass, in ``rounds`` interleaved rounds (CPU time of this
    process: less sensitive than wall time to other processes on a shared machine)."""
    from knowloc.attribution import engine

    real = engine._baseline_rows

    def skipped(model: Model, runner: Any, base: torch.Tensor, *args: Any) -> Any:
        n_answer = len(model.target_ids(q.prompt, q.answer))
        return torch.empty(0, n_answer, model.d_model, dtype=model.dtype), []

    def once(with_gap: bool) -> float:
        engine._baseline_rows = real if with_gap else skipped  # type: ignore[assignment]
        try:
            c0 = time.process_time()
            timed(model, q, method, "riemann_right", 20, memory_gb)
            return time.process_time() - c0
        finally:
            engine._baseline_rows = real  # type: ignore[assignment]

    once(True)  # warm-up
    ratios, on, off = [], [], []
    for i in range(rounds):
        order = (True, False) if i % 2 == 0 else (False, True)
        t = {arm: once(arm) for arm in order}
        on.append(t[True])
        off.append(t[False])
        ratios.append(t[True] / t[False])
        print(f"  round {i + 1}: with {t[True]:.2f} s, without {t[False]:.2f} s, "
              f"ratio {ratios[-1]:.4f}", flush=True)
    return {"model": model.name, "method": method, "query": q.prompt, "rounds": rounds,
            "with_s": on, "without_s": off, "ratios": ratios,
            "median_ratio": statistics.median(ratios),
            "extra_points_share": 1 / 20}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="builtin",
                    help="builtin (default: knowloc's built-in facts), pararel:DIR or jsonl:FILE")
    ap.add_argument("--models", nargs="+", default=list(MODELS),
                    help="embedded names or model directories (default: both embedded models)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--queries", type=int, default=24)
    ap.add_argument("--start", type=int, default=0,
                    help="skip the first START of the --queries queries (to split a run "
                         "across processes; tools/results.py sums their --json files)")
    ap.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES))
    ap.add_argument("--points", nargs="+", type=int, default=list(POINTS))
    ap.add_argument("--reference-rule", choices=RULES, default="gausslegendre")
    ap.add_argument("--reference-points", type=int, default=256)
    ap.add_argument("--memory-gb", type=float, default=2.0, help="attribution memory budget")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--overhead", type=int, default=0, metavar="ROUNDS",
                    help="only time the completeness gap's cost, in ROUNDS A/B rounds")
    ap.add_argument("--out", type=Path, help="write the Markdown table here")
    ap.add_argument("--json", type=Path, help="write every number here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    queries = pick_queries(args.dataset, args.queries)[args.start:]
    device = f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()}, " \
             f"{torch.get_num_threads()} torch threads)"
    print(f"device: {device}, torch {torch.__version__}", flush=True)
    if args.overhead:
        model = load_model(args.models[0])
        res = overhead(model, queries[0], args.methods[0], args.overhead, args.memory_gb)
        print(f"completeness gap cost on {res['model']} ({res['method']}, 20 points, "
              f"{res['rounds']} rounds): median time ratio {res['median_ratio']:.4f} "
              f"(+{100 * (res['median_ratio'] - 1):.2f}%)")
        if args.json:
            args.json.write_text(json.dumps(res, indent=2))
        return 0

    header = (f"{len(queries)} queries of {args.dataset} "
              f"({len({q.relation for q in queries})} relations); reference: "
              f"{args.reference_rule} with {args.reference_points} points; err: relative L2 "
              f"over the map; {device}")
    print(f"work: {header}", flush=True)
    cells: list[dict[str, Any]] = []

    def write() -> None:
        rows = summarize(cells)
        if args.out:
            args.out.write_text(markdown(rows, verdicts(rows), header))
        if args.json:
            args.json.write_text(json.dumps({"header": header, "cells": cells,
                                             "rows": rows}, indent=2))

    models = {name: load_model(name) for name in args.models}
    for q in queries:  # query-major: a stopped run has every model and method of its queries
        for name, model in models.items():
            try:
                model.target_ids(q.prompt, q.answer)
            except TokenizationError as exc:
                print(f"  {name} {q.query_id}: skipped ({exc})", flush=True)
                continue
            for method in args.methods:
                ref, _ = timed(model, q, method, args.reference_rule, args.reference_points,
                               args.memory_gb)
                for rule in args.rules:
                    for n in args.points:
                        a, seconds = timed(model, q, method, rule, n, args.memory_gb)
                        cells.append({"model": name, "method": method, "query": q.query_id,
                                      "rule": rule, "points": n, "seconds": seconds,
                                      "ref_gap": compare(ref, ref)["gap"],
                                      **compare(ref, a)})
                print(f"  {name} {method} {q.query_id}: done", flush=True)
                write()
    rows = summarize(cells)
    print_table([{**r, "err": f"{r['err']:.2e}", "err_p90": f"{r['err_p90']:.2e}",
                  "jaccard": f"{r['jaccard']:.3f}", "jaccard_min": f"{r['jaccard_min']:.3f}",
                  "gap": f"{r['gap']:.3g}", "seconds": f"{r['seconds']:.2f}"} for r in rows])
    print()
    for v in verdicts(rows):
        print("  " + ", ".join(f"{k}: {v[k]}" for k in v))
    write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
