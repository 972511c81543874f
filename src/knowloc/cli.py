"""``knowloc <stage>``: the command-line interface.

Errors a user can cause are printed as one line (no traceback) with a non-zero exit code.
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError, KnowlocError, RunError

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default (lists comma-joined); an option whose help
    already says its default, or whose default is None or a flag's False, is left alone."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "default" in text or default is None
                or default is False or default == argparse.SUPPRESS or action.nargs == 0):
            return text
        shown = ",".join(map(str, default)) if isinstance(default, list) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="gemma3-270m",
                   help="embedded name (gemma3-270m, smollm2-135m), local directory or HF id")
    g.add_argument("--device", default="cpu", help="cpu or cuda")
    g.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="weights and activations; float16 only where the model's activations "
                        "fit its range (not Gemma 3: use bfloat16)")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("dataset")
    g.add_argument("--dataset", default="builtin", help="builtin, pararel:<dir>, jsonl:<file>")
    g.add_argument("--relations", type=_csv, default=None,
                   help="comma-separated relation ids (default: every relation)")
    g.add_argument("--facts-per-relation", type=int, default=None,
                   help="facts drawn per relation (default: all)")
    g.add_argument("--max-queries-per-fact", type=int, default=None,
                   help="neighbor queries kept per fact (default: all)")
    g.add_argument("--seed", type=int, default=0, help="draw of the facts (0 <= seed < 2**32)")
    g.add_argument("--context", default=None,
                   help="text prepended to every prompt, e.g. a short few-shot prefix "
                        "(helps small models such as smollm2-135m) (default: none)")


def _add_attr_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("attribution")
    g.add_argument("--method", type=_csv, default=["ig"],
                   help=f"comma-separated: {_method_list()}")
    g.add_argument("--n-steps", type=int, default=20, help="integration steps (>= 2)")
    g.add_argument("--sig-mode", default="mean", choices=["mean", "per_token"],
                   help="SIG baseline: mean of the per-token maps, or each token's map")
    g.add_argument("--target", default="first", choices=["first", "all"],
                   help="attribute the answer's first token, or the teacher-forced "
                        "probability of the whole answer")
    g.add_argument("--threshold", type=float, default=0.2,
                   help="knowledge neurons: attribution > threshold * max (relative), "
                        "> threshold (absolute, >= 0) or the top K neurons (topk)")
    g.add_argument("--selection", default="relative", choices=["relative", "absolute", "topk"],
                   help="how --threshold selects knowledge neurons")
    g.add_argument("--batch-size", type=int, default=None,
                   help="integration points per forward pass (default: sized to --memory-gb)")
    g.add_argument("--memory-gb", type=float, default=2.0,
                   help="memory budget of one forward pass, in GB (> 0)")


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
                   help="GPUs per Ray worker (fractions share a GPU; > 0 loads on cuda) "
                        "(default: 0, CPU workers)")
    g.add_argument("--threads-per-worker", type=int, default=None,
                   help="torch threads (and CPUs reserved) per Ray worker (default: a local "
                        "instance's cores split among the workers, else 1)")


def _executor(args) -> Any:
    from .pipeline.distributed import make_executor

    return make_executor(args.executor, address=args.ray_address, workers=args.workers,
                         gpus_per_worker=args.gpus_per_worker,
                         threads_per_worker=args.threads_per_worker)


def _add_run_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (default: the run's)")
    g.add_argument("--model", default=None, help="model of the run (default: from config.yaml)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: the run's)")
    g.add_argument("--dtype", default=None, choices=DTYPES, help="(default: the run's)")
    p.add_argument("--allow-partial", action="store_true",
                   help="use the finished units of an unfinished run (default: refuse)")


def _add_parser(sub: Any, name: str, help: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter)


def _localize_parser(sub: Any) -> argparse.ArgumentParser:
    p = _add_parser(sub, "localize", "localize knowledge neurons of one query or a dataset")
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
    p = _add_parser(sub, "consistency", "CS1/CS2, K_I/K_II, Welch t-test: Table 1 + Figure 3")
    p.add_argument("--run", type=Path, required=True, help="run directory made by localize")
    p.add_argument("--population", default="known", choices=["known", "all"],
                   help="facts known (top-1 on >= 1 query) or all facts")
    p.add_argument("--static-threshold", type=float, default=0.1,
                   help="K_I if CS2 > threshold (Table 1)")
    p.add_argument("--allow-partial", action="store_true",
                   help="use the finished units of an unfinished localization (default: refuse)")
    p.add_argument("--localize", action="store_true",
                   help="first localize what is missing, with the dataset/model/attribution "
                        "options below (same as `knowloc localize`)")
    _add_model_args(p)
    _add_data_args(p)
    _add_attr_args(p)
    _add_executor_args(p)
    p.add_argument("--overwrite", action="store_true",
                   help="with --localize: reuse --run even if made with another configuration")
    return p


def _reproduce_parser(sub: Any) -> argparse.ArgumentParser:
    p = _add_parser(sub, "reproduce", "run every experiment end to end and write report.html")
    _add_model_args(p)
    _add_executor_args(p)
    p.add_argument("--preset", default="quick", help="quick, standard or paper")
    p.add_argument("--dataset", default=None,
                   help="override the preset's dataset (standard/paper need pararel:<dir>) "
                        "(default: the preset's)")
    p.add_argument("--relations", type=_csv, default=None,
                   help="comma-separated relation ids (default: the preset's)")
    p.add_argument("--known-per-relation", type=int, default=None,
                   help="known facts per relation (default: the preset's; quick: 2)")
    p.add_argument("--max-queries-per-fact", type=int, default=None,
                   help="neighbor queries per fact (default: the preset's; quick: 4)")
    p.add_argument("--method", type=_csv, default=None,
                   help=f"comma-separated: {_method_list()} (default: the preset's; all)")
    p.add_argument("--n-steps", type=int, default=None,
                   help="integration steps (default: the preset's; 20)")
    p.add_argument("--population", default=None, choices=["known", "all"],
                   help="facts analysed (default: the preset's; known)")
    p.add_argument("--seed", type=int, default=0, help="draws of facts and unrelated queries")
    p.add_argument("--ppl-text", type=Path, default=None,
                   help="text file for ΔPPL of the modification stage (e.g. WikiText-2's "
                        "wiki.test.raw) (default: knowloc's small built-in English corpus)")
    p.add_argument("--no-modify", action="store_true",
                   help="skip knowledge modification (Tables 2, 3) and query-KN mapping "
                        "(Figure 4)")
    p.add_argument("--no-attention", action="store_true",
                   help="skip the attention experiments (Figures 1, 5, 6, 7, 10)")
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--overwrite", action="store_true",
                   help="reuse --out even if it was made with another configuration")
    return p


def _modify_parser(sub: Any) -> argparse.ArgumentParser:
    p = _add_parser(sub, "modify", "erase/update the knowledge neurons of a run's facts: "
                                   "Rel/Gen/Loc/ΔPPL, Table 2")
    p.add_argument("--run", type=Path, required=True,
                   help="run directory with consistency results")
    p.add_argument("--op", type=_csv, default=["erase", "update"],
                   help="erase, update or both, comma-separated")
    p.add_argument("--set", dest="edit_set", type=_csv, default=["local", "global"],
                   help="local (N_i), global (N_g), cas (Consistency-Aware set, Table 3), "
                        "comma-separated")
    p.add_argument("--ppl-text", type=Path, default=None,
                   help="text file for ΔPPL, one entry per line (e.g. WikiText-2's "
                        "wiki.test.raw) (default: knowloc's small built-in English corpus)")
    p.add_argument("--method", type=_csv, default=None,
                   help="localization methods to edit (default: every method of the run)")
    p.add_argument("--split-threshold", default="0.1",
                   help="K_I if CS2 > T; a number or 'otsu'")
    p.add_argument("--n-locality", type=int, default=20,
                   help="unrelated facts (other relations) per edit for Loc")
    p.add_argument("--gen-on", default="known", choices=["known", "all"],
                   help="neighbor queries for Gen: those the unedited model answers correctly "
                        "or all")
    p.add_argument("--ppl-entries", type=int, default=5, help="entries per edit")
    p.add_argument("--ppl-pool", type=int, default=25,
                   help="entries drawn once (seeded) from the text; each edit draws its "
                        "entries from them, so unedited PPLs are reused")
    p.add_argument("--ppl-max-tokens", type=int, default=128, help="tokens kept of each entry")
    p.add_argument("--update-sign", default="none", choices=["none", "activation"],
                   help="none: the paper's v - 2E(o) + 2E(o'); activation: multiply the change "
                        "by the sign of the neuron's activation (gated MLPs read value vectors "
                        "with negative activations too)")
    p.add_argument("--seed", type=int, default=0, help="draws of texts and unrelated facts")
    _add_run_model_args(p)
    _add_executor_args(p)
    return p


def _intervene_parser(sub: Any) -> argparse.ArgumentParser:
    p = _add_parser(sub, "intervene", "suppress/enhance KN activations of Self and neighbor "
                                      "sets: ΔProb, Figure 4")
    p.add_argument("--run", type=Path, required=True,
                   help="run directory with consistency results")
    p.add_argument("--method", type=_csv, default=None,
                   help="methods whose KNs are used (default: every method of the run)")
    p.add_argument("--split-threshold", default="0.1",
                   help="K_I if CS2 > T; a number or 'otsu'")
    p.add_argument("--enhance", type=float, default=2.0, help="enhancement factor")
    p.add_argument("--all-queries", action="store_true",
                   help="also queries the model does not answer correctly (default: known only)")
    _add_run_model_args(p)
    _add_executor_args(p)
    return p


def _attention_parser(sub: Any) -> argparse.ArgumentParser:
    p = _add_parser(sub, "attention", "predominance, knowledge synapses × 0 / × 2: "
                                      "Figures 5, 6 (and heatmaps, Figures 1, 7, 10)")
    p.add_argument("--run", type=Path, required=True,
                   help="run directory with consistency results")
    p.add_argument("--method", type=_csv, default=None,
                   help="methods whose KNs (ΔValue) and K_I/K_II split are used "
                        "(default: every method of the run)")
    p.add_argument("--split-threshold", default="0.1",
                   help="K_I if CS2 > T; a number or 'otsu'")
    p.add_argument("--alpha", type=float, default=0.3,
                   help="synapse threshold τ = alpha × mean column mass")
    p.add_argument("--enhance", type=float, default=2.0, help="enhancement factor")
    p.add_argument("--all-queries", action="store_true",
                   help="Figure 6 over all queries (default: those the model answers correctly)")
    p.add_argument("--no-heatmaps", action="store_true",
                   help="skip the heatmaps of a K_I and a K_II fact")
    p.add_argument("--seed", type=int, default=0, help="draw of the unrelated queries")
    _add_run_model_args(p)
    _add_executor_args(p)
    return p


def _heatmap_parser(sub: Any) -> argparse.ArgumentParser:
    p = _add_parser(sub, "heatmap", "layer × neuron activation heatmaps of prompts, as is "
                                    "and with their knowledge synapses × 0 / × 2 "
                                    "(Figures 1, 7, 10)")
    _add_model_args(p)
    p.add_argument("--prompt", action="append", required=True,
                   help="cloze prompt; repeat for neighbor queries")
    p.add_argument("--answer", action="append", required=True,
                   help="gold answer: one for all prompts or one per --prompt")
    p.add_argument("--method", default="ig",
                   help=f"method localizing the KNs to circle ({_method_list()}) or none")
    p.add_argument("--n-steps", type=int, default=20, help="integration steps (>= 2)")
    p.add_argument("--threshold", type=float, default=0.2,
                   help="knowledge neurons: attribution > threshold × max")
    p.add_argument("--neurons", type=int, default=64,
                   help="neuron columns drawn: the KNs' indices, then the largest |activation|")
    p.add_argument("--alpha", type=float, default=0.3,
                   help="synapse threshold τ = alpha × mean column mass")
    p.add_argument("--out", type=Path, default=Path("heatmap"), help="output directory")
    return p


def _query_parser(sub: Any) -> argparse.ArgumentParser:
    p = _add_parser(sub, "query", "run SQL (DuckDB) over a run's tables (read only)")
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("sql", help="one SQL statement; every table of the run is a view")
    return p


def _models_parser(sub: Any) -> argparse.ArgumentParser:
    return _add_parser(sub, "models", "list the embedded models and supported architectures")


PARSERS = (_localize_parser, _consistency_parser, _reproduce_parser, _modify_parser,
           _intervene_parser, _attention_parser, _heatmap_parser, _query_parser, _models_parser)


def _add_common_args(p: argparse.ArgumentParser, *, top: bool = False) -> None:
    """-v/-q, accepted before and after the subcommand (a subcommand's value wins only when
    given there)."""
    default: Any = 0 if top else argparse.SUPPRESS
    p.add_argument("-v", "--verbose", action="count", default=default,
                   help="more log lines on stderr: -v info, -vv debug (default: warnings only)")
    p.add_argument("-q", "--quiet", action="store_true",
                   default=False if top else argparse.SUPPRESS,
                   help="no progress bars; one summary line per stage")


def _build_parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    from .store import knowloc_version

    parser = argparse.ArgumentParser(
        prog="knowloc",
        description="Find where a language model keeps a fact, test whether that place is "
                    "fixed, and edit it (Chen et al., ICLR 2025).",
    )
    v = knowloc_version()
    parser.add_argument("--version", action="version",
                        version=f"knowloc {v['version']}"
                                + (f" ({v['commit']})" if v["commit"] else ""))
    _add_common_args(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True)
    subparsers = {}
    for build in PARSERS:
        p = build(sub)
        _add_common_args(p)
        subparsers[p.prog.split()[-1]] = p
    return parser, subparsers


def build_parser() -> argparse.ArgumentParser:
    return _build_parsers()[0]


def _setup_logging(verbose: int) -> list[logging.Handler]:
    """One stderr handler on the root logger, library warnings routed through logging
    (``logging.captureWarnings``); returns the handlers added, removed again by ``main``."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.setLevel(level)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(min(level, root.level) if root.level else level)
    logging.captureWarnings(True)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception as exc:  # noqa: BLE001 - quieting transformers is best effort
        log.debug("could not quiet transformers logging: %s", exc)
    return [handler]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


