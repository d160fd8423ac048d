"""bonescan_core.studystats against references: scikit-learn, scipy, statsmodels, hand
computation, a loop-by-loop Obuchowski estimator and a brute-force clustered bootstrap; and
the issue-11 invariance: writing every study twice changes neither n nor any p."""

from __future__ import annotations

import math

import numpy as np
import pytest
import statsmodels.api as sm
from scipy.optimize import minimize_scalar
from sklearn import metrics as skm
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar
from statsmodels.stats.multitest import multipletests

from bonescan_core import evaluation as ev
from bonescan_core import studystats as ss
from bonescan_core.errors import InputError


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def two_models(seed, n=120, prevalence=0.4, sep_a=1.2, sep_b=0.7, ties=False):
    """Labels and two models' probabilities on the same studies (model a the better one)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    shared = rng.normal(size=n)  # both models see the same study: correlated scores
    pa = sigmoid(shared + 0.7 * rng.normal(size=n) + sep_a * (2 * y - 1))
    pb = sigmoid(shared + 0.7 * rng.normal(size=n) + sep_b * (2 * y - 1))
    if ties:
        pa, pb = np.round(pa, 1), np.round(pb, 1)
    return y, pa, pb


def clustered_models(seed, n_patients=50, spread=1.5):
    """Studies nested in patients (1-4 each) with a strong patient effect in each model's scores,
    so studies of one patient are correlated; labels mostly shared within a patient, some mixed
    (a follow-up study that turned metastatic), so clusters hold positives and negatives."""
    rng = np.random.default_rng(seed)
    per_patient = rng.integers(1, 5, n_patients)
    patient = np.repeat(np.arange(n_patients), per_patient)
    patient_positive = (rng.random(n_patients) < 0.4)[patient]
    y = (rng.random(patient.size) < np.where(patient_positive, 0.85, 0.1)).astype(int)
    effect_a, effect_b = (spread * rng.normal(size=n_patients))[patient], (spread * rng.normal(size=n_patients))[patient]
    pa = sigmoid(effect_a + 0.5 * rng.normal(size=patient.size) + 1.2 * (2 * y - 1))
    pb = sigmoid(effect_b + 0.5 * rng.normal(size=patient.size) + 0.8 * (2 * y - 1))
    return y, pa, pb, patient


# --- 1. study scores ------------------------------------------------------------------------

def test_study_scores_max_and_mean_by_hand():
    ids = np.array([7, 3, 7, 5, 3, 3])
    p = np.array([0.2, 0.9, 0.6, 0.4, 0.1, 0.5])
    unique, top = ss.study_scores(ids, p)
    assert unique.tolist() == [3, 5, 7] and unique.dtype == ids.dtype
    assert top.tolist() == [0.9, 0.4, 0.6] and top.dtype == np.float64
    _, mean = ss.study_scores(ids, p, how="mean")
    np.testing.assert_allclose(mean, [0.5, 0.4, 0.4], rtol=0, atol=1e-15)


def test_study_scores_collapse_one_output_per_study_written_per_image():
    # A composite run: each study's single output is stored once per image (two views).
    studies = np.array([1, 2, 3])
    outputs = np.array([0.31, 0.77, 0.05])
    rows_ids, rows_p = np.repeat(studies, 2), np.repeat(outputs, 2)
    for how in ss.AGGREGATIONS:
        unique, scores = ss.study_scores(rows_ids, rows_p, how=how)
        assert unique.tolist() == studies.tolist()
        assert scores.tolist() == outputs.tolist()


def test_study_scores_refuses_bad_input():
    with pytest.raises(InputError, match="aggregation"):
        ss.study_scores([1, 2], [0.1, 0.2], how="median")
    with pytest.raises(InputError, match="one id per row"):
        ss.study_scores([1], [0.1, 0.2])
    with pytest.raises(InputError, match="within"):
        ss.study_scores([1, 2], [0.1, 1.2])


# --- 2. threshold rules -----------------------------------------------------------------------

def test_youden_rule_is_evaluations_youden_threshold():
    y, p, _ = two_models(0)
    chosen = ss.choose_threshold(y, p)
    assert chosen == ss.Threshold(ev.youden_threshold(y, p), "youden")
    fpr, tpr, thresholds = skm.roc_curve(y, p)
    assert chosen.value == thresholds[np.argmax(tpr - fpr)]


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("target", [0.7, 0.9, 0.95, 1.0])
def test_sensitivity_rule_is_the_highest_threshold_reaching_the_target(target, ties):
    y, p, _ = two_models(1, ties=ties)
    chosen = ss.choose_threshold(y, p, rule="sensitivity", target=target)
    # Brute force: every observed score as a threshold (scikit-learn's recall is checked against
    # this ratio in test_evaluation; computed directly here to keep the file fast).
    reaching = [t for t in np.unique(p) if np.mean(p[y == 1] >= t) >= target]
    assert chosen == ss.Threshold(max(reaching), f"sensitivity>={target:g}")


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95])
def test_npv_rule_is_the_highest_threshold_reaching_the_target(target):
    y, p, _ = two_models(2, ties=True)
    chosen = ss.choose_threshold(y, p, rule="npv", target=target)
    reaching = [
        t for t in np.unique(p)
        if np.any(p < t) and np.mean(y[p < t] == 0) >= target  # NPV: negatives among the studies called negative
    ]
    assert chosen == ss.Threshold(max(reaching), f"npv>={target:g}")


def test_sensitivity_rule_by_hand():
    # 100 positives at 0.01 ... 1.00: 0.55 * 100 is 55.00000000000001 in floating point, yet 55
    # of them suffice, so the threshold is the 55th highest positive, 0.46.
    y = np.r_[np.ones(100, int), np.zeros(3, int)]
    p = np.r_[np.arange(1, 101) / 100, 0.05, 0.15, 0.95]
    assert ss.choose_threshold(y, p, rule="sensitivity", target=0.55) == ss.Threshold(0.46, "sensitivity>=0.55")


def test_threshold_rules_refuse_what_they_cannot_do():
    y, p, _ = two_models(3)
    with pytest.raises(InputError, match="target"):
        ss.choose_threshold(y, p, rule="sensitivity")
    with pytest.raises(InputError, match="no target"):
        ss.choose_threshold(y, p, rule="youden", target=0.9)
    with pytest.raises(InputError, match="both classes"):
        ss.choose_threshold(np.zeros(5, int), np.linspace(0, 1, 5), rule="sensitivity", target=0.9)
    with pytest.raises(InputError, match="rule must be"):
        ss.choose_threshold(y, p, rule="f1")
    # Positives score below every negative: no threshold rules out with NPV >= 0.9.
    with pytest.raises(InputError, match="no threshold reaches an NPV"):
        ss.choose_threshold([1, 1, 1, 0, 0], [0.1, 0.2, 0.3, 0.8, 0.9], rule="npv", target=0.9)


# --- 3. paired patient-level bootstrap ---------------------------------------------------------

def pair_auc(y, s):
    """AUC as the share of positive-negative pairs ranked right, ties one half (Mann-Whitney)."""
    difference = s[y == 1][:, None] - s[y == 0][None, :]
    return float(np.mean((difference > 0) + 0.5 * (difference == 0)))


def test_bootstrap_p_by_hand():
    # 3 of 9 resamples <= 0, 6 >= 0 (one exactly 0): p = 2 * (1 + 3) / (9 + 1).
    deltas = np.array([-0.2, -0.1, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    assert ss._bootstrap_p(deltas) == pytest.approx(0.8, abs=1e-15)
    assert ss._bootstrap_p(np.full(50, 0.3)) == pytest.approx(2 / 51, abs=1e-15)  # never 0
    assert ss._bootstrap_p(np.zeros(50)) == 1.0
    assert math.isnan(ss._bootstrap_p(np.full(3, np.nan)))


def test_paired_bootstrap_against_brute_force_resamples():
    """Every resample rebuilt as an explicit list of studies and scored from scratch: AUC over all
    positive-negative pairs, sensitivity and specificity as plain ratios; point values by scikit-learn."""
    y, pa, pb, patient = clustered_models(4, n_patients=30)
    ta, tb, n_resamples, seed = 0.5, 0.4, 200, 11
    result = ss.paired_bootstrap(y, pa, pb, patient, ta, tb, n_resamples=n_resamples, seed=seed)

    weights = ev.bootstrap_weights(patient, n_resamples, seed)  # the same draws, by construction
    deltas = {"delta_auc": [], "delta_sensitivity": [], "delta_specificity": []}
    for row in weights:
        rows = np.repeat(np.arange(y.size), row)  # every study of a drawn patient, as often as drawn
        yr = y[rows]
        if yr.min() == yr.max():
            continue  # one class: every difference undefined in this resample
        deltas["delta_auc"].append(pair_auc(yr, pa[rows]) - pair_auc(yr, pb[rows]))
        positive, negative = yr == 1, yr == 0
        deltas["delta_sensitivity"].append(np.mean(pa[rows][positive] >= ta) - np.mean(pb[rows][positive] >= tb))
        deltas["delta_specificity"].append(np.mean(pa[rows][negative] < ta) - np.mean(pb[rows][negative] < tb))
    point = {
        "delta_auc": skm.roc_auc_score(y, pa) - skm.roc_auc_score(y, pb),
        "delta_sensitivity": skm.recall_score(y, pa >= ta) - skm.recall_score(y, pb >= tb),
        "delta_specificity": skm.recall_score(y, pa >= ta, pos_label=0) - skm.recall_score(y, pb >= tb, pos_label=0),
    }
    for name, values in deltas.items():
        values = np.array(values)
        below = (1 + np.sum(values <= 0)) / (values.size + 1)
        above = (1 + np.sum(values >= 0)) / (values.size + 1)
        assert result[name]["value"] == pytest.approx(point[name], abs=1e-12)
        assert result[name]["n_valid"] == values.size
        np.testing.assert_allclose(result[name]["ci95"], np.quantile(values, [0.025, 0.975]), rtol=0, atol=1e-12)
        assert result[name]["p"] == pytest.approx(min(1.0, 2 * min(below, above)), abs=1e-12)
    assert result["n_studies"] == y.size and result["n_patients"] == 30 and result["n_resamples"] == n_resamples


def test_bad_input_is_an_input_error():
    with pytest.raises(InputError, match="equally long"):
        ss.paired_bootstrap([0, 1, 1], [0.1, 0.2], [0.3, 0.4], [1, 2], 0.5, 0.5)
    with pytest.raises(InputError, match="one id per row"):
        ss.clustered_delong([0, 1], [0.1, 0.9], [0.3, 0.4], [1, 2, 3])
    with pytest.raises(InputError, match="within"):
        ss.calibration_intercept_slope([0, 1], [0.1, 1.5])


def test_paired_bootstrap_same_model_gives_no_difference_and_p_one():
    y, pa, _, patient = clustered_models(5)
    result = ss.paired_bootstrap(y, pa, pa, patient, 0.5, 0.5, n_resamples=300, seed=0)
    for name in ("delta_auc", "delta_sensitivity", "delta_specificity"):
        assert result[name]["value"] == 0.0 and result[name]["ci95"] == (0.0, 0.0) and result[name]["p"] == 1.0


def test_paired_bootstrap_detects_a_real_difference_and_is_reproducible():
    y, pa, pb = two_models(6, n=200, sep_a=2.0, sep_b=0.3)
    patient = np.arange(y.size) // 2  # two studies per patient
    first = ss.paired_bootstrap(y, pa, pb, patient, 0.5, 0.5, n_resamples=2000, seed=3)
    again = ss.paired_bootstrap(y, pa, pb, patient, 0.5, 0.5, n_resamples=2000, seed=3)
    other = ss.paired_bootstrap(y, pa, pb, patient, 0.5, 0.5, n_resamples=2000, seed=4)
    assert first == again
    assert first["delta_auc"]["ci95"] != other["delta_auc"]["ci95"]
    auc = first["delta_auc"]
    assert auc["ci95"][0] > 0 and auc["p"] == pytest.approx(2 / 2001)  # every resample favours a
    assert auc["a"] == pytest.approx(skm.roc_auc_score(y, pa), abs=1e-12)


# --- 4. clustered DeLong --------------------------------------------------------------------------

def obuchowski_by_loops(y, pa, pb, cluster):
    """Obuchowski (1997) written out with the psi kernel and explicit loops over clusters."""
    def psi(x, z):
        return 1.0 if x > z else (0.5 if x == z else 0.0)

    ids = sorted(set(cluster.tolist()))
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    big_m, big_n = pos.size, neg.size
    comps = {}
    for name, s in (("a", pa), ("b", pb)):
        auc = sum(psi(s[i], s[j]) for i in pos for j in neg) / (big_m * big_n)
        x = [sum(sum(psi(s[i], s[j]) for j in neg) / big_n for i in pos if cluster[i] == c) for c in ids]
        w = [sum(sum(psi(s[i], s[j]) for i in pos) / big_m for j in neg if cluster[j] == c) for c in ids]
        comps[name] = (auc, np.array(x), np.array(w))
    m_i = np.array([np.sum((cluster == c) & (y == 1)) for c in ids])
    n_i = np.array([np.sum((cluster == c) & (y == 0)) for c in ids])
    n_clusters, i10, i01 = len(ids), int(np.sum(m_i > 0)), int(np.sum(n_i > 0))

    def cov(u, v):
        (auc_u, xu, wu), (auc_v, xv, wv) = comps[u], comps[v]
        s10 = i10 / ((i10 - 1) * big_m) * np.sum((xu - m_i * auc_u) * (xv - m_i * auc_v))
        s01 = i01 / ((i01 - 1) * big_n) * np.sum((wu - n_i * auc_u) * (wv - n_i * auc_v))
        s11 = n_clusters / (n_clusters - 1) * np.sum((xu - m_i * auc_u) * (wv - n_i * auc_v))
        s11_t = n_clusters / (n_clusters - 1) * np.sum((xv - m_i * auc_v) * (wu - n_i * auc_u))
        return s10 / big_m + s01 / big_n + (s11 + s11_t) / (big_m * big_n)

    return comps["a"][0] - comps["b"][0], cov("a", "a") + cov("b", "b") - 2 * cov("a", "b")


@pytest.mark.parametrize("ties", [False, True])
def test_clustered_delong_with_one_study_per_cluster_is_delong(ties):
    y, pa, pb = two_models(7, ties=ties)
    ordinary = ev.delong(y, pa, pb)
    clustered = ss.clustered_delong(y, pa, pb, np.arange(y.size) * 10 + 3)
    assert clustered["delta"] == pytest.approx(ordinary["difference"], abs=1e-10)
    assert clustered["z"] == pytest.approx(ordinary["z"], abs=1e-10)
    assert clustered["p"] == pytest.approx(ordinary["p_value"], abs=1e-10)
    np.testing.assert_allclose(clustered["ci95"], ordinary["ci95"], rtol=0, atol=1e-10)


def test_clustered_delong_equals_the_formula_written_out():
    y, pa, pb, patient = clustered_models(8, n_patients=15)
    pa, pb = np.round(pa, 1), np.round(pb, 1)  # ties exercise the one-half kernel
    delta, variance = obuchowski_by_loops(y, pa, pb, patient)
    result = ss.clustered_delong(y, pa, pb, patient)
    assert result["delta"] == pytest.approx(delta, abs=1e-12)
    assert result["se"] ** 2 == pytest.approx(variance, abs=1e-12)
    assert result["n_clusters"] == 15


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clustered_delong_variance_matches_a_clustered_bootstrap(seed):
    """The variance of dAUC under 10,000 patient resamples, against Obuchowski's estimate.

    Tolerance 10%: the Monte Carlo error of a variance from B = 10,000 resamples is about
    sqrt(2 / B) = 1.4% (times a kurtosis factor near 1); the plug-in bootstrap variance is
    smaller than the (I - 1)-corrected estimator by O(1 / I), about 2% at I = 50 patients; the
    rest is the O(1 / I^2) difference of the two estimators. Observed ratios: 0.98 to 1.05.
    The ordinary DeLong variance on the same data is 0.44 to 0.56 of it, which the last assert
    shows fails this check.
    """
    y, pa, pb, patient = clustered_models(seed)
    weights = ev.bootstrap_weights(patient, 10_000, seed + 100).astype(np.float64)
    auc_a, _ = ev.weighted_ranking_metrics(y.astype(np.float64), pa, weights)
    auc_b, _ = ev.weighted_ranking_metrics(y.astype(np.float64), pb, weights)
    bootstrap_variance = np.nanvar(auc_a - auc_b, ddof=1)
    clustered = ss.clustered_delong(y, pa, pb, patient)
    assert 0.9 < clustered["se"] ** 2 / bootstrap_variance < 1.1
    ordinary = ev.delong(y, pa, pb)
    ordinary_variance = ((ordinary["ci95"][1] - ordinary["difference"]) / 1.959963984540054) ** 2
    assert ordinary_variance / bootstrap_variance < 0.7


def test_clustered_delong_undefined_cases():
    assert math.isnan(ss.clustered_delong([1, 1, 1], [0.2, 0.3, 0.4], [0.1, 0.5, 0.9], [1, 2, 3])["delta"])
    # Only one patient holds the positives: no variance between clusters.
    one = ss.clustered_delong([1, 1, 0, 0, 0], [0.9, 0.8, 0.1, 0.4, 0.2], [0.7, 0.9, 0.3, 0.2, 0.1], [1, 1, 2, 3, 4])
    assert one["delta"] == pytest.approx(0.0) and math.isnan(one["se"])
    same = ss.clustered_delong([1, 0, 1, 0], [0.9, 0.1, 0.6, 0.4], [0.9, 0.1, 0.6, 0.4], [1, 1, 2, 3])
    assert same["p"] == 1.0 and same["z"] == 0.0


# --- 5. McNemar and Holm -------------------------------------------------------------------------

@pytest.mark.parametrize("n", [40, 400])  # few discordant studies (exact) and many (chi-square)
def test_mcnemar_studies_against_statsmodels(n):
    y, pa, pb = two_models(9, n=n)
    result = ss.mcnemar_studies(y, pa, pb, 0.5, 0.45)
    right_a, right_b = (pa >= 0.5) == y, (pb >= 0.45) == y
    table = [[np.sum(right_a & right_b), np.sum(right_a & ~right_b)], [np.sum(~right_a & right_b), np.sum(~right_a & ~right_b)]]
    exact = result["b"] + result["c"] < ev.MCNEMAR_EXACT_BELOW
    reference = sm_mcnemar(table, exact=exact, correction=True)
    assert (result["b"], result["c"]) == (table[0][1], table[1][0])
    assert result["p"] == pytest.approx(reference.pvalue, abs=1e-12)
    assert result["method"] == ("exact binomial" if exact else "chi-square with continuity correction")


def test_add_holm_adjusts_every_p_shown_together():
    shown = [{"name": "dAUC", "p": 0.01}, {"name": "dsens", "p": 0.04}, {"name": "mcnemar", "p": 0.03}, {"name": "x", "p": math.nan}]
    adjusted = ss.add_holm(shown)
    expected = multipletests([0.01, 0.04, 0.03], method="holm")[1]
    np.testing.assert_allclose([r["p_holm"] for r in adjusted[:3]], expected, rtol=0, atol=1e-15)
    assert math.isnan(adjusted[3]["p_holm"]) and adjusted[0]["name"] == "dAUC" and "p_holm" not in shown[0]


# --- 6. calibration -------------------------------------------------------------------------------

def miscalibrated(seed, n=300, intercept=-0.4, slope=0.6):
    """Validation labels drawn from logit P = intercept + slope * z: the model's z is over-confident."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, n)
    y = (rng.random(n) < sigmoid(intercept + slope * z)).astype(int)
    return y, z


