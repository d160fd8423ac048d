"""Prior studies (issue 14.4): day offsets from DICOM and manifest dates, no date stored, and the
Review page drawing a patient's other studies beside the current one."""

from __future__ import annotations

import csv
import datetime as dt
from pathlib import Path

import numpy as np
import pytest
from bad_corpus import dicom_bytes, gradient, nm_dataset
from conftest import REPO
from PIL import Image
from streamlit.testing.v1 import AppTest

from bonescan_core import catalog, ingest, priors
from bonescan_core import db as dbm
from bonescan_core import review as rv
from bonescan_core.phantom import make_study

UID = "1.2.826.0.1.3680043.8.498.4242."


def offsets(db) -> dict[int, int | None]:
    return dict(db.execute("SELECT id, day_offset FROM studies ORDER BY id").fetchall())


def write_dicom(folder: Path, name: str, patient: str, study: int, date: str | None, seed: int) -> Path:
    """One NM file of a study (its own pixels), with PatientID, StudyInstanceUID and, when given, StudyDate."""
    extra = {"StudyDate": date} if date else {}
    ds = nm_dataset(gradient(128, 64, seed=seed), phi=False, PatientID=patient, StudyInstanceUID=f"{UID}{study}",
                    SOPInstanceUID=f"{UID}{study}.{seed}", **extra)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(dicom_bytes(ds))
    return path


def study_of(db, outcome: ingest.FileOutcome) -> int:
    assert outcome.status == "imported", outcome.line()
    return int(outcome.detail.split()[1].rstrip(","))


def test_dicom_dates_become_offsets_and_an_earlier_study_imported_later_moves_them(db, tmp_path):
    first = ingest.import_files(db, [
        write_dicom(tmp_path / "a", "b.dcm", "MRN777", 2, "20210614", 1),    # the patient's second study
        write_dicom(tmp_path / "a", "c.dcm", "MRN777", 3, "20210916", 2),    # 94 days after it
        write_dicom(tmp_path / "a", "x.dcm", "MRN888", 9, "20200101", 3),    # another patient
        write_dicom(tmp_path / "a", "n.dcm", "MRN777", 4, None, 4),          # no date at all
    ], jobs=1)
    b, c, other, undated = (study_of(db, o) for o in first)
    assert offsets(db) == {b: 0, c: 94, other: 0, undated: None}
    # The patient's first study arrives in a later import: it becomes day 0, the others move.
    (earliest,) = ingest.import_files(db, [write_dicom(tmp_path / "later", "a.dcm", "MRN777", 1, "20210110", 5)], jobs=1)
    a = study_of(db, earliest)
    assert offsets(db) == {b: 155, c: 249, other: 0, undated: None, a: 0}
    # A second file of a dated study keeps the study's offset; a middle study lands in between.
    ingest.import_files(db, [write_dicom(tmp_path / "more", "b2.dcm", "MRN777", 2, "20210615", 6),
                             write_dicom(tmp_path / "more", "m.dcm", "MRN777", 5, "20210301", 7)], jobs=1)
    middle = max(offsets(db))
    assert offsets(db) == {b: 155, c: 249, other: 0, undated: None, a: 0, middle: 50}
    assert [(o.study_id, o.days) for o in priors.other_studies(db, b)] == [
        (middle, -105), (a, -155), (c, 94), (undated, None)]
    assert {row["id"]: row["day_offset"] for row in catalog.list_studies(db)} == offsets(db)


def write_png_study(folder: Path, seed: int, metastatic: bool, shape=(128, 64)) -> tuple[str, str]:
    """Anterior and posterior PNGs of one phantom (same seed: same body); their paths relative to ``folder``."""
    study = make_study(np.random.default_rng(seed), metastatic=metastatic, height=shape[0], width=shape[1])
    names = []
    for view in ("anterior", "posterior"):
        name = f"s{seed}{'m' if metastatic else ''}-{view}.png"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(getattr(study, view)).save(folder / name)
        names.append(name)
    return names[0], names[1]


