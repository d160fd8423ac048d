"""The run store: typed runs (settings apart from results), the migration that separates them in
old databases, stored results and predictions, and the runs folder keyed by database."""

from __future__ import annotations

import json
import sqlite3

import pytest
from conftest import add_bare_studies

from bonescan_core import db as dbm
from bonescan_core import errors, jobs, runs

SETTINGS = runs.TrainConfig(backbone="densenet121", weights="none", mode="fast", epochs=3, image_size=(64, 32), split_id=None)
FACTS = {"split_id": 1, "labels_hash": "ab12", "n_train": 20, "versions": {"keras": "3.14"}, "device": "CPU",
         "notes": ["weights none"], "phase_epochs": {"head": 3}}


def add_split(db) -> None:
    """Split 1 (the runs' split_id refers to it)."""
    with dbm.write(db):
        db["splits"].insert({"id": 1, "seed": 0, "test_fraction": 0.3, "val_fraction": 0.15, "labels_hash": "ab12",
                             "created_at": dbm.utc_now()})


def test_an_old_database_keeps_its_runs_with_settings_and_results_apart(tmp_path, monkeypatch):
    """Before 004 the worker merged what training learned into ``runs.config``; the migration
    moves those facts to ``runs.results`` and the run reads back as before."""
    path = tmp_path / "old.db"
    # A run of that time had only the settings of that time (newer ones read back as their defaults).
    old_settings = {key: value for key, value in SETTINGS.to_dict().items() if key in dbm._SETTING_NAMES_008}
    mixed = {**old_settings, **FACTS}
    with monkeypatch.context() as patch:
        patch.setattr(dbm, "MIGRATIONS", [m for m in dbm.MIGRATIONS if m[0] < "004"])
        with dbm.opened(path) as old:
            add_split(old)
            assert "results" not in old["runs"].columns_dict
            with dbm.write(old):
                old["runs"].insert({"backbone": "densenet121", "status": "done", "config": json.dumps(mixed),
                                    "config_hash": "x", "split_id": 1, "created_at": dbm.utc_now(), "threshold": 0.42,
                                    "device": "CPU", "weights_path": "run-1/model.keras", "weights_sha256": "0" * 64})
    with dbm.opened(path) as db:
        assert "008_run_results" in {row[0] for row in db.execute("SELECT name FROM _migrations")}
        stored = json.loads(db.execute("SELECT config FROM runs").fetchone()[0])
        assert set(stored) == set(old_settings), "settings only in runs.config"
        run = runs.get(db, 1)
    assert run.settings == runs.TrainConfig.from_json({**SETTINGS.to_dict(), "split_id": 1})  # it was merged over
    assert run.results.facts == FACTS
    # What `runs --json`, the report and a bundle show: unchanged, settings added since at their defaults.
    assert run.config_record() == {**SETTINGS.to_dict(), **FACTS}
    assert (run.threshold, run.results.weights_path, run.split_id) == (0.42, "run-1/model.keras", 1)
    # The old run's model is still looked for where its row says, under runs/.
    assert runs.weights_file(path, run) == tmp_path / "runs" / "run-1" / "model.keras"


