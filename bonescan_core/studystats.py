"""Study-level statistics (issue 11): units, threshold rules, clustered paired comparisons, calibration.

Pure functions over arrays; no database, no plotting. ``docs/statistics.md`` states every
method with its references, in words fit for a paper's methods section.

Conventions (as in :mod:`bonescan_core.evaluation`, whose helpers are reused here):

* The unit is the **study**: image-level rows are collapsed first with :func:`study_scores`,
  so a study written twice (composite runs store one study output once per image) counts
  once. Clusters are **patients**: the studies of one patient are correlated, so the
  bootstrap resamples patients and the DeLong variance is Obuchowski's clustered one.
* ``labels``: (n,) 0/1, 1 = metastatic; ``scores``/``probabilities``: (n,) float in [0, 1];
  a study is called metastatic when ``score >= threshold``.
* Undefined quantities are ``nan``; wrong input raises :class:`~bonescan_core.errors.InputError`.

Only numpy and the standard library are imported (as ``evaluation``), so that the CLI verbs
that will call this module keep their fast start; the tests check the results against
scikit-learn, scipy and statsmodels.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from bonescan_core.errors import InputError
from bonescan_core.evaluation import (  # noqa: F401 - the threshold rules are part of this module's API
    FIXED_THRESHOLD,
    TARGET_RULES,
    THRESHOLD_RULES,
    Threshold,
    bootstrap_weights,
    check_inputs,
    choose_threshold,
    holm,
    mcnemar,
    metrics_at_thresholds,
    midranks,
    safe_ratio,
    weighted_ranking_metrics,
    youden_threshold,
)

AGGREGATIONS = ("max", "mean")
"""How :func:`study_scores` collapses a study's image probabilities (``max`` is the default)."""

LOGIT_EPS = 1e-7
"""Probabilities are clipped to [eps, 1 - eps] before taking logits (stored float32 outputs reach 0 and 1)."""

TEMPERATURE_BOUNDS = (0.05, 20.0)
"""Search interval of :func:`fit_temperature`; a temperature outside it means the scores carry no usable signal."""

_BOOTSTRAP_CHUNK = 250
"""Resamples processed at once in :func:`paired_bootstrap` (bounds memory at about 250 x n x 8 bytes per array)."""


def _z(level: float) -> float:
    """Two-sided normal quantile for a coverage in (0, 1), e.g. 1.96 for 0.95."""
    if not 0.0 < level < 1.0:
        raise InputError(f"level must be within (0, 1), e.g. 0.95; got {level}")
    return statistics.NormalDist().inv_cdf(0.5 + level / 2.0)


