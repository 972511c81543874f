"""The run lock: one process at a time computes in a run directory.

The lock is an operating-system file lock on ``<run>/.lock`` taken through the ``filelock``
library (``flock`` on Linux and macOS, ``LockFileEx``-style locking on Windows), so the
operating system releases it when the holding process dies, however it dies. Taking it
never waits: a second process gets :class:`~knowloc.errors.RunBusyError` at once.

While it holds the lock, the process records who it is in ``<run>/.lock.json`` (pid, host,
start time in UTC, command line), written atomically after the lock is taken and removed
before it is released. :meth:`RunLock.holder` reads that record without touching the lock,
so asking who computes in a run never disturbs the run or a process starting it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from ..errors import RunBusyError, RunError
from .io import write_json

__all__ = ["HOLDER_FILE", "LOCK_FILE", "RunLock"]

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
#: Who holds the lock: ``{"pid", "host", "since", "command", "process_start"}``.
HOLDER_FILE = ".lock.json"
#: The fields of the holder record that :meth:`RunLock.holder` reports.
HOLDER_FIELDS = ("pid", "host", "since", "command")
#: How long a process that finds the run busy waits for the holder's record to appear (it
#: is written just after the lock is taken), in seconds.
_HOLDER_WAIT_S = 1.0


class RunLock:
    """The lock of the run directory ``root``, re-entrant within a process.

    Nested :meth:`hold` calls on one object only count depth; a :meth:`hold` on another
    object of the same directory, in the process that holds the lock, runs inside the
    holder's lock (the holder record names this process) and does not release it.
    """

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = root
        self.fsync = fsync
        self.path = root / LOCK_FILE
        self.holder_path = root / HOLDER_FILE
        self._lock: FileLock | None = None
        self._depth = 0

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Hold the lock for the ``with`` block; RunBusyError at once when another process
        holds it."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        owned = self._acquire()
        self._depth = 1
        try:
            yield
        finally:
            self._depth = 0
            if owned:
                self._release()

    def holder(self) -> dict[str, Any] | None:
        """The live holder of the lock (``pid``, ``host``, ``since``: UTC ISO time,
        ``command``: its ``sys.argv``), or None when no process holds it.

        Read only: it reads the holder record and never takes the lock. A record of this
        host counts when its process still runs (a record left by a killed process does
        not); a record of another host is reported as it is, since its process cannot be
        checked from here.
        """
        info = _read_record(self.holder_path)
        if info is None:
            return None
        if info.get("host") == socket.gethostname() and not _running(info):
            return None
        return {k: info.get(k) for k in HOLDER_FIELDS}

    # ---------------------------------------------------------------- internals
    def _acquire(self) -> bool:
        """Take the lock: True when taken, False when this process already holds it through
        another :class:`RunLock` of the same directory."""
        lock = FileLock(str(self.path), timeout=0, thread_local=False)
        try:
            lock.acquire()
        except Timeout:
            self._check_writable()  # a lock file we cannot open is not "busy"
            info = self._wait_for_holder()
            if info is not None and _is_this_process(info):
                return False
            who = f" ({_describe(info)})" if info else ""
            raise RunBusyError(
                f"run directory {self.root} is busy: another knowloc process{who} is computing "
                "in it; wait for it to finish, then rerun to resume, or pick another --out"
            ) from None
        except OSError as exc:
            raise _unwritable(self.root, exc) from exc
        try:
            write_json(self.holder_path, _this_process(), indent=None, fsync=self.fsync)
        except BaseException:
            lock.release()
            raise
        self._lock = lock
        return True

    def _release(self) -> None:
        lock, self._lock = self._lock, None
        try:
            self.holder_path.unlink(missing_ok=True)
        except OSError as exc:
            logger.warning("cannot remove %s (%s)", self.holder_path, exc)
        if lock is not None:
            lock.release()

    def _check_writable(self) -> None:
        """Raise RunError when the lock file cannot be opened for writing (a read-only run
        directory): only opens it, which neither takes nor disturbs the lock."""
        try:
            os.close(os.open(self.path, os.O_RDWR))
        except FileNotFoundError as exc:  # could not be created, or its holder just removed it
            if not os.access(self.root, os.W_OK):
                raise _unwritable(self.root, exc) from exc
        except OSError as exc:
            raise _unwritable(self.root, exc) from exc

    def _wait_for_holder(self) -> dict[str, Any] | None:
        """The holder record, waiting briefly for a process that has just taken the lock to
        write it; the record as it is (maybe stale) when no live one appears."""
        deadline = time.monotonic() + _HOLDER_WAIT_S
        while True:
            info = _read_record(self.holder_path)
            if info is not None and (info.get("host") != socket.gethostname() or _running(info)):
                return info
            if time.monotonic() >= deadline:
                return info
            time.sleep(0.02)


# ------------------------------------------------------------------ the holder record


def _this_process() -> dict[str, Any]:
    pid = os.getpid()
    return {
        "pid": pid,
        "host": socket.gethostname(),
        "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": list(sys.argv),
        "process_start": _process_start(pid),
    }


def _read_record(path: Path) -> dict[str, Any] | None:
    """The holder record at ``path``; None when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("pid"), int):
        return None
    return data


def _unwritable(root: Path, exc: OSError) -> RunError:
    return RunError(f"cannot write in run directory {root} ({exc.strerror or exc}); "
                    "pick another --out")


def _describe(info: dict[str, Any]) -> str:
    return f"pid {info.get('pid')} on {info.get('host')}, since {info.get('since')}"


def _is_this_process(info: dict[str, Any]) -> bool:
    return (info.get("pid") == os.getpid() and info.get("host") == socket.gethostname()
            and info.get("process_start") == _process_start(os.getpid()))


def _running(info: dict[str, Any]) -> bool:
    """Whether the process of a holder record of this host still runs (and is the same
    process: on Linux its start time must match the record's, so a reused pid does not
    count)."""
    pid = int(info["pid"])
    if not _pid_alive(pid):
        return False
    recorded = info.get("process_start")
    return recorded is None or _process_start(pid) in (recorded, None)


def _process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (Linux ``/proc``); None
    elsewhere, or when the process is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    if len(fields) < 20 or fields[0] == "Z":
        return None
    try:
        return int(fields[19])
    except ValueError:
        return None


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (never signals it)."""
    if pid <= 0:
        return False
    if sys.platform == "win32":  # pragma: no cover - Windows
        import ctypes

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return bool(kernel32.GetLastError() == 5)  # ERROR_ACCESS_DENIED: it exists
        try:
            code = ctypes.c_ulong()
            if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
                return True
            return code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    if Path("/proc/self/stat").exists():  # Linux: a zombie has exited
        stat = Path(f"/proc/{pid}/stat")
        if not stat.exists():
            return False
        return _process_start(pid) is not None
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True
