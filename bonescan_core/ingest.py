"""Import scan files into the database: grouping into patients and studies, views, labels
from folders or a manifest, de-identification and de-duplication.

Every file is imported in a transaction of its own: a rejected file leaves no rows, and one
failure never aborts the batch. Rules (``cli.md``):

* class of a file: nearest parent folder named metastatic/mets/positive/1 or
  non_metastatic/no_metastasis/negative/normal/0 (any case); also the ``<0|1>`` of
  ``NNNN-<0|1>-<A|P>.tif`` names;
* view: tokens A/ANT/anterior and P/POST/posterior in the file name (``A12.png``,
  ``0001-1-A.tif``, ``scan_ANT.png``) or a parent folder (``Anterior/``), or DICOM attributes;
* study: files whose paths differ only by the view token; DICOM by StudyInstanceUID;
  a manifest CSV (``path, patient_id, study_id, view, label[, sex, age, primary_cancer]``)
  overrides all of it.

De-identification: only salted hashes of identifiers (patient, study UID, path) are
stored; sex, a 10-year age band, the study year and the primary cancer are kept (the
paper's Table 1). A DICOM file named after one of its identifiers (e.g. its UID) is stored
under a neutral name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import sqlite_utils

from bonescan_core import db as dbm
from bonescan_core import pixelstore
from bonescan_core.csvfile import read_rows
from bonescan_core.imaging import EXTENSIONS, RejectedFile, ScanFile, read_scan
from bonescan_core.phantom import VIEWS, PhantomStudy, make_studies
from bonescan_core.review import Review, add_review

CLASS_FOLDERS = {
    **{name: "metastatic" for name in ("metastatic", "mets", "positive", "1")},
    **{name: "non_metastatic" for name in ("non_metastatic", "no_metastasis", "negative", "normal", "0")},
}
VIEW_TOKENS = {
    "a": "anterior", "ant": "anterior", "anterior": "anterior",
    "p": "posterior", "post": "posterior", "posterior": "posterior",
}
MANIFEST_COLUMNS = ("path", "patient_id", "study_id", "view", "label")
_TOKEN_SPLIT = re.compile(r"([^A-Za-z0-9]+)")
_ZENODO_NAME = re.compile(r"^([AaPp])(\d+)$")  # A12 / P12
_NUMBERED_NAME = re.compile(r"^\d+-([01])-[AaPp]$")  # 0001-1-A

Progress = Callable[[int, int, str], None]  # (done, total, current file name)


class ManifestError(ValueError):
    """The manifest CSV cannot be used; the message names the line and what to fix."""


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
        label, label_source = ("metastatic" if numbered.group(1) == "1" else "non_metastatic"), f"name {stem}"
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
    )


def safe_source_name(path: Path, identifiers: Iterable[str], sha256: str) -> str:
    """The file name to store: the original, unless it contains an identifier from the header."""
    lowered = path.name.lower()
    if any(len(value) >= 4 and value.lower() in lowered for value in identifiers):
        return f"dicom-{sha256[:12]}{path.suffix.lower()}"
    return path.name


def _get_or_create_patient(db: sqlite_utils.Database, key: str, sex: str | None, band: str | None, cancer: str | None) -> int:
    row = db.execute("SELECT id, sex, age_band, primary_cancer FROM patients WHERE key = ?", [key]).fetchone()
    if row is None:
        return db["patients"].insert(
            {"key": key, "sex": sex, "age_band": band, "primary_cancer": cancer, "created_at": dbm.utc_now()}
        ).last_pk
    patient_id, old_sex, old_band, old_cancer = row
    updates = {name: new for name, old, new in (("sex", old_sex, sex), ("age_band", old_band, band), ("primary_cancer", old_cancer, cancer)) if old is None and new is not None}
    if updates:
        db["patients"].update(patient_id, updates)
    return patient_id


def _get_or_create_study(db: sqlite_utils.Database, key: str, patient_id: int, year: int | None, origin: str) -> tuple[int, bool]:
    row = db.execute("SELECT id FROM studies WHERE key = ?", [key]).fetchone()
    if row:
        return row[0], False
    study_id = db["studies"].insert(
        {"patient_id": patient_id, "key": key, "study_year": year, "origin": origin, "created_at": dbm.utc_now()}
    ).last_pk
    return study_id, True


def store_scan(db: sqlite_utils.Database, plan: PlannedFile, scan: ScanFile, reviewer: str, record_label: bool) -> FileOutcome:
    """Write one read file (all its frames) in one transaction; see the module rules."""
    salt = dbm.salt(db)
    facts = scan.dicom
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
    identifiers = facts.identifiers if facts else ()
    notes = list(scan.notes)
    with dbm.write(db):
        patient_id = _get_or_create_patient(db, salted_key(salt, "patient", patient), sex, age_band(age), plan.primary_cancer)
        study_id, new_study = _get_or_create_study(db, salted_key(salt, "study", group), patient_id, facts.study_year if facts else None, "import")
        image_ids, duplicates, views = [], 0, []
        for index, frame in enumerate(scan.frames):
            sha = pixelstore.pixel_sha256(frame.pixels)
            if _image_exists(db, sha):
                duplicates += 1
                continue
            view = frame.view or plan.view
            views.append(view or "view unknown")
            source = safe_source_name(plan.path, identifiers, sha)
            image_ids.append(insert_image(db, study_id, frame.pixels, view, source, scan.format, frame_index=index, sha=sha, clipped=frame.clipped))
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
        notes.append(f"{duplicates} of {len(scan.frames)} frames already stored")
    notes.insert(0, f"study {study_id}{'' if new_study else ' (existing)'}, {', '.join(views)}")
    return FileOutcome(plan.path, "imported", "; ".join(notes), tuple(image_ids))


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
    return db["images"].insert(
        {
            "study_id": study_id,
            "view": view,
            "frame": frame_index,
            "source": source,
            "format": file_format,
            "height": int(pixels.shape[0]),
            "width": int(pixels.shape[1]),
            "dtype": pixels.dtype.name,
            "pixels": pixelstore.encode_pixels(pixels),
            "pixel_sha256": sha or pixelstore.pixel_sha256(pixels),
            "thumbnail": pixelstore.make_thumbnail(pixels),
            "display_max": pixelstore.display_max(pixels),
            "truth": truth,
            "clipped_pixels": clipped,
            "created_at": dbm.utc_now(),
        }
    ).last_pk


class _AllDuplicates(Exception):
    """Every frame of the file is already stored: roll back the patient/study rows too."""


def import_files(
    db: sqlite_utils.Database,
    paths: Iterable[Path],
    *,
    label_from_folder: bool = False,
    manifest: Path | None = None,
    reviewer: str = "import",
    namespace: str | None = None,
    progress: Progress | None = None,
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
        progress: called after each file with (done, total, file name).

    Raises:
        FileNotFoundError: a path does not exist (nothing imported).
        ManifestError: the manifest is unusable (nothing imported).
    """
    plans: dict[Path, PlannedFile] = {}
    if manifest is not None:
        for plan in read_manifest(manifest):
            plans[plan.path.resolve()] = plan
    for path in collect_files(paths):
        plans.setdefault(path.resolve(), plan_file(path, namespace))
    outcomes = []
    for done, plan in enumerate(plans.values(), start=1):
        outcomes.append(import_one(db, plan, reviewer, record_label=label_from_folder or plan.from_manifest))
        if progress:
            progress(done, len(plans), plan.path.name)
    return outcomes