def _inputs(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """:func:`evaluation.check_inputs` (labels (n,) int64 0/1, scores (n,) float64 in [0, 1]), its
    ValueError raised as this family's InputError so that the CLI reports it as a user error."""
    try:
        return check_inputs(labels, scores)
    except ValueError as error:
        raise InputError(str(error)) from error


def _ids(values: Any, n: int, name: str) -> np.ndarray:
    """A (n,) id array (any hashable dtype) checked against the sample count."""
    ids = np.asarray(values)
    if ids.shape != (n,):
        raise InputError(f"{name} must give one id per row ({n} rows); got shape {ids.shape}")
    return ids


# --- 1. the study as the unit ------------------------------------------------------------

def study_scores(study_ids: Any, probabilities: Any, how: str = "max") -> tuple[np.ndarray, np.ndarray]:
    """One probability per study from per-image (or per-image-duplicated) probabilities.

    ``max`` (the default): the most suspicious view decides, as a reader would; ``mean``: the
    average over the study's rows. For runs with one output per study that is stored once per
    image, every row of a study holds the same value, and both rules return that value, so
    the duplicates collapse to one study.

    Args:
        study_ids: (n,) study id of each row, any sortable dtype (int64 in the database).
        probabilities: (n,) float in [0, 1].
        how: ``"max"`` or ``"mean"``.

    Returns:
        ``(ids, scores)``: ids (s,) the sorted unique study ids (dtype of ``study_ids``);
        scores (s,) float64 in [0, 1], aligned with ids.

    Raises:
        InputError: unknown ``how``, or arrays of different lengths / out-of-range values.
    """
    if how not in AGGREGATIONS:
        raise InputError(f"study aggregation must be one of {', '.join(AGGREGATIONS)}; got {how!r}")
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 1:
        raise InputError(f"probabilities must be 1-D; got shape {p.shape}")
    if p.size and (not np.isfinite(p).all() or p.min() < 0.0 or p.max() > 1.0):
        raise InputError("probabilities must be finite and within [0, 1]")
    ids = _ids(study_ids, p.size, "study_ids")
    unique, index = np.unique(ids, return_inverse=True)
    index = index.ravel()
    if how == "max":
        scores = np.full(unique.size, -np.inf)
        np.maximum.at(scores, index, p)
    else:
        scores = np.bincount(index, weights=p, minlength=unique.size) / np.bincount(index, minlength=unique.size)
    return unique, scores


# --- 2. threshold rules on validation studies -------------------------------------------
# :func:`choose_threshold` (youden, sensitivity, npv, fixed) lives in ``evaluation``, beside the
# Youden threshold and the metric sweep it builds on, so that ``evaluation.evaluate`` can choose
# an older run's study threshold without importing this module (no import cycle); it is
# imported above and is this module's API as before.

# --- 3. paired patient-level bootstrap ---------------------------------------------------

def _bootstrap_p(deltas: np.ndarray) -> float:
    """Two-sided bootstrap p of H0: delta = 0 from resampled deltas (nan ones left out).

    p = 2 min(P*(delta* <= 0), P*(delta* >= 0)) with the Monte Carlo "+1" correction,
    P* = (1 + #) / (B + 1), capped at 1: the smallest alpha at which the percentile interval
    of level 1 - alpha excludes 0 (so p < 0.05 goes with a 95% interval excluding 0), and
    never 0 from a finite number of resamples.
    """
    valid = deltas[~np.isnan(deltas)]
    if valid.size == 0:
        return math.nan
    below = (1.0 + np.sum(valid <= 0.0)) / (valid.size + 1.0)
    above = (1.0 + np.sum(valid >= 0.0)) / (valid.size + 1.0)
    return float(min(1.0, 2.0 * min(below, above)))


def _percentile_ci(values: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile interval of the non-nan values; (nan, nan) when all are nan."""
    valid = values[~np.isnan(values)]
    if valid.size == 0:
        return (math.nan, math.nan)
    low, high = np.quantile(valid, [(1.0 - level) / 2.0, 1.0 - (1.0 - level) / 2.0])
    return (float(low), float(high))


def _sens_spec(y: np.ndarray, called: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted sensitivity and specificity per row of weights w (r, n); nan without positives/negatives."""
    yf, cf = y.astype(np.float64), called.astype(np.float64)
    sensitivity = safe_ratio(w @ (yf * cf), w @ yf)
    specificity = safe_ratio(w @ ((1 - yf) * (1 - cf)), w @ (1 - yf))
    return sensitivity, specificity


def paired_bootstrap(
    labels: Any,
    scores_a: Any,
    scores_b: Any,
    patient_ids: Any,
    threshold_a: float,
    threshold_b: float,
    n_resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Paired patient-level bootstrap of dAUC, dsensitivity, dspecificity (model a - model b).

    Each resample draws as many patients as there are, with replacement; every study of a
    drawn patient comes along (as often as the patient was drawn), and the SAME resample is
    scored for both models, so the correlation between the models is kept. Intervals are
    percentile intervals; p is two-sided, from the bootstrap distribution of the difference:
    p = 2 min(P*(d* <= 0), P*(d* >= 0)), with P* = (1 + count) / (B + 1) — the inversion of
    the percentile interval (Efron & Tibshirani 1993, An Introduction to the Bootstrap,
    ch. 13 and 16) with the Monte Carlo correction of Davison & Hinkley (1997), Bootstrap
    Methods and their Application, ch. 4. Resamples in which a quantity is undefined (no
    positive or no negative patient drawn) are left out of that quantity.

    Args:
        labels: (n,) 0/1 per study.
        scores_a, scores_b: (n,) the two models' study probabilities, same studies, same order.
        patient_ids: (n,) patient of each study (the cluster), any hashable dtype.
        threshold_a, threshold_b: each model's own (validation-chosen) threshold.
        n_resamples: B (>= 2000 for the issue's reporting), int >= 1.
        seed: seed of ``np.random.default_rng`` (via :func:`evaluation.bootstrap_weights`).
        level: coverage of the intervals.

    Returns:
        ``{"delta_auc", "delta_sensitivity", "delta_specificity"}``, each ``{"value": a - b,
        "ci95": (low, high), "p", "a", "b", "n_valid" (resamples where defined)}``; plus
        ``"n_studies", "n_patients", "n_resamples", "seed", "method"``. Floats; nan where undefined.
    """
    y, pa = _inputs(labels, scores_a)
    _, pb = _inputs(labels, scores_b)
    if pa.shape != pb.shape:
        raise InputError("scores_a and scores_b must score the same studies")
    patients = _ids(patient_ids, y.size, "patient_ids")
    if n_resamples < 1:
        raise InputError(f"n_resamples must be at least 1 (2000 for reporting); got {n_resamples}")
    _z(level)  # validates level
    called_a, called_b = pa >= threshold_a, pb >= threshold_b
    yf = y.astype(np.float64)

    def deltas(w: np.ndarray) -> dict[str, np.ndarray]:
        auc_a, _ = weighted_ranking_metrics(yf, pa, w)
        auc_b, _ = weighted_ranking_metrics(yf, pb, w)
        sens_a, spec_a = _sens_spec(y, called_a, w)
        sens_b, spec_b = _sens_spec(y, called_b, w)
        return {"delta_auc": (auc_a, auc_b), "delta_sensitivity": (sens_a, sens_b), "delta_specificity": (spec_a, spec_b)}

    point = deltas(np.ones((1, y.size)))
    weights = bootstrap_weights(patients, n_resamples, seed)
    chunks = [deltas(weights[start:start + _BOOTSTRAP_CHUNK].astype(np.float64)) for start in range(0, n_resamples, _BOOTSTRAP_CHUNK)]
    out: dict[str, Any] = {}
    for name, (a, b) in point.items():
        resampled = np.concatenate([chunk[name][0] - chunk[name][1] for chunk in chunks])
        out[name] = {
            "value": float(a[0] - b[0]),
            "ci95": _percentile_ci(resampled, level),
            "p": _bootstrap_p(resampled),
            "a": float(a[0]),
            "b": float(b[0]),
            "n_valid": int(np.sum(~np.isnan(resampled))),
        }
    out.update(
        n_studies=int(y.size), n_patients=int(np.unique(patients).size), n_resamples=int(n_resamples), seed=seed,
        method="paired patient-level bootstrap, percentile interval, p = 2 min(P(d*<=0), P(d*>=0))",
    )
    return out


# --- 4. clustered DeLong (Obuchowski 1997) ----------------------------------------------

def clustered_delong(labels: Any, scores_a: Any, scores_b: Any, cluster_ids: Any, level: float = 0.95) -> dict[str, Any]:
    """Difference of two correlated AUCs on clustered data: Obuchowski's (1997) variance.

    Why both this and :func:`evaluation.delong` exist: DeLong et al. (1988) assume every
    unit independent; with several studies per patient the placement values of one patient
    are correlated and DeLong's variance is too small. Obuchowski, "Nonparametric analysis of
    clustered ROC curve data", Biometrics 53:567-578 (1997), sums the placement values per
    cluster i (V10_i over its m_i positive studies, V01_i over its n_i negative ones) and
    estimates, for models a and b (M, N = positive/negative studies; I clusters, I10/I01 the
    clusters with at least one positive/negative study)::

        S10[a,b] = I10 / ((I10 - 1) M) * sum_i (V10_ia - m_i AUC_a)(V10_ib - m_i AUC_b)
        S01[a,b] = I01 / ((I01 - 1) N) * sum_i (V01_ia - n_i AUC_a)(V01_ib - n_i AUC_b)
        S11[a,b] = I / (I - 1)         * sum_i (V10_ia - m_i AUC_a)(V01_ib - n_i AUC_b)
        Cov[a,b] = S10/M + S01/N + (S11[a,b] + S11[b,a]) / (M N)

    Var(AUC_a - AUC_b) = Cov[a,a] + Cov[b,b] - 2 Cov[a,b]. With one study per cluster,
    I10 = M, I01 = N and S11 = 0, and this is exactly DeLong's estimator (the tests check it
    to 1e-10). Placement values come from midranks (ties count one half), as in ``delong``.

    Args:
        labels: (n,) 0/1 per study.
        scores_a, scores_b: (n,) the two models' scores on the same studies.
        cluster_ids: (n,) patient of each study, any hashable dtype.
        level: coverage of the normal-approximation interval.

    Returns:
        ``{"auc_a", "auc_b", "delta" (auc_a - auc_b), "se", "z", "p" (two-sided normal),
        "ci95": (low, high), "n_clusters"}``; nan where undefined (one class; fewer than two
        clusters with a positive or with a negative). Identical rankings (variance 0, delta
        0): z 0, p 1.
    """
    y, pa = _inputs(labels, scores_a)
    _, pb = _inputs(labels, scores_b)
    clusters = _ids(cluster_ids, y.size, "cluster_ids")
    z_level = _z(level)
    _, cluster = np.unique(clusters, return_inverse=True)
    cluster = cluster.ravel()
    n_clusters = int(cluster.max()) + 1 if cluster.size else 0
    nan = math.nan
    m, k = int(y.sum()), int(y.size - y.sum())
    undefined = {"auc_a": nan, "auc_b": nan, "delta": nan, "se": nan, "z": nan, "p": nan, "ci95": (nan, nan), "n_clusters": n_clusters}
    if m == 0 or k == 0:
        return undefined
    scores = np.stack([pa, pb])
    positives, negatives = scores[:, y == 1], scores[:, y == 0]
    rank_all = midranks(np.concatenate([positives, negatives], axis=1))
    auc = (rank_all[:, :m].sum(axis=1) - m * (m + 1) / 2.0) / (m * k)
    v10 = (rank_all[:, :m] - midranks(positives)) / k  # (2, m): share of negatives below each positive
    v01 = 1.0 - (rank_all[:, m:] - midranks(negatives)) / m  # (2, k): share of positives above each negative
    c_pos, c_neg = cluster[y == 1], cluster[y == 0]
    m_i = np.bincount(c_pos, minlength=n_clusters).astype(np.float64)
    n_i = np.bincount(c_neg, minlength=n_clusters).astype(np.float64)
    x = np.stack([np.bincount(c_pos, weights=v10[j], minlength=n_clusters) for j in range(2)]) - m_i * auc[:, None]
    w = np.stack([np.bincount(c_neg, weights=v01[j], minlength=n_clusters) for j in range(2)]) - n_i * auc[:, None]
    delta = float(auc[0] - auc[1])
    out = {**undefined, "auc_a": float(auc[0]), "auc_b": float(auc[1]), "delta": delta}
    i10, i01 = int(np.sum(m_i > 0)), int(np.sum(n_i > 0))
    if i10 < 2 or i01 < 2:
        return out
    s10 = i10 / ((i10 - 1) * m) * (x @ x.T)
    s01 = i01 / ((i01 - 1) * k) * (w @ w.T)
    s11 = n_clusters / (n_clusters - 1) * (x @ w.T)
    covariance = s10 / m + s01 / k + (s11 + s11.T) / (m * k)
    variance = float(covariance[0, 0] + covariance[1, 1] - 2.0 * covariance[0, 1])
    if variance <= 1e-15:  # identical rankings up to rounding
        if abs(delta) < 1e-12:
            return {**out, "se": 0.0, "z": 0.0, "p": 1.0, "ci95": (0.0, 0.0)}
        return out
    se = math.sqrt(variance)
    z = delta / se
    return {**out, "se": se, "z": z, "p": math.erfc(abs(z) / math.sqrt(2.0)), "ci95": (delta - z_level * se, delta + z_level * se)}


# --- 5. McNemar on studies, Holm over everything shown ----------------------------------

def mcnemar_studies(labels: Any, scores_a: Any, scores_b: Any, threshold_a: float, threshold_b: float) -> dict[str, Any]:
    """McNemar's test on studies, each model at its own threshold (:func:`evaluation.mcnemar`).

    Exact two-sided binomial below 25 discordant studies, continuity-corrected chi-square
    above. It treats studies as independent pairs; the studies of one patient are not, which
    ``docs/statistics.md`` states as a limitation (the bootstrap of dsensitivity/dspecificity
    is the clustered counterpart).

    Returns:
        ``{"b" (only a right), "c" (only b right), "p", "statistic", "method"}``.
    """
    y, pa = _inputs(labels, scores_a)
    _, pb = _inputs(labels, scores_b)
    result = mcnemar(y, pa >= threshold_a, pb >= threshold_b)
    return {"b": result["b"], "c": result["c"], "p": result["p_value"], "statistic": result["statistic"], "method": result["method"]}


def add_holm(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Holm-adjust every p shown together: returns copies of ``results`` with ``"p_holm"`` added.

    Pass every result that carries a ``"p"`` and appears in one table or JSON object (all
    pairs' dAUC, dsensitivity, dspecificity and McNemar), so the family is what the reader
    sees. nan p stays nan and does not count in the family (:func:`evaluation.holm`).
    """
    adjusted = holm([float(r["p"]) for r in results])
    return [{**r, "p_holm": p} for r, p in zip(results, adjusted, strict=True)]


# --- 6. calibration ----------------------------------------------------------------------

def logit(probabilities: Any, eps: float = LOGIT_EPS) -> np.ndarray:
    """log(p / (1 - p)) of (n,) probabilities clipped to [eps, 1 - eps]; (n,) float64."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), eps, 1.0 - eps)
    return np.log(p) - np.log1p(-p)


def apply_temperature(logits: Any, temperature: float) -> np.ndarray:
    """Calibrated probabilities sigmoid(logit / T); (n,) float64 in (0, 1)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # = 1 / (1 + exp(-z)), without overflow


def _log_loss(y: np.ndarray, z: np.ndarray) -> float:
    """Mean binary cross-entropy of logits z: log(1 + e^z) - y z, computed stably."""
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def _validation_labels_and_logits(labels: Any, logits: Any, method: str) -> tuple[np.ndarray, np.ndarray]:
    """(y, z) as float64 (n,) arrays, or InputError naming ``method`` when they cannot be fitted."""
    y = np.asarray(labels, dtype=np.float64)
    z = np.asarray(logits, dtype=np.float64)
    if y.ndim != 1 or y.shape != z.shape or y.size == 0 or not np.isfinite(z).all():
        raise InputError("labels and logits must be non-empty, 1-D, equally long and finite")
    if not np.isin(y, (0.0, 1.0)).all() or y.min() == y.max():
        raise InputError(f"{method} needs 0/1 validation labels of both classes")
    return y, z


def fit_temperature(labels: Any, logits: Any, bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """Temperature scaling (Guo et al. 2017): the T minimising validation log loss of sigmoid(z / T).

    A golden-section search on log T over ``bounds``: the loss is convex in 1/T, hence
    unimodal in log T, so the search finds the minimum (to ~1e-9 relative) or the bound
    it lies beyond. T > 1 softens over-confident outputs. Temperature scaling keeps the
    ranking (AUC) and the log-odds' sign; it does not remove a constant shift of the
    log-odds (e.g. from class weights), for which see :func:`calibration_intercept_slope`.

    Args:
        labels: (n,) 0/1 validation labels (studies), both classes present.
        logits: (n,) float64 logits (e.g. :func:`logit` of stored probabilities).
        bounds: (low, high) of T, 0 < low < high.

    Returns:
        T, a float within ``bounds``.
    """
    y, z = _validation_labels_and_logits(labels, logits, "temperature scaling")
    low, high = math.log(bounds[0]), math.log(bounds[1])
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = low + (1 - ratio) * (high - low), low + ratio * (high - low)
    fa, fb = _log_loss(y, z / math.exp(a)), _log_loss(y, z / math.exp(b))
    while high - low > 1e-10:
        if fa <= fb:
            high, b, fb = b, a, fa
            a = low + (1 - ratio) * (high - low)
            fa = _log_loss(y, z / math.exp(a))
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = _log_loss(y, z / math.exp(b))
    return float(math.exp((low + high) / 2.0))


class Platt(NamedTuple):
    """Platt scaling on the logit: calibrated probability = sigmoid(intercept + slope * logit)."""

    intercept: float
    slope: float


def fit_platt(labels: Any, logits: Any) -> Platt:
    """Platt scaling (Platt 1999) on validation logits: logistic regression y ~ a + b z.

    Unlike temperature scaling it also removes a constant shift of the log-odds, which a
    class-weighted loss introduces (weights w1/w0 shift the logit by about log(w1/w0)); it keeps
    the ranking when b > 0. The fitted (a, b) are the calibration intercept and slope of the
    one-step logistic recalibration in :func:`calibration_intercept_slope`'s slope model.

    Args:
        labels: (n,) 0/1 validation labels, both classes present.
        logits: (n,) finite float64 logits.

    Returns:
        :class:`Platt` (intercept a, slope b), floats; nan when the data are perfectly
        separated (the maximum-likelihood fit does not exist).
    """
    y, z = _validation_labels_and_logits(labels, logits, "Platt scaling")
    beta, _ = _logistic_fit(y, np.column_stack([np.ones_like(z), z]), np.zeros_like(z))
    return Platt(float(beta[0]), float(beta[1]))


def apply_platt(logits: Any, platt: Platt) -> np.ndarray:
    """Calibrated probabilities sigmoid(a + b z); (n,) float64 in (0, 1)."""
    z = platt.intercept + platt.slope * np.asarray(logits, dtype=np.float64)
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def apply_calibration(calibration: Mapping[str, Any] | None, raw_probabilities: Any) -> np.ndarray:
    """A run's stored calibration applied to raw model probabilities: the one way every caller
    (training, prediction on new studies, the standalone model) turns raw outputs into
    calibrated ones.

    Args:
        calibration: ``None`` or ``{"method": "none"}`` (identity);
            ``{"method": "temperature", "temperature": T}``;
            ``{"method": "platt", "intercept": a, "slope": b}`` (as stored in a run's results).
        raw_probabilities: (n,) float in [0, 1].

    Returns:
        (n,) float64 in [0, 1] (a copy; the input is not changed).

    Raises:
        InputError: an unknown method.
    """
    p = np.asarray(raw_probabilities, dtype=np.float64).copy()
    method = (calibration or {}).get("method", "none")
    if method == "none":
        return p
    if method == "temperature":
        return apply_temperature(logit(p), float(calibration["temperature"]))
    if method == "platt":
        return apply_platt(logit(p), Platt(float(calibration["intercept"]), float(calibration["slope"])))
    raise InputError(f"unknown calibration method {method!r} (known: none, temperature, platt)")


def ece_equal_mass(labels: Any, probabilities: Any, n_bins: int = 10) -> dict[str, Any]:
    """Expected calibration error over equal-mass bins (each holds n / n_bins samples, +-1).

    Samples are ordered by probability (ties by label, so the result does not depend on the
    input order) and split into ``n_bins`` consecutive groups of (nearly) equal size;
    ECE = sum_bins (n_bin / n) |mean(label) - mean(probability)|. Equal-mass bins avoid the
    empty or tiny bins of equal-width ones where a model's outputs crowd near 0 or 1
    (Nixon et al. 2019, "Measuring calibration in deep learning").

    Args:
        labels: (n,) 0/1. probabilities: (n,) in [0, 1]. n_bins: >= 1 (fewer bins when n < n_bins).

    Returns:
        ``{"ece": float (nan when n == 0), "mean_predicted", "observed": (b,) float64,
        "count": (b,) int64}`` per non-empty bin, in increasing probability (the
        reliability diagram's points).
    """
    y, p = _inputs(labels, probabilities)
    if n_bins < 1:
        raise InputError(f"n_bins must be at least 1; got {n_bins}")
    order = np.lexsort((y, p))
    groups = [g for g in np.array_split(order, n_bins) if g.size]
    count = np.array([g.size for g in groups], dtype=np.int64)
    predicted = np.array([p[g].mean() for g in groups], dtype=np.float64)
    observed = np.array([y[g].mean() for g in groups], dtype=np.float64)
    ece = float(np.sum(count * np.abs(observed - predicted)) / y.size) if y.size else math.nan
    return {"ece": ece, "mean_predicted": predicted, "observed": observed, "count": count}


def _logistic_fit(y: np.ndarray, x: np.ndarray, offset: np.ndarray, max_iter: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-likelihood logistic regression y ~ x @ beta + offset by Newton's method.

    Args:
        y: (n,) 0/1 float. x: (n, q) design. offset: (n,) fixed log-odds term.

    Returns:
        (beta (q,), covariance (q, q) = inverse Fisher information); all nan when the fit
        does not converge (e.g. perfectly separated data, where the MLE is infinite).
    """
    beta = np.zeros(x.shape[1])
    failed = (np.full(x.shape[1], np.nan), np.full((x.shape[1], x.shape[1]), np.nan))
    for _ in range(max_iter):
        eta = x @ beta + offset
        mu = 0.5 * (1.0 + np.tanh(0.5 * eta))
        information = x.T @ (x * (mu * (1.0 - mu))[:, None])
        try:
            step = np.linalg.solve(information, x.T @ (y - mu))
        except np.linalg.LinAlgError:
            return failed
        beta = beta + step
        if not np.isfinite(beta).all() or np.abs(beta).max() > 1e6:
            return failed
        if np.abs(step).max() < 1e-11:
            mu = 0.5 * (1.0 + np.tanh(0.5 * (x @ beta + offset)))
            information = x.T @ (x * (mu * (1.0 - mu))[:, None])
            try:
                return beta, np.linalg.inv(information)
            except np.linalg.LinAlgError:
                return failed
    return failed


def calibration_intercept_slope(labels: Any, probabilities: Any, level: float = 0.95) -> dict[str, Any]:
    """Calibration intercept and slope by logistic recalibration (Cox 1958; Van Calster et al. 2016).

    With z = logit(p): the **slope** is b in logit P(y=1) = a + b z (1 is ideal; < 1 means
    over-confident, too extreme predictions); the **intercept** (calibration-in-the-large)
    is a in logit P(y=1) = a + z, i.e. with the slope fixed at 1 as an offset (0 is ideal;
    > 0 means risks are underestimated on average). Wald intervals: estimate +- z_level * SE,
    SE from the inverse Fisher information at the maximum-likelihood fit.

    Args:
        labels: (n,) 0/1. probabilities: (n,) in [0, 1], clipped to [1e-7, 1 - 1e-7] for the logit.
        level: coverage of the intervals.

    Returns:
        ``{"intercept": {"value", "se", "ci95"}, "slope": {"value", "se", "ci95"}, "n"}``;
        nan when a fit does not exist (one class, or perfect separation).
    """
    y, p = _inputs(labels, probabilities)
    z_level = _z(level)
    nan_part = {"value": math.nan, "se": math.nan, "ci95": (math.nan, math.nan)}
    if y.size == 0 or y.min() == y.max():
        return {"intercept": dict(nan_part), "slope": dict(nan_part), "n": int(y.size)}
    yf, z = y.astype(np.float64), logit(p)

    def part(value: float, variance: float) -> dict[str, Any]:
        if math.isnan(value):
            return dict(nan_part)
        se = math.sqrt(variance)
        return {"value": value, "se": se, "ci95": (value - z_level * se, value + z_level * se)}

    beta, cov = _logistic_fit(yf, np.column_stack([np.ones_like(z), z]), np.zeros_like(z))
    alpha, alpha_cov = _logistic_fit(yf, np.ones((z.size, 1)), z)
    return {
        "intercept": part(float(alpha[0]), float(alpha_cov[0, 0])),
        "slope": part(float(beta[1]), float(cov[1, 1])),
        "n": int(y.size),
    }


def decision_curve(labels: Any, probabilities: Any, thresholds: Any) -> dict[str, np.ndarray]:
    """Net benefit across threshold probabilities (Vickers & Elkin 2006), with treat-all and treat-none.

    At threshold probability t (a study is treated as metastatic when p >= t), with n
    studies: NB(t) = TP/n - FP/n * t / (1 - t); treat-all: prevalence - (1 - prevalence) *
    t / (1 - t); treat-none: 0. The weight t / (1 - t) is the harm of a false positive
    relative to the benefit of a true positive implied by choosing t.

    Args:
        labels: (n,) 0/1, n >= 1. probabilities: (n,) in [0, 1].
        thresholds: (t,) threshold probabilities in [0, 1).

    Returns:
        ``{"threshold", "net_benefit", "treat_all", "treat_none"}``: (t,) float64 each.
    """
    y, p = _inputs(labels, probabilities)
    t = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
    if y.size == 0:
        raise InputError("a decision curve needs at least one study")
    if t.size and (not np.isfinite(t).all() or t.min() < 0.0 or t.max() >= 1.0):
        raise InputError("decision-curve thresholds must lie within [0, 1), e.g. 0.05 to 0.5")
    counts = metrics_at_thresholds(y, p, t)
    odds = t / (1.0 - t)
    n, prevalence = float(y.size), float(y.mean())
    return {
        "threshold": t,
        "net_benefit": counts["tp"] / n - counts["fp"] / n * odds,
        "treat_all": prevalence - (1.0 - prevalence) * odds,
        "treat_none": np.zeros_like(t),
    }
