"""Calibration (issue 11, point 3): fitted on validation only, applied to validation and test, thresholds
chosen after it; reported on test studies in `evaluate --json`; class weights off by default."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, tiny_run
from streamlit.testing.v1 import AppTest

from bonescan_core import assessment, calibration, cli, evaluation, plots, runs, splits, studystats, training
from bonescan_core import db as dbm
from bonescan_core.ingest import add_demo_studies

SIZE = (64, 32)
TINY = tiny_run(image_size=SIZE, learning_rate=1e-4)


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


def overconfident(n: int, seed: int, factor: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """(labels, raw probabilities) whose true log-odds are z but the model says factor * z."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, n)
    y = (rng.random(n) < sigmoid(z)).astype(int)
    return y, sigmoid(factor * z)


# --- fitting -------------------------------------------------------------------------------

def test_temperature_is_fitted_on_the_labels_given_and_softens_an_overconfident_model():
    y, raw = overconfident(4000, seed=1)
    fitted, note = calibration.fit("temperature", y, raw)
    assert note is None and fitted["method"] == "temperature"
    assert fitted["temperature"] == pytest.approx(studystats.fit_temperature(y, studystats.logit(raw)))
    assert fitted["temperature"] == pytest.approx(3.0, abs=0.3)  # the factor that made it overconfident
    calibrated = studystats.apply_calibration(fitted, raw)
    assert studystats.ece_equal_mass(y, calibrated)["ece"] < studystats.ece_equal_mass(y, raw)["ece"] / 2


def test_platt_removes_the_log_odds_shift_of_class_weights():
    rng = np.random.default_rng(2)
    z = rng.normal(0.0, 1.5, 4000)
    y = (rng.random(z.size) < sigmoid(z)).astype(int)
    fitted, note = calibration.fit("platt", y, sigmoid(z + np.log(1.5)))  # weights 1.5 : 1 shift the logit
    assert note is None and fitted["method"] == "platt"
    assert fitted["intercept"] == pytest.approx(-np.log(1.5), abs=0.12)
    assert fitted["slope"] == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize(("labels", "raw", "reason"), [
    ([1, 1, 1, 1], [0.2, 0.4, 0.6, 0.8], "one class"),
    ([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9], "separates the validation classes completely"),
])
@pytest.mark.parametrize("method", ["temperature", "platt"])
def test_degenerate_validation_falls_back_to_none_with_a_note(method, labels, raw, reason):
    fitted, note = calibration.fit(method, labels, raw)
    assert fitted == {"method": "none", "requested": method}
    assert reason in note
    assert np.array_equal(studystats.apply_calibration(fitted, raw), raw)


def test_none_is_the_identity_and_an_unknown_method_is_refused():
    assert calibration.fit("none", [0, 1], [0.3, 0.6]) == ({"method": "none"}, None)
    with pytest.raises(Exception, match="calibration must be one of"):
        calibration.fit("isotonic", [0, 1], [0.3, 0.6])
    with pytest.raises(Exception, match="calibration must be one of"):
        training.TrainConfig(backbone="vgg19", calibration="isotonic")


def test_class_weights_are_off_by_default_and_an_option():
    assert training.TrainConfig(backbone="vgg19").class_weights is False
    args = cli.build_parser().parse_args(["train", "--backbone", "vgg19", "--class-weights", "--calibration", "platt",
                                          "--deterministic"])
    config = cli.train_config(args)
    assert (config.class_weights, config.calibration, config.deterministic) == (True, "platt", True)
    plain = cli.train_config(cli.build_parser().parse_args(["train", "--backbone", "vgg19"]))
    assert (plain.class_weights, plain.calibration, plain.deterministic) == (False, "temperature", False)


# --- reporting ----------------------------------------------------------------------------

def test_summary_is_studystats_on_the_given_rows():
    y, raw = overconfident(300, seed=3)
    stored = {"method": "temperature", "temperature": 2.5}
    calibrated = studystats.apply_calibration(stored, raw)
    out = calibration.summary(y, calibrated, raw, stored)
    fitted = studystats.calibration_intercept_slope(y, calibrated)
    assert out["method"] == "temperature" and out["temperature"] == 2.5 and out["n"] == 300
    assert out["ece"] == pytest.approx(studystats.ece_equal_mass(y, calibrated)["ece"], abs=1e-4)
    assert out["ece_raw"] == pytest.approx(studystats.ece_equal_mass(y, raw)["ece"], abs=1e-4)
    assert out["slope"] == pytest.approx(fitted["slope"]["value"], abs=1e-4)
    assert out["intercept_ci95"] == pytest.approx(list(fitted["intercept"]["ci95"]), abs=1e-4)
    assert out["slope_ci95"][0] < out["slope"] < out["slope_ci95"][1]
    json.dumps(out)


