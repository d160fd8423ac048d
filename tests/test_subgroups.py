"""Subgroups (issue 11, point 4): AUC, sensitivity and specificity with CIs by sex, age band, primary
cancer, cohort (studies) and view (images); small groups marked; a forest plot; in `evaluate --json`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from bonescan_core import cli, evaluation, plots, subgroups
from bonescan_core import db as dbm
from bonescan_core.ingest import add_demo_studies


def test_rows_per_known_group_with_metrics_and_the_small_mark():
    rng = np.random.default_rng(0)
    # Group "a": 12 positives and 15 negatives (not small); group "b": 9 positives (small); unknowns left out.
    values = np.array(["a"] * 27 + ["b"] * 30 + [None] * 5, dtype=object)
    labels = np.array([1] * 12 + [0] * 15 + [1] * 9 + [0] * 21 + [1, 0, 1, 0, 1])
    probabilities = np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0.0, 1.0)
    patients = np.arange(labels.size)
    rows = subgroups.subgroup_rows("sex", values, labels, probabilities, patients, 0.5, "study", n_resamples=200)
    assert [(r["group"], r["n"], r["n_positive"], r["n_negative"], r["small"]) for r in rows] == \
        [("a", 27, 12, 15, False), ("b", 30, 9, 21, True)]
    for row, mask in zip(rows, (values == "a", values == "b"), strict=True):
        y, p = labels[mask], probabilities[mask]
        metrics = row["metrics"]
        assert metrics["auc"]["value"] == pytest.approx(roc_auc_score(y, p), abs=1e-4)
        assert metrics["sensitivity"]["value"] == pytest.approx(((p >= 0.5) & (y == 1)).sum() / (y == 1).sum(), abs=1e-4)
        assert metrics["specificity"]["value"] == pytest.approx(((p < 0.5) & (y == 0)).sum() / (y == 0).sum(), abs=1e-4)
        for entry in metrics.values():
            low, high = entry["ci95"]
            assert low <= entry["value"] <= high
        assert row["by"] == "sex" and row["unit"] == "study" and row["threshold"] == 0.5


def test_a_dimension_with_one_known_group_is_not_shown():
    values = np.array(["default"] * 6 + [None] * 2, dtype=object)
    labels = np.array([0, 1] * 4)
    assert subgroups.subgroup_rows("cohort", values, labels, np.linspace(0, 1, 8), np.arange(8), 0.5, "study") == []


def test_demo_studies_carry_sex_age_and_primary_cancer(demo_db):
    rows = demo_db.execute("SELECT sex, age_band, primary_cancer FROM patients").fetchall()
    assert len(rows) == 40 and all(all(value for value in row) for row in rows)
    assert len({row[0] for row in rows}) == 2  # both sexes: the panel has groups to compare


def insert_run(db, results: dict, threshold: float = 0.5, seed: int = 0) -> int:
    """A done run over every demo image (test subset); the two views of a study differ."""
    rng = np.random.default_rng(seed)
    images = db.execute("SELECT id, study_id FROM images ORDER BY id").fetchall()
    label = {s: int(rng.random() < 0.45) for s in sorted({s for _, s in images})}
    with dbm.write(db):
        run_id = db["runs"].insert({"backbone": "vgg19", "status": "done", "config": json.dumps({"backbone": "vgg19"}),
                                    "config_hash": f"s{seed}", "created_at": dbm.utc_now(), "threshold": threshold,
                                    "results": json.dumps(results)}).last_pk
        db["predictions"].insert_all([
            {"run_id": run_id, "image_id": i, "subset": "test", "label": label[s],
             "probability": float(np.clip(rng.normal(0.65 if label[s] else 0.35, 0.2), 0.001, 0.999))}
            for i, s in images])
    return run_id


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory) -> Path:
    """40 demo studies made once: 20 in cohort ``default``, 20 in ``scanner-b``."""
    path = tmp_path_factory.mktemp("subgroups") / "labels.db"
    with dbm.opened(path) as db:
        add_demo_studies(db, 20, seed=7)
        add_demo_studies(db, 20, seed=8, cohort="scanner-b")
    return path


@pytest.fixture
def demo_db(demo_file, db_path):
    shutil.copy(demo_file, db_path)  # conftest's database file, so that the CLI ($BONESCAN_DB) reads it too
    with dbm.opened(db_path) as db:
        yield db


def test_run_subgroups_counts_studies_for_patient_attributes_and_images_for_views(demo_db):
    run_id = insert_run(demo_db, {})
    rows = subgroups.run_subgroups(demo_db, run_id, n_resamples=100)
    by = {r["by"] for r in rows}
    assert by == {"sex", "age_band", "primary_cancer", "cohort", "view"}
    sex = [r for r in rows if r["by"] == "sex"]
    assert sum(r["n"] for r in sex) == 40 and {r["unit"] for r in sex} == {"study"}
    expected = dict(demo_db.execute("""SELECT p.sex, COUNT(*) FROM studies s JOIN patients p ON p.id = s.patient_id
                                       GROUP BY p.sex""").fetchall())
    assert {r["group"]: r["n"] for r in sex} == expected
    views = [r for r in rows if r["by"] == "view"]
    assert [(r["group"], r["n"], r["unit"]) for r in views] == [("anterior", 40, "image"), ("posterior", 40, "image")]
    # Study rows use one probability per study: the maximum over its views.
    data = evaluation.study_level(*(evaluation.runs.predictions(demo_db, run_id, "test")[k]
                                    for k in ("study_id", "patient_id", "label", "probability")))
    women = {sid for (sid,) in demo_db.execute("SELECT s.id FROM studies s JOIN patients p ON p.id = s.patient_id WHERE p.sex = 'F'")}
    mask = np.isin(data["study_id"], list(women))
    (female,) = [r for r in sex if r["group"] == "F"]
    assert female["metrics"]["auc"]["value"] == pytest.approx(roc_auc_score(data["label"][mask], data["probability"][mask]), abs=1e-4)


def test_study_groups_use_the_study_threshold_and_views_the_image_threshold(demo_db):
    low = insert_run(demo_db, {"thresholds": {"image": 0.99, "study": 0.01, "rule": "youden", "target": None}}, seed=1)
    rows = subgroups.run_subgroups(demo_db, low, n_resamples=50)
    assert all(r["metrics"]["sensitivity"]["value"] == 1.0 for r in rows if r["unit"] == "study" and r["n_positive"])
    assert all(r["metrics"]["sensitivity"]["value"] == 0.0 for r in rows if r["unit"] == "image" and r["n_positive"])
    assert any(r["unit"] == "study" and r["n_positive"] for r in rows) and any(r["unit"] == "image" for r in rows)
    # An explicit threshold (evaluate --threshold) replaces both.
    assert {r["threshold"] for r in subgroups.run_subgroups(demo_db, low, threshold=0.3, n_resamples=50)} == {0.3}


def test_runs_with_one_output_per_study_have_no_view_groups(demo_db):
    run_id = insert_run(demo_db, {"sample_unit": "study"})
    assert "view" not in {r["by"] for r in subgroups.run_subgroups(demo_db, run_id, n_resamples=50)}


def test_cohorts_are_a_dimension_in_evaluate_json(demo_db, db_path, capsys):
    run_id = insert_run(demo_db, {})
    assert cli.main(["--db", str(db_path), "evaluate", str(run_id), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["subgroups"]
    assert all({"by", "group", "n", "small", "metrics"} <= set(r) for r in rows)
    assert [(r["group"], r["n"], r["small"]) for r in rows if r["by"] == "cohort"] == \
        [("default", 20, True), ("scanner-b", 20, True)]  # fewer than 10 positives each


def test_forest_plot_draws_every_group_and_marks_small_ones(demo_db):
    rows = subgroups.run_subgroups(demo_db, insert_run(demo_db, {}), n_resamples=50)
    figure = plots.subgroup_forest(rows)
    small = [t for t in figure.data if t.marker.symbol == "circle-open"]
    full = [t for t in figure.data if t.marker.symbol == "circle"]
    n_small = sum(r["small"] for r in rows)
    assert sum(len(t.y) for t in small) == 3 * n_small and sum(len(t.y) for t in full) == 3 * (len(rows) - n_small)
    labels = {y for t in figure.data for y in t.y}
    assert len(labels) == len(rows) and all(label.endswith("(small)") for t in small for label in t.y)
