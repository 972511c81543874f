"""Benchmark: how half-precision attributions agree with float32 (and what they cost).

Usage::

    python benchmarks/precision.py                          # 12 built-in queries, CPU
    python benchmarks/precision.py --device cuda --json runs/precision_cuda.json
    python benchmarks/precision.py --quick                  # 3 queries, 4 steps: does it run?

A fixed set of queries of ``--dataset`` (the first ``--queries``, up to 4 per fact, one fact per
relation in sorted relation order: the same set as ``throughput.py``) is localized with IG,
SIG and AMIG (``--steps`` integration steps, library defaults otherwise) on each embedded
model, once per dtype, all on the same ``--device``: float32 (the reference), bfloat16 and
float16. A dtype the model or device refuses is reported with the reason (Gemma 3's
residual stream exceeds float16's range, so its loader's self-check fails there).

For each (model, method, half dtype) the table compares every query's map with its float32
map and shows:

* ``max err`` / ``med err`` -- per query, the largest |score - float32 score| over the map,
  divided by the float32 map's largest |score|; the max and the median over the queries;
* ``top-20`` -- the share of the float32 top-20 neurons that are also in the top 20 (mean
  over queries; the minimum in brackets);
* ``KN Jaccard`` -- Jaccard index of the knowledge-neuron sets (scores above 0.2 x the
  map's maximum, the library's default selection): mean, minimum in brackets;
* ``max |dP|`` -- the largest |P(answer) - float32 P(answer)| over the queries;
* ``known`` -- the queries whose ``known`` (greedy decoding gives the answer) agrees;
* ``s/query`` -- seconds per query in that dtype (after one warm-up query), and for the
  float32 rows, the float32 time.

This is a benchmark: nothing here asserts a bound (``tests/attribution/test_precision.py``
and ``tests/test_gpu.py`` do, with the bounds the README documents; the test suite's check on
the embedded Gemma is small, this script is the full comparison). On a CPU without bfloat16
instructions (AVX2 only) bfloat16 runs 5 to 10 times slower than float32: expect long runs.
"""

from __future__ import annotations

import argparse
import gc
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
from throughput import pick_queries, print_table  # the sibling benchmark script

from knowloc import Attribution, attribute, load_model
from knowloc.errors import ModelError
from knowloc.models import Model
from knowloc.neurons import Selection, select

MODELS = ("gemma3-270m", "smollm2-135m")
METHODS = ("ig", "sig", "amig")
HALF = ("bfloat16", "float16")
TOP = 20
THRESHOLD = 0.2  # the library's default relative selection


def neuron_set(scores: torch.Tensor, selection: Selection) -> set[tuple[int, int]]:
    return {(int(layer), int(n)) for layer, n in select(scores, selection)}


def compare(ref: Attribution, other: Attribution) -> dict[str, Any]:
    """How one query's half-precision attribution ``other`` agrees with float32 ``ref``."""
    a, b = ref.scores.double(), other.scores.double()
    scale = float(a.abs().max())
    top_a = neuron_set(a, Selection("topk", TOP))
    top_b = neuron_set(b, Selection("topk", TOP))
    kn_a = neuron_set(a, Selection("relative", THRESHOLD))
    kn_b = neuron_set(b, Selection("relative", THRESHOLD))
    union = kn_a | kn_b
    return {
        "rel_error": float((a - b).abs().max()) / scale if scale > 0 else float("nan"),
        "top_overlap": len(top_a & top_b) / max(len(top_a), 1),
        "jaccard": len(kn_a & kn_b) / len(union) if union else 1.0,
        "dprob": abs(ref.prob - other.prob),
        "known_agrees": ref.top1 == other.top1,
        "finite": bool(torch.isfinite(other.scores).all()),
    }


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The per-method summary of :func:`compare` rows (one per query)."""
    err = [r["rel_error"] for r in rows]
    return {
        "queries": len(rows),
        "max_rel_error": max(err),
        "median_rel_error": statistics.median(err),
        "top_overlap_mean": statistics.fmean(r["top_overlap"] for r in rows),
        "top_overlap_min": min(r["top_overlap"] for r in rows),
        "jaccard_mean": statistics.fmean(r["jaccard"] for r in rows),
        "jaccard_min": min(r["jaccard"] for r in rows),
        "max_dprob": max(r["dprob"] for r in rows),
        "median_dprob": statistics.median(r["dprob"] for r in rows),
        "known_agrees": sum(r["known_agrees"] for r in rows),
        "all_finite": all(r["finite"] for r in rows),
    }


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def localize(model: Model, queries: Sequence[Any], method: str, steps: int,
             memory_gb: float) -> tuple[list[Attribution], float]:
    """Every query's attribution and the mean seconds per query (after one warm-up)."""
    dev = model.device.type
    attribute(model, queries[0], method, n_steps=steps, memory_budget_gb=memory_gb,
              progress=False)
    sync(dev)
    t0 = time.perf_counter()
    out = []
    for q in queries:
        a = attribute(model, q, method, n_steps=steps, memory_budget_gb=memory_gb,
                      progress=False)
        assert isinstance(a, Attribution)
        out.append(a)
    sync(dev)
    return out, (time.perf_counter() - t0) / len(queries)


