"""De-identification end to end (issue #7, point 4).

Whole-body DICOM studies carry a unique PHI value in every attribute of the DICOM basic
de-identification profile (PS3.15 Annex E, Table E.1-1; see ``deid_profile.py``), one file
is named after its patient. They go through the real command line: import (folder labels
and a manifest), a review, a split, a queued training run done by a background worker, the
evaluation, the predictions CSV and the export bundle. Then every byte that bonescan wrote
is searched for every planted value: the database (after a WAL checkpoint, with its -wal
and -shm files), every file under ``runs/`` (worker log included), every exported file,
the members of every zip (``.keras``), and everything the commands printed. Zero hits.
PNG, TIFF and JPEG files named after their patient and imported with a manifest of the same
ids (issue #15, point 2) leave no trace either, with and without ``--keep-file-names``.

What is kept, and so asserted here: sex, the 10-year age band, the study year and (from a
manifest) the primary cancer; patients and studies are salted hashes. See
``docs/deidentification.md``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import time
import warnings
import zipfile
from collections import Counter
from pathlib import Path

import pytest
from conftest import run_cli
from deid_profile import ANNEX_E_BASIC_PROFILE, PhiFactory, PlantedStudy, write_phi_study

from bonescan_core import db as dbm
from bonescan_core import ingest, jobs, runs

pytestmark = pytest.mark.slow  # a real (tiny) training run, Grad-CAM maps and an export: about 3 minutes on 2 shared CPUs

# (metastatic, sex, age, study year) per patient; the last two come in through a manifest.
PATIENTS = [
    (True, "F", 47, 2019), (False, "M", 63, 2018), (True, "M", 71, 2020), (False, "F", 38, 2017),
    (True, "F", 55, 2021), (False, "M", 92, 2016), (True, "M", 66, 2019), (False, "F", 44, 2022),
    (True, "F", 59, 2015), (False, "M", 81, 2020), (True, "M", 68, 2018), (False, "F", 52, 2021),
]
MANIFEST_PATIENTS = {10: "prostate", 11: "breast"}
# Files named after one of their own values: the patient's name, and free text.
NAMED_AFTER = {0: "PatientName", 1: "StudyDescription"}

# Shapes of every planted value (searched in lower-cased bytes); each candidate found is
# normalised and looked up among the planted values. A test below checks that every planted
# value has one of these shapes, so a value cannot slip past the search.
SHAPES: dict[str, re.Pattern[bytes]] = {
    "marker": re.compile(rb"phimark(?:given)?\d{5}"),
    "uid": re.compile(rb"1\.2\.826\.0\.1\.3680043\.99999\.\d+"),
    "datetime": re.compile(rb"\d{14}\.\d{6}"),
    "date": re.compile(rb"(?<!\d)(\d{4})([-./]?)(\d{2})\2(\d{2})(?!\d)"),  # YYYYMMDD, YYYY-MM-DD, YYYY/MM/DD, YYYY.MM.DD
    "time": re.compile(rb"(?<!\d)(\d{2}):?(\d{2}):?(\d{2})\.(\d{6})(?!\d)"),  # HHMMSS.ffffff, HH:MM:SS.ffffff
    "decimal": re.compile(rb"31415\.9\d{5}"),
    "integer": re.compile(rb"77700\d{5}"),
    "age": re.compile(rb"(?<![0-9a-z])\d{3}y(?![0-9a-z])"),
}


def normalise(shape: str, found: bytes) -> str:
    text = found.decode("ascii")
    if shape in ("date", "time"):
        text = text.replace("-", "").replace("/", "").replace(":", "")
        if shape == "date":
            text = text.replace(".", "")
    return text.upper()


class Searcher:
    """Finds planted values in byte strings; keeps the figures for the report."""

    def __init__(self, planted: set[str]) -> None:
        self.planted = {value.upper() for value in planted}
        self.files = 0
        self.bytes = 0
        self.hits: list[tuple[str, str]] = []  # (where, value)

    def search(self, where: str, data: bytes) -> None:
        self.files += 1
        self.bytes += len(data)
        lowered = data.lower()
        for shape, pattern in SHAPES.items():
            for match in pattern.finditer(lowered):
                value = normalise(shape, match.group(0))
                if value in self.planted:
                    self.hits.append((where, value))
        if zipfile.is_zipfile(io.BytesIO(data)):
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                for member in archive.namelist():
                    self.search(f"{where}!{member}", archive.read(member))

    def search_text_exactly(self, where: str, text: str) -> None:
        """Every planted value as a plain substring (small text files and logs only)."""
        lowered = text.lower()
        self.hits.extend((where, value) for value in self.planted if value.lower() in lowered)

    def search_tree(self, root: Path) -> None:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            self.search(str(path.relative_to(root.parent)), path.read_bytes())


def shapes_cover(values: set[str]) -> list[str]:
    """Planted values that no shape matches whole (composites: PN name and DT, by their parts)."""
    uncovered = []
    for value in values:
        parts = value.split("^") if "^" in value else [value]
        for part in parts:
            data = part.lower().encode()
            if not any(pattern.fullmatch(data) for pattern in SHAPES.values()):
                uncovered.append(value)
    return uncovered


def cli(log: list[str], *args: str, db_path: Path) -> str:
    """Run one command, keep what it printed, fail with its output if it failed."""
    result = run_cli(*args, db_path=db_path)
    log.append(f"$ bonescan {' '.join(args)}\n{result.stdout}{result.stderr}")
    assert result.returncode == 0, log[-1]
    return result.stdout


def write_manifest(path: Path, studies: dict[int, PlantedStudy]) -> None:
    """A manifest for the manifest patients: ids as a site would write them (their MRN and accession number)."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "patient_id", "study_id", "view", "label", "sex", "age", "primary_cancer"])
        for index, study in studies.items():
            metastatic, sex, age, _ = PATIENTS[index]
            for file, view in zip(study.paths, ("A", "P"), strict=True):
                writer.writerow([file.relative_to(path.parent), study.shared["PatientID"], study.shared["AccessionNumber"],
                                 view, "metastatic" if metastatic else "non_metastatic", sex, age,
                                 MANIFEST_PATIENTS[index]])


