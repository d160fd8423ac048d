"""Patient-grouped, label-stratified train/validation/test splits, stored with their seed.

The paper shuffles and holds out 30 % for test, then splits the rest 85 % train / 15 %
validation. Here the unit of assignment is the PATIENT (all of a patient's studies land in
one subset, so no patient is seen in training and tested on), and the assignment is
stratified by label: each subset gets about the overall share of metastatic studies.

Only included studies with a training label (``review.study_statuses``) take part. A split
stores the label each study had when it was made and a ``labels_hash`` of those (study,
label) pairs, so :func:`latest_split` can hand every backbone the same split as long as the
labels have not changed.

A split is made from chosen cohorts (default every cohort that holds a study) and records them
(``splits.cohorts``, a JSON list); the studies of other cohorts are external to its runs.

Honest grouping. A split records its ``grouping``: ``patient`` when every study's patient is
known, ``study`` when some are not (files imported without DICOM PatientID or manifest are
each their own patient, ``patients.identified = 0``): for those studies the split cannot keep
a patient's studies together, and says so. Before training, :func:`near_duplicates` reports
images of different subsets that look alike (64-bit difference hash, Hamming distance at most
:data:`NEAR_DUPLICATE_BITS`, confirmed by a correlation of block means of at least
:data:`NEAR_DUPLICATE_CORRELATION`), e.g. the same scan imported twice in different formats.

Never imports Keras or TensorFlow (``bonescan split`` starts fast).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping

import numpy as np

from bonescan_core import db as dbm
from bonescan_core import errors, pixelstore
from bonescan_core.cohorts import list_cohorts, parse_cohorts
from bonescan_core.heavy import sqlite_utils
from bonescan_core.review import LABELS, study_statuses

SUBSETS = ("train", "val", "test")
DEFAULT_TEST = 0.30  # of all labelled studies
DEFAULT_VAL = 0.15  # of the non-test part
MIN_PATIENTS = 3
GROUPINGS = ("patient", "study")

HASH_ROWS, HASH_COLUMNS = 8, 8
"""The difference hash compares each of 8 x 9 block means with its right neighbour: 64 bits."""

NEAR_DUPLICATE_BITS = 2
"""Images whose hashes differ in at most this many of 64 bits are candidate near duplicates.
Measured on 60 demo phantoms: a copy rescaled in intensity or shifted by 3 pixels is within
0-2 bits; so are 3 of 3,540 same-view pairs of different phantoms (they share one anatomical
template); a Poisson re-draw of the same counts (3-8 bits) is a new acquisition, not caught."""

NEAR_DUPLICATE_CORRELATION = 0.99
"""A candidate is reported when the Pearson correlation of the two images' 64 x 16 block means
is at least this too. Measured on the same phantoms: different phantoms reach at most 0.981;
a rescaled copy 1.0 (on 100 demo studies the hash alone reported 15 pairs, none a copy)."""


class SplitError(errors.InputError):
    """A split cannot be made or found; the message says how many studies of each class there are and what to do."""


def labelled_studies(db: sqlite_utils.Database, cohorts: Iterable[str] | None = None) -> dict[int, str]:
    """{study_id: label} of the included studies that have a training label (of ``cohorts`` only, if given)."""
    labels = {sid: status.label for sid, status in study_statuses(db).items() if status.included and status.label in LABELS}
    if cohorts is None:
        return labels
    cohorts = list(cohorts)
    marks = ", ".join("?" for _ in cohorts)
    inside = {row[0] for row in db.execute(f"SELECT id FROM studies WHERE cohort IN ({marks})", list(cohorts)).fetchall()}
    return {sid: label for sid, label in labels.items() if sid in inside}


def resolve_cohorts(db: sqlite_utils.Database, cohorts: str | Iterable[str] | None = None) -> list[str]:
    """The cohorts a split is made from: the named ones (checked, sorted), or every cohort holding a study.

    Raises:
        CohortError: a name that is not allowed.
        SplitError: a named cohort holds no study (the message lists those that do).
    """
    present = list_cohorts(db)
    chosen = parse_cohorts(cohorts)
    if chosen is None:
        return present
    unknown = [name for name in chosen if name not in present]
    if unknown:
        raise SplitError(f"no study is in cohort {', '.join(repr(n) for n in unknown)}; the cohorts are "
                         f"{', '.join(present) or '(none yet)'}: name one of them, or import studies with `--cohort`")
    return chosen


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


def split_grouping(db: sqlite_utils.Database, study_ids: Iterable[int]) -> str:
    """``study`` when the patient of any of these studies is unknown (``patients.identified = 0``:
    each such study is its own patient), else ``patient``."""
    ids = sorted({int(s) for s in study_ids})
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ", ".join("?" for _ in chunk)
        unknown = db.execute(f"SELECT 1 FROM studies s JOIN patients p ON p.id = s.patient_id "
                             f"WHERE s.id IN ({marks}) AND p.identified = 0 LIMIT 1", chunk).fetchone()
        if unknown:
            return "study"
    return "patient"


def _block_means(pixels: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """(rows, columns) float64 means of an (H, W) image cut into near-equal blocks (H >= rows, W >= columns)."""
    data = np.asarray(pixels, dtype=np.float64)
    row_edges = np.linspace(0, data.shape[0], rows + 1).astype(int)
    column_edges = np.linspace(0, data.shape[1], columns + 1).astype(int)
    sums = np.add.reduceat(np.add.reduceat(data, row_edges[:-1], axis=0), column_edges[:-1], axis=1)
    return sums / np.outer(np.diff(row_edges), np.diff(column_edges))


def image_hash(pixels: np.ndarray) -> int:
    """64-bit difference hash (dHash) of a stored image: block means on an 8 x 9 grid, one bit
    per block that is brighter than its left neighbour, row by row (most significant first).
    Unchanged by any increasing rescaling of the counts (bit depth, window, offset) and by
    resizing; a few bits change with a small crop or shift.

    Args:
        pixels: (H, W) any numeric dtype, H >= 8 and W >= 9.

    Returns:
        The hash as an int in [0, 2**64).
    """
    grid = _block_means(pixels, HASH_ROWS, HASH_COLUMNS + 1)
    bits = (grid[:, 1:] > grid[:, :-1]).ravel()
    return int(np.packbits(bits).view(">u8")[0])


def _profile(pixels: np.ndarray) -> np.ndarray:
    """(1024,) float64 unit vector: the image's 64 x 16 block means, centred (a dot product of two is their correlation)."""
    grid = _block_means(pixels, 64, 16).ravel()
    grid -= grid.mean()
    return grid / max(float(np.linalg.norm(grid)), 1e-12)


