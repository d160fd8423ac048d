"""Cohorts (issue 13 point 1): every study belongs to one; import, demo (another scanner's look),
studies --json, splits made from chosen cohorts, the Scans and Train pages."""

import csv
import json

import numpy as np
import pytest
from conftest import REPO, run_cli
from PIL import Image
from streamlit.testing.v1 import AppTest

from bonescan_core import catalog, cohorts, ingest, pixelstore, splits
from bonescan_core import db as dbm
from bonescan_core.phantom import OTHER_SCANNER, ScannerShift, make_studies, make_study
from bonescan_core.review import Review, add_review


def phantom_png(path, seed, view="anterior"):
    study = make_study(np.random.default_rng(seed), metastatic=False, height=128, width=64)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(getattr(study, view)).save(path)


def studies_json(db_path) -> list[dict]:
    result = run_cli("studies", "--json", db_path=db_path)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_import_with_cohort_shows_in_studies_json(db_path, tmp_path):
    phantom_png(tmp_path / "a" / "case1_ANT.png", 1)
    phantom_png(tmp_path / "b" / "case2_ANT.png", 2)
    assert run_cli("import", str(tmp_path / "a"), db_path=db_path).returncode == 0
    result = run_cli("import", str(tmp_path / "b"), "--cohort", "hospital-b", db_path=db_path)
    assert result.returncode == 0, result.stderr
    assert [row["cohort"] for row in studies_json(db_path)] == ["default", "hospital-b"]


def test_a_cohort_name_outside_the_pattern_is_refused_with_what_is_allowed(db_path, tmp_path):
    phantom_png(tmp_path / "case_ANT.png", 3)
    result = run_cli("import", str(tmp_path), "--cohort=bad,name", db_path=db_path)
    assert result.returncode == 2
    assert f"cohort name 'bad,name' is not allowed: use {cohorts.ALLOWED}, e.g. hospital-b" in result.stderr
    with dbm.opened(db_path) as db:
        assert db["studies"].count == 0 and db["images"].count == 0
    for name in ("-leading", "x" * 41, "a/b", "é", ".hidden", "a;b"):
        with pytest.raises(cohorts.CohortError, match="is not allowed: use 1 to 40 letters"):
            cohorts.check_cohort(name)


def test_cohort_names_that_are_allowed():
    assert [cohorts.check_cohort(n) for n in ("default", " Site B ", "h.2_x-1", "x" * 40, "", None)] == [
        "default", "Site B", "h.2_x-1", "x" * 40, "default", "default"]
    assert cohorts.parse_cohorts("b, a,b") == ["a", "b"]
    assert cohorts.parse_cohorts(None) is None


def test_a_manifest_cohort_cell_wins_over_the_import_cohort_per_row(db, tmp_path):
    for name, seed in (("one.png", 4), ("two.png", 5)):
        phantom_png(tmp_path / "img" / name, seed)
    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "patient_id", "study_id", "view", "label", "cohort"])
        writer.writerow(["img/one.png", "P1", "S1", "A", "", "site-a"])
        writer.writerow(["img/two.png", "P2", "S2", "A", "", ""])  # empty: the import's cohort
    outcomes = ingest.import_files(db, [], manifest=manifest, cohort="site-b")
    assert [o.status for o in outcomes] == ["imported", "imported"]
    assert [row["cohort"] for row in catalog.list_studies(db)] == ["site-a", "site-b"]


def test_a_bad_manifest_cohort_names_the_line(db, tmp_path):
    phantom_png(tmp_path / "one.png", 6)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,patient_id,study_id,view,label,cohort\none.png,P1,S1,A,,a;b\n")
    with pytest.raises(ingest.ManifestError, match=r"line 2: cohort name 'a;b' is not allowed"):
        ingest.import_files(db, [], manifest=manifest)
    assert db["studies"].count == 0