def test_fit_temperature_is_the_maximum_likelihood_temperature():
    y, z = miscalibrated(10, intercept=0.0)
    temperature = ss.fit_temperature(y, z)
    # Temperature scaling is logistic regression on z without intercept: coefficient 1 / T.
    glm = sm.GLM(y, z[:, None], family=sm.families.Binomial()).fit()
    assert temperature == pytest.approx(1.0 / glm.params[0], rel=1e-6)

    def loss(t):
        return float(np.mean(np.logaddexp(0, z / t) - y * z / t))

    reference = minimize_scalar(loss, bounds=ss.TEMPERATURE_BOUNDS, method="bounded", options={"xatol": 1e-10})
    assert temperature == pytest.approx(reference.x, rel=1e-6)
    assert temperature > 1.0  # over-confident logits are softened
    calibrated = ss.apply_temperature(z, temperature)
    assert skm.log_loss(y, calibrated) < skm.log_loss(y, sigmoid(z))
    assert skm.roc_auc_score(y, calibrated) == skm.roc_auc_score(y, z)  # ranking kept


def test_fit_temperature_stops_at_its_bounds_and_refuses_one_class():
    y, z = miscalibrated(11, slope=-1.0)  # anti-informative logits: the best positive T is the largest
    assert ss.fit_temperature(y, z) == pytest.approx(ss.TEMPERATURE_BOUNDS[1], rel=1e-8)
    with pytest.raises(InputError, match="both classes"):
        ss.fit_temperature(np.ones(4), np.arange(4.0))


