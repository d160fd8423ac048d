"""De-identification rules: what identifies a person in a DICOM header and in a file name, and
the few facts kept.

Only :class:`DicomFacts` leaves a DICOM header: sex, age in years (stored as a 10-year band by
ingest), the study year, and the raw identifiers and study date, which are there only so the
caller can hash them, make sure none reaches storage, or turn the date into an interval
(never stored or printed themselves). Everything else in
the header is dropped.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue


@dataclass(frozen=True)
class DicomFacts:
    """The only things that leave a DICOM header.

    Raw identifiers are here ONLY so the caller can hash them; never store or print
    them. They are excluded from ``repr`` so that logging a ScanFile does not leak them.

    Attributes:
        study_uid: StudyInstanceUID, or None.
        patient_id: PatientID, or None.
        identifiers: Every identifying string value in the header (names and their
            components, IDs, instance UIDs, accession, institution, physicians, dates
            and times, address...) and every free-text value (LO, SH, LT, ST, UT, UC, AE)
            of four or more characters, so the caller can make sure none of them reaches
            storage. Well-known DICOM UIDs (1.2.840.10008.*) are left out.
        sex: "F", "M", "O" or None.
        age_years: From PatientAge ("045Y" -> 45, "006M" -> 0), else from
            PatientBirthDate and StudyDate; None if unknown or implausible.
        study_year: Year of the study only, or None.
        study_date: The study's date (StudyDate, else SeriesDate, AcquisitionDate,
            ContentDate: the one the year comes from), or None. Raw like the identifiers:
            there only so the caller can compute the study's day offset from the patient's
            first study (``bonescan_core.priors``); never store or print it.
    """

    study_uid: str | None = field(repr=False)
    patient_id: str | None = field(repr=False)
    identifiers: tuple[str, ...] = field(repr=False)
    sex: str | None
    age_years: int | None
    study_year: int | None
    study_date: _dt.date | None = field(default=None, repr=False)



# Named non-PN/UI/DA/DT/TM attributes that identify a patient, institution, person or device.
_IDENTIFYING_KEYWORDS = frozenset(
    {
        "PatientID",
        "IssuerOfPatientID",
        "OtherPatientIDs",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "PatientTelecomInformation",
        "MedicalRecordLocator",
        "MilitaryRank",
        "BranchOfService",
        "RegionOfResidence",
        "CountryOfResidence",
        "EthnicGroup",
        "Occupation",
        "PatientComments",
        "AdditionalPatientHistory",
        "PatientState",
        "InsurancePlanIdentification",
        "InstitutionName",
        "InstitutionAddress",
        "InstitutionalDepartmentName",
        "ReferringPhysicianAddress",
        "ReferringPhysicianTelephoneNumbers",
        "PersonAddress",
        "PersonTelephoneNumbers",
        "AccessionNumber",
        "StudyID",
        "AdmissionID",
        "RequestedProcedureID",
        "ScheduledProcedureStepID",
        "PerformedProcedureStepID",
        "FillerOrderNumberImagingServiceRequest",
        "PlacerOrderNumberImagingServiceRequest",
        "StationName",
        "DeviceSerialNumber",
        "DeviceUID",
        "DetectorID",
        "PlateID",
        "CassetteID",
        "GantryID",
        "ImageComments",
        "StudyComments",
        "ContentCreatorName",
        "ResponsibleOrganization",
        "ResponsiblePerson",
        "IssuerOfAdmissionID",
        "ServiceEpisodeID",
        "ClinicalTrialSubjectID",
        "ClinicalTrialSponsorName",
        "ClinicalTrialSiteName",
        "ClinicalTrialSiteID",
        "ClinicalTrialProtocolID",
        "TextValue",
    }
)
_IDENTIFYING_VRS = frozenset({"PN", "UI", "DA", "DT", "TM"})
# Free text (descriptions, comments, labels, codes, AE titles) can hold anything, names
# included; PS3.15 Annex E removes nearly all of it. Its values of _MIN_FREE_TEXT or more
# characters count as identifiers too, so that a file named after, say, its StudyDescription
# is stored under a neutral name.
_FREE_TEXT_VRS = frozenset({"LO", "SH", "LT", "ST", "UT", "UC", "AE"})
_MIN_FREE_TEXT = 4
_STANDARD_UID_ROOT = "1.2.840.10008."  # the DICOM standard's own UIDs identify nobody


def _digits_date(value: object) -> _dt.date | None:
    """A DA/DT value (YYYYMMDD, or old YYYY.MM.DD) as a date, or None."""
    digits = re.sub(r"[^0-9]", "", str(value or ""))[:8]
    if len(digits) < 8:
        return None
    try:
        return _dt.date(int(digits[:4]), int(digits[4:6]), int(digits[6:8]))
    except ValueError:
        return None


def dicom_age_years(patient_age: str | None, birth_date: str | None = None, study_date: str | None = None) -> int | None:
    """Age in whole years at the study.

    Args:
        patient_age: DICOM AS value such as "045Y", "006M", "010W", "003D" (a bare
            number is read as years).
        birth_date: DICOM DA value YYYYMMDD, used when patient_age is unusable.
        study_date: DICOM DA value YYYYMMDD of the study.

    Returns:
        Age in years (0..130), or None when unknown or implausible.
    """
    if patient_age:
        match = re.fullmatch(r"\s*(\d{1,3})\s*([DWMY]?)\s*", str(patient_age), flags=re.IGNORECASE)
        if match:
            number, unit = int(match.group(1)), (match.group(2) or "Y").upper()
            years = {"Y": number, "M": number // 12, "W": number // 52, "D": number // 365}[unit]
            return years if 0 <= years <= 130 else None
    born, seen = _digits_date(birth_date), _digits_date(study_date)
    if born is None or seen is None:
        return None
    years = seen.year - born.year - ((seen.month, seen.day) < (born.month, born.day))
    return years if 0 <= years <= 130 else None


def collect_identifiers(ds: Dataset) -> tuple[str, ...]:
    """Every identifying string in ``ds`` (recursively, file meta included)."""
    found: dict[str, None] = {}  # ordered set

    def add(text: str) -> None:
        text = text.strip().strip("\x00").strip()
        if text and not text.startswith(_STANDARD_UID_ROOT):
            found.setdefault(text, None)

    def visit(_: Dataset, elem: DataElement) -> None:
        named = elem.VR in _IDENTIFYING_VRS or elem.keyword in _IDENTIFYING_KEYWORDS
        if not named and elem.VR not in _FREE_TEXT_VRS:
            return
        if elem.VR in ("SQ", "OB", "OW", "UN") or elem.value is None:
            return
        values = elem.value if isinstance(elem.value, (list, tuple, MultiValue)) else [elem.value]
        for value in values:
            if isinstance(value, bytes):
                continue
            text = str(value)
            if not named and len(text.strip()) < _MIN_FREE_TEXT:
                continue  # short codes ("NM", "DCM") identify nobody, and redacting them would garble messages
            add(text)
            if elem.VR == "PN":
                # Names reach file names in any order and separator: keep the parts too.
                for part in re.split(r"[\^=]", text):
                    add(part)
            elif elem.VR == "DA":
                day = _digits_date(text)
                if day is not None:
                    add(day.isoformat())

    for container in (ds.file_meta, ds):
        try:
            container.walk(visit)
        except Exception:  # a malformed value must not hide the rest: go element by element
            for elem in container.iterall():
                try:
                    visit(container, elem)
                except Exception:
                    continue
    return tuple(found)


def dicom_facts(ds: Dataset, identifiers: tuple[str, ...]) -> DicomFacts:
    def text(keyword: str) -> str | None:
        try:
            value = str(ds.get(keyword) or "").strip()
        except Exception:  # an undecodable value is simply unknown
            return None
        return value or None

    sex = (text("PatientSex") or "").upper()
    study_date = next((d for d in map(text, ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")) if d), None)
    day = _digits_date(study_date)
    year = day.year if day else None
    if year is None and study_date and re.match(r"\d{4}", study_date):
        year = int(study_date[:4])
    return DicomFacts(
        study_uid=text("StudyInstanceUID"),
        patient_id=text("PatientID"),
        identifiers=identifiers,
        sex=sex if sex in ("F", "M", "O") else None,
        age_years=dicom_age_years(text("PatientAge"), text("PatientBirthDate"), study_date),
        study_year=year if year is not None and 1900 <= year <= 2200 else None,
        study_date=day if day is not None and 1900 <= day.year <= 2200 else None,
    )


_VIEW_SUFFIX = {"anterior": "ANT", "posterior": "POST"}
_NAME_TOKEN_SPLIT = re.compile(r"[^a-z0-9]+")  # on a lowered name: its words and numbers


def stored_file_name(
    name: str | Path,
    file_format: str,
    sha256: str,
    view: str | None,
    identifiers: Iterable[str] = (),
    *,
    keep: bool = False,
) -> str:
    """The one rule for the file name stored in ``images.source`` (shown in the viewers).

    By default a neutral name, ``<format>-<first 8 hex digits of the pixel SHA-256>`` plus
    ``-ANT``/``-POST`` when the view is known (``png-3fa9c2d1-ANT``): file names often carry
    an MRN, a name or a birth date. With ``keep`` the original name (without its folders) is
    kept unless it contains an identifier: any of ``identifiers`` of four or more characters
    anywhere in it, or a shorter one as a whole token (``S9`` in ``scan_s9_ANT.png``), in
    any case. Then it is neutral too.

    Args:
        name: the file's name or path as imported or uploaded.
        file_format: tiff | png | jpeg | dicom.
        sha256: hex SHA-256 of the frame's pixels.
        view: "anterior", "posterior" or None.
        identifiers: manifest ids and the DICOM header's identifiers.
        keep: the caller opted in to keeping original names.
    """
    original = Path(name).name
    if keep and original and not _contains_identifier(original, identifiers):
        return original
    suffix = f"-{_VIEW_SUFFIX[view]}" if view in _VIEW_SUFFIX else ""
    return f"{file_format}-{sha256[:8]}{suffix}"


def _contains_identifier(name: str, identifiers: Iterable[str]) -> bool:
    lowered = name.lower()
    tokens = set(_NAME_TOKEN_SPLIT.split(lowered))
    for value in identifiers:
        value = str(value).strip().lower()
        if value and (value in tokens or (len(value) >= 4 and value in lowered)):
            return True
    return False
