"""Threshold sensitivity of Table 1: how the K_II share, the CS2 gap between K_I and K_II
(with Welch's p) and ∩:II move with the two thresholds behind them (docs/sensitivity.md).

Two axes, per localization method:

* ``neuron``: the relative neuron threshold ``t`` (knowledge neurons: Attr > t · max Attr,
  0.05 to 0.5). Every query's neuron set is read again off its full attribution map, kept
  by ``knowloc localize --keep-maps``, and CS1/CS2 and Table 1 are computed as the
  consistency stage computes them (same population, the run's static split threshold and
  Otsu's). No model is loaded and no forward pass runs. A run without kept maps has no
  curve on this axis.
* ``split``: the K_I/K_II split threshold on the run's stored CS2 values: static thresholds
  (0.05 to 0.5) and Otsu's threshold computed with 64, 128 and 256 histogram bins (256 is
  Table 1's). Any run with consistency results has it.

:func:`sensitivity` computes the long table (:data:`SENSITIVITY_COLUMNS`),
:func:`write_sensitivity` writes ``sensitivity.csv`` and ``figures/sensitivity.png`` (PDF,
SVG) and :func:`sensitivity_section` is the report's "Threshold sensitivity" section.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import consistency as cons
from ..attribution import sort_methods
from ..errors import ConfigError, RunError
from ..intervals import (
    N_BOOT,
    boot_seed,
    bootstrap_ratios,
    fact_sums,
    percentile_interval,
    wilson,
)
from ..neurons import Selection, select
from ..pipeline.consistency import consistency_result
from ..pipeline.run import MAPS
from ..store import RunStore
from .spec import RunSpec, read_spec

log = logging.getLogger(__name__)

__all__ = ["AXES", "NEURON_THRESHOLDS", "OTSU_BINS", "SENSITIVITY_COLUMNS", "SPLIT_THRESHOLDS",
           "Sensitivity", "consistency_config", "has_maps", "sensitivity"]

#: Relative neuron thresholds of the ``neuron`` axis: 0.05, 0.10, ..., 0.50 (each the
#: double nearest its decimal, as ``--threshold 0.3`` reads it).
NEURON_THRESHOLDS: tuple[float, ...] = tuple(k / 20 for k in range(1, 11))
#: Static split thresholds of the ``split`` axis: 0.05, 0.10, ..., 0.50.
SPLIT_THRESHOLDS: tuple[float, ...] = tuple(k / 20 for k in range(1, 11))
#: Histogram bins of Otsu's threshold on the ``split`` axis (256 is Table 1's).
OTSU_BINS: tuple[int, ...] = (64, 128, 256)
#: The two axes, in the order the table lists them.
AXES: tuple[str, ...] = ("neuron", "split")
#: Otsu's bins in Table 1 (:func:`knowloc.consistency.otsu_threshold`'s default).
TABLE1_BINS = 256

#: Columns of :attr:`Sensitivity.table` (interval columns ``*_lo``/``*_hi`` follow their
#: value when Table 1 carries intervals).
SENSITIVITY_COLUMNS: list[str] = [
    "method",            # localization method
    "axis",              # "neuron" or "split"
    "threshold",         # the value on the axis: neuron threshold, or split threshold used
    "split",             # "static" or "otsu"
    "bins",              # Otsu's histogram bins (NaN for a static split)
    "neuron_threshold",  # relative neuron threshold of the sets (the run's on axis split)
    "split_threshold",   # the split threshold used for this method
    "n_facts",           # non-skipped facts of the method
    "n_II",              # facts in K_II
    "k2_share",          # R: II, share of the facts in K_II
    "s_I",               # S: I, mean CS2 of K_I
    "s_II",              # S: II, mean CS2 of K_II
    "cs2_gap",           # S: I - S: II (with its interval, cs2_gap_lo/_hi)
    "welch_t",           # Welch's t between the CS2 of K_I and of K_II
    "welch_p",           # its two-sided p
    "cap_II",            # ∩: II, share of the facts every method puts in K_II
]

#: Table 1 columns -> sensitivity columns (their ``_lo``/``_hi`` follow the same rename).
_RENAME = {"n_facts": "n_facts", "R_II": "k2_share", "S_I": "s_I", "S_II": "s_II",
           "t": "welch_t", "p": "welch_p", "cap_II": "cap_II"}


@dataclass
class Sensitivity:
    """The threshold sensitivity of one run.

    Attributes:
        table: the long table, columns :data:`SENSITIVITY_COLUMNS` (and interval columns
            when Table 1 has them), axis ``neuron`` first, then ``split``; within an axis
            by split kind, threshold and method.
        run: the run directory.
        axes: the axes computed.
        note: why the ``neuron`` axis is missing (None when it was computed).
        seconds: wall-clock seconds of the computation.
        n_maps: attribution maps read (``neuron`` axis).
    """

    table: pd.DataFrame
    run: Path
    axes: tuple[str, ...]
    note: str | None = None
    seconds: float = 0.0
    n_maps: int = 0
    files: dict[str, Path] = field(default_factory=dict)


# ------------------------------------------------------------------ checks
def _grid(values: Sequence[float], what: str) -> tuple[float, ...]:
    out = tuple(float(v) for v in values)
    if not out:
        raise ConfigError(f"{what}: give at least one threshold")
    bad = [v for v in out if not (math.isfinite(v) and 0 <= v <= 1)]
    if bad:
        raise ConfigError(f"{what} must lie in [0, 1] (got {bad[0]})")
    return tuple(dict.fromkeys(out))


def _bins(values: Sequence[int]) -> tuple[int, ...]:
    out = tuple(values)
    bad = [b for b in out if isinstance(b, bool) or int(b) != b or b < 2]
    if bad:
        raise ConfigError(f"Otsu's bins must be integers >= 2 (got {bad[0]})")
    return tuple(dict.fromkeys(int(b) for b in out))


def _consistency_scores(store: RunStore) -> pd.DataFrame:
    scores = store.table("consistency")
    if scores.empty:
        raise RunError(f"run {store.root} has no consistency results; run "
                       f"`knowloc consistency --run {store.root}` first")
    return scores


def has_maps(run: str | Path | RunStore) -> bool:
    """Whether the run kept attribution maps (``knowloc localize --keep-maps``)."""
    store = run if isinstance(run, RunStore) else RunStore(run, create=False)
    return any(p.suffix == ".parquet" for p in store.current_files(MAPS).values())


# ------------------------------------------------------------------ rows
@dataclass(frozen=True)
class _Boot:
    """The bootstrap of the intervals: resamples and the run's seed."""

    n_boot: int = N_BOOT
    seed: int = 0