def test_a_finished_runs_result_and_predictions_are_stored_and_read_typed(db_path, db, tmp_path):
    study_a, study_b = add_bare_studies(db, 2)
    add_split(db)
    with dbm.write(db):
        images = [db["images"].insert({"study_id": study, "view": view, "source": "x", "format": "png", "height": 1,
                                       "width": 1, "dtype": "uint16", "pixels": b"", "pixel_sha256": f"{study}{view}",
                                       "thumbnail": b"", "display_max": 1.0, "created_at": dbm.utc_now()}).last_pk
                  for study, view in ((study_a, "anterior"), (study_b, "anterior"), (study_b, "posterior"))]
    run_id = jobs.enqueue(db, SETTINGS.backbone, SETTINGS.to_dict(), SETTINGS.identity_hash())
    result = runs.RunResult(
        threshold=0.3, images_per_second=12.5, model_file=runs.model_file(db_path, run_id), weights_sha256="f" * 64,
        device="CPU", facts=FACTS, predictions=(runs.Prediction(images[2], "test", 1, 0.9), runs.Prediction(images[0], "val", 0, 0.2),
                                                runs.Prediction(images[1], "test", 1, 0.6)))
    runs.record_result(db, db_path, run_id, result)
    runs.finish(db, run_id, "done")
    run = runs.get(db, run_id)
    assert (run.status, run.threshold, run.results.images_per_second, run.split_id) == ("done", 0.3, 12.5, 1)
    assert run.settings == SETTINGS and run.results.facts == FACTS
    assert runs.weights_file(db_path, run) == runs.model_file(db_path, run_id)
    test = runs.predictions(db, run_id, "test")
    assert test["image_id"].tolist() == [images[1], images[2]] and test["probability"].tolist() == [0.6, 0.9]
    every = runs.predictions(db, run_id)
    assert list(zip(every["subset"].tolist(), every["image_id"].tolist(), strict=True)) == [
        ("val", images[0]), ("test", images[1]), ("test", images[2])]
    assert runs.studies_by_margin(db, run_id) == [study_a, study_b]  # |0.2 - 0.3| < |0.6 - 0.3|
    # No study rows stored: each study's images collapse to one row (max over views, or mean).
    by_max = runs.study_predictions(db, run_id)
    assert by_max["study_id"].tolist() == [study_a, study_b] and by_max["subset"].tolist() == ["val", "test"]
    assert by_max["probability"].tolist() == [0.2, 0.9] and by_max["label"].tolist() == [0.0, 1.0]
    assert runs.study_predictions(db, run_id, "test", aggregate="mean")["probability"].tolist() == [pytest.approx(0.75)]
    # Stored study rows win (a run that sees a study whole stores its one output once).
    with dbm.write(db):
        db["study_predictions"].insert_all([
            {"run_id": run_id, "study_id": study_a, "subset": "val", "label": 0, "probability": 0.25, "raw_probability": 0.1},
            {"run_id": run_id, "study_id": study_b, "subset": "test", "label": 1, "probability": 0.7}])
    stored = runs.study_predictions(db, run_id)
    assert stored["probability"].tolist() == [0.25, 0.7] and stored["raw_probability"].tolist() == [0.1, 0.7]
    with pytest.raises(errors.RunNotFound, match="run 99 does not exist"):
        runs.get(db, 99)
    with pytest.raises(errors.RunNotFound):
        runs.predictions(db, 99)


def test_each_database_has_its_own_runs_folder(tmp_path):
    first, second = tmp_path / "labels.db", tmp_path / "labels.sqlite"  # same folder, even the same stem
    assert runs.run_folder(first).parent == runs.run_folder(second).parent == tmp_path / "runs"
    assert runs.run_folder(first) != runs.run_folder(second)
    assert runs.run_folder(first).name.startswith("labels-")
    assert runs.model_file(first, 1) != runs.model_file(second, 1)
    assert runs.stored_path(first, runs.model_file(first, 1)) == f"{runs.run_folder(first).name}/run-1/model.keras"


def test_a_stored_model_path_outside_runs_is_refused(db_path, db):
    run_id = jobs.enqueue(db, SETTINGS.backbone, SETTINGS.to_dict(), SETTINGS.identity_hash())
    with dbm.write(db):
        db["runs"].update(run_id, {"status": "done", "weights_path": "../../elsewhere/model.keras"})
    with pytest.raises(runs.ModelUnavailable, match="points outside"):
        runs.weights_file(db_path, runs.get(db, run_id))


def test_predictions_stored_before_010_survive_its_rebuild_and_external_ones_may_lack_a_label(tmp_path, monkeypatch):
    """010 rebuilds ``predictions`` to admit subset ``external`` (label NULL allowed there only)
    and a ``raw_probability``; rows stored before it are kept as they were."""
    path = tmp_path / "old.db"
    with monkeypatch.context() as patch:
        patch.setattr(dbm, "MIGRATIONS", [m for m in dbm.MIGRATIONS if m[0] < "010"])
        with dbm.opened(path) as old:
            (study,) = add_bare_studies(old, 1)
            add_split(old)
            with dbm.write(old):
                image = old["images"].insert({"study_id": study, "view": "anterior", "source": "x", "format": "png",
                                              "height": 1, "width": 1, "dtype": "uint16", "pixels": b"",
                                              "pixel_sha256": "a", "thumbnail": b"", "display_max": 1.0,
                                              "created_at": dbm.utc_now()}).last_pk
                old["runs"].insert({"backbone": "densenet121", "status": "done", "config": SETTINGS.to_json(),
                                    "config_hash": "x", "split_id": 1, "created_at": dbm.utc_now()})
                old["predictions"].insert({"run_id": 1, "image_id": image, "subset": "test", "label": 1,
                                           "probability": 0.75})
    with dbm.opened(path) as db:
        assert [tuple(row) for row in db.execute("SELECT * FROM predictions")] == [(1, image, "test", 1, 0.75, None)]
        with dbm.write(db):
            db["study_predictions"].insert({"run_id": 1, "study_id": study, "subset": "external", "label": None,
                                            "probability": 0.5})
            db.execute("DELETE FROM study_predictions")
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"), dbm.write(db):
            db["study_predictions"].insert({"run_id": 1, "study_id": study, "subset": "test", "label": None,
                                            "probability": 0.5})
