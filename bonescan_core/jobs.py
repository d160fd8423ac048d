"""The job queue (runs waiting to train) and the worker that trains one run at a time.

The Streamlit app never trains in its own process: it enqueues a run and, if no worker is
alive, starts ``bonescan worker`` in the background. The worker claims the oldest queued
run, writes progress and a heartbeat to the database, honours cancel within a few batches,
and records the outcome. A run whose worker died is marked ``interrupted`` once its
heartbeat is older than ``STALE_AFTER_S`` or when a new worker starts. Prediction jobs
(:mod:`bonescan_core.prediction`: a finished run's model over studies outside its split)
share the worker, the reporter and these rules; a queued prediction goes before queued runs.

Runs are read and written through the run store (:mod:`bonescan_core.runs`); this module
holds the queue's rules (duplicates, claiming, cancel, orphaned runs) and the worker: it
trains a claimed run (``training.train_run``), stores what training returned, and then, as
a post-run step, precomputes the run's Grad-CAM maps (:func:`precompute_explanations`).

TensorFlow is imported only when a run actually trains (``execute_run``), never by the app.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

from bonescan_core import assessment, errors, explain, prediction, runs, splits, training
from bonescan_core import db as dbm
from bonescan_core.heavy import keras_module, sqlite_utils

STATUSES = ("queued", "running", "done", "failed", "cancelled", "interrupted")
ACTIVE = ("queued", "running")
STALE_AFTER_S = 30.0
HEARTBEAT_EVERY_S = 5.0
WORKER_KEY = "worker"  # settings row: {"pid": ..., "heartbeat_at": ..., "host": ...}
WORKER_ALIVE_S = 15.0


class DuplicateRun(errors.Conflict):
    """An identical run is already queued or running; ``run_id`` says which."""

    def __init__(self, run_id: int, status: str) -> None:
        super().__init__(f"an identical run is already {status} (run {run_id}); wait for it or cancel it")
        self.run_id = run_id
        self.status = status


def _seconds_since(timestamp: str | None) -> float:
    if not timestamp:
        return float("inf")
    then = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    now = datetime.fromisoformat(dbm.utc_now().replace("Z", "+00:00"))
    return (now - then).total_seconds()


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- the queue ------------------------------------------------------------------------------

def enqueue(db: sqlite_utils.Database, backbone: str, config: Mapping[str, Any], config_hash: str) -> int:
    """Add a queued run; returns its id.

    Args:
        backbone: the run's backbone (the same as ``config["backbone"]``).
        config: the run's settings (``TrainConfig.to_dict()``, or a dict of some of them);
            what training learns is stored apart from them.
        config_hash: identity of the settings; an identical queued/running run is a duplicate.

    Raises:
        DuplicateRun: an identical run is already queued or running.
        ValueError: the settings are not a valid ``TrainConfig``.
    """
    settings = runs.TrainConfig.from_json({"backbone": backbone, **config})
    with dbm.write(db):
        duplicate = runs.active_with_hash(db, config_hash)
        if duplicate:
            raise DuplicateRun(*duplicate)
        return runs.insert_queued(db, settings, config_hash)


class Queued(NamedTuple):
    """One run of :func:`enqueue_backbones`: its new run, or the identical run already waiting."""

    backbone: str
    run_id: int | None  # None when ``duplicate``
    duplicate: DuplicateRun | None = None
    seed: int | None = None  # the run's seed (repeats differ by it)
    repeat_group: int | None = None  # the group's first run id, when queued as one of several repeats

    @property
    def message(self) -> str:
        """``run 7 (vgg19) queued``, ``run 8 (vgg19, seed 1, repeat group 7) queued``, or
        ``vgg19: an identical run is already queued (run 5); ...``."""
        if self.duplicate:
            return f"{self.backbone}: {self.duplicate}"
        group = f", seed {self.seed}, repeat group {self.repeat_group}" if self.repeat_group is not None else ""
        return f"run {self.run_id} ({self.backbone}{group}) queued"


def enqueue_backbones(db: sqlite_utils.Database, backbones: Sequence[str], config: runs.TrainConfig,
                      split_id: int | None = None, cohorts: Sequence[str] | None = None,
                      repeats: int = 1, resplit: bool = False) -> list[Queued]:
    """Fix the split(s), then queue ``repeats`` runs per backbone with ``config``'s other settings.

    The split is fixed before any run is queued, so the backbones train and are compared on
    the same images: ``split_id``, else ``config.split_id``, else the latest split of the
    current labels with ``config.seed`` from ``cohorts`` (None: every cohort; made now if there
    is none).

    Repeats (issue 11: seed variability is the noise floor of any comparison): repeat k
    (0-based) trains with seed ``config.seed + k``. Without ``resplit`` every repeat uses the one
    split above, so only the model's seed varies; with ``resplit`` repeat k uses the
    patient-grouped split made with seed ``config.seed + k`` (found or made as above), so the
    split varies too. Each backbone's new runs form one repeat group (``runs.repeat_group``, the
    id of its first new run) when there are at least two; repeat k of every backbone shares a
    split, so backbones stay comparable repeat by repeat.

    Returns:
        One :class:`Queued` per (repeat, backbone), repeat by repeat; a run whose identical
        run is already queued or running gets that duplicate instead (and is not in the group).

    Raises:
        errors.InputError: ``repeats`` below 1, or ``resplit`` with a fixed split.
        splits.SplitError: too few labelled studies to split.
    """
    if repeats < 1:
        raise errors.InputError(f"repeats must be at least 1; got {repeats}")
    fixed = split_id if split_id is not None else config.split_id
    if resplit and fixed is not None:
        raise errors.InputError("resplit makes one split per repeat: drop the fixed split (--split), or drop --resplit")
    seeds = [config.seed + k for k in range(repeats)]
    if resplit:  # every split is made before any run is queued: a seed that cannot split queues nothing
        split_of = [splits.ensure_split(db, seed=seed, cohorts=cohorts) for seed in seeds]
    else:
        split_of = [fixed if fixed is not None else splits.ensure_split(db, seed=config.seed, cohorts=cohorts)] * repeats
    queued = []
    for seed, split in zip(seeds, split_of, strict=True):
        for backbone in backbones:
            run_config = replace(config, backbone=backbone, split_id=split, seed=seed)
            try:
                queued.append(Queued(backbone, enqueue(db, backbone, run_config.to_dict(), run_config.identity_hash()), seed=seed))
            except DuplicateRun as duplicate:
                queued.append(Queued(backbone, None, duplicate, seed=seed))
    if repeats < 2:
        return queued
    groups = {}
    for backbone in backbones:
        new = [q.run_id for q in queued if q.backbone == backbone and q.run_id is not None]
        if len(new) >= 2:
            groups[backbone] = runs.set_repeat_group(db, new)
    return [q._replace(repeat_group=groups.get(q.backbone)) if q.run_id is not None else q for q in queued]


def request_cancel(db: sqlite_utils.Database, run_id: int) -> str:
    """Ask a run to stop: a queued run is cancelled at once, a running one within a few
    batches. Returns the run's status afterwards."""
    with dbm.write(db):
        status = runs.status_of(db, run_id)  # errors.RunNotFound
        if status == "queued":
            runs.finish(db, run_id, "cancelled")
            return "cancelled"
        if status == "running":
            runs.request_cancel(db, run_id)
        return status


