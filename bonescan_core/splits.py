"""Patient-grouped, label-stratified train/validation/test splits, stored with their seed.

The paper shuffles and holds out 30 % for test, then splits the rest 85 % train / 15 %
validation. Here the unit of assignment is the PATIENT (all of a patient's studies land in
one subset, so no patient is seen in training and tested on), and the assignment is
stratified by label: each subset gets about the overall share of metastatic studies.

Only included studies with a training label (``review.study_statuses``) take part. A split
stores the label each study had when it was made and a ``labels_hash`` of those (study,
label) pairs, so :func:`latest_split` can hand every backbone the same split as long as the
labels have not changed. Never imports Keras or TensorFlow (``bonescan split`` starts fast).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Mapping

import numpy as np
import sqlite_utils

from bonescan_core import db as dbm
from bonescan_core import errors
from bonescan_core.review import LABELS, study_statuses

SUBSETS = ("train", "val", "test")
DEFAULT_TEST = 0.30  # of all labelled studies
DEFAULT_VAL = 0.15  # of the non-test part
MIN_PATIENTS = 3


class SplitError(errors.InputError):
    """A split cannot be made or found; the message says how many studies of each class there are and what to do."""


def labelled_studies(db: sqlite_utils.Database) -> dict[int, str]:
    """{study_id: label} of the included studies that have a training label."""
    return {sid: status.label for sid, status in study_statuses(db).items() if status.included and status.label in LABELS}


def labels_hash(labels: Mapping[int, str]) -> str:
    """Hex sha256 of the sorted (study_id, label) pairs (JSON ``[[id, "label"], ...]``)."""
    pairs = sorted((int(study_id), str(label)) for study_id, label in labels.items())
    return hashlib.sha256(json.dumps(pairs, separators=(",", ":")).encode()).hexdigest()


def subset_fractions(test: float, val: float) -> dict[str, float]:
    """Share of all studies per subset: test, val of the rest, train what remains."""
    if not 0.0 < test < 1.0 or not 0.0 < val < 1.0:
        raise SplitError(f"test ({test}) and val ({val}) must each be between 0 and 1, e.g. --test 0.30 --val 0.15")
    return {"train": (1.0 - test) * (1.0 - val), "val": (1.0 - test) * val, "test": test}


def minimum_per_class(test: float, val: float) -> int:
    """Studies of each class needed so that every subset expects at least half a study of it."""
    return max(2, math.ceil(0.5 / min(subset_fractions(test, val).values()) - 1e-9))


def assign(
    patients: Mapping[int, list[tuple[int, str]]], seed: int, test: float = DEFAULT_TEST, val: float = DEFAULT_VAL
) -> dict[int, str]:
    """Assign whole patients to subsets, stratified by label (seeded greedy).

    Patients are shuffled with ``numpy.random.default_rng(seed)``, then taken largest first
    (big groups are the hard ones to place); each goes to the subset whose per-class target
    (fraction x class total) it fills best, i.e. the largest sum over its studies of
    (target - current count) for their labels. Each subset ends within about one patient
    of its target for each class.

    Args:
        patients: {patient_id: [(study_id, label), ...]}.
        seed: the shuffle's seed; the same input and seed give the same assignment.

    Returns:
        {study_id: "train" | "val" | "test"}.
    """
    fractions = subset_fractions(test, val)
    totals = Counter(label for studies in patients.values() for _, label in studies)
    targets = {subset: {label: fractions[subset] * totals[label] for label in LABELS} for subset in SUBSETS}
    counts = {subset: Counter() for subset in SUBSETS}
    rng = np.random.default_rng(seed)
    order = [sorted(patients)[i] for i in rng.permutation(len(patients))]
    order.sort(key=lambda pid: -len(patients[pid]))  # stable: the shuffle decides among equal sizes
    result: dict[int, str] = {}
    for pid in order:
        need = Counter(label for _, label in patients[pid])

        def gain(subset: str, need: Counter = need) -> float:
            return sum(n * (targets[subset][label] - counts[subset][label]) for label, n in need.items())

        best = max(SUBSETS, key=gain)  # ties: the first in SUBSETS order
        counts[best].update(need)
        for study_id, _ in patients[pid]:
            result[study_id] = best
    return result


def _counts_message(labels: Mapping[int, str], n_other: int) -> str:
    counts = Counter(labels.values())
    return (
        f"there are {counts['metastatic']} metastatic and {counts['non_metastatic']} non-metastatic labelled studies"
        f" ({n_other} more without a training label or excluded)"
    )


def make_split(db: sqlite_utils.Database, seed: int = 0, test: float = DEFAULT_TEST, val: float = DEFAULT_VAL) -> int:
    """Make and store a new split of the included, labelled studies; returns its id.

    Raises:
        SplitError: too few labelled studies, or patients, of either class (the message
            gives the counts and what to do), or bad fractions.
    """
    fractions = subset_fractions(test, val)
    labels = labelled_studies(db)
    n_other = db.execute("SELECT COUNT(*) FROM studies").fetchone()[0] - len(labels)
    needed = minimum_per_class(test, val)
    counts = Counter(labels.values())
    todo = "label more studies on the Review page or with `bonescan label` (or add demo studies with `bonescan demo`)"
    if any(counts[label] < needed for label in LABELS):
        raise SplitError(
            f"a {fractions['train']:.0%}/{fractions['val']:.0%}/{fractions['test']:.0%} split needs at least {needed}"
            f" studies of each class; {_counts_message(labels, n_other)}: {todo}"
        )
    patients: dict[int, list[tuple[int, str]]] = {}
    for study_id, patient_id in db.execute("SELECT id, patient_id FROM studies ORDER BY id").fetchall():
        if study_id in labels:
            patients.setdefault(patient_id, []).append((study_id, labels[study_id]))
    if len(patients) < MIN_PATIENTS:
        raise SplitError(f"a split needs studies of at least {MIN_PATIENTS} patients; these come from {len(patients)}: {todo}")
    subsets = assign(patients, seed, test, val)
    present = {subset: {labels[sid] for sid, s in subsets.items() if s == subset} for subset in SUBSETS}
    missing = [f"{subset} has no {label}" for subset in SUBSETS for label in LABELS if label not in present[subset]]
    if missing:
        raise SplitError(
            f"cannot stratify by patient ({'; '.join(missing)}): a few patients hold many studies;"
            f" {_counts_message(labels, n_other)}: {todo}, or try another --seed"
        )
    with dbm.write(db):
        split_id = db["splits"].insert(
            {"seed": int(seed), "test_fraction": float(test), "val_fraction": float(val),
             "labels_hash": labels_hash(labels), "created_at": dbm.utc_now()}
        ).last_pk
        db["split_members"].insert_all(
            {"split_id": split_id, "study_id": sid, "subset": subsets[sid], "label": labels[sid]} for sid in sorted(subsets)
        )
    return split_id


def get_split(db: sqlite_utils.Database, split_id: int) -> dict:
    """``{"id": N, "subsets": {"train": [study ids], "val": [...], "test": [...]}}`` (ids sorted), as ``bonescan split --json`` prints.

    Raises:
        SplitError: no split with that id.
    """
    if not db.execute("SELECT 1 FROM splits WHERE id = ?", [split_id]).fetchone():
        raise SplitError(f"split {split_id} does not exist; make one with `bonescan split`")
    subsets: dict[str, list[int]] = {subset: [] for subset in SUBSETS}
    for study_id, subset in db.execute(
        "SELECT study_id, subset FROM split_members WHERE split_id = ? ORDER BY study_id", [split_id]
    ).fetchall():
        subsets[subset].append(study_id)
    return {"id": split_id, "subsets": subsets}


def split_labels(db: sqlite_utils.Database, split_id: int) -> dict[int, tuple[str, str]]:
    """{study_id: (subset, label when the split was made)} of a split."""
    get_split(db, split_id)  # raises for an unknown id
    rows = db.execute("SELECT study_id, subset, label FROM split_members WHERE split_id = ?", [split_id]).fetchall()
    return {study_id: (subset, label) for study_id, subset, label in rows}


def split_info(db: sqlite_utils.Database, split_id: int) -> dict:
    """The stored row of a split: ``id, seed, test_fraction, val_fraction, labels_hash, created_at``."""
    row = db.execute("SELECT * FROM splits WHERE id = ?", [split_id]).fetchone()
    if row is None:
        raise SplitError(f"split {split_id} does not exist; make one with `bonescan split`")
    return dict(zip(("id", "seed", "test_fraction", "val_fraction", "labels_hash", "created_at"), row, strict=True))


def latest_split(db: sqlite_utils.Database, seed: int = 0, test: float = DEFAULT_TEST, val: float = DEFAULT_VAL) -> int | None:
    """The newest split made with these settings from the CURRENT labels, or None.

    Backbone comparisons reuse it so that every model sees the same patients; any change of
    a training label (or a study newly labelled) changes the labels hash and so needs a
    new split.
    """
    current = labels_hash(labelled_studies(db))
    row = db.execute(
        "SELECT id FROM splits WHERE seed = ? AND abs(test_fraction - ?) < 1e-9 AND abs(val_fraction - ?) < 1e-9"
        " AND labels_hash = ? ORDER BY id DESC LIMIT 1",
        [int(seed), float(test), float(val), current],
    ).fetchone()
    return row[0] if row else None


def ensure_split(db: sqlite_utils.Database, seed: int = 0, test: float = DEFAULT_TEST, val: float = DEFAULT_VAL) -> int:
    """:func:`latest_split` if there is one, else :func:`make_split`."""
    existing = latest_split(db, seed, test, val)
    return existing if existing is not None else make_split(db, seed, test, val)
