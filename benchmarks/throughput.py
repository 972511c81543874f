"""Benchmark: localization throughput (queries/s), one process against Ray workers, and on a GPU.

Usage::

    python benchmarks/throughput.py                    # 24 built-in queries, IG 20 steps
    python benchmarks/throughput.py --dataset pararel:data/pararel   # ParaRel queries
    python benchmarks/throughput.py --workers 8 --threads-per-worker 2 --json runs/tp.json
    python benchmarks/throughput.py --quick            # 4 queries, 4 steps: does it run?

A fixed set of queries (the first ``--queries``, up to 4 per fact, one fact per relation in
sorted relation order) of ``--dataset`` (default: knowloc's built-in facts, so the script
runs from any checkout; ``pararel:DIR`` or ``jsonl:FILE`` as in the CLI, or a ParaRel
directory) is localized with IG over all layers of the embedded Gemma 3 270M (float32, CPU;
``--model`` for another), each query the way a localize unit computes it
(``knowloc.attribute`` with the library defaults), side by side:

* ``local`` -- in this process, one query after the other, torch's default threads (all
  cores): what ``--executor local`` does;
* ``ray``   -- :class:`knowloc.pipeline.distributed.RayExecutor` on a local Ray instance,
  ``--workers`` actors x ``--threads-per-worker`` torch threads, each with its own model;
* ``local`` on one thread -- the same in-process loop with ``torch.set_num_threads(1)``, to
  show how much of the machine the one process already uses (when it has several threads).

Each side first runs warm-up queries (Ray: also the actors' start-up and model load, timed
separately); then the timed pass over all queries. For each side the table shows
queries/s, wall and CPU seconds (local: this process; ray: the workers' CPU time inside the
units), the CPU utilisation (CPU seconds / wall / cores), and the share of the machine that
*other* processes used meanwhile (from ``/proc/stat``; trust the numbers only where it is
near 0%). The two sides must agree (top-20 neurons, P(answer), max attribution); with a
different number of torch threads the last bits may differ, which is reported.

The projection: every query of ``--dataset`` x 3 methods (IG, SIG and AMIG cost the same
number of integration points) / the measured rate; with ParaRel, that is the ``paper``
preset's time. It is an upper bound: the preset localizes only facts the model knows.

On a machine with CUDA (or with ``--device cpu`` to check the code path), the device
section times the embedded Gemma in float32 and bfloat16 and a LLaMA-3-8B-sized model with
random weights in bfloat16 (``LlamaConfig``: 32 layers, d_model 4096, MLP 14336, 32 heads,
8 KV heads, vocabulary 128256; timing only, queried through SmolLM2's tokenizer, whose ids
fit the vocabulary) and prints the projected GPU-hours for the dataset x 3 methods.

This is a benchmark, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from typing_extensions import Self

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from attribution import system_busy_seconds  # the sibling benchmark script

from knowloc import attribute, load_model
from knowloc.data import Query, load_facts
from knowloc.models import Model, wrap

METHODS_IN_PAPER = 3  # IG, SIG, AMIG
LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
             "max_position_embeddings": 8192, "rope_theta": 500000.0}
TOP = 20


@dataclass(frozen=True)
class Job:
    """One localize unit's input (picklable)."""

    query: Query
    n_steps: int
    memory_gb: float


def localize_query(model: Model, job: Job) -> dict[str, pd.DataFrame]:
    """What a localize unit computes for one query and method: IG, then its tables."""
    t, c = time.perf_counter(), time.process_time()
    a = attribute(model, job.query, "ig", n_steps=job.n_steps, memory_budget_gb=job.memory_gb,
                  progress=False)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    row = {"query_id": job.query.query_id, "prob": a.prob, "known": a.top1,
           "max_attribution": float(a.scores.max()), "seconds": time.perf_counter() - t,
           "cpu_seconds": time.process_time() - c}
    top = pd.DataFrame(a.top(TOP), columns=["layer", "neuron", "attribution", "activation"])
    return {"queries": pd.DataFrame([row]), "attributions": top}


