"""The subcommands of ``knowloc``: one ``cmd_<name>(args) -> exit status`` each."""

from __future__ import annotations

import logging
import time
from typing import Any

from ..errors import ConfigError, RunError
from .checks import check_methods, check_writable, selection_of
from .logs import open_run_log, say

log = logging.getLogger(__name__)


def executor_of(args) -> Any:
    """The executor of ``--executor``; one that holds workers (``close``) is closed when the
    command ends, normally, on an error or on Ctrl-C."""
    from ..pipeline.distributed import make_executor

    executor = make_executor(args.executor, address=args.ray_address, workers=args.workers,
                             gpus_per_worker=args.gpus_per_worker,
                             threads_per_worker=args.threads_per_worker)
    close = getattr(executor, "close", None)
    if close is not None:
        args.resources.callback(close)
    return executor


def load_model_of(args) -> Any:
    from .. import models

    t = time.time()
    model = models.load_model(args.model, device=args.device, dtype=args.dtype)
    loaded = (f"loaded {args.model} ({model.adapter.name}, {model.n_layers} layers x "
              f"{model.d_mlp} neurons) in {time.time() - t:.1f} s")
    say(loaded)
    log.info("%s", loaded, extra={"log_only": True})
    return model


def cmd_localize(args) -> int:
    check_methods(args.method, n_steps=args.n_steps, sig_mode=args.sig_mode)
    selection = selection_of(args)
    if args.prompt or args.answer:
        if not (args.prompt and args.answer):
            raise ConfigError("--prompt and --answer go together")
        return _localize_one(args, selection)
    if args.out is None:
        raise ConfigError("dataset mode needs --out RUN_DIR (or give --prompt and --answer)")
    if args.json:
        raise ConfigError("--json prints the result of one query: give --prompt and --answer")
    check_writable(args.out)
    open_run_log(args, args.out)
    return _localize_dataset(args, selection)


