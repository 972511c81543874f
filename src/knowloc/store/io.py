"""I/O primitives: the one atomic write, canonical content hashing and file hashing.

Every file knowloc writes goes through :func:`atomic_write`: the content is written to a
hidden temporary sibling (``.<name>.<pid>.<random>.tmp``), flushed to disk, and moved over
the target with :func:`os.replace`, so a reader (or a process killed at any point) sees
either the old file or the complete new one, never a half-written one. Text is always
UTF-8 with ``\\n`` line endings, whatever the platform or locale.

This module imports neither pandas nor torch, so the model code can use it cheaply.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import json
import logging
import os
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["TMP_SUFFIX", "atomic_write", "atomic_write_bytes", "atomic_write_text",
           "content_hash", "file_sha256", "to_plain", "write_csv", "write_json"]

logger = logging.getLogger(__name__)

#: Suffix of the temporary files of :func:`atomic_write` (readers skip such files).
TMP_SUFFIX = ".tmp"
#: The file in knowloc's cache directory that keeps :func:`file_sha256`'s digests.
HASH_CACHE_FILE = "file-sha256.json"

PathLike = str | os.PathLike[str]


# ------------------------------------------------------------------------ atomic writes


def tmp_path(path: Path) -> Path:
    """A unique temporary sibling of ``path`` (hidden, ends with :data:`TMP_SUFFIX`)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")


def atomic_write(path: PathLike, write_fn: Callable[[Path], object], *,
                 fsync: bool = True) -> Path:
    """Write ``path`` through ``write_fn(tmp)`` and :func:`os.replace`: it appears complete
    or not at all.

    ``write_fn`` receives a temporary path in the same folder (created when missing) and
    writes the whole file there. With ``fsync`` the file is flushed to disk before it is
    moved into place (it survives a power loss, not only a killed process). If ``write_fn``
    or the move raises, the temporary file is removed, ``path`` keeps its old content, and
    the exception propagates.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(target)
    try:
        write_fn(tmp)
        if fsync:
            fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise
    return target


def atomic_write_bytes(path: PathLike, data: bytes, *, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda p: p.write_bytes(data), fsync=fsync)


def atomic_write_text(path: PathLike, text: str, *, fsync: bool = True) -> Path:
    """Write ``text`` to ``path`` atomically as UTF-8, its ``\\n`` kept as they are (no
    platform newline translation)."""
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def write_json(path: PathLike, obj: Any, *, indent: int | None = 2, sort_keys: bool = False,
               ensure_ascii: bool = False, fsync: bool = True) -> Path:
    """Write the JSON-able ``obj`` to ``path`` atomically: ``json.dumps`` text (NaN allowed)
    and a final newline, UTF-8."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=ensure_ascii,
                      allow_nan=True)
    return atomic_write_text(path, text + "\n", fsync=fsync)


def write_csv(path: PathLike, df: pd.DataFrame, *, index: bool = False, fsync: bool = True,
              **to_csv: Any) -> Path:
    """Write ``df`` to ``path`` atomically with :meth:`pandas.DataFrame.to_csv` (no index
    column unless ``index``), UTF-8 with ``\\n`` line endings on every platform. Other
    keyword arguments go to ``to_csv``."""
    options = {"encoding": "utf-8", "lineterminator": "\n", **to_csv}
    return atomic_write(path, lambda p: df.to_csv(p, index=index, **options), fsync=fsync)


# ------------------------------------------------------------------------------ hashing


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


def canonical_json(obj: Any) -> str:
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
    digest = hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()
    return digest[:length]


def file_sha256(path: PathLike) -> str:
    """The sha256 of a file, computed once per (path, size, mtime).

    Digests are kept for this process and in ``file-sha256.json`` in knowloc's cache
    directory (:func:`knowloc.embedded.cache_dir`), so hashing a model's weights again, here
    or in a later process, costs nothing until the file changes.
    """
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return _file_digest(str(resolved), stat.st_size, stat.st_mtime_ns)


def cache_dir() -> Path:
    """Root of knowloc's cache: ``$KNOWLOC_CACHE`` if set, else ``~/.cache/knowloc`` (the
    embedded models' converted weights, the weights digest cache)."""
    env = os.environ.get("KNOWLOC_CACHE", "").strip()
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "knowloc"


@functools.lru_cache(maxsize=1024)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """The digest of the file ``path`` as it is at ``size`` and ``mtime_ns``: read from the
    digest cache file, or computed and added to it (memoized for this process)."""
    cache_path = cache_dir() / HASH_CACHE_FILE
    cache = _read_hash_cache(cache_path)
    text_key = f"{path}|{size}|{mtime_ns}"
    digest = cache.get(text_key)
    if isinstance(digest, str):
        return digest
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    digest = sha.hexdigest()
    cache = {k: v for k, v in cache.items() if _still_there(k)}
    cache[text_key] = digest
    try:
        atomic_write_text(cache_path, json.dumps(cache, indent=0, sort_keys=True), fsync=False)
    except OSError as exc:  # a cache that cannot be written is only logged
        logger.debug("cannot write the weights digest cache %s: %s", cache_path, exc)
    return digest


def _read_hash_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _still_there(text_key: str) -> bool:
    """Whether a digest cache entry ``path|size|mtime_ns`` still names the file as it is."""
    path, _, rest = text_key.partition("|")
    try:
        stat = os.stat(path)
    except OSError:
        return False
    return rest == f"{stat.st_size}|{stat.st_mtime_ns}"
