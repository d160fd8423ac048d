"""Import end to end: good and bad files, grouping, labels, duplicates, de-identification."""

import csv
import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from bad_corpus import PHI_STRINGS, make_bad_corpus, make_good_corpus
from conftest import REPO, run_cli
from PIL import Image
from pydicom.data import get_testdata_file
from streamlit.testing.v1 import AppTest

from bonescan_core import catalog, deidentify, ingest
from bonescan_core import db as dbm
from bonescan_core import review as rv
from bonescan_core.phantom import make_study

TABLES = ("patients", "studies", "images", "reviews")


def counts(db):
    return {table: db[table].count for table in TABLES}


def lines_by_name(stdout: str) -> dict[str, str]:
    """'path: status ...' lines keyed by file name."""
    result = {}
    for line in stdout.splitlines():
        path, _, rest = line.partition(": ")
        result[path.rsplit("/", 1)[-1]] = rest
    return result


def phantom_png(path, seed, view="anterior"):
    study = make_study(np.random.default_rng(seed), metastatic=bool(seed % 2), height=256, width=96)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(getattr(study, view)).save(path)
    return getattr(study, view)


def test_every_bad_file_is_rejected_with_its_reason_and_leaves_no_rows(db_path, db, tmp_path):
    expected = make_bad_corpus(tmp_path / "bad")
    assert len(expected) >= 25
    result = run_cli("import", str(tmp_path / "bad"), db_path=db_path)
    assert result.returncode == 1
    lines = lines_by_name(result.stdout)
    assert set(lines) == set(expected)
    for name, reason in expected.items():
        assert lines[name].startswith("rejected: ") and reason in lines[name], (name, lines[name])
    assert counts(db) == dict.fromkeys(TABLES, 0)


def test_a_mixed_batch_keeps_the_good_files(db_path, db, tmp_path):
    folder = tmp_path / "batch"
    make_bad_corpus(folder)
    phantom_png(folder / "good_ANT.png", 1)
    phantom_png(folder / "good_POST.png", 1, "posterior")
    result = run_cli("import", str(folder), db_path=db_path)
    assert result.returncode == 1
    lines = lines_by_name(result.stdout)
    assert lines["good_ANT.png"].startswith("imported (study 1, anterior")
    assert lines["good_POST.png"].startswith("imported (study 1 (existing), posterior")
    assert counts(db) == {"patients": 1, "studies": 1, "images": 2, "reviews": 0}