def test_platt_scaling_against_statsmodels_and_removes_a_class_weight_shift():
    y, z = miscalibrated(15, n=2000, intercept=0.0, slope=1.0)
    shifted = z + math.log(1.5)  # what class weights 1.5 : 1 do to the log-odds
    platt = ss.fit_platt(y, shifted)
    glm = sm.GLM(y, sm.add_constant(shifted), family=sm.families.Binomial()).fit()
    assert (platt.intercept, platt.slope) == pytest.approx(tuple(glm.params), abs=1e-8)
    recalibrated = ss.calibration_intercept_slope(y, ss.apply_platt(shifted, platt))
    assert recalibrated["intercept"]["value"] == pytest.approx(0.0, abs=1e-6)  # in the large: exact on the fitting data
    assert recalibrated["slope"]["value"] == pytest.approx(1.0, abs=1e-6)
    # Temperature scaling cannot remove the shift: calibration-in-the-large stays off.
    tempered = ss.apply_temperature(shifted, ss.fit_temperature(y, shifted))
    assert ss.calibration_intercept_slope(y, tempered)["intercept"]["value"] < -0.2
    with pytest.raises(InputError, match="both classes"):
        ss.fit_platt(np.zeros(3), np.arange(3.0))


def test_logit_round_trips_and_clips():
    p = np.array([0.0, 0.2, 0.5, 0.9, 1.0])
    z = ss.logit(p)
    assert np.isfinite(z).all()
    np.testing.assert_allclose(ss.apply_temperature(z, 1.0)[1:4], p[1:4], rtol=0, atol=1e-15)


