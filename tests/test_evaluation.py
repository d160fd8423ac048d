"""Metrics against scikit-learn, the patient bootstrap, paired tests against references,
study-level collapse, and evaluate() end to end (runs are compared in
test_comparison.py) on a populated database."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
from conftest import REPO
from scipy.stats import rankdata
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar
from statsmodels.stats.multitest import multipletests

from bonescan_core import db as dbm
from bonescan_core import errors
from bonescan_core import evaluation as ev
from bonescan_core import runs as run_store
from bonescan_core.ingest import insert_image


def sklearn_metrics(y, p, threshold):
    """The reference: every metric straight from scikit-learn (nan where undefined)."""
    pred = (np.asarray(p) >= threshold).astype(int)
    both = len(set(np.asarray(y).tolist())) == 2
    return {
        "accuracy": skm.accuracy_score(y, pred),
        "recall": skm.recall_score(y, pred, zero_division=np.nan),
        "precision": skm.precision_score(y, pred, zero_division=np.nan),
        "f1": skm.f1_score(y, pred, zero_division=np.nan),
        "specificity": skm.recall_score(y, pred, pos_label=0, zero_division=np.nan),
        "npv": skm.precision_score(y, pred, pos_label=0, zero_division=np.nan),
        "auc": skm.roc_auc_score(y, p) if both else np.nan,
        "pr_auc": skm.average_precision_score(y, p) if np.any(y) else np.nan,
        "brier": skm.brier_score_loss(y, p, labels=[0, 1]),
    }


def assert_metrics_equal(actual, expected, tol=1e-12):
    assert set(actual) >= set(ev.METRICS)
    for name in ev.METRICS:
        a, e = float(actual[name]), float(expected[name])
        assert (math.isnan(a) and math.isnan(e)) or a == pytest.approx(e, abs=tol), f"{name}: {a} != {e}"


def random_case(seed, n=200, ties=False, prevalence=0.4, separation=1.0):
    """Labels and probabilities with some signal; ``ties`` rounds to 2 decimals (many ties)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    p = 1.0 / (1.0 + np.exp(-(rng.normal(0.0, 1.0, n) + separation * (2 * y - 1))))
    if ties:
        p = np.round(p, 1)
    return y, p


# --- point metrics ----------------------------------------------------------------------