def test_a_study_imported_again_into_another_cohort_keeps_the_first(db, tmp_path):
    phantom_png(tmp_path / "case_ANT.png", 7)
    phantom_png(tmp_path / "case_POST.png", 7, "posterior")
    (first,) = ingest.import_files(db, [tmp_path / "case_ANT.png"], cohort="first")
    (second,) = ingest.import_files(db, [tmp_path / "case_POST.png"], cohort="second")
    assert second.status == "imported"
    assert "study kept in cohort 'first', where it was first imported (not 'second')" in second.line()
    assert "kept in cohort" not in first.line()
    ((cohort, n_images),) = db.execute("SELECT cohort, (SELECT COUNT(*) FROM images) FROM studies").fetchall()
    assert (cohort, n_images) == ("first", 2)


def test_uploads_and_folder_imports_take_a_cohort(db, tmp_path):
    phantom_png(tmp_path / "up" / "u_ANT.png", 8)
    phantom_png(tmp_path / "data" / "f_ANT.png", 9)
    ingest.import_uploads(db, [("u_ANT.png", (tmp_path / "up" / "u_ANT.png").read_bytes())], cohort="uploaded")
    ingest.import_folder(db, tmp_path / "data", roots=[tmp_path / "data"], cohort="folder")
    assert sorted(row["cohort"] for row in catalog.list_studies(db)) == ["folder", "uploaded"]
    with pytest.raises(cohorts.CohortError):
        ingest.import_uploads(db, [("u.png", b"x")], cohort="no,commas")


# Pixel hashes of the default phantoms, taken before ScannerShift existed: the default must not move.
DEFAULT_HASHES = {
    (0, 1024, 256): [("a303aa0baa8ac3502c5af820bd24d335fa7ef9fbf96c3002ae104b5047dac218",
                      "2ccf312a3890a1d5364671fe789ef2c7c59cd94cf6531a91c4a9b72fe9b0e357"),
                     ("f0a52d30c70815228cea5316a7b34d13e21bace5c8d92cf16298786e9ce63c69",
                      "8d3456f7971f2d00141e4bc103f1201987150d0e4e3fea68aa7e789e50626f3f")],
    (7, 256, 64): [("78549e75c87f8525455668cb1ec48bd27338661cc3588fcadd428f77f9261bc2",
                    "8258a4970bd3c61849da201bd9bbba94ad75ff64c878e5ba578a58f9fa030d9c"),
                   ("5ccd434335a1ac954195e80fc6d184ac5f6c115c33e06c11f606d85a26e75d3a",
                    "c43a7c9ed02678e67a600442f575982826e8a79ccd335c4e55dde2069fee730d")],
}


@pytest.mark.parametrize("seed, height, width", list(DEFAULT_HASHES))
def test_the_default_demo_pixels_are_unchanged(seed, height, width):
    drawn = [(pixelstore.pixel_sha256(s.anterior), pixelstore.pixel_sha256(s.posterior))
             for s in make_studies(2, seed, height=height, width=width)]
    assert drawn == DEFAULT_HASHES[(seed, height, width)]


def test_a_shifted_demo_differs_in_size_and_intensities_and_is_deterministic_by_seed():
    plain = list(make_studies(3, seed=3, height=512, width=128))
    shifted = list(make_studies(3, seed=3, height=512, width=128, shift=OTHER_SCANNER))
    again = list(make_studies(3, seed=3, height=512, width=128, shift=OTHER_SCANNER))
    other_seed = list(make_studies(3, seed=4, height=512, width=128, shift=OTHER_SCANNER))
    assert all(s.anterior.shape == s.posterior.shape == (448, 112) for s in shifted)
    assert all(s.anterior.dtype == np.uint16 for s in shifted)
    for a, b in zip(shifted, again, strict=True):
        assert np.array_equal(a.anterior, b.anterior) and np.array_equal(a.posterior, b.posterior)
    assert not np.array_equal(shifted[0].anterior, other_seed[0].anterior)
    # The offset lifts the empty background (~0-2 counts by default) to about 20.
    plain_background = np.median([np.percentile(s.anterior, 5) for s in plain])
    shifted_background = np.median([np.percentile(s.anterior, 5) for s in shifted])
    assert plain_background <= 2 and 12 <= shifted_background <= 28
    # Read-out noise: the background spreads where default counts are near zero.
    assert np.std(shifted[0].anterior[:8, :8].astype(float)) > 2 * np.std(plain[0].anterior[:8, :8].astype(float))


