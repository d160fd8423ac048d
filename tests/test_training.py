"""Training runs end to end on tiny demo data: config, thresholds, phases, predictions, cancel, feature cache."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bonescan_core import db as dbm
from bonescan_core import errors, evaluation, heavy, jobs, models, preprocess, runs, splits, training
from bonescan_core.ingest import add_demo_studies

SIZE = (64, 32)
TINY = training.TrainConfig(backbone="vgg19", weights="none", mode="full", epochs=2, batch_size=8, image_size=SIZE,
                            learning_rate=1e-4)


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory) -> Path:
    """A database with 20 demo studies (40 images, 8 metastatic studies), made once per module."""
    path = tmp_path_factory.mktemp("demo") / "labels.db"
    with dbm.opened(path) as db:
        add_demo_studies(db, 20, seed=0)
    return path


@pytest.fixture
def demo_db(demo_file, tmp_path):
    path = tmp_path / "demo.db"  # not labels.db: that is conftest's empty `db`
    shutil.copy(demo_file, path)
    with dbm.opened(path) as db:
        yield db


class Recorder:
    """A Reporter that keeps everything it is told; cancels after ``cancel_after`` polls (if given)."""

    def __init__(self, cancel_after: int | None = None) -> None:
        self.fields: list[dict] = []
        self.epochs: list[tuple] = []
        self.polls = 0
        self.polls_after_cancel = 0
        self.cancel_after = cancel_after

    def progress(self, fields: dict) -> None:
        json.dumps(fields)  # what the worker stores must be JSON
        self.fields.append(fields)

    def epoch_done(self, epoch, phase, logs, seconds, train_images_per_second) -> None:
        self.epochs.append((epoch, phase, logs, seconds, train_images_per_second))

    def cancelled(self) -> bool:
        self.polls += 1
        if self.cancel_after is not None and self.polls > self.cancel_after:
            self.polls_after_cancel += 1
            return True
        return False


def new_run(db, config: training.TrainConfig) -> int:
    with dbm.write(db):
        return db["runs"].insert({"backbone": config.backbone, "status": "running", "config": config.to_json(),
                                  "config_hash": config.identity_hash(), "created_at": dbm.utc_now()}).last_pk


def db_file(db) -> Path:
    return Path(db.execute("PRAGMA database_list").fetchone()[2])


def train(db, run_id: int, config: training.TrainConfig, reporter) -> training.RunResult:
    """Train as the worker does: the model into the run's file, the result stored through the run store."""
    result = training.train_run(db, config, reporter, runs.model_file(db_file(db), run_id))
    runs.record_result(db, db_file(db), run_id, result)
    return result


def predictions(db, run_id: int) -> dict[int, tuple[str, int, float]]:
    """{image_id: (subset, label, the model's raw output)}: what the saved model gives, before calibration."""
    rows = db.execute("SELECT image_id, subset, label, COALESCE(raw_probability, probability) FROM predictions WHERE run_id = ?",
                      [run_id]).fetchall()
    return {image_id: (subset, label, probability) for image_id, subset, label, probability in rows}


def assert_predictions_cover_val_and_test(db, run_id: int, split_id: int) -> dict:
    stored = predictions(db, run_id)
    members = splits.split_labels(db, split_id)
    expected = {}
    for image_id, study_id in db.execute("SELECT id, study_id FROM images").fetchall():
        subset, label = members[study_id]
        if subset in ("val", "test"):
            expected[image_id] = (subset, int(label == "metastatic"))
    assert {i: (s, lab) for i, (s, lab, _) in stored.items()} == expected
    assert all(0.0 <= p <= 1.0 for _, _, p in stored.values())
    return stored


