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

from bonescan_core import calibration, errors, evaluation, external, subgroups
from bonescan_core.heavy import sqlite_utils
from bonescan_core.results import EvaluationResult


def evaluate(db: sqlite_utils.Database, run_id: int, threshold: float | None = None, subset: str = "test",
             n_resamples: int = 1000, seed: int = 0, cohort: str | None = None, **options: Any) -> EvaluationResult:
    """``evaluation.evaluate`` (same arguments; ``options`` are passed on) with
    ``calibration`` (``calibration.run_calibration`` on the subset's studies) and ``subgroups``
    (``subgroups.run_subgroups`` at ``threshold``, else the run's own thresholds) filled in.

    With ``cohort``: the same assessment of that cohort's external predictions
    (``external.evaluate_cohort``, always at the run's validation thresholds: ``threshold`` must
    be None), with its calibration, subgroups and Grad-CAM pointing game.

    Raises:
        What ``evaluation.evaluate`` (or ``external.evaluate_cohort``) raises (errors.RunNotFound,
        evaluation.NoPredictionsError, cohorts.CohortError).
    """
    if cohort is None:
        result = evaluation.evaluate(db, run_id, threshold=threshold, subset=subset, n_resamples=n_resamples, seed=seed,
                                     **options)
    else:
        if threshold is not None:
            raise errors.InputError("an external cohort is always assessed at the thresholds chosen on the run's "
                                    "validation set; leave out the threshold")
        result = external.evaluate_cohort(db, run_id, cohort, n_resamples=n_resamples, seed=seed, **options)
        subset, cohort = "external", result.cohort
        result = dataclasses.replace(result, localisation=evaluation.localisation_summary(
            db, run_id, result.level_threshold("study"), subset, cohort=cohort))
    return dataclasses.replace(
        result,
        calibration=calibration.run_calibration(db, run_id, subset, cohort=cohort),
        subgroups=subgroups.run_subgroups(db, run_id, threshold, subset, n_resamples, seed, cohort=cohort),
    )