def load(name: str, device: str, dtype: str) -> Model | str:
    """The model, or why it was refused in ``dtype`` on ``device``."""
    try:
        return load_model(name, device=device, dtype=dtype)
    except (ModelError, RuntimeError, NotImplementedError) as exc:
        reason = str(exc).splitlines()[0]
        if name.startswith("gemma3") and dtype == "float16":
            reason += (" (Gemma 3's residual stream exceeds float16's range, 65504, from "
                       "layer 7 on: inf, then NaN)")
        return reason


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_model(name: str, queries: Sequence[Any], args: argparse.Namespace) -> dict[str, Any]:
    """float32 and each half dtype of one model: timings, refusals and agreement."""
    result: dict[str, Any] = {"dtypes": {}, "agreement": {}}
    ref: dict[str, list[Attribution]] = {}
    for dtype in ("float32", *args.dtypes):
        model = load(name, args.device, dtype)
        if isinstance(model, str):
            result["dtypes"][dtype] = {"status": f"refused: {model}"}
            print(f"  {name} {dtype}: refused: {model}", flush=True)
            continue
        entry: dict[str, Any] = {"status": "ok", "seconds_per_query": {}}
        for method in METHODS:
            maps, seconds = localize(model, queries, method, args.steps, args.memory_gb)
            entry["seconds_per_query"][method] = seconds
            line = f"  {name} {dtype:9s} {method:5s} {seconds:7.2f} s/query"
            if dtype == "float32":
                ref[method] = maps
            else:
                s = summarize([compare(r, m) for r, m in zip(ref[method], maps)])
                result["agreement"].setdefault(dtype, {})[method] = s
                line += (f"  top-{TOP} {s['top_overlap_mean']:.0%}, Jaccard "
                         f"{s['jaccard_mean']:.2f}, max err {s['max_rel_error']:.1e}")
            print(line, flush=True)
        result["dtypes"][dtype] = entry
        del model
        free()
    return result


def table(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (model, half dtype, method) with agreement, and per refused dtype."""
    rows = []
    for name, res in report["models"].items():
        f32 = res["dtypes"]["float32"].get("seconds_per_query", {})
        for dtype, d in res["dtypes"].items():
            if dtype == "float32":
                continue
            if d["status"] != "ok":
                rows.append({"model": name, "dtype": dtype, "method": "-",
                             "s/query (f32)": "-", "max err": d["status"][:60], "med err": "",
                             f"top-{TOP}": "", "KN Jaccard": "", "max |dP|": "", "known": ""})
                continue
            for method, s in res["agreement"][dtype].items():
                sec = d["seconds_per_query"][method]
                rows.append({
                    "model": name, "dtype": dtype, "method": method,
                    "s/query (f32)": f"{sec:.2f} ({f32[method]:.2f})",
                    "max err": f"{s['max_rel_error']:.1e}",
                    "med err": f"{s['median_rel_error']:.1e}",
                    f"top-{TOP}": f"{s['top_overlap_mean']:.0%} ({s['top_overlap_min']:.0%})",
                    "KN Jaccard": f"{s['jaccard_mean']:.2f} ({s['jaccard_min']:.2f})",
                    "max |dP|": f"{s['max_dprob']:.1e}",
                    "known": f"{s['known_agrees']}/{s['queries']}",
                })
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="builtin",
                    help="builtin (default: knowloc's built-in facts), pararel:DIR or jsonl:FILE")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--dtypes", nargs="+", choices=HALF, default=list(HALF),
                    help="half dtypes compared with float32")
    ap.add_argument("--queries", type=int, default=12)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--memory-gb", type=float, default=2.0, help="attribution memory budget")
    ap.add_argument("--quick", action="store_true", help="3 queries, 4 steps")
    ap.add_argument("--json", type=Path, help="write the numbers here")
    args = ap.parse_args(argv)
    if args.quick:
        args.queries, args.steps = 3, 4
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")

    queries = pick_queries(args.dataset, args.queries)
    device = torch.cuda.get_device_name() if args.device == "cuda" else \
        f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    print(f"device: {device}, torch {torch.__version__}")
    print(f"work: {len(queries)} queries of {args.dataset} "
          f"({len({q.relation for q in queries})} relations), {', '.join(METHODS)} "
          f"{args.steps} steps; float32 vs {', '.join(args.dtypes)}")
    report: dict[str, Any] = {
        "device": device, "torch": torch.__version__, "steps": args.steps,
        "queries": [q.query_id for q in queries], "top": TOP, "threshold": THRESHOLD,
        "models": {name: run_model(name, queries, args) for name in args.models},
    }
    rows = table(report)
    if rows:
        print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
