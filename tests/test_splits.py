"""Splits: by patient, stratified by label, stored with seed and labels hash, reused while labels hold."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from conftest import REPO

from bonescan_core import db as dbm
from bonescan_core import splits
from bonescan_core.review import Review, add_review


def add_patients(db, studies_per_patient: list[int], positive_rate: float = 0.4, seed: int = 0) -> dict[int, int]:
    """Patients with the given numbers of studies, each study labelled (about ``positive_rate`` metastatic)
    by reviewer ``reader``; returns {study_id: patient_id}."""
    rng = np.random.default_rng(seed)
    owner: dict[int, int] = {}
    with dbm.write(db):
        for p, n in enumerate(studies_per_patient):
            patient = db["patients"].insert({"key": f"split-patient-{seed}-{p}", "created_at": dbm.utc_now()}).last_pk
            for s in range(n):
                study = db["studies"].insert({"patient_id": patient, "key": f"split-study-{seed}-{p}-{s}", "origin": "import",
                                              "created_at": dbm.utc_now()}).last_pk
                owner[study] = patient
                metastatic = rng.random() < positive_rate
                add_review(db, Review(study_id=study, reviewer="reader", decision="include",
                                      label="metastatic" if metastatic else "non_metastatic",
                                      criteria=("typical_pattern",) if metastatic else ("no_abnormal_uptake",)))
    return owner


def label(db, study_id: int, value: str) -> None:
    criteria = ("typical_pattern",) if value == "metastatic" else ("no_abnormal_uptake",)
    add_review(db, Review(study_id=study_id, reviewer="reader", decision="include", label=value, criteria=criteria))


def test_no_patient_in_two_subsets_and_stratified(db):
    rng = np.random.default_rng(3)
    owner = add_patients(db, list(rng.integers(1, 4, size=120)), seed=1)  # 1-3 studies per patient
    excluded = next(iter(owner))
    add_review(db, Review(study_id=excluded, reviewer="reader", decision="exclude", exclusion_reason="artifact"))
    split_id = splits.make_split(db, seed=7)
    subsets = splits.get_split(db, split_id)["subsets"]
    assert set(subsets) == {"train", "val", "test"}

    members = [sid for ids in subsets.values() for sid in ids]
    assert len(members) == len(set(members)) == len(owner) - 1 and excluded not in members
    patient_subsets: dict[int, set[str]] = {}
    for subset, ids in subsets.items():
        for sid in ids:
            patient_subsets.setdefault(owner[sid], set()).add(subset)
    assert all(len(s) == 1 for s in patient_subsets.values()), "a patient's studies must share one subset"

    labels = splits.labelled_studies(db)
    overall = np.mean([labels[sid] == "metastatic" for sid in members])
    total = len(members)
    for subset, share in {"train": 0.70 * 0.85, "val": 0.70 * 0.15, "test": 0.30}.items():
        ids = subsets[subset]
        assert abs(len(ids) / total - share) < 0.03, subset
        rate = np.mean([labels[sid] == "metastatic" for sid in ids])
        assert abs(rate - overall) < 0.05, f"{subset}: {rate:.2f} metastatic vs {overall:.2f} overall"


def test_stored_with_seed_and_labels_hash_and_reproducible(db):
    add_patients(db, [2] * 30, seed=2)  # two studies per patient
    first = splits.make_split(db, seed=5)
    again = splits.make_split(db, seed=5)
    other = splits.make_split(db, seed=6)
    assert splits.get_split(db, first)["subsets"] == splits.get_split(db, again)["subsets"]
    assert splits.get_split(db, first)["subsets"] != splits.get_split(db, other)["subsets"]

    info = splits.split_info(db, first)
    labels = splits.labelled_studies(db)
    assert (info["seed"], info["test_fraction"], info["val_fraction"]) == (5, 0.30, 0.15)
    assert info["labels_hash"] == splits.labels_hash(labels) and len(info["labels_hash"]) == 64
    stored = splits.split_labels(db, first)
    assert {sid: lab for sid, (_, lab) in stored.items()} == labels

    payload = splits.get_split(db, first)
    assert json.loads(json.dumps(payload)) == {"id": first, "subsets": payload["subsets"], "cohorts": ["default"],
                                               "grouping": "patient"}  # add_patients' patients are known (NULL: before 011)
    assert all(ids == sorted(ids) for ids in payload["subsets"].values())
    with pytest.raises(splits.SplitError, match="does not exist"):
        splits.get_split(db, 999)


def test_latest_split_is_reused_until_a_label_changes(db):
    owner = add_patients(db, [1] * 40, seed=4)
    assert splits.latest_split(db, seed=0) is None
    made = splits.ensure_split(db, seed=0)
    assert splits.ensure_split(db, seed=0) == made == splits.latest_split(db, seed=0)
    assert splits.latest_split(db, seed=1) is None and splits.latest_split(db, seed=0, test=0.2) is None
    newer = splits.make_split(db, seed=0)
    assert splits.latest_split(db, seed=0) == newer

    study = next(iter(owner))
    current = splits.labelled_studies(db)[study]
    label(db, study, "metastatic" if current == "non_metastatic" else "non_metastatic")
    assert splits.latest_split(db, seed=0) is None, "a changed label needs a new split"
    assert splits.ensure_split(db, seed=0) not in (made, newer)


def test_too_few_labels_or_a_missing_class_is_a_clear_error(db):
    owner = add_patients(db, [1] * 8, positive_rate=0.0, seed=5)
    with pytest.raises(splits.SplitError) as caught:
        splits.make_split(db)
    message = str(caught.value)
    assert "0 metastatic and 8 non-metastatic" in message and "at least 5" in message and "label" in message

    for study in list(owner)[:3]:
        label(db, study, "metastatic")
    with pytest.raises(splits.SplitError, match="3 metastatic and 5 non-metastatic"):
        splits.make_split(db)
    with pytest.raises(splits.SplitError, match="between 0 and 1"):
        splits.make_split(db, test=1.2)


def test_assign_is_seeded_and_hits_targets_on_synthetic_groups():
    rng = np.random.default_rng(0)
    patients = {}
    study = 0
    for pid in range(300):
        patients[pid] = []
        for _ in range(int(rng.integers(1, 5))):
            patients[pid].append((study, "metastatic" if rng.random() < 0.4 else "non_metastatic"))
            study += 1
    result = splits.assign(patients, seed=1)
    assert result == splits.assign(patients, seed=1) and result != splits.assign(patients, seed=2)
    for studies in patients.values():
        assert len({result[s] for s, _ in studies}) == 1
    labels = {s: lab for studies in patients.values() for s, lab in studies}
    totals = Counter(labels.values())
    for subset, share in splits.subset_fractions(0.30, 0.15).items():
        counts = Counter(labels[s] for s, sub in result.items() if sub == subset)
        for name in ("metastatic", "non_metastatic"):
            assert abs(counts[name] - share * totals[name]) <= 4, (subset, name)


def test_split_module_imports_no_keras():
    code = ("import sys, bonescan_core.splits, bonescan_core.training, bonescan_core.models, bonescan_core.preprocess\n"
            "print(sorted(m for m in ('tensorflow', 'keras', 'jax', 'torch') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert result.stdout.strip() == "[]"
