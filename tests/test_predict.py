"""Prediction on studies a run never saw (``prediction``, ``bonescan predict``), external
validation (``external.evaluate_cohort``, ``evaluate --cohort``) and the dataset-shift panel.

One tiny run (VGG19, weights none, 64 x 32, trained for real on 20 demo studies of cohort
``default``) is made once per module; each test works on a copy of its folder (database and
``runs/``). A second cohort, ``scanner-b``, is 6 demo studies drawn as another scanner would.
Expected values are computed here from the stored pixels and the run's own model, not with
the code under test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_cli
from PIL import Image
from streamlit.testing.v1 import AppTest

from bonescan_core import db as dbm
from bonescan_core import (
    errors,
    external,
    ingest,
    jobs,
    phantom,
    pixelstore,
    plots,
    prediction,
    preprocess,
    runs,
    splits,
    studystats,
    training,
)
from bonescan_core.models import build_model

SIZE = (64, 32)
TINY = training.TrainConfig(backbone="vgg19", weights="none", mode="full", epochs=1, batch_size=8, image_size=SIZE,
                            learning_rate=1e-4, augment={})
OTHER = "scanner-b"


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory) -> Path:
    """A folder with labels.db (20 default + 6 scanner-b demo studies) and one done tiny run (id 1)."""
    folder = tmp_path_factory.mktemp("predict")
    path = folder / "labels.db"
    with dbm.opened(path) as db:
        ingest.add_demo_studies(db, 20, seed=0)
        split_id = splits.make_split(db, seed=0, cohorts=["default"])
        ingest.add_demo_studies(db, 6, seed=1, cohort=OTHER, shift=phantom.OTHER_SCANNER)
        config = TINY.__class__.from_json({**TINY.to_dict(), "split_id": split_id})
        run_id = jobs.enqueue(db, config.backbone, config.to_dict(), config.identity_hash())
        run = jobs.claim_next(db, run_id)
    assert jobs.execute_run(path, run) == "done"
    return folder


@pytest.fixture
def folder(trained_folder, tmp_path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(trained_folder, target)
    return target


@pytest.fixture
def db_file(folder, monkeypatch) -> Path:
    path = folder / "labels.db"
    monkeypatch.setenv(dbm.ENV_VAR, str(path))
    runs.clear_model_cache()
    return path


def cohort_studies(db, cohort: str) -> list[int]:
    return [r[0] for r in db.execute("SELECT id FROM studies WHERE cohort = ? ORDER BY id", [cohort]).fetchall()]


def split_studies(db, run_id: int = 1) -> dict[int, str]:
    run = runs.get(db, run_id)
    return {sid: subset for sid, (subset, _) in splits.split_labels(db, run.split_id).items()}


def reference_labels(db, study_ids) -> dict[int, int]:
    """The demo studies' reference labels, read straight from their reviews."""
    return {sid: int(label == "metastatic") for sid, label in db.execute(
        f"SELECT study_id, label FROM reviews WHERE study_id IN ({', '.join('?' for _ in study_ids)})", list(study_ids))}


def own_probabilities(db_file: Path, db, image_ids) -> dict[int, float]:
    """The run model's output for each image, computed here image by image from its pixels
    (NumPy preprocessing, the bare model: no batching, no wrapper)."""
    model, backbone, size = runs.load_model(db_file, 1)
    out = {}
    for image_id in image_ids:
        pixels = pixelstore.decode_pixels(db.execute("SELECT pixels FROM images WHERE id = ?", [image_id]).fetchone()[0])
        x = preprocess.to_model_input(preprocess.prepare_image(pixels, size)[None], backbone)
        out[image_id] = float(np.asarray(model.predict(x, verbose=0)).reshape(-1)[0])
    return out