def test_a_scanner_shift_is_an_explicit_parameter_set():
    shift = ScannerShift(matrix_scale=0.5, count_scale=1.0, read_noise=0.0, gain=2.0, offset=5.0)
    assert shift.size(1024, 256) == (512, 128)
    counts = np.array([[0, 10], [100, 40000]], np.uint16)
    assert shift.apply(np.random.default_rng(0), counts).tolist() == [[5, 25], [205, 65535]]


def test_demo_cli_makes_a_second_cohort_that_looks_like_another_scanner(db_path):
    assert run_cli("demo", "--studies", "2", "--seed", "1", db_path=db_path).returncode == 0
    result = run_cli("demo", "--studies", "2", "--seed", "1", "--cohort", "scanner-b", "--shift", db_path=db_path)
    assert result.returncode == 0, result.stderr
    assert "added 2 demo studies (0 already present), seed 1, cohort scanner-b, another scanner" in result.stdout
    assert [row["cohort"] for row in studies_json(db_path)] == ["default", "default", "scanner-b", "scanner-b"]
    images = json.loads(run_cli("images", "--json", db_path=db_path).stdout)
    assert [(i["height"], i["width"]) for i in images] == [(1024, 256)] * 4 + [(896, 224)] * 4
    assert all(i["source"].startswith("phantom-shift-1-") for i in images[4:])
    bad = run_cli("demo", "--studies", "1", "--cohort", "a,b", db_path=db_path)
    assert bad.returncode == 2 and "is not allowed" in bad.stderr


def labelled_cohort(db, n: int, cohort: str) -> list[int]:
    """n bare studies (one patient each) in ``cohort``, alternately labelled metastatic and not by ann."""
    ids = []
    with dbm.write(db):
        for i in range(n):
            patient = db["patients"].insert({"key": f"{cohort}-p{i}", "created_at": dbm.utc_now()}).last_pk
            ids.append(db["studies"].insert({"patient_id": patient, "key": f"{cohort}-s{i}", "origin": "import",
                                             "cohort": cohort, "created_at": dbm.utc_now()}).last_pk)
    for i, study_id in enumerate(ids):
        label, criterion = ("metastatic", "typical_pattern") if i % 2 else ("non_metastatic", "no_abnormal_uptake")
        add_review(db, Review(study_id=study_id, reviewer="ann", decision="include", label=label, criteria=(criterion,)))
    return ids


def test_split_cohort_takes_only_that_cohorts_studies_and_records_it(db_path, db):
    home = labelled_cohort(db, 20, "default")
    away = labelled_cohort(db, 20, "hospital-b")
    result = run_cli("split", "--cohort", "hospital-b", "--json", db_path=db_path)
    assert result.returncode == 0, result.stderr
    made = json.loads(result.stdout)
    assert made["cohorts"] == ["hospital-b"]
    assert sorted(sum(made["subsets"].values(), [])) == away
    everything = json.loads(run_cli("split", "--json", db_path=db_path).stdout)
    assert everything["cohorts"] == ["default", "hospital-b"]
    assert sorted(sum(everything["subsets"].values(), [])) == sorted(home + away)
    assert splits.split_info(db, made["id"])["cohorts"] == ["hospital-b"]
    # The latest split is matched by its cohorts too: every backbone of a cohort choice shares one.
    assert splits.ensure_split(db, cohorts=["hospital-b"]) == made["id"]
    assert splits.ensure_split(db) == everything["id"]
    home_only = splits.ensure_split(db, cohorts="default")
    assert home_only not in (made["id"], everything["id"])
    assert splits.get_split(db, home_only)["cohorts"] == ["default"]
    unknown = run_cli("split", "--cohort", "nowhere", db_path=db_path)
    assert unknown.returncode == 2
    assert "no study is in cohort 'nowhere'; the cohorts are default, hospital-b" in unknown.stderr