def _localize_one(args, selection) -> int:
    """One prompt: the table on stdout, or one JSON object (``--json``); with ``--out`` the
    attribution map (:meth:`~knowloc.attribution.Attribution.save`), the knowledge neurons
    (CSV) and ``summary.json`` per method."""
    import json

    from ..attribution import Attribution, attribute
    from ..attribution.convergence import gap_summary
    from ..neurons import neurons_frame
    from ..report.figures import method_label
    from ..store import atomic_write_text, write_csv

    if args.json and len(args.method) != 1:
        raise ConfigError(f"--json prints the result of one method; give one --method "
                          f"(got {','.join(args.method)})")
    if args.out is not None:
        check_writable(args.out)
    model = load_model_of(args)
    summary: dict[str, Any] = {}
    for method in args.method:
        t = time.time()
        attr = attribute(model, (args.prompt, args.answer), method, n_steps=args.n_steps,
                         sig_mode=args.sig_mode, target=args.target, rule=args.rule,
                         internal_batch_size=args.batch_size,
                         memory_budget_gb=args.memory_gb, progress=not args.quiet)
        dt = time.time() - t
        assert isinstance(attr, Attribution)  # one query in, one Attribution out
        kn = neurons_frame(attr, selection)
        gap = gap_summary(attr)
        answer_tok = model.tokenizer.decode(attr.target_ids)
        summary = summary or {
            "prompt": args.prompt, "answer": args.answer, "target_tokens": answer_tok,
            "target_ids": list(attr.target_ids), "P": attr.prob, "known": bool(attr.top1),
            "predicted": attr.predicted, "n_steps": args.n_steps, "target": args.target,
            "selection": selection.as_dict(), "model": args.model, "methods": {},
        }
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            attr.save(args.out / f"attribution_{method}.pt")
            write_csv(args.out / f"neurons_{method}.csv", kn)
            summary["methods"][method] = {
                "n_neurons": len(kn), "seconds": round(dt, 3),
                "attribution": f"attribution_{method}.pt", "neurons": f"neurons_{method}.csv",
                **gap.as_dict()}
        if args.json:
            print(json.dumps({
                "prompt": args.prompt, "answer": args.answer, "target_tokens": answer_tok,
                "P": attr.prob, "known": bool(attr.top1), "predicted": attr.predicted,
                "method": method, "n_steps": args.n_steps, "rule": args.rule, **gap.as_dict(),
                "neurons": [[int(r.layer), int(r.neuron), float(r.attribution)]
                            for r in kn.itertuples()]}, ensure_ascii=False))
            continue
        print(f"\n{method_label(method)}  {args.prompt!r} -> {answer_tok!r}")
        print(f"  P(answer) = {attr.prob:.4f}   top-1 = {attr.predicted!r} "
              f"({'correct' if attr.top1 else 'not the answer'})   {dt:.1f} s")
        for line in gap.lines(method, args.rule):
            print(f"  {line}")
        print(f"  knowledge neurons ({selection.mode} threshold {selection.value}): {len(kn)}")
        print(f"  {'layer':>5} {'neuron':>7} {'attribution':>12} {'activation':>11}")
        for r in kn.head(args.top).itertuples():
            print(f"  {r.layer:>5} {r.neuron:>7} {r.attribution:>12.4g} {r.activation:>11.4g}")
        if len(kn) > args.top:
            print(f"  ... {len(kn) - args.top} more")
    if args.out is not None:
        atomic_write_text(args.out / "summary.json",
                          json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        say(f"wrote the attribution map(s), knowledge neurons and summary.json to {args.out}")
    return 0


def _localize_dataset(args, selection) -> int:
    from ..data import load_facts, with_context
    from ..pipeline.localize import LocalizeConfig
    from ..pipeline.run import seed_everything
    from ..store import RunStore, environment_info
    from ..study.driver import note_timings, run_stages
    from ..study.spec import RunSpec
    from ..study.stages import Context, LocalizeStage

    t0 = time.time()
    facts = load_facts(args.dataset, relations=args.relations,
                       facts_per_relation=args.facts_per_relation, seed=args.seed,
                       max_queries_per_fact=args.max_queries_per_fact)
    facts = with_context(facts, args.context)
    say(f"{len(facts)} facts, {len(facts.queries())} queries from {facts.source} "
        f"(skipped: {dict(facts.skipped) or 'none'})")
    seed_everything(args.seed)
    executor = executor_of(args)
    model = load_model_of(args)
    cfg = LocalizeConfig(methods=args.method, n_steps=args.n_steps, sig_mode=args.sig_mode,
                         selection=selection, internal_batch_size=args.batch_size,
                         memory_budget_gb=args.memory_gb, target=args.target,
                         keep_maps=args.keep_maps, rule=args.rule)
    store = RunStore(args.out)
    spec = RunSpec(model={"name": args.model, "device": args.device, "dtype": args.dtype},
                   seed=args.seed, localize=cfg)
    if (store.root / "config.yaml").exists():
        from ..study.spec import read_spec

        old = read_spec(store)  # keep the sections of the stages after localization
        spec.consistency, spec.modify, spec.modify_extra = (old.consistency, old.modify,
                                                            old.modify_extra)
        spec.intervene, spec.attention, spec.preset = old.intervene, old.attention, old.preset
    spec.describe_dataset(facts, relations=facts.relations,
                          facts_per_relation=args.facts_per_relation,
                          max_queries_per_fact=args.max_queries_per_fact, context=args.context)
    spec.with_model(model).write(store, overwrite=args.overwrite)
    store.write_env(environment_info({"command": "localize", "argv": args.argv,
                                      "weights": model.weights_identity()}))
    ctx = Context(store, spec, model=model, executor=executor, progress=not args.quiet,
                  facts=facts)
    timings: dict[str, float] = {}
    res = run_stages([LocalizeStage(cfg)], ctx, timings=timings)["localize"].result
    note_timings(store, "localize", {**timings, "total": round(time.time() - t0, 1)})
    q = res.queries
    print(f"localized {res.computed} queries ({res.skipped_done} already done) -> {store.root}")
    if len(q):
        summary = q.groupby("method").agg(queries=("query_id", "count"),
                                          known=("known", "mean"),
                                          mean_neurons=("n_neurons", "mean"))
        print(summary.to_string(float_format=lambda x: f"{x:.3f}"))
    return 0


def _run_stage(stage: Any, ctx: Any, command: str) -> Any:
    """Run one stage through the driver and record this invocation's timing."""
    from ..study.driver import note_timings, run_stages

    timings: dict[str, float] = {}
    t0 = time.time()
    done = run_stages([stage], ctx, timings=timings)[stage.name]
    note_timings(ctx.store, command, {**timings, "total": round(time.time() - t0, 1)})
    return done


def cmd_consistency(args) -> int:
    from ..pipeline.consistency import ConsistencyConfig
    from ..store import RunStore
    from ..study.spec import read_spec
    from ..study.stages import ConsistencyStage, Context

    if args.localize:
        args.out = args.run
        check_methods(args.method, n_steps=args.n_steps, sig_mode=args.sig_mode)
        selection = selection_of(args)
        open_run_log(args, args.run)
        _localize_dataset(args, selection)
    if not (args.run / "config.yaml").exists():
        raise ConfigError(f"{args.run} is not a knowloc run directory (no config.yaml); "
                          "run `knowloc localize --dataset ... --out RUN` first")
    open_run_log(args, args.run)
    store = RunStore(args.run, create=False)
    cfg = ConsistencyConfig(args.population, args.static_threshold, n_boot=args.n_boot,
                            boot_seed=args.boot_seed).validate()
    ctx = Context(store, read_spec(store), allow_partial=args.allow_partial)
    shown = _run_stage(ConsistencyStage(cfg), ctx, "consistency").shown
    assert shown is not None
    print(shown.markdown["table1"])
    print(f"\nwrote {args.run / 'table1.md'}, table1.csv, consistency.parquet and "
          f"{len(shown.figures)} violin plot(s) under {args.run / 'figures'}")
    return 0


def _open_run_for_editing(args) -> tuple[Any, dict]:
    """The run store and its config, checked before any model is loaded."""
    from ..errors import RunError
    from ..store import RunStore

    store = RunStore(args.run, create=False)
    config = store.read_config()
    open_run_log(args, args.run)
    if store.table("consistency").empty:
        raise RunError(f"run {store.root} has no consistency results; run "
                       f"`knowloc consistency --run {args.run}` first")
    return store, config


def _load_run_model(args, config: dict) -> Any:
    from ..errors import RunError
    from ..pipeline.run import model_fingerprint

    stored = config.get("model", {}) or {}
    args.model = args.model or stored.get("name")
    args.device = args.device or stored.get("device") or "cpu"
    args.dtype = args.dtype or stored.get("dtype") or "float32"
    if not args.model:
        raise RunError(f"{args.run}/config.yaml names no model; pass --model")
    model = load_model_of(args)
    expected = (config.get("fingerprint") or {}).get("model")
    if expected and model_fingerprint(model) != expected:
        raise RunError(f"model {args.model} ({model_fingerprint(model)}) is not the model of run "
                       f"{args.run} ({expected}); pass the run's --model")
    weights = (config.get("fingerprint") or {}).get("weights")
    if weights and model.weights_identity()["sha256"] != weights:
        raise RunError(f"the weights of model {args.model} changed since run {args.run} was "
                       f"made (sha256 {weights[:12]}..., now "
                       f"{model.weights_identity()['sha256'][:12]}...); pick the run's weights")
    return model


def _stage_context(args, store, model) -> Any:
    from ..study.spec import read_spec
    from ..study.stages import Context

    return Context(store, read_spec(store), model=model, executor=args.executor_obj,
                   progress=not args.quiet, allow_partial=args.allow_partial,
                   ppl_text=getattr(args, "ppl_text", None),
                   heatmaps=not getattr(args, "no_heatmaps", False))


def cmd_modify(args) -> int:
    from ..evaluation import load_ppl_corpus
    from ..pipeline.modify import ModifyConfig
    from ..study.stages import ModifyStage

    cfg = ModifyConfig(ops=args.op, sets=args.edit_set, methods=args.method,
                       split_threshold=args.split_threshold, n_locality=args.n_locality,
                       gen_on=args.gen_on, ppl_entries=args.ppl_entries, ppl_pool=args.ppl_pool,
                       ppl_max_tokens=args.ppl_max_tokens, seed=args.seed,
                       update_sign=args.update_sign).validate()
    store, config = _open_run_for_editing(args)
    corpus = load_ppl_corpus(args.ppl_text)  # a missing file fails before the model loads
    if corpus.builtin:
        say("no --ppl-text given: ΔPPL is measured on knowloc's small built-in English corpus, "
             "not WikiText-2")
    args.executor_obj = executor_of(args)
    model = _load_run_model(args, config)
    ctx = _stage_context(args, store, model)
    ctx.spec.modify_extra["ppl_text"] = corpus.source
    done = _run_stage(ModifyStage(cfg), ctx, "modify")
    res, shown = done.result, done.shown
    print(shown.markdown["table2"])
    if "table3" in shown.markdown:
        print("\n" + shown.markdown["table3"])
    print(f"\nedited {res.computed} unit(s) ({res.skipped_done} already done) in "
          f"{res.seconds:.1f} s; wrote {args.run / 'table2.md'}, table2.csv, "
          + ("table3.md, table3.csv, " if "table3" in shown.markdown else "")
          + "edits.parquet, metrics.parquet")
    return 0


def cmd_intervene(args) -> int:
    from ..pipeline.mapping import MappingConfig
    from ..pipeline.run import parse_threshold
    from ..study.stages import MappingStage

    cfg = MappingConfig(methods=args.method,
                        split_threshold=parse_threshold(args.split_threshold),
                        enhance=args.enhance, only_known=not args.all_queries)
    store, config = _open_run_for_editing(args)
    args.executor_obj = executor_of(args)
    model = _load_run_model(args, config)
    done = _run_stage(MappingStage(cfg), _stage_context(args, store, model), "intervene")
    res, shown = done.result, done.shown
    import pandas as pd

    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(res.figure4[["method", "kind", "set", "suppress", "enhance", "avg", "n_queries",
                           "n_empty"]].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(f"\nintervened on {res.computed} fact(s) ({res.skipped_done} already done) in "
          f"{res.seconds:.1f} s; wrote {args.run / 'figure4.csv'}, interventions.parquet and "
          f"{len(shown.figures)} figure(s) under {args.run / 'figures'}")
    return 0


def cmd_attention(args) -> int:
    from ..pipeline.attention import AttentionConfig
    from ..study.stages import AttentionStage

    cfg = AttentionConfig(methods=args.method, split_threshold=args.split_threshold,
                          alpha=args.alpha, enhance=args.enhance,
                          only_known=not args.all_queries, seed=args.seed).validate()
    store, config = _open_run_for_editing(args)
    args.executor_obj = executor_of(args)
    model = _load_run_model(args, config)
    done = _run_stage(AttentionStage(cfg), _stage_context(args, store, model), "attention")
    res, shown = done.result, done.shown
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
    from ..attribution import attribute
    from ..models import answer_scores
    from ..neurons import Selection, knowledge_neurons
    from ..pipeline.attention import heatmap_table
    from ..pipeline.units import short_label
    from ..report.figures import heatmap_figures, method_label

    prompts, answers = list(args.prompt), list(args.answer)
    if len(answers) == 1:
        answers = answers * len(prompts)
    if len(answers) != len(prompts):
        raise ConfigError(f"give one --answer for all prompts or one per --prompt "
                          f"({len(prompts)} prompts, {len(answers)} answers)")
    if args.neurons < 1:
        raise ConfigError("--neurons must be >= 1")
    if args.method != "none":
        check_methods([args.method], n_steps=args.n_steps)
    Selection("relative", args.threshold).validate()
    check_writable(args.out)
    model = load_model_of(args)
    neurons, labels = [], []
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        target = model.target_ids(prompt, answer, args.target)
        p = float(answer_scores(model, [model.encode_prompt(prompt)], [target]).prob[0])
        kn: list = []
        if args.method != "none":
            attr = attribute(model, (prompt, answer), args.method, n_steps=args.n_steps,
                             target=args.target, progress=False)
            kn = sorted(knowledge_neurons(attr, args.threshold).neurons)
        neurons.append(kn)
        labels.append(f"q{i + 1}: {short_label(prompt, 40)} → {answer}")
        say(f"q{i + 1}: P({answer!r}) = {p:.4f}"
             + (f", {len(kn)} knowledge neuron(s) ({method_label(args.method)})"
                if args.method != "none" else ""))
    table = heatmap_table(model, prompts, labels, neurons, alpha=args.alpha,
                          n_neurons=args.neurons)
    figs = heatmap_figures(table, args.out, title=model.name)
    for name, (png, csv) in figs.items():
        print(f"{name}: {png} ({csv.name})")
    return 0


def cmd_reproduce(args) -> int:
    from ..reproduce import preset_values, reproduce, resolve_preset

    preset = resolve_preset(
        args.preset, dataset=args.dataset, **preset_values(args.preset_fields),
        relations=tuple(args.relations) if args.relations else None,
        known_per_relation=args.known_per_relation,
        max_queries_per_fact=args.max_queries_per_fact,
        methods=tuple(args.method) if args.method else None,
        n_steps=args.n_steps, target=args.target, population=args.population,
        rule=args.rule,
        modify=False if args.no_modify else None,
        attention=False if args.no_attention else None,
    )
    check_methods(preset.methods, n_steps=preset.n_steps)
    check_writable(args.out)
    open_run_log(args, args.out)
    reproduce(args.out, model=args.model, preset=preset, device=args.device,
              dtype=args.dtype, seed=args.seed, overwrite=args.overwrite,
              progress=not args.quiet, ppl_text=args.ppl_text, executor=executor_of(args),
              argv=args.argv, keep_maps=args.keep_maps, n_boot=args.n_boot,
              boot_seed=args.boot_seed)
    return 0


def cmd_query(args) -> int:
    import duckdb
    import pandas as pd

    from ..store import RunStore

    if not args.run.exists():
        raise ConfigError(f"run directory {args.run} does not exist")
    if not args.sql.strip():
        raise ConfigError("the SQL statement is empty; e.g. knowloc query RUN "
                          "'select * from queries limit 5'")
    try:
        df = RunStore(args.run, create=False).query(args.sql)
    except duckdb.Error as exc:  # a part that is not Parquet fails when its view is made
        raise RunError(f"cannot read the tables of {args.run}: {exc}") from exc
    with pd.option_context("display.max_rows", 200, "display.width", 200):
        print(df.to_string(index=False))
    return 0


def cmd_report(args) -> int:
    from ..study.report import render_report

    if not args.run.is_dir():
        raise ConfigError(f"run directory {args.run} does not exist")
    path = render_report(args.run, args.out)
    print(f"report: {path}")
    return 0


def cmd_sensitivity(args) -> int:
    from ..study.sensitivity import sensitivity
    from ..study.sensitivity_report import sensitivity_markdown, write_sensitivity

    if not args.run.is_dir():
        raise ConfigError(f"run directory {args.run} does not exist")
    axes = {"auto": None, "both": ("neuron", "split"), "neuron": ("neuron",),
            "split": ("split",)}[args.axis]
    if args.out is not None:
        check_writable(args.out)
    res = sensitivity(args.run, axes=axes, neuron_thresholds=args.neuron_thresholds,
                      split_thresholds=args.split_thresholds, otsu_bins=args.otsu_bins)
    if res.note:
        say(f"knowloc: note: {res.note}")
    files = write_sensitivity(res, args.out)
    print(sensitivity_markdown(res.table))
    print(f"\n{len(res.table)} rows ({', '.join(res.axes)}; {res.n_maps} attribution maps "
          f"read, no model) in {res.seconds:.1f} s; wrote {files['csv']} and {files['png']}")
    return 0


def cmd_compare(args) -> int:
    from ..study.compare import compare, write_compare

    for run in args.runs:
        if not run.is_dir():
            raise ConfigError(f"run directory {run} does not exist")
    check_writable(args.out)
    cmp = compare(args.runs, paper=args.paper)
    files = write_compare(cmp, args.out)
    print(files["md"].read_text(encoding="utf-8"))
    print(f"wrote {files['md']}, {files['csv'].name} and {files['png'].name}")
    return 0


def cmd_status(args) -> int:
    from ..study.status import format_status, run_status, status_json

    if not args.run.is_dir():
        raise ConfigError(f"run directory {args.run} does not exist")
    status = run_status(args.run, log_lines=args.log_lines)
    print(status_json(status) if args.json else format_status(status))
    return 0


def cmd_models(args) -> int:
    from ..embedded import EMBEDDED, embedded_license_note
    from ..models import supported_architectures

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
    "report": cmd_report,
    "status": cmd_status,
    "models": cmd_models,
    "sensitivity": cmd_sensitivity,
    "compare": cmd_compare,
}