def test_calibration_intercept_and_slope_against_statsmodels():
    y, z = miscalibrated(12)
    p = sigmoid(z)
    result = ss.calibration_intercept_slope(y, p)
    z_clipped = ss.logit(p)
    slope_fit = sm.GLM(y, sm.add_constant(z_clipped), family=sm.families.Binomial()).fit()
    intercept_fit = sm.GLM(y, np.ones((y.size, 1)), family=sm.families.Binomial(), offset=z_clipped).fit()
    assert result["slope"]["value"] == pytest.approx(slope_fit.params[1], abs=1e-8)
    assert result["slope"]["se"] == pytest.approx(slope_fit.bse[1], abs=1e-8)
    np.testing.assert_allclose(result["slope"]["ci95"], slope_fit.conf_int()[1], rtol=0, atol=1e-8)
    assert result["intercept"]["value"] == pytest.approx(intercept_fit.params[0], abs=1e-8)
    assert result["intercept"]["se"] == pytest.approx(intercept_fit.bse[0], abs=1e-8)
    np.testing.assert_allclose(result["intercept"]["ci95"], intercept_fit.conf_int()[0], rtol=0, atol=1e-8)
    assert result["slope"]["ci95"][1] < 1.0  # the over-confidence built in is detected
    assert result["n"] == y.size