def external_rows(db, run_id: int = 1) -> tuple[list[tuple], list[tuple]]:
    images = db.execute("SELECT image_id, label, probability, raw_probability FROM predictions "
                        "WHERE run_id = ? AND subset = 'external' ORDER BY image_id", [run_id]).fetchall()
    studies = db.execute("SELECT study_id, label, probability, raw_probability FROM study_predictions "
                         "WHERE run_id = ? AND subset = 'external' ORDER BY study_id", [run_id]).fetchall()
    return images, studies


# --- predict ----------------------------------------------------------------------------------------

def test_predict_cohort_stores_each_images_probability_study_max_labels_and_maps(db_file):
    done = run_cli("predict", "1", "--cohort", OTHER, "--json", db_path=db_file)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    with dbm.opened(db_file) as db:
        others = cohort_studies(db, OTHER)
        image_study = dict(db.execute(f"SELECT id, study_id FROM images WHERE study_id IN ({','.join('?' * len(others))})",
                                      others).fetchall())
        images, studies = external_rows(db)
        expected = own_probabilities(db_file, db, sorted(image_study))
        labels = reference_labels(db, others)
        maps = {r[0] for r in db.execute("SELECT image_id FROM explanations WHERE run_id = 1").fetchall()}
        val_test = db.execute("SELECT COUNT(*) FROM predictions WHERE run_id = 1 AND subset IN ('val', 'test')").fetchone()[0]

    assert printed["status"] == "done" and printed["n_studies"] == 6 and printed["n_images"] == 12
    assert [r[0] for r in images] == sorted(image_study)  # every image of the cohort, nothing else
    for image_id, label, probability, raw in images:
        assert probability == pytest.approx(expected[image_id], abs=1e-5)
        assert raw is None  # the run is not calibrated
        assert label == labels[image_study[image_id]]
    assert [r[0] for r in studies] == others
    for study_id, label, probability, _ in studies:
        views = [expected[i] for i, s in image_study.items() if s == study_id]
        assert probability == pytest.approx(max(views), abs=1e-5) and label == labels[study_id]
    assert maps >= set(image_study)  # a Grad-CAM map for every predicted image
    assert val_test > 0  # the run's own predictions are untouched
    assert [row["study_id"] for row in printed["studies"]] == others


def test_predicting_again_leaves_the_same_rows(db_file):
    with dbm.opened(db_file) as db:
        first = prediction.enqueue(db, 1, cohort=OTHER)
        jobs.execute_prediction(db_file, prediction.claim_next(db, first))
        before = external_rows(db)
        n_maps = db.execute("SELECT COUNT(*) FROM explanations").fetchone()[0]
        second = prediction.enqueue(db, 1, cohort=OTHER)
        assert jobs.execute_prediction(db_file, prediction.claim_next(db, second)) == "done"
        after = external_rows(db)
        assert db.execute("SELECT COUNT(*) FROM explanations").fetchone()[0] == n_maps
    assert len(before[0]) == 12 and len(before[1]) == 6
    assert after == before


def test_studies_of_the_runs_split_are_refused_with_what_to_do(db_file):
    with dbm.opened(db_file) as db:
        members = split_studies(db)
        test_study = min(s for s, subset in members.items() if subset == "test")
        outside = cohort_studies(db, OTHER)[0]
    refused = run_cli("predict", "1", "--studies", f"{outside},{test_study}", db_path=db_file)
    assert refused.returncode == 2
    assert f"study {test_study} (test)" in refused.stderr and "would not be external" in refused.stderr
    refused = run_cli("predict", "1", "--cohort", "default", db_path=db_file)
    assert refused.returncode == 2 and "belong to run 1's split" in refused.stderr
    with dbm.opened(db_file) as db:
        assert db.execute("SELECT COUNT(*) FROM prediction_jobs").fetchone()[0] == 0
        assert db.execute("SELECT COUNT(*) FROM predictions WHERE subset = 'external'").fetchone()[0] == 0
        with pytest.raises(prediction.InSplitError):
            prediction.choose_studies(db, 1, study_ids=[test_study])