def import_one(db: sqlite_utils.Database, plan: PlannedFile, reviewer: str, record_label: bool) -> FileOutcome:
    """Read and store one planned file; never raises for bad file content."""
    if not plan.path.is_file():
        return FileOutcome(plan.path, "rejected", "file not found; check the manifest path")
    try:
        scan = read_scan(plan.path)
    except RejectedFile as error:
        return FileOutcome(plan.path, "rejected", str(error))
    try:
        return store_scan(db, plan, scan, reviewer, record_label)
    except _AllDuplicates:
        return FileOutcome(plan.path, "duplicate", "identical pixels already stored")


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


def add_demo_studies(db: sqlite_utils.Database, n_studies: int, seed: int, progress: Progress | None = None) -> list[FileOutcome]:
    """Add seeded synthetic studies (both views) with reference labels (reviewer ``reference``).

    The same seed gives the same studies, so running it twice reports duplicates.
    Each image keeps its phantom findings (lesion coordinates) as JSON in ``images.truth``.
    """
    salt = dbm.salt(db)
    outcomes = []
    for index, phantom in enumerate(make_studies(n_studies, seed)):
        name = f"phantom-{seed}-{index:04d}"
        try:
            with dbm.write(db):
                patient_id = _get_or_create_patient(
                    db, salted_key(salt, "patient", f"demo:{name}"), phantom.sex, age_band(phantom.age), phantom.primary_cancer
                )
                study_id, _ = _get_or_create_study(db, salted_key(salt, "study", f"demo:{name}"), patient_id, None, "demo")
                image_ids = []
                for view in VIEWS:
                    pixels = getattr(phantom, view)
                    sha = pixelstore.pixel_sha256(pixels)
                    if _image_exists(db, sha):
                        raise _AllDuplicates()
                    truth = json.dumps([asdict(f) for f in phantom.findings if f.view == view])
                    image_ids.append(insert_image(db, study_id, pixels, view, f"{name}-{view}", "phantom", sha=sha, truth=truth))
                add_review(db, _reference_review(study_id, phantom))
            outcomes.append(FileOutcome(Path(name), "imported", f"study {study_id}", tuple(image_ids)))
        except _AllDuplicates:
            outcomes.append(FileOutcome(Path(name), "duplicate", "already in the database"))
        if progress:
            progress(index + 1, n_studies, name)
    return outcomes