def assert_study_rows(db, run_id: int, result: training.RunResult, aggregate: str) -> None:
    """One stored study row per val/test study: its views' probabilities collapsed (max or mean),
    or a composite's one output; the study threshold chosen on those validation rows."""
    images = predictions(db, run_id)
    study_of = dict(db.execute("SELECT id, study_id FROM images").fetchall())
    views: dict[int, list[float]] = {}
    for image_id, (_, _, probability) in images.items():
        views.setdefault(study_of[image_id], []).append(probability)
    rows = db.execute("SELECT study_id, subset, label, probability FROM study_predictions WHERE run_id = ?", [run_id]).fetchall()
    assert sorted(r[0] for r in rows) == sorted(views)
    collapse = max if aggregate == "max" else (lambda values: sum(values) / len(values))
    for study_id, _, _, probability in rows:
        assert probability == pytest.approx(collapse(views[study_id]))
    thresholds = result.facts["thresholds"]
    assert thresholds["image"] == result.threshold and set(thresholds) == {"image", "study", "rule", "target"}
    val = [(label, p) for _, subset, label, p in rows if subset == "val"]
    expected = training.studystats.choose_threshold([v[0] for v in val], [v[1] for v in val], thresholds["rule"],
                                                    thresholds["target"]).value
    assert thresholds["study"] == pytest.approx(expected)


def saved_model_probabilities(db, result: training.RunResult, config: training.TrainConfig, image_ids):
    """Probabilities the saved model.keras gives the images (per-image view mode)."""
    keras = heavy.keras_module()
    path = result.model_file
    assert training.file_sha256(path) == result.weights_sha256
    model = keras.models.load_model(path)
    assert model.get_layer(models.BACKBONES[config.backbone].last_conv_layer) is not None
    samples = [preprocess.Sample(0, (i,), (None,), 0) for i in image_ids]
    images = preprocess.load_images(db, samples, config.image_size)
    return np.asarray(model.predict(preprocess.to_model_input(images, config.backbone), verbose=0)).reshape(-1)


# --- configuration ------------------------------------------------------------------------------

def test_config_round_trip_hash_and_validation():
    config = training.TrainConfig(backbone="densenet121")
    assert (config.weights, config.mode, config.epochs, config.batch_size) == ("imagenet", "finetune", 20, 16)
    assert config.image_size == (646, 220) and config.augment == preprocess.PAPER_AUGMENT
    assert training.TrainConfig.from_json(config.to_json()) == config
    stored = {**json.loads(config.to_json()), "split_id": 4, "labels_hash": "ab", "versions": {"keras": "3"}}
    assert training.TrainConfig.from_json(json.dumps(stored)) == dataclasses.replace(config, split_id=4)
    assert config.identity_hash() == training.TrainConfig(backbone="densenet121", image_size=[646, 220]).identity_hash()
    assert config.identity_hash() != dataclasses.replace(config, seed=1).identity_hash()
    assert config.identity_hash() != dataclasses.replace(config, augment={}).identity_hash()
    assert config.phase_epochs() == {"head": 10, "finetune": 10}
    assert dataclasses.replace(config, epochs=5).phase_epochs() == {"head": 3, "finetune": 2}
    assert dataclasses.replace(config, mode="full").phase_epochs() == {"full": 20}
    assert dataclasses.replace(config, mode="fast").phase_epochs() == {"head": 20}
    for bad in ({"backbone": "alexnet"}, {"mode": "sometimes"}, {"image_size": (16, 16)}, {"epochs": 0},
                {"view_mode": "stacked"}, {"augment": {"elastic": 1}}, {"threshold_rule": "max_f1"}, {"dropout": 1.0},
                {"threshold_rule": "sensitivity"}, {"threshold_rule": "youden", "threshold_target": 0.9},
                {"threshold_rule": "npv", "threshold_target": 1.5}, {"study_aggregate": "median"}):
        with pytest.raises(ValueError, match="bad training config"):
            training.TrainConfig(**{"backbone": "vgg19", **bad})


def test_class_weights_balance_a_40_60_split():
    weights = training.class_weights_for(np.array([0] * 60 + [1] * 40))
    assert weights == pytest.approx({0: 100 / 120, 1: 100 / 80})
    assert 60 * weights[0] == pytest.approx(40 * weights[1])


