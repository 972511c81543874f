"""Errors a user can cause. The CLI prints them without a traceback and exits non-zero."""

from __future__ import annotations


class KnowlocError(Exception):
    """Base class for every error caused by user input or environment."""

    exit_code = 2


class DataError(KnowlocError):
    """A dataset file is missing or malformed, or a requested relation is unknown."""


class ModelError(KnowlocError):
    """A model cannot be loaded, has no adapter, or fails its self-check."""


class DeviceError(KnowlocError):
    """The requested device or dtype is not available."""


class ConfigError(KnowlocError):
    """An option has an invalid value (e.g. n_steps < 2 for an integrated-gradient method)."""


class TokenizationError(KnowlocError):
    """An answer tokenizes to nothing, or a prompt is empty."""


class RunError(KnowlocError):
    """A run directory is missing, incomplete, or was made with another configuration."""


class RunBusyError(RunError):
    """Another process is computing in the same run directory."""


class RunIncompleteError(RunError):
    """A stage's input is unfinished (units missing) and partial results were not allowed."""
