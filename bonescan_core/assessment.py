"""One run's full assessment: ``evaluation.evaluate`` plus the calibration and the subgroups of its test studies.

What ``evaluate --json``, the Evaluate page, the report and a bundle's ``metrics.json`` show.
It lives apart from :mod:`bonescan_core.evaluation` because :mod:`bonescan_core.calibration`
builds on :mod:`bonescan_core.studystats`, which imports ``evaluation``'s helpers: composing
them here keeps the imports one-way. Only numpy-level modules are imported (no Keras, no
plotting), so ``bonescan evaluate`` keeps its fast start.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from bonescan_core import calibration, evaluation, subgroups
from bonescan_core.heavy import sqlite_utils
from bonescan_core.results import EvaluationResult


def evaluate(db: sqlite_utils.Database, run_id: int, threshold: float | None = None, subset: str = "test",
             n_resamples: int = 1000, seed: int = 0, **options: Any) -> EvaluationResult:
    """``evaluation.evaluate`` (same arguments; ``options`` are passed on) with
    ``calibration`` (``calibration.run_calibration`` on the subset's studies) and ``subgroups``
    (``subgroups.run_subgroups`` at ``threshold``, else the run's own thresholds) filled in.

    Raises:
        What ``evaluation.evaluate`` raises (errors.RunNotFound, evaluation.NoPredictionsError).
    """
    result = evaluation.evaluate(db, run_id, threshold=threshold, subset=subset, n_resamples=n_resamples, seed=seed,
                                 **options)
    return dataclasses.replace(
        result,
        calibration=calibration.run_calibration(db, run_id, subset),
        subgroups=subgroups.run_subgroups(db, run_id, threshold, subset, n_resamples, seed),
    )