def mark_interrupted(db: sqlite_utils.Database, worker_starting: bool = False) -> list[int]:
    """Mark running runs whose worker is gone as ``interrupted``; returns their ids.

    A run is orphaned when its heartbeat is older than STALE_AFTER_S, or, when a new worker
    starts on this machine, when its worker process no longer exists.
    """
    orphaned = []
    with dbm.write(db):
        for run_id, heartbeat_at, pid in runs.running(db):
            stale = _seconds_since(heartbeat_at) > STALE_AFTER_S
            dead = worker_starting and not _pid_alive(pid)
            if stale or dead:
                runs.finish(db, run_id, "interrupted", "the worker stopped while training (killed, crashed or the machine "
                            "restarted); enqueue the run again")
                orphaned.append(run_id)
    return orphaned


def mark_predictions_interrupted(db: sqlite_utils.Database, worker_starting: bool = False) -> list[int]:
    """:func:`mark_interrupted` for prediction jobs; returns their ids."""
    orphaned = []
    with dbm.write(db):
        for job_id, heartbeat_at, pid in prediction.running(db):
            if _seconds_since(heartbeat_at) > STALE_AFTER_S or (worker_starting and not _pid_alive(pid)):
                prediction.finish(db, job_id, "interrupted", "the worker stopped while predicting (killed, crashed or the "
                                  "machine restarted); predict again: studies already stored are replaced")
                orphaned.append(job_id)
    return orphaned


def claim_next(db: sqlite_utils.Database, run_id: int | None = None) -> runs.Run | None:
    """Take the oldest queued run (or the given one) and mark it running by this process."""
    with dbm.write(db):
        claimed = runs.next_queued(db, run_id)
        if claimed is None:
            return None
        runs.mark_running(db, claimed, os.getpid())
    return runs.get(db, claimed)


