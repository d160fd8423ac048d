"""Import scan files into the database: grouping into patients and studies, views, labels
from folders or a manifest, de-identification and de-duplication.

A rejected file leaves no rows, and one failure never aborts the batch. Rules (``docs/cli.md``):

* class of a file: nearest parent folder named metastatic/mets/positive/1 or
  non_metastatic/no_metastasis/negative/normal/0 (any case); also the ``<0|1>`` of
  ``NNNN-<0|1>-<A|P>.tif`` names;
* view: tokens A/ANT/anterior and P/POST/posterior in the file name (``A12.png``,
  ``0001-1-A.tif``, ``scan_ANT.png``) or a parent folder (``Anterior/``), or DICOM attributes;
* study: files whose paths differ only by the view token; DICOM by StudyInstanceUID;
  a manifest CSV (``path, patient_id, study_id, view, label[, sex, age, primary_cancer, cohort,
  lesions, study_date]``) overrides all of it;
* study date: a manifest row's ``study_date`` (YYYY-MM-DD), else the DICOM date whose year is
  kept; only the year and the study's day offset from its patient's first study are stored
  (:mod:`bonescan_core.priors`), never the date;
* lesion points: a manifest row's optional ``lesions`` cell, a JSON list of ``[view, row, col]``
  in the pixels of that row's file (:mod:`bonescan_core.lesions`); a point outside its image,
  or on a view the file does not hold, rejects the file with a reason that says what to fix.
  Demo phantoms store their metastases as points;
* cohort: the import's ``cohort`` (default ``default``), or a manifest row's non-empty
  ``cohort`` cell; a study keeps the cohort it was first stored in (the import line says so).

De-identification: only salted hashes of identifiers (patient, study UID, manifest ids,
path) are stored; sex, a 10-year age band, the study year and the primary cancer are kept
(the paper's Table 1). Files are stored under a neutral name (``png-3fa9c2d1-ANT``: format,
pixel hash, view) unless the caller opts in to keeping original names, and even then a name
that contains a manifest id or one of its DICOM identifiers stays neutral
(:func:`bonescan_core.deidentify.stored_file_name`). Grouping and views use the original name at import time only.

At scale (:func:`import_files`): the files are planned (grouped) first, then decoded, validated
and prepared (pixel hash, lossless blob, thumbnail) in worker processes (:func:`decode_file`,
no database), and written in the planned order, :data:`BATCH_FILES` files to a transaction with
a savepoint per file, so ids do not depend on the number of processes. Each stored file's
salted content hash goes to ``imported_files``: a re-run after a kill skips those files without
decoding them.

Confinement (the app): folder imports must lie under an allowed root
(:func:`allowed_import_roots`: ``$BONESCAN_IMPORT_ROOTS``, else the data folder
``$BONESCAN_DATA_DIR``, else ``data/`` beside the database), never the whole file system, and
every file is resolved (links followed) and must still lie under a root. Upload batches are
capped (:data:`MAX_UPLOAD_FILES`, :data:`MAX_UPLOAD_BYTES`) and streamed to a temporary folder.
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np

from bonescan_core import db as dbm
from bonescan_core import lesions, pixelstore, priors
from bonescan_core.cohorts import DEFAULT_COHORT, CohortError, check_cohort
from bonescan_core.csvfile import read_rows
from bonescan_core.decodepool import DecodePool, WorkerDied
from bonescan_core.deidentify import DicomFacts, stored_file_name
from bonescan_core.errors import BonescanError, InputError, Unavailable
from bonescan_core.heavy import sqlite_utils
from bonescan_core.imaging import EXTENSIONS, RejectedFile, read_scan
from bonescan_core.phantom import VIEWS, PhantomStudy, ScannerShift, make_studies
from bonescan_core.review import Review, add_review

CLASS_FOLDERS = {
    **{name: "metastatic" for name in ("metastatic", "mets", "positive", "1")},
    **{name: "non_metastatic" for name in ("non_metastatic", "no_metastasis", "negative", "normal", "0")},
}
VIEW_TOKENS = lesions.VIEW_TOKENS  # A/ANT/anterior, P/POST/posterior (any case) -> the view
MANIFEST_COLUMNS = ("path", "patient_id", "study_id", "view", "label")
_TOKEN_SPLIT = re.compile(r"([^A-Za-z0-9]+)")
_ZENODO_NAME = re.compile(r"^([AaPp])(\d+)$")  # A12 / P12
_NUMBERED_NAME = re.compile(r"^\d+-([01])-[AaPp]$")  # 0001-1-A

Upload = tuple[str, bytes | BinaryIO]  # (file name as uploaded, content or a readable binary file)

# One browser upload batch at most (Streamlit's maxUploadSize limits each file, not the batch).
# Streamlit keeps a batch in memory until the page lets go of it; these bound that memory.
# Larger sets: copy them into the data folder and import the folder.
MAX_UPLOAD_FILES = 1000
MAX_UPLOAD_BYTES = 1024**3  # 1 GiB in all
DATA_DIR_ENV = "BONESCAN_DATA_DIR"
IMPORT_ROOTS_ENV = "BONESCAN_IMPORT_ROOTS"


@dataclass(frozen=True)
class ProgressStep:
    """What a progress callback is told after each file (or demo study).

    Attributes:
        done, total: items finished so far and in all.
        name: the item just finished (a file name, never a path).
        per_s: items per second since the start (None before any time has passed).
        eta_s: seconds left at that rate (None when unknown).
        unit: what is counted ("files", "studies").
    """

    done: int
    total: int
    name: str
    per_s: float | None = None
    eta_s: float | None = None
    unit: str = "files"

    def text(self) -> str:
        """The line the CLI and the Scans page show, e.g. ``1200/2000 files · 85 files/s · ETA 9 s``."""
        return progress_text(self.done, self.total, self.per_s, self.eta_s, self.unit)


Progress = Callable[[ProgressStep], None]


def progress_text(done: int, total: int, per_s: float | None, eta_s: float | None, unit: str = "files") -> str:
    """``1200/2000 files · 85 files/s · ETA 9 s``; rate and ETA left out while unknown, ETA in
    s below two minutes, else m, else h (one decimal)."""
    parts = [f"{done}/{total} {unit}"]
    if per_s is not None:
        parts.append(f"{per_s:.1f} {unit}/s" if per_s < 10 else f"{per_s:.0f} {unit}/s")
    if eta_s is not None and done < total:
        if eta_s < 120:
            parts.append(f"ETA {eta_s:.0f} s")
        elif eta_s < 7200:
            parts.append(f"ETA {eta_s / 60:.0f} min")
        else:
            parts.append(f"ETA {eta_s / 3600:.1f} h")
    return " · ".join(parts)


class ProgressClock:
    """Counts finished items and calls ``progress`` with the rate and ETA since it was made.

    Args:
        total: items in all.
        progress: the callback, or None (then :meth:`step` only counts).
        unit: what is counted, for the text.
        clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(self, total: int, progress: Progress | None, unit: str = "files",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.progress, self.unit, self.clock = total, progress, unit, clock
        self.done = 0
        self.started = clock()

    def step(self, name: str) -> None:
        """One more item finished."""
        self.done += 1
        if self.progress is None:
            return
        elapsed = self.clock() - self.started
        per_s = self.done / elapsed if elapsed > 0 else None
        eta_s = (self.total - self.done) / per_s if per_s else None
        self.progress(ProgressStep(self.done, self.total, name, per_s, eta_s, self.unit))


class ManifestError(InputError):
    """The manifest CSV cannot be used; the message names the line and what to fix."""


class UploadTooLarge(InputError):
    """An upload batch has more files or bytes than :data:`MAX_UPLOAD_FILES` / :data:`MAX_UPLOAD_BYTES`."""


class DecoderStopped(Unavailable):
    """A decode worker process died (killed, out of memory); the files stored so far stay."""


class ImportRootError(BonescanError, PermissionError):
    """A folder outside the allowed import roots, or a root that is the whole file system."""


@dataclass(frozen=True)
class PlannedFile:
    """Where one file goes, decided before it is read."""

    path: Path
    group: str  # study grouping key (hashed before storage); DICOM may replace it by its UID
    patient: str | None = None  # patient key (hashed); None: one patient per study
    view: str | None = None
    label: str | None = None  # "metastatic" | "non_metastatic" from folder/name/manifest
    label_source: str = ""
    sex: str | None = None
    age: int | None = None
    primary_cancer: str | None = None
    from_manifest: bool = False
    cohort: str | None = None  # checked name; None: the import's cohort (see import_files)
    ids: tuple[str, ...] = field(default=(), repr=False)  # raw manifest ids: compared with names, never stored
    lesions: tuple[lesions.LesionPoint, ...] = ()  # the manifest row's lesion points, in this file's pixels
    where: str = ""  # "manifest.csv line 4": where the row came from, for messages
    study_date: dt.date | None = field(default=None, repr=False)  # the manifest's: turned into an offset, never stored


@dataclass(frozen=True)
class FileOutcome:
    """What happened to one file: ``imported``, ``duplicate`` or ``rejected``."""

    path: Path
    status: str
    detail: str = ""  # rejection reason, or notes for imported files
    image_ids: tuple[int, ...] = field(default=())
    display_name: str | None = None  # shown instead of the path (uploads)

    def line(self) -> str:
        """One line for the terminal or the page, e.g. ``a.png: rejected: empty file ...``."""
        name = self.display_name or str(self.path)
        if self.status == "rejected":
            return f"{name}: rejected: {self.detail}"
        return f"{name}: {self.status}" + (f" ({self.detail})" if self.detail else "")


def salted_key(salt: str, kind: str, value: str) -> str:
    """Pseudonymous key: hex SHA-256 of salt, kind and value (the value is never stored)."""
    return hashlib.sha256(f"{salt}\x00{kind}\x00{value}".encode()).hexdigest()


def age_band(age: int | None) -> str | None:
    """10-year band ('40-49'); 90 and over pooled as '90+' (rare ages identify)."""
    if age is None or age < 0:
        return None
    if age >= 90:
        return "90+"
    low = age // 10 * 10
    return f"{low}-{low + 9}"


def collect_files(paths: Iterable[Path]) -> list[Path]:
    """Files named and files under folders named, recursively, sorted; hidden files skipped.

    Raises:
        FileNotFoundError: a path does not exist.
    """
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(
                p for p in sorted(path.rglob("*"))
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path} does not exist; check the path")
    return files


def _view_and_group_name(name: str) -> tuple[str | None, str]:
    """View from a file or folder name and the name with the view token replaced by '{view}'."""
    match = _ZENODO_NAME.match(name)
    if match:
        return VIEW_TOKENS[match.group(1).lower()], "{view}" + match.group(2)
    parts = _TOKEN_SPLIT.split(name)
    hits = [i for i, part in enumerate(parts) if part.lower() in VIEW_TOKENS]
    views = {VIEW_TOKENS[parts[i].lower()] for i in hits}
    if len(views) != 1:
        return None, name  # none, or contradictory: leave it to other rules
    for i in hits:
        parts[i] = "{view}"
    return views.pop(), "".join(parts)


def plan_file(path: Path, namespace: str | None = None) -> PlannedFile:
    """Grouping, view and folder label of one file by the path rules (no manifest).

    Args:
        path: the file.
        namespace: prefix of the grouping key; default the absolute parent folder. Uploads
            pass a per-batch id so that views uploaded together form one study.
    """
    stem = path.name[: len(path.name) - len(path.suffix)] if path.suffix.lower() in EXTENSIONS else path.name
    view, group_name = _view_and_group_name(stem)
    folders = list(path.resolve().parent.parts) if namespace is None else []
    if view is None:
        for index in range(len(folders) - 1, max(len(folders) - 3, -1), -1):  # nearest two folders
            folder_view, _ = _view_and_group_name(folders[index])
            if folder_view and folders[index].lower() in VIEW_TOKENS:
                view = folder_view
                folders[index] = "{view}"
                break
    elif folders and folders[-1].lower() in VIEW_TOKENS:
        folders[-1] = "{view}"  # Zenodo: <class>/Anterior/A12.png beside <class>/Posterior/P12.png
    label, label_source = None, ""
    numbered = _NUMBERED_NAME.match(stem)
    if numbered:
        # The pattern, not the name: the number may be a patient's (the note is stored).
        label, label_source = ("metastatic" if numbered.group(1) == "1" else "non_metastatic"), f"file name NNNN-{numbered.group(1)}-V"
    for folder in reversed(path.parent.parts):
        if folder.lower() in CLASS_FOLDERS:
            label, label_source = CLASS_FOLDERS[folder.lower()], f"folder {folder}"
            break
    prefix = namespace if namespace is not None else "/".join(folders)
    return PlannedFile(path=path, group=f"path:{prefix}/{group_name}", view=view, label=label, label_source=label_source)


def read_manifest(csv_path: Path) -> list[PlannedFile]:
    """Plans from a manifest CSV; paths are relative to the manifest's folder.

    Raises:
        ManifestError: missing columns or a bad value (the message names the line).
    """
    return [_manifest_row(csv_path, line, row) for line, row in read_rows(csv_path, MANIFEST_COLUMNS, ManifestError)]


def _manifest_row(csv_path: Path, line_number: int, row: dict[str, str]) -> PlannedFile:
    def bad(what: str) -> ManifestError:
        return ManifestError(f"{csv_path} line {line_number}: {what}")

    values = {key: (value or "").strip() for key, value in row.items() if key}
    if not values["path"] or not values["study_id"] or not values["patient_id"]:
        raise bad("path, patient_id and study_id are required")
    view = values["view"].lower()
    if view and view not in VIEW_TOKENS:
        raise bad(f"view {values['view']!r} is not anterior/posterior (or A/P)")
    label = values["label"].lower()
    label = {"1": "metastatic", "0": "non_metastatic"}.get(label, CLASS_FOLDERS.get(label, label))
    if label and label not in ("metastatic", "non_metastatic"):
        raise bad(f"label {values['label']!r} is not metastatic/non_metastatic (or 1/0)")
    sex = values.get("sex", "").upper()[:1] or None
    if sex and sex not in "FMO":
        raise bad(f"sex {values['sex']!r} is not F, M or O")
    age_text = values.get("age", "")
    if age_text and not age_text.isdigit():
        raise bad(f"age {age_text!r} is not a whole number of years")
    try:
        cohort = check_cohort(values["cohort"]) if values.get("cohort") else None
    except CohortError as error:
        raise bad(str(error)) from error
    try:
        points = lesions.parse_points(values.get("lesions", ""))
    except lesions.LesionError as error:
        raise bad(str(error)) from error
    try:
        study_date = priors.manifest_date(values["study_date"]) if values.get("study_date") else None
    except ValueError as error:
        raise bad(str(error)) from None
    path = Path(values["path"])
    return PlannedFile(
        path=path if path.is_absolute() else csv_path.parent / path,
        group=f"manifest:{values['study_id']}",
        patient=f"manifest:{values['patient_id']}",
        view=VIEW_TOKENS.get(view),
        label=label or None,
        label_source="manifest",
        sex=sex,
        age=int(age_text) if age_text else None,
        primary_cancer=values.get("primary_cancer") or None,
        from_manifest=True,
        cohort=cohort,
        ids=(values["patient_id"], values["study_id"], *(priors.date_spellings(study_date) if study_date else ())),
        lesions=points,
        where=f"{csv_path.name} line {line_number}",
        study_date=study_date,
    )


def _get_or_create_patient(db: sqlite_utils.Database, key: str, sex: str | None, band: str | None, cancer: str | None,
                           identified: bool = True) -> int:
    """The patient's id (created when new). ``identified``: False when the key stands for one
    study only (no DICOM PatientID, no manifest): splits then say they group by study."""
    row = db.execute("SELECT id, sex, age_band, primary_cancer FROM patients WHERE key = ?", [key]).fetchone()
    if row is None:
        return db["patients"].insert(
            {"key": key, "sex": sex, "age_band": band, "primary_cancer": cancer, "created_at": dbm.utc_now(),
             "identified": int(identified)}
        ).last_pk
    patient_id, old_sex, old_band, old_cancer = row
    updates = {name: new for name, old, new in (("sex", old_sex, sex), ("age_band", old_band, band), ("primary_cancer", old_cancer, cancer)) if old is None and new is not None}
    if updates:
        db["patients"].update(patient_id, updates)
    return patient_id


def _get_or_create_study(db: sqlite_utils.Database, key: str, patient_id: int, year: int | None, origin: str,
                         cohort: str) -> tuple[int, bool, str]:
    """(study id, newly created, its cohort): an existing study keeps the cohort it has."""
    row = db.execute("SELECT id, cohort FROM studies WHERE key = ?", [key]).fetchone()
    if row:
        return row[0], False, row[1]
    study_id = db["studies"].insert(
        {"patient_id": patient_id, "key": key, "study_year": year, "origin": origin, "cohort": cohort,
         "created_at": dbm.utc_now()}
    ).last_pk
    return study_id, True, cohort


@dataclass(frozen=True)
class PreparedFrame:
    """One frame made ready for its ``images`` row, with no database: everything CPU-heavy.

    Attributes:
        view: from the file's own metadata (DICOM), else None (the plan's view applies).
        sha: :func:`pixelstore.pixel_sha256` of the pixels.
        blob: :func:`pixelstore.encode_pixels` (lossless).
        thumbnail: :func:`pixelstore.make_thumbnail` PNG bytes.
        display_max: :func:`pixelstore.display_max`.
        height, width, dtype: the pixels' shape and numpy dtype name.
        clipped: negative pixels set to zero on reading.
    """

    view: str | None
    sha: str
    blob: bytes
    thumbnail: bytes
    display_max: float
    height: int
    width: int
    dtype: str
    clipped: int = 0


def prepare_frame(pixels: np.ndarray, view: str | None = None, *, sha: str | None = None, clipped: int = 0) -> PreparedFrame:
    """Hash, encode, thumbnail and window one (H, W) array of any numeric dtype."""
    return PreparedFrame(
        view=view, sha=sha or pixelstore.pixel_sha256(pixels), blob=pixelstore.encode_pixels(pixels),
        thumbnail=pixelstore.make_thumbnail(pixels), display_max=pixelstore.display_max(pixels),
        height=int(pixels.shape[0]), width=int(pixels.shape[1]), dtype=pixels.dtype.name, clipped=clipped)


@dataclass(frozen=True)
class DecodedFile:
    """The decode step's result for one planned file (picklable: crosses process boundaries).

    Either ``rejected`` holds the reason, or ``frames`` holds at least one prepared frame.
    """

    plan: PlannedFile
    file_format: str = ""
    frames: tuple[PreparedFrame, ...] = ()
    notes: tuple[str, ...] = ()
    dicom: DicomFacts | None = field(default=None, repr=False)
    rejected: str | None = None


def decode_file(plan: PlannedFile, resolved: Path) -> DecodedFile:
    """Read, validate and prepare every frame of one file; no database. Never raises for
    bad file content (the reason is in ``rejected``).

    Args:
        plan: where the file goes.
        resolved: the file's resolved path (the one checked against the import roots).
    """
    try:
        scan = read_scan(resolved)
    except RejectedFile as error:
        return DecodedFile(plan, rejected=str(error))
    frames = tuple(prepare_frame(frame.pixels, frame.view, clipped=frame.clipped) for frame in scan.frames)
    return DecodedFile(plan, scan.format, frames, tuple(scan.notes), scan.dicom)


def _check_path(plan: PlannedFile, confine_to: Sequence[Path] | None) -> tuple[Path | None, str | None]:
    """(resolved path, None) when the file may be read, else (None, rejection reason)."""
    if not plan.path.is_file():
        return None, "file not found; check the manifest path"
    resolved = plan.path.resolve()
    if confine_to is not None and not _inside(resolved, confine_to):
        return None, ("it links to a file outside the folders the app may import from; "
                      "copy the file itself into the data folder")
    return resolved, None


def file_key(salt: str, path: Path) -> str:
    """Salted SHA-256 of a file's bytes: how a re-run recognises a file it stored (a content
    hash, never a name or path; salted like every stored key)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1024**2), b""):
            digest.update(chunk)
    return salted_key(salt, "file", digest.hexdigest())


def _file_stored(db: sqlite_utils.Database, key: str) -> bool:
    return db.execute("SELECT 1 FROM imported_files WHERE key = ?", [key]).fetchone() is not None


def _record_file(db: sqlite_utils.Database, key: str, study_id: int | None) -> None:
    db.execute("INSERT OR IGNORE INTO imported_files (key, study_id, created_at) VALUES (?, ?, ?)",
               [key, study_id, dbm.utc_now()])


ALREADY_IMPORTED = "file already imported"


def store_decoded(
    db: sqlite_utils.Database,
    decoded: DecodedFile,
    reviewer: str,
    record_label: bool,
    *,
    key: str | None = None,
    keep_file_names: bool = False,
    known_ids: Iterable[str] = (),
) -> FileOutcome:
    """Write one decoded file (all its frames) inside the caller's transaction, as a savepoint
    of its own: a file that adds nothing (every frame stored already) leaves no rows.

    Args:
        key: :func:`file_key` of the file; recorded so that a re-run skips it undecoded.
        keep_file_names: store the original name where :func:`stored_file_name` allows it.
        known_ids: identifiers besides the file's own (every id of the manifest).
    """
    plan = decoded.plan
    if decoded.rejected is not None:
        return FileOutcome(plan.path, "rejected", decoded.rejected)
    if plan.lesions:
        problem = lesions.check_points(plan.lesions, [(f.view or plan.view, f.height, f.width) for f in decoded.frames])
        if problem is not None:
            return FileOutcome(plan.path, "rejected", f"{problem} ({plan.where}, lesions)")
    if key is not None and _file_stored(db, key):
        return FileOutcome(plan.path, "duplicate", ALREADY_IMPORTED)
    try:
        with db.atomic():  # inside dbm.write: a savepoint
            outcome, study_id = _store_rows(db, decoded, reviewer, record_label, keep_file_names, known_ids)
            if key is not None:
                _record_file(db, key, study_id)
    except _AllDuplicates:
        if key is not None:
            _record_file(db, key, None)
        return FileOutcome(plan.path, "duplicate", "identical pixels already stored")
    return outcome


def _store_rows(db: sqlite_utils.Database, decoded: DecodedFile, reviewer: str, record_label: bool,
                keep_file_names: bool, known_ids: Iterable[str]) -> tuple[FileOutcome, int]:
    """The file's rows (patient, study, images, label review) and its study id."""
    plan = decoded.plan
    salt = dbm.salt(db)
    facts = decoded.dicom
    group = plan.group
    if facts and facts.study_uid and not plan.from_manifest:
        group = f"dicom-study:{facts.study_uid}"
    if plan.patient:
        patient = plan.patient
    elif facts and facts.patient_id:
        patient = f"dicom-patient:{facts.patient_id}"
    else:
        patient = f"study:{group}"  # unknown patient: the study is its own patient
    sex = plan.sex or (facts.sex if facts else None)
    age = plan.age if plan.age is not None else (facts.age_years if facts else None)
    identifiers = (*(facts.identifiers if facts else ()), *plan.ids, *known_ids)
    notes = list(decoded.notes)
    patient_id = _get_or_create_patient(db, salted_key(salt, "patient", patient), sex, age_band(age), plan.primary_cancer,
                                        identified=not patient.startswith("study:"))
    cohort = plan.cohort or DEFAULT_COHORT
    day = plan.study_date or (facts.study_date if facts else None)  # a manifest overrides the header
    year = plan.study_date.year if plan.study_date else (facts.study_year if facts else None)
    study_id, new_study, kept_cohort = _get_or_create_study(
        db, salted_key(salt, "study", group), patient_id, year, "import", cohort)
    if day is not None:
        priors.record_study_day(db, study_id, patient_id, day, salted_key(salt, "day-anchor", patient))
    if kept_cohort != cohort:
        notes.append(f"study kept in cohort {kept_cohort!r}, where it was first imported (not {cohort!r})")
    image_ids, duplicates, views = [], 0, []
    for index, frame in enumerate(decoded.frames):
        if _image_exists(db, frame.sha):
            duplicates += 1
            continue
        view = frame.view or plan.view
        views.append(view or "view unknown")
        source = stored_file_name(plan.path, decoded.file_format, frame.sha, view, identifiers, keep=keep_file_names)
        image_ids.append(_insert_prepared(db, study_id, frame, view, source, decoded.file_format, frame_index=index))
        lesions.store_points(db, image_ids[-1], [(p.row, p.col) for p in plan.lesions if p.view == view], "manifest")
    if not image_ids:
        raise _AllDuplicates()
    if record_label and plan.label:
        already = db.execute(
            "SELECT label FROM reviews WHERE study_id = ? AND reviewer = ? ORDER BY id DESC LIMIT 1", [study_id, reviewer]
        ).fetchone()
        if already is None:
            add_review(db, Review(study_id=study_id, reviewer=reviewer, decision="include", label=plan.label,
                                  note=f"label from {plan.label_source}", from_import=True))
        elif already[0] != plan.label:
            notes.append(f"{plan.label_source} says {plan.label} but this study's earlier files said {already[0]}; label kept, check it in Review")
    if duplicates:
        notes.append(f"{duplicates} of {len(decoded.frames)} frames already stored")
    notes.insert(0, f"study {study_id}{'' if new_study else ' (existing)'}, {', '.join(views)}")
    return FileOutcome(plan.path, "imported", "; ".join(notes), tuple(image_ids)), study_id


def _image_exists(db: sqlite_utils.Database, sha: str) -> bool:
    return db.execute("SELECT 1 FROM images WHERE pixel_sha256 = ?", [sha]).fetchone() is not None


def insert_image(
    db: sqlite_utils.Database,
    study_id: int,
    pixels: np.ndarray,
    view: str | None,
    source: str,
    file_format: str,
    *,
    frame_index: int = 0,
    sha: str | None = None,
    truth: str | None = None,
    clipped: int = 0,
) -> int:
    """Insert one image row (lossless pixels, hash, thumbnail, window); returns its id.

    Args:
        pixels: (H, W) array, any numeric dtype, finite.
        view: "anterior", "posterior" or None.
        source: stored file name (already de-identified).
        file_format: tiff | png | jpeg | dicom | phantom.
        truth: phantom findings as JSON, None for real scans.
        clipped: pixels that were negative in the file and set to zero (``ScanFrame.clipped``).
    """
    frame = prepare_frame(pixels, sha=sha, clipped=clipped)
    return _insert_prepared(db, study_id, frame, view, source, file_format, frame_index=frame_index, truth=truth)


def _insert_prepared(db: sqlite_utils.Database, study_id: int, frame: PreparedFrame, view: str | None, source: str,
                     file_format: str, *, frame_index: int = 0, truth: str | None = None) -> int:
    return db["images"].insert(
        {
            "study_id": study_id,
            "view": view,
            "frame": frame_index,
            "source": source,
            "format": file_format,
            "height": frame.height,
            "width": frame.width,
            "dtype": frame.dtype,
            "pixels": frame.blob,
            "pixel_sha256": frame.sha,
            "thumbnail": frame.thumbnail,
            "display_max": frame.display_max,
            "truth": truth,
            "clipped_pixels": frame.clipped,
            "created_at": dbm.utc_now(),
        }
    ).last_pk


class _AllDuplicates(Exception):
    """Every frame of the file is already stored: roll back the patient/study rows too.

    Private control flow (caught in this module, never shown), so not in the error family.
    """


# --- the import loop: plan, skip what is stored, decode in parallel, write in batches ---

MIN_POOL_FILES = 16  # fewer files decode in-process: starting worker processes costs ~0.5 s each
WINDOW_PER_JOB = 8  # decoded files in flight per worker process; bounds memory whatever the folder's size
BATCH_FILES = 32  # files per write transaction (one fsync each) ...
BATCH_SECONDS = 1.0  # ... or fewer when decoding is slow, so progress and a kill lose little


def default_jobs() -> int:
    """Decode processes by default: the CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class _Pending:
    """One planned file on its way through the loop: settled already (``outcome``: rejected
    before reading, or stored by an earlier import) or to decode (``resolved``, ``key``)."""

    plan: PlannedFile
    outcome: FileOutcome | None = None
    resolved: Path | None = None
    key: str | None = None


def _pending(db: sqlite_utils.Database, salt: str, plan: PlannedFile, confine_to: Sequence[Path] | None) -> _Pending:
    resolved, problem = _check_path(plan, confine_to)
    if resolved is None:
        return _Pending(plan, FileOutcome(plan.path, "rejected", problem or ""))
    try:
        key = file_key(salt, resolved)
    except OSError as error:
        return _Pending(plan, FileOutcome(plan.path, "rejected", f"the file cannot be read ({error.strerror}); check its permissions"))
    if _file_stored(db, key):
        return _Pending(plan, FileOutcome(plan.path, "duplicate", ALREADY_IMPORTED))
    return _Pending(plan, resolved=resolved, key=key)


def _decoded_in_order(pending: Iterable[_Pending], total: int, jobs: int) -> Iterator[tuple[_Pending, DecodedFile | None]]:
    """(pending, decoded) in the planned order; decoded is None for settled files.

    With ``jobs`` > 1 and at least :data:`MIN_POOL_FILES` files, decoding runs in that many
    spawned worker processes (:class:`~bonescan_core.decodepool.DecodePool`; they import only
    the readers, never TensorFlow), at most ``jobs`` × :data:`WINDOW_PER_JOB` files ahead. A
    worker that dies raises :class:`DecoderStopped` for the first file not yet stored.
    """
    if jobs <= 1 or total < MIN_POOL_FILES:
        for item in pending:
            yield item, None if item.outcome else decode_file(item.plan, item.resolved)  # type: ignore[arg-type]
        return
    with DecodePool(decode_file, jobs) as pool:
        window: collections.deque[tuple[_Pending, bool]] = collections.deque()  # (item, handed to a worker)
        for item in pending:
            decoding = not item.outcome
            if decoding:
                try:
                    pool.submit(item.plan, item.resolved)
                except WorkerDied as error:
                    raise _decoder_stopped(item) from error
            window.append((item, decoding))
            while len(window) > jobs * WINDOW_PER_JOB or (window and not window[0][1]):
                yield _settle(window.popleft(), pool)
        while window:
            yield _settle(window.popleft(), pool)


def _settle(entry: tuple[_Pending, bool], pool: DecodePool) -> tuple[_Pending, DecodedFile | None]:
    item, decoding = entry
    if not decoding:
        return item, None
    try:
        return item, pool.next_result()
    except WorkerDied as error:
        raise _decoder_stopped(item) from error


def _decoder_stopped(item: _Pending) -> DecoderStopped:
    return DecoderStopped(
        f"a process decoding {item.plan.path.name} or a file near it stopped unexpectedly (out of memory, or "
        "killed); the files before it are stored: run the import again with --jobs 1, which skips them")


def _import_plans(
    db: sqlite_utils.Database,
    plans: Sequence[PlannedFile],
    *,
    reviewer: str,
    record_label: Callable[[PlannedFile], bool],
    keep_file_names: bool,
    known_ids: Iterable[str],
    confine_to: Sequence[Path] | None,
    jobs: int,
    progress: Progress | None,
) -> list[FileOutcome]:
    """The loop of :func:`import_files`: outcomes in the planned order, so study and image ids
    do not depend on ``jobs``. Files are written :data:`BATCH_FILES` to a transaction, each
    in a savepoint of its own; a kill loses at most the open batch, and a re-run skips every
    committed file without decoding it (:func:`file_key`)."""
    salt = dbm.salt(db)
    clock = ProgressClock(len(plans), progress)
    pending = (_pending(db, salt, plan, confine_to) for plan in plans)
    outcomes: list[FileOutcome] = []
    batch: list[tuple[_Pending, DecodedFile | None]] = []
    started = time.monotonic()

    def flush() -> None:
        nonlocal started
        written = []
        with dbm.write(db):
            for item, decoded in batch:
                if decoded is None:
                    written.append(item.outcome)
                else:
                    written.append(store_decoded(db, decoded, reviewer, record_label(item.plan), key=item.key,
                                                 keep_file_names=keep_file_names, known_ids=known_ids))
        for (item, _), outcome in zip(batch, written, strict=True):
            outcomes.append(outcome)  # type: ignore[arg-type]
            clock.step(item.plan.path.name)
        batch.clear()
        started = time.monotonic()

    for entry in _decoded_in_order(pending, len(plans), jobs):
        batch.append(entry)
        if len(batch) >= BATCH_FILES or time.monotonic() - started >= BATCH_SECONDS:
            flush()
    if batch:
        flush()
    return outcomes


def import_files(
    db: sqlite_utils.Database,
    paths: Iterable[Path],
    *,
    label_from_folder: bool = False,
    manifest: Path | None = None,
    reviewer: str = "import",
    namespace: str | None = None,
    progress: Progress | None = None,
    keep_file_names: bool = False,
    confine_to: Sequence[Path] | None = None,
    cohort: str = DEFAULT_COHORT,
    jobs: int | None = None,
) -> list[FileOutcome]:
    """Import files and folders; one outcome per file, in order.

    Args:
        db: open database.
        paths: files and folders (recursively).
        label_from_folder: record each study's class folder (or manifest label) as a
            review by ``reviewer``, with no criterion.
        manifest: CSV that decides grouping, views and labels for the files it lists
            (its labels are recorded as reviews even without ``label_from_folder``).
        reviewer: the name on those reviews.
        namespace: see :func:`plan_file` (uploads).
        progress: called after each file with a :class:`ProgressStep` (rate and ETA).
        keep_file_names: store original file names where :func:`stored_file_name` allows;
            every manifest id counts as an identifier for every file.
        confine_to: resolved roots; a file that resolves (links followed) outside all of
            them is rejected (the app's folder import; see :func:`import_folder`).
        cohort: the cohort of new studies; a manifest row's non-empty ``cohort`` wins.
        jobs: decode processes; default :func:`default_jobs`; 1 decodes in this process.
            The result does not depend on it.

    Raises:
        FileNotFoundError: a path does not exist (nothing imported).
        ManifestError: the manifest is unusable (nothing imported).
        CohortError: ``cohort`` is not an allowed name (nothing imported).
    """
    cohort = check_cohort(cohort)
    plans: dict[Path, PlannedFile] = {}
    if manifest is not None:
        for plan in read_manifest(manifest):
            plans[plan.path.resolve()] = plan
    for path in collect_files(paths):
        plans.setdefault(path.resolve(), plan_file(path, namespace))
    plans = {key: replace(plan, cohort=plan.cohort or cohort) for key, plan in plans.items()}
    known_ids = frozenset(value for plan in plans.values() for value in plan.ids)
    return _import_plans(db, list(plans.values()), reviewer=reviewer,
                         record_label=lambda plan: label_from_folder or plan.from_manifest,
                         keep_file_names=keep_file_names, known_ids=known_ids, confine_to=confine_to,
                         jobs=default_jobs() if jobs is None else max(1, jobs), progress=progress)


def import_one(
    db: sqlite_utils.Database,
    plan: PlannedFile,
    reviewer: str,
    record_label: bool,
    *,
    keep_file_names: bool = False,
    known_ids: Iterable[str] = (),
    confine_to: Sequence[Path] | None = None,
) -> FileOutcome:
    """Read and store one planned file in a transaction of its own, in this process; never
    raises for bad file content. Other arguments: see :func:`import_files` and :func:`store_decoded`.
    """
    item = _pending(db, dbm.salt(db), plan, confine_to)
    if item.outcome is not None:
        return item.outcome
    decoded = decode_file(plan, item.resolved)  # type: ignore[arg-type]
    with dbm.write(db):
        return store_decoded(db, decoded, reviewer, record_label, key=item.key,
                             keep_file_names=keep_file_names, known_ids=known_ids)


def _reference_review(study_id: int, phantom: PhantomStudy) -> Review:
    """The label a reader would give a phantom, with the criterion its findings support."""
    kinds = {finding.kind for finding in phantom.findings}
    artifacts = tuple(a for a in ("injection_site", "urine_contamination") if a in kinds)
    if phantom.metastatic:
        criteria: tuple[str, ...] = ("typical_pattern",)
    else:
        criteria = tuple(c for c, kind in (("trauma", "rib_fracture"), ("periarticular", "degenerative")) if kind in kinds)
        criteria = criteria or ("no_abnormal_uptake",)
    label = "metastatic" if phantom.metastatic else "non_metastatic"
    return Review(study_id=study_id, reviewer="reference", decision="include", label=label,
                  criteria=criteria, artifacts=artifacts, confidence=5, note="phantom ground truth")


def add_demo_studies(db: sqlite_utils.Database, n_studies: int, seed: int, progress: Progress | None = None, *,
                     cohort: str = DEFAULT_COHORT, shift: ScannerShift | None = None) -> list[FileOutcome]:
    """Add seeded synthetic studies (both views) with reference labels (reviewer ``reference``).

    The same seed gives the same studies, so running it twice reports duplicates.
    Each image keeps its phantom findings (lesion coordinates) as JSON in ``images.truth``, and
    its metastases as lesion points (``lesions``, source ``phantom``).

    Args:
        cohort: the cohort of the new studies (checked; a study already stored keeps its own).
        shift: draw the studies as another scanner would (``phantom.ScannerShift``); they are
            named ``phantom-shift-SEED-NNNN`` so that they never merge with unshifted studies.

    Raises:
        CohortError: ``cohort`` is not an allowed name (nothing added).
    """
    cohort = check_cohort(cohort)
    salt = dbm.salt(db)
    outcomes = []
    prefix = "phantom-shift" if shift is not None else "phantom"
    clock = ProgressClock(n_studies, progress, unit="studies")
    for index, phantom in enumerate(make_studies(n_studies, seed, shift=shift)):
        name = f"{prefix}-{seed}-{index:04d}"
        try:
            with dbm.write(db):
                patient_id = _get_or_create_patient(
                    db, salted_key(salt, "patient", f"demo:{name}"), phantom.sex, age_band(phantom.age), phantom.primary_cancer
                )
                study_id, _, _ = _get_or_create_study(db, salted_key(salt, "study", f"demo:{name}"), patient_id, None,
                                                      "demo", cohort)
                image_ids = []
                for view in VIEWS:
                    pixels = getattr(phantom, view)
                    sha = pixelstore.pixel_sha256(pixels)
                    if _image_exists(db, sha):
                        raise _AllDuplicates()
                    truth = json.dumps([asdict(f) for f in phantom.findings if f.view == view])
                    image_ids.append(insert_image(db, study_id, pixels, view, f"{name}-{view}", "phantom", sha=sha, truth=truth))
                    lesions.store_points(db, image_ids[-1], [(r, c) for _, r, c in lesions.points_from_truth(truth)], "phantom")
                add_review(db, _reference_review(study_id, phantom))
            outcomes.append(FileOutcome(Path(name), "imported", f"study {study_id}", tuple(image_ids)))
        except _AllDuplicates:
            outcomes.append(FileOutcome(Path(name), "duplicate", "already in the database"))
        clock.step(name)
    return outcomes


def import_uploads(
    db: sqlite_utils.Database,
    files: Sequence[Upload],
    progress: Progress | None = None,
    *,
    keep_file_names: bool = False,
    cohort: str = DEFAULT_COHORT,
) -> list[FileOutcome]:
    """Import files uploaded through the browser, as one batch; one outcome per file, in order.

    Each file is streamed (1 MiB at a time) into a private temporary folder (deleted
    afterwards) under its own name, so the file-name rules apply and views uploaded together
    form one study. A file whose name is unusable (empty, ``.``/``..``, a control character
    such as NUL) is rejected on its own; the rest of the batch is imported.

    Args:
        files: (file name as uploaded, content) pairs; content is bytes or a readable,
            seekable binary file (Streamlit's ``UploadedFile``), read without a second copy.
        keep_file_names: store the uploaded names where :func:`stored_file_name` allows.
        cohort: the cohort of new studies.

    Raises:
        UploadTooLarge: more than :data:`MAX_UPLOAD_FILES` files or :data:`MAX_UPLOAD_BYTES`
            bytes in all (nothing imported).
        CohortError: ``cohort`` is not an allowed name (nothing imported).
    """
    cohort = check_cohort(cohort)
    check_upload_batch([_content_size(content) for _, content in files])
    batch = secrets.token_hex(8)
    outcomes: list[FileOutcome] = []
    clock = ProgressClock(len(files), progress)
    with tempfile.TemporaryDirectory(prefix="bonescan-upload-") as folder:
        for index, (name, content) in enumerate(files):
            problem = _upload_name_problem(name)
            if problem:
                outcomes.append(FileOutcome(Path(f"upload-{index:04d}"), "rejected",
                                            f"{problem}; rename the file and upload it again", display_name=ascii(name)))
                clock.step(ascii(name))
                continue
            safe = Path(name).name
            path = Path(folder) / f"{index:04d}" / safe  # own folder: same-named uploads stay apart
            path.parent.mkdir()
            _write_upload(path, content)
            plan = replace(plan_file(path, namespace=f"upload:{batch}"), cohort=cohort)
            outcome = import_one(db, plan, "import", record_label=False, keep_file_names=keep_file_names)
            outcomes.append(replace(outcome, display_name=safe))
            path.unlink()  # the disk holds one upload at a time
            clock.step(safe)
    return outcomes


def check_upload_batch(sizes: Sequence[int]) -> None:
    """Refuse a batch over the caps, with a message that names them.

    Args:
        sizes: byte size of each file of the batch.

    Raises:
        UploadTooLarge: more than :data:`MAX_UPLOAD_FILES` files or :data:`MAX_UPLOAD_BYTES` in all.
    """
    total = sum(sizes)
    if len(sizes) > MAX_UPLOAD_FILES or total > MAX_UPLOAD_BYTES:
        raise UploadTooLarge(
            f"This upload has {len(sizes)} files and {_mib(total)} in all, but one upload may hold at most "
            f"{MAX_UPLOAD_FILES} files and {_mib(MAX_UPLOAD_BYTES)} in all; upload fewer files at a time, or copy them "
            "into the data folder and import the folder.")


def _mib(size: int) -> str:
    return f"{size / 1024**2:,.1f} MiB"


def _content_size(content: bytes | BinaryIO) -> int:
    if isinstance(content, bytes | bytearray | memoryview):
        return len(content)
    position = content.tell()
    size = content.seek(0, os.SEEK_END)
    content.seek(position)
    return size


def _write_upload(path: Path, content: bytes | BinaryIO) -> None:
    if isinstance(content, bytes | bytearray | memoryview):
        path.write_bytes(content)
        return
    content.seek(0)
    with path.open("wb") as handle:
        shutil.copyfileobj(content, handle, 1024**2)


def _upload_name_problem(name: str) -> str | None:
    """Why an uploaded name cannot be used as a file name, or None."""
    if any(ord(char) < 32 or char == "\x7f" for char in name):
        return "its name holds a control character (such as NUL)"
    if Path(name).name in ("", ".", ".."):
        return "it has no usable file name"
    return None


def data_folder(db_path: str | os.PathLike[str] | None = None) -> Path:
    """The data folder the app imports from by default: ``$BONESCAN_DATA_DIR``, else ``data/``
    beside the database (``db_path``, else ``$BONESCAN_DB``, else ``./labels.db``)."""
    configured = os.environ.get(DATA_DIR_ENV)
    return Path(configured).expanduser().resolve() if configured else dbm.resolve_path(db_path).resolve().parent / "data"


def allowed_import_roots(db_path: str | os.PathLike[str] | None = None) -> list[Path]:
    """Folders the app may import from, resolved: ``$BONESCAN_IMPORT_ROOTS`` (os.pathsep-
    separated), else the one :func:`data_folder`.

    Raises:
        ImportRootError: a root is the whole file system (``/``).
    """
    configured = os.environ.get(IMPORT_ROOTS_ENV)
    roots = [Path(root).expanduser().resolve() for root in configured.split(os.pathsep) if root] if configured else []
    return _refuse_file_system_root(roots or [data_folder(db_path)])


def _refuse_file_system_root(roots: Sequence[Path]) -> list[Path]:
    """The roots, resolved, unless one of them is the file system's root."""
    roots = [Path(root).expanduser().resolve() for root in roots]
    for root in roots:
        if root.parent == root:  # "/" (or a drive): every file on the server
            raise ImportRootError(f"{root} is the whole file system and cannot be a folder the app imports from; "
                                  f"set {IMPORT_ROOTS_ENV} or {DATA_DIR_ENV} to the folder that holds the scans")
    return roots


def _inside(resolved: Path, roots: Sequence[Path]) -> bool:
    return any(resolved == root or root in resolved.parents for root in roots)


def check_import_root(path: Path, roots: Sequence[Path] | None = None) -> Path:
    """The resolved path if it lies inside an allowed root, so a browser user cannot read
    arbitrary server files.

    Args:
        roots: resolved roots; default :func:`allowed_import_roots`.

    Raises:
        ImportRootError: outside every allowed root (the message lists them), or a root is ``/``.
    """
    resolved = path.expanduser().resolve()
    allowed = allowed_import_roots() if roots is None else _refuse_file_system_root(roots)
    if not _inside(resolved, allowed):
        listed = ", ".join(str(root) for root in allowed)
        raise ImportRootError(f"{path} is outside the folders the app may import from ({listed}); "
                              f"move the files there or set {DATA_DIR_ENV} or {IMPORT_ROOTS_ENV}")
    return resolved


def import_folder(
    db: sqlite_utils.Database,
    folder: Path,
    *,
    roots: Sequence[Path] | None = None,
    label_from_folder: bool = False,
    keep_file_names: bool = False,
    progress: Progress | None = None,
    cohort: str = DEFAULT_COHORT,
    jobs: int | None = None,
) -> list[FileOutcome]:
    """The app's folder import: ``folder`` must lie under an allowed root, and so must every
    file found in it once resolved (a link out of the root is rejected on its own).

    Args:
        roots: resolved roots; default :func:`allowed_import_roots`.
        label_from_folder, keep_file_names, progress, cohort, jobs: see :func:`import_files`.

    Raises:
        ImportRootError: the folder is outside every root, or a root is ``/``.
        FileNotFoundError: the folder does not exist.
    """
    allowed = allowed_import_roots() if roots is None else _refuse_file_system_root(roots)
    start = check_import_root(folder, allowed)
    return import_files(db, [start], label_from_folder=label_from_folder, keep_file_names=keep_file_names,
                        progress=progress, confine_to=allowed, cohort=cohort, jobs=jobs)
