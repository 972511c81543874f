"""Checks of the options, run before anything is read or loaded."""

from __future__ import annotations

import argparse
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .parsers import method_list

log = logging.getLogger(__name__)


#: Integer options and their smallest value (seeds: numpy takes 0 <= seed < 2**32).
_AT_LEAST = {"seed": 0, "batch_size": 1, "top": 0, "facts_per_relation": 1,
             "max_queries_per_fact": 1, "known_per_relation": 1, "neurons": 1}


#: Options given as comma-separated lists, which must name at least one value.
_LISTS = ("method", "relations", "op", "edit_set")


def _flag(dest: str) -> str:
    return "--set" if dest == "edit_set" else "--" + dest.replace("_", "-")


def check_options(args: argparse.Namespace) -> None:
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
    from ..embedded import EMBEDDED

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


def check_writable(out: Path) -> None:
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


def selection_of(args):
    from ..neurons import Selection

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


def check_methods(methods: Sequence[str], **config: Any) -> None:
    """Every name registered now (a method registered after import counts), and its
    attribution config valid."""
    from ..attribution import AttributionConfig, method_names

    for m in methods:
        if m not in method_names():
            raise ConfigError(f"unknown attribution method {m!r}; choose from {method_list()}")
        AttributionConfig(method=m, **config).validate()