#: Integer options and their smallest value (seeds: numpy takes 0 <= seed < 2**32).
_AT_LEAST = {"seed": 0, "batch_size": 1, "top": 0, "facts_per_relation": 1,
             "max_queries_per_fact": 1, "known_per_relation": 1, "neurons": 1}
#: Options given as comma-separated lists, which must name at least one value.
_LISTS = ("method", "relations", "op", "edit_set")


def _flag(dest: str) -> str:
    return "--set" if dest == "edit_set" else "--" + dest.replace("_", "-")


def _check_options(args: argparse.Namespace) -> None:
    """Checks of single options, run before anything is read or loaded: integers in range,
    every float finite (``nan``/``inf`` are accepted by ``float()``), lists not empty."""
    for dest, value in vars(args).items():
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{_flag(dest)} must be a finite number (got {value})")
        if dest in _AT_LEAST and isinstance(value, int) and value < _AT_LEAST[dest]:
            raise ConfigError(f"{_flag(dest)} must be >= {_AT_LEAST[dest]} (got {value})")
        if dest in _LISTS and isinstance(value, list) and not value:
            raise ConfigError(f"{_flag(dest)} is empty; give at least one value")
    split = getattr(args, "split_threshold", None)
    if isinstance(split, str) and split != "otsu":
        try:
            number = float(split)
        except ValueError:
            raise ConfigError(f"--split-threshold must be a number or 'otsu' (got {split!r})") \
                from None
        if not math.isfinite(number):
            raise ConfigError(f"--split-threshold must be a finite number (got {split})")
    if getattr(args, "seed", None) is not None and args.seed >= 2**32:
        raise ConfigError(f"--seed must be < 2**32 (got {args.seed})")
    if getattr(args, "memory_gb", None) is not None and args.memory_gb <= 0:
        raise ConfigError(f"--memory-gb must be > 0 (got {args.memory_gb})")
    if getattr(args, "model", None):
        _check_model_name(args.model)