def test_thresholds_youden_on_a_constructed_example_and_fixed():
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    probabilities = np.array([0.05, 0.10, 0.20, 0.30, 0.35, 0.65, 0.50, 0.70, 0.80, 0.90])
    # At 0.50: sensitivity 1, specificity 5/6 (J = 0.83); at 0.70: 3/4 and 1 (J = 0.75); others lower.
    chosen = training.run_thresholds(TINY, labels, probabilities, labels, probabilities)
    assert chosen == {"image": pytest.approx(0.50), "study": pytest.approx(0.50), "rule": "youden", "target": None}
    fixed = dataclasses.replace(TINY, threshold_rule="fixed")
    assert training.run_thresholds(fixed, labels, probabilities, labels, probabilities)["image"] == 0.5
    assert not hasattr(training, "choose_threshold")  # one implementation: studystats.choose_threshold


# --- runs ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_finetune_run_stores_predictions_for_every_val_and_test_image(demo_db, tmp_path):
    config = dataclasses.replace(TINY, mode="finetune", epochs=3)
    run_id = new_run(demo_db, config)
    reporter = Recorder()
    result = train(demo_db, run_id, config, reporter)

    split_id = result.facts["split_id"]
    assert demo_db.execute("SELECT split_id FROM runs WHERE id = ?", [run_id]).fetchone()[0] == split_id
    assert split_id == splits.latest_split(demo_db, seed=0)
    stored = assert_predictions_cover_val_and_test(demo_db, run_id, split_id)
    extra = result.facts
    assert (extra["n_val"], extra["n_test"]) == (sum(s == "val" for s, _, _ in stored.values()),
                                                 sum(s == "test" for s, _, _ in stored.values()))
    assert extra["n_train"] + extra["n_val"] + extra["n_test"] == 40
    assert extra["phase_epochs"] == {"head": 2, "finetune": 1}
    assert [(e[0], e[1]) for e in reporter.epochs] == [(1, "head"), (2, "head"), (3, "finetune")]
    assert all({"loss", "val_loss", "accuracy", "auc"} <= set(e[2]) and e[3] > 0 and e[4] > 0 for e in reporter.epochs)
    assert {"preparing", "loading", "head", "finetune", "predicting", "saving"} <= {f["phase"] for f in reporter.fields}
    batch_fields = [f for f in reporter.fields if f["phase"] in ("head", "finetune") and f.get("batch")]
    assert batch_fields and {"epoch", "epochs", "batch", "batches", "loss", "metrics", "eta_s"} <= set(batch_fields[-1])
    assert extra["notes"] and "weights none" in extra["notes"][0]
    assert extra["versions"]["keras"] and extra["backend"] in ("tensorflow", "jax", "torch")
    assert result.device and 0.0 <= result.threshold <= 1.0 and result.images_per_second > 0
    assert result.model_file == runs.model_file(db_file(demo_db), run_id)
    assert runs.get(demo_db, run_id).results.weights_path == result.model_file.relative_to(runs.runs_root(db_file(demo_db))).as_posix()
    test_ids = sorted(i for i, (s, _, _) in stored.items() if s == "test")
    again = saved_model_probabilities(demo_db, result, config, test_ids)
    np.testing.assert_allclose(again, [stored[i][2] for i in test_ids], atol=1e-4)
    assert not list(result.model_file.parent.glob(".model-*")), "no temporary file left behind"


@pytest.mark.slow
def test_cancel_stops_within_a_few_batches(demo_db, tmp_path):
    config = dataclasses.replace(TINY, epochs=20, batch_size=4)
    run_id = new_run(demo_db, config)
    reporter = Recorder(cancel_after=6)  # a few loading polls, then training batches
    with pytest.raises(training.TrainingCancelled):
        train(demo_db, run_id, config, reporter)
    assert reporter.polls_after_cancel <= 2, "it must stop at the first poll that says cancel"
    assert len(reporter.epochs) <= 1
    assert predictions(demo_db, run_id) == {}
    assert not runs.model_file(db_file(demo_db), run_id).exists()


