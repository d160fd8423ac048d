"""Reviews: the criteria catalogue, append-only reviews, and each study's training label.

Criteria and exclusion reasons are those of Magboo & Magboo (``docs/paper-protocol.md``), with
the ids of ``docs/cli.md``. A review is one reader's decision on one study at one time; a
correction is a new review, and a reader's current opinion is their latest review.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from bonescan_core import accounts, errors, runs
from bonescan_core import db as dbm
from bonescan_core.csvfile import read_rows, unescape_cell, write_rows
from bonescan_core.heavy import sqlite_utils

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
# class folder a file came from (a reader later confirms or changes it). Their labels count
# only while no person has read the study.
SYSTEM_REVIEWERS = frozenset({"import"})


class ReviewError(errors.InputError):
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
    adjudication: bool = False  # the consensus recorded by an adjudicator
    from_import: bool = False  # a label recorded by import (class folder or manifest): no criterion needed
    screening: bool = True  # the indication is metastasis screening; the paper excludes every other study
    assisted: bool = False  # the reader saw the model's opinion of the study before saving (assist.model_visible)

    def as_saved(self) -> Review:
        """The review as :func:`add_review` stores it: an exclusion of a study whose indication is
        not screening, given no other reason, has the reason ``non_screening_indication``."""
        if not self.screening and self.decision == "exclude" and self.exclusion_reason is None:
            return replace(self, exclusion_reason="non_screening_indication")
        return self

    def validate(self) -> None:
        """Raise ReviewError unless the review is complete and consistent."""
        if not self.reviewer.strip():
            raise ReviewError("reviewer name is empty; enter your name in the sidebar")
        if not self.screening and self.decision == "include":
            raise ReviewError("The indication is not metastasis screening: use Exclude (the paper excludes these).")
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
            if not self.criteria and not self.from_import:
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
    """Validate and append one review (as :meth:`Review.as_saved`); returns its id.

    Runs inside the caller's transaction if there is one (nested as a savepoint),
    otherwise in a transaction of its own.
    """
    review = review.as_saved()
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
        "adjudication": int(review.adjudication),
        "assisted": int(review.assisted),
    }
    in_caller_transaction = db.conn.in_transaction
    with contextlib.nullcontext() if in_caller_transaction else dbm.write(db):
        if not db.execute("SELECT 1 FROM studies WHERE id = ?", [review.study_id]).fetchone():
            raise ReviewError(f"study {review.study_id} does not exist; list studies with `bonescan studies --json`")
        if review.adjudication and not is_adjudicator(db, row["reviewer"]):
            if accounts.sign_in_required(db):
                raise ReviewError(accounts.denial("adjudicate", accounts.get_account(db, row["reviewer"])))
            raise ReviewError(f"{row['reviewer']} is not an adjudicator; mark them as one on the Agreement page first")
        return db["reviews"].insert(row).last_pk


def set_adjudicator(db: sqlite_utils.Database, name: str, adjudicator: bool = True) -> None:
    """Mark (or unmark) a reviewer as an adjudicator, who may record the consensus."""
    with dbm.write(db):
        db["reviewers"].upsert({"name": name.strip(), "adjudicator": int(adjudicator), "created_at": dbm.utc_now()}, pk="name")


def is_adjudicator(db: sqlite_utils.Database, name: str) -> bool:
    """Whether ``name`` may record consensus reviews.

    With sign-in required, that is an enabled account with the adjudicator role (the
    account's roles are the authority, not the reviewers list anyone could edit).
    """
    if accounts.sign_in_required(db):
        return accounts.has_role(db, name, "adjudicator")
    row = db.execute("SELECT adjudicator FROM reviewers WHERE name = ?", [name.strip()]).fetchone()
    return bool(row and row[0])


def adjudicators(db: sqlite_utils.Database) -> list[str]:
    """Names of the adjudicators, sorted (accounts with the role when sign-in is required)."""
    if accounts.sign_in_required(db):
        return sorted(a.name for a in accounts.list_accounts(db) if a.has("adjudicator") and not a.disabled)
    return [row[0] for row in db.execute("SELECT name FROM reviewers WHERE adjudicator = 1 ORDER BY name").fetchall()]


def verdict(row: dict) -> str:
    """A review's verdict: its label, or ``exclude``."""
    return row["label"] if row["decision"] == "include" else "exclude"


@dataclass(frozen=True)
class StudyStatus:
    """Where a study stands with its readers.

    ``readers`` maps each reader to their current verdict (``metastatic``,
    ``non_metastatic`` or ``exclude``); ``adjudicated`` is the adjudicator's consensus
    verdict, if any. ``label`` (the training label) and ``included`` follow the rules of
    :func:`study_statuses`.
    """

    study_id: int
    readers: dict[str, str]
    adjudicated: str | None
    label: str | None
    included: bool

    @property
    def state(self) -> str:
        """``unread``, ``adjudicated``, ``agreed``, ``excluded`` or ``disagreement``."""
        if self.adjudicated is not None:
            return "adjudicated"
        if not self.readers:
            return "unread"
        verdicts = set(self.readers.values())
        if len(verdicts) > 1:
            return "disagreement"
        return "excluded" if verdicts == {"exclude"} else "agreed"


def study_statuses(db: sqlite_utils.Database, study_ids: Iterable[int] | None = None) -> dict[int, StudyStatus]:
    """Every study's readers, consensus and training label.

    Rules: the training label is the adjudicated consensus if there is one, else the
    unanimous verdict of the study's readers, else none (the study waits for
    adjudication). Only a label trains: an excluded study never does. A reader's verdict is
    their latest reading; ``import`` reviews (folder labels) count only while no person
    has read the study. Adjudication reviews are not readings.
    """
    wanted = None if study_ids is None else sorted(set(study_ids))
    readers: dict[int, dict[str, str]] = {}
    system: dict[int, dict[str, str]] = {}
    adjudicated: dict[int, str] = {}
    # Only the asked-for studies are read when a list is given (the Review page asks for one).
    where = "" if wanted is None else f"WHERE study_id IN ({', '.join('?' for _ in wanted)})"
    sql = f"""
        SELECT r.study_id, r.reviewer, r.decision, r.label, r.adjudication FROM reviews r
        JOIN (SELECT MAX(id) AS id FROM reviews {where} GROUP BY study_id, reviewer, adjudication) latest ON latest.id = r.id
        ORDER BY r.id
    """
    for row in db.query(sql, wanted or []):
        if row["adjudication"]:
            adjudicated[row["study_id"]] = verdict(row)  # ordered by id: the newest consensus wins
        elif row["reviewer"] in SYSTEM_REVIEWERS:
            system.setdefault(row["study_id"], {})[row["reviewer"]] = verdict(row)
        else:
            readers.setdefault(row["study_id"], {})[row["reviewer"]] = verdict(row)
    ids = wanted if wanted is not None else [row[0] for row in db.execute("SELECT id FROM studies").fetchall()]
    statuses = {}
    for study_id in ids:
        current = readers.get(study_id) or system.get(study_id, {})
        decided = adjudicated.get(study_id)
        if decided is None:
            verdicts = set(current.values())
            decided = verdicts.pop() if len(verdicts) == 1 else None
        label = decided if decided in LABELS else None
        statuses[study_id] = StudyStatus(study_id, dict(current), adjudicated.get(study_id), label, label is not None)
    return statuses


def latest_reviews(db: sqlite_utils.Database, study_ids: Iterable[int]) -> list[dict]:
    """Each reviewer's latest review (reading or consensus) of the given studies, as dicts."""
    wanted = sorted(set(study_ids))
    if not wanted:
        return []
    marks = ", ".join("?" for _ in wanted)
    sql = f"""
        SELECT r.* FROM reviews r
        JOIN (SELECT MAX(id) AS id FROM reviews WHERE study_id IN ({marks}) GROUP BY study_id, reviewer, adjudication) latest
          ON latest.id = r.id
        ORDER BY r.id
    """
    return [dict(row) for row in db.query(sql, wanted)]


def training_labels(db: sqlite_utils.Database) -> dict[int, tuple[str | None, bool]]:
    """{study_id: (training label or None, included)} for every study; see :func:`study_statuses`."""
    return {study_id: (status.label, status.included) for study_id, status in study_statuses(db).items()}


# --- the reading queue ----------------------------------------------------------------------

QUEUE_ORDERS: dict[str, str] = {
    "unread": "not yet read by me first",
    "all": "all studies",
    "disagreements": "disagreements",
    "flagged": "flagged for re-review",
    "uncertain": "model-uncertain first",
}


def read_by(db: sqlite_utils.Database, reviewer: str) -> set[int]:
    """Ids of the studies ``reviewer`` has reviewed (readings or adjudications)."""
    return {row[0] for row in db.execute("SELECT DISTINCT study_id FROM reviews WHERE reviewer = ?", [reviewer]).fetchall()}


def review_queue(db: sqlite_utils.Database, reviewer: str, order: str = "unread", run_id: int | None = None) -> list[int]:
    """Study ids in reading order.

    Args:
        order: ``unread`` (studies this reviewer has not read, then the rest, each by id),
            ``all`` (by id), ``disagreements`` (only studies whose readers disagree and no
            adjudication settled), ``flagged`` (only studies with an open re-review flag),
            ``uncertain`` (studies the newest finished run was least sure of first: smallest
            |probability - threshold| over the study's images; then the others by id).
        run_id: the run ``uncertain`` ranks by; None: the newest finished run.
    """
    if order not in QUEUE_ORDERS:
        raise ValueError(f"unknown queue order {order!r}; one of {', '.join(QUEUE_ORDERS)}")
    if order == "disagreements":
        return sorted(s.study_id for s in study_statuses(db).values() if s.state == "disagreement")
    if order == "flagged":
        return sorted(open_flags(db))
    if order == "uncertain":
        return _uncertain_first(db, run_id)
    ids = [row[0] for row in db.execute("SELECT id FROM studies ORDER BY id").fetchall()]
    if order == "all":
        return ids
    mine = read_by(db, reviewer)
    return [i for i in ids if i not in mine] + [i for i in ids if i in mine]


def newest_finished_run(db: sqlite_utils.Database) -> int | None:
    """Id of the run the ``uncertain`` order ranks by: the newest done run (None before any training)."""
    return runs.newest_done(db)


def _uncertain_first(db: sqlite_utils.Database, run_id: int | None = None) -> list[int]:
    run_id = newest_finished_run(db) if run_id is None else run_id
    ids = [row[0] for row in db.execute("SELECT id FROM studies ORDER BY id").fetchall()]
    if run_id is None:
        return ids
    ranked = runs.studies_by_margin(db, run_id)
    seen = set(ranked)
    return ranked + [i for i in ids if i not in seen]


def history(db: sqlite_utils.Database, study_id: int) -> list[dict]:
    """Every review of a study, oldest first (the audit trail)."""
    return [dict(row) for row in db.query("SELECT * FROM reviews WHERE study_id = ? ORDER BY id", [study_id])]


# --- flags for re-review -------------------------------------------------------------------

BLIND_FLAG_REASON = "a second look was requested (the model's output is withheld while you read blind)"
"""The reason a reader sees for a flag whose text would have told the model's outcome or probability."""

# What must not reach a blind reader: an outcome (TP, false negative, ...), a probability or
# score (p=0.83, 83%, 0.97), or a model's verdict ("model says", "predicted metastatic").
_UNBLINDING = re.compile(
    r"\b(?:TP|FP|FN|TN)\b|\b(?:true|false)[ -](?:positive|negative)s?\b|\bp\s*[=:<>]|\bprob(?:ability)?\b|\bscore\b"
    r"|\d\s*%|\b[01]?\.\d+\b|\bmodel\b|\bpredict|\bmiss(?:ed)?\b|\bcalled\b|\bthreshold\b|\brun\s*\d",
    re.IGNORECASE,
)


def blind_reason(reason: str) -> str:
    """The flag reason as a blind reader may see it: ``reason`` (stripped) when it tells nothing
    of a model's output, else :data:`BLIND_FLAG_REASON` (the whole text: a half-masked sentence
    still tells). Conservative: a reason that merely looks like it might (a number with a
    decimal point, the word "model") is replaced too."""
    text = reason.strip()
    return BLIND_FLAG_REASON if _UNBLINDING.search(text) else text


def add_flag(db: sqlite_utils.Database, study_id: int, reason: str, flagged_by: str) -> int:
    """Put a study on the re-review list with a reason (e.g. from the evaluation explorer).

    The reason is stored as :func:`blind_reason` gives it: readers see it while reading blind,
    so a text carrying the model's outcome or probability is replaced by a neutral one.
    """
    if not reason.strip():
        raise ReviewError("say why the study needs another look")
    with dbm.write(db):
        if not db.execute("SELECT 1 FROM studies WHERE id = ?", [study_id]).fetchone():
            raise ReviewError(f"study {study_id} does not exist")
        newest_review = db.execute("SELECT COALESCE(MAX(id), 0) FROM reviews").fetchone()[0]
        return db["flags"].insert(
            {"study_id": study_id, "reason": blind_reason(reason), "flagged_by": flagged_by.strip() or "unknown", "created_at": dbm.utc_now(),
             "after_review_id": newest_review}
        ).last_pk


def open_flags(db: sqlite_utils.Database) -> dict[int, list[str]]:
    """{study_id: [reasons]} for flags that no reader has answered with a later review.

    Reasons come as :func:`blind_reason` gives them (flags stored before it existed may carry
    the model's outcome and probability, e.g. ``run 3: FP, p=0.83``).

    Later means stored later (a larger review id), not a later ``created_at``: imported reviews
    keep the time their sheet gives, which may be anything.
    """
    sql = """
        SELECT f.study_id, f.reason FROM flags f
        WHERE NOT EXISTS (
            SELECT 1 FROM reviews r WHERE r.study_id = f.study_id AND r.id > f.after_review_id
              AND r.reviewer NOT IN ({})
        )
        ORDER BY f.id
    """.format(", ".join("?" for _ in SYSTEM_REVIEWERS))
    flags: dict[int, list[str]] = {}
    for study_id, reason in db.execute(sql, sorted(SYSTEM_REVIEWERS)).fetchall():
        flags.setdefault(study_id, []).append(blind_reason(reason))
    return flags


# --- CSV exchange (reading-room spreadsheets) ------------------------------------------------

CSV_COLUMNS = ("study_id", "reviewer", "decision", "label", "criteria", "exclusion_reason", "note", "created_at",
               "artifacts", "confidence", "adjudication", "assisted")
REQUIRED_CSV_COLUMNS = ("study_id", "reviewer", "decision", "label", "criteria")


def export_reviews_csv(db: sqlite_utils.Database, path: Path) -> int:
    """Write every review, oldest first, with ``CSV_COLUMNS``; returns the row count.

    Text that a spreadsheet would run as a formula is quoted (see :mod:`bonescan_core.csvfile`);
    :func:`import_reviews_csv` undoes it.
    """
    rows = db.query(f"SELECT {', '.join(CSV_COLUMNS)} FROM reviews ORDER BY id")
    with path.open("w", newline="", encoding="utf-8") as handle:
        return write_rows(handle, CSV_COLUMNS, rows)


@dataclass(frozen=True)
class CsvImportResult:
    added: int
    duplicates: int  # rows identical to a stored review (e.g. re-importing an export)
    errors: list[str]  # "line N: what is wrong"


def _review_from_csv(row: dict[str, str]) -> tuple[Review, str | None]:
    def split(value: str) -> tuple[str, ...]:
        return tuple(part.strip() for part in value.replace(",", ";").split(";") if part.strip())

    decision = row["decision"].strip().lower()
    label = row["label"].strip().lower() or None
    confidence = (row.get("confidence") or "").strip()
    if not row["study_id"].strip().isdigit():
        raise ReviewError(f"study_id {row['study_id']!r} is not a study number")
    if confidence and not confidence.isdigit():
        raise ReviewError(f"confidence {confidence!r} is not a whole number 1-5")
    created_at = (row.get("created_at") or "").strip() or None
    if created_at:
        try:
            dt.datetime.fromisoformat(created_at.replace("Z", "+00:00"))
        except ValueError as error:
            raise ReviewError(f"created_at {created_at!r} is not an ISO 8601 time") from error
    review = Review(
        study_id=int(row["study_id"]),
        reviewer=row["reviewer"].strip(),
        decision=decision,
        label=label,
        criteria=split(row["criteria"]),
        exclusion_reason=(row.get("exclusion_reason") or "").strip() or None,
        artifacts=split(row.get("artifacts") or ""),
        confidence=int(confidence) if confidence else None,
        note=row.get("note") or "",  # as written: a round trip of an export keeps every character
        adjudication=(row.get("adjudication") or "").strip().lower() in ("1", "true", "yes"),
        assisted=(row.get("assisted") or "").strip().lower() in ("1", "true", "yes"),
    )
    return review, created_at


def import_reviews_csv(db: sqlite_utils.Database, path: Path) -> CsvImportResult:
    """Append the reviews of a CSV (columns as :func:`export_reviews_csv`; ``study_id,
    reviewer, decision, label, criteria`` required). Bad rows are reported with their line
    number and skipped; good rows are stored. A row identical to a stored review (same
    study, reviewer, time, decision, label, criteria) is a duplicate and is skipped, so
    re-importing an export adds nothing.
    """
    rows = read_rows(path, REQUIRED_CSV_COLUMNS, ReviewError)
    added = duplicates = 0
    errors = []
    for line, raw in rows:
        # Undo the export's formula quoting; DictReader gives None for short rows, a list for long ones.
        row = {key: unescape_cell(value) if isinstance(value, str) else value for key, value in raw.items()}
        try:
            review, created_at = _review_from_csv(row)
            if created_at and db.execute(
                "SELECT 1 FROM reviews WHERE study_id = ? AND reviewer = ? AND created_at = ? AND decision = ?"
                " AND label IS ? AND criteria = ?",
                [review.study_id, review.reviewer, created_at, review.decision, review.label, ";".join(review.criteria)],
            ).fetchone():
                duplicates += 1
                continue
            add_review(db, review, created_at=created_at)
            added += 1
        except ReviewError as error:
            errors.append(f"line {line}: {error}")
    return CsvImportResult(added, duplicates, errors)
