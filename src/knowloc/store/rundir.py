"""The run directory: a resumable, content-hashed, crash-safe store of result tables.

Layout of a run directory ``runs/<name>/``::

    config.yaml                 fully resolved configuration (``write_config``)
    env.json                    {"runs": [environment_info(), ...]} one entry per invocation
                                (with the model's weights identity)
    parts/...                   the keyed result tables (:mod:`knowloc.store.parts`)
    <table>.parquet             a table's current parts, consolidated
    threads.json                the torch thread count every unit of the run is computed with
    .lock, .lock.json           the run lock and who holds it (:mod:`knowloc.store.lock`)
    ...                         figures, report.html (``path``)

:class:`RunStore` is the whole of it: the parts store, the configuration with its
fingerprint rule, the environment history, the thread rule, the lock and the read-only
query sandbox (:mod:`knowloc.store.sql`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ..errors import RunError
from .io import atomic_write_text, content_hash, to_plain, write_json
from .lock import RunLock
from .parts import PartsStore

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["CONFIG_FILE", "ENV_FILE", "THREADS_FILE", "UNKEYED", "RunStore"]

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
ENV_FILE = "env.json"
THREADS_FILE = "threads.json"
#: Fingerprint entries the unit keys do not contain: ``weights``, the hash of the model's
#: weights (keys name the model by its fingerprint of name, adapter, dtype and shape, so a
#: run's parts keep their keys across versions). Changing one is refused even with
#: ``overwrite``, because the parts computed under the stored value would be reused.
UNKEYED = ("weights",)


class RunStore(PartsStore):
    """A run directory holding config, environment history and keyed result tables.

    Args:
        root: the run directory (``runs/<name>``).
        create: create ``root`` if it does not exist; with ``create=False`` a missing
            directory raises :class:`~knowloc.errors.RunError`.
        fsync: flush every unit to disk before it is moved into place (survives power
            loss, not only a killed process). Turn off for scratch runs on slow disks.
    """

    def __init__(self, root: str | Path, *, create: bool = True, fsync: bool = True) -> None:
        path = Path(root).expanduser().resolve()
        if path.exists() and not path.is_dir():
            raise RunError(f"run directory {path} exists and is not a directory; "
                           "pick another --out")
        if not path.exists():
            if not create:
                raise RunError(f"run directory {path} does not exist; "
                               "check the path or run the experiment first")
            path.mkdir(parents=True, exist_ok=True)
            logger.debug("created run directory %s", path)
        super().__init__(path, fsync=fsync)
        self._run_lock = RunLock(path, fsync=fsync)

    def __repr__(self) -> str:
        return f"RunStore({str(self.root)!r})"

    # ---------------------------------------------------------------- paths
    def path(self, *parts: str | Path) -> Path:
        """Path inside the run directory; its parent directory is created."""
        p = self.root.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    # ---------------------------------------------------------------- config / env
    def write_config(self, config: dict, *, overwrite: bool = False) -> None:
        """Write the fully resolved ``config.yaml``.

        If ``config.yaml`` already exists and ``config["fingerprint"]`` (the part of the
        configuration that determines results) differs from the stored one, raise
        :class:`RunError` unless ``overwrite``; other sections may change between runs.
        A change of an entry in :data:`UNKEYED` (the model's weights) is refused even with
        ``overwrite``: the unit keys do not contain it, so the run's parts would be reused.
        """
        plain = to_plain(config)
        cfg_path = self.root / CONFIG_FILE
        if "fingerprint" in plain and cfg_path.exists():
            try:
                old_fp = self.read_config().get("fingerprint")
            except RunError:
                if not overwrite:
                    raise
                old_fp = None  # an unreadable config is replaced
            new_fp = plain["fingerprint"]
            if old_fp is not None and content_hash(old_fp) != content_hash(new_fp):
                diff = _describe_diff(old_fp, new_fp)
                unkeyed = [k for k in UNKEYED if isinstance(old_fp, dict) and k in old_fp
                           and isinstance(new_fp, dict)
                           and content_hash(old_fp[k]) != content_hash(new_fp.get(k))]
                if unkeyed:
                    raise RunError(
                        f"run directory {self.root} was made with other model weights ({diff}); "
                        "its results cannot be reused with these weights, even with "
                        "--overwrite: pick another --out")
                if not overwrite:
                    raise RunError(
                        f"run directory {self.root} was made with another configuration "
                        f"({diff}); pick another --out or pass --overwrite"
                    )
        text = yaml.safe_dump(plain, sort_keys=False, allow_unicode=True, default_flow_style=False)
        atomic_write_text(cfg_path, text, fsync=self.fsync)

    def read_config(self) -> dict:
        """Read ``config.yaml``; RunError if it is missing or unreadable."""
        cfg_path = self.root / CONFIG_FILE
        if not cfg_path.exists():
            raise RunError(f"{cfg_path} not found: {self.root} is not a complete run directory")
        try:
            data = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise RunError(f"{cfg_path} is not valid YAML ({exc}); fix or delete it") from exc
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise RunError(f"{cfg_path} does not hold a mapping; fix or delete it")
        return data

    def read_env(self) -> dict:
        """Read ``env.json`` (``{"runs": [...]}``; empty history if absent)."""
        env_path = self.root / ENV_FILE
        if not env_path.exists():
            return {"runs": []}
        try:
            data = json.loads(env_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise RunError(f"{env_path} is not valid JSON ({exc}); fix or delete it") from exc
        if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
            raise RunError(f"{env_path} should hold {{\"runs\": [...]}}; fix or delete it")
        return data

    def write_env(self, env: dict) -> None:
        """Append ``env`` (see :func:`~knowloc.store.environment_info`) to the history in
        ``env.json``."""
        data = self.read_env()
        data["runs"].append(to_plain(env))
        write_json(self.root / ENV_FILE, data, indent=2, fsync=self.fsync)

    # ---------------------------------------------------------------- threads / lock
    def check_threads(self, n_threads: int) -> None:
        """Record ``n_threads`` as the torch thread count of the run's units (``threads.json``),
        or raise :class:`RunError` if the run was computed with another count: CPU results
        depend on it in the last digits, so a run directory keeps one."""
        path = self.root / THREADS_FILE
        if path.exists():
            try:
                stored = int(json.loads(path.read_text(encoding="utf-8"))["torch_threads"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise RunError(f"{path} is unreadable ({exc}); fix or delete it") from exc
            if stored != n_threads:
                raise RunError(
                    f"run directory {self.root} was computed with {stored} torch thread(s) and "
                    f"this process uses {n_threads}; results depend on the thread count in the "
                    f"last digits, so set OMP_NUM_THREADS={stored} (or call "
                    f"torch.set_num_threads({stored})) to continue it, or pick another --out")
            return
        write_json(path, {"torch_threads": n_threads}, indent=None, fsync=self.fsync)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run directory's lock while computing (re-entrant within a process, also
        through another RunStore of the same directory).

        Raises :class:`~knowloc.errors.RunBusyError` at once when another process holds it.
        """
        with self._run_lock.hold():
            yield

    def holder(self) -> dict[str, Any] | None:
        """The process that holds the run's lock (``pid``, ``host``, ``since``, ``command``),
        or None; read only, safe while the run is computing (see
        :meth:`knowloc.store.lock.RunLock.holder`)."""
        return self._run_lock.holder()

    # ---------------------------------------------------------------- SQL
    def query(self, sql: str) -> pd.DataFrame:
        """Run one read-only DuckDB statement in which every table of the run is a view of
        the same name (see :func:`knowloc.store.sql.query`)."""
        from .sql import query

        return query(self, sql)


def _describe_diff(old: Any, new: Any, prefix: str = "fingerprint") -> str:
    """Short human description of where two fingerprints differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        diffs = []
        for k in sorted(set(old) | set(new), key=str):
            if content_hash(old.get(k)) != content_hash(new.get(k)):
                diffs.append(_describe_diff(old.get(k), new.get(k), f"{prefix}.{k}"))
        return "; ".join(diffs[:5]) + (" ..." if len(diffs) > 5 else "")
    return f"{prefix}: stored {_short(old)}, now {_short(new)}"


def _short(value: Any) -> str:
    text = repr(value)
    if isinstance(value, float) and math.isnan(value):
        text = "nan"
    return text if len(text) <= 60 else text[:57] + "..."