def test_good_corpus_imports_and_reimport_reports_duplicates(db_path, db, tmp_path):
    expected = make_good_corpus(tmp_path / "good")
    result = run_cli("import", str(tmp_path / "good"), db_path=db_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = lines_by_name(result.stdout)
    assert set(lines) == set(expected)
    statuses = {name: line.split(" ")[0] for name, line in lines.items()}
    # Several corpus files hold the same pixels in other containers (TIFF vs PNG vs DICOM):
    # the first is imported, the others are duplicates.
    assert set(statuses.values()) <= {"imported", "duplicate"}
    assert list(statuses.values()).count("imported") >= len(expected) // 2, statuses
    assert any("converted RGB to grey" in line for line in lines.values())
    before = counts(db)
    again = run_cli("import", str(tmp_path / "good"), db_path=db_path)
    assert again.returncode == 0
    assert all(line.startswith("duplicate") for line in lines_by_name(again.stdout).values())
    assert counts(db) == before


def test_real_nm_whole_body_dicoms_from_pydicom(db, tmp_path):
    folder = tmp_path / "nm"
    folder.mkdir()
    for name in ("JPGExtended.dcm", "JPEG2000.dcm"):
        shutil.copy(get_testdata_file(name), folder / name)
    outcomes = ingest.import_files(db, [folder], keep_file_names=True)  # names without identifiers: kept
    assert [o.status for o in outcomes] == ["imported", "imported"]
    images = {i["source"]: i for i in catalog.list_images(db)}
    assert [(i["height"], i["width"]) for i in images.values()] == [(1024, 256), (1024, 256)]
    assert len({i["study_id"] for i in images.values()}) == 1, "same StudyInstanceUID: one study"
    signed = catalog.image_pixels(db, images["JPEG2000.dcm"]["id"])
    assert signed.dtype == np.int16 and signed.min() == 0, "signed JPEG 2000 stays int16; its negative ringing is set to 0"
    assert catalog.image_pixels(db, images["JPGExtended.dcm"]["id"]).max() > 200


def test_no_identifier_reaches_the_database(db_path, tmp_path):
    make_good_corpus(tmp_path / "good")
    for name in ("JPGExtended.dcm", "JPEG2000.dcm"):
        shutil.copy(get_testdata_file(name), tmp_path / "good" / name)
    result = run_cli("import", str(tmp_path / "good"), db_path=db_path)
    assert result.returncode == 0
    with dbm.opened(db_path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pydicom_phi = ["CompressedSamples", "8NM1", "1.3.6.1.4.1.5962.1.2.8.20040826185059.5457", "20040826"]
        assert db["images"].count > 10
    stored = db_path.read_bytes()
    planted = [value for value in (*PHI_STRINGS, *pydicom_phi) if len(value) >= 4]
    hits = [value for value in planted if value.encode() in stored or value.encode("utf-16-le") in stored]
    assert hits == []
    # Lines echo the user's own file paths (one file is named by its UID); nothing else may carry PHI.
    said = "\n".join(line.partition(": ")[2] for line in result.stdout.splitlines()) + result.stderr
    assert [value for value in planted if value in said] == []


def test_zenodo_layout_with_folder_labels(db, tmp_path):
    root = tmp_path / "zenodo"
    for cls, n in (("metastatic", 1), ("metastatic", 2), ("normal", 3)):
        phantom_png(root / cls / "Anterior" / f"A{n}.png", n)
        phantom_png(root / cls / "Posterior" / f"P{n}.png", n, "posterior")
    outcomes = ingest.import_files(db, [root], label_from_folder=True)
    assert [o.status for o in outcomes] == ["imported"] * 6
    studies = catalog.list_studies(db)
    assert [(s["n_images"], s["views"], s["label"]) for s in studies] == [
        (2, ["anterior", "posterior"], "metastatic"),
        (2, ["anterior", "posterior"], "metastatic"),
        (2, ["anterior", "posterior"], "non_metastatic"),
    ]
    trail = rv.history(db, studies[0]["id"])
    assert [(r["reviewer"], r["criteria"], r["note"]) for r in trail] == [("import", "", "label from folder metastatic")]


def test_numbered_tiff_names_group_and_label(db, tmp_path):
    folder = tmp_path / "numbered"
    folder.mkdir()
    for view in "AP":
        tifffile.imwrite(folder / f"0007-1-{view}.tif", phantom_png(tmp_path / "x" / f"{view}.png", 7 + ord(view)))
    ingest.import_files(db, [folder], label_from_folder=True)
    (study,) = catalog.list_studies(db)
    assert (study["n_images"], study["views"], study["label"]) == (2, ["anterior", "posterior"], "metastatic")


def test_manifest_overrides_names_and_keeps_table_one_facts(db, tmp_path):
    phantom_png(tmp_path / "img" / "first.png", 21)
    phantom_png(tmp_path / "img" / "second.png", 21, "posterior")
    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "patient_id", "study_id", "view", "label", "sex", "age", "primary_cancer"])
        writer.writerow(["img/first.png", "MRN-123456", "S1", "A", "metastatic", "F", "47", "breast"])
        writer.writerow(["img/second.png", "MRN-123456", "S1", "P", "metastatic", "F", "47", "breast"])
    outcomes = ingest.import_files(db, [], manifest=manifest, reviewer="dr_lee")
    assert [o.status for o in outcomes] == ["imported", "imported"]
    (row,) = catalog.study_table(db)
    assert (row["n_images"], row["views"], row["label"]) == (2, ["anterior", "posterior"], "metastatic")
    assert (row["sex"], row["age_band"], row["primary_cancer"]) == ("F", "40-49", "breast")
    assert rv.history(db, row["id"])[0]["reviewer"] == "dr_lee"
    assert db.execute("SELECT COUNT(*) FROM patients WHERE key LIKE '%MRN%'").fetchone()[0] == 0


def test_uploads_group_views_uploaded_together(db, tmp_path):
    anterior = tmp_path / "u" / "case_ANT.png"
    posterior = tmp_path / "u" / "case_POST.png"
    phantom_png(anterior, 31)
    phantom_png(posterior, 31, "posterior")
    outcomes = ingest.import_uploads(db, [("case_ANT.png", anterior.read_bytes()), ("case_POST.png", posterior.read_bytes()),
                                          ("notes.png", b"hello")])
    assert [o.status for o in outcomes] == ["imported", "imported", "rejected"]
    assert outcomes[2].line().startswith("notes.png: rejected: ")
    (study,) = catalog.list_studies(db)
    assert study["views"] == ["anterior", "posterior"]


@pytest.mark.parametrize("name", ["1.2.826.0.1.3680043.8.498.7003.dcm"])
def test_a_dicom_named_after_its_uid_is_stored_under_a_neutral_name(db, tmp_path, name):
    corpus = make_good_corpus(tmp_path / "good")
    source = next(n for n in corpus if corpus[n].format == "dicom" and "view" not in n)
    shutil.copy(tmp_path / "good" / source, tmp_path / name)
    (outcome,) = ingest.import_files(db, [tmp_path / name])
    if outcome.status == "duplicate":
        pytest.fail("test setup: the copied file should be new to this database")
    (image,) = catalog.list_images(db)
    assert "7003" not in image["source"] and image["source"].startswith("dicom-")


