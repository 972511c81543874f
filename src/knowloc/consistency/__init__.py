"""KN-consistency analysis (paper §2.1, eq. 1, Table 1, Table 4; docs/methods.md §2).

Given the knowledge neurons N_i of every neighbor query q_i of a fact, this package computes

* ``CS1 = |∩ N_i| / |∪ N_i|`` and
* ``CS2 = |{n ∈ ∪ N_i : n is in more than one N_i}| / |∪ N_i|``

per (method, fact), splits facts into K_I (``cs2 > threshold``) and K_II (``cs2 <= threshold``)
with a static threshold (0.1, Table 4) or Otsu's threshold computed per method, compares the
two groups with Welch's t-test, and assembles the paper's Table 1 with a 95% interval on
every share and mean (:mod:`knowloc.intervals`).

Inputs are two tables produced by the localization stage:

``queries``
    one row per localized query: ``method, fact_id, relation, query_id, known, prob,
    n_neurons``. A query may have zero neurons (then it has no rows in ``neurons``).
``neurons``
    one row per knowledge neuron: ``method, fact_id, relation, query_id, layer, neuron,
    attribution``.

A neuron is identified by the pair ``(layer, neuron)``. The package's modules:

- :mod:`~knowloc.consistency.scores`: :func:`consistency_scores` (CS1, CS2, skip reasons);
- :mod:`~knowloc.consistency.split`: :func:`otsu_threshold`, :func:`split_facts` (K_I /
  K_II) and :func:`welch_t`;
- :mod:`~knowloc.consistency.table`: :func:`table1`, :func:`table1_markdown` and
  :func:`skipped_summary`;
- :mod:`~knowloc.consistency.objects`: :func:`consistency_of` and its :class:`Consistency`,
  straight from attributions or neuron sets.
"""

from __future__ import annotations

from .objects import Consistency, FactConsistency, consistency_of
from .scores import (
    POPULATIONS,
    SCORE_COLUMNS,
    SKIP_EMPTY_UNION,
    SKIP_FEW_QUERIES,
    SKIP_NOT_KNOWN,
    SKIP_REASONS,
    consistency_scores,
)
from .split import Threshold, otsu_threshold, split_facts, welch_t
from .table import TABLE1_COLUMNS, TABLE1_INTERVALS, skipped_summary, table1, table1_markdown

__all__ = [
    "POPULATIONS",
    "SCORE_COLUMNS",
    "SKIP_EMPTY_UNION",
    "SKIP_FEW_QUERIES",
    "SKIP_NOT_KNOWN",
    "SKIP_REASONS",
    "TABLE1_COLUMNS",
    "TABLE1_INTERVALS",
    "Consistency",
    "FactConsistency",
    "Threshold",
    "consistency_of",
    "consistency_scores",
    "otsu_threshold",
    "skipped_summary",
    "split_facts",
    "table1",
    "table1_markdown",
    "welch_t",
]
