"""Calibration of a run's probabilities: fitted on validation after training, reported on test studies.

Two halves (issue 11, point 3; methods in ``docs/statistics.md``):

* **Fitting** (:func:`fit`, called by ``training.train_run`` right after the raw validation
  and test predictions): temperature scaling (default) or Platt scaling on the VALIDATION
  samples' logits only (images for per-image runs, studies for composites). The fitted
  parameters are stored in the run's results as ``results["calibration"]`` (e.g.
  ``{"method": "temperature", "temperature": 1.8}``) and applied with
  ``studystats.apply_calibration`` to validation and test predictions; the stored
  ``probability`` is the calibrated one and ``raw_probability`` the model's output. A
  validation subset with one class, or whose classes the model separates completely (the
  maximum-likelihood fit does not exist), gets ``{"method": "none", "requested": ...}`` and a
  note instead.
* **Reporting** (:func:`run_calibration`, in ``evaluate --json``'s ``"calibration"``, the
  Evaluate page's panel and the report): on the test studies (one row per study,
  ``runs.study_predictions``), the equal-mass ECE before and after calibration and the
  calibration intercept and slope with 95% Wald intervals; :func:`reliability` and
  :func:`decision` give the points of the reliability diagram (raw vs calibrated) and of
  the decision curve.

Only numpy, the run store and ``studystats`` are imported (no Keras, no scikit-learn).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from bonescan_core import cohorts, runs, studystats
from bonescan_core.errors import InputError
from bonescan_core.heavy import sqlite_utils

METHODS = runs.CALIBRATION_METHODS
"""``temperature`` (default), ``platt`` or ``none``."""

N_BINS = 10
"""Equal-mass bins of the ECE and of the reliability diagram."""

DECISION_THRESHOLDS = np.round(np.arange(0.01, 0.951, 0.01), 2)
"""Threshold probabilities of the decision curve: 0.01 to 0.95 in steps of 0.01."""

ROUND_DIGITS = 4


def _round(value: float) -> float | None:
    value = float(value)
    return None if math.isnan(value) else round(value, ROUND_DIGITS)


def fit(method: str, labels: Any, raw_probabilities: Any) -> tuple[dict[str, Any], str | None]:
    """Fit ``method`` on validation labels and raw probabilities.

    Args:
        method: one of :data:`METHODS`.
        labels: (n,) 0/1 validation labels (images, or studies for one-output-per-study runs).
        raw_probabilities: (n,) the model's validation outputs in [0, 1].

    Returns:
        (calibration, note): ``calibration`` is what ``studystats.apply_calibration`` takes and
        the run stores (``{"method": "temperature", "temperature": T}``,
        ``{"method": "platt", "intercept": a, "slope": b}`` or ``{"method": "none"}``, the
        last with ``"requested"`` when a fit fell back); ``note`` says why it fell back, else None.

    Raises:
        InputError: unknown method.
    """
    if method not in METHODS:
        raise InputError(f"calibration must be one of {', '.join(METHODS)}; got {method!r}")
    if method == "none":
        return {"method": "none"}, None
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    z = studystats.logit(raw_probabilities)

    def fallback(reason: str) -> tuple[dict[str, Any], str]:
        return ({"method": "none", "requested": method},
                f"calibration: {method} scaling was not fitted ({reason}); probabilities are the model's raw outputs")

    if y.size == 0 or y.min() == y.max():
        return fallback("the validation subset holds one class")
    if z[y == 0].max() < z[y == 1].min():
        return fallback("the model separates the validation classes completely, so no finite fit exists")
    if method == "temperature":
        temperature = studystats.fit_temperature(y, z)
        low, high = studystats.TEMPERATURE_BOUNDS
        if not low * (1 + 1e-6) < temperature < high * (1 - 1e-6):
            return fallback(f"the temperature ran to the search bound {temperature:.3g}")
        return {"method": "temperature", "temperature": float(temperature)}, None
    platt = studystats.fit_platt(y, z)
    if not (math.isfinite(platt.intercept) and math.isfinite(platt.slope)) or platt.slope <= 0:
        return fallback("the logistic fit did not converge to a positive slope")
    return {"method": "platt", "intercept": float(platt.intercept), "slope": float(platt.slope)}, None


def calibrated_subsets(calibration: Mapping[str, Any] | None,
                       raw: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``{subset: (n,) calibrated probabilities}`` for every subset of ``raw`` (the one way: ``apply_calibration``)."""
    return {subset: studystats.apply_calibration(calibration, values) for subset, values in raw.items()}