def test_calibration_intercept_and_slope_of_a_calibrated_model():
    y, z = miscalibrated(13, n=3000, intercept=0.0, slope=1.0)
    result = ss.calibration_intercept_slope(y, sigmoid(z))
    assert result["slope"]["ci95"][0] < 1.0 < result["slope"]["ci95"][1]
    assert result["intercept"]["ci95"][0] < 0.0 < result["intercept"]["ci95"][1]


def test_calibration_intercept_and_slope_undefined():
    separated = ss.calibration_intercept_slope([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])
    assert math.isnan(separated["slope"]["value"]) and math.isnan(separated["slope"]["ci95"][0])
    assert math.isnan(ss.calibration_intercept_slope([1, 1], [0.3, 0.4])["intercept"]["value"])


def test_ece_equal_mass_by_hand():
    y = np.array([0, 0, 1, 0, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.9])
    result = ss.ece_equal_mass(y, p, n_bins=3)
    # Bins {0.1, 0.2}, {0.3, 0.6}, {0.7, 0.9}: |0 - 0.15|, |0.5 - 0.45|, |1 - 0.8|, each 2/6.
    assert result["ece"] == pytest.approx((0.15 + 0.05 + 0.2) / 3, abs=1e-15)
    assert result["count"].tolist() == [2, 2, 2]
    np.testing.assert_allclose(result["mean_predicted"], [0.15, 0.45, 0.8], rtol=0, atol=1e-15)
    assert result["observed"].tolist() == [0.0, 0.5, 1.0]
    shuffled = np.random.default_rng(0).permutation(6)
    assert ss.ece_equal_mass(y[shuffled], p[shuffled], n_bins=3)["ece"] == result["ece"]
    assert ss.ece_equal_mass(y, p, n_bins=10)["count"].tolist() == [1] * 6  # fewer samples than bins


