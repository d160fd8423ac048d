"""The stored evaluation (issue 17, point 4): computed once per run and inputs, read back with
the same numbers, recomputed as soon as anything it was computed from changes."""

from __future__ import annotations

import pytest
from test_evaluation import populate

from bonescan_core import assessment
from bonescan_core import db as dbm
from bonescan_core.results import EvaluationResult


def stored_rows(db) -> int:
    return db.execute("SELECT count(*) FROM evaluation_cache").fetchone()[0]


@pytest.fixture
def run(db) -> int:
    (run_id, _), _, _ = populate(db, n_patients=20)
    return run_id


def test_a_stored_evaluation_reads_back_the_same_numbers_without_recomputing(db, run, monkeypatch):
    for unit in ("study", "image"):
        fresh = assessment.evaluate(db, run, unit=unit)
        first = assessment.stored_evaluation(db, run, unit=unit)
        assert first.to_json_text() == fresh.to_json_text()
    assert stored_rows(db) == 2

    def no_bootstrap(*args, **kwargs):
        raise AssertionError("recomputed although nothing changed")

    monkeypatch.setattr(assessment, "evaluate", no_bootstrap)
    for unit in ("study", "image"):
        again = assessment.stored_evaluation(db, run, unit=unit)
        assert isinstance(again, EvaluationResult) and again.unit == unit
        monkeypatch.undo()
        assert again.to_json_text() == assessment.evaluate(db, run, unit=unit).to_json_text()
        assert again.format_text() == assessment.evaluate(db, run, unit=unit).format_text()
        monkeypatch.setattr(assessment, "evaluate", no_bootstrap)


def test_a_changed_label_is_never_answered_from_the_store(db, run):
    before = assessment.stored_evaluation(db, run)
    assert not any(row["by"] == "sex" for row in before.subgroups)
    # The patients' sex (a study label the subgroups read) becomes known: a sex subgroup appears.
    with dbm.write(db):
        db.execute("UPDATE patients SET sex = CASE id % 2 WHEN 0 THEN 'F' ELSE 'M' END")
    after = assessment.stored_evaluation(db, run)
    assert any(row["by"] == "sex" for row in after.subgroups)
    assert after.to_json_text() == assessment.evaluate(db, run).to_json_text()
    # A stored prediction's label flips (the run's own rows, outside the data version).
    after = assessment.stored_evaluation(db, run, unit="image")
    image_id = db.execute("SELECT image_id FROM predictions WHERE run_id = ? AND label = 1 LIMIT 1", [run]).fetchone()[0]
    with dbm.write(db):
        db.execute("UPDATE predictions SET label = 0 WHERE run_id = ? AND image_id = ?", [run, image_id])
    flipped = assessment.stored_evaluation(db, run, unit="image")
    assert flipped.confusion != after.confusion
    assert flipped.to_json_text() == assessment.evaluate(db, run, unit="image").to_json_text()
    assert stored_rows(db) == 2  # one row per (run, arguments), replaced


def test_a_database_that_cannot_be_written_still_answers(db, run, monkeypatch):
    import sqlite3

    def read_only(_db):
        raise sqlite3.OperationalError("attempt to write a readonly database")

    monkeypatch.setattr(dbm, "write", read_only)
    result = assessment.stored_evaluation(db, run)
    monkeypatch.undo()
    assert result.to_json_text() == assessment.evaluate(db, run).to_json_text()
    assert stored_rows(db) == 0


def test_an_idle_worker_stores_stale_evaluations_before_anyone_asks(db, db_path, run, monkeypatch):
    from bonescan_core import jobs

    other = db.execute("SELECT id FROM runs WHERE id != ?", [run]).fetchone()[0]  # populate's second run
    assert assessment.stale_evaluations(db) == [(other, "study"), (other, "image"), (run, "study"), (run, "image")]
    skip: set[int] = set()
    while jobs.evaluate_pending(db_path, skip) is not None:
        pass
    assert assessment.stale_evaluations(db) == [] and stored_rows(db) == 4
    with dbm.write(db):
        db.execute("UPDATE patients SET sex = 'F' WHERE id = 1")
    assert len(assessment.stale_evaluations(db)) == 4  # every run's inputs moved with the data version