def near_duplicates(db: sqlite_utils.Database, split_id: int, max_distance: int = NEAR_DUPLICATE_BITS,
                    min_correlation: float = NEAR_DUPLICATE_CORRELATION) -> list[dict]:
    """Pairs of images in different subsets of a split whose :func:`image_hash` differ in at
    most ``max_distance`` bits and whose 64 x 16 block means correlate at least
    ``min_correlation``: the same scan may sit on both sides of the split (leakage).

    Every image of the split's studies is decoded once (about 2 ms each for 1024 x 256).

    Returns:
        ``[{"a": image id, "b": image id (a < b), "subsets": [subset of a, subset of b],
        "distance": bits}]``, closest first, then by ids.

    Raises:
        SplitError: no split with that id.
    """
    members = split_labels(db, split_id)
    ids, subsets, hashes, profiles = [], [], [], []
    for image_id, study_id, blob in db.execute(
            "SELECT i.id, i.study_id, i.pixels FROM images i JOIN split_members m ON m.study_id = i.study_id "
            "WHERE m.split_id = ? ORDER BY i.id", [split_id]):  # streamed: one image's pixels at a time
        ids.append(int(image_id))
        subsets.append(members[study_id][0])
        pixels = pixelstore.decode_pixels(blob)
        hashes.append(image_hash(pixels))
        profiles.append(_profile(pixels))
    values = np.array(hashes, dtype=np.uint64)
    names = np.array(subsets, dtype=object)
    pairs = []
    for i in range(len(ids) - 1):  # one row of the distance matrix at a time: memory O(n)
        distance = np.bitwise_count(values[i + 1 :] ^ values[i])
        for j in np.flatnonzero((distance <= max_distance) & (names[i + 1 :] != names[i])):
            k = i + 1 + int(j)
            if float(profiles[i] @ profiles[k]) < min_correlation:
                continue  # alike in coarse structure only (e.g. two phantoms of one template)
            pairs.append({"a": ids[i], "b": ids[k], "subsets": [subsets[i], subsets[k]], "distance": int(distance[j])})
    return sorted(pairs, key=lambda pair: (pair["distance"], pair["a"], pair["b"]))


def _counts_message(labels: Mapping[int, str], n_other: int) -> str:
    counts = Counter(labels.values())
    return (
        f"there are {counts['metastatic']} metastatic and {counts['non_metastatic']} non-metastatic labelled studies"
        f" ({n_other} more without a training label or excluded)"
    )