def test_decision_curve_by_hand():
    y = np.array([1, 1, 0, 0, 1, 0, 0, 0])
    p = np.array([0.9, 0.6, 0.55, 0.3, 0.25, 0.2, 0.1, 0.05])
    thresholds = np.array([0.0, 0.2, 0.5, 0.95])
    curve = ss.decision_curve(y, p, thresholds)
    expected = []
    for t in thresholds:
        tp = sum(1 for yi, pi in zip(y, p, strict=True) if pi >= t and yi == 1)
        fp = sum(1 for yi, pi in zip(y, p, strict=True) if pi >= t and yi == 0)
        expected.append(tp / 8 - fp / 8 * t / (1 - t))
    np.testing.assert_allclose(curve["net_benefit"], expected, rtol=0, atol=1e-15)
    np.testing.assert_allclose(curve["treat_all"], 3 / 8 - 5 / 8 * thresholds / (1 - thresholds), rtol=0, atol=1e-15)
    assert curve["treat_none"].tolist() == [0.0] * 4
    assert curve["net_benefit"][0] == curve["treat_all"][0]  # t = 0: the model treats everyone
    with pytest.raises(InputError, match=r"\[0, 1\)"):
        ss.decision_curve(y, p, [0.5, 1.0])


# --- 7. the study is the unit: writing every study twice changes nothing -------------------------