def _check_model_name(name: str) -> None:
    """A model that names a local path must be a directory (otherwise Hugging Face reports it
    as a malformed repo id). Hub ids look like ``name`` or ``org/name``."""
    from .embedded import EMBEDDED

    if name in EMBEDDED:
        return
    path = Path(name).expanduser()
    hub_like = re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name) is not None
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--model {name}: not a directory (a model directory holds "
                          "config.json and the weights)")
    if not path.exists() and not hub_like:
        raise ConfigError(f"--model {name}: no such directory, and not an embedded model "
                          f"({', '.join(EMBEDDED)}) or a Hugging Face id")


def _check_writable(out: Path) -> None:
    """Fail before the model loads when ``out`` cannot be created or written: probe the
    directory, or its nearest existing parent, with a temporary file."""
    import tempfile

    out = out.expanduser().absolute()
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"cannot create {out}: {probe} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot write {out}: {probe} is not writable "
                          f"({exc.strerror or exc})") from None


def _load(args) -> Any:
    from . import models

    t = time.time()
    half = args.dtype == "float16"
    model = models.load_model(args.model, device=args.device, dtype=args.dtype, check=not half)
    if half:
        import torch

        probs = model.next_token_probs(["The capital of France is"])
        if not bool(torch.isfinite(probs).all()):
            raise ConfigError(f"{args.model} does not run in float16: its activations exceed "
                              "float16's range (65504) and become inf/nan; use --dtype "
                              "bfloat16 (float32's range) or float32")
        model.self_check()
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
    if args.selection == "absolute" and value < 0:
        raise ConfigError(f"--selection absolute needs --threshold >= 0 (got {value}); a "
                          "negative threshold selects neurons that push against the answer")
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
    _check_writable(args.out)
    return _localize_dataset(args, selection)


