"""The run log (``knowloc.log``) on a full disk: the command's one-line error and nothing
else; a log that cannot be written never adds a traceback."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from knowloc.cli import main
from knowloc.cli.logs import LOG_FILE, _RunLogHandler

DEV_FULL = Path("/dev/full")  # every write fails with ENOSPC (Linux)
needs_dev_full = pytest.mark.skipif(not DEV_FULL.exists(), reason="needs /dev/full")


def full_log(run: Path) -> None:
    """Make ``run``'s log a file on a full device."""
    (run / LOG_FILE).unlink(missing_ok=True)
    (run / LOG_FILE).symlink_to(DEV_FULL)


@needs_dev_full
def test_a_log_that_cannot_be_written_is_dropped_without_a_word(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    full_log(run)
    handler = _RunLogHandler(run / LOG_FILE)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("knowloc.test_logs")
    logger.addHandler(handler)
    try:
        for i in range(3):
            logger.warning("line %d", i)
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert handler.error is not None and handler.error.errno == errno.ENOSPC
    assert handler.stream is None
    assert capsys.readouterr().err == ""


def test_records_before_the_directory_exists_are_held_then_written(tmp_path):
    handler = _RunLogHandler(tmp_path / "run" / LOG_FILE)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for msg in ("one", "two"):
        handler.handle(logging.LogRecord("knowloc", logging.INFO, __file__, 1, msg, None, None))
    assert not (tmp_path / "run").exists()
    (tmp_path / "run").mkdir()
    handler.handle(logging.LogRecord("knowloc", logging.INFO, __file__, 1, "three", None, None))
    handler.close()
    assert (tmp_path / "run" / LOG_FILE).read_text(encoding="utf-8") == "one\ntwo\nthree\n"


@needs_dev_full
def test_out_of_disk_space_is_one_line(run, capsys, monkeypatch):
    """The disk is full: the run's files and its log cannot be written. One line, exit 2
    (the log's handler used to add "--- Logging error ---" and a traceback per record)."""
    full_log(run)
    replace = os.replace

    def full_disk(src, dst, *args, **kwargs):
        if Path(dst).resolve().is_relative_to(run.resolve()):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src))
        return replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", full_disk)
    capsys.readouterr()
    rc = main(["-q", "consistency", "--run", str(run), "--population", "known"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("knowloc: error: No space left on device: "), err


@needs_dev_full
def test_a_command_that_succeeds_says_once_that_its_log_was_not_written(run, capsys):
    full_log(run)
    capsys.readouterr()
    assert main(["-q", "consistency", "--run", str(run), "--population", "known"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Logging error" not in err
    warnings = [line for line in err.splitlines() if line.startswith("knowloc: warning:")]
    expected = (f"knowloc: warning: could not write {run / LOG_FILE} (No space left on "
                "device); this command's log there is incomplete")
    assert warnings == [expected]


def _mount_tmpfs(where: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, check=False)
    return done.returncode == 0


def test_a_really_full_disk_is_one_line(localized, tmp_path, capsys):
    """On a real full file system (a small tmpfs, where this test may mount one): the run is
    copied there, the rest of the disk filled, and ``consistency`` fails to write."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "16m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        run = disk / "run"
        shutil.copytree(localized, run)
        log = run / LOG_FILE
        pad = (-log.stat().st_size) % 4096 or 4096  # the log's last page full: a new line needs
        with log.open("a", encoding="utf-8") as f:  # a new page
            f.write("#" * (pad - 1) + "\n")
        with (disk / "filler").open("wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
        capsys.readouterr()
        rc = main(["-q", "consistency", "--run", str(run), "--population", "known"])
        err = capsys.readouterr().err
        assert rc == 2
        assert err.count("\n") == 1 and err.startswith("knowloc: error: "), err
        assert "No space left on device" in err
    finally:
        subprocess.run(["umount", str(disk)], check=False)
