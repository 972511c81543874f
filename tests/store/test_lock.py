"""The run lock: one process computes in a run; who holds it is readable without the lock."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from knowloc.errors import RunBusyError, RunError
from knowloc.store import HOLDER_FILE, RunStore

#: Takes the run's lock, says "locked", releases it on a line from stdin, says "released",
#: then waits for one more line before it exits.
HOLDER = textwrap.dedent(
    """
    import sys
    from knowloc.store import RunStore

    store = RunStore(sys.argv[1])
    with store.lock():
        print("locked", flush=True)
        sys.stdin.readline()
    print("released", flush=True)
    sys.stdin.readline()
    """
)

#: Tries to take the run's lock once; prints "busy <message>" or "took".
TAKER = textwrap.dedent(
    """
    import sys, time
    from knowloc.errors import RunBusyError
    from knowloc.store import RunStore

    start = time.monotonic()
    try:
        with RunStore(sys.argv[1]).lock():
            print("took", flush=True)
    except RunBusyError as exc:
        print(f"busy {time.monotonic() - start:.3f} {exc}", flush=True)
    """
)


def _start_holder(run: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run), "extra-arg"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _say(proc: subprocess.Popen[str], expect: str) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == expect


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _take(run: Path) -> str:
    return subprocess.run([sys.executable, "-c", TAKER, str(run)], capture_output=True,
                          text=True, timeout=120, check=True).stdout.strip()


def test_another_process_finds_the_run_busy_at_once_and_sees_its_holder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    store = RunStore(run)
    assert store.holder() is None
    before = datetime.now(timezone.utc).replace(microsecond=0)
    proc = _start_holder(run)
    try:
        # another process: busy at once, the message names the holder
        out = _take(run)
        assert out.startswith("busy "), out
        seconds = float(out.split()[1])
        assert seconds < 0.5
        assert f"pid {proc.pid} on {socket.gethostname()}" in out
        assert "is busy: another knowloc process" in out
        # this process (not the holder) reads who holds it
        held = store.holder()
        assert held is not None
        assert held["pid"] == proc.pid
        assert held["host"] == socket.gethostname()
        since = datetime.fromisoformat(held["since"])
        assert since.tzinfo is not None and since.utcoffset() == timedelta(0)
        assert before <= since <= datetime.now(timezone.utc)
        assert held["command"] == ["-c", str(run), "extra-arg"]  # the holder's sys.argv
        assert set(held) == {"pid", "host", "since", "command"}
        with pytest.raises(RunBusyError, match=f"pid {proc.pid} "), store.lock():
            pass
        _say(proc, "released")  # the holder is still alive, but holds nothing
        assert store.holder() is None
        assert not (run / HOLDER_FILE).exists()
        assert _take(run) == "took"
    finally:
        _stop(proc)


def test_a_killed_holder_leaves_no_holder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _start_holder(run)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (run / HOLDER_FILE).exists()  # its record stays behind ...
    store = RunStore(run)
    assert store.holder() is None  # ... but names a process that is gone
    with store.lock():  # the operating system released the lock
        assert store.holder()["pid"] == os.getpid()  # type: ignore[index]
    assert store.holder() is None


def test_holder_never_takes_the_lock(tmp_path: Path) -> None:
    """A process asking who holds the run, over and over, never makes a process that
    takes the lock fail."""
    run = tmp_path / "run"
    store = RunStore(run)
    stop = tmp_path / "stop"
    watcher = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent("""
            import os, sys
            from knowloc.store import RunStore
            store = RunStore(sys.argv[1], create=False)
            print("ready", flush=True)
            seen = 0
            while not os.path.exists(sys.argv[2]):
                seen += store.holder() is not None
            print(seen, flush=True)
            """), str(run), str(stop)], stdout=subprocess.PIPE, text=True)
    try:
        assert watcher.stdout is not None
        assert watcher.stdout.readline().strip() == "ready"
        taken = 0
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            with store.lock():  # never RunBusyError
                taken += 1
                time.sleep(0.002)
        stop.touch()
        seen = int(watcher.communicate(timeout=60)[0].strip())
    finally:
        _stop(watcher)
    assert taken > 10 and seen > 0


def test_the_lock_is_reentrant_within_a_process(tmp_path: Path) -> None:
    run = tmp_path / "run"
    outer, other = RunStore(run), RunStore(run)
    with outer.lock():
        with outer.lock():  # the same object
            with other.lock():  # another object of the same directory
                assert other.holder()["pid"] == os.getpid()  # type: ignore[index]
            assert _take(run).startswith("busy")  # the inner exits released nothing
        assert outer.holder()["pid"] == os.getpid()  # type: ignore[index]
        assert _take(run).startswith("busy")
    assert outer.holder() is None
    assert _take(run) == "took"
    with other.lock():  # the other object takes it on its own afterwards
        assert _take(run).startswith("busy")


def test_a_record_of_another_host_is_reported_as_it_is(tmp_path: Path) -> None:
    run = tmp_path / "run"
    record = {"pid": 1, "host": "some-other-host", "since": "2026-01-02T03:04:05+00:00",
              "command": ["knowloc", "localize"], "process_start": 5}
    (run / HOLDER_FILE).parent.mkdir(parents=True)
    (run / HOLDER_FILE).write_text(json.dumps(record), encoding="utf-8")
    assert RunStore(run).holder() == {k: record[k] for k in ("pid", "host", "since", "command")}


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_a_reused_pid_is_not_a_holder(tmp_path: Path) -> None:
    """A record whose pid now belongs to another process (another start time) is stale."""
    run = tmp_path / "run"
    store = RunStore(run)
    with store.lock():
        record = json.loads((run / HOLDER_FILE).read_text(encoding="utf-8"))
    record["process_start"] -= 1  # the same pid, started at another time
    (run / HOLDER_FILE).write_text(json.dumps(record), encoding="utf-8")
    assert store.holder() is None


def test_a_lock_file_that_cannot_be_opened_is_an_error_not_busy(tmp_path: Path) -> None:
    run = tmp_path / "run"
    store = RunStore(run)
    (run / ".lock").mkdir()  # as unwritable as a read-only directory, even for root
    with pytest.raises(RunError, match="cannot write in run directory") as err, store.lock():
        pass
    assert not isinstance(err.value, RunBusyError)