def test_splits_made_before_cohorts_record_the_default_cohort(tmp_path, monkeypatch):
    path = tmp_path / "old.db"
    names = [name for name, _ in dbm.MIGRATIONS]
    monkeypatch.setattr(dbm, "MIGRATIONS", dbm.MIGRATIONS[: names.index("007_cohorts")])
    with dbm.opened(path) as db, dbm.write(db):
        db["splits"].insert({"seed": 0, "test_fraction": 0.3, "val_fraction": 0.15, "labels_hash": "x",
                             "created_at": dbm.utc_now()})
        patient = db["patients"].insert({"key": "p", "created_at": dbm.utc_now()}).last_pk
        db["studies"].insert({"patient_id": patient, "key": "s", "origin": "import", "created_at": dbm.utc_now()})
    monkeypatch.undo()
    with dbm.opened(path) as db:
        assert splits.get_split(db, 1)["cohorts"] == ["default"]
        assert [row["cohort"] for row in catalog.list_studies(db)] == ["default"]


def test_scans_page_shows_and_filters_the_cohort_column(db_path):
    with dbm.opened(db_path) as db:
        ingest.add_demo_studies(db, 2, seed=1)
        ingest.add_demo_studies(db, 1, seed=2, cohort="scanner-b", shift=OTHER_SCANNER)
    app = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=60)
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    assert app.dataframe[-1].value["cohort"].tolist() == ["default", "default", "scanner-b"]
    app.multiselect(key="filter_cohort").select("scanner-b").run()
    assert app.dataframe[-1].value["cohort"].tolist() == ["scanner-b"]
    app.text_input(key="demo_cohort").input("bad,name").run()
    app.button(key="load_demo").click().run()
    assert any("cohort name 'bad,name' is not allowed" in e.value for e in app.error)
    app.text_input(key="demo_cohort").input("site-c").run()
    app.number_input(key="demo_studies").set_value(10)
    app.checkbox(key="demo_shift").check()
    app.button(key="load_demo").click().run()
    assert not app.exception, [e.value for e in app.exception]
    with dbm.opened(db_path) as db:
        assert db.execute("SELECT COUNT(*) FROM studies WHERE cohort = 'site-c'").fetchone()[0] == 10


def test_train_page_offers_every_cohort_and_makes_the_split_from_the_chosen_ones(db_path, monkeypatch):
    monkeypatch.setenv("BONESCAN_AUTOSTART_WORKER", "0")  # the test checks the queue, not a worker
    with dbm.opened(db_path) as db:
        labelled_cohort(db, 20, "default")
        away = labelled_cohort(db, 20, "hospital-b")
    app = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=60)
    app.query_params["reviewer"] = "ann"
    app.run()
    app.switch_page("app_pages/train.py").run()
    chooser = app.multiselect(key="tr_cohorts")
    assert chooser.options == ["default", "hospital-b"] and chooser.value == ["default", "hospital-b"]
    chooser.unselect("default")
    app.multiselect(key="tr_backbones").set_value(["resnet50"])
    app.get("form_submit_button")[0].click()
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    with dbm.opened(db_path) as db:
        (config,) = [json.loads(row[0]) for row in db.execute("SELECT config FROM runs").fetchall()]
        made = splits.get_split(db, config["split_id"])
    assert made["cohorts"] == ["hospital-b"]
    assert sorted(sum(made["subsets"].values(), [])) == away
