"""The run directory: a resumable, content-hashed, crash-safe store of result tables.

Layout of a run directory ``runs/<name>/``::

    config.yaml                 fully resolved configuration (``write_config``)
    env.json                    {"runs": [environment_info(), ...]} one entry per invocation
                                (with the model's weights identity)
    parts/<table>/<key>.parquet one finished work unit (``put``)
    parts/<table>/<key>.empty   a finished work unit whose DataFrame has no columns
    parts/<table>/.current.json the keys of the table's current configuration (``set_current``)
    <table>.parquet             the current parts of a table, consolidated (``consolidate``)
    threads.json                the torch thread count every unit of the run is computed with
    .lock                       held by the process computing units (``lock``)
    ...                         figures, report.html (``path``)

A *work unit* is identified by a key, normally :func:`content_hash` of everything that
determines its result (model, adapter, prompt, target, method config). A unit is written
to a temporary file and moved into place with :func:`os.replace`, so a unit file either
exists complete or not at all: a run killed at any point resumes by skipping
``done_keys(table)``, and nothing is computed twice. Writing a key again replaces it.

Parts are the source of truth; ``<table>.parquet`` is a derived, deterministic
(byte-identical for identical content) snapshot for sharing and fast loading. A table that
has a current key list (written by the unit runner for each stage's configuration) shows
only those parts, in :meth:`RunStore.table`, :meth:`RunStore.consolidate` and
:meth:`RunStore.query`; parts of earlier configurations stay as a cache, so switching back
to a configuration recomputes nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import re
import secrets
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from knowloc.errors import RunBusyError, RunError

__all__ = ["RunStore", "atomic_write_text", "content_hash", "environment_info", "knowloc_version",
           "to_plain"]

logger = logging.getLogger(__name__)

PARTS_DIR = "parts"
CONFIG_FILE = "config.yaml"
ENV_FILE = "env.json"
CURRENT_FILE = ".current.json"
THREADS_FILE = "threads.json"
LOCK_FILE = ".lock"
#: Fingerprint entries the unit keys do not contain: ``weights``, the hash of the model's
#: weights (keys name the model by its fingerprint of name, adapter, dtype and shape, so a
#: run's parts keep their keys across versions). Changing one is refused even with
#: ``overwrite``, because the parts computed under the stored value would be reused.
UNKEYED = ("weights",)
_PART_SUFFIX = ".parquet"
_EMPTY_SUFFIX = ".empty"
_TMP_SUFFIX = ".tmp"

#: Fixed Parquet writer options: identical content gives identical bytes.
_PARQUET_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 3,
    "version": "2.6",
    "data_page_version": "1.0",
    "use_dictionary": True,
    "write_statistics": True,
    "row_group_size": 1 << 20,
}

#: Locks this process holds: run directory -> (file descriptor, nesting depth).
_HELD: dict[Path, tuple[int, int]] = {}

_TABLE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=+-]{0,199}$")


# --------------------------------------------------------------------------- hashing


def to_plain(obj: Any) -> Any:
    """Convert ``obj`` into plain JSON/YAML-able Python (dict, list, str, int, float, bool, None).

    Dataclasses become dicts, tuples and sets become lists (sets sorted), paths and enums
    become their string / value, numpy scalars and arrays become Python numbers and lists,
    and mapping keys become strings.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, enum.Enum):
        return to_plain(obj.value)
    if isinstance(obj, PurePath):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (set, frozenset)):
        items = [to_plain(v) for v in obj]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True, allow_nan=True))
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, bytes):
        return obj.hex()
    # numpy / torch scalars and arrays, without importing either.
    if hasattr(obj, "tolist") and callable(obj.tolist):
        return to_plain(obj.tolist())
    if hasattr(obj, "item") and callable(obj.item):
        return to_plain(obj.item())
    raise TypeError(f"cannot hash or serialize object of type {type(obj).__name__}: {obj!r}")


