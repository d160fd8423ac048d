"""Metrics, confidence intervals, thresholds and paired tests over stored predictions.

No plotting here (see ``plots.py``); everything takes and returns plain arrays and dicts,
except :func:`evaluate`, which returns a typed ``results.EvaluationResult``.

Conventions used throughout:

* ``labels``: (n,) 0/1 (1 = metastatic); ``probabilities``: (n,) floats in [0, 1], the
  model's probability of metastasis. A sample is predicted metastatic when
  ``probability >= threshold``.
* A metric that is undefined on the data at hand (precision with no positive prediction,
  AUC with one class, ...) is ``nan``, never an exception; :func:`evaluate` turns it into
  ``None`` (JSON ``null``).
* Confidence intervals come from a cluster bootstrap over *patients*: images of one patient
  (both views, follow-up studies) are correlated, and resampling images as if independent
  would make the intervals too narrow.

Implementation: every metric and curve is computed here with numpy, from one sort of the
scores, with exactly scikit-learn's definitions (``accuracy_score``, ``recall_score``,
``precision_score``, ``f1_score`` with ``zero_division=nan``, ``roc_auc_score``,
``average_precision_score``, ``brier_score_loss``, ``roc_curve``,
``precision_recall_curve``); the tests check each against scikit-learn to 1e-12 on fixed,
random and tied vectors (and the p-values against statsmodels/scipy). The reason is start-up
time: importing ``sklearn.metrics`` (and ``scipy.stats``, which it pulls in) takes over a
second, and ``bonescan evaluate`` on stored predictions must start in well under one
(``docs/cli.md``); this module imports only numpy, sqlite-utils, the run store and ``results``
(no Keras). The same code, fed integer weights (how many times each sample was drawn), computes
all 1000 bootstrap resamples at once. Youden's threshold uses :func:`roc_points` too: one ROC.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from bonescan_core import errors, localisation, runs
from bonescan_core.heavy import sqlite_utils
from bonescan_core.results import UNITS, EvaluationResult, LevelResult, decision_threshold
from bonescan_core.review import latest_reviews

METRICS = ("accuracy", "recall", "precision", "f1", "specificity", "npv", "auc", "pr_auc", "brier")
"""Every metric :func:`point_metrics` returns, in display order (the paper's four first)."""

THRESHOLD_METRICS = METRICS[:6]
"""The metrics that depend on the decision threshold (the rest are threshold-free)."""

BACKBONE_NAMES = {"resnet50": "ResNet50", "vgg19": "VGG19", "densenet121": "DenseNet121"}
"""Display spelling of the backbones (``runs.backbone`` is lower case)."""

ROUND_DIGITS = 4
"""Decimals kept in :func:`evaluate`'s JSON (far finer than any CI width at n ~ 200)."""

class NoPredictionsError(errors.NotFound):
    """The run has no stored predictions for the requested subset."""


# --- input checks -----------------------------------------------------------------------

def check_inputs(labels: Any, probabilities: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert: labels -> (n,) int64 in {0, 1}; probabilities -> (n,) float64 in [0, 1]."""
    y = np.asarray(labels)
    p = np.asarray(probabilities, dtype=np.float64)
    if y.ndim != 1 or p.ndim != 1 or y.shape != p.shape:
        raise ValueError(f"labels and probabilities must be 1-D and equally long; got shapes {y.shape} and {p.shape}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (no metastasis) or 1 (metastatic)")
    if p.size and (not np.isfinite(p).all() or p.min() < 0.0 or p.max() > 1.0):
        raise ValueError("probabilities must be finite and within [0, 1]")
    return y.astype(np.int64), p


def safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Elementwise numerator / denominator, nan where the denominator is 0 (metric undefined)."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.full(np.broadcast_shapes(numerator.shape, denominator.shape), np.nan)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def _count_metrics(tp: np.ndarray, fp: np.ndarray, tn: np.ndarray, fn: np.ndarray) -> dict[str, np.ndarray]:
    """The threshold metrics from (possibly weighted) confusion counts of any common shape."""
    return {
        "accuracy": safe_ratio(tp + tn, tp + fp + tn + fn),
        "recall": safe_ratio(tp, tp + fn),
        "precision": safe_ratio(tp, tp + fp),
        # 2TP / (2TP + FP + FN): defined (0) when precision is undefined but positives exist,
        # as scikit-learn computes it.
        "f1": safe_ratio(2 * tp, 2 * tp + fp + fn),
        "specificity": safe_ratio(tn, tn + fp),
        "npv": safe_ratio(tn, tn + fn),
    }


# --- point estimates --------------------------------------------------------------------

def confusion(labels: Any, probabilities: Any, threshold: float) -> dict[str, int]:
    """Confusion counts at a threshold.

    Args:
        labels: (n,) 0/1, 1 = metastatic.
        probabilities: (n,) in [0, 1].
        threshold: predict metastatic when probability >= threshold.

    Returns:
        ``{"tp", "fp", "tn", "fn"}`` as Python ints (positive = metastatic).
    """
    y, p = check_inputs(labels, probabilities)
    predicted = p >= threshold
    positive = y == 1
    return {
        "tp": int(np.sum(predicted & positive)),
        "fp": int(np.sum(predicted & ~positive)),
        "tn": int(np.sum(~predicted & ~positive)),
        "fn": int(np.sum(~predicted & positive)),
    }


def point_metrics(labels: Any, probabilities: Any, threshold: float) -> dict[str, float]:
    """Every metric in :data:`METRICS` at one threshold (scikit-learn's definitions).

    Args:
        labels: (n,) 0/1, 1 = metastatic.
        probabilities: (n,) in [0, 1].
        threshold: predict metastatic when probability >= threshold.

    Returns:
        ``{metric: value}`` for every name in :data:`METRICS`, floats in [0, 1]:
        accuracy; recall (sensitivity); precision (PPV); F1; specificity; NPV; ROC AUC;
        PR AUC (average precision, the step-wise area, no interpolation); Brier score (mean
        squared error of the probability, lower is better). ``nan`` where undefined:
        recall/AUC/PR AUC without positives, specificity/AUC without negatives, precision
        without positive predictions, NPV without negative predictions, F1 without
        positives or positive predictions, everything on empty input.
    """
    y, p = check_inputs(labels, probabilities)
    if y.size == 0:
        return dict.fromkeys(METRICS, math.nan)
    # One weighting with all weights 1 is the sample itself.
    values = _weighted_metrics(y, p, threshold, np.ones((1, y.size)))
    return {name: float(values[name][0]) for name in METRICS}


def youden_threshold(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Decision threshold that maximises Youden's J (sensitivity + specificity - 1).

    Args:
        labels: (n,) 0/1, 1 = metastatic; both classes present.
        probabilities: (n,) in [0, 1].

    Returns:
        A threshold in [0, 1]; predict metastatic when probability >= threshold. With one
        class only (J undefined), or when no threshold separates better than chance (best
        J <= 0, e.g. a model that gives every image the same probability), 0.5.
    """
    y, p = check_inputs(labels, probabilities)
    if y.size == 0 or y.min() == y.max():
        return 0.5
    roc = roc_points(y, p)
    best = int(np.argmax(roc["tpr"] - roc["fpr"]))  # the first (highest-threshold) best cut on ties
    if roc["tpr"][best] - roc["fpr"][best] <= 0:
        return 0.5  # otherwise the curve's first threshold, +inf clipped to 1.0: a threshold that calls nothing metastatic
    return float(np.clip(roc["thresholds"][best], 0.0, 1.0))


# --- weighted, vectorised metrics (bootstrap and threshold sweep) -----------------------

def _weighted_metrics(labels: np.ndarray, probabilities: np.ndarray, threshold: float, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric for many weightings of the same samples at once.

    A bootstrap resample is the original samples with integer weights (times drawn); every
    metric here is a function of the weighted empirical distribution, so this equals the
    metric of the expanded resample (checked against scikit-learn in the tests).

    Args:
        labels: (n,) int 0/1. probabilities: (n,) float in [0, 1].
        threshold: predict metastatic when probability >= threshold.
        weights: (r, n) non-negative, one row per resample.

    Returns:
        ``{metric: (r,) float64}`` for every name in :data:`METRICS`, nan where undefined.
    """
    w = np.asarray(weights, dtype=np.float64)
    y = labels.astype(np.float64)
    predicted = (probabilities >= threshold).astype(np.float64)
    # Four mat-vec products give every resample's confusion counts.
    tp = w @ (y * predicted)
    fp = w @ ((1 - y) * predicted)
    fn = w @ (y * (1 - predicted))
    tn = w @ ((1 - y) * (1 - predicted))
    out = _count_metrics(tp, fp, tn, fn)
    auc, ap = weighted_ranking_metrics(y, probabilities, w)
    out["auc"], out["pr_auc"] = auc, ap
    out["brier"] = safe_ratio(w @ (probabilities - y) ** 2, w.sum(axis=1))
    return out


def weighted_ranking_metrics(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC AUC and average precision for each row of weights, from one sort of the scores.

    Samples are sorted by descending score once and grouped by tied score; per resample we
    only need the weighted positives and negatives in each tie group.

    Args:
        y: (n,) float 0/1. p: (n,) scores. w: (r, n) weights.

    Returns:
        (auc, ap), each (r,) float64; nan where a resample lacks positives (both) or
        negatives (AUC).
    """
    r, n = w.shape
    if n == 0:
        return np.full(r, np.nan), np.full(r, np.nan)
    order = np.argsort(-p, kind="stable")
    p_sorted, y_sorted, w_sorted = p[order], y[order], w[:, order]
    starts = np.flatnonzero(np.r_[True, p_sorted[1:] != p_sorted[:-1]])  # first index of each tie group
    group_pos = np.add.reduceat(w_sorted * y_sorted, starts, axis=1)  # (r, groups)
    group_neg = np.add.reduceat(w_sorted * (1 - y_sorted), starts, axis=1)
    tps = np.cumsum(group_pos, axis=1)  # weighted positives scoring >= each group's score
    fps = np.cumsum(group_neg, axis=1)
    n_pos, n_neg = tps[:, -1], fps[:, -1]
    # AUC = P(score_pos > score_neg) + 0.5 P(tie): for the positives of a group, the
    # negatives strictly below are n_neg - fps, the tied ones group_neg.
    concordant = np.sum(group_pos * (n_neg[:, None] - fps + 0.5 * group_neg), axis=1)
    auc = safe_ratio(concordant, n_pos * n_neg)
    # Average precision = sum over thresholds of (recall step) x (precision there), as in
    # scikit-learn; a group with no weight adds nothing (its recall step is 0).
    precision = np.zeros_like(tps)
    np.divide(tps, tps + fps, out=precision, where=(tps + fps) > 0)
    ap = safe_ratio(np.sum(group_pos * precision, axis=1), n_pos)
    return auc, ap


def metrics_at_thresholds(labels: Any, probabilities: Any, thresholds: Any) -> dict[str, np.ndarray]:
    """Every metric at many thresholds at once (for a live threshold slider).

    O((n + t) log n): the probabilities are sorted once and the confusion counts at every
    threshold come from binary search.

    Args:
        labels: (n,) 0/1, 1 = metastatic.
        probabilities: (n,) in [0, 1].
        thresholds: (t,) thresholds, any order.

    Returns:
        ``{metric: (t,) float64}`` for every name in :data:`METRICS` (the threshold-free
        ones, auc, pr_auc and brier, repeated), nan where undefined, plus ``"tp"``,
        ``"fp"``, ``"tn"``, ``"fn"``: (t,) int64 counts.
    """
    y, p = check_inputs(labels, probabilities)
    t = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
    positives, negatives = np.sort(p[y == 1]), np.sort(p[y == 0])
    # Predicted positive when p >= t: everything from the first index with p >= t onwards.
    tp = positives.size - np.searchsorted(positives, t, side="left")
    fp = negatives.size - np.searchsorted(negatives, t, side="left")
    fn, tn = positives.size - tp, negatives.size - fp
    out: dict[str, np.ndarray] = dict(_count_metrics(tp, fp, tn, fn))
    free = point_metrics(y, p, 0.5)  # threshold-free metrics; the 0.5 is irrelevant to them
    for name in METRICS[len(THRESHOLD_METRICS):]:
        out[name] = np.full(t.shape, free[name])
    out.update(tp=tp.astype(np.int64), fp=fp.astype(np.int64), tn=tn.astype(np.int64), fn=fn.astype(np.int64))
    return out


# --- bootstrap --------------------------------------------------------------------------

# --- threshold rules (studystats.choose_threshold) ----------------------------------------

THRESHOLD_RULES = ("youden", "sensitivity", "npv", "fixed")
"""Rules :func:`choose_threshold` knows; ``sensitivity`` and ``npv`` need a target."""

FIXED_THRESHOLD = 0.5
"""The threshold of rule ``fixed`` (not chosen on data)."""

TARGET_RULES = ("sensitivity", "npv")
"""The rules that need a target in (0, 1]."""



class Threshold(NamedTuple):
    """A decision threshold and the rule that chose it (``"youden"``, ``"sensitivity>=0.9"``, ``"npv>=0.95"``)."""

    value: float
    rule: str


def choose_threshold(labels: Any, scores: Any, rule: str = "youden", target: float | None = None) -> Threshold:
    """The operating point chosen on validation studies by a pre-specified rule.

    * ``youden``: maximises sensitivity + specificity - 1 (:func:`youden_threshold`).
    * ``sensitivity``: the highest threshold whose sensitivity is >= ``target`` (e.g. 0.90):
      the ``ceil(target * m)``-th highest positive score, m = number of positives.
    * ``npv``: the highest threshold (among the observed scores) whose NPV is >= ``target``;
      NPV need not be monotone in the threshold, so every candidate is checked.
    * ``fixed``: :data:`FIXED_THRESHOLD` (0.5), whatever the data (the paper's default).

    "Highest" because a higher threshold calls fewer studies metastatic: of all thresholds
    meeting the target, it keeps the most specificity.

    Args:
        labels: (n,) 0/1, both classes present.
        scores: (n,) float in [0, 1].
        rule: one of :data:`THRESHOLD_RULES`.
        target: in (0, 1]; required for ``sensitivity`` and ``npv``, refused for ``youden`` and ``fixed``.

    Returns:
        :class:`Threshold` (value float in [0, 1], rule name with its target).

    Raises:
        errors.InputError: unknown rule, missing/extra/out-of-range target, one class only, or no
            threshold reaching the NPV target.
    """
    try:
        y, p = check_inputs(labels, scores)
    except ValueError as error:  # a user's data: the error family's InputError, as the CLI reports it
        raise errors.InputError(str(error)) from error
    if rule not in THRESHOLD_RULES:
        raise errors.InputError(f"threshold rule must be one of {', '.join(THRESHOLD_RULES)}; got {rule!r}")
    if rule not in TARGET_RULES and target is not None:
        raise errors.InputError(f"the {rule} rule takes no target; drop it or use rule sensitivity or npv")
    if rule == "fixed":
        return Threshold(FIXED_THRESHOLD, "fixed")
    if y.size == 0 or y.min() == y.max():
        raise errors.InputError("choosing a threshold needs validation studies of both classes; add metastatic and non-metastatic studies")
    if rule == "youden":
        return Threshold(youden_threshold(y, p), "youden")
    if target is None or not 0.0 < target <= 1.0:
        raise errors.InputError(f"rule {rule} needs a target within (0, 1], e.g. 0.90; got {target}")
    name = f"{rule}>={target:g}"
    if rule == "sensitivity":
        positives = np.sort(p[y == 1])[::-1]
        # How many positives must be called; the epsilon keeps 0.7 * 10 = 7.000000000000001 at 7.
        needed = max(1, math.ceil(target * positives.size - 1e-9))
        return Threshold(float(positives[needed - 1]), name)
    candidates = np.unique(p)
    npv = metrics_at_thresholds(y, p, candidates)["npv"]  # nan at the lowest score: no negative calls
    reaching = candidates[np.nan_to_num(npv, nan=-1.0) >= target - 1e-12]
    if reaching.size == 0:
        raise errors.InputError(f"no threshold reaches an NPV of {target:g} on these validation studies; lower the target or use rule youden")
    return Threshold(float(reaching.max()), name)


def bootstrap_weights(groups: Any, n_resamples: int, seed: int) -> np.ndarray:
    """Cluster-bootstrap weights: how many times each sample is drawn, per resample.

    Each resample draws as many clusters (patients) as there are, with replacement; every
    sample of a drawn cluster comes along, as many times as its cluster was drawn.

    Args:
        groups: (n,) cluster id (patient id) of each sample, any hashable dtype.
        n_resamples: number of resamples r.
        seed: seed of ``np.random.default_rng``.

    Returns:
        (r, n) int64 weights.
    """
    _, cluster = np.unique(np.asarray(groups), return_inverse=True)
    cluster = cluster.ravel()
    n_clusters = int(cluster.max()) + 1 if cluster.size else 0
    if n_clusters == 0:
        return np.zeros((n_resamples, 0), dtype=np.int64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_clusters, size=(n_resamples, n_clusters))
    # Count draws per (resample, cluster) with one bincount over offset ids.
    offsets = (np.arange(n_resamples)[:, None] * n_clusters + draws).ravel()
    counts = np.bincount(offsets, minlength=n_resamples * n_clusters).reshape(n_resamples, n_clusters)
    return counts[:, cluster]


def bootstrap_ci(
    labels: Any,
    probabilities: Any,
    groups: Any | None,
    threshold: float,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile confidence intervals of every metric from a patient (cluster) bootstrap.

    Args:
        labels: (n,) 0/1, 1 = metastatic.
        probabilities: (n,) in [0, 1].
        groups: (n,) patient id of each sample; resampling draws whole patients. None
            treats every sample as its own patient (the ordinary bootstrap).
        threshold: predict metastatic when probability >= threshold.
        n_resamples: bootstrap resamples (1000 take about 20 ms at n = 200).
        seed: seed of ``np.random.default_rng``; the same seed gives the same intervals.
        level: coverage in (0, 1); 0.95 gives the 2.5th and 97.5th percentiles.

    Returns:
        ``{metric: (low, high)}`` for every name in :data:`METRICS`. Resamples in which a
        metric is undefined (e.g. no positive patient drawn) are left out of that metric's
        percentiles; ``(nan, nan)`` when it is undefined in all of them.
    """
    y, p = check_inputs(labels, probabilities)
    if not 0.0 < level < 1.0:
        raise ValueError("level must be within (0, 1), e.g. 0.95")
    if groups is None:
        groups = np.arange(y.size)
    groups = np.asarray(groups)
    if groups.shape != y.shape:
        raise ValueError(f"groups must give one patient id per sample; got shape {groups.shape} for {y.size} samples")
    weights = bootstrap_weights(groups, n_resamples, seed)
    values = _weighted_metrics(y, p, threshold, weights)
    quantiles = [(1.0 - level) / 2.0, 1.0 - (1.0 - level) / 2.0]
    out = {}
    for name in METRICS:
        v = values[name]
        if np.isnan(v).all():  # checked first: nanquantile would warn on an all-nan column
            out[name] = (math.nan, math.nan)
        else:
            low, high = np.nanquantile(v, quantiles)
            out[name] = (float(low), float(high))
    return out


# --- study level ------------------------------------------------------------------------

def study_level(study_ids: Any, patient_ids: Any, labels: Any, probabilities: Any) -> dict[str, np.ndarray]:
    """Collapse image-level predictions to one row per study.

    The study's probability is the MAX over its images (views): a lesion seen on either the
    anterior or the posterior view makes the study metastatic, so the most suspicious view
    decides, as a reader would. (A mean would dilute a lesion visible on one view only.)
    The study's label is its reference label, which every image of the study carries; were
    they ever to differ, the study counts as metastatic if any image is labelled so.

    Args:
        study_ids: (n,) study id of each image.
        patient_ids: (n,) patient id of each image (one patient per study).
        labels: (n,) 0/1, 1 = metastatic.
        probabilities: (n,) in [0, 1].

    Returns:
        ``{"study_id", "patient_id", "label", "probability", "n_images"}``: (s,) arrays, one
        entry per study in ascending study id; label int64 0/1, probability float64,
        n_images int64.

    Raises:
        ValueError: a study whose images name different patients.
    """
    y, p = check_inputs(labels, probabilities)
    studies, patients = np.asarray(study_ids), np.asarray(patient_ids)
    if studies.shape != y.shape or patients.shape != y.shape:
        raise ValueError("study_ids, patient_ids, labels and probabilities must be equally long")
    unique, first, index = np.unique(studies, return_index=True, return_inverse=True)
    index = index.ravel()
    s = unique.size
    probability = np.full(s, -np.inf)
    np.maximum.at(probability, index, p)
    label = np.zeros(s, dtype=np.int64)
    np.maximum.at(label, index, y)
    patient = patients[first]  # the patient of each study's first image
    mismatch = patients != patient[index]
    if mismatch.any():
        raise ValueError(f"studies {np.unique(studies[mismatch]).tolist()} have images of more than one patient; fix the study grouping")
    return {
        "study_id": unique,
        "patient_id": patient,
        "label": label,
        "probability": probability.astype(np.float64),
        "n_images": np.bincount(index, minlength=s).astype(np.int64),
    }


# --- curves -----------------------------------------------------------------------------

def _curve_counts(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative counts at each distinct score, highest first (scikit-learn's ``_binary_clf_curve``).

    Returns:
        (thresholds, tps, fps): (k,) distinct scores descending; positives and negatives
        scoring >= each, float64.
    """
    order = np.argsort(-p, kind="stable")
    p_sorted, y_sorted = p[order], y[order].astype(np.float64)
    last = np.r_[np.flatnonzero(p_sorted[1:] != p_sorted[:-1]), p_sorted.size - 1]  # end of each tie group
    tps = np.cumsum(y_sorted)[last]
    fps = (last + 1) - tps
    return p_sorted[last], tps, fps


def roc_points(labels: Any, probabilities: Any) -> dict[str, Any]:
    """The ROC curve, every distinct threshold kept (exact operating points, n ~ hundreds).

    Equals scikit-learn's ``roc_curve(..., drop_intermediate=False)``.

    Returns:
        ``{"fpr", "tpr", "thresholds"}``: (k,) float64 arrays from (0, 0) to (1, 1) with
        decreasing thresholds (the first is ``inf``: nothing predicted positive); and
        ``"auc"``: float. With one class only the curve is undefined: empty arrays, auc nan.
    """
    y, p = check_inputs(labels, probabilities)
    if y.size == 0 or y.min() == y.max():
        empty = np.empty(0)
        return {"fpr": empty, "tpr": empty, "thresholds": empty, "auc": math.nan}
    thresholds, tps, fps = _curve_counts(y, p)
    return {
        "fpr": np.r_[0.0, fps / fps[-1]],
        "tpr": np.r_[0.0, tps / tps[-1]],
        "thresholds": np.r_[np.inf, thresholds],
        "auc": point_metrics(y, p, 0.5)["auc"],
    }


def pr_points(labels: Any, probabilities: Any) -> dict[str, Any]:
    """The precision-recall curve (equals scikit-learn's ``precision_recall_curve``).

    Returns:
        ``{"recall", "precision", "thresholds"}``: (k,) float64 arrays with recall
        decreasing to 0; thresholds increasing, the last ``inf`` (the conventional end
        point recall 0, precision 1, nothing predicted positive). ``"ap"``: average
        precision; ``"prevalence"``: fraction of positives (the curve of a random
        classifier). Without positives: empty arrays, ap nan.
    """
    y, p = check_inputs(labels, probabilities)
    prevalence = float(y.mean()) if y.size else math.nan
    if y.size == 0 or not y.any():
        empty = np.empty(0)
        return {"recall": empty, "precision": empty, "thresholds": empty, "ap": math.nan, "prevalence": prevalence}
    thresholds, tps, fps = _curve_counts(y, p)
    precision, recall = tps / (tps + fps), tps / tps[-1]  # every distinct threshold, down to the lowest score
    return {
        "recall": np.r_[recall[::-1], 0.0],
        "precision": np.r_[precision[::-1], 1.0],
        "thresholds": np.r_[thresholds[::-1], np.inf],
        "ap": point_metrics(y, p, 0.5)["pr_auc"],
        "prevalence": prevalence,
    }


def _wilson(successes: np.ndarray, n: np.ndarray, z: float = 1.959963984540054) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a proportion, elementwise; nan where n == 0."""
    n = n.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        phat = successes / n
        centre = (phat + z * z / (2 * n)) / (1 + z * z / n)
        half = z * np.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low, high = centre - half, centre + half
    low[n == 0], high[n == 0] = np.nan, np.nan
    return np.clip(low, 0, 1), np.clip(high, 0, 1)


def calibration_points(labels: Any, probabilities: Any, n_bins: int = 10) -> dict[str, Any]:
    """Reliability diagram data: per probability bin, mean predicted vs observed frequency.

    Bins are equal-width on [0, 1], binned as scikit-learn's ``calibration_curve``
    (``strategy="uniform"``) does: a probability on an inner edge goes to the lower bin.

    Returns:
        ``{"bin_lower", "bin_upper", "mean_predicted", "observed", "observed_low",
        "observed_high", "count"}``: (n_bins,) arrays, every bin, nan means (and count 0)
        where a bin is empty; observed_low/high is the Wilson 95% interval of the observed
        frequency. ``"ece"``: expected calibration error (count-weighted mean
        |observed - predicted|); ``"brier"``; ``"n"``.
    """
    y, p = check_inputs(labels, probabilities)
    if n_bins < 1:
        raise ValueError("n_bins must be at least 1")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.searchsorted(edges[1:-1], p)
    count = np.bincount(bins, minlength=n_bins)
    predicted_sum = np.bincount(bins, weights=p, minlength=n_bins)
    positive_sum = np.bincount(bins, weights=y.astype(np.float64), minlength=n_bins)
    mean_predicted, observed = safe_ratio(predicted_sum, count), safe_ratio(positive_sum, count)
    low, high = _wilson(positive_sum, count)
    filled = count > 0
    ece = float(np.sum(count[filled] * np.abs(observed[filled] - mean_predicted[filled])) / y.size) if y.size else math.nan
    return {
        "bin_lower": edges[:-1],
        "bin_upper": edges[1:],
        "mean_predicted": mean_predicted,
        "observed": observed,
        "observed_low": low,
        "observed_high": high,
        "count": count.astype(np.int64),
        "ece": ece,
        "brier": float(np.mean((p - y) ** 2)) if y.size else math.nan,
        "n": int(y.size),
    }


# --- paired tests -----------------------------------------------------------------------

MCNEMAR_EXACT_BELOW = 25
"""Discordant pairs below which McNemar's test uses the exact binomial distribution."""


def mcnemar(labels: Any, pred_a: Any, pred_b: Any) -> dict[str, Any]:
    """McNemar's test: do two classifiers err on the same images equally often?

    Only the discordant images count: b = A right and B wrong, c = A wrong and B right.
    With b + c < 25 the two-sided exact binomial test (b ~ Bin(b + c, 1/2)); otherwise the
    chi-square statistic with Edwards' continuity correction, (|b - c| - 1)^2 / (b + c),
    on 1 degree of freedom (taken as 0 when b == c: no evidence of a difference).

    Args:
        labels: (n,) 0/1 truth. pred_a, pred_b: (n,) 0/1 (or bool) predictions of the two
            classifiers on the same images, in the same order.

    Returns:
        ``{"b", "c"}`` ints; ``"statistic"``: min(b, c) for the exact test, chi-square
        otherwise; ``"p_value"``: two-sided, in [0, 1]; ``"method"``: ``"exact binomial"``
        or ``"chi-square with continuity correction"``.
    """
    y = np.asarray(labels).astype(bool)
    a, b_pred = np.asarray(pred_a).astype(bool), np.asarray(pred_b).astype(bool)
    if not (y.shape == a.shape == b_pred.shape) or y.ndim != 1:
        raise ValueError("labels, pred_a and pred_b must be 1-D and equally long")
    right_a, right_b = a == y, b_pred == y
    b = int(np.sum(right_a & ~right_b))
    c = int(np.sum(~right_a & right_b))
    if b + c < MCNEMAR_EXACT_BELOW:
        statistic = float(min(b, c))
        # Bin(n, 1/2) is symmetric: two-sided p = 2 P(X <= min(b, c)), capped at 1.
        n = b + c
        p_value = min(1.0, 2.0 * sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2.0**n)  # exact: n < 25
        method = "exact binomial"
    else:
        statistic = max(abs(b - c) - 1.0, 0.0) ** 2 / (b + c)
        p_value = math.erfc(math.sqrt(statistic / 2.0))  # chi-square survival function, 1 df
        method = "chi-square with continuity correction"
    return {"b": b, "c": c, "statistic": statistic, "p_value": p_value, "method": method}


def midranks(x: np.ndarray) -> np.ndarray:
    """Midranks of each row: 1-based ranks, tied values sharing their average rank.

    Args:
        x: (r, n) values.

    Returns:
        (r, n) float64 (equals ``scipy.stats.rankdata(x, axis=-1)``).
    """
    out = np.empty(x.shape, dtype=np.float64)
    for row, values in enumerate(x):
        order = np.argsort(values, kind="stable")
        sorted_values = values[order]
        starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
        ends = np.r_[starts[1:], values.size]  # exclusive
        average = (starts + 1 + ends) / 2.0  # mean of the 1-based ranks starts+1 .. ends
        out[row, order] = np.repeat(average, ends - starts)
    return out


def delong(labels: Any, prob_a: Any, prob_b: Any, level: float = 0.95) -> dict[str, float]:
    """DeLong's test of two correlated ROC AUCs (same images), fast midrank algorithm.

    DeLong, DeLong & Clarke-Pearson (1988) estimate the covariance of the two AUCs from
    their structural components; Sun & Xu (2014) compute those from midranks in
    O(n log n): with m positives and k negatives, for each classifier
    V10 = (rank among all - rank among positives) / k for each positive, and
    V01 = 1 - (rank among all - rank among negatives) / m for each negative;
    Var = cov(V10) / m + cov(V01) / k.

    Args:
        labels: (n,) 0/1, both classes present (at least 2 of each for a variance).
        prob_a, prob_b: (n,) scores of the two classifiers on the same images.
        level: coverage of the interval of the difference.

    Returns:
        ``{"auc_a", "auc_b", "difference" (auc_a - auc_b), "z", "p_value" (two-sided),
        "ci95" ((low, high) of the difference, normal approximation)}``. nan where
        undefined (one class; fewer than 2 of a class). When the two are identical in
        ranking (variance 0, difference 0): z 0, p 1.
    """
    y, pa = check_inputs(labels, prob_a)
    _, pb = check_inputs(labels, prob_b)
    nan = math.nan
    m, k = int(y.sum()), int((1 - y).sum())
    if m == 0 or k == 0:
        return {"auc_a": nan, "auc_b": nan, "difference": nan, "z": nan, "p_value": nan, "ci95": (nan, nan)}
    scores = np.stack([pa, pb])  # (2, n)
    positives, negatives = scores[:, y == 1], scores[:, y == 0]
    combined = np.concatenate([positives, negatives], axis=1)
    rank_all = midranks(combined)
    rank_pos, rank_neg = midranks(positives), midranks(negatives)
    auc = (rank_all[:, :m].sum(axis=1) - m * (m + 1) / 2.0) / (m * k)
    v10 = (rank_all[:, :m] - rank_pos) / k  # (2, m): P(negative scored lower) per positive
    v01 = 1.0 - (rank_all[:, m:] - rank_neg) / m  # (2, k): P(positive scored higher) per negative
    difference = float(auc[0] - auc[1])
    out = {"auc_a": float(auc[0]), "auc_b": float(auc[1]), "difference": difference}
    if m < 2 or k < 2:
        return {**out, "z": nan, "p_value": nan, "ci95": (nan, nan)}
    covariance = np.cov(v10) / m + np.cov(v01) / k  # (2, 2)
    variance = float(covariance[0, 0] + covariance[1, 1] - 2.0 * covariance[0, 1])
    z_level = statistics.NormalDist().inv_cdf(0.5 + level / 2.0)
    if variance <= 1e-15:  # identical rankings up to rounding
        if abs(difference) < 1e-12:
            return {**out, "z": 0.0, "p_value": 1.0, "ci95": (0.0, 0.0)}
        return {**out, "z": nan, "p_value": nan, "ci95": (nan, nan)}
    sd = math.sqrt(variance)
    z = difference / sd
    return {**out, "z": z, "p_value": math.erfc(abs(z) / math.sqrt(2.0)), "ci95": (difference - z_level * sd, difference + z_level * sd)}


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of p-values for multiple comparisons (nan kept as nan)."""
    p = np.asarray(p_values, dtype=np.float64)
    valid = np.flatnonzero(~np.isnan(p))
    adjusted = np.full(p.shape, np.nan)
    order = valid[np.argsort(p[valid], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (order.size - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


# --- database ---------------------------------------------------------------------------

def _clean(value: float, digits: int = ROUND_DIGITS) -> float | None:
    """Round for JSON; nan (undefined) becomes None."""
    value = float(value)
    return None if math.isnan(value) else round(value, digits)


def _level(labels: np.ndarray, probabilities: np.ndarray, groups: np.ndarray, threshold: float, n_resamples: int, seed: int) -> LevelResult:
    """Metrics with patient-bootstrap CIs and the confusion counts at one threshold."""
    return LevelResult.from_values(
        point_metrics(labels, probabilities, threshold),
        bootstrap_ci(labels, probabilities, groups, threshold, n_resamples=n_resamples, seed=seed),
        confusion(labels, probabilities, threshold), METRICS, ROUND_DIGITS,
    )


AGGREGATION_TEXT = {
    "max": "max probability over the study's views",
    "mean": "mean probability over the study's views",
    "composite": "the run's one output per study",
}
"""How a run's study probability was made, as :func:`evaluate` states it (``study_level.aggregation``)."""


def run_thresholds(db: sqlite_utils.Database, run: runs.Run) -> tuple[dict[str, Any], list[str]]:
    """A run's validation-chosen thresholds, and notes for the reader.

    Runs trained since study thresholds exist store ``results["thresholds"]`` (``{"image",
    "study", "rule", "target"}``). For an older run the study threshold is chosen now, by the
    run's own rule, on its stored validation predictions collapsed to studies (the same
    :func:`choose_threshold` training uses, as ``studystats.choose_threshold``); a note says so. Without usable validation
    studies the study level falls back to the image threshold, with a note.

    Returns:
        (``{"image": t or None, "study": t or None, "rule", "target", "study_source": "run" |
        "derived" | "image"}``, notes).
    """
    stored = run.results.facts.get("thresholds")
    if isinstance(stored, Mapping) and stored.get("study") is not None:
        return {"image": stored.get("image", run.threshold), "study": stored["study"], "rule": stored.get("rule"),
                "target": stored.get("target"), "study_source": "run"}, []
    rule, target = run.settings.threshold_rule, run.settings.threshold_target
    val = runs.study_predictions(db, run.id, "val", aggregate=run.settings.study_aggregate)
    known = np.isfinite(val["label"])
    try:
        study = choose_threshold(val["label"][known], val["probability"][known], rule, target).value
    except errors.InputError:
        notes = [f"run {run.id} stores no study-level threshold and has no validation studies of both classes to choose one: "
                 "the study level uses the image-level threshold"]
        return {"image": run.threshold, "study": run.threshold, "rule": rule, "target": target, "study_source": "image"}, notes
    notes = [f"run {run.id} was trained before study-level thresholds were stored: its study threshold {study:.3f} was "
             f"chosen now by rule {rule} on its {int(known.sum())} stored validation studies"]
    return {"image": run.threshold, "study": float(study), "rule": rule, "target": target, "study_source": "derived"}, notes


PRE_SPECIFIED = "pre-specified (threshold chosen on validation)"
EXPLORATORY = "exploratory (threshold not chosen on validation)"
"""How test numbers are marked: at the validation-chosen operating point, or anywhere else."""

THRESHOLD_TOLERANCE = 5e-4
"""A threshold this close to the validation-chosen one is that one (the slider shows 3 decimals)."""


def threshold_status(threshold: float | None, chosen: float | None) -> str:
    """:data:`PRE_SPECIFIED` when test numbers are computed at the validation-chosen threshold
    (``threshold`` None, or within :data:`THRESHOLD_TOLERANCE` of ``chosen``), else
    :data:`EXPLORATORY`; also exploratory when the run has no validation-chosen threshold
    (``chosen`` None: the 0.5 default was not chosen on validation)."""
    if chosen is None:
        return EXPLORATORY
    if threshold is None or abs(float(threshold) - float(chosen)) <= THRESHOLD_TOLERANCE + 1e-12:
        return PRE_SPECIFIED
    return EXPLORATORY


def evaluate(
    db: sqlite_utils.Database,
    run_id: int,
    threshold: float | None = None,
    subset: str = "test",
    n_resamples: int = 1000,
    seed: int = 0,
    unit: str = "study",
) -> EvaluationResult:
    """One run's metrics with CIs on a subset, per study and per image (``evaluate --json`` is its ``as_json()``).

    Args:
        db: open database.
        run_id: ``runs.id``.
        threshold: one decision threshold for both levels; None uses the run's
            validation-chosen ones: the image level at the image threshold (``runs.threshold``),
            the study level at the study threshold chosen on validation studies
            (:func:`run_thresholds`); 0.5 when the run has none (:func:`results.decision_threshold`).
        subset: ``"test"`` (default), ``"val"`` or ``"train"``.
        n_resamples, seed: of the patient bootstrap behind every ``ci95``.
        unit: ``"study"`` (default, the primary unit) or ``"image"`` (the paper's): the level
            the result's ``metrics``, ``confusion`` and ``threshold`` describe.

    Returns:
        An :class:`~bonescan_core.results.EvaluationResult`: thresholds and their source and
        rule, counts of images, studies and patients, every metric of :data:`METRICS` as a
        ``MetricCI`` (95% patient-bootstrap interval) and the confusion counts, at image level
        and at study level (``runs.study_predictions``: the run's stored study rows, or for an
        older run its views collapsed by its ``study_aggregate``), and the Grad-CAM pointing
        game (:func:`localisation_summary` at the study threshold, None without lesion points).
        Values rounded to 4 decimals; undefined None. ``calibration`` and ``subgroups`` stay
        None here: ``assessment.evaluate`` adds them.

    Raises:
        errors.InputError: unknown ``unit``.
        errors.RunNotFound: no such run.
        NoPredictionsError: the run has no predictions on ``subset``.
    """
    if unit not in UNITS:
        raise errors.InputError(f"unit must be one of {', '.join(UNITS)}; got {unit!r}")
    run = runs.get(db, run_id)
    data = runs.predictions(db, run_id, subset)
    if data["label"].size == 0:
        raise NoPredictionsError(
            f"run {run_id} ({run.status}) has no {subset} predictions; evaluate a run that finished training "
            "(`bonescan runs --json`, status done) or train one with `bonescan train`"
        )
    chosen, notes = run_thresholds(db, run)
    image_used, image_source = decision_threshold(threshold, chosen["image"])
    study_used, study_source = decision_threshold(threshold, chosen["study"])
    if study_source == "run" and chosen["study_source"] == "derived":
        study_source = "derived"
    studies = runs.study_predictions(db, run_id, subset, aggregate=run.settings.study_aggregate)
    labelled = np.isfinite(studies["label"])
    study_labels, study_probabilities = studies["label"][labelled].astype(np.int64), studies["probability"][labelled]
    study_patients = studies["patient_id"][labelled]
    aggregation = run.settings.study_aggregate if run.settings.view_mode == "per_image" else "composite"
    return EvaluationResult(
        run=int(run.id),
        backbone=run.backbone,
        threshold=_clean(study_used if unit == "study" else image_used),
        threshold_source=study_source if unit == "study" else image_source,
        subset=subset,
        n_images=int(data["label"].size),
        n_studies=int(study_labels.size),
        n_patients=int(np.unique(data["patient_id"]).size),
        image_level=_level(data["label"], data["probability"], data["patient_id"], image_used, n_resamples, seed),
        study_level=_level(study_labels, study_probabilities, study_patients, study_used, n_resamples, seed),
        study_n_patients=int(np.unique(study_patients).size),
        bootstrap={"unit": "patient", "interval": "percentile", "level": 0.95, "n_resamples": n_resamples, "seed": seed},
        unit=unit,
        threshold_rule=chosen["rule"],
        threshold_target=chosen["target"],
        image_threshold=_clean(image_used),
        study_threshold=_clean(study_used),
        study_aggregation=AGGREGATION_TEXT[aggregation],
        notes=tuple(notes) if threshold is None else (),
        localisation=localisation_summary(db, run_id, study_used, subset),
    )


def localisation_summary(db: sqlite_utils.Database, run_id: int, threshold: float, subset: str = "test",
                         cohort: str | None = None) -> dict[str, Any] | None:
    """The pointing game of the run's cached Grad-CAM maps (``localisation.pointing_game``) with a
    95% Wilson interval over studies, as ``evaluate --json`` shows it; None when no study of
    the subset has a lesion point.

    Returns:
        ``{"hit_rate", "ci95": [low, high], "n", "hits", "n_without_map", "tolerance_px",
        "reference_size"}``; ``hit_rate`` and the interval None when no study is a true positive.
    """
    game = localisation.pointing_game(db, run_id, threshold, subset, cohort=cohort)
    if game.n_lesion_studies == 0:
        return None
    low, high = _wilson(np.array([float(game.hits)]), np.array([game.n]))
    return localisation.summary(game, [_clean(low[0]), _clean(high[0])])


def run_label(backbone: str, run_id: int, with_id: bool = False) -> str:
    """Display name of a run: "DenseNet121", or "DenseNet121 (run 3)" with ``with_id``."""
    name = BACKBONE_NAMES.get(backbone, backbone)
    return f"{name} (run {run_id})" if with_id else name


def outcome(label: int, probability: float, threshold: float) -> str:
    """``TP``, ``FP``, ``FN`` or ``TN`` of one image at a threshold (positive = metastatic)."""
    predicted = probability >= threshold
    return ("TP" if label else "FP") if predicted else ("FN" if label else "TN")


def explorer_rows(db: sqlite_utils.Database, run_id: int, threshold: float) -> list[dict[str, Any]]:
    """Every validation and test prediction of a run, for the per-image explorer.

    Returns:
        Dicts with ``image_id, study_id, patient_id, view, subset, label`` (0/1),
        ``probability``, ``outcome`` (TP/FP/FN/TN at ``threshold``), ``loss`` (binary
        cross-entropy of the image, >= 0: "top losses" first when sorted descending),
        ``confidence`` (|probability - threshold|, how far from the decision), and the
        readers' current ``verdicts`` ("reader: verdict; ..."), ``criteria`` (ids, ";"-joined)
        and ``notes``.
    """

    rows = []
    for subset in ("val", "test"):
        data = runs.predictions(db, run_id, subset)
        for i in range(len(data["image_id"])):
            label, probability = int(data["label"][i]), float(data["probability"][i])
            clipped = min(max(probability, 1e-7), 1 - 1e-7)
            rows.append({
                "image_id": int(data["image_id"][i]), "study_id": int(data["study_id"][i]),
                "patient_id": int(data["patient_id"][i]), "view": data["view"][i], "subset": subset, "label": label,
                "probability": probability, "outcome": outcome(label, probability, threshold),
                "loss": float(-np.log(clipped if label else 1 - clipped)),
                "confidence": abs(probability - threshold),
            })
    reviews: dict[int, list[dict]] = {}
    for review in latest_reviews(db, {row["study_id"] for row in rows}):
        reviews.setdefault(review["study_id"], []).append(review)
    for row in rows:
        mine = reviews.get(row["study_id"], [])
        row["verdicts"] = "; ".join(f"{r['reviewer']}: {r['label'] or 'excluded'}" for r in mine)
        row["criteria"] = ";".join(sorted({c for r in mine for c in r["criteria"].split(";") if c}))
        row["notes"] = " | ".join(r["note"] for r in mine if r["note"])
    return rows


EXPLORER_ORDERS: dict[str, tuple[str, bool]] = {
    "top losses first": ("loss", True),
    "least confident first": ("confidence", False),
    "most confident first": ("confidence", True),
    "highest probability first": ("probability", True),  # what the model finds most suspicious
}
"""The explorer's sort orders: name -> (row key, descending)."""


def filter_explorer_rows(
    rows: Sequence[Mapping[str, Any]],
    outcomes: Sequence[str] = (),
    subsets: Sequence[str] = (),
    views: Sequence[str] = (),
    criterion: str | None = None,
    order: str = "top losses first",
) -> list[Mapping[str, Any]]:
    """The explorer's table: :func:`explorer_rows` filtered, then sorted.

    Args:
        rows: from :func:`explorer_rows`.
        outcomes, subsets, views: keep rows whose ``outcome`` (TP/FP/FN/TN), ``subset`` or
            ``view`` is among them; empty keeps all.
        criterion: keep rows whose readers ticked this criterion id; None or ``"any"`` keeps all.
        order: a key of :data:`EXPLORER_ORDERS`.

    Returns:
        The kept rows, sorted (stable: ties keep their order).
    """
    if order not in EXPLORER_ORDERS:
        raise ValueError(f"order must be one of {', '.join(EXPLORER_ORDERS)}")
    kept = [
        row for row in rows
        if (not outcomes or row["outcome"] in outcomes)
        and (not subsets or row["subset"] in subsets)
        and (not views or row["view"] in views)
        and (criterion in (None, "any") or criterion in row["criteria"].split(";"))
    ]
    key, descending = EXPLORER_ORDERS[order]
    return sorted(kept, key=lambda row: row[key], reverse=descending)
