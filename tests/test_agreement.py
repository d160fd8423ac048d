"""Cohen's kappa against scikit-learn (estimate) and statsmodels (95% CI); pairwise agreement."""

import math

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score
from statsmodels.stats.inter_rater import cohens_kappa as statsmodels_kappa

from bonescan_core import review as rv
from bonescan_core.agreement import cohen_kappa, confusion_table, pairwise


@pytest.mark.parametrize("seed", range(5))
def test_kappa_matches_scikit_learn_and_statsmodels(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 200))
    first = rng.choice(rv.LABELS, size=n, p=[0.4, 0.6])
    flip = rng.random(n) < rng.uniform(0.05, 0.4)
    second = np.where(flip, np.where(first == "metastatic", "non_metastatic", "metastatic"), first)
    kappa, (low, high) = cohen_kappa(list(first), list(second))
    assert kappa == pytest.approx(cohen_kappa_score(first, second), abs=1e-12)
    reference = statsmodels_kappa(confusion_table(first, second))
    assert (low, high) == pytest.approx((max(-1, reference.kappa_low), min(1, reference.kappa_upp)), abs=1e-12)
    assert low <= kappa <= high


def test_kappa_edge_cases():
    assert cohen_kappa(["metastatic", "non_metastatic"] * 5, ["metastatic", "non_metastatic"] * 5)[0] == pytest.approx(1.0)
    kappa, ci = cohen_kappa(["metastatic"] * 4, ["metastatic"] * 4)  # chance agreement 1: undefined
    assert math.isnan(kappa) and math.isnan(ci[0])
    with pytest.raises(ValueError):
        cohen_kappa([], [])


def test_ci_narrows_with_more_studies():
    base_a = ["metastatic"] * 4 + ["non_metastatic"] * 6
    base_b = ["metastatic"] * 3 + ["non_metastatic"] * 7
    _, small = cohen_kappa(base_a, base_b)
    _, large = cohen_kappa(base_a * 10, base_b * 10)
    assert large[1] - large[0] < small[1] - small[0]


def test_pairwise_from_the_database(db, studies):
    labels_ann = ["metastatic", "metastatic", "non_metastatic", "non_metastatic", "metastatic"]
    labels_bob = ["metastatic", "non_metastatic", "non_metastatic", "non_metastatic", "metastatic"]
    for study, a, b in zip(studies, labels_ann, labels_bob, strict=False):
        for name, label in (("ann", a), ("bob", b)):
            criteria = ("typical_pattern",) if label == "metastatic" else ("equivocal",)
            rv.add_review(db, rv.Review(study, name, "include", label=label, criteria=criteria))
    rv.add_review(db, rv.Review(studies[5], "ann", "exclude", exclusion_reason="poor_quality"))
    rv.add_review(db, rv.Review(studies[5], "bob", "include", label="metastatic", criteria=("flare",)))
    rv.add_review(db, rv.Review(studies[6], "cat", "include", label="metastatic", criteria=("flare",)))  # alone
    (pair,) = pairwise(db)
    assert pair.reviewers == ("ann", "bob") and pair.n == 5
    assert pair.kappa == pytest.approx(cohen_kappa_score(labels_ann, labels_bob), abs=1e-6)
    assert pair.percent_agreement == pytest.approx(80.0)
    assert pair.table == [[2, 1], [0, 2]]
    assert [d["study_id"] for d in pair.disagreements] == [studies[1], studies[5]]
    assert pair.as_json()["kappa_ci95"][0] <= pair.kappa <= pair.as_json()["kappa_ci95"][1]
