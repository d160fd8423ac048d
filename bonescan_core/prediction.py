"""Prediction: a finished run's locked model over studies it never saw (subset ``external``).

A trained run only predicted the validation and test studies of its own split. Prediction
puts its model to work on other studies: another cohort (``bonescan predict RUN --cohort
NAME``), named studies (``--studies``) or the studies nobody has read yet (``--unread``).
Studies of the run's split (train, validation or test) are refused: the model has seen them,
or was chosen on them, so their predictions would not be external.

What is stored, per study (:func:`run_job`):

* ``predictions`` rows with subset ``external`` for each image the run's view mode uses, and
  one ``study_predictions`` row per study (a per-image run: the maximum over the study's
  views; a composite run: its one output). ``probability`` is calibrated with the run's
  stored calibration (``studystats.apply_calibration``; ``raw_probability`` keeps the model's
  output, NULL when the run is not calibrated); ``label`` is the study's current training
  label (``review.study_statuses``), NULL when it has none. Rows are keyed by (run, image) and
  (run, study), so predicting a study again replaces them: a re-run leaves the same rows.
* their Grad-CAM maps (``explain.explain_images``: ``explanations``, computed once).

Inference is batched: the run's model is loaded once per job (``runs.load_model``), wrapped
once with the input pipeline training used (``preprocess.with_input_pipeline``: min-max,
fit-to-size and the backbone's scaling, exactly as the validation and test predictions were
made), and fed chunks of whole studies decoded by ``preprocess.load_images`` in a thread
while the previous chunk is in the model.

Jobs. A prediction is a job in ``prediction_jobs`` (migration 011), claimed by the same
worker that trains (``jobs.run_worker``; prediction jobs go before queued training runs:
they are short and someone waits for them), with progress, heartbeat, cancel and the
``interrupted`` status exactly like training runs. This module is the store of those rows
and the job's body; the worker loop, the reporter and the interrupted-job sweep are in
:mod:`bonescan_core.jobs`. Keras is imported only when a job runs.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from bonescan_core import cohorts as cohort_names
from bonescan_core import db as dbm
from bonescan_core import errors, preprocess, runs, splits, studystats
from bonescan_core.heavy import sqlite_utils
from bonescan_core.review import study_statuses

STUDIES_PER_EXPLAIN = 4  # studies whose Grad-CAM maps are computed and written together (8 images: one pass)
LABEL_VALUES = {"metastatic": 1, "non_metastatic": 0}


class InSplitError(errors.InputError):
    """Some of the studies asked for belong to the run's split; the message names them and what to do."""


class DuplicatePrediction(errors.Conflict):
    """The same prediction (run and studies) is already queued or running; ``job_id`` says which."""

    def __init__(self, job_id: int, status: str) -> None:
        super().__init__(f"the same prediction is already {status} (job {job_id}); wait for it or cancel it")
        self.job_id = job_id


class PredictionCancelled(Exception):
    """The reporter asked to stop; the job ends as ``cancelled`` (what it stored so far stays).

    Control flow, not an error (as ``training.TrainingCancelled``): outside
    :class:`errors.BonescanError`, so no catch of the error family can swallow a cancellation.
    """


class Reporter(Protocol):
    """What a job tells its caller, and asks it (``jobs.DatabaseReporter`` over this store)."""

    def progress(self, fields: dict[str, Any], force: bool = False) -> None:
        """``phase`` (``predicting`` | ``explaining``), ``batch`` done of ``batches`` (studies), ``eta_s``."""

    def cancelled(self) -> bool:
        """True to stop between chunks."""


# --- which studies -------------------------------------------------------------------------------

def _finished(db: sqlite_utils.Database, run_id: int) -> runs.Run:
    run = runs.get(db, run_id)  # errors.RunNotFound
    if run.status != "done" or not run.results.weights_path:
        raise errors.InputError(f"run {run_id} is {run.status}: only a finished run (status done) predicts; "
                                "wait for it, or pick one with `bonescan runs --json`")
    return run


def split_members(db: sqlite_utils.Database, run: runs.Run) -> dict[int, str]:
    """{study id: subset} of the split the run trained on (empty when it has none)."""
    split_id = run.split_id if run.split_id is not None else run.results.facts.get("split_id")
    if split_id is None:
        return {}
    return {study_id: subset for study_id, (subset, _) in splits.split_labels(db, int(split_id)).items()}