def test_point_metrics_on_a_fixed_vector_by_hand():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.4, 0.3, 0.7, 0.2, 0.1, 0.1, 0.05, 0.6])
    m = ev.point_metrics(y, p, 0.5)
    # >= 0.5: 0.9, 0.8 (positives) and 0.7, 0.6 (negatives) -> tp 2, fp 2, fn 2, tn 4
    assert ev.confusion(y, p, 0.5) == {"tp": 2, "fp": 2, "tn": 4, "fn": 2}
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["recall"] == pytest.approx(0.5)
    assert m["precision"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(0.5)
    assert m["specificity"] == pytest.approx(4 / 6)
    assert m["npv"] == pytest.approx(4 / 6)
    # AUC by counting: of the 24 (pos, neg) pairs, the positives 0.9 and 0.8 beat all 6
    # negatives; 0.4 beats 4 (0.2, 0.1, 0.1, 0.05), 0.3 beats 4 -> (6 + 6 + 4 + 4) / 24.
    assert m["auc"] == pytest.approx(20 / 24)
    assert m["brier"] == pytest.approx(np.mean((p - y) ** 2))
    assert_metrics_equal(m, sklearn_metrics(y, p, 0.5))
    # The threshold is inclusive: at exactly 0.4 the 0.4 positive counts as predicted positive.
    assert ev.confusion(y, p, 0.4)["tp"] == 3


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
def test_point_metrics_match_sklearn_on_random_vectors(seed, ties):
    y, p = random_case(seed, n=37 + 40 * seed, ties=ties, prevalence=0.2 + 0.1 * seed)
    for threshold in (0.0, 0.3, 0.5, float(np.median(p)), 0.8, 1.0):
        assert_metrics_equal(ev.point_metrics(y, p, threshold), sklearn_metrics(y, p, threshold))


def test_undefined_metrics_are_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # undefined must mean nan, not a warning or an exception
        # No positive prediction: precision undefined; F1 = 0 (there are positives, none found).
        m = ev.point_metrics([1, 0, 1, 0], [0.1, 0.2, 0.3, 0.4], 0.9)
        assert math.isnan(m["precision"]) and m["recall"] == 0.0 and m["f1"] == 0.0
        assert m["specificity"] == 1.0 and m["npv"] == 0.5
        # One class only (no positives): recall, AUC, PR AUC undefined; the one false
        # positive makes precision and F1 0; with no positive prediction F1 is undefined too.
        m = ev.point_metrics([0, 0, 0], [0.1, 0.6, 0.3], 0.5)
        for name in ("recall", "auc", "pr_auc"):
            assert math.isnan(m[name]), name
        assert m["precision"] == 0.0 and m["f1"] == 0.0 and m["accuracy"] == pytest.approx(2 / 3)
        assert math.isnan(ev.point_metrics([0, 0, 0], [0.1, 0.6, 0.3], 0.9)["f1"])
        assert m["brier"] == pytest.approx((0.01 + 0.36 + 0.09) / 3)
        # Only positives: specificity and AUC undefined; no negative predictions -> NPV undefined.
        m = ev.point_metrics([1, 1], [0.7, 0.9], 0.5)
        assert math.isnan(m["specificity"]) and math.isnan(m["auc"]) and math.isnan(m["npv"])
        assert m["pr_auc"] == 1.0
        # Empty input.
        assert all(math.isnan(v) for v in ev.point_metrics([], [], 0.5).values())


def test_bad_inputs_are_rejected_with_a_reason():
    with pytest.raises(ValueError, match="equally long"):
        ev.point_metrics([0, 1], [0.5], 0.5)
    with pytest.raises(ValueError, match="0 \\(no metastasis\\) or 1"):
        ev.point_metrics([0, 2], [0.5, 0.5], 0.5)
    with pytest.raises(ValueError, match="within \\[0, 1\\]"):
        ev.point_metrics([0, 1], [0.5, 1.5], 0.5)
    with pytest.raises(ValueError, match="finite"):
        ev.point_metrics([0, 1], [0.5, np.nan], 0.5)


@pytest.mark.parametrize("seed", range(4))
def test_metrics_at_thresholds_match_point_metrics(seed):
    y, p = random_case(seed, n=150, ties=bool(seed % 2))
    thresholds = np.r_[0.0, np.unique(p)[::7], 0.5, 1.0, 1.01]  # includes thresholds equal to scores
    sweep = ev.metrics_at_thresholds(y, p, thresholds)
    for i, t in enumerate(thresholds):
        assert_metrics_equal({k: sweep[k][i] for k in ev.METRICS}, sklearn_metrics(y, p, t))
        assert {k: int(sweep[k][i]) for k in ("tp", "fp", "tn", "fn")} == ev.confusion(y, p, t)
    assert all(sweep[k].shape == thresholds.shape for k in ev.METRICS)


# --- the weighted (bootstrap) implementation --------------------------------------------

@pytest.mark.parametrize("ties", [False, True])
def test_weighted_metrics_equal_sklearn_on_the_expanded_resamples(ties):
    y, p = random_case(3, n=60, ties=ties)
    groups = np.arange(60) // 2  # two images per patient
    weights = ev.bootstrap_weights(groups, n_resamples=25, seed=7)
    fast = ev._weighted_metrics(y, p, 0.5, weights)
    for r in range(weights.shape[0]):
        index = np.repeat(np.arange(60), weights[r])  # the resample, written out
        assert_metrics_equal({k: fast[k][r] for k in ev.METRICS}, sklearn_metrics(y[index], p[index], 0.5), tol=1e-10)


def test_bootstrap_weights_draw_whole_patients():
    groups = np.array([5, 5, 9, 9, 9, 2])
    w = ev.bootstrap_weights(groups, n_resamples=200, seed=1)
    assert w.shape == (200, 6)
    # Samples of one patient always come together, as often as the patient was drawn.
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 2] == w[:, 3]).all() and (w[:, 3] == w[:, 4]).all()
    # Three patients drawn per resample: the per-patient counts add up to 3.
    assert (w[:, 0] + w[:, 2] + w[:, 5] == 3).all()


# --- bootstrap confidence intervals -----------------------------------------------------