# --- file names (issue 15.2) ------------------------------------------------------------------

NEUTRAL = r"(png|tiff|jpeg|dicom)-[0-9a-f]{8}(-ANT|-POST)?"


def write_manifest(path, rows):
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "patient_id", "study_id", "view", "label"])
        writer.writerows(rows)


def identifying_pair(folder):
    """A PNG pair named after its patient, as a site exports it, and a manifest with that MRN."""
    anterior = folder / "MRN00123456_DOE-JOHN_1962-03-04_ANT.png"
    posterior = folder / "MRN00123456_DOE-JOHN_1962-03-04_POST.png"
    phantom_png(anterior, 41)
    phantom_png(posterior, 41, "posterior")
    write_manifest(folder / "manifest.csv", [[anterior.name, "MRN00123456", "ACC4242", "A", ""],
                                             [posterior.name, "MRN00123456", "ACC4242", "P", ""]])
    return folder / "manifest.csv"


def test_file_names_are_neutral_by_default_and_views_still_group(db, tmp_path):
    manifest = identifying_pair(tmp_path / "site")
    phantom_png(tmp_path / "plain" / "case7_ANT.png", 43)
    tifffile.imwrite(tmp_path / "plain" / "case7_POST.tif", phantom_png(tmp_path / "x" / "p.png", 43, "posterior"))
    outcomes = ingest.import_files(db, [tmp_path / "plain"], manifest=manifest)
    assert [o.status for o in outcomes] == ["imported"] * 4
    sources = sorted((i["source"], i["view"]) for i in catalog.list_images(db))
    assert all(re.fullmatch(NEUTRAL, source) for source, _ in sources), sources
    assert sorted((source.split("-")[0], source.rsplit("-", 1)[1], view) for source, view in sources) == [
        ("png", "ANT", "anterior"), ("png", "ANT", "anterior"), ("png", "POST", "posterior"), ("tiff", "POST", "posterior")]
    assert [s["views"] for s in catalog.list_studies(db)] == [["anterior", "posterior"]] * 2


def test_keep_file_names_keeps_only_names_without_identifiers(db_path, tmp_path):
    manifest = identifying_pair(tmp_path / "site")
    phantom_png(tmp_path / "plain" / "case7_ANT.png", 43)
    result = run_cli("import", str(tmp_path / "plain"), "--manifest", str(manifest), "--keep-file-names", db_path=db_path)
    assert result.returncode == 0, result.stdout + result.stderr
    with dbm.opened(db_path) as db:
        sources = sorted(i["source"] for i in catalog.list_images(db))
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert sources[0] == "case7_ANT.png"
    assert all(re.fullmatch(NEUTRAL, source) for source in sources[1:]), sources
    stored = db_path.read_bytes().lower()
    assert [v for v in ("mrn00123456", "acc4242", "doe-john", "1962-03-04") if v.encode() in stored] == []
    said = "\n".join(line.partition(": ")[2] for line in result.stdout.splitlines()) + result.stderr
    assert "MRN00123456" not in said and "ACC4242" not in said


@pytest.mark.parametrize("name", ["ACC4242_ANT.png", "scan_s9_ANT.png"])
def test_a_short_or_long_manifest_id_in_a_kept_name_is_neutralised(db, tmp_path, name):
    phantom_png(tmp_path / name, 47)
    study_id = "ACC4242" if name.startswith("ACC") else "S9"
    write_manifest(tmp_path / "m.csv", [[name, "P1", study_id, "A", ""]])
    ingest.import_files(db, [], manifest=tmp_path / "m.csv", keep_file_names=True)
    (image,) = catalog.list_images(db)
    assert re.fullmatch(NEUTRAL, image["source"]) and image["source"].endswith("-ANT")


def test_neutral_name_rule():
    sha = "3fa9c2d1" + "0" * 56
    assert deidentify.stored_file_name("x/MRN1_ANT.png", "png", sha, "anterior") == "png-3fa9c2d1-ANT"
    assert deidentify.stored_file_name("x/scan.dcm", "dicom", sha, None) == "dicom-3fa9c2d1"
    assert deidentify.stored_file_name("x/scan.dcm", "dicom", sha, "posterior", keep=True) == "scan.dcm"
    assert deidentify.stored_file_name("x/1.2.3.4.dcm", "dicom", sha, "posterior", ["1.2.3.4"], keep=True) == "dicom-3fa9c2d1-POST"


# --- confinement (issue 15.5) -----------------------------------------------------------------