def choose_studies(db: sqlite_utils.Database, run_id: int, *, cohort: str | None = None,
                   study_ids: Iterable[int] | None = None, unread: bool = False) -> tuple[list[int], str]:
    """The studies a prediction covers, and how they were chosen; exactly one way must be given.

    Args:
        cohort: every study of this cohort.
        study_ids: these studies.
        unread: every study no reader has read yet (``review.StudyStatus.state == "unread"``)
            outside the run's split.

    Returns:
        (sorted study ids, selection text: ``cohort NAME`` | ``studies`` | ``unread``).

    Raises:
        errors.RunNotFound: no such run.
        errors.InputError: the run is not finished, not exactly one way was given, a study
            does not exist, or nothing is left to predict.
        InSplitError: a chosen cohort's or named study belongs to the run's split.
    """
    run = _finished(db, run_id)
    if sum([cohort is not None, study_ids is not None, bool(unread)]) != 1:
        raise errors.InputError("choose the studies one way: --cohort NAME, --studies ID,... or --unread")
    members = split_members(db, run)
    if unread:
        statuses = study_statuses(db)
        chosen = sorted(sid for sid, status in statuses.items() if status.state == "unread" and sid not in members)
        if not chosen:
            raise errors.InputError("no unread study lies outside the run's split; import new scans first")
        return chosen, "unread"
    if cohort is not None:
        name = cohort_names.check_cohort(cohort)
        chosen = [row[0] for row in db.execute("SELECT id FROM studies WHERE cohort = ? ORDER BY id", [name]).fetchall()]
        if not chosen:
            known = ", ".join(cohort_names.list_cohorts(db)) or "none"
            raise cohort_names.CohortError(f"cohort {name!r} has no studies (cohorts: {known}); import or add demo studies into it")
        selection = f"cohort {name}"
    else:
        chosen = sorted({int(s) for s in study_ids or []})
        if not chosen:
            raise errors.InputError("--studies needs at least one study id, e.g. --studies 12,13")
        marks = ", ".join("?" for _ in chosen)
        known = {row[0] for row in db.execute(f"SELECT id FROM studies WHERE id IN ({marks})", chosen).fetchall()}
        unknown = [s for s in chosen if s not in known]
        if unknown:
            raise errors.InputError(f"no study {', '.join(map(str, unknown[:10]))}; list them with `bonescan studies --json`")
        selection = "studies"
    inside = [s for s in chosen if s in members]
    if inside:
        shown = ", ".join(f"{s} ({members[s]})" for s in inside[:10]) + (" ..." if len(inside) > 10 else "")
        raise InSplitError(
            f"{len(inside)} of the {len(chosen)} studies belong to run {run.id}'s split {run.split_id} "
            f"(study {shown}): the model trained or was chosen on them, so its predictions would not be external; "
            "predict another cohort, name studies outside the split with --studies, or use --unread"
        )
    return chosen, selection


# --- the job rows --------------------------------------------------------------------------------

@dataclass(frozen=True)
class PredictionJob:
    """One row of ``prediction_jobs``, typed (times are ISO 8601 UTC, or None)."""

    id: int
    run_id: int
    status: str
    study_ids: tuple[int, ...]
    selection: str
    progress: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    cancel_requested: bool = False
    error: str | None = None
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    heartbeat_at: str | None = None
    worker_pid: int | None = None

    def to_json(self) -> dict[str, Any]:
        """``job, run, status, selection, n_studies, progress, result, error`` and the times."""
        return {"job": self.id, "run": self.run_id, "status": self.status, "selection": self.selection,
                "n_studies": len(self.study_ids), "progress": self.progress, "result": self.result, "error": self.error,
                "created_at": self.created_at, "started_at": self.started_at, "finished_at": self.finished_at}


def _job(row: dict[str, Any]) -> PredictionJob:
    return PredictionJob(
        id=int(row["id"]), run_id=int(row["run_id"]), status=row["status"], study_ids=tuple(json.loads(row["study_ids"])),
        selection=row["selection"], progress=json.loads(row["progress"]) if row["progress"] else None,
        result=json.loads(row["result"]) if row["result"] else None, cancel_requested=bool(row["cancel_requested"]),
        error=row["error"], created_at=row["created_at"], started_at=row["started_at"], finished_at=row["finished_at"],
        heartbeat_at=row["heartbeat_at"], worker_pid=row["worker_pid"],
    )