def image_rows(seed, n_patients=60):
    """Image-level rows of two per-image runs: 1-3 studies per patient, two views per study."""
    rng = np.random.default_rng(seed)
    studies_per_patient = rng.integers(1, 4, n_patients)
    study_patient = np.repeat(np.arange(n_patients) + 1000, studies_per_patient)
    study_label = (rng.random(study_patient.size) < 0.4).astype(int)
    study = np.repeat(np.arange(study_patient.size) + 1, 2)
    label, patient = study_label[study - 1], study_patient[study - 1]
    pa = sigmoid(rng.normal(size=study.size) + 1.0 * (2 * label - 1))
    pb = sigmoid(rng.normal(size=study.size) + 0.5 * (2 * label - 1))
    return {"study": study, "patient": patient, "label": label, "pa": pa, "pb": pb}


def study_pipeline(rows):
    """Image rows -> study scores -> paired bootstrap, clustered DeLong, McNemar, Holm over all p."""
    studies = ev.study_level(rows["study"], rows["patient"], rows["label"], rows["pa"])  # labels, patients
    ids_a, score_a = ss.study_scores(rows["study"], rows["pa"])
    ids_b, score_b = ss.study_scores(rows["study"], rows["pb"])
    assert np.array_equal(ids_a, studies["study_id"]) and np.array_equal(ids_b, studies["study_id"])
    y, patients = studies["label"], studies["patient_id"]
    boot = ss.paired_bootstrap(y, score_a, score_b, patients, 0.5, 0.5, n_resamples=2000, seed=7)
    delong = ss.clustered_delong(y, score_a, score_b, patients)
    test = ss.mcnemar_studies(y, score_a, score_b, 0.5, 0.5)
    shown = ss.add_holm([boot["delta_auc"], boot["delta_sensitivity"], boot["delta_specificity"], delong, test])
    return {"n_studies": boot["n_studies"], "n_patients": boot["n_patients"], "p": [r["p"] for r in shown],
            "p_holm": [r["p_holm"] for r in shown], "ci95": [boot[k]["ci95"] for k in ("delta_auc", "delta_sensitivity")],
            "mcnemar": (test["b"], test["c"])}


