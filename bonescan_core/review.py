"""Reviews: the criteria catalogue, append-only reviews, and each study's training label.

Criteria and exclusion reasons are those of Magboo & Magboo (``paper-protocol.md``), with
the ids of ``cli.md``. A review is one reader's decision on one study at one time; a
correction is a new review, and a reader's current opinion is their latest review.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass

import sqlite_utils

from bonescan_core import db as dbm

LABELS = ("metastatic", "non_metastatic")

# id -> (label side, words shown to the reader)
CRITERIA: dict[str, tuple[str, str]] = {
    "typical_pattern": ("metastatic", "(a) uptake in a pattern typical of metastasis"),
    "new_lesions_followup": ("metastatic", "(b) new lesions on follow-up that cannot be ruled out as malignant"),
    "flare": ("metastatic", "(c) flare phenomenon"),
    "correlative_destruction": ("metastatic", "(d) records or correlative imaging show bone destruction"),
    "enlarging_lesions": ("metastatic", "(e) lesions enlarged after at least 3 months of follow-up"),
    "trauma": ("non_metastatic", "(a) lesions confirmed to be traumatic"),
    "periarticular": ("non_metastatic", "(b) uptake around a joint (periarticular)"),
    "non_osseous": ("non_metastatic", "(c) correlative imaging shows the disease is not osseous"),
    "equivocal": ("non_metastatic", "(d) equivocal lesions without definitive evidence of metastasis"),
    "no_abnormal_uptake": ("non_metastatic", "no abnormal uptake"),
}

EXCLUSION_REASONS: dict[str, str] = {
    "non_screening_indication": "indication is not metastasis screening",
    "metabolic_bone_disease": "metabolic bone disease",
    "osteomyelitis": "osteomyelitis versus cellulitis",
    "prosthesis_loosening": "loosening of an implant or prosthesis",
    "primary_bone_tumour": "identification of a primary bone tumour",
    "medical_device": "medical device in view",
    "artifact": "artifact that makes the scan unreadable",
    "poor_quality": "poor image quality",
}

# Artifacts that do not exclude a study: recorded so training can mask or keep them.
ARTIFACTS: dict[str, str] = {
    "injection_site": "tracer injection site",
    "urine_contamination": "urine contamination",
    "other_artifact": "other non-osseous artifact",
}

# Reviewers whose reviews come from a machine step, not a reading: `import` records the
# class folder a file came from, with no criterion (a reader later confirms or changes it).
SYSTEM_REVIEWERS = frozenset({"import"})


class ReviewError(ValueError):
    """A review that cannot be stored as given; the message says what to fix."""


@dataclass(frozen=True)
class Review:
    """One reader's decision on one study. ``label`` is None for an exclusion."""

    study_id: int
    reviewer: str
    decision: str  # "include" | "exclude"
    label: str | None = None  # "metastatic" | "non_metastatic"
    criteria: tuple[str, ...] = ()
    exclusion_reason: str | None = None
    artifacts: tuple[str, ...] = ()
    confidence: int | None = None  # 1..5
    note: str = ""

    def validate(self) -> None:
        """Raise ReviewError unless the review is complete and consistent."""
        if not self.reviewer.strip():
            raise ReviewError("reviewer name is empty; enter your name in the sidebar")
        if self.decision == "exclude":
            if self.exclusion_reason not in EXCLUSION_REASONS:
                raise ReviewError(f"choose an exclusion reason: one of {', '.join(EXCLUSION_REASONS)}")
            if self.label is not None:
                raise ReviewError("an excluded study has no label")
        elif self.decision == "include":
            if self.label not in LABELS:
                raise ReviewError("choose a label: metastatic or non_metastatic")
            if self.exclusion_reason is not None:
                raise ReviewError("an included study has no exclusion reason")
            unknown = [c for c in self.criteria if c not in CRITERIA]
            if unknown:
                raise ReviewError(f"unknown criteria {', '.join(unknown)}; known: {', '.join(CRITERIA)}")
            wrong_side = [c for c in self.criteria if CRITERIA[c][0] != self.label]
            if wrong_side:
                raise ReviewError(f"criteria {', '.join(wrong_side)} belong to the other label; untick them")
            if not self.criteria and self.reviewer not in SYSTEM_REVIEWERS:
                side = "metastasis (a)-(e)" if self.label == "metastatic" else "no metastasis (a)-(d) or 'no abnormal uptake'"
                raise ReviewError(f"tick at least one criterion for {side} before saving")
        else:
            raise ReviewError("decision must be include or exclude")
        unknown_artifacts = [a for a in self.artifacts if a not in ARTIFACTS]
        if unknown_artifacts:
            raise ReviewError(f"unknown artifact flags {', '.join(unknown_artifacts)}; known: {', '.join(ARTIFACTS)}")
        if self.confidence is not None and not 1 <= self.confidence <= 5:
            raise ReviewError("confidence must be between 1 and 5")


def add_review(db: sqlite_utils.Database, review: Review, created_at: str | None = None) -> int:
    """Validate and append one review; returns its id.

    Runs inside the caller's transaction if there is one (nested as a savepoint),
    otherwise in a transaction of its own.
    """
    review.validate()
    row = {
        "study_id": review.study_id,
        "reviewer": review.reviewer.strip(),
        "created_at": created_at or dbm.utc_now(),
        "decision": review.decision,
        "label": review.label,
        "criteria": ";".join(review.criteria),
        "exclusion_reason": review.exclusion_reason,
        "artifacts": ";".join(review.artifacts),
        "confidence": review.confidence,
        "note": review.note,
    }
    in_caller_transaction = db.conn.in_transaction
    with contextlib.nullcontext() if in_caller_transaction else dbm.write(db):
        if not db.execute("SELECT 1 FROM studies WHERE id = ?", [review.study_id]).fetchone():
            raise ReviewError(f"study {review.study_id} does not exist; list studies with `bonescan studies --json`")
        return db["reviews"].insert(row).last_pk


def latest_reviews(db: sqlite_utils.Database, study_ids: Iterable[int] | None = None) -> list[dict]:
    """Each reader's current opinion: their latest review per study (rows as dicts)."""
    sql = """
        SELECT r.* FROM reviews r
        JOIN (SELECT study_id, reviewer, MAX(id) AS id FROM reviews GROUP BY study_id, reviewer) latest
          ON latest.id = r.id
    """
    rows = [dict(row) for row in db.query(sql)]
    if study_ids is not None:
        wanted = set(study_ids)
        rows = [row for row in rows if row["study_id"] in wanted]
    return rows


def training_labels(db: sqlite_utils.Database) -> dict[int, tuple[str | None, bool]]:
    """Each study's training label and inclusion, from its readers' latest reviews.

    A study is included when at least one reader has read it and none of the latest
    reviews excludes it; its label is the readers' unanimous label, else None.

    Returns:
        {study_id: (label or None, included)} for every study (unread: (None, False)).
    """
    result: dict[int, tuple[str | None, bool]] = {
        row["id"]: (None, False) for row in db.query("SELECT id FROM studies")
    }
    by_study: dict[int, list[dict]] = {}
    for row in latest_reviews(db):
        by_study.setdefault(row["study_id"], []).append(row)
    for study_id, rows in by_study.items():
        if any(row["decision"] == "exclude" for row in rows):
            result[study_id] = (None, False)
            continue
        labels = {row["label"] for row in rows}
        result[study_id] = (labels.pop() if len(labels) == 1 else None, True)
    return result