def write_manifest(path: Path, studies: list[tuple[str, str, str, str | None, int, bool]]) -> Path:
    """Rows for (patient_id, study_id, label, study_date, seed, metastatic), both views each."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "patient_id", "study_id", "view", "label", "study_date"])
        for patient, study, label, date, seed, metastatic in studies:
            anterior, posterior = write_png_study(path.parent, seed, metastatic)
            writer.writerow([anterior, patient, study, "A", label, date or ""])
            writer.writerow([posterior, patient, study, "P", label, date or ""])
    return path


def test_manifest_dates_give_offsets_and_the_year_and_an_earlier_study_moves_them(db, tmp_path):
    ingest.import_files(db, [], manifest=write_manifest(tmp_path / "one" / "m.csv", [
        ("P1", "S2", "metastatic", "2020-04-04", 2, True),
        ("P2", "S9", "non_metastatic", "", 9, False),
    ]), jobs=1)
    ingest.import_files(db, [], manifest=write_manifest(tmp_path / "two" / "m.csv", [
        ("P1", "S1", "non_metastatic", "20200101", 1, False),
    ]), jobs=1)
    rows = db.execute("SELECT id, day_offset, study_year FROM studies ORDER BY id").fetchall()
    assert rows == [(1, 94, 2020), (2, None, None), (3, 0, 2020)]
    assert priors.earlier_notice(priors.other_studies(db, 1)) is None
    assert priors.earlier_notice(priors.other_studies(db, 3)) == priors.NO_EARLIER
    assert priors.earlier_notice(priors.other_studies(db, 2)) == priors.NO_EARLIER


@pytest.mark.parametrize("cell", ["04/04/2020", "2020-13-01", "1850-01-01", "soon"])
def test_a_bad_manifest_study_date_names_the_line_and_not_the_value(db, tmp_path, cell):
    manifest = write_manifest(tmp_path / "m.csv", [("P1", "S1", "", cell, 1, False)])
    with pytest.raises(ingest.ManifestError, match=r"m\.csv line 2: study_date") as caught:
        ingest.import_files(db, [], manifest=manifest, jobs=1)
    assert cell not in str(caught.value)
    assert db["studies"].count == 0


def test_no_date_is_stored_in_any_form(db, tmp_path):
    dates = {"20210614": 1, "20210916": 2, "20190302": 3}
    paths = [write_dicom(tmp_path / "d", f"{i}.dcm", "MRN-DATE", i, date, seed=i) for date, i in dates.items()]
    paths.append(write_dicom(tmp_path / "d", "other.dcm", "MRN-OTHER", 7, "20190302", 8))  # same first day, other patient
    ingest.import_files(db, paths, jobs=1)
    days = [dt.date(int(d[:4]), int(d[4:6]), int(d[6:])) for d in dates]
    forbidden_numbers = {n for day in days for n in (day.toordinal(), (day - dt.date(1970, 1, 1)).days, int(day.strftime("%Y%m%d")))}
    forbidden_text = {s for day in days for s in (*priors.date_spellings(day), day.strftime("%Y%m%d"))}
    for table in ("patients", "studies", "images", "reviews", "imported_files", "settings"):
        for row in db.query(f"SELECT * FROM {table}"):
            for column, value in row.items():
                if isinstance(value, int):
                    assert value not in forbidden_numbers, (table, column, value)
                elif isinstance(value, str):
                    assert not any(text in value for text in forbidden_text), (table, column)
    assert sorted(offsets(db).values()) == [0, 0, 835, 929]  # days from 2019-03-02 to 2021-06-14 and 2021-09-16
    anchors = [row[0] for row in db.execute("SELECT day_anchor FROM patients ORDER BY id")]
    assert len(set(anchors)) == 2, "the same first day of two patients is sealed differently"
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    stored = Path(db.conn.execute("PRAGMA database_list").fetchone()[2]).read_bytes()
    assert not [text for text in forbidden_text if text.encode() in stored]


def test_intervals_in_words_and_the_order_of_other_studies():
    assert priors.interval_text(-94) == "94 days earlier (3.1 months)"
    assert priors.interval_text(12) == "12 days later"
    assert priors.interval_text(-1) == "1 day earlier"
    assert (priors.interval_text(0), priors.interval_text(None)) == ("same day", "interval unknown")
    others = [priors.OtherStudy(5, None), priors.OtherStudy(4, 30), priors.OtherStudy(3, -400), priors.OtherStudy(2, -10),
              priors.OtherStudy(6, 0)]
    assert [o.study_id for o in priors.sort_others(others)] == [2, 3, 6, 4, 5]
    assert priors.earlier_notice([]) == priors.NO_EARLIER
    assert priors.earlier_notice([priors.OtherStudy(4, 30), priors.OtherStudy(6, 0)]) == priors.NO_EARLIER
    assert "known to be earlier" in priors.earlier_notice([priors.OtherStudy(5, None)])


# --- the Review page --------------------------------------------------------------------------


@pytest.fixture
def patient_db(db_path, tmp_path):
    """Patient P1: studies 1 (day 0), 2 (day 94), 3 (day 121); patient P2: study 4 alone. Study 1
    has a reading by bob."""
    with dbm.opened(db_path) as db:
        ingest.import_files(db, [], manifest=write_manifest(tmp_path / "m.csv", [
            ("P1", "S1", "", "2020-01-01", 11, False),
            ("P1", "S2", "", "2020-04-04", 11, True),
            ("P1", "S3", "", "2020-05-01", 12, True),
            ("P2", "S4", "", "2020-02-02", 13, False),
        ]), jobs=1)
        rv.add_review(db, rv.Review(study_id=1, reviewer="bob", decision="include", label="non_metastatic",
                                    criteria=("no_abnormal_uptake",)))
        assert offsets(db) == {1: 0, 2: 94, 3: 121, 4: 0}
    return db_path


def review_page(study: int, monkeypatch) -> tuple[AppTest, list[tuple]]:
    """The Review page on ``study`` (reader ann); every picture it draws recorded as
    (study_id, window, gamma, height)."""
    from app_pages import common

    drawn: list[tuple] = []

    def recorded(database: str, study_id: int, window: int, gamma: float, height: int) -> np.ndarray:
        drawn.append((study_id, window, gamma, height))
        return np.zeros((8, 8), np.uint8)

    monkeypatch.setattr(common, "_displayed", recorded)
    app = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=60)
    app.query_params["reviewer"] = "ann"
    app.run()  # the Scans page, which draws a study of its own
    drawn.clear()
    app.query_params["study"] = str(study)
    app.switch_page("app_pages/review.py").run()
    assert not app.exception, [e.value for e in app.exception]
    return app, drawn


def captions(app: AppTest) -> list[str]:
    return [c.value for c in app.caption]


def image_captions(app: AppTest) -> list[str]:
    return [image.caption for element in app.get("image") for image in element.proto.imgs]


def test_review_draws_the_patients_other_studies_earlier_first_with_the_same_settings(patient_db, monkeypatch):
    app, drawn = review_page(2, monkeypatch)
    assert [c.split(" · ")[0] for c in image_captions(app)] == ["Study 2 (this study)", "Study 1", "Study 3"]
    assert "Study 1 · 94 days earlier (3.1 months)" in image_captions(app)[1]
    assert "Study 3 · 27 days later" in image_captions(app)[2]
    drawn.clear()
    app.slider(key="rv_viewer_window").set_value(55)
    app.slider(key="rv_viewer_gamma").set_value(0.65)
    app.slider(key="rv_viewer_zoom").set_value(400).run()
    assert drawn == [(2, 55, 0.65, 400), (1, 55, 0.65, 400), (3, 55, 0.65, 400)]
    assert priors.NO_EARLIER not in captions(app)


def test_criteria_b_and_e_say_when_the_patient_has_no_earlier_study(patient_db, monkeypatch):
    app, _ = review_page(1, monkeypatch)  # the patient's first study: later ones only
    assert captions(app).count(priors.NO_EARLIER) == 2
    labels = [c.label for c in app.checkbox]
    for criterion in priors.NEEDS_EARLIER:
        assert rv.CRITERIA[criterion][1] in labels
    app, drawn = review_page(4, monkeypatch)  # a patient with one study
    assert captions(app).count(priors.NO_EARLIER) == 2
    assert [d[0] for d in drawn] == [4]


def test_blind_mode_shows_the_prior_images_but_never_their_labels(patient_db, monkeypatch):
    app, _ = review_page(2, monkeypatch)
    assert app.toggle(key="rv_blind").value is True
    assert len(image_captions(app)) == 3, "the prior images themselves are shown"
    assert not [c for c in captions(app) if "Training label" in c or "non metastatic" in c]
    assert "The other studies' labels are hidden in blind mode." in captions(app)
    app.toggle(key="rv_blind").set_value(False).run()
    assert "Training label: non metastatic · state: agreed" in captions(app)