def get_job(db: sqlite_utils.Database, job_id: int) -> PredictionJob:
    """One job.

    Raises:
        errors.NotFound: no such job.
    """
    rows = list(db.query("SELECT * FROM prediction_jobs WHERE id = ?", [int(job_id)]))
    if not rows:
        raise errors.NotFound(f"prediction job {job_id} does not exist; start one with `bonescan predict RUN --cohort NAME`")
    return _job(rows[0])


def list_jobs(db: sqlite_utils.Database, run_id: int | None = None) -> list[PredictionJob]:
    """Every job (or the run's), newest first."""
    return [_job(row) for row in db.query(
        "SELECT * FROM prediction_jobs WHERE (? IS NULL OR run_id = ?) ORDER BY id DESC", [run_id, run_id])]


def enqueue(db: sqlite_utils.Database, run_id: int, *, cohort: str | None = None, study_ids: Iterable[int] | None = None,
            unread: bool = False) -> int:
    """Check the studies (:func:`choose_studies`) and queue a prediction job; returns its id.

    Raises:
        DuplicatePrediction: the same run over the same studies is already queued or running.
        (and what :func:`choose_studies` raises.)
    """
    chosen, selection = choose_studies(db, run_id, cohort=cohort, study_ids=study_ids, unread=unread)
    ids = json.dumps(chosen)
    with dbm.write(db):
        row = db.execute("SELECT id, status FROM prediction_jobs WHERE run_id = ? AND study_ids = ? "
                         "AND status IN ('queued', 'running') ORDER BY id LIMIT 1", [run_id, ids]).fetchone()
        if row is not None:
            raise DuplicatePrediction(row[0], row[1])
        return db["prediction_jobs"].insert({"run_id": run_id, "status": "queued", "study_ids": ids, "selection": selection,
                                             "created_at": dbm.utc_now()}).last_pk


def claim_next(db: sqlite_utils.Database, job_id: int | None = None) -> PredictionJob | None:
    """Take the oldest queued job (or the given one) and mark it running by this process."""
    with dbm.write(db):
        row = db.execute("SELECT id FROM prediction_jobs WHERE status = 'queued' AND (? IS NULL OR id = ?) ORDER BY id LIMIT 1",
                         [job_id, job_id]).fetchone()
        if row is None:
            return None
        now = dbm.utc_now()
        db.execute("UPDATE prediction_jobs SET status = 'running', started_at = ?, heartbeat_at = ?, worker_pid = ? WHERE id = ?",
                   [now, now, os.getpid(), row[0]])
    return get_job(db, row[0])


def any_queued(db: sqlite_utils.Database) -> bool:
    """Whether a prediction job waits in the queue."""
    return db.execute("SELECT 1 FROM prediction_jobs WHERE status = 'queued' LIMIT 1").fetchone() is not None


def running(db: sqlite_utils.Database) -> list[tuple[int, str | None, int | None]]:
    """(id, heartbeat_at, worker_pid) of every running job."""
    return [tuple(r) for r in db.execute("SELECT id, heartbeat_at, worker_pid FROM prediction_jobs WHERE status = 'running'")]


def finish(db: sqlite_utils.Database, job_id: int, status: str, error: str | None = None,
           result: dict[str, Any] | None = None) -> None:
    """Record a job's final status (and why, or what it did); opens its own transaction unless one is open."""
    now = dbm.utc_now()
    sql = "UPDATE prediction_jobs SET status = ?, finished_at = ?, error = ?, heartbeat_at = ?, result = ? WHERE id = ?"
    values = [status, now, error, now, json.dumps(result) if result is not None else None, job_id]
    if db.conn.in_transaction:
        db.execute(sql, values)
    else:
        with dbm.write(db):
            db.execute(sql, values)


