"""Faults from outside: a worker killed mid-epoch, the database locked by another writer, a
corrupted weights file, a full disk while the model is written. Each ends in a clear state
(interrupted / waited / failed with the reason) and a database that passes integrity_check."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, tiny_run

from bonescan_core import db as dbm
from bonescan_core import jobs, runs
from bonescan_core import review as rv
from bonescan_core.ingest import add_demo_studies


def enqueue(db, **settings) -> int:
    config = tiny_run(**{"batch_size": 4, "augment": {}, **settings})
    return jobs.enqueue(db, config.backbone, config.to_dict(), config.identity_hash())


def integrity(db_path: Path) -> str:
    with dbm.opened(db_path) as db:
        return db.execute("PRAGMA integrity_check").fetchone()[0]


HOLD_THE_WRITE_LOCK = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
conn.execute("INSERT INTO settings (key, value) VALUES ('held_by_another_writer', '1')")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
"""


def test_writes_wait_for_another_writer_and_none_is_lost(db_path, db, studies):
    hold_s = 3.0
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_WRITE_LOCK, str(db_path), str(hold_s)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    started_while_held: list[bool] = []
    errors: list[BaseException] = []

    def save_reviews(reader: str) -> None:
        try:
            for i in range(5):
                started_while_held.append(holder.poll() is None)  # the holder commits, then exits
                with dbm.opened(db_path) as conn:  # a fresh connection per save, as the Review page does
                    rv.add_review(conn, rv.Review(studies[i % len(studies)], reader, "include", label="metastatic",
                                                  criteria=("typical_pattern",), note=f"{reader}-{i}"))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    readers = [threading.Thread(target=save_reviews, args=(f"reader{n}",)) for n in range(3)]
    for thread in readers:
        thread.start()
    for thread in readers:
        thread.join(timeout=60)
    assert holder.wait(timeout=30) == 0
    assert not errors, errors
    assert any(started_while_held), "some saves began while the lock was held, so they waited for it (no error)"
    notes = sorted(row[0] for row in db.execute("SELECT note FROM reviews").fetchall())
    assert notes == sorted(f"reader{n}-{i}" for n in range(3) for i in range(5))
    assert db.execute("SELECT value FROM settings WHERE key = 'held_by_another_writer'").fetchone() == ("1",)
    assert integrity(db_path) == "ok"


def test_a_corrupted_weights_file_fails_the_run_with_a_clear_reason(db_path, db, tmp_path):
    add_demo_studies(db, 12, seed=3)
    broken = tmp_path / "resnet50.weights.h5"
    broken.write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(4096))  # an HDF5 signature, then garbage
    run_id = enqueue(db, backbone="resnet50", weights=str(broken), epochs=1)
    assert jobs.run_worker(db_path, once=True, echo=lambda line: None) == 1
    run = runs.get(db, run_id)
    assert run.status == "failed"
    assert str(broken) in run.error and "weights" in run.error.lower(), run.error
    assert db.execute("SELECT COUNT(*) FROM predictions WHERE run_id = ?", [run_id]).fetchone()[0] == 0
    assert integrity(db_path) == "ok"


@contextlib.contextmanager
def full_disk(folder: Path, monkeypatch: pytest.MonkeyPatch):
    """``folder`` on a 1 MiB tmpfs (a real ENOSPC; needs root, as CI runs). Where mounting is
    not allowed, the model writer itself is made to fail with ENOSPC after writing 1 MiB."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True).returncode == 0
    if not mounted:
        import keras

        def save_until_full(model, path, *args, **kwargs):
            Path(path).write_bytes(b"\0" * (1 << 20))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        monkeypatch.setattr(keras.Model, "save", save_until_full)
    try:
        yield "tmpfs" if mounted else "injected"
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.slow
def test_disk_full_while_saving_the_model_fails_the_run_and_keeps_the_database(db_path, db, monkeypatch):
    add_demo_studies(db, 12, seed=3)
    run_id = enqueue(db, epochs=1)
    folder = runs.run_folder(db_path)  # where this database's models are written
    with full_disk(folder, monkeypatch) as how:
        assert jobs.run_worker(db_path, once=True, echo=lambda line: None) == 1
        leftovers = sorted(p.name for p in folder.rglob("*") if p.is_file() and p.suffix == ".keras")
    run = runs.get(db, run_id)
    assert run.status == "failed", (how, run)
    assert "No space left on device" in run.error, (how, run.error)
    assert leftovers == [], f"half-written model files left behind ({how}): {leftovers}"
    assert run.results.weights_path is None
    assert db.execute("SELECT COUNT(*) FROM predictions WHERE run_id = ?", [run_id]).fetchone()[0] == 0
    assert integrity(db_path) == "ok"
    # With space again, the same settings train to the end.
    again = enqueue(db, epochs=1)
    assert jobs.run_worker(db_path, once=True, echo=lambda line: None) == 1
    assert runs.get(db, again).status == "done"


@pytest.mark.slow
def test_a_worker_killed_mid_epoch_leaves_an_interrupted_run_and_the_next_run_completes(db_path, db):
    add_demo_studies(db, 24, seed=5)
    # A budget no machine finishes before the worker is killed: with 50 epochs, CI's machine once
    # trained them all while the poll below waited.
    run_id = enqueue(db, epochs=100_000, patience=100_000, image_size=(128, 64))
    worker = subprocess.Popen([sys.executable, "-m", "bonescan_core", "--db", str(db_path), "worker", "--idle-exit", "5"],
                              cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        progress: dict = {}
        while time.monotonic() < deadline:  # wait until it is training (progress is written after a batch)
            progress = runs.get(db, run_id).progress or {}
            # Not "batch >= 2": progress is throttled to one write per 0.5 s, and where an epoch
            # takes about that long every write is batch 1, so that wait ran out its 240 s.
            if progress.get("phase") == "full":
                break
            time.sleep(0.2)
        assert progress.get("phase") == "full", f"the worker never reached an epoch: {progress}"
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
    assert runs.get(db, run_id).status == "running", "nobody has noticed yet"
    assert integrity(db_path) == "ok"
    nxt = enqueue(db, epochs=1)
    assert jobs.run_worker(db_path, once=True, echo=lambda line: None) == 1  # a new worker: notices, then trains
    assert runs.get(db, run_id).status == "interrupted"
    assert "worker" in (runs.get(db, run_id).error or "")
    assert runs.get(db, nxt).status == "done"
    assert integrity(db_path) == "ok"