def _gap_interval(scores: pd.DataFrame, method: str, threshold: float, boot: _Boot,
                  identity: tuple[Any, ...]) -> tuple[float, float]:
    """The 95% interval of ``S: I − S: II`` of one method split at ``threshold``: a
    bootstrap over the method's facts (the split taken as given, as Table 1's intervals),
    both means recomputed on each resample (:func:`knowloc.intervals.bootstrap_ratios`).
    NaN when a group has fewer than 2 facts."""
    if not math.isfinite(threshold):
        return math.nan, math.nan
    kept = scores[(scores["method"].astype(str) == method) & scores["skipped"].isna()
                  & scores["cs2"].notna()]
    cs2 = kept["cs2"].to_numpy(dtype=float)
    upper = cs2 > threshold
    if upper.sum() < 2 or (~upper).sum() < 2:
        return math.nan, math.nan
    grouped = fact_sums(np.column_stack([np.where(upper, cs2, np.nan),
                                         np.where(upper, np.nan, cs2)]),
                        kept["fact_id"].astype(str).to_numpy())
    samples = bootstrap_ratios(grouped, n_boot=boot.n_boot,
                               seed=boot_seed(boot.seed, "sensitivity", *identity, method,
                                              "cs2_gap"))
    lo, hi = percentile_interval((samples[:, 0] - samples[:, 1])[:, None])
    return float(lo[0]), float(hi[0])


