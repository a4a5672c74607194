"""What every benchmark script repeats: the CPU cores it may use, the environment a measurement ran in, and its
JSON output (written atomically, parent folders made, by :func:`detkit.utils.io.write_json`).

The scripts run as ``python benchmarks/<name>.py``, which puts this folder on ``sys.path``: ``import common``.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from detkit.utils.io import write_json

__all__ = ["cores", "cpu_name", "device_name", "environment", "write_json"]

ROOT = Path(__file__).resolve().parents[1]


def cores() -> int:
    """The CPU cores this process may use (its affinity mask; every core where the OS has none)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_name() -> str:
    """The CPU model (``model name`` of /proc/cpuinfo), else what :mod:`platform` knows."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def device_name(device: Any = "cpu") -> str:
    """The GPU's name for a CUDA device, else the CPU model."""
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return cpu_name()


def environment(device: Any = "cpu") -> dict[str, Any]:
    """Where a measurement ran: versions, CPU model, usable cores, torch threads, device, git commit and the load
    average (taken now: call it when the measurement ends)."""
    import torch
    import torchvision

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
            "cpu": cpu_name(), "cores": cores(), "threads": torch.get_num_threads(), "device": str(device),
            "device_name": device_name(device), "commit": commit,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
