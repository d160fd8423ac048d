"""Subgroup metrics of a run (issue 11, point 4): AUC, sensitivity and specificity with patient-bootstrap
95% CIs by sex, age band, primary cancer and cohort (studies) and by view (images).

Each group is evaluated at the run's operating point: the study-level threshold for study
groups (``results["thresholds"]["study"]`` when the run stored one, else its threshold) and
the image-level threshold for views; an explicit threshold (``evaluate --threshold``)
replaces both. Values that are unknown (a manifest without sex, say) are left out; a
dimension with fewer than two known groups is not shown (nothing to compare). A group with
fewer than :data:`MIN_PER_CLASS` positive or negative units is still shown, marked
``small``: its intervals are wide and its AUC rests on a handful of cases. The view
dimension is skipped for runs with one output per study (``sample_unit`` ``study``: both
views carry the same probability).

``evaluate --json``'s ``"subgroups"`` is :func:`run_subgroups`; the Evaluate page draws it
with ``plots.subgroup_forest``. Only numpy and the run store are imported.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from bonescan_core import cohorts, evaluation, runs
from bonescan_core.heavy import sqlite_utils

MIN_PER_CLASS = 10
"""A group with fewer positive or fewer negative units than this is marked ``small``."""

STUDY_DIMENSIONS = ("sex", "age_band", "primary_cancer", "cohort")
"""Subgroup dimensions known per study (from ``patients`` and ``studies.cohort``)."""

DIMENSIONS = (*STUDY_DIMENSIONS, "view")
"""Every dimension, in display order; ``view`` is per image."""

METRICS = {"auc": "auc", "sensitivity": "recall", "specificity": "specificity"}
"""Reported name → name in ``evaluation.METRICS``."""


def _round(value: float) -> float | None:
    value = float(value)
    return None if math.isnan(value) else round(value, evaluation.ROUND_DIGITS)


def group_metrics(labels: np.ndarray, probabilities: np.ndarray, patients: np.ndarray, threshold: float,
                  n_resamples: int = 1000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """``{"auc"|"sensitivity"|"specificity": {"value", "ci95"}}`` of one group, CIs by patient bootstrap; None where undefined."""
    values = evaluation.point_metrics(labels, probabilities, threshold)
    intervals = evaluation.bootstrap_ci(labels, probabilities, patients, threshold, n_resamples=n_resamples, seed=seed)
    return {name: {"value": _round(values[key]), "ci95": [_round(v) for v in intervals[key]]} for name, key in METRICS.items()}


def subgroup_rows(by: str, values: np.ndarray, labels: np.ndarray, probabilities: np.ndarray, patients: np.ndarray,
                  threshold: float, unit: str, n_resamples: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    """One row per known value of a dimension (sorted), or [] when fewer than two values are known.

    Args:
        by: the dimension's name. values: (n,) object, the group of each unit (None: unknown).
        labels: (n,) 0/1. probabilities: (n,) in [0, 1]. patients: (n,) patient ids (bootstrap clusters).
        threshold: the operating point. unit: ``study`` or ``image``.

    Returns:
        ``[{"by", "group", "unit", "n", "n_positive", "n_negative", "small", "threshold", "metrics"}]``.
    """
    known = np.array([v is not None and v != "" for v in values], dtype=bool)
    groups = sorted({str(v) for v in values[known]})
    if len(groups) < 2:
        return []
    rows = []
    for group in groups:
        mask = known & np.array([str(v) == group for v in values], dtype=bool)
        y, p = labels[mask].astype(np.int64), probabilities[mask]
        positives, negatives = int(y.sum()), int((1 - y).sum())
        rows.append({
            "by": by, "group": group, "unit": unit, "n": int(mask.sum()), "n_positive": positives, "n_negative": negatives,
            "small": positives < MIN_PER_CLASS or negatives < MIN_PER_CLASS, "threshold": _round(threshold),
            "metrics": group_metrics(y, p, patients[mask], threshold, n_resamples, seed),
        })
    return rows


def study_attributes(db: sqlite_utils.Database, study_ids: np.ndarray) -> dict[str, np.ndarray]:
    """``{dimension: (n,) object}`` for :data:`STUDY_DIMENSIONS`, in the order of ``study_ids`` (None: unknown)."""
    wanted = [int(i) for i in study_ids]
    found: dict[int, tuple] = {}
    for start in range(0, len(wanted), 500):  # stay below SQLite's limit on bound parameters
        chunk = wanted[start:start + 500]
        marks = ",".join("?" * len(chunk))
        for row in db.execute(
            f"""SELECT s.id, p.sex, p.age_band, p.primary_cancer, s.cohort
                FROM studies s JOIN patients p ON p.id = s.patient_id WHERE s.id IN ({marks})""", chunk,
        ).fetchall():
            found[row[0]] = row[1:]
    return {name: np.array([found.get(i, (None,) * 4)[k] for i in wanted], dtype=object)
            for k, name in enumerate(STUDY_DIMENSIONS)}


def thresholds_of(run: runs.Run, threshold: float | None) -> tuple[float, float]:
    """(study threshold, image threshold): ``threshold`` for both when given, else the run's stored ones
    (``results["thresholds"]`` when present, else ``runs.threshold``, else 0.5)."""
    if threshold is not None:
        return float(threshold), float(threshold)
    stored = run.results.facts.get("thresholds") or {}
    base = run.threshold if run.threshold is not None else 0.5
    study, image = stored.get("study"), stored.get("image")
    return (float(study) if study is not None else float(base)), (float(image) if image is not None else float(base))


def run_subgroups(db: sqlite_utils.Database, run_id: int, threshold: float | None = None, subset: str = "test",
                  n_resamples: int = 1000, seed: int = 0, cohort: str | None = None) -> list[dict[str, Any]]:
    """Every subgroup row of a run on ``subset`` (:func:`subgroup_rows` per dimension, :data:`DIMENSIONS` order).

    Study dimensions use one row per study (``runs.study_predictions``: stored study rows, else the
    maximum over views); ``view`` uses the image predictions. Unlabelled (external) studies are left out;
    with ``cohort``, only that cohort's studies count (external validation).

    Raises:
        errors.RunNotFound: no such run.
    """
    run = runs.get(db, run_id)
    study_threshold, image_threshold = thresholds_of(run, threshold)
    studies = runs.study_predictions(db, run_id, subset)
    labelled = ~np.isnan(studies["label"]) & np.asarray(cohorts.in_cohort(db, studies["study_id"].tolist(), cohort), dtype=bool)
    rows: list[dict[str, Any]] = []
    if labelled.any():
        ids = studies["study_id"][labelled]
        attributes = study_attributes(db, ids)
        for by in STUDY_DIMENSIONS:
            rows += subgroup_rows(by, attributes[by], studies["label"][labelled], studies["probability"][labelled],
                                  studies["patient_id"][labelled], study_threshold, "study", n_resamples, seed)
    if run.results.facts.get("sample_unit", "image") == "image":
        images = runs.predictions(db, run_id, subset)
        keep = (images["label"] != runs.UNKNOWN_LABEL) & np.asarray(
            cohorts.in_cohort(db, images["study_id"].tolist(), cohort), dtype=bool)
        images = {key: values[keep] for key, values in images.items()}
        if images["label"].size:
            rows += subgroup_rows("view", images["view"], images["label"], images["probability"], images["patient_id"],
                                  image_threshold, "image", n_resamples, seed)
    return rows