def request_cancel(db: sqlite_utils.Database, job_id: int) -> str:
    """Ask a job to stop: a queued job is cancelled at once, a running one between chunks.
    Returns its status afterwards."""
    with dbm.write(db):
        status = get_job(db, job_id).status
        if status == "queued":
            finish(db, job_id, "cancelled")
            return "cancelled"
        if status == "running":
            db.execute("UPDATE prediction_jobs SET cancel_requested = 1 WHERE id = ?", [job_id])
        return status


# The reporter's store interface (``jobs.DatabaseReporter(store=prediction)``): same names as the run store's.

def heartbeat(db: sqlite_utils.Database, job_id: int) -> None:
    """The job's worker is alive now."""
    with dbm.write(db):
        db.execute("UPDATE prediction_jobs SET heartbeat_at = ? WHERE id = ?", [dbm.utc_now(), job_id])


def set_progress(db: sqlite_utils.Database, job_id: int, fields: dict[str, Any]) -> None:
    """Store the job's progress record (and a heartbeat)."""
    with dbm.write(db):
        db.execute("UPDATE prediction_jobs SET progress = ?, heartbeat_at = ? WHERE id = ?",
                   [json.dumps(dict(fields), default=float), dbm.utc_now(), job_id])


def cancel_requested(db: sqlite_utils.Database, job_id: int) -> bool:
    """Whether the job was asked to stop."""
    row = db.execute("SELECT cancel_requested FROM prediction_jobs WHERE id = ?", [job_id]).fetchone()
    return bool(row and row[0])


# --- inference -----------------------------------------------------------------------------------

def study_chunks(samples: Sequence[preprocess.Sample], size: int) -> list[list[preprocess.Sample]]:
    """The samples cut into chunks of about ``size`` samples that never split a study (a
    per-image run's study row needs all of its views)."""
    chunks: list[list[preprocess.Sample]] = []
    current: list[preprocess.Sample] = []
    for index, sample in enumerate(samples):
        current.append(sample)
        last_of_study = index + 1 == len(samples) or samples[index + 1].study_id != sample.study_id
        if last_of_study and len(current) >= size:
            chunks.append(current)
            current = []
    if current:
        chunks.append(current)
    return chunks


_PREDICTORS: collections.OrderedDict[int, tuple[Any, Any]] = collections.OrderedDict()  # id(model): (model, wrapper)
_PREDICTORS_LOCK = threading.Lock()


def predictor_for(model: Any, backbone: Any) -> Any:
    """The run's model behind the input pipeline it was trained with: (N, H, W, 1) grey in
    [0, 1] → (N, 1) probability.

    Kept for the last ``runs.MODEL_CACHE_SIZE`` models (as ``runs.load_model`` keeps them):
    each new wrapper traces its predict step again (tens of seconds for a DenseNet121 on a
    CPU), which a second job on the same run need not pay. The wrapper holds its model, so
    the cache is bounded rather than weak.
    """
    with _PREDICTORS_LOCK:
        entry = _PREDICTORS.get(id(model))
        if entry is None or entry[0] is not model:
            entry = (model, preprocess.with_input_pipeline(model, backbone))
            _PREDICTORS[id(model)] = entry
        _PREDICTORS.move_to_end(id(model))
        while len(_PREDICTORS) > runs.MODEL_CACHE_SIZE:
            _PREDICTORS.popitem(last=False)
        return entry[1]


def predict_chunk(predictor: Any, images: np.ndarray, batch_size: int) -> np.ndarray:
    """(N, H, W) float16/float32 grey in [0, 1] → (N,) float64 raw probabilities, ``batch_size`` per step."""
    x = np.asarray(images, dtype=np.float32)[..., None]
    return np.asarray(predictor.predict(x, batch_size=max(1, batch_size), verbose=0), dtype=np.float64).reshape(-1)


