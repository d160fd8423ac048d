"""Latency benchmark: the interactive computations whose speed the design relies on, and the
offline ImageNet failure. These were wall-clock assertions in the test suite; the tests now
check behaviour only, and the times are measured here. One JSON line per measurement:
``summary`` (n, p50, p95, mean, min, max seconds over the repeats), ``goal_s`` and ``goal_met``
(p50 <= goal), plus where it ran.

* ``threshold_sweep``: ``evaluation.metrics_at_thresholds`` of 2,000 images at 1,001
  thresholds (what the Evaluate page's threshold slider needs). Goal: 0.2 s.
* ``bootstrap``: ``evaluation.bootstrap_ci`` with 1,000 patient resamples of 200 images
  (two per patient), after one warm-up call. Goal: 1 s.
* ``offline_imagenet``: ``models.build_model(..., "imagenet")`` on a machine with no internet
  and an empty Keras cache, until it raises ``WeightsUnavailable`` (the real DNS + connect
  probe, bounded by ``models.PROBE_TIMEOUT_S``). Goal: 10 s. Where the weights' host is
  reachable the failure cannot be observed: the line says ``"online": true`` and has no times.

    python bench/latency.py            # 20 repeats of the first two, 3 of the third
    python bench/latency.py --quick    # 5 and 1

Timings, never assertions: nothing in the test suite checks them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from common import environment, summary

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def timed(run: Callable[[], object], repeats: int) -> list[float]:
    """Wall seconds of each of ``repeats`` calls of ``run``."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return times


def emit(measure: str, goal_s: float, times: list[float] | None, **fields: object) -> None:
    line: dict[str, object] = {"bench": "latency", "measure": measure, "goal_s": goal_s, **fields}
    if times:
        line["summary"] = summary(times)
        line["goal_met"] = bool(np.median(times) <= goal_s)
    print(json.dumps({**line, **environment()}), flush=True)


def random_case(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels (n,) int 0/1, probabilities (n,) float64 in [0, 1]) from a seeded generator."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 2, n), rng.random(n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    repeats, probe_repeats = (5, 1) if args.quick else (20, 3)

    from bonescan_core import evaluation as ev

    y, p = random_case(0, 2000)
    thresholds = np.linspace(0.0, 1.0, 1001)
    emit("threshold_sweep", 0.2, timed(lambda: ev.metrics_at_thresholds(y, p, thresholds), repeats),
         images=2000, thresholds=1001)

    y, p = random_case(2, 200)
    groups = np.arange(200) // 2
    ev.bootstrap_ci(y, p, groups, 0.5, n_resamples=50)  # warm-up
    emit("bootstrap", 1.0, timed(lambda: ev.bootstrap_ci(y, p, groups, 0.5, n_resamples=1000, seed=0), repeats),
         images=200, patients=100, resamples=1000)

    from bonescan_core import models

    backbone = models.BACKBONES["resnet50"]
    if models._reachable(backbone.imagenet_url, models.PROBE_TIMEOUT_S):  # noqa: SLF001 - the probe under test
        emit("offline_imagenet", 10.0, None, online=True)
        return
    with tempfile.TemporaryDirectory() as home:
        os.environ["KERAS_HOME"] = home  # an empty cache: the weights must come from the network

        def fail() -> None:
            try:
                models.build_model("resnet50", "imagenet", (128, 64))
            except models.WeightsUnavailable:
                return
            raise RuntimeError("build_model did not fail although the weights' host is unreachable")

        emit("offline_imagenet", 10.0, timed(fail, probe_repeats), online=False, probe_timeout_s=models.PROBE_TIMEOUT_S)


if __name__ == "__main__":
    main()