def test_unread_studies_are_predicted_with_no_label(db_file, tmp_path):
    scan = tmp_path / "new" / "case_ANT.png"
    scan.parent.mkdir()
    rng = np.random.default_rng(4)
    Image.fromarray(rng.integers(0, 2000, size=(300, 100)).astype(np.uint16)).save(scan)
    with dbm.opened(db_file) as db:
        (outcome,) = ingest.import_files(db, [scan.parent], cohort=OTHER, jobs=1)
        assert outcome.status == "imported", outcome.line()
        new_study = db.execute("SELECT study_id FROM images WHERE id = ?", [outcome.image_ids[0]]).fetchone()[0]
        chosen, selection = prediction.choose_studies(db, 1, unread=True)
    assert chosen == [new_study] and selection == "unread"
    done = run_cli("predict", "1", "--unread", "--json", db_path=db_file)
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(done.stdout)["studies"]
    assert row["study_id"] == new_study and row["label"] is None
    with dbm.opened(db_file) as db:
        assert db.execute("SELECT label FROM study_predictions WHERE study_id = ?", [new_study]).fetchone() == (None,)
        data = runs.predictions(db, 1, "external")
        assert data["label"].tolist() == [runs.UNKNOWN_LABEL]


def test_a_calibrated_run_stores_calibrated_and_raw_probabilities(db_file):
    """Images take the run's image calibration, studies its study calibration (fitted apart,
    on validation studies)."""
    calibration = {"method": "temperature", "temperature": 2.5}
    study_calibration = {"method": "platt", "intercept": -0.3, "slope": 0.6}
    with dbm.opened(db_file) as db:
        facts = runs.get(db, 1).results.facts
        with dbm.write(db):
            db.execute("UPDATE runs SET results = ? WHERE id = 1",
                       [json.dumps({**facts, "calibration": calibration, "study_calibration": study_calibration})])
        job = prediction.enqueue(db, 1, cohort=OTHER)
        assert jobs.execute_prediction(db_file, prediction.claim_next(db, job)) == "done"
        images, studies = external_rows(db)
        raw_expected = own_probabilities(db_file, db, [r[0] for r in images])
    for image_id, _, probability, raw in images:
        assert raw == pytest.approx(raw_expected[image_id], abs=1e-5)
        assert probability == pytest.approx(float(studystats.apply_calibration(calibration, [raw])[0]), abs=1e-9)
        assert abs(probability - 0.5) < abs(raw - 0.5) + 1e-12  # T > 1 pulls towards 0.5
    assert studies
    for _, _, probability, raw in studies:
        assert probability == pytest.approx(float(studystats.apply_calibration(study_calibration, [raw])[0]), abs=1e-9)
        assert probability != pytest.approx(float(studystats.apply_calibration(calibration, [raw])[0]), abs=1e-6)