@pytest.mark.slow
def test_fast_mode_caches_features_and_a_rerun_reuses_them(demo_db, tmp_path, monkeypatch):
    config = dataclasses.replace(TINY, mode="fast", epochs=4, study_aggregate="mean")
    first_id = new_run(demo_db, config)
    first = train(demo_db, first_id, config, Recorder())
    assert_study_rows(demo_db, first_id, first, "mean")
    rows = demo_db.execute("SELECT COUNT(*) FROM features WHERE backbone = 'vgg19' AND weights = 'none'").fetchone()[0]
    assert rows == 40 and first.facts["features_computed"] == 40
    vector = demo_db.execute("SELECT vector FROM features LIMIT 1").fetchone()[0]
    assert len(vector) == 512 * 2  # float16

    def no_pixels(*args, **kwargs):
        raise AssertionError("a cached re-run must not decode pixels")

    monkeypatch.setattr(preprocess, "load_images", no_pixels)
    rerun = dataclasses.replace(config, seed=1, dropout=0.5, threshold_rule="fixed", split_id=first.facts["split_id"])
    run_id = new_run(demo_db, rerun)
    reporter = Recorder()
    second = train(demo_db, run_id, rerun, reporter)  # its time: bench/fast_mode.py
    assert second.facts["features_cached"] == 40 and second.facts["features_computed"] == 0
    assert "features" not in {f["phase"] for f in reporter.fields}
    assert demo_db.execute("SELECT COUNT(*) FROM features").fetchone()[0] == 40
    assert second.threshold == 0.5 and second.facts["split_id"] == first.facts["split_id"]
    assert second.facts["thresholds"] == {"image": 0.5, "study": 0.5, "rule": "fixed", "target": None}
    monkeypatch.undo()

    # The trained head was copied into a full model: the saved model gives the stored probabilities.
    stored = assert_predictions_cover_val_and_test(demo_db, run_id, second.facts["split_id"])
    ids = sorted(stored)
    np.testing.assert_allclose(saved_model_probabilities(demo_db, second, rerun, ids), [stored[i][2] for i in ids],
                               atol=2e-3)  # the features were cached as float16


@pytest.mark.slow
def test_composite_fast_run_predicts_each_study_once_for_both_images(demo_db, tmp_path):
    config = dataclasses.replace(TINY, mode="fast", epochs=2, view_mode="composite")
    run_id = new_run(demo_db, config)
    result = train(demo_db, run_id, config, Recorder())
    assert result.facts["sample_unit"] == "study"
    assert result.facts["n_train"] + result.facts["n_val"] + result.facts["n_test"] == 20
    stored = assert_predictions_cover_val_and_test(demo_db, run_id, result.facts["split_id"])
    by_study: dict[int, set[float]] = {}
    for image_id, study_id in demo_db.execute("SELECT id, study_id FROM images").fetchall():
        if image_id in stored:
            by_study.setdefault(study_id, set()).add(stored[image_id][2])
    assert all(len(p) == 1 for p in by_study.values())
    assert_study_rows(demo_db, run_id, result, "max")  # one output per study, stored once
    assert demo_db.execute("SELECT COUNT(*) FROM features WHERE weights = 'none#composite'").fetchone()[0] == 20


def test_run_errors_say_what_to_do(db, tmp_path):
    with pytest.raises(splits.SplitError, match="0 metastatic and 0 non-metastatic"):  # the empty database: nothing labelled
        training.train_run(db, TINY, training.NullReporter(), tmp_path / "model.keras")
    with pytest.raises(errors.RunNotFound, match="run 99 does not exist"):
        runs.record_result(db, db_file(db), 99, runs.RunResult(0.5, 1.0, tmp_path / "runs" / "m.keras", "", "CPU", (), {}))


def test_runs_of_two_databases_in_one_folder_keep_their_own_models(demo_file, tmp_path):
    """Each database numbers its runs from 1; their models must not share ``runs/run-1``."""
    config = dataclasses.replace(TINY, mode="fast", epochs=1)
    paths = [tmp_path / "first.db", tmp_path / "second.db"]
    for path in paths:
        shutil.copy(demo_file, path)
        with dbm.opened(path) as db:
            assert jobs.enqueue(db, config.backbone, config.to_dict(), config.identity_hash()) == 1
    for path in paths:
        assert jobs.run_worker(path, once=True, echo=lambda line: None) == 1
    files = []
    for path in paths:
        with dbm.opened(path) as db:
            run = runs.get(db, 1)
        assert run.status == "done", run.error
        files.append(runs.weights_file(path, run))
        assert training.file_sha256(files[-1]) == run.results.weights_sha256, f"{path.name}'s model was overwritten"
        runs.load_model(path, run)  # loads: the checksum matches
    assert files[0] != files[1] and all(file.is_relative_to(tmp_path / "runs") for file in files)