def _rows(t1: pd.DataFrame, scores: pd.DataFrame, boot: _Boot, *, axis: str,
          threshold: float | None, split: str, bins: float,
          neuron_threshold: float) -> pd.DataFrame:
    """Table 1 rows (one threshold type) as sensitivity rows, the CS2 gap with its interval
    from ``scores``; ``threshold`` None: each row's split threshold."""
    used = t1["threshold"].astype(float).to_numpy()
    n = len(t1)
    cols: dict[str, Any] = {
        "method": t1["method"].astype(str).to_numpy(), "axis": [axis] * n,
        "threshold": used if threshold is None else np.full(n, float(threshold)),
        "split": [split] * n, "bins": np.full(n, float(bins)),
        "neuron_threshold": np.full(n, float(neuron_threshold)), "split_threshold": used}
    for src, dst in _RENAME.items():
        cols[dst] = t1[src].to_numpy()
        for end in ("_lo", "_hi"):
            if f"{src}{end}" in t1.columns:
                cols[f"{dst}{end}"] = t1[f"{src}{end}"].to_numpy()
    cols["n_II"] = (t1["n_II"].to_numpy() if "n_II" in t1.columns else
                    np.rint(t1["R_II"].fillna(0).to_numpy(dtype=float)
                            * t1["n_facts"].to_numpy()))
    cols["cs2_gap"] = t1["S_I"].to_numpy(dtype=float) - t1["S_II"].to_numpy(dtype=float)
    gaps = [_gap_interval(scores, m, thr, boot, (axis, split, bins, threshold))
            for m, thr in zip(cols["method"], used)]
    cols["cs2_gap_lo"] = np.array([g[0] for g in gaps], dtype=float)
    cols["cs2_gap_hi"] = np.array([g[1] for g in gaps], dtype=float)
    return pd.DataFrame(cols)


def _table1_rows(t1: pd.DataFrame, scores: pd.DataFrame, boot: _Boot,
                 neuron_threshold: float) -> list[pd.DataFrame]:
    """The St and Ot rows of the Table 1 of neuron threshold ``neuron_threshold`` as rows of
    the ``neuron`` axis."""
    out = []
    for label, split, bins in (("St", "static", math.nan), ("Ot", "otsu", float(TABLE1_BINS))):
        rows = t1[t1["T"] == label].reset_index(drop=True)
        if len(rows):
            out.append(_rows(rows, scores, boot, axis="neuron", threshold=neuron_threshold,
                             split=split, bins=bins, neuron_threshold=neuron_threshold))
    return out


def _otsu_rows(scores: pd.DataFrame, bins: int, boot: _Boot,
               neuron_threshold: float) -> pd.DataFrame:
    """Table 1 rows of Otsu's split with ``bins`` histogram bins, computed per method (as
    Table 1's ``Ot`` rows are with 256 bins), ∩:II over the methods' splits together."""
    methods = sort_methods(set(scores["method"].astype(str)))
    kept = scores[scores["skipped"].isna() & scores["cs2"].notna()]
    parts, kinds = [], []
    for m in methods:
        sub = scores[scores["method"].astype(str) == m]
        values = kept.loc[kept["method"].astype(str) == m, "cs2"].to_numpy(dtype=float)
        if values.size == 0:
            parts.append(cons.table1(sub, [("Ot", "otsu")], n_boot=boot.n_boot,
                                     seed=boot.seed))
            kinds.append(pd.Series(dtype=object))
            continue
        thr = cons.otsu_threshold(values, nbins=bins)
        parts.append(cons.table1(sub, [("Ot", thr)], n_boot=boot.n_boot, seed=boot.seed))
        split = cons.split_facts(sub, thr)
        kinds.append(pd.Series(split["kind"].to_numpy(), index=split["fact_id"].astype(str)))
    t1 = pd.concat(parts, ignore_index=True)
    cap, n_common, n_cap = _cap_ii(kinds)
    lo, hi = wilson(n_cap, n_common)
    t1["cap_II"], t1["cap_II_lo"], t1["cap_II_hi"] = cap, lo, hi
    return _rows(t1, scores, boot, axis="split", threshold=None, split="otsu",
                 bins=float(bins), neuron_threshold=neuron_threshold)


def _cap_ii(kinds: list[pd.Series]) -> tuple[float, int, int]:
    """∩:II as :func:`knowloc.consistency.table1` computes it: among the facts kept by every
    method, the share that every method puts in K_II; with the number of those facts and
    of those in K_II everywhere."""
    if not kinds:
        return math.nan, 0, 0
    common = set.intersection(*(set(k.index) for k in kinds))
    if not common:
        return math.nan, 0, 0
    ids = sorted(common)
    all_ii = np.ones(len(ids), dtype=bool)
    for k in kinds:
        all_ii &= (k.loc[ids] == "K_II").to_numpy()
    return float(all_ii.sum()) / len(common), len(common), int(all_ii.sum())