def _canonical_json(obj: Any) -> str:
    """Canonical JSON text: sorted keys, no whitespace, floats as their exact ``repr``."""
    return json.dumps(
        to_plain(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True
    )


def content_hash(obj: Any, length: int = 16) -> str:
    """Stable hex SHA-256 (first ``length`` characters) of a JSON-able object.

    Keys are sorted, floats are written with their exact ``repr`` (so ``0.1`` and
    ``0.1000000001`` differ, ``1`` and ``1.0`` differ), tuples hash like lists.
    The result does not depend on dict insertion order, process, or platform.
    """
    digest = hashlib.sha256(_canonical_json(obj).encode("utf-8")).hexdigest()
    return digest[:length]


# ------------------------------------------------------------------------ environment


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cuda_info(probe: bool) -> dict[str, Any]:
    """CUDA devices as torch sees them; imports torch only when ``probe`` or already imported."""
    if "torch" not in sys.modules and not probe:
        return {"available": None, "devices": []}
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - any import failure just means "no torch"
        return {"available": False, "devices": [], "error": f"torch import failed: {exc}"}
    info: dict[str, Any] = {"available": bool(torch.cuda.is_available()), "devices": []}
    info["version"] = getattr(torch.version, "cuda", None)
    if info["available"]:
        try:
            info["devices"] = [
                torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
            ]
        except Exception as exc:  # noqa: BLE001
            info["error"] = str(exc)
    return info


def knowloc_version() -> dict[str, str | None]:
    """knowloc's version and, when it runs from a git checkout, its commit.

    ``version`` is the installed package's version; ``commit`` is ``git describe --always --dirty --tags``
    of the checkout whose ``src/knowloc`` is this package (None for an installed copy, or
    when git is missing), so an edited checkout shows as ``<commit>-dirty``.
    """
    package = Path(__file__).resolve().parent
    commit: str | None = None
    if package.parent.name == "src" and (package.parents[1] / ".git").exists():
        try:
            done = subprocess.run(
                ["git", "-C", str(package.parents[1]), "describe", "--always", "--dirty",
                 "--tags"], capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            logger.debug("git describe failed: %s", exc)
        else:
            commit = done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None
    return {"version": _version("knowloc"), "commit": commit}


def environment_info(extra: dict | None = None, *, probe_devices: bool = True) -> dict:
    """Describe the machine and software of this invocation (stored in ``env.json``).

    Returns python / platform / hostname / UTC time, knowloc's version and commit
    (:func:`knowloc_version`), versions of torch, transformers, numpy, pandas, pyarrow and
    duckdb, the CPU model, and the CUDA devices. ``extra`` (e.g. seed, the model and its
    weights, command line) is merged in at top level.
    With ``probe_devices=False`` torch is not imported just to list CUDA devices.
    """
    env: dict[str, Any] = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "knowloc": knowloc_version(),
        "packages": {
            name: _version(name)
            for name in (
                "knowloc", "torch", "transformers", "numpy", "pandas", "pyarrow", "duckdb",
            )
        },
        "cpu": {"name": _cpu_name(), "count": os.cpu_count()},
        "cuda": _cuda_info(probe_devices),
        "argv": list(sys.argv),
    }
    if extra:
        env.update(to_plain(extra))
    return env


# ------------------------------------------------------------------------ atomic I/O


def _tmp_path(path: Path) -> Path:
    """A unique temporary sibling of ``path`` (hidden, ends with ``.tmp``)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{_TMP_SUFFIX}")


def _atomic_write(path: Path, write: Callable[[Path], object], *, fsync: bool = True) -> None:
    """Write ``path`` via ``write(tmp)`` then ``os.replace``: it appears complete or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        write(tmp)
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise


def atomic_write_text(path: Path, text: str, *, fsync: bool = True) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (its folder is created when missing)."""
    _atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"), fsync=fsync)


def _frame_to_arrow(df: pd.DataFrame) -> pa.Table:
    """Arrow table of ``df`` without index metadata; a *named* index is kept as columns."""
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"expected a pandas DataFrame, got {type(df).__name__}")
    if any(name is not None for name in df.index.names):
        df = df.reset_index()
    if not df.columns.is_unique:
        raise ValueError(f"DataFrame has duplicate column names: {list(df.columns)}")
    if any(not isinstance(c, str) for c in df.columns):
        df = df.rename(columns=str)
    return pa.Table.from_pandas(df, preserve_index=False)


def _write_parquet(table: pa.Table, path: Path) -> None:
    """Write ``table`` with the fixed options; columns of float lists (attribution maps) are
    written without a dictionary, which would make their files half as large again."""
    options = dict(_PARQUET_OPTIONS)
    floats = {f.name for f in table.schema
              if pa.types.is_list(f.type) and pa.types.is_floating(f.type.value_type)}
    if floats:
        options["use_dictionary"] = [
            f"{f.name}.list.element" if pa.types.is_list(f.type) else f.name
            for f in table.schema if f.name not in floats]
    pq.write_table(table, path, **options)


# -------------------------------------------------------------------------- RunStore


class RunStore:
    """A run directory holding config, environment history and keyed result tables.

    Args:
        root: the run directory (``runs/<name>``).
        create: create ``root`` if it does not exist; with ``create=False`` a missing
            directory raises :class:`~knowloc.errors.RunError`.
        fsync: flush every unit to disk before it is moved into place (survives power
            loss, not only a killed process). Turn off for scratch runs on slow disks.
    """

    def __init__(self, root: str | Path, *, create: bool = True, fsync: bool = True) -> None:
        self.root: Path = Path(root).expanduser().resolve()
        self.fsync = fsync
        if self.root.exists() and not self.root.is_dir():
            raise RunError(f"run directory {self.root} exists and is not a directory; "
                           "pick another --out")
        if not self.root.exists():
            if not create:
                raise RunError(f"run directory {self.root} does not exist; "
                               "check the path or run the experiment first")
            self.root.mkdir(parents=True, exist_ok=True)
            logger.debug("created run directory %s", self.root)

    def __repr__(self) -> str:
        return f"RunStore({str(self.root)!r})"

    # ---------------------------------------------------------------- paths
    def path(self, *parts: str | Path) -> Path:
        """Path inside the run directory; its parent directory is created."""
        p = self.root.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def _table_dir(self, table: str) -> Path:
        if not isinstance(table, str) or not _TABLE_RE.match(table):
            raise ValueError(
                f"invalid table name {table!r}: use letters, digits and '_' (a SQL identifier)"
            )
        return self.root / PARTS_DIR / table

    @staticmethod
    def _check_key(key: str) -> str:
        if not isinstance(key, str) or not _KEY_RE.match(key) or key.endswith(_TMP_SUFFIX):
            raise ValueError(
                f"invalid work-unit key {key!r}: use 1-200 characters from [A-Za-z0-9_.=+-], "
                "starting with a letter or digit (e.g. a content_hash)"
            )
        return key

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
        """Append ``env`` (see :func:`environment_info`) to the history in ``env.json``."""
        data = self.read_env()
        data["runs"].append(to_plain(env))
        text = json.dumps(data, indent=2, ensure_ascii=False, allow_nan=True) + "\n"
        atomic_write_text(self.root / ENV_FILE, text, fsync=self.fsync)

    # ---------------------------------------------------------------- work units
    def tables(self) -> list[str]:
        """Names of tables with parts or a consolidated file, sorted."""
        names: set[str] = set()
        parts = self.root / PARTS_DIR
        if parts.is_dir():
            names.update(p.name for p in parts.iterdir() if p.is_dir() and _TABLE_RE.match(p.name))
        names.update(
            p.stem for p in self.root.glob(f"*{_PART_SUFFIX}") if _TABLE_RE.match(p.stem)
        )
        return sorted(names)

    def _unit_files(self, table: str) -> dict[str, Path]:
        """key -> file of every finished unit (``.parquet`` wins over ``.empty``)."""
        tdir = self._table_dir(table)
        units: dict[str, Path] = {}
        if not tdir.is_dir():
            return units
        for entry in os.scandir(tdir):
            name = entry.name
            if name.startswith(".") or name.endswith(_TMP_SUFFIX) or not entry.is_file():
                continue
            if name.endswith(_PART_SUFFIX):
                units[name[: -len(_PART_SUFFIX)]] = Path(entry.path)
            elif name.endswith(_EMPTY_SUFFIX):
                units.setdefault(name[: -len(_EMPTY_SUFFIX)], Path(entry.path))
        return units

    def done_keys(self, table: str) -> set[str]:
        """Keys of the finished work units of ``table`` (empty set if none)."""
        return set(self._unit_files(table))

    def set_current(self, table: str, keys: Sequence[str]) -> None:
        """Record ``keys`` as the units of ``table``'s current configuration: from now on
        :meth:`table`, :meth:`consolidate` and :meth:`query` show only their parts (the
        others stay on disk as a cache)."""
        tdir = self._table_dir(table)
        tdir.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"keys": sorted({self._check_key(k) for k in keys})}) + "\n"
        path = tdir / CURRENT_FILE
        if path.exists() and path.read_text(encoding="utf-8") == text:
            return  # a rerun of the same configuration leaves the directory untouched
        atomic_write_text(path, text, fsync=self.fsync)

    def current_keys(self, table: str) -> set[str] | None:
        """The keys of ``table``'s current configuration; None when it has no key list
        (then every part is current)."""
        path = self._table_dir(table) / CURRENT_FILE
        if not path.exists():
            return None
        try:
            keys = json.loads(path.read_text(encoding="utf-8"))["keys"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise RunError(f"{path} is not a key list ({exc}); delete it and rerun the stage "
                           f"that writes {table}") from exc
        return {str(k) for k in keys}

    def retire(self, table: str) -> None:
        """Make ``table`` show nothing (its configuration is stale): an empty current key
        list, and no consolidated file. Its parts stay as a cache."""
        self.set_current(table, [])
        (self.root / f"{table}{_PART_SUFFIX}").unlink(missing_ok=True)

    def _current_files(self, table: str) -> dict[str, Path]:
        units = self._unit_files(table)
        current = self.current_keys(table)
        if current is None:
            return units
        return {k: p for k, p in units.items() if k in current}

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
        atomic_write_text(path, json.dumps({"torch_threads": n_threads}) + "\n",
                           fsync=self.fsync)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run directory's lock while computing (re-entrant within a process).

        Raises :class:`~knowloc.errors.RunBusyError` at once when another process holds it.
        """
        held = _HELD.get(self.root)
        if held is not None:
            _HELD[self.root] = (held[0], held[1] + 1)
            try:
                yield
            finally:
                fd, depth = _HELD[self.root]
                _HELD[self.root] = (fd, depth - 1)
            return
        path = self.root / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunError(f"cannot write in run directory {self.root} ({exc.strerror}); "
                           "pick another --out") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            raise RunBusyError(
                f"run directory {self.root} is busy: another knowloc process"
                f"{f' (pid {owner})' if owner else ''} is computing in it; wait for it to "
                "finish, then rerun to resume, or pick another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        _HELD[self.root] = (fd, 1)
        try:
            yield
        finally:
            del _HELD[self.root]
            os.close(fd)  # releases the lock

    def has(self, table: str, key: str) -> bool:
        """Whether the unit ``key`` of ``table`` is finished."""
        self._check_key(key)
        tdir = self._table_dir(table)
        return (tdir / f"{key}{_PART_SUFFIX}").exists() or (tdir / f"{key}{_EMPTY_SUFFIX}").exists()

    def put(self, table: str, key: str, df: pd.DataFrame) -> None:
        """Record ONE finished work unit, atomically; writing the same key again replaces it.

        A DataFrame with rows or columns becomes ``parts/<table>/<key>.parquet`` (a
        zero-row frame keeps its schema); a frame without columns is recorded as a
        ``<key>.empty`` marker, so it still counts as done.
        """
        if not isinstance(df, pd.DataFrame):
            raise TypeError(f"put() needs a pandas DataFrame, got {type(df).__name__}")
        self._check_key(key)
        tdir = self._table_dir(table)
        tdir.mkdir(parents=True, exist_ok=True)
        part = tdir / f"{key}{_PART_SUFFIX}"
        marker = tdir / f"{key}{_EMPTY_SUFFIX}"
        if len(df.columns) == 0 and not any(n is not None for n in df.index.names):
            _atomic_write(marker, lambda p: p.write_bytes(b""), fsync=self.fsync)
            part.unlink(missing_ok=True)
        else:
            arrow = _frame_to_arrow(df)
            _atomic_write(part, lambda p: _write_parquet(arrow, p), fsync=self.fsync)
            marker.unlink(missing_ok=True)
        logger.debug("stored %s/%s (%d rows)", table, key, len(df))

    def get(self, table: str, key: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """The DataFrame stored for one unit (only ``columns`` when given); KeyError if it is
        not done, RunError if its file is unreadable or lacks one of ``columns``."""
        self._check_key(key)
        tdir = self._table_dir(table)
        part = tdir / f"{key}{_PART_SUFFIX}"
        if part.exists():
            try:
                return pq.read_table(part, columns=list(columns) if columns else None).to_pandas()
            except (OSError, pa.ArrowException) as exc:
                raise RunError(f"unit file {part} is unreadable ({exc}); delete it and rerun "
                               "to recompute it") from exc
        if (tdir / f"{key}{_EMPTY_SUFFIX}").exists():
            return pd.DataFrame()
        raise KeyError(f"{table}/{key}")

    def table(self, table: str, *, with_key: bool = False) -> pd.DataFrame:
        """The current parts of ``table`` concatenated: ordered by key, then by row within a
        part (all parts when the table has no current key list, see :meth:`set_current`).

        Returns an empty DataFrame if there are no parts. With ``with_key`` a ``_key``
        column tells which unit each row came from. If the table has no parts but a
        consolidated ``<table>.parquet`` exists, that file is returned.
        """
        units = self._current_files(table)
        if not units:
            consolidated = self.root / f"{table}{_PART_SUFFIX}"
            if consolidated.exists() and self.current_keys(table) is None:
                return pq.read_table(consolidated).to_pandas()
            return pd.DataFrame()
        frames: list[pd.DataFrame] = []
        for key in sorted(units):
            path = units[key]
            if path.suffix != _PART_SUFFIX:
                continue
            try:
                frame = pq.read_table(path).to_pandas()
            except (OSError, pa.ArrowException) as exc:
                raise RunError(
                    f"unit file {path} is unreadable ({exc}); delete it and rerun to recompute it"
                ) from exc
            if with_key:
                frame.insert(0, "_key", pd.Series([key] * len(frame), dtype=object))
            frames.append(frame)
        return _concat(frames)

    def consolidate(self, table: str, sort_by: list[str] | None = None) -> Path:
        """Write ``<root>/<table>.parquet`` from the current parts, atomically and
        deterministically.

        Rows are in :meth:`table` order, or stably sorted by ``sort_by``. Identical
        content gives a byte-identical file (fixed writer options, no index metadata).
        """
        df = self.table(table)
        if sort_by:
            missing = [c for c in sort_by if c not in df.columns]
            if missing:
                raise ValueError(f"cannot sort {table} by missing columns {missing}")
            df = df.sort_values(list(sort_by), kind="mergesort", ignore_index=True)
        else:
            df = df.reset_index(drop=True)
        out = self.root / f"{table}{_PART_SUFFIX}"
        arrow = _frame_to_arrow(df)
        _atomic_write(out, lambda p: _write_parquet(arrow, p), fsync=self.fsync)
        logger.info("consolidated %s: %d rows -> %s", table, len(df), out)
        return out

    # ---------------------------------------------------------------- SQL
    def query(self, sql: str) -> pd.DataFrame:
        """Run one read-only DuckDB statement in which every table of the run is a view of
        the same name.

        A table is read from its current parts (the source of truth) when it has any, otherwise
        from its consolidated ``<table>.parquet``. Tables whose units are all empty
        (no columns) have no view. Only queries run: ``SELECT`` (with ``WITH``, ``DESCRIBE``,
        ``SHOW``, ``SUMMARIZE``, ``FROM ...``) and ``EXPLAIN`` of one; anything else
        (``COPY``, ``ATTACH``, ``CREATE``, ``INSERT``, ``SET``, ``INSTALL`` ...) is a
        :class:`RunError`. Once the views exist the connection reads no file outside the
        run directory and its configuration is locked.
        """
        import duckdb

        def refused(statement: Any) -> str | None:
            """The type of a statement that is not a query (None: a query). ``EXPLAIN`` is a
            query when what it explains is one (``EXPLAIN ANALYZE`` runs it)."""
            if statement.type == duckdb.StatementType.SELECT:
                return None
            if statement.type != duckdb.StatementType.EXPLAIN:
                return str(statement.type.name)
            inner = re.fullmatch(r"\s*explain\s+(?:analy[sz]e\s+)?(.*)", statement.query,
                                 flags=re.IGNORECASE | re.DOTALL)
            try:
                explained = duckdb.extract_statements(inner.group(1)) if inner else []
            except duckdb.Error:
                explained = []
            ok = len(explained) == 1 and refused(explained[0]) is None
            return None if ok else "EXPLAIN"

        try:
            statements = duckdb.extract_statements(sql)
        except duckdb.Error as exc:
            raise RunError(f"query failed: {exc}") from exc
        if len(statements) != 1:
            raise RunError(f"knowloc query runs one SQL statement (got {len(statements)})")
        kind = refused(statements[0])
        if kind:
            raise RunError(f"knowloc query is read-only: {kind} statements are refused "
                           "(use SELECT, WITH, DESCRIBE, SHOW, SUMMARIZE or EXPLAIN)")
        con = duckdb.connect(database=":memory:")
        try:
            views: list[str] = []
            for name in self.tables():
                files = sorted(str(p) for p in self._current_files(name).values()
                               if p.suffix == _PART_SUFFIX)
                if files:
                    source = "[" + ", ".join(_sql_str(f) for f in files) + "]"
                    con.execute(
                        f'CREATE VIEW "{name}" AS SELECT * FROM '
                        f"read_parquet({source}, union_by_name=true)"
                    )
                elif (self.root / f"{name}{_PART_SUFFIX}").exists() and \
                        self.current_keys(name) is None:
                    source = _sql_str(str(self.root / f"{name}{_PART_SUFFIX}"))
                    con.execute(f'CREATE VIEW "{name}" AS SELECT * FROM read_parquet({source})')
                else:
                    continue
                views.append(name)
            roots = dict.fromkeys(f"{r}{os.sep}" for r in (self.root.absolute(), self.root.resolve()))
            con.execute(f"SET allowed_directories = [{', '.join(map(_sql_str, roots))}]")
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
            try:
                return con.execute(sql).fetchdf()
            except duckdb.Error as exc:
                raise RunError(
                    f"query failed: {exc}\n(tables in {self.root}: {', '.join(views) or 'none'})"
                ) from exc
        finally:
            con.close()


def _sql_str(text: str) -> str:
    """A single-quoted SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate parts; zero-row parts contribute columns but never change dtypes."""
    if not frames:
        return pd.DataFrame()
    columns: list[str] = []
    seen: set[str] = set()
    for frame in frames:
        for col in frame.columns:
            if col not in seen:
                seen.add(col)
                columns.append(col)
    nonempty = [f for f in frames if len(f)]
    if not nonempty:
        out = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
        return out.reindex(columns=columns).reset_index(drop=True)
    out = pd.concat(nonempty, ignore_index=True) if len(nonempty) > 1 else nonempty[0]
    if list(out.columns) != columns:
        out = out.reindex(columns=columns)
    return out.reset_index(drop=True)


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