def ci_width(ci, name):
    return ci[name][1] - ci[name][0]


def test_ci_contains_the_point_estimate_and_is_reproducible():
    y, p = random_case(11, n=300)
    groups = np.arange(300) // 2
    point = ev.point_metrics(y, p, 0.5)
    ci = ev.bootstrap_ci(y, p, groups, 0.5, n_resamples=1000, seed=0)
    assert set(ci) == set(ev.METRICS)
    for name in ev.METRICS:
        low, high = ci[name]
        assert low <= point[name] <= high, name
        assert 0.0 <= low < high <= 1.0
    assert ev.bootstrap_ci(y, p, groups, 0.5, n_resamples=1000, seed=0) == ci
    assert ev.bootstrap_ci(y, p, groups, 0.5, n_resamples=1000, seed=1) != ci
    # A narrower level gives a narrower interval.
    ci80 = ev.bootstrap_ci(y, p, groups, 0.5, n_resamples=1000, seed=0, level=0.8)
    assert all(ci_width(ci80, name) < ci_width(ci, name) for name in ev.METRICS)


def test_ci_narrows_as_n_grows():
    small = random_case(5, n=100)
    large = random_case(5, n=1600)
    ci_small = ev.bootstrap_ci(*small, None, 0.5, seed=0)
    ci_large = ev.bootstrap_ci(*large, None, 0.5, seed=0)
    for name in ev.METRICS:
        # 16x the data: about a quarter of the width; allow generous slack.
        assert ci_width(ci_large, name) < 0.5 * ci_width(ci_small, name), name


def test_patient_bootstrap_groups_duplicated_images():
    y, p = random_case(8, n=200)
    patients = np.arange(200)
    original = ev.bootstrap_ci(y, p, patients, 0.5, seed=0)
    y2, p2 = np.r_[y, y], np.r_[p, p]
    # The same images twice under the same patient: no new information, so no narrower
    # (with the same draws, exactly the same: every metric is a ratio of weighted sums).
    same_patient = ev.bootstrap_ci(y2, p2, np.r_[patients, patients], 0.5, seed=0)
    for name in ev.METRICS:
        assert same_patient[name] == pytest.approx(original[name], abs=1e-12), name
    # Twice under new patient ids: treated as independent, so narrower (about 1/sqrt(2)).
    new_patients = ev.bootstrap_ci(y2, p2, np.r_[patients, patients + 1000], 0.5, seed=0)
    for name in ev.METRICS:
        assert ci_width(new_patients, name) < 0.85 * ci_width(original, name), name


def test_ci_of_an_undefined_metric_is_nan():
    ci = ev.bootstrap_ci([0, 0, 0, 0], [0.1, 0.2, 0.7, 0.4], None, 0.5, n_resamples=50)
    assert all(math.isnan(v) for v in ci["auc"]) and all(math.isnan(v) for v in ci["recall"])
    assert not math.isnan(ci["accuracy"][0])


# --- study level ------------------------------------------------------------------------

def test_study_level_takes_the_max_over_views():
    studies = np.array([10, 10, 11, 11, 12])
    patients = np.array([1, 1, 1, 1, 2])
    labels = np.array([1, 1, 0, 0, 1])
    probabilities = np.array([0.2, 0.9, 0.3, 0.1, 0.4])
    out = ev.study_level(studies, patients, labels, probabilities)
    assert out["study_id"].tolist() == [10, 11, 12]
    assert out["patient_id"].tolist() == [1, 1, 2]
    assert out["label"].tolist() == [1, 0, 1]
    assert out["probability"].tolist() == [0.9, 0.3, 0.4]
    assert out["n_images"].tolist() == [2, 2, 1]
    # Order of the images does not matter.
    shuffled = np.array([4, 2, 0, 3, 1])
    again = ev.study_level(studies[shuffled], patients[shuffled], labels[shuffled], probabilities[shuffled])
    assert again["probability"].tolist() == [0.9, 0.3, 0.4]


def test_study_level_rejects_a_study_spanning_patients():
    with pytest.raises(ValueError, match="more than one patient"):
        ev.study_level([1, 1], [7, 8], [0, 0], [0.1, 0.2])


# --- curves -----------------------------------------------------------------------------

