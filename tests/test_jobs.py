"""The runs queue: enqueue, duplicates, cancel, claim, and dead workers becoming `interrupted`."""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO

from bonescan_core import db as dbm
from bonescan_core import errors, jobs, runs


def enqueue(db, name="resnet50", config_hash="h1"):
    return jobs.enqueue(db, name, {"backbone": name, "epochs": 1}, config_hash)


def test_enqueue_rejects_an_identical_active_run(db):
    first = enqueue(db)
    with pytest.raises(jobs.DuplicateRun) as raised:
        enqueue(db)
    assert raised.value.run_id == first and "already queued" in str(raised.value)
    second = enqueue(db, config_hash="h2")
    assert [r.id for r in runs.list_runs(db)] == [second, first]
    assert jobs.request_cancel(db, first) == "cancelled"
    third = enqueue(db)  # the cancelled one no longer blocks
    assert runs.get(db, third).status == "queued"


def test_claim_takes_the_oldest_and_cancel_flags_a_running_run(db):
    first, second = enqueue(db), enqueue(db, config_hash="h2")
    run = jobs.claim_next(db)
    assert run.id == first and run.status == "running" and run.worker_pid == os.getpid()
    assert jobs.request_cancel(db, first) == "running"
    assert runs.get(db, first).cancel_requested is True
    assert jobs.claim_next(db).id == second
    assert jobs.claim_next(db) is None
    with pytest.raises(errors.RunNotFound):
        jobs.request_cancel(db, 999)


def test_stale_heartbeat_becomes_interrupted(db):
    run_id = enqueue(db)
    jobs.claim_next(db)
    with dbm.write(db):
        db.execute("UPDATE runs SET heartbeat_at = '2000-01-01T00:00:00.000000Z' WHERE id = ?", [run_id])
    assert jobs.mark_interrupted(db) == [run_id]
    run = runs.get(db, run_id)
    assert run.status == "interrupted" and "enqueue the run again" in run.error


CLAIM_AND_HANG = """
import sys, time
from bonescan_core import db as dbm, jobs
with dbm.opened(sys.argv[1]) as db:
    run = jobs.claim_next(db)
print(run.id, flush=True)
time.sleep(600)
"""


def test_a_killed_worker_leaves_its_run_interrupted_when_a_new_worker_starts(db_path, db, monkeypatch):
    run_id = enqueue(db)
    hung = subprocess.Popen([sys.executable, "-c", CLAIM_AND_HANG, str(db_path)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert int(hung.stdout.readline()) == run_id
    assert runs.get(db, run_id).status == "running"
    os.kill(hung.pid, signal.SIGKILL)
    hung.wait(timeout=10)
    assert jobs.mark_interrupted(db) == [], "heartbeat still fresh: not yet stale"
    monkeypatch.setattr(jobs, "STALE_AFTER_S", 3600.0)  # only the dead process can tell, not the heartbeat's age
    said = []
    assert jobs.run_worker(db_path, once=True, echo=said.append) == 0
    assert said == [f"run {run_id}: interrupted (its worker is gone)"]
    assert runs.get(db, run_id).status == "interrupted"
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_background_worker_is_alive_then_stops_when_idle(db_path, db):
    assert not jobs.worker_alive(db)
    assert jobs.ensure_worker(db_path, idle_exit_s=2.0) is True
    deadline = time.monotonic() + 30
    while not jobs.worker_alive(db) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert jobs.worker_alive(db)
    assert jobs.ensure_worker(db_path) is False, "one worker is enough"
    jobs.request_cancel(db, enqueue(db))  # the worker must not pick up a cancelled run
    deadline = time.monotonic() + 30
    while jobs.worker_alive(db) and time.monotonic() < deadline:  # it exits after 2 s with nothing to do
        time.sleep(0.2)
    assert not jobs.worker_alive(db)


def test_reporter_writes_progress_while_cancel_is_polled_every_batch(db_path, db):
    """Training polls cancel every batch and reports progress every interval: both must happen."""
    run_id = enqueue(db)
    jobs.claim_next(db)
    reporter = jobs.DatabaseReporter(db_path, run_id, every_s=0.05)
    try:
        for step in range(40):
            assert reporter.cancelled() is False  # polled at every batch, before the progress report
            if step % 5 == 0:
                reporter.progress({"phase": "full", "batch": step})
            time.sleep(0.011)
        assert runs.get(db, run_id).progress["batch"] >= 30
        jobs.request_cancel(db, run_id)
        time.sleep(0.06)
        assert reporter.cancelled() is True
    finally:
        reporter.close()