def _split_axis(scores: pd.DataFrame, static_grid: Sequence[float], bins: Sequence[int],
                boot: _Boot, neuron_threshold: float) -> list[pd.DataFrame]:
    out = []
    for s in static_grid:
        t1 = cons.table1(scores, [("St", s)], n_boot=boot.n_boot, seed=boot.seed)
        out.append(_rows(t1, scores, boot, axis="split", threshold=s, split="static",
                         bins=math.nan, neuron_threshold=neuron_threshold))
    for b in bins:
        out.append(_otsu_rows(scores, b, boot, neuron_threshold))
    return out


# ------------------------------------------------------------------ neuron axis
@dataclass
class _MapCoverage:
    """The neuron sets read off the kept maps, per threshold, and which queries had none."""

    sets: dict[float, pd.DataFrame]
    n_maps: int
    missing: list[tuple[str, str]]
    mismatched: list[tuple[str, str]]


def _map_rows(store: RunStore) -> Iterator[Any]:
    """Every row of the run's current ``maps`` parts, one part at a time (the scores only,
    not the activations)."""
    columns = ["method", "query_id", "prompt", "answer", "n_steps", "n_layers", "d_mlp",
               "dtype", "scores"]
    for key, path in sorted(store.current_files(MAPS).items()):
        if path.suffix != ".parquet":
            continue
        yield from store.get(MAPS, key, columns=columns).itertuples(index=False)


def _sets_from_maps(store: RunStore, queries: pd.DataFrame, thresholds: Sequence[float],
                    own: Selection | None) -> _MapCoverage:
    """The knowledge neurons of every (method, query) of ``queries`` at each relative
    threshold, read off the run's kept maps with :func:`knowloc.neurons.select` (what
    localization stores). A map serves the queries of its method with its prompt and
    answer; it is used only if it is the one the run's localization read (same number of
    steps, same largest score, and ``own``, the run's selection, gives the stored number of
    neurons)."""
    wanted: dict[tuple[str, str, str], list[Any]] = {}
    for q in queries.itertuples(index=False):
        wanted.setdefault((str(q.method), str(q.prompt), str(q.answer)), []).append(q)
    served: set[tuple[str, str]] = set()
    mismatched: set[tuple[str, str]] = set()
    cols: dict[float, list[tuple[str, str, str, np.ndarray]]] = {t: [] for t in thresholds}
    selections = {t: Selection("relative", t).validate() for t in thresholds}
    n_maps = 0
    for row in _map_rows(store):
        todo = [q for q in wanted.get((str(row.method), str(row.prompt), str(row.answer)), [])
                if (str(q.method), str(q.query_id)) not in served]
        if not todo:
            continue
        scores = np.asarray(row.scores, dtype=np.dtype(str(row.dtype))).reshape(
            int(row.n_layers), int(row.d_mlp))
        n_maps += 1
        top = float(scores.max())
        own_n = len(select(scores, own)) if own is not None else None
        for q in todo:
            ident = (str(q.method), str(q.query_id))
            same = (_same(getattr(q, "n_steps", None), row.n_steps)
                    and _same(getattr(q, "max_attribution", None), top)
                    and (own_n is None or int(q.n_neurons) == own_n))
            if not same:
                mismatched.add(ident)
                continue
            served.add(ident)
            mismatched.discard(ident)
        ok = [q for q in todo if (str(q.method), str(q.query_id)) in served]
        if not ok:
            continue
        for t, sel in selections.items():
            idx = select(scores, sel)
            for q in ok:
                cols[t].append((str(q.method), str(q.fact_id), str(q.query_id), idx))
    missing = sorted({(str(q.method), str(q.query_id)) for group in wanted.values()
                      for q in group} - served - mismatched)
    sets = {t: _neuron_frame(rows) for t, rows in cols.items()}
    return _MapCoverage(sets, n_maps, missing, sorted(mismatched))


def _same(stored: Any, value: Any) -> bool:
    """A stored query column against the map's value (a column the run lacks agrees)."""
    if stored is None or (isinstance(stored, float) and math.isnan(stored)):
        return True
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    return bool(float(stored) == float(value))