@pytest.mark.parametrize("ties", [False, True])
def test_curves_equal_sklearns(ties):
    y, p = random_case(4, n=120, ties=ties)
    roc = ev.roc_points(y, p)
    for ours, theirs in zip((roc["fpr"], roc["tpr"], roc["thresholds"]), skm.roc_curve(y, p, drop_intermediate=False), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)
    pr = ev.pr_points(y, p)
    precision, recall, thresholds = skm.precision_recall_curve(y, p)
    np.testing.assert_allclose(pr["precision"], precision, rtol=0, atol=1e-12)
    np.testing.assert_allclose(pr["recall"], recall, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(pr["thresholds"], np.r_[thresholds, np.inf])


def test_curve_details():
    y, p = random_case(4, n=120, ties=True)
    roc = ev.roc_points(y, p)
    assert roc["auc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert (roc["fpr"][0], roc["tpr"][0]) == (0.0, 0.0) and (roc["fpr"][-1], roc["tpr"][-1]) == (1.0, 1.0)
    assert np.trapezoid(roc["tpr"], roc["fpr"]) == pytest.approx(roc["auc"])
    assert np.isinf(roc["thresholds"][0])
    pr = ev.pr_points(y, p)
    assert pr["ap"] == pytest.approx(skm.average_precision_score(y, p))
    assert len(pr["recall"]) == len(pr["precision"]) == len(pr["thresholds"])
    assert pr["recall"][-1] == 0.0 and pr["precision"][-1] == 1.0 and np.isinf(pr["thresholds"][-1])
    assert pr["prevalence"] == pytest.approx(y.mean())
    assert ev.roc_points([0, 0], [0.1, 0.2])["fpr"].size == 0 and math.isnan(ev.roc_points([0, 0], [0.1, 0.2])["auc"])
    assert math.isnan(ev.pr_points([0, 0], [0.1, 0.2])["ap"])


def test_calibration_points_match_sklearn_calibration_curve():
    y, p = random_case(6, n=500)
    p[:3] = [0.1, 0.5, 1.0]  # values on bin edges go where scikit-learn puts them
    cal = ev.calibration_points(y, p, n_bins=10)
    observed, predicted = calibration_curve(y, p, n_bins=10, strategy="uniform")
    filled = cal["count"] > 0
    np.testing.assert_allclose(cal["observed"][filled], observed)
    np.testing.assert_allclose(cal["mean_predicted"][filled], predicted)
    assert cal["count"].sum() == 500 and cal["n"] == 500
    assert np.all(cal["observed_low"][filled] <= cal["observed"][filled])
    assert np.all(cal["observed"][filled] <= cal["observed_high"][filled])
    expected_ece = np.sum(cal["count"][filled] * np.abs(cal["observed"][filled] - cal["mean_predicted"][filled])) / 500
    assert cal["ece"] == pytest.approx(expected_ece)
    assert cal["brier"] == pytest.approx(skm.brier_score_loss(y, p))
    # A perfectly calibrated score (label drawn with that probability) has a small ECE.
    rng = np.random.default_rng(0)
    q = rng.random(20000)
    assert ev.calibration_points((rng.random(20000) < q).astype(int), q)["ece"] < 0.02


def test_youden_threshold_equals_sklearns_roc_curve_argmax():
    """The numpy Youden cut is the one scikit-learn's roc_curve gives (it drops collinear
    points, the module keeps every threshold), on random vectors with many ties."""
    rng = np.random.default_rng(7)
    for _ in range(300):
        n = int(rng.integers(2, 40))
        y, p = rng.integers(0, 2, n), np.round(rng.random(n), int(rng.integers(1, 3)))
        if y.min() == y.max():
            continue
        fpr, tpr, thresholds = skm.roc_curve(y, p)
        best = int(np.argmax(tpr - fpr))
        expected = 0.5 if tpr[best] - fpr[best] <= 0 else float(np.clip(thresholds[best], 0.0, 1.0))
        assert ev.youden_threshold(y, p) == expected


def test_youden_threshold_picks_the_best_cut():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.55, 0.65, 0.5, 0.7, 0.8, 0.9])
    # J = 3/4 - 0 at 0.7; 1 - 2/4 at 0.5; 2/4 - 0 at 0.8.
    assert ev.youden_threshold(y, p) == pytest.approx(0.7)
    assert ev.youden_threshold([1, 1], [0.2, 0.3]) == 0.5


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_youden_threshold_is_the_best_cut_of_sklearns_roc_curve(seed):
    """One ROC implementation (roc_points) serves Youden's J; it picks the cut scikit-learn's curve gives."""
    y, p = random_case(seed, n=150, ties=seed % 2 == 1, separation=0.8)
    fpr, tpr, thresholds = skm.roc_curve(y, p)
    best = int(np.argmax(tpr - fpr))
    assert ev.youden_threshold(y, p) == pytest.approx(min(thresholds[best], 1.0), abs=0)