def insert_run(db, calibration_record: dict | None, seed: int = 0) -> tuple[int, dict[int, tuple[int, float, float]]]:
    """A done run over every demo image on the test subset: views of a study get different raw
    probabilities; stored probability = apply_calibration(record, raw). Returns (run id,
    {study_id: (label, max calibrated, max raw)})."""
    rng = np.random.default_rng(seed)
    images = db.execute("SELECT id, study_id FROM images ORDER BY id").fetchall()
    label = {s: int(rng.random() < 0.4) for s in sorted({s for _, s in images})}
    with dbm.write(db):
        run_id = db["runs"].insert({
            "backbone": "vgg19", "status": "done", "config": json.dumps({"backbone": "vgg19"}), "config_hash": f"t{seed}",
            "created_at": dbm.utc_now(), "threshold": 0.5,
            "results": json.dumps({"calibration": calibration_record} if calibration_record else {}),
        }).last_pk
        rows, studies = [], {}
        for image_id, study_id in images:
            raw = float(np.clip(rng.normal(0.75 if label[study_id] else 0.3, 0.25), 0.001, 0.999))
            p = float(studystats.apply_calibration(calibration_record, [raw])[0])
            rows.append({"run_id": run_id, "image_id": image_id, "subset": "test", "label": label[study_id],
                         "probability": p, "raw_probability": raw if calibration_record else None})
            old = studies.get(study_id, (label[study_id], 0.0, 0.0))
            studies[study_id] = (label[study_id], max(old[1], p), max(old[2], raw))
        db["predictions"].insert_all(rows)
    return run_id, studies


@pytest.fixture
def demo_db(db):
    add_demo_studies(db, 40, seed=7)
    return db


def test_evaluate_reports_calibration_on_test_studies_not_images(demo_db, capsys):
    stored = {"method": "temperature", "temperature": 0.6}
    run_id, studies = insert_run(demo_db, stored)
    y = np.array([v[0] for v in studies.values()])
    p, raw = np.array([v[1] for v in studies.values()]), np.array([v[2] for v in studies.values()])
    out = assessment.evaluate(demo_db, run_id).as_json()["calibration"]
    assert evaluation.evaluate(demo_db, run_id).calibration is None  # assessment adds it
    assert out["n"] == 40  # studies: the 80 images collapse to one row each
    assert out["method"] == "temperature" and out["temperature"] == 0.6 and out["fitted"] == stored
    assert out["ece"] == pytest.approx(studystats.ece_equal_mass(y, p)["ece"], abs=1e-4)
    assert out["ece_raw"] == pytest.approx(studystats.ece_equal_mass(y, raw)["ece"], abs=1e-4)
    assert out["slope"] == pytest.approx(studystats.calibration_intercept_slope(y, p)["slope"]["value"], abs=1e-4)
    assert {"ece", "intercept", "slope", "temperature", "intercept_ci95", "slope_ci95", "method"} <= set(out)


