"""``python -m knowloc`` is the ``knowloc`` command."""

from __future__ import annotations

import subprocess
import sys

from knowloc.store import knowloc_version


def test_python_m_knowloc_runs_the_command() -> None:
    done = subprocess.run([sys.executable, "-m", "knowloc", "--version"], capture_output=True,
                          text=True, timeout=120, check=True)
    assert done.stdout.startswith(f"knowloc {knowloc_version()['version']}")
    done = subprocess.run([sys.executable, "-m", "knowloc", "no-such-command"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert done.stderr.startswith("usage: knowloc ")  # the command's name, not __main__.py