def _localize_one(args, selection) -> int:
    from .attribution import Attribution, attribute
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
        assert isinstance(attr, Attribution)  # one query in, one Attribution out
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
    store.write_env(environment_info({"command": "localize", "argv": args.argv}))
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
    from .models import answer_scores
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
    _check_writable(args.out)
    model = _load(args)
    neurons, labels = [], []
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        target = model.target_ids(prompt, answer)  # the attribution's default target
        p = float(answer_scores(model, [model.encode_prompt(prompt)], [target]).prob[0])
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
    _check_writable(args.out)
    reproduce(args.out, model=args.model, preset=preset, device=args.device,
              dtype=args.dtype, seed=args.seed, overwrite=args.overwrite,
              progress=not args.quiet, ppl_text=args.ppl_text, executor=_executor(args),
              argv=args.argv)
    return 0


def cmd_query(args) -> int:
    import duckdb
    import pandas as pd

    from .store import RunStore

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


def _one_line(exc: BaseException) -> str:
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


#: OS errors a user's environment causes (permissions, read-only or full disks).
_ENV_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # the command line as a user reruns it (recorded in env.json, quoted in 'finish it with')
    args.argv = ["knowloc", *(sys.argv[1:] if argv is None else argv)]
    handlers = _setup_logging(args.verbose)
    try:
        _check_options(args)
        return COMMANDS[args.command](args)
    except KnowlocError as exc:
        print(f"knowloc: error: {_one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        if exc.errno not in _ENV_ERRNOS:
            raise
        print(f"knowloc: error: {exc.strerror}: {exc.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("knowloc: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        logging.captureWarnings(False)
        for handler in handlers:
            logging.getLogger().removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
