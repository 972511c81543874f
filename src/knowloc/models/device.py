"""Where and in what precision a model runs: devices, dtypes, and whether this CPU
multiplies bfloat16 matrices at full speed."""

from __future__ import annotations

import functools
import logging
import os
import platform
import subprocess

import torch

from ..errors import DeviceError

log = logging.getLogger(__name__)

__all__ = ["BF16_ENV", "BF16_SLOWDOWN", "DTYPES", "cpu_has_bf16", "resolve_device",
           "resolve_dtype", "warn_slow_bf16"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: Environment variable that overrides :func:`cpu_has_bf16`: ``1`` (fast bfloat16) or ``0``.
BF16_ENV = "KNOWLOC_CPU_BF16"

#: How much slower a bfloat16 model runs than float32 on a CPU without bfloat16 matrix
#: kernels. Measured on an x86 CPU limited to AVX2 (oneDNN's ``ONEDNN_MAX_CPU_ISA=AVX2``),
#: an IG attribution of Gemma 3 270M took 5.7 times float32's CPU time on one thread (10.5
#: times before the fused head multiplied in float32), and more on two threads: PyTorch's
#: bfloat16 fallback does not use the second core. The backward product through a linear
#: layer (gradient @ weight) is the slowest: 100 times float32's, so larger models lose more.
BF16_SLOWDOWN = "5 to 10 times"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The torch device for ``device``: ``None``/``"auto"`` is CUDA when available, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {str(device)!r}; use cpu or cuda (e.g. cuda:0)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            "CUDA was requested (--device cuda) but no CUDA device is available; "
            "use --device cpu"
        )
    if dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"unsupported device {str(device)!r}; use cpu or cuda")
    return dev


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The torch dtype for a name of :data:`DTYPES` (a ``torch.dtype`` passes through)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype)]
    except KeyError:
        raise DeviceError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}") from None


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices at full speed.

    True where PyTorch's oneDNN kernels take bfloat16 (x86 with AVX-512: native
    ``avx512_bf16``/``amx_bf16`` or AVX-512 emulation; ARM with the BF16 extension). On a
    CPU with AVX2 only, a bfloat16 matrix product falls back to a generic loop that is 10 to
    100 times slower than float32's. Where PyTorch cannot say, the CPU's flags decide
    (``/proc/cpuinfo`` on Linux, ``hw.optional.arm.FEAT_BF16`` on macOS); anywhere else the
    answer is False (the conservative side: float32 is never slow).

    The environment variable ``KNOWLOC_CPU_BF16`` overrides the detection: ``1`` means
    fast bfloat16, ``0`` means none (read on every call; the detection itself runs once).
    """
    override = os.environ.get(BF16_ENV, "").strip()
    if override in ("0", "1"):
        return override == "1"
    return _detect_cpu_bf16()


@functools.cache
def _detect_cpu_bf16() -> bool:
    try:
        if torch.backends.mkldnn.is_available():
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError) as exc:  # a private op: gone in some version
        log.debug("torch cannot tell whether the CPU has bfloat16 kernels: %s", exc)
    system = platform.system()
    if system == "Linux":
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
                for line in handle:
                    key, _, value = line.partition(":")
                    if key.strip().lower() in ("flags", "features"):
                        flags = set(value.split())
                        return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
        except OSError:
            return False
        return False
    if system == "Darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"],
                                 capture_output=True, text=True, timeout=5, check=False)
        except (OSError, subprocess.SubprocessError):
            return False
        return out.stdout.strip() == "1"
    return False


def warn_slow_bf16(device: torch.device, dtype: torch.dtype) -> bool:
    """Log one warning when a bfloat16 model runs on a CPU without bfloat16 kernels
    (:func:`cpu_has_bf16`); returns whether it warned."""
    if dtype != torch.bfloat16 or device.type != "cpu" or cpu_has_bf16():
        return False
    log.warning(
        "this CPU has no bfloat16 matrix instructions: a bfloat16 model runs %s slower "
        "than float32 here (more for large models); float32 is the better choice on this machine (--dtype float32)",
        BF16_SLOWDOWN)
    return True