def test_writing_every_study_twice_changes_neither_n_nor_any_p():
    rows = image_rows(14)
    once = study_pipeline(rows)
    twice = study_pipeline({k: np.concatenate([v, v]) for k, v in rows.items()})
    shuffled_order = np.random.default_rng(1).permutation(2 * rows["study"].size)
    shuffled = study_pipeline({k: np.concatenate([v, v])[shuffled_order] for k, v in rows.items()})
    assert twice == once and shuffled == once
    assert once["n_studies"] == rows["study"].size // 2
    # The image-level tests the issue found biased do move when rows are written twice.
    doubled = {k: np.concatenate([v, v]) for k, v in rows.items()}
    image_once = ev.delong(rows["label"], rows["pa"], rows["pb"])["p_value"]
    image_twice = ev.delong(doubled["label"], doubled["pa"], doubled["pb"])["p_value"]
    assert image_twice < image_once


def test_a_stored_calibration_is_applied_the_one_way_and_unknown_methods_are_refused():
    raw = np.array([0.1, 0.5, 0.9])
    assert np.array_equal(ss.apply_calibration(None, raw), raw)
    assert np.array_equal(ss.apply_calibration({"method": "none"}, raw), raw)
    softened = ss.apply_calibration({"method": "temperature", "temperature": 2.0}, raw)
    expected = 1.0 / (1.0 + np.exp(-np.log(raw / (1 - raw)) / 2.0))
    assert np.allclose(softened, expected) and softened[1] == pytest.approx(0.5)
    shifted = ss.apply_calibration({"method": "platt", "intercept": -1.0, "slope": 1.0}, raw)
    assert np.allclose(shifted, 1.0 / (1.0 + np.exp(1.0 - np.log(raw / (1 - raw)))))
    with pytest.raises(InputError, match="unknown calibration method"):
        ss.apply_calibration({"method": "isotonic"}, raw)