def make_split(db: sqlite_utils.Database, seed: int = 0, test: float = DEFAULT_TEST, val: float = DEFAULT_VAL,
               cohorts: str | Iterable[str] | None = None) -> int:
    """Make and store a new split of the included, labelled studies; returns its id.

    Args:
        cohorts: names (a list, or ``"a,b"``) of the cohorts whose studies take part; None:
            every cohort holding a study. The split records them (:func:`get_split`).

    Raises:
        CohortError: a cohort name that is not allowed.
        SplitError: too few labelled studies, or patients, of either class (the message
            gives the counts and what to do), or bad fractions.
    """
    fractions = subset_fractions(test, val)
    chosen = resolve_cohorts(db, cohorts)
    labels = labelled_studies(db, chosen)
    marks = ", ".join("?" for _ in chosen)
    n_other = db.execute(f"SELECT COUNT(*) FROM studies WHERE cohort IN ({marks})", chosen).fetchone()[0] - len(labels)
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
             "labels_hash": labels_hash(labels), "cohorts": json.dumps(chosen), "created_at": dbm.utc_now(),
             "grouping": split_grouping(db, labels)}
        ).last_pk
        db["split_members"].insert_all(
            {"split_id": split_id, "study_id": sid, "subset": subsets[sid], "label": labels[sid]} for sid in sorted(subsets)
        )
    return split_id


def get_split(db: sqlite_utils.Database, split_id: int) -> dict:
    """``{"id": N, "subsets": {"train": [study ids], "val": [...], "test": [...]}, "cohorts": [names],
    "grouping": "patient" | "study"}`` (ids sorted), as ``bonescan split --json`` prints (which adds
    ``near_duplicates``); ``cohorts``: those the split was made from; ``grouping``: see the module docstring.

    Raises:
        SplitError: no split with that id.
    """
    row = db.execute("SELECT cohorts, grouping FROM splits WHERE id = ?", [split_id]).fetchone()
    if row is None:
        raise SplitError(f"split {split_id} does not exist; make one with `bonescan split`")
    subsets: dict[str, list[int]] = {subset: [] for subset in SUBSETS}
    for study_id, subset in db.execute(
        "SELECT study_id, subset FROM split_members WHERE split_id = ? ORDER BY study_id", [split_id]
    ).fetchall():
        subsets[subset].append(study_id)
    return {"id": split_id, "subsets": subsets, "cohorts": json.loads(row[0] or "[]"), "grouping": row[1]}


def split_labels(db: sqlite_utils.Database, split_id: int) -> dict[int, tuple[str, str]]:
    """{study_id: (subset, label when the split was made)} of a split."""
    get_split(db, split_id)  # raises for an unknown id
    rows = db.execute("SELECT study_id, subset, label FROM split_members WHERE split_id = ?", [split_id]).fetchall()
    return {study_id: (subset, label) for study_id, subset, label in rows}


def split_info(db: sqlite_utils.Database, split_id: int) -> dict:
    """The stored row of a split: ``id, seed, test_fraction, val_fraction, labels_hash, created_at, cohorts`` (a list),
    ``grouping``."""
    columns = ("id", "seed", "test_fraction", "val_fraction", "labels_hash", "created_at", "cohorts", "grouping")
    row = db.execute("SELECT id, seed, test_fraction, val_fraction, labels_hash, created_at, cohorts, grouping FROM splits "
                     "WHERE id = ?", [split_id]).fetchone()
    if row is None:
        raise SplitError(f"split {split_id} does not exist; make one with `bonescan split`")
    info = dict(zip(columns, row, strict=True))
    info["cohorts"] = json.loads(info["cohorts"] or "[]")
    return info


def latest_split(db: sqlite_utils.Database, seed: int = 0, test: float = DEFAULT_TEST, val: float = DEFAULT_VAL,
                 cohorts: str | Iterable[str] | None = None) -> int | None:
    """The newest split made with these settings and cohorts (see :func:`make_split`) from the CURRENT labels, or None.

    Backbone comparisons reuse it so that every model sees the same patients; any change of
    a training label (or a study newly labelled) changes the labels hash and so needs a
    new split.
    """
    chosen = resolve_cohorts(db, cohorts)
    current = labels_hash(labelled_studies(db, chosen))
    row = db.execute(
        "SELECT id FROM splits WHERE seed = ? AND abs(test_fraction - ?) < 1e-9 AND abs(val_fraction - ?) < 1e-9"
        " AND labels_hash = ? AND cohorts = ? ORDER BY id DESC LIMIT 1",
        [int(seed), float(test), float(val), current, json.dumps(chosen)],
    ).fetchone()
    return row[0] if row else None


def ensure_split(db: sqlite_utils.Database, seed: int = 0, test: float = DEFAULT_TEST, val: float = DEFAULT_VAL,
                 cohorts: str | Iterable[str] | None = None) -> int:
    """:func:`latest_split` if there is one, else :func:`make_split` (same ``cohorts``)."""
    existing = latest_split(db, seed, test, val, cohorts)
    return existing if existing is not None else make_split(db, seed, test, val, cohorts)
