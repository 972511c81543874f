"""The paper's Table 1 (K_I / K_II shares, mean CS2 per group, Welch's t, ∩: II) with the
number of facts and a 95% interval beside every share and mean, its Markdown, and the
summary of skipped facts."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from ..errors import ConfigError
from ..intervals import N_BOOT, boot_seed, fact_bootstrap, wilson
from .scores import SKIP_REASONS, method_order, require_columns
from .split import Threshold, check_threshold, split_facts, welch_t

#: Shares and means of Table 1 that carry a 95% interval (``<col>_lo``, ``<col>_hi``).
TABLE1_INTERVALS: tuple[str, ...] = ("R_I", "S_I", "R_II", "S_II", "cap_II")

#: Columns of the table returned by :func:`table1`: every column of
#: :data:`TABLE1_INTERVALS` is followed by its ``_lo`` and ``_hi``.
TABLE1_COLUMNS: list[str] = [
    "method", "T", "threshold", "n_facts",
    "n_I", "R_I", "R_I_lo", "R_I_hi", "S_I", "S_I_lo", "S_I_hi",
    "n_II", "R_II", "R_II_lo", "R_II_hi", "S_II", "S_II_lo", "S_II_hi",
    "t", "p",
    "n_common", "cap_II", "cap_II_lo", "cap_II_hi",
]


def table1(
    scores: pd.DataFrame,
    thresholds: Sequence[tuple[str, Threshold]] = (("St", 0.1), ("Ot", "otsu")),
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> pd.DataFrame:
    """The paper's Table 1: K_I / K_II ratios, mean CS2, Welch's t and ∩:II, each share and
    mean with its number of facts and 95% interval (docs/methods.md, "Intervals").

    Args:
        scores: the output of :func:`consistency_scores` (all methods of one model).
        thresholds: ``(label, threshold)`` pairs; each threshold as in :func:`split_facts`.
        n_boot: bootstrap resamples of the intervals of ``S_I`` and ``S_II``.
        seed: the run's bootstrap seed; each mean's generator is seeded by it and the
            mean's identity (``table1``, label, method, column), see
            :func:`knowloc.intervals.boot_seed`.

    Returns:
        One row per threshold type × method (threshold types in the given order, methods in
        paper order ig, sig, amig, then any others), columns :data:`TABLE1_COLUMNS`:

        * ``T``: the threshold label; ``threshold``: the value used for this method;
        * ``n_facts``: non-skipped facts of the method; ``n_I``, ``n_II``: those in K_I / K_II;
        * ``R_I``, ``R_II``: share of those facts in K_I / K_II, with Wilson's interval;
        * ``S_I``, ``S_II``: mean CS2 of K_I / K_II (NaN for an empty group), with the
          percentile interval of a bootstrap over the group's facts (NaN under 2 facts);
        * ``t``, ``p``: Welch's t-test between the CS2 of K_I and of K_II
          (see :func:`welch_t`; NaN if a group has fewer than 2 facts);
        * ``cap_II`` (∩:II): among the ``n_common`` facts non-skipped in every method of
          ``scores``, the share that every method puts in K_II under this threshold type,
          with Wilson's interval; the same on every row of one ``T``; NaN if no fact is
          non-skipped in every method.

        Intervals are conditional on the split (the threshold is taken as given). The point
        estimates do not depend on ``n_boot`` or ``seed``.

    Raises:
        ConfigError: empty ``thresholds``, a duplicate label, an invalid threshold or
            ``n_boot < 1``.
    """
    if len(thresholds) == 0:
        raise ConfigError("table1 needs at least one (label, threshold) pair")
    labels = [lab for lab, _ in thresholds]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"threshold labels must be unique, got {labels}")
    for _, thr in thresholds:
        check_threshold(thr)
    if isinstance(n_boot, bool) or int(n_boot) != n_boot or n_boot < 1:
        raise ConfigError(f"n_boot must be an integer >= 1, got {n_boot!r}")
    require_columns(scores, ("method", "fact_id", "cs2", "skipped"), "scores")

    methods = method_order(scores["method"].astype(str).unique())
    rows: list[dict[str, object]] = []
    for label, thr in thresholds:
        split = split_facts(scores, thr)
        split = split.assign(method=split["method"].astype(str))

        # ∩:II over facts non-skipped in every method
        cap_ii, n_common, n_cap = float("nan"), 0, 0
        if methods:
            fact_sets = [set(split.loc[split["method"] == m, "fact_id"]) for m in methods]
            common = set.intersection(*fact_sets)
            if common:
                sub = split[split["fact_id"].isin(common)]
                all_ii = (sub["kind"] == "K_II").groupby(sub["fact_id"]).all()
                n_common, n_cap = len(common), int(all_ii.sum())
                cap_ii = float(all_ii.sum()) / len(common)
        cap_lo, cap_hi = wilson(n_cap, n_common)

        for m in methods:
            g = split[split["method"] == m]
            n_facts = len(g)
            kinds = {k: g[g["kind"] == k] for k in ("K_I", "K_II")}
            cs_i = kinds["K_I"]["cs2"].to_numpy(dtype=float)
            cs_ii = kinds["K_II"]["cs2"].to_numpy(dtype=float)
            if n_facts:
                thr_used = float(g["threshold"].iloc[0])
            elif thr == "otsu":
                thr_used = float("nan")
            else:
                thr_used = float(thr)
            t, p = welch_t(cs_i, cs_ii)
            row: dict[str, object] = {"method": m, "T": label, "threshold": thr_used,
                                      "n_facts": n_facts}
            for kind, suffix, cs in (("K_I", "I", cs_i), ("K_II", "II", cs_ii)):
                r_lo, r_hi = wilson(cs.size, n_facts)
                s_lo, s_hi, _ = fact_bootstrap(
                    cs, kinds[kind]["fact_id"].astype(str).to_numpy(), n_boot=n_boot,
                    seed=boot_seed(seed, "table1", label, m, f"S_{suffix}"))
                row.update({
                    f"n_{suffix}": cs.size,
                    f"R_{suffix}": cs.size / n_facts if n_facts else float("nan"),
                    f"R_{suffix}_lo": r_lo, f"R_{suffix}_hi": r_hi,
                    f"S_{suffix}": float(cs.mean()) if cs.size else float("nan"),
                    f"S_{suffix}_lo": s_lo, f"S_{suffix}_hi": s_hi,
                })
            row.update({"t": t, "p": p, "n_common": n_common, "cap_II": cap_ii,
                        "cap_II_lo": cap_lo, "cap_II_hi": cap_hi})
            rows.append(row)
    out = pd.DataFrame(rows, columns=TABLE1_COLUMNS)
    for col in ("n_facts", "n_I", "n_II", "n_common"):
        out[col] = out[col].astype("int64")
    return out


def format_number(x: object, spec: str) -> str:
    """``x`` in the format ``spec``; None and NaN print as ``–``, infinities as ``∞``."""
    if x is None:
        return "–"
    try:
        v = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(v):
        return "–"
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    return format(v, spec)


def format_interval(value: object, lo: object, hi: object, spec: str) -> str:
    """``value [lo, hi]`` in the format ``spec`` (e.g. ``0.52 [0.41, 0.63]``); the value
    alone when the interval is undefined, ``–`` when the value is."""
    text = format_number(value, spec)
    if text == "–" or any(v is None or pd.isna(v) for v in (lo, hi)):
        return text
    return f"{text} [{format_number(lo, spec)}, {format_number(hi, spec)}]"


#: Markdown header labels of :func:`table1_markdown`, in column order.
_MD_HEADERS: list[tuple[str, str, str]] = [
    # (column, header, format spec)
    ("method", "method", ""),
    ("T", "T", ""),
    ("threshold", "threshold", ".3f"),
    ("n_facts", "n", "d"),
    ("R_I", "R: I", ".2f"),
    ("S_I", "S: I", ".3f"),
    ("R_II", "R: II", ".2f"),
    ("S_II", "S: II", ".3f"),
    ("t", "t", ".1f"),
    ("p", "p", ".1e"),
    ("cap_II", "∩: II", ".2f"),
    ("n_I", "n: I", "d"),
    ("n_II", "n: II", "d"),
    ("n_common", "n: ∩", "d"),
]


def table1_markdown(df: pd.DataFrame) -> str:
    """Format a :func:`table1` result as a Markdown table, like the paper's Table 1.

    Ratios (R, ∩:II) get 2 decimals, scores (S) and thresholds 3, t one decimal, p
    scientific notation (e.g. ``1.2e-07``); NaN prints as ``–``. Shares and means are
    followed by their 95% interval in brackets, ``0.52 [0.41, 0.63]``; the last columns,
    ``n: I``, ``n: II`` and ``n: ∩``, are the facts S: I, S: II and ∩: II are taken over
    (``n`` those of R: I and R: II).
    """
    require_columns(df, TABLE1_COLUMNS, "table1")
    head = "| " + " | ".join(h for _, h, _ in _MD_HEADERS) + " |"
    align = (
        "|" + "|".join(":---" if c in ("method", "T") else "---:" for c, _, _ in _MD_HEADERS) + "|"
    )
    lines = [head, align]
    for rec in df.to_dict("records"):
        cells = []
        for col, _, spec in _MD_HEADERS:
            v = rec[col]
            if spec == "":
                cells.append(str(v))
            elif spec == "d":
                cells.append(str(int(v)) if v is not None and not pd.isna(v) else "–")
            elif col in TABLE1_INTERVALS:
                cells.append(format_interval(v, rec[f"{col}_lo"], rec[f"{col}_hi"], spec))
            else:
                cells.append(format_number(v, spec))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def skipped_summary(scores: pd.DataFrame) -> pd.DataFrame:
    """Number of skipped facts per method and reason.

    Returns:
        Columns ``method, reason, n_facts``: for every method in ``scores`` one row per reason
        in :data:`SKIP_REASONS` (zeros included, pipeline order), then any other reason
        found, then a row ``reason = "kept"`` with the number of non-skipped facts. Methods
        in paper order.
    """
    require_columns(scores, ("method", "skipped"), "scores")
    rows: list[dict[str, object]] = []
    for m in method_order(scores["method"].astype(str).unique()):
        g = scores[scores["method"].astype(str) == m]
        counts = g["skipped"].dropna().value_counts()
        reasons = list(SKIP_REASONS) + sorted(set(counts.index) - set(SKIP_REASONS))
        for r in reasons:
            rows.append({"method": m, "reason": r, "n_facts": int(counts.get(r, 0))})
        rows.append({"method": m, "reason": "kept", "n_facts": int(g["skipped"].isna().sum())})
    out = pd.DataFrame(rows, columns=["method", "reason", "n_facts"])
    out["n_facts"] = out["n_facts"].astype("int64")
    return out
