"""Spreads shown beside the means of the report: the note that describes the tables'
intervals (n, and the 95% interval from a bootstrap over facts, :mod:`knowloc.intervals`),
the Student-t interval of a mean drawn as a figure's error bar, and the K_I / K_II kind of a
run's facts for per-item tables."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import numpy as np
import pandas as pd
from scipy import stats

from ..consistency import split_facts
from ..errors import RunError
from ..store import RunStore

log = logging.getLogger(__name__)

#: How the tables' intervals are described wherever they are shown.
SPREAD_NOTE = ("[lo, hi]: 95% interval of the mean, percentile bootstrap over facts (facts "
               "are resampled, with all their queries, because the queries of one fact are "
               "not independent); n: number of items averaged, facts: the facts they belong to")


def ci95(values: Iterable[float]) -> tuple[float, float, int]:
    """(mean, half-width of its 95% t confidence interval, n) of the non-NaN values, each
    value taken as independent (the figures' error bars; the tables' intervals resample
    facts instead).

    The half-width is NaN for fewer than two values, 0 for identical values."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(float(v))], float)
    n = int(x.size)
    if n == 0:
        return float("nan"), float("nan"), 0
    mean = float(x.mean())
    if n < 2:
        return mean, float("nan"), n
    half = float(stats.t.ppf(0.975, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return mean, half, n


def run_kinds(store: RunStore, stage: str) -> pd.DataFrame:
    """``method, fact_id, kind`` of the run's facts, split at the CS2 threshold the stage
    ``stage`` (``modify``, ``intervene``) recorded in ``config.yaml`` (0.1 when it recorded
    none, the stages' default)."""
    try:
        threshold = store.read_config().get(stage, {}).get("split_threshold", 0.1)
    except RunError:
        threshold = 0.1
    scores = store.table("consistency")
    if scores.empty:
        return pd.DataFrame(columns=["method", "fact_id", "kind"])
    return split_facts(scores, threshold)[["method", "fact_id", "kind"]]
