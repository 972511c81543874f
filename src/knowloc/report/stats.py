"""How the report describes the spreads beside its means: the note on the intervals of the
tables (n, and the 95% interval from a bootstrap over facts, :mod:`knowloc.intervals`),
which are also the error bars of the figures drawn from those tables."""

from __future__ import annotations

#: How the tables' intervals are described wherever they are shown.
SPREAD_NOTE = ("[lo, hi]: 95% interval of the mean, percentile bootstrap over facts (facts "
               "are resampled, with all their queries, because the queries of one fact are "
               "not independent); n: number of items averaged, facts: the facts they belong to")
