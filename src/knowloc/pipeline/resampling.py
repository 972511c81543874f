"""The bootstrap settings of a run: how many resamples, and the seed, behind every interval
of its tables and figures.

A run records them once, in the ``consistency`` section of its ``config.yaml``
(``n_boot``, ``boot_seed``; :class:`~knowloc.pipeline.consistency.ConsistencyConfig`), and
every stage that reports an interval (Table 1, Tables 2 and 3, Figures 4 and 6) resamples
with those values, so that changing them moves every interval of the run alike.
"""

from __future__ import annotations

import numbers

from ..errors import ConfigError
from ..intervals import N_BOOT
from ..store import CONFIG_FILE, RunStore
from .consistency import ConsistencyConfig

__all__ = ["run_bootstrap"]


def run_bootstrap(store: RunStore, n_boot: int | None = None,
                  boot_seed: int | None = None) -> tuple[int, int]:
    """``(n_boot, boot_seed)``: the values given, else the run's (``consistency.n_boot``
    and ``consistency.boot_seed`` of its ``config.yaml``), else the defaults (1000
    resamples, seed 0) when the run records none or has no ``config.yaml``.

    Raises:
        ConfigError: ``n_boot`` is not an integer >= 1 or ``boot_seed`` not an integer.
        RunError: the run's ``config.yaml`` exists but cannot be read.
    """
    section: dict = {}
    if (n_boot is None or boot_seed is None) and (store.root / CONFIG_FILE).exists():
        section = store.read_config().get("consistency") or {}
    n = section.get("n_boot", N_BOOT) if n_boot is None else n_boot
    seed = section.get("boot_seed", 0) if boot_seed is None else boot_seed
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ConfigError(f"boot_seed (the seed of the bootstrap) must be an integer, got "
                          f"{seed!r}; fix consistency.boot_seed in {store.root / CONFIG_FILE}")
    ConsistencyConfig(n_boot=n, boot_seed=int(seed)).validate()
    return int(n), int(seed)
