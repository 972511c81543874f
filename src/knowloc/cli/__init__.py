"""``knowloc <stage>``: the command-line interface.

Errors a user can cause are printed as one line (no traceback) with a non-zero exit code.
The parsers are in :mod:`.parsers`, the option checks in :mod:`.checks`, ``--config`` in
:mod:`.config`, logging and the run log in :mod:`.logs`, the commands in :mod:`.commands`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import sys
import time
from collections.abc import Sequence

from ..errors import KnowlocError
from .checks import check_options
from .commands import COMMANDS
from .config import config_defaults
from .logs import close_run_log, one_line, report_error, setup_logging
from .parsers import build_parser, build_parsers

log = logging.getLogger(__name__)


#: OS errors a user's environment causes (permissions, read-only or full disks).
_ENV_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def main(argv: Sequence[str] | None = None) -> int:
    parser, subparsers = build_parsers()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    t0 = time.time()
    status = 2
    with contextlib.ExitStack() as resources:
        handlers = setup_logging(args.verbose)
        try:
            if getattr(args, "config", None) is not None:
                sub = subparsers[args.command]
                sub.set_defaults(**config_defaults(args.command, args.config, sub))
                args = parser.parse_args(argv)
            # the command line as a user reruns it (env.json, knowloc.log, 'finish it with')
            args.argv = ["knowloc", *argv]
            args.resources = resources  # closed when the command ends (executors)
            args.log_file = None
            check_options(args)
            status = COMMANDS[args.command](args)
        except KnowlocError as exc:
            status = exc.exit_code
            report_error(f"knowloc: error: {one_line(exc)}")
        except OSError as exc:
            if exc.errno not in _ENV_ERRNOS:
                raise
            status = 2
            where = f": {exc.filename}" if exc.filename is not None else ""
            report_error(f"knowloc: error: {exc.strerror or exc}{where}")
        except KeyboardInterrupt:
            status = 130
            report_error("knowloc: interrupted; rerun the same command to resume")
        finally:
            resources.close()  # executors first: their shutdown is logged too
            if getattr(args, "log_file", None) is not None:
                close_run_log(args, status, time.time() - t0)
            logging.captureWarnings(False)
            for handler in handlers:
                logging.getLogger().removeHandler(handler)
    return status


__all__ = ["COMMANDS", "build_parser", "config_defaults", "main"]
