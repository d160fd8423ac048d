"""Prior studies: each study's day offset from its patient's first study, and the same
patient's other studies as the Review page shows them beside the current one.

Criteria (b) "new lesions on follow-up" and (e) "lesions enlarged after at least 3 months"
need the interval between a patient's scans; dates identify (``docs/deidentification.md``).
So a study keeps ``studies.day_offset``: whole days since its patient's first dated study
(0 for that one), NULL when its date is unknown. The date comes, at import, from a manifest's
``study_date`` or else the DICOM header (the date whose year is kept:
``deidentify.DicomFacts.study_date``). The date itself is stored nowhere.

An earlier study may arrive in a later import, and then every offset of its patient moves.
For that the patient keeps ``patients.day_anchor``: the first study's day number XOR a 60-bit
pad drawn from the database's salt and the patient's original identifier (the DICOM
PatientID or manifest ``patient_id``, never stored). Without that identifier the anchor says
nothing of the date; someone holding the database who also knows the patient's identifier
can recover the first study's day, and from the offsets the others' (as they can already
confirm a guessed identifier against the salted key).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

from bonescan_core.heavy import sqlite_utils

NEEDS_EARLIER = ("new_lesions_followup", "enlarging_lesions")
"""Criteria (b) and (e) (ids of ``review.CRITERIA``): they compare with an earlier study."""

NO_EARLIER = "no earlier study of this patient in the database"
DAYS_PER_MONTH = 365.25 / 12
_PAD_HEX_DIGITS = 15  # 60 bits: the sealed anchor stays a positive SQLite INTEGER


def manifest_date(text: str) -> dt.date:
    """A manifest ``study_date`` cell as a date.

    Args:
        text: ``YYYY-MM-DD`` or ``YYYYMMDD`` (ISO 8601), year 1900 to 2200.

    Raises:
        ValueError: anything else; the message does not quote the value (a date identifies).
    """
    try:
        day = dt.date.fromisoformat(text.strip())
    except ValueError:
        raise ValueError("study_date is not a date: write it as YYYY-MM-DD") from None
    if not 1900 <= day.year <= 2200:
        raise ValueError("study_date is not a plausible date: its year must lie between 1900 and 2200")
    return day


def date_spellings(day: dt.date) -> tuple[str, ...]:
    """How a date may appear in a file name (``2019-03-04``, ``20190304``, ``2019.03.04``, ``2019_03_04``):
    identifiers for ``deidentify.stored_file_name``, so a kept name holding the date stays neutral."""
    iso = day.isoformat()
    return (iso, iso.replace("-", ""), iso.replace("-", "."), iso.replace("-", "_"))


def _pad(anchor_key: str) -> int:
    return int(anchor_key[:_PAD_HEX_DIGITS], 16)


def record_study_day(db: sqlite_utils.Database, study_id: int, patient_id: int, day: dt.date, anchor_key: str) -> None:
    """Give a study its day offset from its patient's first dated study, inside the caller's
    write transaction; ``day`` itself is not stored.

    A study that has an offset keeps it (its first dated file decided). A day before the
    patient's first one becomes the new first: every dated study of the patient moves by the
    difference. Nothing happens when the study belongs to another patient than ``patient_id``
    (a file whose patient disagrees with its study's: its pad would be the wrong one).

    Args:
        study_id: the study (stored).
        patient_id: the patient the caller's file belongs to.
        day: the study's date.
        anchor_key: hex salted hash of the patient's original identifier, of a kind of its
            own (``ingest.salted_key(salt, "day-anchor", patient)``): the pad that seals
            ``patients.day_anchor``.
    """
    row = db.execute(
        "SELECT s.patient_id, s.day_offset, p.day_anchor FROM studies s JOIN patients p ON p.id = s.patient_id WHERE s.id = ?",
        [study_id],
    ).fetchone()
    if row is None or row[0] != patient_id or row[1] is not None:
        return
    sealed = row[2]
    pad = _pad(anchor_key)
    number = day.toordinal()
    anchor = None if sealed is None else sealed ^ pad
    if anchor is None or number < anchor:
        if anchor is not None:
            db.execute("UPDATE studies SET day_offset = day_offset + ? WHERE patient_id = ? AND day_offset IS NOT NULL",
                       [anchor - number, patient_id])
        db.execute("UPDATE patients SET day_anchor = ? WHERE id = ?", [number ^ pad, patient_id])
        anchor = number
    db.execute("UPDATE studies SET day_offset = ? WHERE id = ?", [number - anchor, study_id])


# --- the Review page: the same patient's other studies ----------------------------------------


@dataclass(frozen=True)
class OtherStudy:
    """Another study of the current study's patient.

    Attributes:
        study_id: its id.
        days: its offset minus the current study's: negative when it is earlier, 0 the same
            day, positive later; None when either date is unknown.
    """

    study_id: int
    days: int | None

    @property
    def interval(self) -> str:
        """The interval in words (:func:`interval_text`)."""
        return interval_text(self.days)


def interval_text(days: int | None) -> str:
    """``94 days earlier (3.1 months)``, ``12 days later``, ``same day``, ``interval unknown``."""
    if days is None:
        return "interval unknown"
    if days == 0:
        return "same day"
    count = abs(days)
    text = f"{count} day{'s' if count != 1 else ''} {'earlier' if days < 0 else 'later'}"
    if count >= 28:
        text += f" ({count / DAYS_PER_MONTH:.1f} months)"  # criterion (e) counts months
    return text


def other_studies(db: sqlite_utils.Database, study_id: int) -> list[OtherStudy]:
    """The same patient's other studies, in the order the Review page shows them beside the
    study: earlier ones first (the nearest first), then those of the same day and later ones
    (the nearest first), then those whose interval is unknown (by id). Empty for an unknown study."""
    row = db.execute("SELECT patient_id, day_offset FROM studies WHERE id = ?", [study_id]).fetchone()
    if row is None:
        return []
    patient_id, offset = row
    others = [
        OtherStudy(other_id, None if offset is None or other_offset is None else other_offset - offset)
        for other_id, other_offset in db.execute(
            "SELECT id, day_offset FROM studies WHERE patient_id = ? AND id != ? ORDER BY id", [patient_id, study_id]
        ).fetchall()
    ]
    return sort_others(others)


def sort_others(others: Iterable[OtherStudy]) -> list[OtherStudy]:
    """Earlier first (nearest first), then same day and later (nearest first), then unknown (by id)."""
    def order(other: OtherStudy) -> tuple[int, int, int]:
        if other.days is None:
            return (2, 0, other.study_id)
        return (0, -other.days, other.study_id) if other.days < 0 else (1, other.days, other.study_id)

    return sorted(others, key=order)


def earlier_notice(others: Iterable[OtherStudy]) -> str | None:
    """What criteria (b) and (e) say beside them: None when an earlier study is known, else
    :data:`NO_EARLIER`, or that none is known to be earlier when some intervals are unknown."""
    others = list(others)
    if any(other.days is not None and other.days < 0 for other in others):
        return None
    unknown = sum(other.days is None for other in others)
    if unknown:
        return (f"no study of this patient known to be earlier (the interval to {unknown} other "
                f"{'study is' if unknown == 1 else 'studies is'} unknown)")
    return NO_EARLIER
