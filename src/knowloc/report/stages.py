"""What each stage shows beside its tables: the CSV/Markdown renderings and the figures.

The CLI and ``reproduce`` call these right after a stage, so one command writes the same
files either way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..pipeline.attention import AttentionResult
from ..pipeline.consistency import ConsistencyResult
from ..pipeline.mapping import MappingResult
from ..pipeline.modify import ModifyResult
from ..store import RunStore
from .figures import (
    Files,
    attention_figures,
    attention_heatmaps,
    consistency_figures,
    mapping_figures,
)
from .tables import write_figure4, write_figures56, write_table1, write_tables23

log = logging.getLogger(__name__)


@dataclass
class Shown:
    """Renderings a stage wrote: Markdown tables by name, figures by name (PNG, CSV) and,
    for the attention stage, the heatmap figures by panel."""

    markdown: dict[str, str] = field(default_factory=dict)
    figures: Files = field(default_factory=dict)
    heatmaps: dict[str, Files] = field(default_factory=dict)


def present_consistency(store: RunStore, res: ConsistencyResult) -> Shown:
    """Table 1 (``table1.csv``/``.md``, ``consistency_skipped.csv``) and the CS2 violins."""
    return Shown({"table1": write_table1(store, res)}, consistency_figures(store, res))


def present_modification(store: RunStore, res: ModifyResult) -> Shown:
    """Tables 2 and 3 (CSV and Markdown)."""
    md2, md3 = write_tables23(store, res)
    return Shown({"table2": md2} | ({"table3": md3} if md3 is not None else {}))


def present_mapping(store: RunStore, res: MappingResult) -> Shown:
    """``figure4.csv`` and Figure 4 per method."""
    write_figure4(store, res)
    return Shown(figures=mapping_figures(store, res))


def present_attention(store: RunStore, res: AttentionResult) -> Shown:
    """``figure5.csv``, ``figure6.csv``, Figures 5 and 6 per method and the heatmaps."""
    write_figures56(store, res)
    return Shown(figures=attention_figures(store, res), heatmaps=attention_heatmaps(store, res))