def study_rows(samples: Sequence[preprocess.Sample], raw: np.ndarray, calibration: dict[str, Any] | None,
               labels: dict[int, int | None], study_calibration: dict[str, Any] | None = None,
               aggregate: str = "max") -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Image and study rows for :func:`runs.store_external_predictions` from each sample's raw output.

    A sample's probability belongs to each of its images (a composite's two views share it);
    a study's raw score aggregates its samples as training did (``aggregate``: ``max`` or
    ``mean`` over a per-image run's views; a composite's one sample), calibrated by the run's
    study calibration (``results["study_calibration"]``, fitted on validation studies; runs
    without one: the image calibration). ``raw_probability`` is None when the run is not calibrated.
    """
    calibrated = studystats.apply_calibration(calibration, raw)
    keep_raw = bool(calibration) and calibration.get("method", "none") != "none"
    images, scores = [], {}
    for sample, p_raw, p in zip(samples, raw, calibrated, strict=True):
        for image_id in sample.image_ids:
            images.append({"image_id": image_id, "label": labels.get(sample.study_id), "probability": float(p),
                           "raw_probability": float(p_raw) if keep_raw else None})
        scores.setdefault(sample.study_id, []).append(float(p_raw))
    raw_scores = np.array([max(v) if aggregate == "max" else float(np.mean(v)) for v in scores.values()], dtype=np.float64)
    top = studystats.apply_calibration(study_calibration if study_calibration is not None else calibration, raw_scores)
    studies = [{"study_id": sid, "label": labels.get(sid), "probability": float(p),
                "raw_probability": float(raw_score) if keep_raw else None}
               for sid, raw_score, p in zip(scores, raw_scores, top, strict=True)]
    return images, studies


def current_labels(db: sqlite_utils.Database, study_ids: Sequence[int]) -> dict[int, int | None]:
    """{study id: 1 metastatic, 0 not, None without a training label} (``review.study_statuses``)."""
    statuses = study_statuses(db, study_ids)
    return {sid: LABEL_VALUES.get(statuses[sid].label) if sid in statuses else None for sid in study_ids}


def predict_studies(db: sqlite_utils.Database, db_path: str | os.PathLike[str], run: runs.Run, study_ids: Sequence[int],
                    reporter: Reporter | None = None, chunk: int | None = None) -> dict[str, Any]:
    """Predict and store studies under a run (no Grad-CAM: :func:`explain_studies`); batched.

    Args:
        run: a finished run.
        study_ids: studies outside its split (checked by :func:`choose_studies`).
        reporter: progress (phase ``predicting``, in studies) and cancel, polled between chunks.
        chunk: samples per chunk (default 4 batches of the run's batch size); whole studies.

    Returns:
        ``{"n_studies", "n_images", "n_labelled", "n_without_images", "predict_seconds",
        "images_per_second"}`` (studies and images predicted; studies skipped for having no image).

    Raises:
        PredictionCancelled: the reporter asked to stop (chunks done so far stay stored).
        runs.ModelUnavailable: the run's model cannot be loaded.
    """
    settings = run.settings
    labels = current_labels(db, study_ids)
    samples = preprocess.list_samples(db, dict.fromkeys(study_ids, 0), settings.view_mode)
    chunks = study_chunks(samples, chunk or 4 * settings.batch_size)
    model, backbone, size = runs.load_model(db_path, run)
    predictor = predictor_for(model, backbone)
    calibration = run.results.facts.get("calibration")
    study_calibration = run.results.facts.get("study_calibration")
    n_studies = len({s.study_id for s in samples})
    done_studies = n_images = 0
    started = time.monotonic()

    def load(part: list[preprocess.Sample]) -> np.ndarray:
        # In the loader thread, with its own connection (a SQLite connection stays in its thread).
        with dbm.opened(db_path) as own:
            return preprocess.load_images(own, part, size, settings.view_mode)

    with ThreadPoolExecutor(max_workers=1) as loader:
        pending = loader.submit(load, chunks[0]) if chunks else None
        for index, part in enumerate(chunks):
            images = pending.result()
            # The next chunk decodes while this one is in the model.
            pending = loader.submit(load, chunks[index + 1]) if index + 1 < len(chunks) else None
            if reporter is not None and reporter.cancelled():
                if pending is not None:
                    pending.cancel()
                raise PredictionCancelled("prediction cancelled")
            raw = predict_chunk(predictor, images, settings.batch_size)
            image_rows, rows = study_rows(part, raw, calibration, labels, study_calibration, settings.study_aggregate)
            runs.store_external_predictions(db, run.id, image_rows, rows)
            done_studies += len(rows)
            n_images += len(image_rows)
            if reporter is not None:
                elapsed = time.monotonic() - started
                reporter.progress({"phase": "predicting", "batch": done_studies, "batches": n_studies,
                                   "eta_s": round(elapsed / done_studies * (n_studies - done_studies), 1)})
    seconds = time.monotonic() - started
    return {"n_studies": done_studies, "n_images": n_images,
            "n_labelled": sum(labels[s] is not None for s in {s.study_id for s in samples}),
            "n_without_images": len(study_ids) - n_studies, "predict_seconds": round(seconds, 3),
            "images_per_second": round(len(samples) / seconds, 3) if seconds > 0 else None}


def explain_studies(db: sqlite_utils.Database, db_path: str | os.PathLike[str], run_id: int, study_ids: Sequence[int],
                    reporter: Reporter | None = None) -> int:
    """Grad-CAM maps of the studies' externally predicted images (``explain.explain_images``:
    computed once, stored in ``explanations``), :data:`STUDIES_PER_EXPLAIN` studies per call.
    Returns how many images were explained.

    Raises:
        PredictionCancelled: the reporter asked to stop (maps stored so far stay).
    """
    from bonescan_core import explain  # Keras-heavy; the job has loaded the model already

    wanted = set(study_ids)
    by_study: dict[int, list[int]] = {}
    for image_id, study_id in db.execute(
            "SELECT p.image_id, i.study_id FROM predictions p JOIN images i ON i.id = p.image_id "
            "WHERE p.run_id = ? AND p.subset = 'external' ORDER BY i.study_id, p.image_id", [run_id]):
        if study_id in wanted:
            by_study.setdefault(study_id, []).append(image_id)
    order = list(by_study)
    explained = 0
    for start in range(0, len(order), STUDIES_PER_EXPLAIN):
        if reporter is not None and reporter.cancelled():
            raise PredictionCancelled("prediction cancelled while explaining")
        group = order[start : start + STUDIES_PER_EXPLAIN]
        image_ids = [i for sid in group for i in by_study[sid]]
        explain.explain_images(db, db_path, run_id, image_ids)
        explained += len(image_ids)
        if reporter is not None:
            done = start + len(group)
            # The last step is always written (progress is throttled), so a finished job reads as complete.
            reporter.progress({"phase": "explaining", "batch": done, "batches": len(order), "eta_s": None},
                              force=done == len(order))
    return explained


def run_job(db: sqlite_utils.Database, db_path: str | os.PathLike[str], job: PredictionJob, reporter: Reporter,
            explain_maps: bool = True) -> dict[str, Any]:
    """A claimed job's body: predict its studies, then their Grad-CAM maps; returns its result
    (:func:`predict_studies`' counts and ``explained``, with ``explain_seconds``).

    Raises:
        PredictionCancelled: cancel was asked for.
    """
    run = runs.get(db, job.run_id)
    result = predict_studies(db, db_path, run, job.study_ids, reporter)
    reporter.progress({"phase": "explaining", "batch": 0, "batches": result["n_studies"], "eta_s": None}, force=True)
    started = time.monotonic()
    result["explained"] = explain_studies(db, db_path, run.id, job.study_ids, reporter) if explain_maps else 0
    result["explain_seconds"] = round(time.monotonic() - started, 3)
    return result


def external_studies(db: sqlite_utils.Database, run_id: int, cohort: str | None = None) -> list[int]:
    """Study ids with an external prediction of the run (of ``cohort`` only, if given), sorted."""
    return [row[0] for row in db.execute(
        "SELECT p.study_id FROM study_predictions p JOIN studies s ON s.id = p.study_id "
        "WHERE p.run_id = ? AND p.subset = 'external' AND (? IS NULL OR s.cohort = ?) ORDER BY p.study_id",
        [run_id, cohort, cohort]).fetchall()]


def external_stamp(db: sqlite_utils.Database, run_id: int) -> tuple[int, int]:
    """(the run's external study rows, its newest finished prediction job id): changes whenever
    a prediction lands, so a page can cache what it derives from them on this key."""
    rows = db.execute("SELECT COUNT(*) FROM study_predictions WHERE run_id = ? AND subset = 'external'", [run_id]).fetchone()[0]
    newest = db.execute("SELECT COALESCE(MAX(id), 0) FROM prediction_jobs WHERE run_id = ? AND status NOT IN "
                        "('queued', 'running')", [run_id]).fetchone()[0]
    return int(rows), int(newest)
