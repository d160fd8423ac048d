"""Read-only queries over patients, studies and images, for the CLI and the pages.

Everything here returns plain dicts/lists (JSON-ready) and never the pixel blobs unless
asked for one image.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from bonescan_core import errors, pixelstore
from bonescan_core.heavy import sqlite_utils
from bonescan_core.review import StudyStatus, training_labels


def list_images(db: sqlite_utils.Database) -> list[dict]:
    """Every image: ``id, study_id, view, source, height, width`` (``docs/cli.md``), by id."""
    sql = "SELECT id, study_id, view, source, height, width FROM images ORDER BY id"
    return [dict(row) for row in db.query(sql)]


def list_studies(db: sqlite_utils.Database) -> list[dict]:
    """Every study: ``id, patient_id, n_images, label, included`` plus ``views``, ``origin``, ``cohort``,
    ``day_offset`` (days from the patient's first dated study, None when unknown: ``priors``).

    ``label`` is the training label (``metastatic``, ``non_metastatic`` or None) and
    ``included`` whether the study may train (see ``review.training_labels``).
    """
    labels = training_labels(db)
    sql = """
        SELECT s.id, s.patient_id, s.origin, s.cohort, s.day_offset, COUNT(i.id) AS n_images,
               GROUP_CONCAT(COALESCE(i.view, '?'), ',') AS views
        FROM studies s LEFT JOIN images i ON i.study_id = s.id
        GROUP BY s.id ORDER BY s.id
    """
    rows = []
    for row in db.query(sql):
        label, included = labels.get(row["id"], (None, False))
        rows.append(
            {
                "id": row["id"],
                "patient_id": row["patient_id"],
                "n_images": row["n_images"],
                "label": label,
                "included": included,
                "views": sorted((row["views"] or "").split(",")) if row["views"] else [],
                "origin": row["origin"],
                "cohort": row["cohort"],
                "day_offset": row["day_offset"],
            }
        )
    return rows


def study_table(db: sqlite_utils.Database) -> list[dict]:
    """Studies (as :func:`list_studies`) with their patient's sex, age band and primary cancer.

    No pixels or thumbnails: fetch those for the rows on screen with :func:`thumbnails`.
    """
    patients = {row["id"]: row for row in db.query("SELECT id, sex, age_band, primary_cancer FROM patients")}
    table = []
    for study in list_studies(db):
        patient = patients[study["patient_id"]]
        table.append({**study, "sex": patient["sex"], "age_band": patient["age_band"], "primary_cancer": patient["primary_cancer"]})
    return table


def count_studies(db: sqlite_utils.Database) -> int:
    """How many studies the database holds (read or not, included or not)."""
    return db["studies"].count


def label_counts(statuses: dict[int, StudyStatus]) -> dict[str, int]:
    """Where the studies stand, for the Train and Agreement cards.

    Args:
        statuses: ``review.study_statuses(db)``.

    Returns:
        ``studies``; ``metastatic`` and ``non_metastatic`` (studies that train with that
        label); ``labelled`` (their sum); ``waiting`` (readers disagree, no consensus yet);
        ``excluded``; ``unused`` (neither labelled nor waiting: unread or excluded).
    """
    labelled = [s.label for s in statuses.values() if s.included]
    states = Counter(s.state for s in statuses.values())
    return {
        "studies": len(statuses),
        "metastatic": labelled.count("metastatic"),
        "non_metastatic": labelled.count("non_metastatic"),
        "labelled": len(labelled),
        "waiting": states["disagreement"],
        "excluded": states["excluded"],
        "unused": len(statuses) - len(labelled) - states["disagreement"],
    }


def split_label_counts(statuses: dict[int, StudyStatus], subsets: dict[str, list[int]]) -> dict[str, dict[str, int]]:
    """``{subset: {"studies": n, "metastatic": n}}`` of a split's subsets (``splits.get_split(...)["subsets"]``),
    counting the studies that still exist and still have a training label."""
    counts = {}
    for name, ids in subsets.items():
        present = [statuses[i].label for i in ids if i in statuses and statuses[i].label is not None]
        counts[name] = {"studies": len(present), "metastatic": present.count("metastatic")}
    return counts


STUDY_FILTERS = ("label", "sex", "primary_cancer", "origin", "cohort")
"""The Scans page's study filters: keys of :func:`study_facets`."""


def study_facets(row: dict) -> dict[str, str]:
    """What the study filters match a :func:`study_table` row on; a missing value is a value of
    its own (``none`` for the training label, ``unknown`` for the patient's details)."""
    return {
        "label": row["label"] or "none",
        "sex": row["sex"] or "unknown",
        "primary_cancer": row["primary_cancer"] or "unknown",
        "origin": row["origin"],
        "cohort": row["cohort"],
    }


def filter_options(rows: list[dict]) -> dict[str, list[str]]:
    """Each filter's choices: every training label (and ``none``); the values present otherwise, sorted."""
    present = {key: sorted({study_facets(row)[key] for row in rows}) for key in STUDY_FILTERS}
    return {**present, "label": ["metastatic", "non_metastatic", "none"]}


def filter_studies(rows: list[dict], chosen: dict[str, list[str]]) -> list[dict]:
    """The rows that match every filter: ``chosen`` maps a key of :data:`STUDY_FILTERS` to the
    accepted values; an empty or missing choice accepts all. Order kept."""
    wanted = {key: set(values) for key, values in chosen.items() if values}
    unknown = set(wanted) - set(STUDY_FILTERS)
    if unknown:
        raise ValueError(f"unknown study filters {sorted(unknown)}; known: {', '.join(STUDY_FILTERS)}")
    return [row for row in rows if all(study_facets(row)[key] in values for key, values in wanted.items())]


def thumbnails(db: sqlite_utils.Database, study_ids: list[int]) -> dict[int, dict[str, bytes]]:
    """{study_id: {"anterior": png, "posterior": png}} for the given studies (first image per view;
    an image of unknown view shows as anterior)."""
    if not study_ids:
        return {}
    marks = ", ".join("?" for _ in study_ids)
    result: dict[int, dict[str, bytes]] = {}
    for row in db.query(f"SELECT study_id, view, thumbnail FROM images WHERE study_id IN ({marks}) ORDER BY id", study_ids):
        result.setdefault(row["study_id"], {}).setdefault(row["view"] or "anterior", row["thumbnail"])
    return result


def characteristics(rows: list[dict]) -> dict[str, dict[str, int]]:
    """Counts of patients by sex, age band and primary cancer, and of studies by label
    (most common first; age bands in order).

    Args:
        rows: output of :func:`study_table` (possibly filtered).
    """
    by_patient = {row["patient_id"]: row for row in rows}.values()
    return {
        "sex": dict(Counter(row["sex"] or "unknown" for row in by_patient).most_common()),
        "age_band": dict(sorted(Counter(row["age_band"] or "unknown" for row in by_patient).items())),
        "primary_cancer": dict(Counter(row["primary_cancer"] or "unknown" for row in by_patient).most_common()),
        "label": dict(Counter(row["label"] or "no training label" for row in rows).most_common()),
    }


def study_images(db: sqlite_utils.Database, study_id: int) -> list[dict]:
    """A study's images with decoded pixels: ``id, view, source, display_max, pixels`` (H, W array)."""
    sql = "SELECT id, view, source, display_max, pixels FROM images WHERE study_id = ? ORDER BY view IS NULL, view, id"
    images = []
    for row in db.query(sql, [study_id]):
        images.append({**row, "pixels": pixelstore.decode_pixels(row["pixels"])})
    return images


def image_pixels(db: sqlite_utils.Database, image_id: int) -> np.ndarray:
    """Decoded pixels of one image, (H, W), original dtype."""
    row = db.execute("SELECT pixels FROM images WHERE id = ?", [image_id]).fetchone()
    if row is None:
        raise errors.ImageNotFound(f"image {image_id} does not exist; list images with `bonescan images --json`")
    return pixelstore.decode_pixels(row[0])
