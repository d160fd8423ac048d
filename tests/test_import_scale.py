"""Import at scale: decode in worker processes, write in batches, progress with rate and ETA,
resumable after a kill (issue 17, point 5). Rates themselves are measured in bench/import_rate.py."""

from __future__ import annotations

import io
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from bad_corpus import make_bad_corpus, make_good_corpus
from conftest import REPO
from PIL import Image

from bonescan_core import cli, decodepool, ingest
from bonescan_core import db as dbm


def write_scans(folder: Path, n_studies: int, seed: int = 0, shape: tuple[int, int] = (128, 64)) -> list[Path]:
    """Two views per study (``NNNN-<0|1>-A/P``), TIFF and 16-bit PNG alternating, every file distinct."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for study in range(n_studies):
        for view in "AP":
            pixels = rng.integers(0, 4000, size=shape, dtype=np.uint16)
            path = folder / f"{study:04d}-{study % 2}-{view}.{'tif' if study % 2 else 'png'}"
            if path.suffix == ".tif":
                tifffile.imwrite(path, pixels)
            else:
                Image.fromarray(pixels).save(path)
            paths.append(path)
    return paths


def mixed_folder(root: Path) -> tuple[Path, dict[str, str]]:
    """Good scans, a copy of one (a duplicate), the good corpus and the whole bad corpus."""
    folder = root / "mixed"
    write_scans(folder / "pairs", 12)
    shutil.copy(folder / "pairs" / "0003-1-A.tif", folder / "zz-copy-of-0003.tif")
    make_good_corpus(folder / "good")
    bad = make_bad_corpus(folder / "bad")
    return folder, bad


def snapshot(db) -> dict[str, list[tuple]]:
    """Every row that must not depend on the number of processes (keys are salted per database)."""
    return {
        "patients": db.execute("SELECT id, sex, age_band, primary_cancer FROM patients ORDER BY id").fetchall(),
        "studies": db.execute("SELECT id, patient_id, study_year, origin FROM studies ORDER BY id").fetchall(),
        "images": db.execute("SELECT id, study_id, view, frame, source, format, height, width, dtype, pixel_sha256, "
                             "display_max, clipped_pixels, length(pixels), length(thumbnail) FROM images ORDER BY id").fetchall(),
        "reviews": db.execute("SELECT id, study_id, reviewer, label, note FROM reviews ORDER BY id").fetchall(),
    }


class PoolSpy(decodepool.DecodePool):
    """The real pool, recording the start method of each worker process made."""

    methods: list[str] = []

    def _start(self) -> None:
        super()._start()
        PoolSpy.methods.extend(process._start_method for process in self.processes)


@pytest.mark.parametrize("with_thread", [False, True], ids=["one-thread", "threaded-like-the-app"])
def test_parallel_import_gives_the_same_rows_and_outcomes_as_one_process(tmp_path, monkeypatch, with_thread):
    folder, bad = mixed_folder(tmp_path)
    with dbm.opened(tmp_path / "one.db") as db:
        one = ingest.import_files(db, [folder], label_from_folder=True, jobs=1)
        rows_one = snapshot(db)
    PoolSpy.methods = []
    monkeypatch.setattr(ingest, "DecodePool", PoolSpy)
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, daemon=True)  # a second thread, as Streamlit runs
    if with_thread:
        thread.start()
    try:
        with dbm.opened(tmp_path / "two.db") as db:
            two = ingest.import_files(db, [folder], label_from_folder=True, jobs=2)
            rows_two = snapshot(db)
    finally:
        stop.set()
    assert PoolSpy.methods == ["spawn", "spawn"]  # never fork: native threads (TensorFlow's) would be copied mid-lock
    assert [(o.path, o.status, o.detail, o.image_ids) for o in two] == [(o.path, o.status, o.detail, o.image_ids) for o in one]
    assert rows_two == rows_one
    by_name = {o.path.name: o for o in two}
    for name, reason in bad.items():
        assert by_name[name].status == "rejected" and reason in by_name[name].detail, (name, by_name[name].detail)
    assert by_name["zz-copy-of-0003.tif"].status == "duplicate"
    assert len(rows_two["images"]) >= 24 and len(rows_two["studies"]) >= 12
    with dbm.opened(tmp_path / "two.db") as db:  # duplicates and rejections left no rows behind in their batch
        assert db.execute("SELECT count(*) FROM studies WHERE id NOT IN (SELECT study_id FROM images)").fetchone()[0] == 0
        assert db.execute("SELECT count(*) FROM patients WHERE id NOT IN (SELECT patient_id FROM studies)").fetchone()[0] == 0


def test_small_batches_and_jobs_1_decode_in_this_process(db, tmp_path, monkeypatch):
    monkeypatch.setattr(ingest, "DecodePool", None)  # any pool would fail
    write_scans(tmp_path / "few", ingest.MIN_POOL_FILES // 2 - 1)
    outcomes = ingest.import_files(db, [tmp_path / "few"], jobs=8)
    assert [o.status for o in outcomes] == ["imported"] * (ingest.MIN_POOL_FILES - 2)
    write_scans(tmp_path / "many", ingest.MIN_POOL_FILES, seed=1)
    assert {o.status for o in ingest.import_files(db, [tmp_path / "many"], jobs=1)} == {"imported"}


def test_progress_reports_every_file_with_rate_and_eta(db, tmp_path):
    write_scans(tmp_path / "scans", 10)
    steps: list[ingest.ProgressStep] = []
    ingest.import_files(db, [tmp_path / "scans"], progress=steps.append, jobs=2)
    assert [s.done for s in steps] == list(range(1, 21))
    assert {s.total for s in steps} == {20} and {s.unit for s in steps} == {"files"}
    assert all(s.per_s is not None and s.per_s > 0 for s in steps)
    assert all(s.eta_s is not None and s.eta_s >= 0 for s in steps)
    assert steps[-1].eta_s == 0 and "ETA" not in steps[-1].text()
    assert [s.name for s in steps] == sorted(p.name for p in (tmp_path / "scans").iterdir())


def test_progress_clock_and_text():
    now = iter([100.0, 102.0, 104.0, 110.0])
    steps: list[ingest.ProgressStep] = []
    clock = ingest.ProgressClock(2000, steps.append, clock=lambda: next(now))
    clock.step("a.png")  # 1 file in 2 s
    clock.step("b.png")  # 2 files in 4 s
    assert (steps[0].per_s, steps[0].eta_s) == (0.5, 3998.0)
    assert steps[1].text() == "2/2000 files · 0.5 files/s · ETA 67 min"
    assert ingest.progress_text(1200, 2000, 85.0, 9.4) == "1200/2000 files · 85 files/s · ETA 9 s"
    assert ingest.progress_text(3, 10, None, None, "studies") == "3/10 studies"
    assert ingest.progress_text(10, 80000, 2.5, 31996.0) == "10/80000 files · 2.5 files/s · ETA 8.9 h"


def test_cli_progress_line_shows_rate_and_eta(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    show = cli._progress_printer("import")
    show(ingest.ProgressStep(1200, 2000, "0600-0-A.tif", 85.0, 9.4))
    assert "1200/2000 files · 85 files/s · ETA 9 s" in terminal.getvalue()
    assert "0600-0-A.tif" in terminal.getvalue()


def stored_files(db_path: Path) -> int:
    try:
        with sqlite3.connect(db_path, timeout=30) as conn:
            return conn.execute("SELECT count(*) FROM imported_files").fetchone()[0]
    except sqlite3.OperationalError:  # not migrated yet
        return 0


def test_a_killed_import_rerun_skips_what_is_stored_without_decoding_it(db_path, tmp_path, monkeypatch):
    folder = tmp_path / "scans"
    paths = write_scans(folder, 150, shape=(384, 128))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "bonescan_core", "--db", str(db_path), "import", str(folder), "--jobs", "2"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while stored_files(db_path) < ingest.BATCH_FILES and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the import and its decode workers, mid-way
        process.wait()
    committed = stored_files(db_path)
    assert 0 < committed < len(paths), f"the kill came too late or too early to test resuming ({committed} stored)"

    decoded: list[Path] = []
    real_decode = ingest.decode_file
    monkeypatch.setattr(ingest, "decode_file", lambda plan, resolved: decoded.append(resolved) or real_decode(plan, resolved))
    with dbm.opened(db_path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        images_before = db.execute("SELECT count(*) FROM images").fetchone()[0]
        outcomes = ingest.import_files(db, [folder], jobs=1)
        skipped = [o for o in outcomes if o.status == "duplicate"]
        assert len(skipped) == committed and {o.detail for o in skipped} == {ingest.ALREADY_IMPORTED}
        assert [o.status for o in outcomes].count("imported") == len(paths) - committed
        assert len(decoded) == len(paths) - committed  # stored files were not read again
        assert images_before == committed  # one image per file: a batch is whole or absent
        assert db.execute("SELECT count(*), count(DISTINCT pixel_sha256) FROM images").fetchone() == (len(paths), len(paths))
        assert db.execute("SELECT count(*) FROM studies").fetchone()[0] == len(paths) // 2
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        again = ingest.import_files(db, [folder], jobs=2)
    assert {o.detail for o in again} == {ingest.ALREADY_IMPORTED}


def test_the_cli_rerun_reports_stored_files_as_duplicates(db_path, tmp_path):
    from conftest import run_cli

    write_scans(tmp_path / "scans", 3)
    assert run_cli("import", str(tmp_path / "scans"), "--jobs", "1", db_path=db_path).returncode == 0
    again = run_cli("import", str(tmp_path / "scans"), "--jobs", "2", db_path=db_path)
    assert again.returncode == 0
    lines = again.stdout.splitlines()
    assert len(lines) == 6 and all(line.endswith(": duplicate (file already imported)") for line in lines), lines
    assert run_cli("import", str(tmp_path / "scans"), "--jobs", "0", db_path=db_path).returncode == 2


def test_decode_workers_never_load_tensorflow():
    code = ("import sys, bonescan_core.ingest; "
            "print(sorted(m for m in ('tensorflow', 'keras', 'jax', 'streamlit', 'torch') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def kill_decode_workers(step):
    """A progress callback that SIGKILLs every decode worker at the first stored file, as the
    kernel's out-of-memory killer would."""
    import multiprocessing

    for worker in multiprocessing.active_children():
        os.kill(worker.pid, signal.SIGKILL)


def test_a_dead_decode_process_stops_the_import_with_advice_and_a_rerun_imports_everything(db, tmp_path):
    write_scans(tmp_path / "scans", 40)
    with pytest.raises(ingest.DecoderStopped, match="--jobs 1"):
        ingest.import_files(db, [tmp_path / "scans"], jobs=2, progress=kill_decode_workers)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored_before = db["images"].count
    assert stored_before < 80, "the kill came before the last file"
    again = ingest.import_files(db, [tmp_path / "scans"], jobs=1)
    statuses = [o.status for o in again]
    assert statuses.count("imported") == 80 - stored_before and statuses.count("duplicate") == stored_before
    assert db["images"].count == 80