def test_inference_is_batched_with_one_model_load(db_file, monkeypatch):
    loads, passes = [], []
    real_load, real_chunk = runs.load_model, prediction.predict_chunk
    monkeypatch.setattr(runs, "load_model", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    monkeypatch.setattr(prediction, "predict_chunk", lambda p, images, b: passes.append(len(images)) or real_chunk(p, images, b))
    with dbm.opened(db_file) as db:
        run = runs.get(db, 1)
        counts = prediction.predict_studies(db, db_file, run, cohort_studies(db, OTHER), chunk=4)
    assert len(loads) == 1
    assert passes == [4, 4, 4]  # 12 images, chunks of whole studies (2 views each)
    assert counts["n_studies"] == 6 and counts["n_images"] == 12 and counts["n_labelled"] == 6


def test_a_composite_run_stores_one_output_per_study_for_both_views(db_file):
    with dbm.opened(db_file) as db:
        trained = runs.get(db, 1)
        model = build_model("vgg19", "none", SIZE, seed=3)
        target = runs.model_file(db_file, 2)
        target.parent.mkdir(parents=True)
        model.save(target)
        config = {**trained.settings.to_dict(), "view_mode": "composite"}
        with dbm.write(db):
            db["runs"].insert({"id": 2, "backbone": "vgg19", "status": "done", "config": json.dumps(config),
                               "config_hash": "composite", "split_id": trained.split_id, "created_at": dbm.utc_now(),
                               "threshold": 0.5, "weights_path": runs.stored_path(db_file, target),
                               "weights_sha256": runs.file_sha256(target), "results": json.dumps(trained.results.facts)})
        job = prediction.enqueue(db, 2, cohort=OTHER)
        assert jobs.execute_prediction(db_file, prediction.claim_next(db, job)) == "done"
        images, studies = external_rows(db, 2)
        study_of = dict(db.execute("SELECT id, study_id FROM images").fetchall())
        views = {sid: {v: i for i, v in db.execute("SELECT id, view FROM images WHERE study_id = ?", [sid])}
                 for sid in cohort_studies(db, OTHER)}
        pixels = {i: pixelstore.decode_pixels(db.execute("SELECT pixels FROM images WHERE id = ?", [i]).fetchone()[0])
                  for vs in views.values() for i in vs.values()}
    assert len(studies) == 6 and len(images) == 12
    by_study = {sid: p for sid, _, p, _ in studies}
    for image_id, _, probability, _ in images:
        assert probability == by_study[study_of[image_id]]  # both views carry the study's one output
    sid = studies[0][0]
    frame = preprocess.compose_views(pixels[views[sid]["anterior"]], pixels[views[sid]["posterior"]], SIZE)
    x = preprocess.to_model_input(frame[None], "vgg19")
    assert by_study[sid] == pytest.approx(float(np.asarray(model.predict(x, verbose=0)).reshape(-1)[0]), abs=1e-5)


# --- the job: queue, worker, cancel, interrupted -----------------------------------------------------

def test_queued_prediction_is_run_by_the_worker_before_queued_training(db_file):
    queued = run_cli("predict", "1", "--cohort", OTHER, "--queue", db_path=db_file)
    assert queued.returncode == 0, queued.stderr
    job_id = int(queued.stdout.strip())
    with dbm.opened(db_file) as db:
        with pytest.raises(prediction.DuplicatePrediction, match=f"job {job_id}"):
            prediction.enqueue(db, 1, cohort=OTHER)
        config = TINY.__class__.from_json({**TINY.to_dict(), "seed": 7, "split_id": runs.get(db, 1).split_id})
        run_id = jobs.enqueue(db, config.backbone, config.to_dict(), config.identity_hash())
        jobs.request_cancel(db, run_id)  # cancelled while queued: the worker must not train it
    lines = []
    assert jobs.run_worker(db_file, once=True, poll_s=0.1, echo=lines.append) == 1
    assert lines[0].startswith(f"prediction job {job_id}: run 1 over 6 studies") and lines[1] == f"prediction job {job_id}: done"
    with dbm.opened(db_file) as db:
        job = prediction.get_job(db, job_id)
        assert job.status == "done" and job.result["n_studies"] == 6 and job.result["explained"] == 12
        assert job.progress["phase"] == "explaining" and job.progress["batch"] == job.progress["batches"] == 6


class StopAfter:
    """A reporter that asks to stop after ``polls`` cancel checks."""

    def __init__(self, polls: int) -> None:
        self.polls, self.fields = polls, []

    def progress(self, fields, force=False) -> None:
        self.fields.append(fields)

    def cancelled(self) -> bool:
        self.polls -= 1
        return self.polls < 0


def test_cancel_stops_between_chunks_and_keeps_what_was_stored(db_file):
    with dbm.opened(db_file) as db:
        run = runs.get(db, 1)
        with pytest.raises(prediction.PredictionCancelled):
            prediction.predict_studies(db, db_file, run, cohort_studies(db, OTHER), StopAfter(1), chunk=4)
        assert len(external_rows(db)[1]) == 2  # one chunk of two studies was stored before the stop
        job_id = prediction.enqueue(db, 1, cohort=OTHER)
        assert prediction.request_cancel(db, job_id) == "cancelled"  # queued: at once
        assert prediction.claim_next(db) is None
        job_id = prediction.enqueue(db, 1, cohort=OTHER)
        job = prediction.claim_next(db, job_id)
        assert prediction.request_cancel(db, job_id) == "running"
    assert jobs.execute_prediction(db_file, job) == "cancelled"
    with dbm.opened(db_file) as db:
        assert prediction.get_job(db, job_id).status == "cancelled"


def test_a_prediction_whose_worker_died_becomes_interrupted(db_file):
    with dbm.opened(db_file) as db:
        job_id = prediction.enqueue(db, 1, cohort=OTHER)
        prediction.claim_next(db, job_id)
        with dbm.write(db):
            db.execute("UPDATE prediction_jobs SET heartbeat_at = '2000-01-01T00:00:00Z' WHERE id = ?", [job_id])
        assert jobs.mark_predictions_interrupted(db) == [job_id]
        job = prediction.get_job(db, job_id)
    assert job.status == "interrupted" and "predict again" in job.error


# --- external validation -------------------------------------------------------------------------

def test_evaluate_cohort_uses_the_runs_validation_thresholds_and_counts_unlabelled(db_file):
    with dbm.opened(db_file) as db:
        facts = runs.get(db, 1).results.facts
        with dbm.write(db):
            db.execute("UPDATE runs SET results = ? WHERE id = 1",
                       [json.dumps({**facts, "thresholds": {"image": 0.3, "study": 0.6, "rule": "youden", "target": None}})])
        job = prediction.enqueue(db, 1, cohort=OTHER)
        jobs.execute_prediction(db_file, prediction.claim_next(db, job))
        unlabelled = cohort_studies(db, OTHER)[0]
        with dbm.write(db):  # as if that study had not been read: its rows carry no label
            db.execute("UPDATE predictions SET label = NULL WHERE image_id IN (SELECT id FROM images WHERE study_id = ?)",
                       [unlabelled])
            db.execute("UPDATE study_predictions SET label = NULL WHERE study_id = ?", [unlabelled])
        images = db.execute("SELECT p.label, p.probability FROM predictions p JOIN images i ON i.id = p.image_id "
                            "WHERE p.subset = 'external' AND p.label IS NOT NULL").fetchall()
        studies = db.execute("SELECT label, probability FROM study_predictions WHERE subset = 'external' "
                             "AND label IS NOT NULL").fetchall()
    done = run_cli("evaluate", "1", "--cohort", OTHER, "--json", db_path=db_file)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)

    def confusion(rows, threshold):
        return {"tp": sum(y == 1 and p >= threshold for y, p in rows), "fp": sum(y == 0 and p >= threshold for y, p in rows),
                "tn": sum(y == 0 and p < threshold for y, p in rows), "fn": sum(y == 1 and p < threshold for y, p in rows)}

    assert result["subset"] == "external" and result["cohort"] == OTHER and result["n_unlabelled"] == 1
    assert result["unit"] == "study" and result["threshold"] == 0.6  # the study is the unit, at the study threshold
    assert result["image_level"]["threshold"] == 0.3 and result["study_level"]["threshold"] == 0.6
    assert result["n_images"] == 10 and result["n_studies"] == 5
    assert result["image_level"]["confusion"] == confusion(images, 0.3)
    assert result["confusion"] == result["study_level"]["confusion"] == confusion(studies, 0.6)
    assert set(result["metrics"]) >= {"accuracy", "auc"} and "ci95" in result["metrics"]["accuracy"]
    # The same assessment as the run's own test set: calibration of the cohort's labelled studies, subgroups.
    assert result["calibration"]["n"] == 5 and {"ece", "intercept", "slope", "temperature"} <= set(result["calibration"])
    assert isinstance(result["subgroups"], list)
    assert all(row["n"] <= 5 for row in result["subgroups"] if row["unit"] == "study")
    as_images = json.loads(run_cli("evaluate", "1", "--cohort", OTHER, "--unit", "image", "--json", db_path=db_file).stdout)
    assert as_images["threshold"] == 0.3 and as_images["confusion"] == confusion(images, 0.3)

    refused = run_cli("evaluate", "1", "--cohort", OTHER, "--threshold", "0.5", db_path=db_file)
    assert refused.returncode == 2 and "validation set" in refused.stderr
    missing = run_cli("evaluate", "1", "--cohort", "default", db_path=db_file)
    assert missing.returncode == 2 and "bonescan predict 1 --cohort default" in missing.stderr


