"""What ``knowloc`` says while it runs: the stderr handler (warnings, and every stage's
summary line even with ``-q``), one-line errors, and the run directory's ``knowloc.log``."""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path
from typing import TextIO

log = logging.getLogger(__name__)


class _StderrFilter(logging.Filter):
    """Records at ``level`` or above, and the stages' summary lines (``extra={"summary":
    True}``, see :func:`knowloc.pipeline.units.run_units`) whatever the level; never the
    lines meant for the log file only (``extra={"log_only": True}``)."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "log_only", False):
            return False
        return record.levelno >= self.level or bool(getattr(record, "summary", False))


class _StderrFormatter(logging.Formatter):
    """Summary lines as they are; everything else as ``LEVEL logger: message``."""

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "summary", False) and record.levelno < logging.WARNING:
            return record.getMessage()
        return super().format(record)


class _LogFileFilter(logging.Filter):
    """knowloc's own records from INFO up, other libraries' warnings and errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.split(".")[0] == "knowloc"


def setup_logging(verbose: int) -> list[logging.Handler]:
    """One stderr handler on the root logger (the stages' summary lines at any verbosity),
    library warnings routed through logging (``logging.captureWarnings``); returns the
    handlers added, removed again by ``main``."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_StderrFormatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_StderrFilter(level))
    root = logging.getLogger()
    root.addHandler(handler)
    wanted = min(level, logging.INFO)  # summary lines and the log file are INFO
    root.setLevel(min(wanted, root.level) if root.level else wanted)
    logging.captureWarnings(True)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception as exc:  # noqa: BLE001 - quieting transformers is best effort
        log.debug("could not quiet transformers logging: %s", exc)
    return [handler]


#: The log of every command run on a run directory, appended per invocation.
LOG_FILE = "knowloc.log"


class _RunLogHandler(logging.Handler):
    """Appends to ``path``; records that come before its directory exists are held and
    written once it does (a command that fails before it makes the run directory leaves
    nothing behind).

    The log never gets in the way of the command: when the file cannot be opened or
    written (a full disk, a read-only or vanished directory), the handler keeps the first
    error in ``error``, closes the file and drops every later record, silently (a full
    disk's one-line error comes from the command itself; :func:`close_run_log` warns when
    the command succeeded but its log could not be written)."""

    def __init__(self, path: Path) -> None:
        super().__init__(logging.INFO)
        self.path = path
        self.held: list[logging.LogRecord] = []
        self.stream: TextIO | None = None
        self.error: OSError | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.error is not None:
            return
        try:
            if self.stream is None:
                if not self.path.parent.is_dir():
                    self.held.append(record)
                    return
                self.stream = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
                held, self.held = self.held, []
                for old in held:
                    self._write(old)
            self._write(record)
        except OSError as exc:
            self._give_up(exc)
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - a record that cannot be formatted (a bug)
            self.handleError(record)

    def _write(self, record: logging.LogRecord) -> None:
        assert self.stream is not None
        self.stream.write(self.format(record) + "\n")
        self.stream.flush()

    def _give_up(self, exc: OSError) -> None:
        """Stop writing the log after its first failure; close the file without a word
        (closing retries the failed flush)."""
        self.error = exc
        self.held = []
        stream, self.stream = self.stream, None
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass

    def close(self) -> None:
        stream, self.stream = self.stream, None
        if stream is not None:
            try:
                stream.close()
            except OSError as exc:
                self.error = self.error or exc
        super().close()


def open_run_log(args, run_dir: Path) -> None:
    """Append this invocation to ``run_dir/knowloc.log``: the command line, the time,
    knowloc's version and commit, torch/transformers versions and the model, then every
    knowloc log line from INFO up (the stages' summary lines among them), every warning,
    and the end. Once per invocation."""
    from ..store import environment_info

    if args.log_file is not None:
        return
    handler = _RunLogHandler(run_dir.expanduser() / LOG_FILE)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_LogFileFilter())
    logging.getLogger().addHandler(handler)
    args.log_file = handler
    env = environment_info(probe_devices=False)
    v = env["knowloc"]
    only = {"log_only": True}
    log.info("---- %s started %s", args.command, env["time"], extra=only)
    log.info("command: %s", shlex.join(str(a) for a in args.argv), extra=only)
    log.info("knowloc %s%s, torch %s, transformers %s, python %s on %s", v["version"],
             f" ({v['commit']})" if v["commit"] else "", env["packages"]["torch"],
             env["packages"]["transformers"], env["python"], env["hostname"], extra=only)
    if getattr(args, "model", None):
        log.info("model: %s (device %s, dtype %s)", args.model, args.device, args.dtype,
                 extra=only)


def close_run_log(args, status: int, seconds: float) -> None:
    handler = args.log_file
    if handler is None:
        return
    from datetime import datetime, timezone

    end = datetime.now(timezone.utc).isoformat(timespec="seconds")
    log.info("---- %s ended %s: exit status %d after %.1f s", args.command, end, status, seconds,
             extra={"log_only": True})
    logging.getLogger().removeHandler(handler)
    handler.close()
    args.log_file = None
    if handler.error is not None and status == 0:  # a failed command said what failed
        say(f"knowloc: warning: could not write {handler.path} "
            f"({handler.error.strerror or handler.error}); this command's log there is "
            f"incomplete")


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def one_line(exc: BaseException) -> str:
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def report_error(line: str) -> None:
    """The one line of an error on stderr, and in the run's log file when there is one."""
    print(line, file=sys.stderr)
    log.info("%s", line, extra={"log_only": True})
