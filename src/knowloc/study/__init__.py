"""A run as one object: its specification, its stages, one driver, and what a run directory
says about itself (its report and its status).

* :class:`RunSpec` (``spec``): a run's identity and the one schema of ``config.yaml``;
* :class:`Stage` and the five stages (``stages``): localization, consistency, modification,
  query-KN mapping, attention;
* :func:`run_stages` (``driver``): runs a list of stages for the CLI, the Python API and
  ``reproduce`` alike;
* :func:`render_report` (``report``) and :func:`run_status` (``status``): read a run
  directory alone.
"""

from .driver import run_stages
from .presets import PRESETS, Preset, resolve_preset
from .report import render_report
from .spec import RunSpec, read_spec
from .stages import (
    AttentionStage,
    ConsistencyStage,
    Context,
    LocalizeStage,
    MappingStage,
    ModifyStage,
    ScreenSettings,
    Stage,
)
from .status import format_status, run_status

__all__ = ["PRESETS", "AttentionStage", "ConsistencyStage", "Context", "LocalizeStage",
           "MappingStage", "ModifyStage", "Preset", "RunSpec", "ScreenSettings", "Stage",
           "format_status", "read_spec", "render_report", "resolve_preset", "run_stages",
           "run_status"]
