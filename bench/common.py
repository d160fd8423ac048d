"""What every benchmark line records about where it ran, and the summary statistics they share.

Imported by the scripts beside it (``python bench/X.py`` puts ``bench/`` on ``sys.path``).
Versions come from the installed distributions' metadata, so reading them imports nothing
heavy (no TensorFlow just to print its version).
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform

import numpy as np

DISTRIBUTIONS = ("keras", "tensorflow", "jax", "jaxlib", "numpy", "streamlit", "playwright")


def versions(names: tuple[str, ...] = DISTRIBUTIONS) -> dict[str, str | None]:
    """Installed version of each distribution, None where it is not installed."""
    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def image_size(text: str) -> tuple[int, int]:
    """An ``HxW`` argument (``646x220``, either case of x) as (height, width)."""
    height, width = (int(part) for part in text.lower().split("x"))
    return height, width


def environment(**extra: object) -> dict:
    """Machine, CPU count, Python, UTC date and library versions, plus ``extra`` fields."""
    return {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "versions": versions(), **extra}


def summary(values: list[float], digits: int = 3) -> dict:
    """n, p50, p95, mean, min and max of some timings (seconds)."""
    data = np.asarray(values, dtype=np.float64)
    return {"n": int(data.size), "p50": round(float(np.median(data)), digits),
            "p95": round(float(np.percentile(data, 95)), digits), "mean": round(float(data.mean()), digits),
            "min": round(float(data.min()), digits), "max": round(float(data.max()), digits)}
