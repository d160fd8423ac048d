"""One run's full assessment: ``evaluation.evaluate`` plus the calibration and the subgroups of its test studies.

What ``evaluate --json``, the Evaluate page, the report and a bundle's ``metrics.json`` show.
It lives apart from :mod:`bonescan_core.evaluation` because :mod:`bonescan_core.calibration`
builds on :mod:`bonescan_core.studystats`, which imports ``evaluation``'s helpers: composing
them here keeps the imports one-way. Only numpy-level modules are imported (no Keras, no
plotting), so ``bonescan evaluate`` keeps its fast start.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
from typing import Any

from bonescan_core import calibration, errors, evaluation, external, subgroups
from bonescan_core import db as dbm
from bonescan_core.heavy import sqlite_utils
from bonescan_core.results import EvaluationResult


def evaluate(db: sqlite_utils.Database, run_id: int, threshold: float | None = None, subset: str = "test",
             n_resamples: int = 1000, seed: int = 0, cohort: str | None = None, **options: Any) -> EvaluationResult:
    """``evaluation.evaluate`` (same arguments; ``options`` are passed on) with
    ``calibration`` (``calibration.run_calibration`` on the subset's studies) and ``subgroups``
    (``subgroups.run_subgroups`` at ``threshold``, else the run's own thresholds) filled in.

    With ``cohort``: the same assessment of that cohort's external predictions
    (``external.evaluate_cohort``, always at the run's validation thresholds: ``threshold`` must
    be None), with its calibration, subgroups and Grad-CAM pointing game.

    Raises:
        What ``evaluation.evaluate`` (or ``external.evaluate_cohort``) raises (errors.RunNotFound,
        evaluation.NoPredictionsError, cohorts.CohortError).
    """
    if cohort is None:
        result = evaluation.evaluate(db, run_id, threshold=threshold, subset=subset, n_resamples=n_resamples, seed=seed,
                                     **options)
    else:
        if threshold is not None:
            raise errors.InputError("an external cohort is always assessed at the thresholds chosen on the run's "
                                    "validation set; leave out the threshold")
        result = external.evaluate_cohort(db, run_id, cohort, n_resamples=n_resamples, seed=seed, **options)
        subset, cohort = "external", result.cohort
        result = dataclasses.replace(result, localisation=evaluation.localisation_summary(
            db, run_id, result.level_threshold("study"), subset, cohort=cohort))
    return dataclasses.replace(
        result,
        calibration=calibration.run_calibration(db, run_id, subset, cohort=cohort),
        subgroups=subgroups.run_subgroups(db, run_id, threshold, subset, n_resamples, seed, cohort=cohort),
    )


def evaluation_stamp(db: sqlite_utils.Database, run_id: int) -> str:
    """What a stored evaluation of ``run_id`` was computed from, as a short hex digest: the
    data version (studies, patients, images, reviews, readers, flags: ``db.data_version``), the
    run's row (status, settings, thresholds, results), its image and study predictions (count,
    last rowid and sums of labels and probabilities) and, where lesion points exist (the
    pointing game), those points and the run's Grad-CAM maps (count, last rowid: a replaced map
    gets a new rowid). Any stored change to those changes the stamp; a few indexed reads."""
    parts = [
        dbm.data_version(db),
        db.execute("SELECT status, threshold, finished_at, config, results, split_id FROM runs WHERE id = ?",
                   [run_id]).fetchone(),
        db.execute("SELECT count(*), max(rowid), total(label), total(probability), total(raw_probability) "
                   "FROM predictions WHERE run_id = ?", [run_id]).fetchone(),
        db.execute("SELECT count(*), max(rowid), total(label), total(probability), total(raw_probability) "
                   "FROM study_predictions WHERE run_id = ?", [run_id]).fetchone(),
    ]
    lesions = db.execute("SELECT count(*), max(id), total(row), total(col) FROM lesions").fetchone()
    if lesions[0]:  # the pointing game reads the maps' peaks only where lesion points exist
        parts += [lesions, db.execute("SELECT count(*), max(rowid) FROM explanations WHERE run_id = ?", [run_id]).fetchone()]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]


def _cache_key(threshold: float | None, subset: str, n_resamples: int, seed: int, unit: str) -> str:
    return json.dumps({"threshold": threshold, "subset": subset, "n_resamples": n_resamples, "seed": seed, "unit": unit},
                      sort_keys=True)


def stored_evaluation(db: sqlite_utils.Database, run_id: int, threshold: float | None = None, subset: str = "test",
                      n_resamples: int = 1000, seed: int = 0, unit: str = "study") -> EvaluationResult:
    """:func:`evaluate` of a run's own subset, computed at most once per (arguments, inputs):
    kept in ``evaluation_cache`` under :func:`evaluation_stamp`, recomputed and replaced as
    soon as anything it was computed from has changed (so it is never stale). The bootstrap
    of 25,000 predictions takes seconds; a stored result reads in milliseconds.

    A database that cannot be written (read-only file, writer busy past the timeout) still
    answers: the result is computed and returned unstored.

    Raises:
        What :func:`evaluate` raises.
    """
    key = _cache_key(threshold, subset, n_resamples, seed, unit)
    stamp = evaluation_stamp(db, run_id)
    row = db.execute("SELECT stamp, result FROM evaluation_cache WHERE run_id = ? AND key = ?", [run_id, key]).fetchone()
    if row is not None and row[0] == stamp:
        return EvaluationResult.from_record(row[1])
    result = evaluate(db, run_id, threshold=threshold, subset=subset, n_resamples=n_resamples, seed=seed, unit=unit)
    try:
        with dbm.write(db):
            if evaluation_stamp(db, run_id) == stamp:  # nothing changed while it was computed
                db.execute("INSERT OR REPLACE INTO evaluation_cache (run_id, key, stamp, result, created_at) "
                           "VALUES (?, ?, ?, ?, ?)", [run_id, key, stamp, result.to_record(), dbm.utc_now()])
    except sqlite3.OperationalError:  # read-only or busy: answer anyway, store next time
        pass
    return result


def stale_evaluations(db: sqlite_utils.Database, newest: int = 5) -> list[tuple[int, str]]:
    """``(run id, unit)`` of the ``newest`` done runs with test predictions whose stored
    evaluation at their own thresholds (:func:`stored_evaluation`'s defaults) is missing or no
    longer matches its inputs, newest first: what an idle worker stores before anyone asks."""
    stale = []
    for (run_id,) in db.execute(
            """SELECT r.id FROM runs r WHERE r.status = 'done' AND EXISTS (
                   SELECT 1 FROM predictions p WHERE p.run_id = r.id AND p.subset = 'test')
               ORDER BY r.id DESC LIMIT ?""", [newest]).fetchall():
        stamp = evaluation_stamp(db, run_id)
        for unit in ("study", "image"):
            key = _cache_key(None, "test", 1000, 0, unit)
            row = db.execute("SELECT stamp FROM evaluation_cache WHERE run_id = ? AND key = ?", [run_id, key]).fetchone()
            if row is None or row[0] != stamp:
                stale.append((int(run_id), unit))
    return stale