# --- the worker -----------------------------------------------------------------------------

def worker_alive(db: sqlite_utils.Database) -> bool:
    """Whether a worker process is alive: one is training (a running run's heartbeat is
    fresh), or an idle worker's heartbeat is fresh and its pid exists."""
    for _, heartbeat_at, _ in [*runs.running(db), *prediction.running(db)]:
        if _seconds_since(heartbeat_at) < STALE_AFTER_S:
            return True
    row = db.execute("SELECT value FROM settings WHERE key = ?", [WORKER_KEY]).fetchone()
    if row is None:
        return False
    info = json.loads(row[0])
    if info.get("state") == "stopped":
        return False
    same_host = info.get("host") == os.uname().nodename
    fresh = _seconds_since(info.get("heartbeat_at")) < WORKER_ALIVE_S
    return fresh and (not same_host or _pid_alive(info.get("pid")))


def _worker_heartbeat(db: sqlite_utils.Database, state: str) -> None:
    value = json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "heartbeat_at": dbm.utc_now(), "state": state})
    with dbm.write(db):
        db["settings"].upsert({"key": WORKER_KEY, "value": value}, pk="key")


def start_worker(db_path: Path, idle_exit_s: float = 600.0) -> int:
    """Start ``bonescan worker`` in the background (own session, log in this database's runs
    folder: ``runs.run_folder(db_path) / "worker.log"``); returns its pid. It exits after
    ``idle_exit_s`` with an empty queue."""
    log_dir = runs.run_folder(db_path)
    log_dir.mkdir(parents=True, exist_ok=True)
    with (log_dir / "worker.log").open("ab") as log:  # the child keeps its own handle
        process = subprocess.Popen(
            [sys.executable, "-m", "bonescan_core", "--db", str(Path(db_path).resolve()), "worker",
             "--idle-exit", str(idle_exit_s)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            cwd=str(Path(__file__).resolve().parents[1]),
        )
    return process.pid


def autostart_enabled() -> bool:
    """Whether the app starts workers itself (``BONESCAN_AUTOSTART_WORKER=0`` turns it off,
    e.g. on a GPU server where a worker is started by hand)."""
    return os.environ.get("BONESCAN_AUTOSTART_WORKER", "1") != "0"


def ensure_worker(db_path: Path, idle_exit_s: float = 600.0) -> bool:
    """Start a worker unless one is alive or autostart is off; returns True if one was started."""
    if not autostart_enabled():
        return False
    with dbm.opened(db_path) as db:
        if worker_alive(db):
            return False
    start_worker(db_path, idle_exit_s)
    return True


@dataclass
class DatabaseReporter:
    """Training progress into the run store (``training.Reporter`` protocol), or a prediction
    job's into its rows (``store=prediction``: the same ``heartbeat``, ``set_progress`` and
    ``cancel_requested`` functions, keyed by the job's id as ``run_id``).

    Progress is written at most every ``every_s`` seconds; cancel is read as often.
    A separate thread keeps the heartbeat fresh while a long step (model build, feature
    extraction, a slow batch) gives no progress callbacks.
    """

    db_path: Path
    run_id: int
    every_s: float = 0.5
    echo: Callable[[dict], None] | None = None  # e.g. a terminal progress bar
    store: Any = runs  # the module that keeps the rows: runs, or prediction for prediction jobs

    def __post_init__(self) -> None:
        self._last_write = 0.0
        self._last_cancel_check = 0.0
        self._cancelled = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_EVERY_S):
            try:
                with dbm.opened(self.db_path) as db:
                    self.store.heartbeat(db, self.run_id)
            except Exception:  # noqa: BLE001 - a missed beat must never kill training
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=HEARTBEAT_EVERY_S + 1)

    def progress(self, fields: dict, force: bool = False) -> None:
        """Write ``fields`` as the run's progress (at most every ``every_s`` unless ``force``)."""
        if self.echo:
            self.echo(fields)
        now = time.monotonic()
        if now - self._last_write < self.every_s and not force:
            return
        self._last_write = now
        with dbm.opened(self.db_path) as db:
            self.store.set_progress(db, self.run_id, fields)
            self._cancelled = self.store.cancel_requested(db, self.run_id)

    def epoch_done(self, epoch: int, phase: str, logs: dict, seconds: float, train_images_per_second: float) -> None:
        with dbm.opened(self.db_path) as db:
            runs.add_epoch(db, self.run_id, epoch, phase, logs, seconds, train_images_per_second)

    def cancelled(self) -> bool:
        if not self._cancelled:  # also read between progress writes, so cancel is seen within a few batches
            now = time.monotonic()
            if now - self._last_cancel_check >= self.every_s:
                self._last_cancel_check = now
                with dbm.opened(self.db_path) as db:
                    self._cancelled = self.store.cancel_requested(db, self.run_id)
        return self._cancelled