def test_evaluate_json_on_the_command_line_carries_calibration(demo_db, db_path, capsys):
    run_id, _ = insert_run(demo_db, None)
    assert cli.main(["--db", str(db_path), "evaluate", str(run_id), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["calibration"]
    assert out["method"] == "none" and out["temperature"] is None and out["ece"] == out["ece_raw"]


def test_reliability_and_decision_curve_figures(demo_db):
    run_id, studies = insert_run(demo_db, {"method": "temperature", "temperature": 2.0})
    curves = calibration.run_curves(demo_db, run_id)
    assert curves["n_studies"] == 40
    reliability = plots.reliability_before_after(curves["reliability"])
    names = [trace.name for trace in reliability.data]
    assert names[0] == "Perfectly calibrated" and names[1].startswith("Before calibration") and names[2].startswith("After")
    assert sum(curves["reliability"]["raw"]["count"]) == 40  # equal-mass bins of studies
    y = np.array([v[0] for v in studies.values()])
    decision = plots.decision_curve_figure(curves["decision"])
    model, treat_all, treat_none = decision.data
    assert (model.name, treat_all.name, treat_none.name) == ("Model", "Treat all", "Treat none")
    t = 0.2
    index = int(np.argmin(np.abs(np.asarray(model.x) - t)))
    p = np.array([v[1] for v in studies.values()])
    tp, fp = int(((p >= t) & (y == 1)).sum()), int(((p >= t) & (y == 0)).sum())
    assert model.y[index] == pytest.approx(tp / 40 - fp / 40 * t / (1 - t))
    assert treat_all.y[index] == pytest.approx(y.mean() - (1 - y.mean()) * t / (1 - t))
    assert set(treat_none.y) == {0.0}


# --- training ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "labels.db"
    with dbm.opened(path) as db:
        add_demo_studies(db, 24, seed=0)
    return path


def designed_raw(labels: np.ndarray) -> np.ndarray:
    """Over-confident, overlapping raw outputs: positives mostly 0.95, negatives mostly 0.05, every third one swapped to the middle."""
    raw = np.where(labels == 1, 0.95, 0.05)
    positives, negatives = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    raw[positives[::3]] = 0.4
    raw[negatives[::3]] = 0.6
    return raw


@pytest.mark.slow
def test_training_calibrates_on_validation_then_thresholds_on_calibrated_probabilities(train_file, tmp_path, monkeypatch):
    path = tmp_path / "train.db"
    shutil.copy(train_file, path)
    seen = {}

    def predict(keras, model, config, data, subsets, tracker, workers):
        # The model's real outputs are replaced by designed ones (a tiny net barely learns): the wiring is under test.
        seen.update({subset: designed_raw(data.labels[subset]) for subset in subsets})
        seen["val_labels"] = data.labels["val"]
        return {subset: seen[subset] for subset in subsets}

    monkeypatch.setattr(training, "_predict_images", predict)
    with dbm.opened(path) as db:
        split_id = splits.make_split(db, seed=0, test=0.3, val=0.4)
        config = dataclasses.replace(TINY, split_id=split_id)
        with dbm.write(db):
            run_id = db["runs"].insert({"backbone": "vgg19", "status": "running", "config": config.to_json(),
                                        "config_hash": config.identity_hash(), "created_at": dbm.utc_now()}).last_pk
        result = training.train_run(db, config, training.NullReporter(), runs.model_file(path, run_id))
        runs.record_result(db, path, run_id, result)
        rows = db.execute("SELECT subset, label, probability, raw_probability FROM predictions WHERE run_id = ? ORDER BY image_id",
                          [run_id]).fetchall()
        run = runs.get(db, run_id)
        labels_hash = splits.split_info(db, split_id)["labels_hash"]

    y_val = seen["val_labels"]
    assert (y_val == 1).sum() >= 2 and (y_val == 0).sum() >= 2
    expected_t = studystats.fit_temperature(y_val, studystats.logit(seen["val"]))  # on validation only
    record = result.facts["calibration"]
    assert record == {"method": "temperature", "temperature": pytest.approx(expected_t)}
    assert run.results.facts["calibration"] == record and result.facts["class_weights"] is None
    raw = np.array([r[3] for r in rows])
    assert set(np.round(raw, 6)) <= {0.95, 0.05, 0.4, 0.6}
    np.testing.assert_allclose([r[2] for r in rows], studystats.apply_calibration(record, raw), atol=1e-12)
    val = [(r[1], r[2], r[3]) for r in rows if r[0] == "val"]
    calibrated_val = np.array([v[1] for v in val])
    # The threshold was chosen on the calibrated validation probabilities (one of them), not on the raw outputs.
    assert result.threshold == pytest.approx(evaluation.youden_threshold(np.array([v[0] for v in val]), calibrated_val))
    assert np.isclose(calibrated_val, result.threshold).any()
    assert not np.isclose([0.95, 0.05, 0.4, 0.6], result.threshold).any()
    record = run.to_json()["config"]["reproducibility"]  # what `runs --json` shows
    assert (record["split_id"], record["seeds"]["run"], record["weights_sha256"], record["deterministic"]) == (split_id, 0, None, False)
    assert record["labels_hash"] == labels_hash


@pytest.mark.slow
def test_a_run_asked_for_no_calibration_stores_raw_outputs_only(train_file, tmp_path, monkeypatch):
    path = tmp_path / "train.db"
    shutil.copy(train_file, path)
    monkeypatch.setattr(training, "_predict_images",
                        lambda keras, model, config, data, subsets, tracker, workers: {s: designed_raw(data.labels[s]) for s in subsets})
    with dbm.opened(path) as db:
        config = dataclasses.replace(TINY, calibration="none")
        with dbm.write(db):
            run_id = db["runs"].insert({"backbone": "vgg19", "status": "running", "config": config.to_json(),
                                        "config_hash": config.identity_hash(), "created_at": dbm.utc_now()}).last_pk
        result = training.train_run(db, config, training.NullReporter(), runs.model_file(path, run_id))
        runs.record_result(db, path, run_id, result)
        raws = {r[0] for r in db.execute("SELECT raw_probability FROM predictions WHERE run_id = ?", [run_id]).fetchall()}
    assert result.facts["calibration"] == {"method": "none"} and raws == {None}


# --- the Train page --------------------------------------------------------------------------

def test_train_page_offers_class_weights_off_and_the_calibration_method(db_path, monkeypatch):
    monkeypatch.setenv("BONESCAN_AUTOSTART_WORKER", "0")
    with dbm.opened(db_path) as db:
        add_demo_studies(db, 12, seed=4)
    app = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=120)
    app.query_params["reviewer"] = "ann"
    app.run()
    app.switch_page("app_pages/train.py").run()
    assert app.checkbox(key="tr_class_weights").value is False
    app.multiselect(key="tr_backbones").set_value(["vgg19"])
    app.checkbox(key="tr_class_weights").check()
    app.selectbox(key="tr_calibration").set_value("platt")
    app.get("form_submit_button")[0].click()
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    with dbm.opened(db_path) as db:
        (queued,) = runs.list_runs(db)
    assert (queued.settings.class_weights, queued.settings.calibration, queued.settings.deterministic) == (True, "platt", False)