def wait_for_worker(pid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return
        time.sleep(0.5)
    os.kill(pid, 15)
    os.waitpid(pid, 0)
    pytest.fail(f"the worker did not finish within {timeout_s} s")


def test_no_planted_phi_reaches_the_database_runs_exports_or_logs(db_path, tmp_path, record_property):
    started = time.monotonic()
    scans, out = tmp_path / "scans", tmp_path / "out"
    factory = PhiFactory()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about some planted values' lengths
        studies = {
            index: write_phi_study(
                (tmp_path / "manifest_scans" if index in MANIFEST_PATIENTS else scans / ("metastatic" if met else "normal"))
                / f"p{index:02d}",
                factory, index, metastatic=met, sex=sex, age=age, study_year=year, name_after=NAMED_AFTER.get(index))
            for index, (met, sex, age, year) in enumerate(PATIENTS)
        }
    planted = set().union(*(study.values for study in studies.values()))
    attributes = set().union(*(study.attributes for study in studies.values()))
    assert len(attributes) >= len(ANNEX_E_BASIC_PROFILE) - 5
    assert shapes_cover(planted) == [], "every planted value must be findable by a shape"
    assert all(studies[i].paths[0].name.startswith("PHIMARK") for i in NAMED_AFTER), "files named after their PHI"
    write_manifest(tmp_path / "manifest.csv", {i: studies[i] for i in MANIFEST_PATIENTS})

    log: list[str] = []
    cli(log, "import", str(scans), "--label-from-folder", db_path=db_path)
    cli(log, "import", str(tmp_path / "manifest_scans"), "--manifest", str(tmp_path / "manifest.csv"), "--reviewer", "site",
        db_path=db_path)
    cli(log, "label", "1", "--reviewer", "dr_b", "--metastatic", "--criteria", "typical_pattern", "--note", "hot spine",
        db_path=db_path)
    split = json.loads(cli(log, "split", "--seed", "0", "--test", "0.3", "--val", "0.3", "--json", db_path=db_path))
    run_id = int(cli(log, "train", "--backbone", "scintinet", "--view-mode", "per_image", "--weights", "none", "--mode", "full", "--epochs", "1",
                     "--batch-size", "8", "--image-size", "64x32", "--split", str(split["id"]), "--queue",
                     db_path=db_path).strip())
    wait_for_worker(jobs.start_worker(db_path, idle_exit_s=0.5), timeout_s=400)
    listed = json.loads(cli(log, "runs", "--json", db_path=db_path))
    assert listed[0]["status"] == "done", (listed[0], (runs.run_folder(db_path) / "worker.log").read_text())
    cli(log, "evaluate", str(run_id), "--json", db_path=db_path)
    out.mkdir()
    cli(log, "predictions", str(run_id), "--csv", str(out / "predictions.csv"), db_path=db_path)
    cli(log, "export", str(run_id), "--out", str(out / "bundle"), db_path=db_path)
    cli(log, "labels", "export", "--csv", str(out / "labels.csv"), db_path=db_path)
    studies_json = json.loads(cli(log, "studies", "--json", db_path=db_path))
    images_json = json.loads(cli(log, "images", "--json", db_path=db_path))

    # --- what is kept ---------------------------------------------------------------------------
    with dbm.opened(db_path) as db:
        kept = Counter(tuple(row) for row in db.execute(
            "SELECT p.sex, p.age_band, s.study_year, p.primary_cancer FROM studies s JOIN patients p ON p.id = s.patient_id"))
        expected = Counter((sex, ingest.age_band(age), year, MANIFEST_PATIENTS.get(index))
                           for index, (_, sex, age, year) in enumerate(PATIENTS))
        assert kept == expected, "kept: sex, 10-year age band (90+ pooled), study year, primary cancer (manifest)"
        assert ("M", "90+", 2016, None) in kept
        salt = dbm.salt(db)
        keys = {row[0] for row in db.execute("SELECT key FROM patients")}
        assert ingest.salted_key(salt, "patient", f"dicom-patient:{studies[0].shared['PatientID']}") in keys
        assert ingest.salted_key(salt, "patient", f"manifest:{studies[10].shared['PatientID']}") in keys
        assert all(re.fullmatch(r"[0-9a-f]{64}", key) for key in keys), "patients are salted hashes"
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert len(studies_json) == len(PATIENTS) and db_path.stat().st_size > 0
    assert {image["view"] for image in images_json} == {"anterior", "posterior"}, "views come from the header"
    assert all(re.fullmatch(r"dicom-[0-9a-f]{8}-(ANT|POST)", image["source"]) for image in images_json), \
        "every file is stored under a neutral name (those named after their PHI too)"

    # --- the search -----------------------------------------------------------------------------
    control = Searcher(planted)  # the search does find PHI where there is some: the input files, dates in other spellings
    control.search("input", studies[0].paths[0].read_bytes())
    study_date = str(studies[0].shared["StudyDate"])
    year, month, day = study_date[:4], study_date[4:6], study_date[6:]
    control.search("spelled", f"on {year}-{month}-{day}, again {year}/{month}/{day}".encode())
    assert len({value for _, value in control.hits}) > 400 and ("spelled", study_date) in control.hits
    assert len([hit for hit in control.hits if hit == ("spelled", study_date)]) == 2

    searcher = Searcher(planted)
    for suffix in ("", "-wal", "-shm"):
        path = Path(f"{db_path}{suffix}")
        if path.exists():
            searcher.search(path.name, path.read_bytes())
    searcher.search_tree(runs.runs_root(db_path))
    searcher.search_tree(out)
    inputs = sorted({str(p) for study in studies.values() for p in study.paths}, key=len, reverse=True)
    printed = "\n".join(log)
    echoed = sum(printed.count(path) for path in inputs)
    for path in inputs:  # import lines start with the user's own path, as typed: that is not storage
        printed = printed.replace(path, "<input path>")
    searcher.search("printed by the commands", printed.encode())
    searcher.search_text_exactly("printed by the commands", printed)
    for path in out.rglob("*"):
        if path.suffix in (".csv", ".json"):
            searcher.search_text_exactly(str(path.relative_to(tmp_path)), path.read_text())
    worker_log = (runs.run_folder(db_path) / "worker.log").read_text()
    searcher.search_text_exactly("runs/worker.log", worker_log)

    figures = {"attributes_planted": len(attributes), "table_rows": len(ANNEX_E_BASIC_PROFILE),
               "values_planted": len(planted), "dicom_files": 2 * len(PATIENTS), "files_searched": searcher.files,
               "bytes_searched": searcher.bytes, "echoed_input_paths": echoed, "hits": len(searcher.hits),
               "seconds": round(time.monotonic() - started, 1)}
    print(json.dumps(figures))
    for name, value in figures.items():
        record_property(name, value)
    assert searcher.hits == []
    assert searcher.files >= 10 and searcher.bytes > 1_000_000


# --- non-DICOM files named after their patient (issue 15, point 2) ------------------------------

# A site's export: PNG, TIFF and JPEG files named after the patient (MRN, name, birth date) and
# the accession number, imported with a manifest that carries the same MRNs and accession numbers.
# (patient_id, study_id, file stem before the view token, format, [sex, age])
NAMED_FILES = [
    ("MRN00123456", "ACC77700123", "MRN00123456_DOE-JOHN_1962-03-04", "png"),
    ("MRN00765432", "ACC77700456", "ACC77700456 ROE-JANE 19581130", "tif"),
    ("MRN00765432", "ACC77700789", "roe-jane_mrn00765432_1958.11.30", "jpg"),
]
NAMED_PHI = ("MRN00123456", "MRN00765432", "ACC77700123", "ACC77700456", "ACC77700789", "DOE-JOHN", "ROE-JANE",
             "1962-03-04", "19620304", "19581130", "1958.11.30")


def write_named_files(folder: Path) -> Path:
    """Two views per study in the NAMED_FILES formats, and their manifest; returns the manifest."""
    import numpy as np
    import tifffile
    from PIL import Image

    from bonescan_core.phantom import make_study

    folder.mkdir(parents=True)
    rows = []
    for index, (patient_id, study_id, stem, suffix) in enumerate(NAMED_FILES):
        phantom = make_study(np.random.default_rng(500 + index), metastatic=bool(index % 2), height=128, width=64)
        for view, token in (("anterior", "ANT"), ("posterior", "POST")):  # views in the manifest too
            path = folder / f"{stem}_{token}.{suffix}"
            pixels = getattr(phantom, view)
            if suffix == "tif":
                tifffile.imwrite(path, pixels)
            elif suffix == "jpg":
                Image.fromarray((pixels * (255 / pixels.max())).astype(np.uint8)).save(path, quality=95)
            else:
                Image.fromarray(pixels).save(path)
            rows.append([path.name, patient_id, study_id, token[0], "metastatic" if index % 2 else "non_metastatic"])
    with (folder / "manifest.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "patient_id", "study_id", "view", "label"])
        writer.writerows(rows)
    return folder / "manifest.csv"


@pytest.mark.parametrize("keep_names", [False, True], ids=["default", "keep-file-names"])
def test_non_dicom_files_named_after_their_patient_leave_no_trace(tmp_path, db_path, keep_names):
    manifest = write_named_files(tmp_path / "site")
    log: list[str] = []
    cli(log, "import", "--manifest", str(manifest), *(["--keep-file-names"] if keep_names else []), db_path=db_path)
    out = tmp_path / "out"
    out.mkdir()
    cli(log, "labels", "export", "--csv", str(out / "labels.csv"), db_path=db_path)
    images = json.loads(cli(log, "images", "--json", db_path=db_path))
    studies = json.loads(cli(log, "studies", "--json", db_path=db_path))
    assert len(images) == 6 and len(studies) == 3
    assert sorted(image["view"] for image in images) == ["anterior"] * 3 + ["posterior"] * 3, "views kept"
    assert all(re.fullmatch(r"(png|tiff|jpeg)-[0-9a-f]{8}-(ANT|POST)", image["source"]) for image in images), images
    with dbm.opened(db_path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    printed = "\n".join(log)
    inputs = sorted((str(p) for p in (tmp_path / "site").iterdir()), key=len, reverse=True)
    for path in inputs:  # import lines start with the user's own path, as typed: that is not storage
        printed = printed.replace(path, "<input path>")
    written = {str(p.relative_to(tmp_path)): p.read_bytes() for p in tmp_path.rglob("*")
               if p.is_file() and (tmp_path / "site") not in p.parents}
    written["printed by the commands"] = printed.encode()
    assert "labels.db" in written and "out/labels.csv" in written
    hits = [(where, value) for where, data in written.items() for value in NAMED_PHI
            if value.lower().encode() in data.lower() or value.lower().encode("utf-16-le") in data.lower()]
    assert hits == []
