"""A real (tiny) finished run end to end: the Evaluate page renders it, the CLI evaluates,
explains and exports it, and the exported bundle loads back with safe_mode=True."""

import json

import pytest
from conftest import REPO, run_cli, tiny_run
from streamlit.testing.v1 import AppTest

from bonescan_core import db as dbm
from bonescan_core import jobs, runs
from bonescan_core.ingest import add_demo_studies

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A database with 16 demo studies and one done run (scintinet per image, weights none, 64x32, 1 epoch)."""
    db_path = tmp_path_factory.mktemp("run") / "labels.db"
    with dbm.opened(db_path) as db:
        add_demo_studies(db, 16, seed=21)
        config = tiny_run()
        run_id = jobs.enqueue(db, config.backbone, config.to_dict(), config.identity_hash())
    assert jobs.run_worker(db_path, once=True, echo=lambda line: None) == 1
    with dbm.opened(db_path) as db:
        run = runs.get(db, run_id)
    assert run.status == "done", run.error
    with dbm.opened(db_path) as db:  # the worker precomputed every predicted image's Grad-CAM map
        predicted = {row[0] for row in db.execute("SELECT image_id FROM predictions WHERE run_id = ?", [run_id])}
        explained = {row[0] for row in db.execute("SELECT image_id FROM explanations WHERE run_id = ?", [run_id])}
    assert predicted and explained == predicted
    return db_path, run_id


def test_evaluate_page_renders_a_stored_run(finished_run, monkeypatch):
    db_path, run_id = finished_run
    monkeypatch.setenv(dbm.ENV_VAR, str(db_path))
    app = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=120)
    app.run()
    app.switch_page("app_pages/evaluate.py").run()
    assert not app.exception, [e.value for e in app.exception]
    assert [m.label for m in app.metric][:4] == ["Accuracy (per study)", "Recall (sensitivity) (per study)",
                                                 "Precision (PPV) (per study)", "F1 (per study)"]
    app.slider(key=f"ev_threshold_{run_id}_study").set_value(0.0).run()  # everything predicted metastatic
    assert not app.exception
    recall = next(m for m in app.metric if m.label.startswith("Recall"))
    assert recall.value == "1.000"


def test_cli_evaluate_explain_export_round_trip(finished_run, tmp_path):
    db_path, run_id = finished_run
    result = json.loads(run_cli("evaluate", str(run_id), "--json", db_path=db_path).stdout)
    assert result["run"] == run_id and result["subset"] == "test"
    assert set(result["metrics"]) == {"accuracy", "recall", "precision", "f1", "specificity", "npv", "auc", "pr_auc", "brier"}
    assert result["unit"] == "study" and sum(result["confusion"].values()) == result["n_studies"]
    assert sum(result["image_level"]["confusion"].values()) == result["n_images"]
    # Trained now: the run stored a study row per test study and both thresholds.
    assert result["threshold_source"] == "run" and result["notes"] == []

    csv_path = tmp_path / "p.csv"
    assert run_cli("predictions", str(run_id), "--csv", str(csv_path), db_path=db_path).returncode == 0
    header, first = csv_path.read_text().splitlines()[:2]
    assert header == "image_id,study_id,patient_id,view,subset,label,probability"
    image_id = first.split(",")[0]

    png = tmp_path / "gradcam.png"
    explained = run_cli("explain", str(run_id), image_id, "--out", str(png), db_path=db_path)
    assert explained.returncode == 0, explained.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    bundle = tmp_path / "bundle"
    exported = run_cli("export", str(run_id), "--out", str(bundle), db_path=db_path)
    assert exported.returncode == 0, exported.stderr
    assert sorted(p.name for p in bundle.iterdir()) == sorted(["model.keras", "config.json", "metrics.json", "predictions.csv",
                                                               "report.html", "model_card.md", "predict.py", "bonescan_layers.py"])
    assert json.loads((bundle / "metrics.json").read_text())["run"] == run_id
    assert json.loads((bundle / "config.json").read_text())["backbone"] == "scintinet"
    report = (bundle / "report.html").read_text()
    assert "<script" in report and 'src="http' not in report and "scintinet" in report  # self-contained: no network
    import keras

    from bonescan_core.bundle import bonescan_layers  # noqa: F401  # registers the exported model's input layers

    model = keras.saving.load_model(bundle / "model.keras", safe_mode=True)
    assert model.output_shape == (None, 1)

    missing = run_cli("explain", "999", image_id, "--out", str(png), db_path=db_path)
    assert missing.returncode == 2 and "run 999 does not exist" in missing.stderr


def test_bundle_zip_holds_the_bundle_under_the_run_folder(finished_run):
    """The Evaluate page's "Build model bundle" download (report.bundle_zip)."""
    import io
    import zipfile

    from bonescan_core import report

    db_path, run_id = finished_run
    with dbm.opened(db_path) as db:
        data = report.bundle_zip(db, db_path, run_id)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert sorted(archive.namelist()) == sorted(f"run-{run_id}/{name}" for name in report.BUNDLE_FILES)
        assert json.loads(archive.read(f"run-{run_id}/metrics.json"))["threshold_source"] == "run"


