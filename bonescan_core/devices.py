"""Which compute device training would use, found without importing TensorFlow.

Page loads call this, so it must be cheap: it asks ``nvidia-smi`` (present wherever an
NVIDIA driver is) and falls back to the CPU. The worker records the device TensorFlow
itself reports with each run.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess


def gpu_names(timeout_s: float = 3.0) -> list[str]:
    """Names of the NVIDIA GPUs the driver lists (empty without a GPU or driver).

    ``CUDA_VISIBLE_DEVICES=""`` (or ``-1``) hides them, as it would from TensorFlow.
    """
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return []
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return []
    try:
        result = subprocess.run(
            [executable, "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=timeout_s, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in result.stdout.splitlines() if line.strip()] if result.returncode == 0 else []


def describe() -> str:
    """One line for the sidebar, e.g. ``GPU: NVIDIA H100 80GB HBM3`` or ``CPU (2 cores, x86_64)``."""
    gpus = gpu_names()
    if gpus:
        return "GPU: " + ", ".join(gpus)
    return f"CPU ({os.cpu_count()} cores, {platform.machine()})"