def test_a_link_out_of_the_import_root_is_rejected_and_the_rest_imported(db, tmp_path):
    root, outside = tmp_path / "data", tmp_path / "private"
    phantom_png(root / "case_ANT.png", 51)
    phantom_png(outside / "secret_ANT.png", 52)
    (root / "link_ANT.png").symlink_to(outside / "secret_ANT.png")
    (root / "linked_folder").symlink_to(outside, target_is_directory=True)
    outcomes = ingest.import_folder(db, root, roots=[root])
    by_name = {o.path.name: o for o in outcomes}
    assert by_name["case_ANT.png"].status == "imported"
    assert by_name["link_ANT.png"].status == "rejected"
    assert "outside the folders the app may import from" in by_name["link_ANT.png"].detail
    assert db["images"].count == 1
    with pytest.raises(PermissionError, match="outside the folders"):
        ingest.import_folder(db, root / "linked_folder", roots=[root])


def test_the_file_system_root_is_refused_as_an_import_root(tmp_path, monkeypatch):
    monkeypatch.setenv("BONESCAN_IMPORT_ROOTS", "/")
    with pytest.raises(PermissionError, match="whole file system"):
        ingest.allowed_import_roots()
    with pytest.raises(PermissionError, match="whole file system"):
        ingest.check_import_root(tmp_path, [tmp_path, Path("/")])


def test_the_default_import_root_is_the_data_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("BONESCAN_IMPORT_ROOTS", raising=False)
    monkeypatch.delenv("BONESCAN_DATA_DIR", raising=False)
    monkeypatch.setenv("BONESCAN_DB", str(tmp_path / "db" / "labels.db"))
    monkeypatch.chdir("/")
    assert ingest.allowed_import_roots() == [(tmp_path / "db" / "data").resolve()]
    with pytest.raises(PermissionError):
        ingest.check_import_root(Path.home())
    monkeypatch.setenv("BONESCAN_DATA_DIR", str(tmp_path / "scans"))
    assert ingest.allowed_import_roots() == [(tmp_path / "scans").resolve()]


# --- uploads (issue 15.9, 15.11) --------------------------------------------------------------

@pytest.mark.parametrize("bad", ["..", "", "a\x00_ANT.png", "/", "x/.."])
def test_a_bad_upload_name_is_rejected_alone(db, tmp_path, bad):
    good = tmp_path / "case_ANT.png"
    phantom_png(good, 61)
    outcomes = ingest.import_uploads(db, [(bad, good.read_bytes()), ("case_ANT.png", good.read_bytes())])
    assert [o.status for o in outcomes] == ["rejected", "imported"]
    assert "rename the file" in outcomes[0].detail and "\x00" not in outcomes[0].line()
    assert db["images"].count == 1


def test_upload_batches_are_capped_by_count_and_bytes(db, tmp_path, monkeypatch):
    good = tmp_path / "case_ANT.png"
    phantom_png(good, 62)
    data = good.read_bytes()
    monkeypatch.setattr(ingest, "MAX_UPLOAD_FILES", 2)
    with pytest.raises(ingest.UploadTooLarge, match=r"3 files.*at most 2 files"):
        ingest.import_uploads(db, [(f"{i}.png", data) for i in range(3)])
    monkeypatch.setattr(ingest, "MAX_UPLOAD_BYTES", len(data) + 10)
    with pytest.raises(ingest.UploadTooLarge, match=r"at most 2 files and .* in all"):
        ingest.import_uploads(db, [("a_ANT.png", io.BytesIO(data)), ("b_POST.png", io.BytesIO(data))])
    assert db["images"].count == 0
    (outcome,) = ingest.import_uploads(db, [("a_ANT.png", io.BytesIO(data))])
    assert outcome.status == "imported"


def test_scans_page_folder_import_refuses_links_out_and_the_file_system_root(db_path, tmp_path, monkeypatch):
    monkeypatch.delenv("BONESCAN_IMPORT_ROOTS", raising=False)
    monkeypatch.delenv("BONESCAN_DATA_DIR", raising=False)
    root = tmp_path / "data"  # the default: data/ beside the database
    phantom_png(root / "case_ANT.png", 71)
    phantom_png(tmp_path / "private" / "secret_ANT.png", 72)
    (root / "link_ANT.png").symlink_to(tmp_path / "private" / "secret_ANT.png")
    app = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=60)
    app.run()
    app.text_input(key="import_folder").input(str(root)).run()
    app.button(key="import_folder_button").click().run()
    assert not app.exception, [e.value for e in app.exception]
    shown = [e.value.replace("\\", "") for e in app.error]  # file names are shown Markdown-escaped
    assert [text for text in shown if "link_ANT.png" in text][0].endswith("copy the file itself into the data folder")
    with dbm.opened(db_path) as db:
        assert db["images"].count == 1
    monkeypatch.setenv("BONESCAN_IMPORT_ROOTS", "/")
    app.run()
    assert any("whole file system" in e.value for e in app.error)
    assert app.button(key="import_folder_button").disabled
