"""Issue 11, points 1, 6 and 7: the study as the unit (study rows, study thresholds, ``--unit``),
pre-specified vs exploratory operating points and blind re-review flags, honest split grouping
and near-duplicate images across subsets."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

from bonescan_core import db as dbm
from bonescan_core import errors, evaluation, report, runs, splits, studystats
from bonescan_core import review as rv
from bonescan_core.ingest import add_demo_studies, import_files, insert_image

# --- fixtures: a done run over bare studies, predictions inserted directly ------------------------

def add_run(db, threshold: float | None, facts: dict | None = None, config: dict | None = None) -> int:
    with dbm.write(db):
        split = db["splits"].insert({"seed": 0, "test_fraction": 0.3, "val_fraction": 0.15, "labels_hash": "x",
                                     "created_at": dbm.utc_now()}).last_pk
        return db["runs"].insert({"backbone": "densenet121", "status": "done", "config": json.dumps(config or {}),
                                  "config_hash": f"h{split}", "split_id": split, "created_at": dbm.utc_now(),
                                  "threshold": threshold, "results": json.dumps(facts or {})}).last_pk


def add_studies(db, probabilities: dict[str, list[tuple[int, list[float]]]], run_id: int) -> dict[str, list[int]]:
    """Studies of one patient each, two views each, with image predictions of ``run_id``:
    ``{subset: [(label, [p_anterior, p_posterior]), ...]}``; returns {subset: [study ids]}."""
    made: dict[str, list[int]] = {}
    with dbm.write(db):
        for subset, studies in probabilities.items():
            for label, views in studies:
                n = db.execute("SELECT COUNT(*) FROM studies").fetchone()[0]
                patient = db["patients"].insert({"key": f"p{n}", "created_at": dbm.utc_now()}).last_pk
                study = db["studies"].insert({"patient_id": patient, "key": f"s{n}", "origin": "demo",
                                              "created_at": dbm.utc_now()}).last_pk
                made.setdefault(subset, []).append(study)
                for view, p in zip(("anterior", "posterior"), views, strict=True):
                    pixels = np.full((16, 16), 7 * n + (view == "posterior"), dtype=np.uint16)
                    image = insert_image(db, study, pixels, view, f"{n}-{view}.png", "png")
                    db["predictions"].insert({"run_id": run_id, "image_id": image, "subset": subset, "label": label,
                                              "probability": p})
    return made


TEST_STUDIES = [(1, [0.62, 0.10]), (1, [0.75, 0.20]), (1, [0.40, 0.45]), (0, [0.55, 0.30]), (0, [0.35, 0.20]),
                (0, [0.65, 0.10])]
# Study probabilities (max over views): positives 0.62, 0.75, 0.45; negatives 0.55, 0.35, 0.65.


def test_study_metrics_use_the_study_threshold_not_the_image_one(db):
    """Image threshold 0.30, study threshold 0.60 (stored with the run): per study, 0.62 and 0.75
    are called and 0.45, 0.55, 0.35 are not; at the image threshold every study would be called
    but one (0.62, 0.75, 0.45, 0.55, 0.35, 0.65 >= 0.30)."""
    thresholds = {"image": 0.30, "study": 0.60, "rule": "youden", "target": None}
    run = add_run(db, 0.30, {"thresholds": thresholds})
    add_studies(db, {"test": TEST_STUDIES}, run)
    result = evaluation.evaluate(db, run, n_resamples=20)
    assert (result.unit, result.threshold, result.threshold_source, result.threshold_rule) == ("study", 0.6, "run", "youden")
    assert result.confusion == {"tp": 2, "fp": 1, "tn": 2, "fn": 1}  # 0.65 is the one false positive
    assert result.level("image").confusion == evaluation.confusion(
        [y for y, views in TEST_STUDIES for _ in views], [p for _, views in TEST_STUDIES for p in views], 0.30)
    as_json = result.as_json()
    assert as_json["study_level"]["threshold"] == 0.6 and as_json["image_level"]["threshold"] == 0.3
    assert as_json["notes"] == []
    image = evaluation.evaluate(db, run, n_resamples=20, unit="image")
    assert (image.threshold, image.unit_label, image.confusion) == (0.3, "per image", result.level("image").confusion)
    # An explicit threshold is one threshold for both levels.
    both = evaluation.evaluate(db, run, threshold=0.5, n_resamples=20).as_json()
    assert both["study_level"]["threshold"] == both["image_level"]["threshold"] == 0.5
    with pytest.raises(errors.InputError, match="unit"):
        evaluation.evaluate(db, run, unit="patient")


def test_an_old_run_gets_its_study_threshold_from_its_validation_predictions(db):
    run = add_run(db, 0.30)  # trained before study thresholds: no results["thresholds"]
    val = [(1, [0.58, 0.20]), (1, [0.70, 0.10]), (0, [0.52, 0.40]), (0, [0.30, 0.20])]
    add_studies(db, {"val": val, "test": TEST_STUDIES}, run)
    collapsed = runs.study_predictions(db, run, "val")
    expected = studystats.choose_threshold(collapsed["label"], collapsed["probability"], "youden").value
    assert expected == pytest.approx(0.58)  # max over views: positives 0.58, 0.70; negatives 0.52, 0.30
    result = evaluation.evaluate(db, run, n_resamples=20)
    assert (result.threshold, result.threshold_source) == (pytest.approx(0.58), "derived")
    assert "chosen now by rule youden on its 4 stored validation studies" in result.notes[0]
    assert "note: run" in result.format_text()
    assert evaluation.evaluate(db, run, n_resamples=20, unit="image").threshold_source == "run"


def test_record_result_stores_study_rows_and_replaces_them(db, db_path, tmp_path):
    run = add_run(db, None)
    studies = add_studies(db, {"test": TEST_STUDIES[:2]}, run)["test"]
    model = runs.model_file(db_path, run)

    def result(probability: float) -> runs.RunResult:
        rows = tuple(runs.StudyPrediction(study_id=s, subset="test", label=1, probability=probability) for s in studies)
        facts = {"thresholds": {"image": 0.4, "study": 0.5, "rule": "youden", "target": None}}
        return runs.RunResult(0.4, 1.0, model, "0" * 64, "CPU", (), facts, study_predictions=rows)

    runs.record_result(db, db_path, run, result(0.9))
    runs.record_result(db, db_path, run, result(0.8))  # re-stored: replaced, not added
    stored = runs.study_predictions(db, run)
    assert stored["study_id"].tolist() == studies and stored["probability"].tolist() == [0.8, 0.8]
    assert runs.get(db, run).results.facts["thresholds"]["study"] == 0.5


def test_one_threshold_implementation_with_four_rules():
    assert set(runs.THRESHOLD_RULES) == set(studystats.THRESHOLD_RULES)
    y, p = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    assert studystats.choose_threshold(y, p, "fixed") == studystats.Threshold(0.5, "fixed")
    with pytest.raises(errors.InputError, match="takes no target"):
        studystats.choose_threshold(y, p, "fixed", 0.9)
    with pytest.raises(errors.InputError, match="threshold_target"):
        runs.TrainConfig(backbone="vgg19", threshold_rule="npv")
    config = runs.TrainConfig(backbone="vgg19", threshold_rule="sensitivity", threshold_target=0.9)
    assert runs.TrainConfig.from_json(config.to_json()) == config


def test_training_keeps_a_run_whose_rule_cannot_be_applied_and_says_why():
    from bonescan_core import training

    config = runs.TrainConfig(backbone="vgg19", threshold_rule="npv", threshold_target=0.99)
    notes: list[str] = []
    # Validation images of one class: no rule applies; per study an NPV of 1 is reached at 0.7.
    chosen = training.run_thresholds(config, [1, 1, 1], [0.9, 0.1, 0.8], [0, 1], [0.3, 0.7], notes)
    assert chosen["image"] == 0.5 and chosen["study"] == pytest.approx(0.7) and len(notes) == 1
    assert "image threshold could not be chosen by rule npv" in notes[0]


def test_threshold_status_marks_a_moved_threshold_exploratory():
    assert evaluation.threshold_status(None, 0.41) == evaluation.PRE_SPECIFIED
    assert evaluation.threshold_status(0.410, 0.4104) == evaluation.PRE_SPECIFIED  # the slider's 3 decimals
    assert evaluation.threshold_status(0.415, 0.41) == "exploratory (threshold not chosen on validation)"
    assert evaluation.threshold_status(0.5, None) == evaluation.EXPLORATORY  # no validation-chosen threshold at all


@pytest.mark.parametrize("reason", [
    "run 3: FP, p=0.83", "run 12: TN, p=0.07", "model says metastatic with p=0.97", "false negative at 0.41",
    "probability 83%", "the network predicted metastatic", "score .92", "missed by resnet",
])
def test_a_flag_never_tells_a_blind_reader_the_models_outcome(db, reason):
    study = add_studies(db, {"test": TEST_STUDIES[:1]}, add_run(db, 0.5))["test"][0]
    rv.add_flag(db, study, reason, "trainer")
    (shown,) = rv.open_flags(db)[study]
    stored = db.execute("SELECT reason FROM flags").fetchone()[0]
    for text in (shown, stored):
        assert text == rv.BLIND_FLAG_REASON
        assert not any(token in text for token in ("TP", "FP", "FN", "TN", "p=", "%", "0.", "metastatic"))


def test_a_neutral_flag_reason_is_kept_and_an_old_unblinding_one_is_hidden(db):
    study = add_studies(db, {"test": TEST_STUDIES[:1]}, add_run(db, 0.5))["test"][0]
    rv.add_flag(db, study, "  please re-check the spine  ", "ann")
    with dbm.write(db):  # as the Evaluate page stored it before: outcome and probability in the text
        db["flags"].insert({"study_id": study, "reason": "run 1: FP, p=0.83", "flagged_by": "evaluate",
                            "created_at": dbm.utc_now(), "after_review_id": 0})
    assert rv.open_flags(db)[study] == ["please re-check the spine", rv.BLIND_FLAG_REASON]


# --- CLI: --unit -------------------------------------------------------------------------------

def test_evaluate_and_predictions_by_unit_on_the_command_line(db_path):
    with dbm.opened(db_path) as db:
        run = add_run(db, 0.30, {"thresholds": {"image": 0.30, "study": 0.60, "rule": "youden", "target": None}})
        studies = add_studies(db, {"test": TEST_STUDIES}, run)["test"]
    default = json.loads(run_cli("evaluate", str(run), "--json", db_path=db_path).stdout)
    assert (default["unit"], default["threshold"], default["threshold_rule"]) == ("study", 0.6, "youden")
    assert default["confusion"] == {"tp": 2, "fp": 1, "tn": 2, "fn": 1}
    image = json.loads(run_cli("evaluate", str(run), "--json", "--unit", "image", db_path=db_path).stdout)
    assert (image["unit"], image["threshold"], sum(image["confusion"].values())) == ("image", 0.3, 12)
    assert run_cli("evaluate", str(run), db_path=db_path).stdout.startswith(f"run {run} (densenet121), test, per study:")

    out = Path(db_path).parent / "studies.csv"
    printed = run_cli("predictions", str(run), "--csv", str(out), "--unit", "study", db_path=db_path)
    assert printed.returncode == 0, printed.stderr
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert list(rows[0]) == ["study_id", "patient_id", "subset", "label", "probability"]
    assert [int(r["study_id"]) for r in rows] == studies
    assert [float(r["probability"]) for r in rows] == [max(views) for _, views in TEST_STUDIES]
    default_out = Path(db_path).parent / "images.csv"
    assert run_cli("predictions", str(run), "--csv", str(default_out), db_path=db_path).returncode == 0
    assert default_out.read_text().splitlines()[0].split(",") == list(report.PREDICTION_COLUMNS)  # the contract kept


# --- point 7: honest grouping and near duplicates -------------------------------------------------

def png_folder(root: Path, n_per_class: int) -> Path:
    """PNG files under metastatic/ and negative/ class folders, no DICOM, no manifest: every
    file its own study, and each study its own (unknown) patient."""
    rng = np.random.default_rng(3)
    for label in ("metastatic", "negative"):
        for i in range(n_per_class):
            (root / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 200, (256, 96), dtype=np.uint8)).save(root / label / f"case{label}{i}_ANT.png")
    return root


def test_a_split_of_studies_without_patient_identity_says_it_groups_by_study(db, tmp_path):
    outcomes = import_files(db, [png_folder(tmp_path / "scans", 6)], label_from_folder=True, jobs=1)
    assert [o.status for o in outcomes] == ["imported"] * 12
    assert db.execute("SELECT COUNT(*) FROM patients WHERE identified = 0").fetchone()[0] == 12
    split = splits.make_split(db, seed=0)
    assert splits.get_split(db, split)["grouping"] == "study" == splits.split_info(db, split)["grouping"]


def test_demo_patients_are_known_so_their_split_groups_by_patient(db):
    add_demo_studies(db, 12, seed=0)
    assert db.execute("SELECT COUNT(*) FROM patients WHERE identified = 1").fetchone()[0] == 12
    assert splits.get_split(db, splits.make_split(db, seed=0))["grouping"] == "patient"


def test_an_old_split_reads_patient_as_it_was_made(tmp_path, monkeypatch):
    path = tmp_path / "old.db"
    with monkeypatch.context() as patch:
        patch.setattr(dbm, "MIGRATIONS", [m for m in dbm.MIGRATIONS if m[0] < "016"])
        with dbm.opened(path) as old, dbm.write(old):
            old["splits"].insert({"seed": 0, "test_fraction": 0.3, "val_fraction": 0.15, "labels_hash": "x",
                                  "created_at": dbm.utc_now()})
    with dbm.opened(path) as db:
        assert splits.get_split(db, 1)["grouping"] == "patient"


def test_image_hash_ignores_rescaling_and_sees_other_images():
    pixels = np.random.default_rng(0).poisson(np.linspace(1, 80, 64 * 32).reshape(64, 32) ** 1.2 % 97).astype(np.uint16)
    same = splits.image_hash(pixels)
    assert splits.image_hash(pixels.astype(np.uint32) * 257 + 20) == same  # another bit depth and offset
    flipped = splits.image_hash(pixels[:, ::-1])
    assert bin(same ^ flipped).count("1") > splits.NEAR_DUPLICATE_BITS
    assert 0 <= same < 2**64


def test_split_json_reports_near_duplicates_across_subsets(db_path):
    with dbm.opened(db_path) as db:
        add_demo_studies(db, 14, seed=2)
    first = json.loads(run_cli("split", "--json", db_path=db_path).stdout)
    assert first["grouping"] == "patient"
    before = {(d["a"], d["b"]) for d in first["near_duplicates"]}  # phantoms share one template: a few may look alike
    train_study, test_study = first["subsets"]["train"][0], first["subsets"]["test"][0]
    with dbm.opened(db_path) as db:
        (image_id, blob) = db.execute("SELECT id, pixels FROM images WHERE study_id = ? ORDER BY id LIMIT 1",
                                      [test_study]).fetchone()
        from bonescan_core import pixelstore
        pixels = pixelstore.decode_pixels(blob)
        with dbm.write(db):  # the same scan again, re-exported with another scale, filed under a training study
            copy = insert_image(db, train_study, pixels.astype(np.uint32) * 2 + 20, None, "copy.png", "png")
        found = splits.near_duplicates(db, first["id"])
    new = [d for d in found if (d["a"], d["b"]) not in before]
    assert new == [{"a": image_id, "b": copy, "subsets": ["test", "train"], "distance": 0}]
    again = json.loads(run_cli("split", "--json", "--seed", "1", db_path=db_path).stdout)
    assert all({"a", "b", "subsets", "distance"} == set(d) and d["subsets"][0] != d["subsets"][1]
               and d["distance"] <= splits.NEAR_DUPLICATE_BITS for d in again["near_duplicates"])
