"""The run directory and the I/O every file of knowloc goes through.

- :mod:`~knowloc.store.io`: the one atomic write (:func:`atomic_write`, text, bytes, CSV,
  JSON; UTF-8 explicitly), :func:`content_hash` and :func:`file_sha256`;
- :mod:`~knowloc.store.env`: :func:`environment_info` and :func:`knowloc_version`;
- :mod:`~knowloc.store.parts`: the keyed parts store (one Parquet file per work unit);
- :mod:`~knowloc.store.lock`: the run lock and who holds it;
- :mod:`~knowloc.store.rundir`: :class:`RunStore`, the run directory (config, environment
  history, thread rule, lock, parts, query);
- :mod:`~knowloc.store.sql`: the read-only DuckDB query sandbox.

Importing this package loads neither pandas nor pyarrow: the run directory's modules are
imported when one of their names is first used.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .env import environment_info, knowloc_version
from .io import (
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    content_hash,
    file_sha256,
    to_plain,
    write_csv,
    write_json,
)

if TYPE_CHECKING:
    from .lock import HOLDER_FILE, LOCK_FILE, RunLock
    from .parts import CURRENT_FILE, PARQUET_OPTIONS, PARTS_DIR, PartsStore
    from .rundir import CONFIG_FILE, ENV_FILE, THREADS_FILE, UNKEYED, RunStore

__all__ = [
    "CONFIG_FILE",
    "CURRENT_FILE",
    "ENV_FILE",
    "HOLDER_FILE",
    "LOCK_FILE",
    "PARQUET_OPTIONS",
    "PARTS_DIR",
    "THREADS_FILE",
    "UNKEYED",
    "PartsStore",
    "RunLock",
    "RunStore",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "content_hash",
    "environment_info",
    "file_sha256",
    "knowloc_version",
    "to_plain",
    "write_csv",
    "write_json",
]

#: Names served lazily (their modules import pandas, pyarrow or yaml), by module.
_LAZY = {
    "HOLDER_FILE": "lock", "LOCK_FILE": "lock", "RunLock": "lock",
    "CURRENT_FILE": "parts", "PARQUET_OPTIONS": "parts", "PARTS_DIR": "parts",
    "PartsStore": "parts",
    "CONFIG_FILE": "rundir", "ENV_FILE": "rundir", "THREADS_FILE": "rundir",
    "UNKEYED": "rundir", "RunStore": "rundir",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