def import_uploads(
    db: sqlite_utils.Database, files: list[tuple[str, bytes]], progress: Progress | None = None
) -> list[FileOutcome]:
    """Import files uploaded through the browser, as one batch.

    The files are written to a private temporary folder (deleted afterwards) under their
    own names, so the file-name rules apply; views uploaded together form one study.

    Args:
        files: (file name as uploaded, content) pairs.
    """
    batch = secrets.token_hex(8)
    with tempfile.TemporaryDirectory(prefix="bonescan-upload-") as folder:
        names: dict[Path, str] = {}
        for index, (name, content) in enumerate(files):
            safe = Path(name).name or f"upload-{index}"
            path = Path(folder) / f"{index:04d}" / safe  # own folder: same-named uploads stay apart
            path.parent.mkdir()
            path.write_bytes(content)
            names[path] = safe
        outcomes = [
            import_one(db, plan_file(path, namespace=f"upload:{batch}"), "import", record_label=False)
            for path in names
        ]
        if progress:
            progress(len(names), len(names), "")
    return [replace(o, display_name=names.get(o.path)) for o in outcomes]


def allowed_import_roots() -> list[Path]:
    """Folders the app may import from: ``$BONESCAN_IMPORT_ROOTS`` (os.pathsep-separated),
    else the working directory and the user's home."""
    configured = os.environ.get("BONESCAN_IMPORT_ROOTS")
    roots = configured.split(os.pathsep) if configured else [os.getcwd(), str(Path.home())]
    return [Path(root).resolve() for root in roots if root]


def check_import_root(path: Path, roots: list[Path] | None = None) -> Path:
    """The resolved path if it lies inside an allowed root, so a browser user cannot read
    arbitrary server files.

    Raises:
        PermissionError: outside every allowed root (the message lists them).
    """
    resolved = path.expanduser().resolve()
    allowed = allowed_import_roots() if roots is None else roots
    if not any(resolved == root or root in resolved.parents for root in allowed):
        listed = ", ".join(str(root) for root in allowed)
        raise PermissionError(f"{path} is outside the folders the app may import from ({listed}); "
                              "move the files there or set BONESCAN_IMPORT_ROOTS")
    return resolved