def test_explorer_rows_filter_and_sort():
    rows = [
        {"image_id": 1, "outcome": "TP", "subset": "test", "view": "anterior", "criteria": "flare", "loss": 0.2,
         "confidence": 0.4, "probability": 0.9},
        {"image_id": 2, "outcome": "FN", "subset": "val", "view": "posterior", "criteria": "", "loss": 2.0,
         "confidence": 0.1, "probability": 0.4},
        {"image_id": 3, "outcome": "FP", "subset": "test", "view": None, "criteria": "flare;trauma", "loss": 1.0,
         "confidence": 0.3, "probability": 0.8},
        {"image_id": 4, "outcome": "TN", "subset": "test", "view": "anterior", "criteria": "trauma", "loss": 0.2,
         "confidence": 0.2, "probability": 0.3},
    ]
    ids = lambda kept: [row["image_id"] for row in kept]  # noqa: E731
    assert ids(ev.filter_explorer_rows(rows)) == [2, 3, 1, 4]  # top losses first; ties keep their order
    assert ids(ev.filter_explorer_rows(rows, order="least confident first")) == [2, 4, 3, 1]
    assert ids(ev.filter_explorer_rows(rows, order="most confident first")) == [1, 3, 4, 2]
    assert ids(ev.filter_explorer_rows(rows, order="highest probability first")) == [1, 3, 2, 4]
    assert ids(ev.filter_explorer_rows(rows, outcomes=["TP", "FP"], subsets=["test"])) == [3, 1]
    assert ids(ev.filter_explorer_rows(rows, views=["anterior"], criterion="trauma")) == [4]
    assert ids(ev.filter_explorer_rows(rows, criterion="flare")) == [3, 1]
    assert ids(ev.filter_explorer_rows(rows, criterion="any")) == [2, 3, 1, 4]
    with pytest.raises(ValueError, match="order must be one of"):
        ev.filter_explorer_rows(rows, order="random")


def test_midranks_equal_scipys_rankdata():
    rng = np.random.default_rng(0)
    x = np.round(rng.random((3, 50)), 1)  # many ties
    np.testing.assert_array_equal(ev.midranks(x), rankdata(x, axis=-1))


