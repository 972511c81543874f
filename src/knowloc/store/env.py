"""What a run was computed with: knowloc's version, the machine and the software.

:func:`environment_info` is the record appended to a run's ``env.json`` at every invocation.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .io import to_plain

__all__ = ["environment_info", "knowloc_version"]

logger = logging.getLogger(__name__)

#: The packages whose versions :func:`environment_info` records.
PACKAGES = ("knowloc", "torch", "transformers", "numpy", "pandas", "pyarrow", "duckdb")


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
    package = Path(__file__).resolve().parents[1]  # .../knowloc (this file is knowloc/store/env.py)
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
        "packages": {name: _version(name) for name in PACKAGES},
        "cpu": {"name": _cpu_name(), "count": os.cpu_count()},
        "cuda": _cuda_info(probe_devices),
        "argv": list(sys.argv),
    }
    if extra:
        env.update(to_plain(extra))
    return env