def execute_run(db_path: Path, run: runs.Run, echo: Callable[[dict], None] | None = None,
                explain_maps: bool = True) -> str:
    """Train one claimed run and store what training returned (``runs.record_result``); then,
    for a done run and ``explain_maps``, precompute its Grad-CAM maps (the run is already
    ``done`` meanwhile: maps are only a cache; without them the maps follow on first view or
    from an idle worker, :func:`run_to_explain`). Returns the final status."""

    reporter = DatabaseReporter(Path(db_path), run.id, echo=echo)
    status, error = "done", None
    try:
        with dbm.opened(db_path) as db:
            result = training.train_run(db, run.settings, reporter, runs.model_file(db_path, run.id))
            runs.record_result(db, db_path, run.id, result)
    except training.TrainingCancelled:
        status = "cancelled"
    except KeyboardInterrupt:
        status, error = "interrupted", "stopped by the user (Ctrl-C or SIGTERM); enqueue the run again"
    except Exception as exc:  # noqa: BLE001 - recorded on the run, with the traceback in the worker log
        traceback.print_exc()
        status, error = "failed", f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
    with dbm.opened(db_path) as db:
        runs.finish(db, run.id, status, error)
    try:
        if status == "done" and explain_maps:
            precompute_explanations(db_path, run.id, reporter)
    except Exception:  # noqa: BLE001 - a map that fails here is computed (and its error shown) on first view
        traceback.print_exc()
    finally:
        reporter.close()
    return status


def precompute_explanations(db_path: Path, run_id: int, reporter: DatabaseReporter) -> int:
    """Grad-CAM maps of every predicted (validation and test) image, cached, so the
    Evaluate page's explorer never waits for one. One study at a time: its images go through
    the model together (``explain.explain_images``: one batched pass, one write). Stops
    early, between studies, on cancel and as soon as another run or a prediction job is queued
    (they come first; a missing map is computed on first view). Returns how many predicted images were
    explained."""

    with dbm.opened(db_path) as db:
        studies = runs.unexplained_by_study(db, run_id)
        computed = done = 0
        for image_ids in studies.values():
            if reporter.cancelled() or runs.any_queued(db) or prediction.any_queued(db):
                break
            explain.explain_images(db, db_path, run_id, image_ids)
            computed, done = computed + len(image_ids), done + 1
            reporter.progress({"phase": "explaining", "batch": done, "batches": len(studies)})
    if studies:  # where it ended, unthrottled: the Train page shows it
        reporter.progress({"phase": "explaining", "batch": done, "batches": len(studies)}, force=True)
    return computed


def run_to_explain(db: sqlite_utils.Database, skip: Iterable[int] = ()) -> int | None:
    """The newest done run with a predicted image that has no Grad-CAM map yet (not in
    ``skip``), or None: what an idle worker explains while nothing is queued."""
    skipped = sorted(set(skip))
    marks = ", ".join("?" for _ in skipped) or "-1"  # NOT IN (NULL) would exclude every run
    row = db.execute(
        f"""SELECT r.id FROM runs r WHERE r.status = 'done' AND r.id NOT IN ({marks}) AND EXISTS (
                SELECT 1 FROM predictions p WHERE p.run_id = r.id AND NOT EXISTS (
                    SELECT 1 FROM explanations e WHERE e.run_id = p.run_id AND e.image_id = p.image_id))
            ORDER BY r.id DESC LIMIT 1""", skipped).fetchone()
    return None if row is None else int(row[0])


def explain_pending(db_path: Path, skip: set[int]) -> int | None:
    """Explain one done run's missing maps (:func:`run_to_explain`); returns its id, or None if
    there is none. A run none of whose maps could be made is added to ``skip`` (tried once per
    worker); one interrupted by a queued run is resumed on a later call."""
    with dbm.opened(db_path) as db:
        run_id = run_to_explain(db, skip)
    if run_id is None:
        return None
    reporter = DatabaseReporter(Path(db_path), run_id)
    computed = 0
    try:
        computed = precompute_explanations(db_path, run_id, reporter)
    except Exception:  # noqa: BLE001 - the map that fails is computed (and its error shown) on first view
        traceback.print_exc()
    finally:
        reporter.close()
    if computed == 0:
        skip.add(run_id)
    return run_id