@dataclass
class Phase:
    name: str
    queries: int
    wall: float
    cpu: float
    cores: int
    others: float | None  # share of the machine other processes used during the phase
    setup: float = 0.0  # Ray: actors' start-up and model load, warm-up query included
    results: dict[str, dict[str, pd.DataFrame]] = field(default_factory=dict, repr=False)

    @property
    def rate(self) -> float:
        return self.queries / self.wall

    def row(self) -> dict[str, Any]:
        return {"executor": self.name, "q/s": round(self.rate, 4),
                "s/query": round(self.wall / self.queries, 2), "wall s": round(self.wall, 1),
                "CPU s": round(self.cpu, 1),
                "CPU util": f"{self.cpu / self.wall / self.cores:.0%}",
                "others": "?" if self.others is None else f"{self.others:.0%}",
                "setup s": round(self.setup, 1)}


class Timer:
    """Wall time and the machine's busy CPU seconds over a block."""

    def __enter__(self) -> Self:
        self.busy0 = system_busy_seconds()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        busy1 = system_busy_seconds()
        self.busy = None if busy1 is None or self.busy0 is None else busy1 - self.busy0

    def others(self, own_cpu: float) -> float | None:
        """The share of the machine's cores busy with other processes' work."""
        if self.busy is None:
            return None
        return max(0.0, (self.busy - own_cpu) / (self.wall * (os.cpu_count() or 1)))


def dataset_spec(dataset: str) -> str:
    """A dataset as ``load_facts`` takes it: ``builtin``, ``pararel:DIR``, ``jsonl:FILE``; a
    bare directory is a ParaRel directory."""
    if dataset.split(":", 1)[0] in ("builtin", "pararel", "jsonl"):
        return dataset
    if Path(dataset).is_dir():
        return f"pararel:{dataset}"
    raise SystemExit(f"--dataset {dataset!r}: give builtin, pararel:DIR or jsonl:FILE")


def pick_queries(dataset: str, n: int) -> list[Query]:
    """The first ``n`` queries, up to 4 per fact, of one fact per relation of ``dataset``."""
    spec = dataset_spec(dataset)
    facts = load_facts(spec, facts_per_relation=1, max_queries_per_fact=4)
    queries = facts.queries()[:n]
    if len(queries) < n:
        raise SystemExit(f"{dataset} has only {len(queries)} queries with these limits")
    return queries


def run_local(model: Model, jobs: Sequence[Job], warmup: int) -> Phase:
    for job in jobs[:warmup]:
        localize_query(model, job)
    c0 = time.process_time()
    with Timer() as t:
        results = {job.query.query_id: localize_query(model, job) for job in jobs}
    cpu = time.process_time() - c0
    n = torch.get_num_threads()
    return Phase(f"local (1 process, {n} thread{'s' * (n > 1)})", len(jobs), t.wall, cpu,
                 os.cpu_count() or 1, t.others(cpu), results=results)


def run_ray(model: Model, jobs: Sequence[Job], workers: int, threads: int) -> Phase:
    from knowloc.pipeline.distributed import RayConfig, RayExecutor

    with RayExecutor(RayConfig(workers=workers, threads_per_worker=threads)) as ex:
        t0 = time.perf_counter()
        for _ in ex.run(localize_query, model, jobs[: 2 * workers]):  # start-up + warm-up
            pass
        setup = time.perf_counter() - t0
        with Timer() as t:
            results = {jobs[i].query.query_id: tables
                       for i, tables in ex.run(localize_query, model, jobs)}
    cpu = sum(float(r["queries"]["cpu_seconds"].iloc[0]) for r in results.values())
    return Phase(f"ray ({workers} workers x {threads} thread{'s' * (threads > 1)})", len(jobs),
                 t.wall, cpu, os.cpu_count() or 1, t.others(cpu), setup, results)


def agreement(a: dict[str, dict[str, pd.DataFrame]],
              b: dict[str, dict[str, pd.DataFrame]]) -> dict[str, Any]:
    """How two runs of the same queries agree: identical tables, top neurons, max rel. error."""
    identical = same_top = 0
    rel = 0.0
    for key, ta in a.items():
        tb = b[key]
        qa, qb = ta["queries"].iloc[0], tb["queries"].iloc[0]
        for col in ("prob", "max_attribution"):
            rel = max(rel, abs(qa[col] - qb[col]) / max(abs(qb[col]), 1e-30))
        na = list(zip(ta["attributions"]["layer"], ta["attributions"]["neuron"]))
        nb = list(zip(tb["attributions"]["layer"], tb["attributions"]["neuron"]))
        same_top += na == nb
        identical += ta["attributions"].equals(tb["attributions"]) and qa["prob"] == qb["prob"] \
            and qa["max_attribution"] == qb["max_attribution"]
    return {"queries": len(a), "bit_identical": identical, "same_top_neurons": same_top,
            "max_rel_error": rel}