# --- issue 12: BatchNorm from scratch, fine-tuning that never ends worse, learning-rate schedules ----------

@pytest.mark.slow
def test_densenet121_from_scratch_learns_instead_of_predicting_one_value(tmp_path):
    # The configuration measured in docs/benchmarks.md: without re-estimated BatchNorm statistics
    # every validation image got 0.454-0.455 (std 0.0003, val AUC 0.46); with them std 0.18,
    # val AUC 0.81. (Smaller ones are too few images for a validation AUC.)
    path = tmp_path / "demo60.db"
    with dbm.opened(path) as db:
        add_demo_studies(db, 60, seed=0)
        config = training.TrainConfig(backbone="densenet121", weights="none", mode="full", epochs=4, batch_size=16,
                                      image_size=(128, 64), augment={}, patience=4, seed=0)
        result = training.train_run(db, config, Recorder(), tmp_path / "model.keras")
    val = [(p.label, p.probability) for p in result.predictions if p.subset == "val"]
    labels, probabilities = (np.array(column) for column in zip(*val, strict=True))
    assert probabilities.std() > 0.05, probabilities
    assert evaluation.point_metrics(labels, probabilities, 0.5)["auc"] > 0.65


def test_finetuning_that_ends_worse_than_its_head_phase_keeps_the_head_weights(demo_db, tmp_path):
    # A fine-tuning rate far too high: fine-tuning cannot improve on the head phase's val_loss.
    config = dataclasses.replace(TINY, mode="finetune", epochs=3, weights="none", finetune_learning_rate=50.0, patience=3)
    reporter = Recorder()
    result = training.train_run(demo_db, config, reporter, tmp_path / "model.keras")
    head_best = min(logs["val_loss"] for _, phase, logs, _, _ in reporter.epochs if phase == "head")
    assert any("fine-tuning did not improve on the head phase" in note for note in result.facts["notes"])
    val = [(p.label, p.probability) for p in result.predictions if p.subset == "val"]
    labels, probabilities = (np.array(column, dtype=np.float64) for column in zip(*val, strict=True))
    clipped = np.clip(probabilities, 1e-7, 1 - 1e-7)
    loss = float(-np.mean(labels * np.log(clipped) + (1 - labels) * np.log(1 - clipped)))
    assert loss == pytest.approx(head_best, rel=1e-3), "the kept weights are the head phase's best"


def test_full_from_pretrained_weights_trains_at_the_finetuning_rate():
    full = dataclasses.replace(TINY, mode="full", weights="imagenet", learning_rate=1e-3, finetune_learning_rate=1e-5)
    assert training._phase_learning_rate(full, "full") == 1e-5
    assert training._phase_learning_rate(dataclasses.replace(full, weights="/tmp/w.h5"), "full") == 1e-5
    assert training._phase_learning_rate(dataclasses.replace(full, weights="none"), "full") == 1e-3
    finetune = dataclasses.replace(full, mode="finetune")
    assert (training._phase_learning_rate(finetune, "head"), training._phase_learning_rate(finetune, "finetune")) == (1e-3, 1e-5)


def test_learning_rate_schedules():
    keras = heavy.keras_module()
    with pytest.raises(errors.InputError, match="lr_schedule"):
        dataclasses.replace(TINY, lr_schedule="step")
    rate, extra = training._learning_rate(keras, dataclasses.replace(TINY, lr_schedule="none"), 1e-3, 4, 5)
    assert (rate, extra) == (1e-3, [])
    schedule, extra = training._learning_rate(keras, dataclasses.replace(TINY, lr_schedule="cosine"), 1e-3, 4, 5)
    assert extra == [] and float(schedule(0)) == pytest.approx(1e-3) and float(schedule(20)) == pytest.approx(1e-5)
    rate, (plateau,) = training._learning_rate(keras, dataclasses.replace(TINY, lr_schedule="plateau", patience=4), 1e-3, 4, 5)
    assert rate == 1e-3 and isinstance(plateau, keras.callbacks.ReduceLROnPlateau) and plateau.patience == 2