def _neuron_frame(rows: list[tuple[str, str, str, np.ndarray]]) -> pd.DataFrame:
    """The ``neuron_sets`` columns consistency reads, from per-query index arrays."""
    sizes = np.array([len(idx) for *_, idx in rows], dtype=np.int64)
    def rep(i: int) -> np.ndarray:
        return np.repeat(np.array([r[i] for r in rows], dtype=object), sizes)
    idx = (np.concatenate([r[3] for r in rows]) if rows else np.zeros((0, 2), np.int64))
    return pd.DataFrame({"method": rep(0), "fact_id": rep(1), "query_id": rep(2),
                         "layer": idx[:, 0].astype(np.int64), "neuron": idx[:, 1].astype(np.int64)})


def _neuron_axis(store: RunStore, spec: RunSpec, scores: pd.DataFrame,
                 thresholds: Sequence[float],
                 boot: _Boot) -> tuple[list[pd.DataFrame], _MapCoverage]:
    """The rows of the ``neuron`` axis: at each threshold, the neuron sets read off the
    maps, CS1/CS2 (:func:`knowloc.consistency.consistency_scores`, the run's population)
    and Table 1 (the run's static threshold and Otsu's), as the consistency stage computes
    them. No rows when a localized query has no matching map."""
    cfg = spec.consistency or consistency_config()
    queries = store.table("queries")
    if queries.empty:
        raise RunError(f"run {store.root} has no localized queries; run `knowloc localize` "
                       "first")
    # the facts the consistency stage scored (a run may hold more localized queries)
    facts = set(zip(scores["method"].astype(str), scores["fact_id"].astype(str)))
    keep = [(str(m), str(f)) in facts for m, f in zip(queries["method"], queries["fact_id"])]
    queries = queries[keep].drop_duplicates(["method", "query_id"]).reset_index(drop=True)
    own = spec.localize.selection if spec.localize is not None else None
    coverage = _sets_from_maps(store, queries, thresholds, own)
    if coverage.missing or coverage.mismatched:
        return [], coverage
    rows: list[pd.DataFrame] = []
    for t in thresholds:
        scores_t = cons.consistency_scores(queries, coverage.sets[t], population=cfg.population)
        t1 = consistency_result(scores_t, cfg.static_threshold, n_boot=boot.n_boot,
                                boot_seed=boot.seed).table1  # what the stage computes
        rows += _table1_rows(t1, scores_t, boot, t)
    return rows, coverage


def _boot_of(spec: RunSpec) -> _Boot:
    """The bootstrap settings of the run's Table 1 (its consistency configuration's, the
    defaults when it records none)."""
    cfg = spec.consistency
    return _Boot(int(getattr(cfg, "n_boot", N_BOOT)), int(getattr(cfg, "boot_seed", 0)))


def consistency_config() -> Any:
    """The consistency stage's default configuration (a run that records none)."""
    from ..pipeline.consistency import ConsistencyConfig

    return ConsistencyConfig()


def _coverage_note(store: RunStore, coverage: _MapCoverage | None) -> str:
    where = store.root
    fix = (f"localize the run again with --keep-maps (`knowloc localize ... --keep-maps "
           f"--out {where}`: it attributes each query once more and keeps its map)")
    if coverage is None or (coverage.n_maps == 0 and not coverage.mismatched):
        return (f"run {where} kept no attribution maps; the neuron-threshold curves need "
                f"them: {fix}")
    n_bad = len(coverage.missing) + len(coverage.mismatched)
    first = (coverage.missing + coverage.mismatched)[0]
    what = ("have no kept map" if not coverage.mismatched else
            "have no kept map matching their localization")
    return (f"{n_bad} localized (method, query) pairs of run {where} {what} (e.g. "
            f"{first[0]} {first[1]}); the neuron-threshold curves need every one: {fix}")