def top_overlap(a: dict[str, dict[str, pd.DataFrame]],
                b: dict[str, dict[str, pd.DataFrame]]) -> float:
    """Mean share of the top-``TOP`` neurons two runs have in common."""
    shares = []
    for key, ta in a.items():
        na = set(zip(ta["attributions"]["layer"], ta["attributions"]["neuron"]))
        nb = set(zip(b[key]["attributions"]["layer"], b[key]["attributions"]["neuron"]))
        shares.append(len(na & nb) / max(len(na), 1))
    return sum(shares) / len(shares)


def timed_device_run(model: Model, jobs: Sequence[Job]) -> tuple[float,
                                                                 dict[str, dict[str, pd.DataFrame]]]:
    """(queries/s, results) after one warm-up query."""
    localize_query(model, jobs[0])
    t0 = time.perf_counter()
    results = {job.query.query_id: localize_query(model, job) for job in jobs}
    return len(jobs) / (time.perf_counter() - t0), results


def free(model: Model | None) -> None:
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_section(queries: Sequence[Query], args: argparse.Namespace,
                   total: int) -> dict[str, Any]:
    """Gemma float32 / bfloat16 and a LLaMA-3-8B-sized model in bfloat16 on ``args.device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from knowloc.embedded import embedded_model_dir

    dev = args.device
    jobs = [Job(q, args.steps, args.device_memory_gb) for q in queries]
    out: dict[str, Any] = {"device": torch.cuda.get_device_name() if dev == "cuda" else dev}
    runs: dict[str, dict[str, dict[str, pd.DataFrame]]] = {}
    for dtype in ("float32", "bfloat16"):
        model = load_model("gemma3-270m", device=dev, dtype=dtype)
        rate, runs[dtype] = timed_device_run(model, jobs)
        out[f"gemma3-270m {dtype} q/s"] = rate
        print(f"  gemma3-270m {dtype:9s} {rate:8.2f} queries/s", flush=True)
        free(model)
    agree = agreement(runs["bfloat16"], runs["float32"])
    out["bfloat16 vs float32"] = {**agree, "top_overlap": top_overlap(runs["bfloat16"],
                                                                      runs["float32"])}
    print(f"  bfloat16 vs float32: top-{TOP} overlap {out['bfloat16 vs float32']['top_overlap']:.0%}, "
          f"max rel. error (P, max attribution) {agree['max_rel_error']:.2e}")
    tok = AutoTokenizer.from_pretrained(embedded_model_dir("smollm2-135m"))
    cfg = LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": args.llama_layers})
    torch.manual_seed(0)
    with torch.device(dev):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    big = wrap(hf, tok, name="llama3-8b-random")
    n = min(len(jobs), args.llama_queries)
    rate, _ = timed_device_run(big, jobs[:n])
    hours = total * METHODS_IN_PAPER / rate / 3600
    out["llama3-8b-sized bfloat16"] = {"layers": args.llama_layers, "queries": n, "q/s": rate,
                                       "projected GPU-hours": hours}
    print(f"  LLaMA-3-8B-sized ({args.llama_layers} layers) bfloat16 {rate:8.3f} queries/s "
          f"({n} queries): {total:,} queries x {METHODS_IN_PAPER} methods = {total * METHODS_IN_PAPER:,} "
          f"attributions -> {hours:,.1f} GPU-hours ({hours / 24:.2f} GPU-days)")
    free(big)
    return out


def print_table(rows: list[dict[str, Any]]) -> None:
    cols = list(rows[0])
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  " + "  ".join(c.ljust(width[c]) for c in cols))
    for r in rows:
        print("  " + "  ".join(str(r[c]).ljust(width[c]) for c in cols))


def duration(seconds: float) -> str:
    return f"{seconds / 86400:,.1f} days" if seconds > 2 * 86400 else f"{seconds / 3600:,.1f} h"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="builtin",
                    help="builtin (default: knowloc's built-in facts), pararel:DIR or jsonl:FILE")
    ap.add_argument("--model", default="gemma3-270m",
                    help="the model of the CPU section (default: the embedded Gemma 3 270M)")
    ap.add_argument("--executors", default="local,ray",
                    help="comma-separated: local (this process), ray (local Ray workers)")
    ap.add_argument("--queries", type=int, default=24)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads-per-worker", type=int, default=1)
    ap.add_argument("--memory-gb", type=float, default=2.0, help="attribution memory budget")
    ap.add_argument("--warmup", type=int, default=1, help="local warm-up queries")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu", "none"), default="auto",
                    help="device section: auto = cuda when available, else skipped")
    ap.add_argument("--device-memory-gb", type=float, default=16.0)
    ap.add_argument("--llama-layers", type=int, default=32)
    ap.add_argument("--llama-queries", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="4 queries, 4 steps")
    ap.add_argument("--json", type=Path, help="write the numbers here")
    args = ap.parse_args(argv)
    if args.quick:
        args.queries, args.steps = 4, 4
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "none"

    executors = [e.strip() for e in args.executors.split(",") if e.strip()]
    if not executors or set(executors) - {"local", "ray"}:
        raise SystemExit(f"--executors {args.executors!r}: give local, ray or local,ray")
    spec = dataset_spec(args.dataset)
    queries = pick_queries(spec, args.queries)
    total = len(load_facts(spec).queries())
    pararel = spec.startswith("pararel:")
    print(f"machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}")
    print(f"work: {len(queries)} queries of {spec} ({len({q.relation for q in queries})} "
          f"relations), IG {args.steps} steps, {args.model} float32 on CPU")
    model = load_model(args.model)
    jobs = [Job(q, args.steps, args.memory_gb) for q in queries]
    phases: list[Phase] = []
    local = ray_ = None
    if "local" in executors:
        local = run_local(model, jobs, args.warmup)
        phases.append(local)
    if "ray" in executors:
        ray_ = run_ray(model, jobs, args.workers, args.threads_per_worker)
        phases.append(ray_)
    threads = torch.get_num_threads()
    if local is not None and threads > 1:  # does the one process use its cores? on one thread
        torch.set_num_threads(1)
        one_thread = run_local(model, jobs, args.warmup)
        phases.append(one_thread)
        torch.set_num_threads(threads)
    print_table([p.row() for p in phases])
    agree = None
    if local is not None and ray_ is not None:
        agree = agreement(ray_.results, local.results)
        print(f"  ratio ray / local: {ray_.rate / local.rate:.2f}x queries/s")
        print(f"  agreement ray vs local: {agree['bit_identical']}/{agree['queries']} "
              f"bit-identical, {agree['same_top_neurons']}/{agree['queries']} same top-{TOP} "
              f"neurons, max rel. error {agree['max_rel_error']:.1e}")
    if local is not None and threads > 1:
        print(f"  local {threads} threads / local 1 thread: {local.rate / one_thread.rate:.2f}x "
              "queries/s")
    attributions = total * METHODS_IN_PAPER
    what = "paper preset: at most" if pararel else "all"
    print(f"{what} {total:,} queries of {spec} x {METHODS_IN_PAPER} methods = "
          f"{attributions:,} attributions"
          + (" (only known facts are localized)" if pararel else "") + ": "
          + ", ".join(f"{p.name.split(' ')[0]} {duration(attributions / p.rate)}"
                      for p in phases))
    report: dict[str, Any] = {
        "cpus": os.cpu_count(), "torch": torch.__version__, "dataset": spec,
        "model": args.model, "queries": len(queries), "steps": args.steps,
        "phases": [p.row() for p in phases],
        "ratio": ray_.rate / local.rate if local is not None and ray_ is not None else None,
        "agreement": agree, "dataset_queries": total,
        "projected_seconds": {p.name: attributions / p.rate for p in phases},
    }
    free(model)
    if args.device != "none":
        print(f"device section ({args.device}):")
        report["device"] = device_section(queries, args, total)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