def evaluate_pending(db_path: Path, skip: set[int]) -> int | None:
    """Store one stale evaluation of a done run (``assessment.stale_evaluations``, not in
    ``skip``), so the Evaluate page's first load reads it; returns the run id, or None if none
    is stale. A run whose evaluation fails is added to ``skip`` (the page shows the error)."""
    with dbm.opened(db_path) as db:
        pending = [(run_id, unit) for run_id, unit in assessment.stale_evaluations(db) if run_id not in skip]
        if not pending:
            return None
        run_id, unit = pending[0]
        try:
            assessment.stored_evaluation(db, run_id, unit=unit)
        except Exception:  # noqa: BLE001 - shown by the page that asks for it
            traceback.print_exc()
            skip.add(run_id)
    return run_id


def execute_prediction(db_path: Path, job: prediction.PredictionJob, echo: Callable[[dict], None] | None = None) -> str:
    """Run one claimed prediction job (``prediction.run_job``: predictions, then Grad-CAM maps)
    and record its outcome; returns the final status (``done``, ``cancelled``, ``failed`` or
    ``interrupted``)."""
    reporter = DatabaseReporter(Path(db_path), job.id, echo=echo, store=prediction)
    status, error, result = "done", None, None
    try:
        with dbm.opened(db_path) as db:
            result = prediction.run_job(db, db_path, job, reporter)
    except prediction.PredictionCancelled:
        status = "cancelled"
    except KeyboardInterrupt:
        status, error = "interrupted", "stopped by the user (Ctrl-C or SIGTERM); predict again"
    except Exception as exc:  # noqa: BLE001 - recorded on the job, with the traceback in the worker log
        traceback.print_exc()
        status, error = "failed", f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
    finally:
        reporter.close()
    with dbm.opened(db_path) as db:
        prediction.finish(db, job.id, status, error, result)
    return status


def run_worker(db_path: Path, once: bool = False, idle_exit_s: float | None = None, poll_s: float = 2.0,
               echo: Callable[[str], None] = print) -> int:
    """The worker loop: one run or prediction job at a time until the queue is empty (``once``)
    or forever (until ``idle_exit_s`` seconds pass with nothing to do). Returns the number of
    runs and jobs done."""
    db_path = Path(db_path)
    with dbm.opened(db_path) as db:
        for run_id in mark_interrupted(db, worker_starting=True):
            echo(f"run {run_id}: interrupted (its worker is gone)")
        for job_id in mark_predictions_interrupted(db, worker_starting=True):
            echo(f"prediction job {job_id}: interrupted (its worker is gone)")
    done = 0
    idle_since = time.monotonic()
    explained: set[int] = set()
    evaluated: set[int] = set()
    warmed = False
    try:
        while True:
            with dbm.opened(db_path) as db:
                mark_interrupted(db)
                mark_predictions_interrupted(db)
                _worker_heartbeat(db, "idle")
                job = prediction.claim_next(db)  # short, and someone waits for it: before queued runs
                run = claim_next(db) if job is None else None
            if job is not None:
                echo(f"prediction job {job.id}: run {job.run_id} over {len(job.study_ids)} studies started")
                with dbm.opened(db_path) as db:
                    _worker_heartbeat(db, f"predicting {job.id}")
                echo(f"prediction job {job.id}: {execute_prediction(db_path, job)}")
                done += 1
                idle_since = time.monotonic()
                continue
            if run is None:
                # Nothing to train: make the maps a run trained without them still lacks (e.g. by
                # `bonescan train`, which returns as soon as the model is trained).
                if not once and explain_pending(db_path, explained) is not None:
                    idle_since = time.monotonic()
                    continue
                if not once and evaluate_pending(db_path, evaluated) is not None:
                    idle_since = time.monotonic()
                    continue
                if once or (idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s):
                    return done
                if not warmed:  # import Keras while idle: a run queued from the Train page then waits for no import
                    keras_module()
                    warmed = True
                    continue
                time.sleep(poll_s)
                continue
            echo(f"run {run.id}: {run.backbone} started")
            with dbm.opened(db_path) as db:
                _worker_heartbeat(db, f"running {run.id}")
            status = execute_run(db_path, run)
            echo(f"run {run.id}: {status}")
            done += 1
            idle_since = time.monotonic()
    finally:
        with dbm.opened(db_path) as db:
            _worker_heartbeat(db, "stopped")