def test_evaluate_cohort_falls_back_to_the_runs_one_threshold(db_file):
    with dbm.opened(db_file) as db:
        job = prediction.enqueue(db, 1, cohort=OTHER)
        jobs.execute_prediction(db_file, prediction.claim_next(db, job))
        stored = runs.get(db, 1).threshold
        result = external.evaluate_cohort(db, 1, OTHER, n_resamples=50, unit="image")
    assert result.threshold == pytest.approx(stored, abs=1e-4) and result.study_threshold == result.threshold
    assert result.threshold_source == "run" and result.n_unlabelled == 0


def test_dataset_shift_sets_the_cohort_beside_the_test_set(db_file):
    with dbm.opened(db_file) as db:
        job = prediction.enqueue(db, 1, cohort=OTHER)
        jobs.execute_prediction(db_file, prediction.claim_next(db, job))
        shift = external.dataset_shift(db, 1, OTHER)
        test_ids = [s for s, subset in split_studies(db).items() if subset == "test"]
        probabilities = [p for (p,) in db.execute("SELECT probability FROM study_predictions WHERE subset = 'external'")]
        others = cohort_studies(db, OTHER)
        pixels = [pixelstore.decode_pixels(b) for (b,) in db.execute(
            f"SELECT pixels FROM images WHERE study_id IN ({','.join('?' * len(others))}) ORDER BY id", others)]
        test_labels = reference_labels(db, test_ids)
    internal, outside = shift["internal"], shift["external"]
    assert internal["sizes"] == {"1024x256": 2 * len(test_ids)} and outside["sizes"] == {"896x224": 12}
    assert internal["n_studies"] == len(test_ids) and outside["n_studies"] == 6
    assert internal["prevalence"] == pytest.approx(np.mean(list(test_labels.values())), abs=1e-4)
    assert outside["mean_probability"] == pytest.approx(np.mean(probabilities), abs=1e-4)
    scaled = np.concatenate([np.clip(p[::4, ::4].astype(float) / np.percentile(p, 99.5), 0, 1).ravel() for p in pixels])
    expected = np.histogram(scaled, bins=np.asarray(shift["bins"]))[0] / scaled.size
    np.testing.assert_allclose(outside["histogram"], expected, atol=2e-3)
    assert sum(internal["histogram"]) == pytest.approx(1.0, abs=1e-4)
    figures = plots.shift_figures(shift)
    assert set(figures) == {"intensity", "sizes", "summary"}
    traces = figures["intensity"].data
    assert [t.name for t in traces] == ["internal (test set)", f"external ({OTHER})"]