def test_map_precomputation_yields_to_a_queued_run(tmp_path):
    """A run is done before its maps are made, and the worker leaves the maps for later when
    another run waits: the queued run trains first, then gets all of its own maps."""
    db_path = tmp_path / "labels.db"
    with dbm.opened(db_path) as db:
        add_demo_studies(db, 16, seed=21)
        run_ids = []
        for seed in (0, 1):
            config = tiny_run(seed=seed)
            run_ids.append(jobs.enqueue(db, config.backbone, config.to_dict(), config.identity_hash()))
    assert jobs.run_worker(db_path, once=True, echo=lambda line: None) == 2
    with dbm.opened(db_path) as db:
        assert [runs.get(db, run_id).status for run_id in run_ids] == ["done", "done"]
        counts = [db.execute("SELECT (SELECT COUNT(*) FROM predictions WHERE run_id = ?), "
                             "(SELECT COUNT(*) FROM explanations WHERE run_id = ?)", [run_id, run_id]).fetchone()
                  for run_id in run_ids]
    (first_predicted, first_maps), (second_predicted, second_maps) = counts
    assert first_predicted > 0 and first_maps == 0, "the first run's maps waited for the queued run"
    assert second_maps == second_predicted > 0


def test_cli_train_returns_once_trained_and_an_idle_worker_makes_the_maps(tmp_path):
    """`bonescan train` waited for every Grad-CAM map before it returned (44 s for a cached fast
    re-run whose training took seconds): it now reports the run once trained, and the maps
    follow from an idle worker (or on first view)."""
    db_path = tmp_path / "labels.db"
    with dbm.opened(db_path) as db:
        add_demo_studies(db, 16, seed=21)
    done = run_cli("train", "--backbone", "scintinet", "--view-mode", "per_image", "--weights", "none", "--mode", "full", "--epochs", "1",
                   "--batch-size", "8", "--image-size", "64x32", db_path=db_path)
    assert done.returncode == 0, done.stderr
    run_id = int(done.stdout.strip())
    assert f"run {run_id}: Grad-CAM maps follow" in done.stderr
    count = "SELECT (SELECT COUNT(*) FROM predictions WHERE run_id = ?), (SELECT COUNT(*) FROM explanations WHERE run_id = ?)"
    with dbm.opened(db_path) as db:
        predicted, explained = db.execute(count, [run_id, run_id]).fetchone()
        assert predicted > 0 and explained == 0
        assert jobs.run_to_explain(db) == run_id and jobs.run_to_explain(db, skip=[run_id]) is None
    assert jobs.explain_pending(db_path, set()) == run_id  # what the worker does while nothing is queued
    with dbm.opened(db_path) as db:
        assert db.execute(count, [run_id, run_id]).fetchone() == (predicted, predicted)
        assert jobs.run_to_explain(db) is None
