"""The argument parsers of ``knowloc``: one builder per subcommand, option groups shared
between them, and every option's default in its help."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


DTYPES = ("float32", "bfloat16", "float16")
#: knowloc.attribution.quadrature.RULES (not imported: the parsers load no torch)
RULES = ("riemann_right", "trapezoid", "gausslegendre")
RULE_HELP = ("integration rule over the --n-steps points: riemann_right (the paper's, "
             "alpha_k = k/m), trapezoid or gausslegendre (fewer points for the same accuracy, "
             "see benchmarks/quadrature.py)")


def csv_list(value: str) -> list[str]:
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
    g.add_argument("--relations", type=csv_list, default=None,
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
    g.add_argument("--method", type=csv_list, default=["ig"],
                   help=f"comma-separated: {method_list()}")
    g.add_argument("--n-steps", type=int, default=20, help="integration steps (>= 2)")
    g.add_argument("--rule", default="riemann_right", choices=RULES, help=RULE_HELP)
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
    g.add_argument("--keep-maps", action="store_true",
                   help="keep each query's full attribution map in the run (table maps), so "
                        "another --selection/--threshold is read off them without recomputing "
                        "(default: off, the top 200 scores per query)")


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


def _add_run_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (default: the run's)")
    g.add_argument("--model", default=None, help="model of the run (default: from config.yaml)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: the run's)")
    g.add_argument("--dtype", default=None, choices=DTYPES, help="(default: the run's)")
    p.add_argument("--allow-partial", action="store_true",
                   help="use the finished units of an unfinished run (default: refuse)")


def _add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None,
                   help="a run's config.yaml (or a file in its schema): its values become the "
                        "defaults; options given on the command line override them "
                        "(default: none)")


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
    p.add_argument("--json", action="store_true",
                   help="with --prompt: print one JSON object (prompt, answer, target tokens, P, "
                        "known, predicted, method, n_steps, neurons) and nothing else on stdout")
    p.add_argument("--out", type=Path,
                   help="run directory (dataset mode); with --prompt: a directory for the "
                        "attribution map(s), the knowledge neurons (CSV) and summary.json")
    p.add_argument("--overwrite", action="store_true",
                   help="reuse --out even if it was made with another configuration")
    _add_config_arg(p)
    return p


def _add_boot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-boot", type=int, default=1000,
                   help="resamples of the bootstrap over facts behind every interval "
                        "(Tables 1-3, Figures 4 and 6)")
    p.add_argument("--boot-seed", type=int, default=0, help="seed of that bootstrap")


def _consistency_parser(sub: Any) -> argparse.ArgumentParser:
    p = _add_parser(sub, "consistency", "CS1/CS2, K_I/K_II, Welch t-test: Table 1 + Figure 3")
    p.add_argument("--run", type=Path, required=True, help="run directory made by localize")
    p.add_argument("--population", default="known", choices=["known", "all"],
                   help="facts known (top-1 on >= 1 query) or all facts")
    p.add_argument("--static-threshold", type=float, default=0.1,
                   help="K_I if CS2 > threshold (Table 1)")
    _add_boot_args(p)
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
    p.add_argument("--relations", type=csv_list, default=None,
                   help="comma-separated relation ids (default: the preset's)")
    p.add_argument("--known-per-relation", type=int, default=None,
                   help="known facts per relation (default: the preset's; quick: 2)")
    p.add_argument("--max-queries-per-fact", type=int, default=None,
                   help="neighbor queries per fact (default: the preset's; quick: 4)")
    p.add_argument("--method", type=csv_list, default=None,
                   help=f"comma-separated: {method_list()} (default: the preset's; all)")
    p.add_argument("--n-steps", type=int, default=None,
                   help="integration steps (default: the preset's; 20)")
    p.add_argument("--rule", default=None, choices=RULES,
                   help=RULE_HELP + " (default: the preset's; riemann_right)")
    p.add_argument("--target", default=None, choices=["first", "all"],
                   help="attribute the answer's first token, or the teacher-forced probability "
                        "of the whole answer (default: the preset's, first)")
    p.add_argument("--population", default=None, choices=["known", "all"],
                   help="facts analysed (default: the preset's; known)")
    p.add_argument("--seed", type=int, default=0, help="draws of facts and unrelated queries")
    _add_boot_args(p)
    p.add_argument("--ppl-text", type=Path, default=None,
                   help="text file for ΔPPL of the modification stage (e.g. WikiText-2's "
                        "wiki.test.raw) (default: knowloc's small built-in English corpus)")
    p.add_argument("--no-modify", action="store_true",
                   help="skip knowledge modification (Tables 2, 3) and query-KN mapping "
                        "(Figure 4)")
    p.add_argument("--no-attention", action="store_true",
                   help="skip the attention experiments (Figures 1, 5, 6, 7, 10)")
    p.add_argument("--keep-maps", action="store_true",
                   help="keep each query's full attribution map in the run (table maps) "
                        "(default: off, the top 200 scores per query)")
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--overwrite", action="store_true",
                   help="reuse --out even if it was made with another configuration")
    _add_config_arg(p)
    p.set_defaults(preset_fields={})  # the preset's values a --config file sets, no option has
    return p


def _modify_parser(sub: Any) -> argparse.ArgumentParser:
    p = _add_parser(sub, "modify", "erase/update the knowledge neurons of a run's facts: "
                                   "Rel/Gen/Loc/ΔPPL, Table 2")
    p.add_argument("--run", type=Path, required=True,
                   help="run directory with consistency results")
    p.add_argument("--op", type=csv_list, default=["erase", "update"],
                   help="erase, update or both, comma-separated")
    p.add_argument("--set", dest="edit_set", type=csv_list, default=["local", "global"],
                   help="local (N_i), global (N_g), cas (Consistency-Aware set, Table 3), "
                        "comma-separated")
    p.add_argument("--ppl-text", type=Path, default=None,
                   help="text file for ΔPPL, one entry per line (e.g. WikiText-2's "
                        "wiki.test.raw) (default: knowloc's small built-in English corpus)")
    p.add_argument("--method", type=csv_list, default=None,
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
    _add_config_arg(p)
    return p


def _intervene_parser(sub: Any) -> argparse.ArgumentParser:
    p = _add_parser(sub, "intervene", "suppress/enhance KN activations of Self and neighbor "
                                      "sets: ΔProb, Figure 4")
    p.add_argument("--run", type=Path, required=True,
                   help="run directory with consistency results")
    p.add_argument("--method", type=csv_list, default=None,
                   help="methods whose KNs are used (default: every method of the run)")
    p.add_argument("--split-threshold", default="0.1",
                   help="K_I if CS2 > T; a number or 'otsu'")
    p.add_argument("--enhance", type=float, default=2.0, help="enhancement factor")
    p.add_argument("--all-queries", action="store_true",
                   help="also queries the model does not answer correctly (default: known only)")
    _add_run_model_args(p)
    _add_executor_args(p)
    _add_config_arg(p)
    return p


def _attention_parser(sub: Any) -> argparse.ArgumentParser:
    p = _add_parser(sub, "attention", "predominance, knowledge synapses × 0 / × 2: "
                                      "Figures 5, 6 (and heatmaps, Figures 1, 7, 10)")
    p.add_argument("--run", type=Path, required=True,
                   help="run directory with consistency results")
    p.add_argument("--method", type=csv_list, default=None,
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
    _add_config_arg(p)
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
                   help=f"method localizing the KNs to circle ({method_list()}) or none")
    p.add_argument("--n-steps", type=int, default=20, help="integration steps (>= 2)")
    p.add_argument("--target", default="first", choices=["first", "all"],
                   help="attribute (and print P of) the answer's first token, or the "
                        "teacher-forced probability of the whole answer")
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


def _report_parser(sub: Any) -> argparse.ArgumentParser:
    p = _add_parser(sub, "report", "render report.html from a run directory alone, for the "
                                   "stages it holds (no model is loaded)")
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("--out", type=Path, default=None,
                   help="the HTML file to write (default: RUN/report.html)")
    return p


def _status_parser(sub: Any) -> argparse.ArgumentParser:
    p = _add_parser(sub, "status", "what a run holds and how far it is: stages, units done / "
                                   "planned, the process computing in it, the log (read only)")
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--log-lines", type=int, default=10,
                   help="how many of knowloc.log's last lines to show")
    return p


def _models_parser(sub: Any) -> argparse.ArgumentParser:
    return _add_parser(sub, "models", "list the embedded models and supported architectures")


def float_list(value: str) -> list[float]:
    """Comma-separated numbers (``0.05,0.1``)."""
    try:
        return [float(v) for v in csv_list(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {value!r}") \
            from None


def int_list(value: str) -> list[int]:
    """Comma-separated integers (``64,128``)."""
    try:
        return [int(v) for v in csv_list(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {value!r}") \
            from None


def _sensitivity_parser(sub: Any) -> argparse.ArgumentParser:
    p = _add_parser(sub, "sensitivity", "Table 1 against the neuron threshold (from kept maps) "
                                        "and the K_I/K_II split threshold: sensitivity.csv "
                                        "and a figure (no model is loaded)")
    p.add_argument("run", type=Path, help="run directory with consistency results")
    p.add_argument("--axis", default="auto", choices=["auto", "both", "neuron", "split"],
                   help="neuron: the relative neuron threshold (needs a run localized with "
                        "--keep-maps); split: the split threshold; both; auto: both when the "
                        "run kept its maps, else split")
    p.add_argument("--neuron-thresholds", type=float_list,
                   default=[k / 20 for k in range(1, 11)],
                   help="relative neuron thresholds, comma-separated")
    p.add_argument("--split-thresholds", type=float_list,
                   default=[k / 20 for k in range(1, 11)],
                   help="static split thresholds, comma-separated")
    p.add_argument("--otsu-bins", type=int_list, default=[64, 128, 256],
                   help="histogram bins of Otsu's threshold, comma-separated")
    p.add_argument("--out", type=Path, default=None,
                   help="directory for sensitivity.csv and figures/sensitivity.png "
                        "(default: the run directory)")
    return p


def _compare_parser(sub: Any) -> argparse.ArgumentParser:
    p = _add_parser(sub, "compare", "Table 1 of several runs side by side, one block per "
                                    "model: compare.md, compare.csv, compare.png (no model "
                                    "is loaded)")
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN",
                   help="run directories with consistency results")
    p.add_argument("--out", type=Path, default=Path("compare"), help="output directory")
    p.add_argument("--paper", action="store_true",
                   help="put the paper's Table 1 (GPT-2, LLaMA2-7b, LLaMA3-8b) first")
    return p


PARSERS = (_localize_parser, _consistency_parser, _reproduce_parser, _modify_parser,
           _intervene_parser, _attention_parser, _heatmap_parser, _query_parser, _report_parser,
           _status_parser, _models_parser, _sensitivity_parser, _compare_parser)


def _add_common_args(p: argparse.ArgumentParser, *, top: bool = False) -> None:
    """-v/-q, accepted before and after the subcommand (a subcommand's value wins only when
    given there)."""
    default: Any = 0 if top else argparse.SUPPRESS
    p.add_argument("-v", "--verbose", action="count", default=default,
                   help="more log lines on stderr: -v info, -vv debug (default: warnings only)")
    p.add_argument("-q", "--quiet", action="store_true",
                   default=False if top else argparse.SUPPRESS,
                   help="no progress bars; one summary line per stage")


def build_parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    from ..store import knowloc_version

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
    return build_parsers()[0]


def method_list() -> str:
    from ..attribution import method_names

    return ", ".join(method_names())