def test_no_prediction_on_a_cohort_says_how_to_make_them(db_file):
    with dbm.opened(db_file) as db, pytest.raises(errors.NotFound, match=f"bonescan predict 1 --cohort {OTHER}"):
        external.evaluate_cohort(db, 1, OTHER)


# --- the Evaluate page --------------------------------------------------------------------------

def test_evaluate_page_predicts_a_cohort_and_validates_on_it_with_the_shift_panel(db_file, monkeypatch):
    monkeypatch.setenv("BONESCAN_AUTOSTART_WORKER", "0")  # the test runs the worker itself
    app = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=180)
    app.query_params["reviewer"] = "ann"
    app.run()
    app.switch_page("app_pages/evaluate.py").run()
    assert not app.exception, [e.value for e in app.exception]
    app.selectbox(key="pr_target").set_value(OTHER).run()
    app.button(key="pr_start").click().run()
    assert not app.exception, [e.value for e in app.exception]
    assert any("Prediction job 1 queued" in s.value for s in app.success)
    assert any(b.key == "pr_cancel_1" for b in app.button)  # a queued job can be cancelled
    assert jobs.run_worker(db_file, once=True, poll_s=0.1, echo=lambda line: None) == 1

    app.run()
    assert any(c.value.startswith(f"Prediction job 1 · cohort {OTHER} · 6 studies · done") for c in app.caption)
    app.selectbox(key="ev_cohort").set_value(OTHER).run()
    assert not app.exception, [e.value for e in app.exception]
    with dbm.opened(db_file) as db:
        threshold = runs.get(db, 1).threshold
    assert any(c.value.startswith(f"Cohort {OTHER} (external): 12 images, 6 studies, 6 patients; 0 unlabelled studies "
                                  f"left out. Thresholds chosen on the run's validation set: image {threshold:.3f}")
               for c in app.caption)
    titles = [json.loads(chart.proto.spec)["layout"]["title"]["text"] for chart in app.get("plotly_chart")]
    assert "Intensity histograms" in titles and "Image sizes" in titles
    (line,) = [m.value for m in app.markdown if m.value.startswith(f"**Calibration on cohort {OTHER}**")]
    assert f"Cohort {OTHER} studies (n = 6)" in line and "Test studies" not in line


