"""What machine a measurement ran on, for the benchmark docs."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else whatever platform knows."""
    fallback = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # no /proc (not Linux)
        return fallback
    names = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
    return names[0] if names else fallback


def describe(gpu: bool = True) -> str:
    """CPU model, cores, the CUDA GPU if one is visible (``gpu``), OS and torch version, one line."""
    import torch  # noqa: PLC0415 - keeps cpu_name importable without torch

    parts = [cpu_name(), f"{os.cpu_count()} cores"]
    if gpu:
        parts.append(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA GPU")
    return ", ".join([*parts, f"{platform.system()} {platform.release()}", f"torch {torch.__version__}"])