# ------------------------------------------------------------------ the table
def sensitivity(run: str | Path | RunStore, *, axes: Sequence[str] | None = None,
                neuron_thresholds: Sequence[float] = NEURON_THRESHOLDS,
                split_thresholds: Sequence[float] = SPLIT_THRESHOLDS,
                otsu_bins: Sequence[int] = OTSU_BINS) -> Sensitivity:
    """The threshold sensitivity of a run's Table 1, from its directory alone (no model).

    Args:
        run: a run directory with consistency results.
        axes: ``"neuron"`` and/or ``"split"``. Default: both when the run kept its
            attribution maps, else ``split`` alone (:attr:`Sensitivity.note` says why).
            Asking for ``neuron`` on a run without (complete) maps is an error.
        neuron_thresholds: relative neuron thresholds of the ``neuron`` axis.
        split_thresholds: static split thresholds of the ``split`` axis.
        otsu_bins: histogram bins of Otsu's threshold on the ``split`` axis.

    Returns:
        A :class:`Sensitivity`. On the ``neuron`` axis, each threshold gives the rows of the
        Table 1 the consistency stage computes on a run localized with that threshold: the
        run's static split (``split = static``) and Otsu's (``split = otsu``, 256 bins). On
        the ``split`` axis, the run's stored CS2 values are split at each static threshold
        and at Otsu's threshold per method for each number of bins.

    Raises:
        RunError: no run directory, no consistency results, or ``neuron`` asked for on a
            run whose maps are missing or are not those of its localization.
        ConfigError: a threshold outside [0, 1], bins < 2, an unknown axis.
    """
    t0 = time.time()
    store = run if isinstance(run, RunStore) else RunStore(run, create=False)
    chosen = tuple(axes) if axes is not None else AXES
    unknown = [a for a in chosen if a not in AXES]
    if unknown or not chosen:
        raise ConfigError(f"unknown sensitivity axis {unknown[0] if unknown else '(none)'}; "
                          f"choose from {', '.join(AXES)}")
    neuron_grid = _grid(neuron_thresholds, "neuron thresholds")
    split_grid = _grid(split_thresholds, "split thresholds")
    bins = _bins(otsu_bins)
    spec = read_spec(store)
    scores = _consistency_scores(store)
    own = spec.localize.selection if spec.localize is not None else Selection()
    run_t = float(own.value) if own.mode == "relative" else math.nan
    boot = _boot_of(spec)

    parts: list[pd.DataFrame] = []
    note: str | None = None
    n_maps = 0
    done: list[str] = []
    if "neuron" in chosen:
        coverage: _MapCoverage | None = None
        rows: list[pd.DataFrame] = []
        if has_maps(store):
            rows, coverage = _neuron_axis(store, spec, scores, neuron_grid, boot)
            n_maps = coverage.n_maps
        if not rows:
            note = _coverage_note(store, coverage)
            if axes is not None:
                raise RunError(note)
            note += "; only the split-threshold curves are computed"
        else:
            parts += rows
            done.append("neuron")
    if "split" in chosen:
        parts += _split_axis(scores, split_grid, bins, boot, run_t)
        done.append("split")
    table = _finish(parts)
    seconds = time.time() - t0
    log.info("sensitivity of %s: %d rows (%s) from %d maps in %.2f s", store.root, len(table),
             ", ".join(done), n_maps, seconds)
    return Sensitivity(table, store.root, tuple(done), note, seconds, n_maps)


def _finish(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """The rows in column order, sorted by axis, split, bins, threshold, method."""
    if not parts:
        return pd.DataFrame(columns=SENSITIVITY_COLUMNS)
    table = pd.concat(parts, ignore_index=True)
    extra = [c for c in table.columns if c not in SENSITIVITY_COLUMNS]
    ordered: list[str] = []
    for c in SENSITIVITY_COLUMNS:
        ordered.append(c)
        ordered += [e for e in (f"{c}_lo", f"{c}_hi") if e in extra]
    ordered += [c for c in extra if c not in ordered]
    table = table[ordered]
    methods = {m: i for i, m in enumerate(sort_methods(set(table["method"])))}
    key = pd.DataFrame({
        "axis": table["axis"].map({a: i for i, a in enumerate(AXES)}),
        "split": table["split"].map({"static": 0, "otsu": 1}),
        "bins": table["bins"].fillna(0),
        "x": np.where(table["axis"] == "neuron", table["threshold"], 0.0),
        "s": np.where((table["axis"] == "split") & (table["split"] == "static"),
                      table["threshold"], 0.0),
        "method": table["method"].map(methods),
    })
    order = key.sort_values(list(key.columns), kind="mergesort").index
    table = table.loc[order].reset_index(drop=True)
    table["n_facts"] = table["n_facts"].astype("int64")
    table["n_II"] = table["n_II"].astype("int64")
    return table