def test_a_run_without_stored_study_rows_keeps_its_test_studies_after_predicting(db_file):
    """Runs trained before study rows were stored (made so here) get study rows for
    ``external`` only: their test studies must still come from their image rows."""
    with dbm.opened(db_file) as db:
        test_ids = sorted(s for s, subset in split_studies(db).items() if subset == "test")
        with dbm.write(db):  # as a run trained before study rows were stored
            db.execute("DELETE FROM study_predictions WHERE run_id = 1")
        prediction.predict_studies(db, db_file, runs.get(db, 1), cohort_studies(db, OTHER)[:2])
        assert runs.study_predictions(db, 1, "test")["study_id"].tolist() == test_ids
        every = runs.study_predictions(db, 1)
    assert every["subset"].tolist() == ["val"] * (len(every["subset"]) - len(test_ids) - 2) + ["test"] * len(test_ids) + ["external"] * 2


def test_assisted_reading_predicts_a_study_on_demand_and_never_explains_a_training_study(db_file):
    """The Review page's "Predict this study" (``assist.predict_study``): an unseen study gets an
    external prediction and its maps; a training study is refused, and gets no overlay."""
    from bonescan_core import assist, catalog

    with dbm.opened(db_file) as db:
        study = cohort_studies(db, OTHER)[0]
        assert assist.opinion(db, 1, study).status == "not_predicted"
        opinion = assist.predict_study(db, db_file, 1, study)
        assert (opinion.status, opinion.subset) == ("out_of_sample", "external")
        stored = runs.study_predictions(db, 1, "external")
        assert opinion.probability == pytest.approx(float(stored["probability"][list(stored["study_id"]).index(study)]))
        overlays = assist.study_overlays(db, db_file, 1, study, catalog.study_images(db, study))
        assert len(overlays) == 2 and all(o.probability is not None and o.rgb.dtype == np.uint8 for o in overlays)
        train_study = next(s for s, subset in split_studies(db).items() if subset == "train")
        with pytest.raises(prediction.InSplitError):
            assist.predict_study(db, db_file, 1, train_study)
        assert assist.opinion(db, 1, train_study).status == "trained"
        with pytest.raises(errors.InputError, match="trained run 1"):
            assist.study_overlays(db, db_file, 1, train_study, catalog.study_images(db, train_study))