def test_the_module_imports_neither_sklearn_nor_scipy():
    """``bonescan evaluate`` must start fast: sklearn.metrics alone takes over a second to import.
    Not only the import: every computing function is called, youden_threshold included."""
    code = """
import sys
import numpy as np
from bonescan_core import evaluation as ev
y = np.array([0, 1, 0, 1, 1, 0, 1, 0]); p = np.array([0.1, 0.9, 0.4, 0.6, 0.35, 0.2, 0.8, 0.7])
groups = np.arange(8) // 2
ev.confusion(y, p, 0.5); ev.point_metrics(y, p, 0.5); ev.youden_threshold(y, p)
ev.metrics_at_thresholds(y, p, np.linspace(0, 1, 11)); ev.bootstrap_ci(y, p, groups, 0.5, n_resamples=20)
ev.study_level(groups, groups, y, p); ev.roc_points(y, p); ev.pr_points(y, p); ev.calibration_points(y, p)
ev.mcnemar(y, p >= 0.5, p >= 0.3); ev.delong(y, p, p[::-1]); ev.holm([0.01, 0.04])
print(sorted(m for m in ('sklearn', 'scipy', 'plotly', 'streamlit', 'tensorflow') if m in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --- McNemar ----------------------------------------------------------------------------

def predictions_with(b, c, agree_right=30, agree_wrong=5):
    """Labels and two prediction vectors with exactly b (A right, B wrong) and c (A wrong, B right)."""
    n = b + c + agree_right + agree_wrong
    y = np.tile([1, 0], n)[:n]
    a_right = np.r_[np.ones(b), np.zeros(c), np.ones(agree_right), np.zeros(agree_wrong)].astype(bool)
    b_right = np.r_[np.zeros(b), np.ones(c), np.ones(agree_right), np.zeros(agree_wrong)].astype(bool)
    pred_a = np.where(a_right, y, 1 - y)
    pred_b = np.where(b_right, y, 1 - y)
    return y, pred_a, pred_b


@pytest.mark.parametrize(("b", "c"), [(0, 0), (1, 7), (5, 5), (3, 12), (12, 12), (20, 4)])
def test_mcnemar_exact_matches_statsmodels(b, c):
    result = ev.mcnemar(*predictions_with(b, c))
    reference = sm_mcnemar([[30, b], [c, 5]], exact=True)
    assert (result["b"], result["c"]) == (b, c)
    assert result["method"] == "exact binomial"
    assert result["statistic"] == reference.statistic
    assert result["p_value"] == pytest.approx(reference.pvalue if b + c else 1.0)


@pytest.mark.parametrize(("b", "c"), [(15, 10), (40, 20), (121, 59), (3, 30)])
def test_mcnemar_chi_square_matches_statsmodels(b, c):
    result = ev.mcnemar(*predictions_with(b, c))
    reference = sm_mcnemar([[30, b], [c, 5]], exact=False, correction=True)
    assert result["method"] == "chi-square with continuity correction"
    assert result["statistic"] == pytest.approx(reference.statistic)
    assert result["p_value"] == pytest.approx(reference.pvalue)


def test_mcnemar_textbook_examples():
    # Chi-square: b = 121, c = 59 (Wikipedia's McNemar example); corrected
    # (|121 - 59| - 1)^2 / 180 = 61^2 / 180 = 20.672, p = 5.45e-6 on 1 df.
    result = ev.mcnemar(*predictions_with(121, 59, agree_right=101, agree_wrong=33))
    assert result["statistic"] == pytest.approx(3721 / 180)
    assert result["p_value"] == pytest.approx(5.45e-6, rel=0.01)
    # Exact: b = 1, c = 7: p = 2 * P(X <= 1), X ~ Bin(8, 1/2) = 2 * (1 + 8) / 256.
    result = ev.mcnemar(*predictions_with(1, 7))
    assert result["p_value"] == pytest.approx(18 / 256)
    # b == c: no evidence of a difference either way.
    assert ev.mcnemar(*predictions_with(15, 15))["p_value"] == 1.0


# --- DeLong -----------------------------------------------------------------------------

def delong_slow(y, pa, pb):
    """DeLong et al. (1988) written plainly: the O(m k) structural components and their covariance."""
    y = np.asarray(y)
    out = []
    for p in (pa, pb):
        x, z = np.asarray(p)[y == 1], np.asarray(p)[y == 0]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])  # (m, k)
        out.append((psi.mean(), psi.mean(axis=1), psi.mean(axis=0)))  # AUC, V10 (m,), V01 (k,)
    (auc_a, v10_a, v01_a), (auc_b, v10_b, v01_b) = out
    m, k = len(v10_a), len(v01_a)
    s10 = np.cov(np.vstack([v10_a, v10_b]))  # ddof 1, as in the paper
    s01 = np.cov(np.vstack([v01_a, v01_b]))
    s = s10 / m + s01 / k
    var = s[0, 0] + s[1, 1] - 2 * s[0, 1]
    z = (auc_a - auc_b) / math.sqrt(var)
    return auc_a, auc_b, var, z


def test_delong_matches_the_slow_definition_on_a_worked_example():
    # Ten images, ties within and across the classifiers.
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 1])
    pa = np.array([0.9, 0.8, 0.6, 0.55, 0.6, 0.3, 0.2, 0.4, 0.1, 0.7])
    pb = np.array([0.7, 0.5, 0.6, 0.4, 0.5, 0.45, 0.3, 0.6, 0.2, 0.8])
    result = ev.delong(y, pa, pb)
    auc_a, auc_b, var, z = delong_slow(y, pa, pb)
    assert result["auc_a"] == pytest.approx(auc_a) == pytest.approx(skm.roc_auc_score(y, pa))
    assert result["auc_b"] == pytest.approx(auc_b) == pytest.approx(skm.roc_auc_score(y, pb))
    # By hand, 5 x 5 pairs: A ranks every positive above every negative except 0.55 < 0.6
    # and the tie 0.6 = 0.6 (half a pair) -> 23.5 / 25.
    assert result["auc_a"] == pytest.approx(23.5 / 25)
    assert result["z"] == pytest.approx(z)
    assert result["p_value"] == pytest.approx(2 * (1 - 0.5 * (1 + math.erf(abs(z) / math.sqrt(2)))))
    low, high = result["ci95"]
    assert (high - low) / 2 == pytest.approx(1.959963984540054 * math.sqrt(var))
    assert low < result["difference"] < high


@pytest.mark.parametrize("seed", range(5))
def test_delong_matches_the_slow_definition_on_random_data(seed):
    y, pa = random_case(seed, n=80 + 30 * seed, ties=seed % 2 == 0)
    rng = np.random.default_rng(100 + seed)
    pb = np.clip(pa + rng.normal(0, 0.15, pa.size), 0, 1)
    result = ev.delong(y, pa, pb)
    auc_a, auc_b, _, z = delong_slow(y, pa, pb)
    assert result["auc_a"] == pytest.approx(skm.roc_auc_score(y, pa))
    assert result["auc_b"] == pytest.approx(skm.roc_auc_score(y, pb))
    assert result["difference"] == pytest.approx(auc_a - auc_b)
    assert result["z"] == pytest.approx(z)
    swapped = ev.delong(y, pb, pa)
    assert swapped["z"] == pytest.approx(-result["z"]) and swapped["p_value"] == pytest.approx(result["p_value"])


def test_delong_degenerate_cases():
    y, p = random_case(1, n=50)
    same = ev.delong(y, p, p)
    assert same["difference"] == 0.0 and same["z"] == 0.0 and same["p_value"] == 1.0
    one_class = ev.delong([1, 1, 1], [0.2, 0.3, 0.4], [0.5, 0.6, 0.7])
    assert math.isnan(one_class["auc_a"]) and math.isnan(one_class["p_value"])


def test_holm_matches_statsmodels():
    p = [0.01, 0.04, 0.03, 0.5]
    assert ev.holm(p) == pytest.approx(multipletests(p, method="holm")[1].tolist())


# --- end to end on a database -----------------------------------------------------------

def populate(db, n_patients=30, seed=0, runs=(("densenet121", 0.45, 1.5), ("vgg19", None, 0.6))):
    """Patients with one or two studies, two views each; one split; runs with test predictions.

    Returns:
        (run ids, split id, rows) where rows[i] = (image_id, study_id, patient_id, label).
    """
    rng = np.random.default_rng(seed)
    rows = []
    with dbm.write(db):
        split = db["splits"].insert({"seed": seed, "test_fraction": 0.3, "val_fraction": 0.15, "labels_hash": "h",
                                     "created_at": dbm.utc_now()}).last_pk
        for i in range(n_patients):
            patient = db["patients"].insert({"key": f"p-{seed}-{i}", "created_at": dbm.utc_now()}).last_pk
            for j in range(1 + i % 2):
                study = db["studies"].insert({"patient_id": patient, "key": f"s-{seed}-{i}-{j}", "origin": "demo",
                                              "created_at": dbm.utc_now()}).last_pk
                label = int(rng.random() < 0.4)
                for view in ("anterior", "posterior"):
                    pixels = np.full((2, 3), 1000 * seed + len(rows), dtype=np.uint16)  # tiny, unique (the pixel hash is)
                    image = insert_image(db, study, pixels, view, f"{len(rows)}.png", "png")
                    rows.append((image, study, patient, label))
        run_ids = []
        for backbone, threshold, separation in runs:
            run = db["runs"].insert({"backbone": backbone, "status": "done", "config": "{}", "config_hash": backbone,
                                     "split_id": split, "created_at": dbm.utc_now(), "threshold": threshold}).last_pk
            run_ids.append(run)
            for image, _, _, label in rows:
                probability = 1 / (1 + math.exp(-(rng.normal() + separation * (2 * label - 1))))
                db["predictions"].insert({"run_id": run, "image_id": image, "subset": "test", "label": label,
                                          "probability": probability})
    return run_ids, split, rows


def test_evaluate_end_to_end(db):
    (run, run_no_threshold), _, rows = populate(db)
    result = ev.evaluate(db, run, n_resamples=200, unit="image").as_json()
    assert (result["unit"], result["threshold_rule"], result["threshold_target"]) == ("image", "youden", None)
    assert result["metrics"] == result["image_level"]["metrics"] and result["image_level"]["threshold"] == 0.45
    text = json.dumps(result, allow_nan=False)  # NaN must already be None
    assert json.loads(text) == result
    assert {"run", "backbone", "threshold", "subset", "n_images", "n_studies", "metrics", "confusion", "study_level"} <= set(result)
    assert (result["run"], result["backbone"], result["threshold"], result["threshold_source"]) == (run, "densenet121", 0.45, "run")
    assert result["subset"] == "test" and result["n_images"] == len(rows)
    assert result["n_studies"] == len({r[1] for r in rows}) == result["study_level"]["n_studies"]
    assert result["n_patients"] == 30
    assert result["bootstrap"] == {"unit": "patient", "interval": "percentile", "level": 0.95, "n_resamples": 200, "seed": 0}
    assert list(result["metrics"]) == list(ev.METRICS)

    data = run_store.predictions(db, run, "test")
    expected = ev.point_metrics(data["label"], data["probability"], 0.45)
    for name in ev.METRICS:
        entry = result["metrics"][name]
        assert entry["value"] == pytest.approx(expected[name], abs=1e-4)
        low, high = entry["ci95"]
        assert low <= entry["value"] <= high
    assert result["confusion"] == ev.confusion(data["label"], data["probability"], 0.45)
    assert sum(result["confusion"].values()) == len(rows)

    studies = ev.study_level(data["study_id"], data["patient_id"], data["label"], data["probability"])
    study_expected = ev.point_metrics(studies["label"], studies["probability"], 0.45)
    assert result["study_level"]["metrics"]["auc"]["value"] == pytest.approx(study_expected["auc"], abs=1e-4)
    assert sum(result["study_level"]["confusion"].values()) == result["n_studies"]
    # No validation predictions: the study level falls back to the image threshold, and says so.
    assert result["study_level"]["threshold"] == 0.45 and "image-level threshold" in result["notes"][0]
    by_study = ev.evaluate(db, run, n_resamples=200).as_json()  # the default unit: the study
    assert by_study["unit"] == "study" and by_study["metrics"] == result["study_level"]["metrics"]
    assert by_study["confusion"] == result["study_level"]["confusion"] and by_study["image_level"] == result["image_level"]

    # A given threshold wins; a run without a stored threshold falls back to 0.5.
    assert ev.evaluate(db, run, threshold=0.7, n_resamples=50).threshold_source == "argument"
    fallback = ev.evaluate(db, run_no_threshold, n_resamples=50)
    assert (fallback.threshold, fallback.threshold_source) == (0.5, "default")
    # Undefined values become None: above every probability nothing is predicted metastatic.
    none_positive = ev.evaluate(db, run, threshold=1.0, n_resamples=50).as_json()
    assert none_positive["metrics"]["precision"] == {"value": None, "ci95": [None, None]}
    assert none_positive["confusion"]["tp"] + none_positive["confusion"]["fp"] == 0
    json.dumps(none_positive, allow_nan=False)


def test_evaluate_says_what_is_missing(db):
    (run, _), _, _ = populate(db, n_patients=3)
    with pytest.raises(errors.RunNotFound, match="run 999 does not exist"):
        ev.evaluate(db, 999)
    with pytest.raises(ev.NoPredictionsError, match=f"run {run} \\(done\\) has no val predictions"):
        ev.evaluate(db, run, subset="val")


def test_youden_falls_back_to_half_when_nothing_separates():
    from bonescan_core.evaluation import youden_threshold

    assert youden_threshold(np.array([0, 1, 0, 1]), np.array([0.3, 0.3, 0.3, 0.3])) == 0.5
    assert youden_threshold(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])) == pytest.approx(0.8)