def summary(labels: Any, probabilities: Any, raw_probabilities: Any, calibration: Mapping[str, Any] | None,
            level: float = 0.95) -> dict[str, Any]:
    """Calibration of one set of studies, JSON-ready (``evaluate --json``'s ``"calibration"``).

    Args:
        labels: (n,) 0/1. probabilities: (n,) calibrated (as stored). raw_probabilities: (n,)
            before calibration (equal to ``probabilities`` for an uncalibrated run).
        calibration: the run's stored ``results["calibration"]`` (None: the run predates it).

    Returns:
        ``{"method", "temperature", "ece", "ece_raw", "intercept", "intercept_ci95", "slope",
        "slope_ci95", "n", "n_bins", "fitted"}``: ``method`` the calibration applied (``none``
        when not), ``temperature`` T or None, ``ece``/``ece_raw`` the equal-mass ECE after and
        before calibration, intercept and slope (of the calibrated probabilities) with Wald
        95% intervals, ``fitted`` the stored parameters; values rounded to 4 decimals, None
        where undefined (one class, perfect separation).
    """
    method = (calibration or {}).get("method", "none")
    y = np.asarray(labels, dtype=np.float64)
    fitted = studystats.calibration_intercept_slope(y, probabilities, level=level)
    return {
        "method": method,
        "temperature": _round(calibration["temperature"]) if method == "temperature" else None,
        "ece": _round(studystats.ece_equal_mass(y, probabilities, N_BINS)["ece"]),
        "ece_raw": _round(studystats.ece_equal_mass(y, raw_probabilities, N_BINS)["ece"]),
        "intercept": _round(fitted["intercept"]["value"]),
        "intercept_ci95": [_round(v) for v in fitted["intercept"]["ci95"]],
        "slope": _round(fitted["slope"]["value"]),
        "slope_ci95": [_round(v) for v in fitted["slope"]["ci95"]],
        "n": int(y.size), "n_bins": N_BINS,
        "fitted": dict(calibration) if calibration else None,
    }


def summary_text(summary_: dict[str, Any], population: str = "Test studies") -> str:
    """:func:`summary` in one sentence (the Evaluate page's panel, the report), e.g. "Fitted on
    validation: temperature, T = 1.62. Test studies (n = 86): ECE 0.050 (raw 0.110), intercept
    -0.08 (95% CI -0.50 to 0.34), slope 0.93 (95% CI 0.61 to 1.25). Ideal: intercept 0, slope 1.".
    ``population`` names the studies it was measured on (e.g. "Cohort B studies" for an external one)."""
    def number(value: float | None, digits: int) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    def interval(values: list[float | None]) -> str:
        return "" if None in values else f" (95% CI {values[0]:.2f} to {values[1]:.2f})"

    method = summary_["method"] + (f", T = {summary_['temperature']:.2f}" if summary_.get("temperature") else "")
    return (f"Fitted on validation: {method}. {population} (n = {summary_['n']}): ECE {number(summary_['ece'], 3)} "
            f"(raw {number(summary_['ece_raw'], 3)}), intercept {number(summary_['intercept'], 2)}"
            f"{interval(summary_['intercept_ci95'])}, slope {number(summary_['slope'], 2)}{interval(summary_['slope_ci95'])}. "
            "Ideal: intercept 0, slope 1.")


def _test_studies(db: sqlite_utils.Database, run_id: int, subset: str, cohort: str | None = None) -> dict[str, np.ndarray]:
    """The run's labelled studies of ``subset`` (one row per study, ``runs.study_predictions``),
    of one cohort when ``cohort`` is given (external validation)."""
    studies = runs.study_predictions(db, run_id, subset)
    keep = ~np.isnan(studies["label"]) & np.asarray(cohorts.in_cohort(db, studies["study_id"].tolist(), cohort), dtype=bool)
    return {key: values[keep] for key, values in studies.items()}


def run_calibration(db: sqlite_utils.Database, run_id: int, subset: str = "test", cohort: str | None = None) -> dict[str, Any] | None:
    """:func:`summary` of a stored run on the studies of ``subset`` (of ``cohort`` only, when
    given); None when it has none there."""
    studies = _test_studies(db, run_id, subset, cohort)
    if studies["label"].size == 0:
        return None
    facts = runs.get(db, run_id).results.facts
    stored = facts.get("study_calibration") or facts.get("calibration")  # studies have their own fit
    return summary(studies["label"], studies["probability"], studies["raw_probability"], stored)


def reliability(labels: Any, probabilities: Any, raw_probabilities: Any) -> dict[str, dict[str, np.ndarray]]:
    """Points of the reliability diagram before and after calibration (equal-mass bins).

    Returns:
        ``{"raw": ..., "calibrated": ...}``, each ``studystats.ece_equal_mass``'s
        ``{"ece", "mean_predicted", "observed", "count"}``.
    """
    return {"raw": studystats.ece_equal_mass(labels, raw_probabilities, N_BINS),
            "calibrated": studystats.ece_equal_mass(labels, probabilities, N_BINS)}


def decision(labels: Any, probabilities: Any) -> dict[str, np.ndarray]:
    """``studystats.decision_curve`` over :data:`DECISION_THRESHOLDS` (net benefit, treat-all, treat-none)."""
    return studystats.decision_curve(labels, probabilities, DECISION_THRESHOLDS)


def run_curves(db: sqlite_utils.Database, run_id: int, subset: str = "test") -> dict[str, Any] | None:
    """The reliability diagram's and the decision curve's points for a stored run's studies of ``subset``.

    Returns:
        ``{"reliability": :func:`reliability`, "decision": :func:`decision`, "n_studies"}``,
        or None when the run has no labelled studies there.
    """
    studies = _test_studies(db, run_id, subset)
    if studies["label"].size == 0:
        return None
    return {"reliability": reliability(studies["label"], studies["probability"], studies["raw_probability"]),
            "decision": decision(studies["label"], studies["probability"]),
            "n_studies": int(studies["label"].size)}
