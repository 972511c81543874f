"""``knowloc <stage>``: the command-line interface.

Errors a user can cause are printed as one line (no traceback) with a non-zero exit code.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError, KnowlocError

log = logging.getLogger("knowloc")


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="gemma3-270m",
                   help="embedded name (gemma3-270m, smollm2-135m), local directory or HF id "
                        "(default: %(default)s)")
    g.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("dataset")
    g.add_argument("--dataset", default="builtin",
                   help="builtin, pararel:<dir>, jsonl:<file> (default: %(default)s)")
    g.add_argument("--relations", type=_csv, default=None, help="comma-separated relation ids")
    g.add_argument("--facts-per-relation", type=int, default=None)
    g.add_argument("--max-queries-per-fact", type=int, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--context", default=None,
                   help="text prepended to every prompt, e.g. a short few-shot prefix "
                        "(helps small models such as smollm2-135m); off by default")


def _add_attr_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("attribution")
    g.add_argument("--method", type=_csv, default=["ig"],
                   help=f"comma-separated: {_method_list()} (default: ig)")
    g.add_argument("--n-steps", type=int, default=20)
    g.add_argument("--sig-mode", default="mean", choices=["mean", "per_token"])
    g.add_argument("--target", default="first", choices=["first", "all"],
                   help="attribute the answer's first token, or the teacher-forced "
                        "probability of the whole answer (default: first)")
    g.add_argument("--threshold", type=float, default=0.2,
                   help="knowledge neurons: attribution > threshold * max (default: 0.2)")
    g.add_argument("--selection", default="relative", choices=["relative", "absolute", "topk"])
    g.add_argument("--batch-size", type=int, default=None,
                   help="integration points per forward pass (default: sized to --memory-gb)")
    g.add_argument("--memory-gb", type=float, default=2.0)


def _add_executor_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("executor (where the units are computed)")
    g.add_argument("--executor", default="local", choices=["local", "ray"],
                   help="local: this process; ray: workers of a Ray cluster, each with its own "
                        "model (default: %(default)s)")
    g.add_argument("--ray-address", default=None,
                   help="Ray cluster to join: auto, HOST:6379 or ray://HOST:10001 (default: a "
                        "local Ray instance)")
    g.add_argument("--workers", type=int, default=None,
                   help="Ray workers (default: the cluster's GPUs / --gpus-per-worker, else "
                        "its CPUs / --threads-per-worker)")
    g.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPUs per Ray worker (fractions share a GPU; > 0 loads on cuda)")
    g.add_argument("--threads-per-worker", type=int, default=None,
                   help="torch threads (and CPUs reserved) per Ray worker")


def _executor(args) -> Any:
    from .pipeline.distributed import make_executor

    return make_executor(args.executor, address=args.ray_address, workers=args.workers,
                         gpus_per_worker=args.gpus_per_worker,
                         threads_per_worker=args.threads_per_worker)


def _add_run_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (default: the run's)")
    g.add_argument("--model", default=None, help="model of the run (default: from config.yaml)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: the run's)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--allow-partial", action="store_true",
                   help="use the finished units of an unfinished run (default: refuse)")


def _localize_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("localize", help="localize knowledge neurons of one query or a dataset")
    _add_model_args(p)
    _add_data_args(p)
    _add_attr_args(p)
    _add_executor_args(p)
    p.add_argument("--prompt", help="a single cloze prompt (with --answer)")
    p.add_argument("--answer", help="the gold answer of --prompt")
    p.add_argument("--top", type=int, default=15, help="rows of the neuron table to print")
    p.add_argument("--out", type=Path, help="run directory (dataset mode)")
    p.add_argument("--overwrite", action="store_true",
                   help="reuse --out even if it was made with another configuration")
    return p


def _consistency_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("consistency", help="CS1/CS2, K_I/K_II, Welch t-test: Table 1 + Figure 3")
    p.add_argument("--run", type=Path, required=True, help="run directory made by localize")
    p.add_argument("--population", default="known", choices=["known", "all"],
                   help="facts known (top-1 on >= 1 query) or all facts (default: known)")
    p.add_argument("--static-threshold", type=float, default=0.1)
    p.add_argument("--allow-partial", action="store_true",
                   help="use the finished units of an unfinished localization")
    p.add_argument("--localize", action="store_true",
                   help="first localize what is missing, with the dataset/model/attribution "
                        "options below (same as `knowloc localize`)")
    _add_model_args(p)
    _add_data_args(p)
    _add_attr_args(p)
    _add_executor_args(p)
    p.add_argument("--overwrite", action="store_true")
    return p


def _reproduce_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("reproduce", help="run every experiment end to end and write report.html")
    _add_model_args(p)
    _add_executor_args(p)
    p.add_argument("--preset", default="quick", help="quick, standard or paper (default: quick)")
    p.add_argument("--dataset", default=None,
                   help="override the preset's dataset (standard/paper need pararel:<dir>)")
    p.add_argument("--relations", type=_csv, default=None)
    p.add_argument("--known-per-relation", type=int, default=None)
    p.add_argument("--max-queries-per-fact", type=int, default=None)
    p.add_argument("--method", type=_csv, default=None)
    p.add_argument("--n-steps", type=int, default=None)
    p.add_argument("--population", default=None, choices=["known", "all"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ppl-text", type=Path, default=None,
                   help="text file for ΔPPL of the modification stage (e.g. WikiText-2's "
                        "wiki.test.raw); default: knowloc's small built-in English corpus")
    p.add_argument("--no-modify", action="store_true",
                   help="skip knowledge modification (Tables 2, 3) and query-KN mapping "
                        "(Figure 4)")
    p.add_argument("--no-attention", action="store_true",
                   help="skip the attention experiments (Figures 1, 5, 6, 7, 10)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--overwrite", action="store_true")
    return p


def _modify_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("modify", help="erase/update the knowledge neurons of a run's facts: "
                                      "Rel/Gen/Loc/ΔPPL, Table 2")
    p.add_argument("--run", type=Path, required=True,
                   help="run directory with consistency results")
    p.add_argument("--op", type=_csv, default=["erase", "update"],
                   help="erase, update or both, comma-separated (default: erase,update)")
    p.add_argument("--set", dest="edit_set", type=_csv, default=["local", "global"],
                   help="local (N_i), global (N_g), cas (Consistency-Aware set, Table 3), "
                        "comma-separated (default: local,global)")
    p.add_argument("--ppl-text", type=Path, default=None,
                   help="text file for ΔPPL, one entry per line (e.g. WikiText-2's "
                        "wiki.test.raw); default: knowloc's small built-in English corpus")
    p.add_argument("--method", type=_csv, default=None,
                   help="localization methods to edit (default: every method of the run)")
    p.add_argument("--split-threshold", default="0.1",
                   help="K_I if CS2 > T; a number or 'otsu' (default: 0.1)")
    p.add_argument("--n-locality", type=int, default=20,
                   help="unrelated facts (other relations) per edit for Loc (default: 20)")
    p.add_argument("--gen-on", default="known", choices=["known", "all"],
                   help="neighbor queries for Gen: those the unedited model answers correctly "
                        "(default) or all")
    p.add_argument("--ppl-entries", type=int, default=5, help="entries per edit (default: 5)")
    p.add_argument("--ppl-pool", type=int, default=25,
                   help="entries drawn once (seeded) from the text; each edit draws its "
                        "entries from them, so unedited PPLs are reused (default: 25)")
    p.add_argument("--ppl-max-tokens", type=int, default=128,
                   help="tokens kept of each entry (default: 128)")
    p.add_argument("--update-sign", default="none", choices=["none", "activation"],
                   help="none: the paper's v - 2E(o) + 2E(o'); activation: multiply the change "
                        "by the sign of the neuron's activation (gated MLPs read value vectors "
                        "with negative activations too)")
    p.add_argument("--seed", type=int, default=0)
    _add_run_model_args(p)
    _add_executor_args(p)
    return p


def _intervene_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("intervene", help="suppress/enhance KN activations of Self and neighbor "
                                         "sets: ΔProb, Figure 4")
    p.add_argument("--run", type=Path, required=True,
                   help="run directory with consistency results")
    p.add_argument("--method", type=_csv, default=None)
    p.add_argument("--split-threshold", default="0.1")
    p.add_argument("--enhance", type=float, default=2.0, help="enhancement factor (default: 2)")
    p.add_argument("--all-queries", action="store_true",
                   help="also queries the model does not answer correctly (default: known only)")
    _add_run_model_args(p)
    _add_executor_args(p)
    return p


def _attention_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("attention", help="predominance, knowledge synapses × 0 / × 2: "
                                         "Figures 5, 6 (and heatmaps, Figures 1, 7, 10)")
    p.add_argument("--run", type=Path, required=True,
                   help="run directory with consistency results")
    p.add_argument("--method", type=_csv, default=None,
                   help="methods whose KNs (ΔValue) and K_I/K_II split are used "
                        "(default: every method of the run)")
    p.add_argument("--split-threshold", default="0.1")
    p.add_argument("--alpha", type=float, default=0.3,
                   help="synapse threshold τ = alpha × mean column mass (default: 0.3)")
    p.add_argument("--enhance", type=float, default=2.0, help="enhancement factor (default: 2)")
    p.add_argument("--all-queries", action="store_true",
                   help="Figure 6 over all queries (default: those the model answers correctly)")
    p.add_argument("--no-heatmaps", action="store_true",
                   help="skip the heatmaps of a K_I and a K_II fact")
    p.add_argument("--seed", type=int, default=0, help="draw of the unrelated queries")
    _add_run_model_args(p)
    _add_executor_args(p)
    return p


def _heatmap_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("heatmap", help="layer × neuron activation heatmaps of prompts, as is "
                                       "and with their knowledge synapses × 0 / × 2 "
                                       "(Figures 1, 7, 10)")
    _add_model_args(p)
    p.add_argument("--prompt", action="append", required=True,
                   help="cloze prompt; repeat for neighbor queries")
    p.add_argument("--answer", action="append", required=True,
                   help="gold answer: one for all prompts or one per --prompt")
    p.add_argument("--method", default="ig",
                   help=f"method localizing the KNs to circle ({_method_list()}) or none "
                        "(default: ig)")
    p.add_argument("--n-steps", type=int, default=20)
    p.add_argument("--threshold", type=float, default=0.2,
                   help="knowledge neurons: attribution > threshold × max (default: 0.2)")
    p.add_argument("--neurons", type=int, default=64,
                   help="neuron columns drawn: the KNs' indices, then the largest |activation| "
                        "(default: 64)")
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--out", type=Path, default=Path("heatmap"),
                   help="output directory (default: ./heatmap)")
    return p


def _query_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("query", help="run SQL (DuckDB) over a run's tables")
    p.add_argument("run", type=Path)
    p.add_argument("sql")
    return p


def _models_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("models", help="list the embedded models and supported architectures")
    return p


PARSERS = (_localize_parser, _consistency_parser, _reproduce_parser, _modify_parser,
           _intervene_parser, _attention_parser, _heatmap_parser, _query_parser, _models_parser)


def _add_common_args(p: argparse.ArgumentParser, *, top: bool = False) -> None:
    """-v/-q, accepted before and after the subcommand (a subcommand's value wins only when
    given there)."""
    default: Any = 0 if top else argparse.SUPPRESS
    p.add_argument("-v", "--verbose", action="count", default=default)
    p.add_argument("-q", "--quiet", action="store_true",
                   default=False if top else argparse.SUPPRESS, help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="knowloc",
        description="Find where a language model keeps a fact, test whether that place is "
                    "fixed, and edit it (Chen et al., ICLR 2025).",
    )
    _add_common_args(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True)
    for build in PARSERS:
        _add_common_args(build(sub))
    return parser


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception as exc:  # noqa: BLE001 - quieting transformers is best effort
        logging.getLogger(__name__).debug("could not quiet transformers logging: %s", exc)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _load(args) -> Any:
    from .models import load_model

    t = time.time()
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    _say(f"loaded {args.model} ({model.adapter.name}, {model.n_layers} layers x {model.d_mlp} "
         f"neurons) in {time.time() - t:.1f} s")
    return model


def _selection(args):
    from .neurons import Selection

    value = args.threshold
    if args.selection == "topk":
        if value < 0 or int(value) != value:
            raise ConfigError("--selection topk needs --threshold K, a positive integer "
                              f"number of neurons (got {value})")
        value = int(value)
    return Selection(args.selection, value).validate()


def _method_list() -> str:
    from .attribution import method_names

    return ", ".join(method_names())


def _check_methods(methods: Sequence[str], **config: Any) -> None:
    """Every name registered now (a method registered after import counts), and its
    attribution config valid."""
    from .attribution import AttributionConfig, method_names

    for m in methods:
        if m not in method_names():
            raise ConfigError(f"unknown attribution method {m!r}; choose from {_method_list()}")
        AttributionConfig(method=m, **config).validate()


def cmd_localize(args) -> int:
    _check_methods(args.method, n_steps=args.n_steps, sig_mode=args.sig_mode)
    selection = _selection(args)
    if args.prompt or args.answer:
        if not (args.prompt and args.answer):
            raise ConfigError("--prompt and --answer go together")
        return _localize_one(args, selection)
    if args.out is None:
        raise ConfigError("dataset mode needs --out RUN_DIR (or give --prompt and --answer)")
    return _localize_dataset(args, selection)


def _localize_one(args, selection) -> int:
    from .attribution import attribute
    from .neurons import neurons_frame
    from .report.figures import method_label

    model = _load(args)
    for method in args.method:
        t = time.time()
        attr = attribute(model, (args.prompt, args.answer), method, n_steps=args.n_steps,
                         sig_mode=args.sig_mode, target=args.target,
                         internal_batch_size=args.batch_size,
                         memory_budget_gb=args.memory_gb, progress=not args.quiet)
        dt = time.time() - t
        kn = neurons_frame(attr, selection)
        answer_tok = model.tokenizer.decode(attr.target_ids)
        print(f"\n{method_label(method)}  {args.prompt!r} -> {answer_tok!r}")
        print(f"  P(answer) = {attr.prob:.4f}   top-1 = {attr.predicted!r} "
              f"({'correct' if attr.top1 else 'not the answer'})   {dt:.1f} s")
        print(f"  knowledge neurons ({selection.mode} threshold {selection.value}): {len(kn)}")
        print(f"  {'layer':>5} {'neuron':>7} {'attribution':>12} {'activation':>11}")
        for r in kn.head(args.top).itertuples():
            print(f"  {r.layer:>5} {r.neuron:>7} {r.attribution:>12.4g} {r.activation:>11.4g}")
        if len(kn) > args.top:
            print(f"  ... {len(kn) - args.top} more")
    return 0


def _localize_dataset(args, selection) -> int:
    from .data import load_facts, with_context
    from .pipeline.localize import LocalizeConfig, localize
    from .pipeline.run import model_fingerprint, seed_everything
    from .store import RunStore, environment_info

    facts = load_facts(args.dataset, relations=args.relations,
                       facts_per_relation=args.facts_per_relation, seed=args.seed,
                       max_queries_per_fact=args.max_queries_per_fact)
    facts = with_context(facts, args.context)
    _say(f"{len(facts)} facts, {len(facts.queries())} queries from {facts.source} "
         f"(skipped: {dict(facts.skipped) or 'none'})")
    seed_everything(args.seed)
    executor = _executor(args)
    model = _load(args)
    cfg = LocalizeConfig(methods=args.method, n_steps=args.n_steps, sig_mode=args.sig_mode,
                         selection=selection, internal_batch_size=args.batch_size,
                         memory_budget_gb=args.memory_gb, target=args.target)
    store = RunStore(args.out)
    config = {
        "fingerprint": {"model": model_fingerprint(model), "n_steps": args.n_steps,
                        "sig_mode": args.sig_mode, "selection": selection.as_dict()},
        "model": {"name": args.model, "device": args.device, "dtype": args.dtype},
        "dataset": {"source": facts.source, "relations": facts.relations,
                    "facts_per_relation": args.facts_per_relation,
                    "max_queries_per_fact": args.max_queries_per_fact,
                    "context": args.context,
                    "n_facts": len(facts), "n_queries": len(facts.queries()),
                    "skipped": dict(facts.skipped)},
        "localize": cfg.as_dict(),
        "seed": args.seed,
    }
    store.write_config(config, overwrite=args.overwrite)
    store.write_env(environment_info({"command": "localize"}))
    res = localize(model, facts, store, cfg, progress=not args.quiet, executor=executor)
    q = res.queries
    print(f"localized {res.computed} queries ({res.skipped_done} already done) in "
          f"{res.seconds:.1f} s -> {store.root}")
    if len(q):
        summary = q.groupby("method").agg(queries=("query_id", "count"),
                                          known=("known", "mean"),
                                          mean_neurons=("n_neurons", "mean"))
        print(summary.to_string(float_format=lambda x: f"{x:.3f}"))
    return 0


def cmd_consistency(args) -> int:
    from .pipeline.consistency import consistency
    from .report.stages import present_consistency
    from .store import RunStore

    if args.localize:
        args.out = args.run
        _check_methods(args.method, n_steps=args.n_steps, sig_mode=args.sig_mode)
        _localize_dataset(args, _selection(args))
    if not (args.run / "config.yaml").exists():
        raise ConfigError(f"{args.run} is not a knowloc run directory (no config.yaml); "
                          "run `knowloc localize --dataset ... --out RUN` first")
    store = RunStore(args.run, create=False)
    shown = present_consistency(store, consistency(store, population=args.population,
                                                   static_threshold=args.static_threshold,
                                                   allow_partial=args.allow_partial))
    print(shown.markdown["table1"])
    print(f"\nwrote {args.run / 'table1.md'}, table1.csv, consistency.parquet and "
          f"{len(shown.figures)} violin plot(s) under {args.run / 'figures'}")
    return 0


def _open_run_for_editing(args) -> tuple[Any, dict]:
    """The run store and its config, checked before any model is loaded."""
    from .errors import RunError
    from .store import RunStore

    store = RunStore(args.run, create=False)
    config = store.read_config()
    if store.table("consistency").empty:
        raise RunError(f"run {store.root} has no consistency results; run "
                       f"`knowloc consistency --run {args.run}` first")
    return store, config


def _load_run_model(args, config: dict) -> Any:
    from .errors import RunError
    from .pipeline.run import model_fingerprint

    stored = config.get("model", {}) or {}
    args.model = args.model or stored.get("name")
    args.device = args.device or stored.get("device") or "cpu"
    args.dtype = args.dtype or stored.get("dtype") or "float32"
    if not args.model:
        raise RunError(f"{args.run}/config.yaml names no model; pass --model")
    model = _load(args)
    expected = (config.get("fingerprint") or {}).get("model")
    if expected and model_fingerprint(model) != expected:
        raise RunError(f"model {args.model} ({model_fingerprint(model)}) is not the model of run "
                       f"{args.run} ({expected}); pass the run's --model")
    return model


def _record_stage_config(store, section: str, values: dict) -> None:
    config = store.read_config()
    config[section] = values
    store.write_config(config)


def cmd_modify(args) -> int:
    from .evaluation import load_ppl_corpus
    from .pipeline.modify import ModifyConfig, modify
    from .report.stages import present_modification

    cfg = ModifyConfig(ops=args.op, sets=args.edit_set, methods=args.method,
                       split_threshold=args.split_threshold, n_locality=args.n_locality,
                       gen_on=args.gen_on, ppl_entries=args.ppl_entries, ppl_pool=args.ppl_pool,
                       ppl_max_tokens=args.ppl_max_tokens, seed=args.seed,
                       update_sign=args.update_sign).validate()
    store, config = _open_run_for_editing(args)
    corpus = load_ppl_corpus(args.ppl_text)  # a missing file fails before the model loads
    if corpus.builtin:
        _say("no --ppl-text given: ΔPPL is measured on knowloc's small built-in English corpus, "
             "not WikiText-2")
    executor = _executor(args)
    model = _load_run_model(args, config)
    res = modify(model, store, cfg, ppl_text=args.ppl_text, progress=not args.quiet,
                 allow_partial=args.allow_partial, executor=executor)
    shown = present_modification(store, res)
    _record_stage_config(store, "modify", {**cfg.as_dict(), "ppl": res.ppl})
    print(shown.markdown["table2"])
    if "table3" in shown.markdown:
        print("\n" + shown.markdown["table3"])
    print(f"\nedited {res.computed} unit(s) ({res.skipped_done} already done) in "
          f"{res.seconds:.1f} s; wrote {args.run / 'table2.md'}, table2.csv, "
          + ("table3.md, table3.csv, " if "table3" in shown.markdown else "")
          + "edits.parquet, metrics.parquet")
    return 0


def cmd_intervene(args) -> int:
    from .pipeline.mapping import MappingConfig, query_kn_mapping
    from .pipeline.run import parse_threshold
    from .report.stages import present_mapping

    cfg = MappingConfig(methods=args.method,
                        split_threshold=parse_threshold(args.split_threshold),
                        enhance=args.enhance, only_known=not args.all_queries)
    store, config = _open_run_for_editing(args)
    executor = _executor(args)
    model = _load_run_model(args, config)
    res = query_kn_mapping(model, store, cfg, progress=not args.quiet,
                           allow_partial=args.allow_partial, executor=executor)
    shown = present_mapping(store, res)
    _record_stage_config(store, "intervene", cfg.as_dict())
    import pandas as pd

    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(res.figure4[["method", "kind", "set", "suppress", "enhance", "avg", "n_queries",
                           "n_empty"]].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(f"\nintervened on {res.computed} fact(s) ({res.skipped_done} already done) in "
          f"{res.seconds:.1f} s; wrote {args.run / 'figure4.csv'}, interventions.parquet and "
          f"{len(shown.figures)} figure(s) under {args.run / 'figures'}")
    return 0


def cmd_attention(args) -> int:
    from .pipeline.attention import AttentionConfig, attention_experiment
    from .report.stages import present_attention

    cfg = AttentionConfig(methods=args.method, split_threshold=args.split_threshold,
                          alpha=args.alpha, enhance=args.enhance,
                          only_known=not args.all_queries, seed=args.seed).validate()
    store, config = _open_run_for_editing(args)
    executor = _executor(args)
    model = _load_run_model(args, config)
    res = attention_experiment(model, store, cfg, heatmaps=not args.no_heatmaps,
                               progress=not args.quiet, allow_partial=args.allow_partial,
                               executor=executor)
    shown = present_attention(store, res)
    _record_stage_config(store, "attention", cfg.as_dict())
    import pandas as pd

    with pd.option_context("display.width", 160, "display.max_columns", 20):
        f5 = res.figure5.groupby(["method", "kind", "first"])["P"].agg(["mean", "count"])
        print("Predominance P (Figure 5; first = position 0 allowed):")
        print(f5.to_string(float_format=lambda x: f"{x:.3f}"))
        f6 = res.figure6[res.figure6["metric"] == "delta_prob"]
        print("\nΔProb of manipulating knowledge synapses (Figure 6; first = as defined, "
              "False = position 0 excluded):")
        print(f6[["method", "first", "kind", "synapses", "operation", "value", "median", "n"]]
              .to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(f"\nanalyzed {res.computed} fact(s) ({res.skipped_done} already done) in "
          f"{res.seconds:.1f} s; wrote figure5.csv, figure6.csv, predominance.parquet, "
          f"attention_queries.parquet, synapse_effects.parquet and "
          f"{len(shown.figures) + sum(len(v) for v in shown.heatmaps.values())} figure(s) under "
          f"{args.run / 'figures'}")
    return 0


def cmd_heatmap(args) -> int:
    from .attribution import attribute
    from .neurons import Selection, knowledge_neurons
    from .pipeline.attention import heatmap_table
    from .report.figures import heatmap_figures, method_label

    prompts, answers = list(args.prompt), list(args.answer)
    if len(answers) == 1:
        answers = answers * len(prompts)
    if len(answers) != len(prompts):
        raise ConfigError(f"give one --answer for all prompts or one per --prompt "
                          f"({len(prompts)} prompts, {len(answers)} answers)")
    if args.neurons < 1:
        raise ConfigError("--neurons must be >= 1")
    if args.method != "none":
        _check_methods([args.method], n_steps=args.n_steps)
    Selection("relative", args.threshold).validate()
    model = _load(args)
    neurons, labels = [], []
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        target = model.target_id(prompt, answer)
        p = float(model.next_token_probs([prompt])[0, target])
        kn: list = []
        if args.method != "none":
            attr = attribute(model, (prompt, answer), args.method, n_steps=args.n_steps,
                             progress=False)
            kn = sorted(knowledge_neurons(attr, args.threshold).neurons)
        neurons.append(kn)
        labels.append(f"q{i + 1}: {prompt[-40:]} → {answer}")
        _say(f"q{i + 1}: P({answer!r}) = {p:.4f}"
             + (f", {len(kn)} knowledge neuron(s) ({method_label(args.method)})"
                if args.method != "none" else ""))
    table = heatmap_table(model, prompts, labels, neurons, alpha=args.alpha,
                          n_neurons=args.neurons)
    figs = heatmap_figures(table, args.out, title=model.name)
    for name, (png, csv) in figs.items():
        print(f"{name}: {png} ({csv.name})")
    return 0


def cmd_reproduce(args) -> int:
    from .reproduce import reproduce, resolve_preset

    preset = resolve_preset(
        args.preset, dataset=args.dataset,
        relations=tuple(args.relations) if args.relations else None,
        known_per_relation=args.known_per_relation,
        max_queries_per_fact=args.max_queries_per_fact,
        methods=tuple(args.method) if args.method else None,
        n_steps=args.n_steps, population=args.population,
        modify=False if args.no_modify else None,
        attention=False if args.no_attention else None,
    )
    _check_methods(preset.methods, n_steps=preset.n_steps)
    reproduce(args.out, model=args.model, preset=preset, device=args.device,
              dtype=args.dtype, seed=args.seed, overwrite=args.overwrite,
              progress=not args.quiet, ppl_text=args.ppl_text, executor=_executor(args))
    return 0


def cmd_query(args) -> int:
    import pandas as pd

    from .store import RunStore

    if not args.run.exists():
        raise ConfigError(f"run directory {args.run} does not exist")
    df = RunStore(args.run, create=False).query(args.sql)
    with pd.option_context("display.max_rows", 200, "display.width", 200):
        print(df.to_string(index=False))
    return 0


def cmd_models(args) -> int:
    from .embedded import EMBEDDED, embedded_license_note
    from .models import supported_architectures

    for name in EMBEDDED:
        print(f"{name}: {embedded_license_note(name)}")
    print("supported model types:", ", ".join(supported_architectures()))
    return 0


COMMANDS = {
    "localize": cmd_localize,
    "consistency": cmd_consistency,
    "modify": cmd_modify,
    "intervene": cmd_intervene,
    "attention": cmd_attention,
    "heatmap": cmd_heatmap,
    "reproduce": cmd_reproduce,
    "query": cmd_query,
    "models": cmd_models,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return COMMANDS[args.command](args)
    except KnowlocError as exc:
        print(f"knowloc: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("knowloc: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
