"""A database that cannot be used (random bytes, truncated, read-only) is one sentence that says
what to do, in the core (DatabaseUnavailable), the CLI (exit 2) and the app (an alert), never a
traceback."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, run_cli
from streamlit.testing.v1 import AppTest

from bonescan_core import db as dbm
from bonescan_core import errors
from bonescan_core.ingest import add_demo_studies


@pytest.fixture
def full_db(tmp_path: Path) -> Path:
    """A database with two demo studies (a few hundred KB: enough pages to truncate)."""
    path = tmp_path / "store" / "labels.db"
    path.parent.mkdir()
    with dbm.opened(path) as db:
        add_demo_studies(db, 2, seed=3)
    return path


def random_bytes(path: Path) -> Path:
    path.write_bytes(bytes(range(256)) * 400)  # 100 KB that is not SQLite
    return path


def truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path


@contextlib.contextmanager
def read_only(path: Path):
    """Make the database file and its folder read-only. Root ignores modes, so as root the
    file and folder are also marked immutable (chattr +i), which binds root too."""
    immutable = os.geteuid() == 0
    targets = [path, path.parent]
    for target in targets:
        target.chmod(0o444 if target.is_file() else 0o555)
        if immutable:
            subprocess.run(["chattr", "+i", str(target)], check=True)
    try:
        yield path
    finally:
        for target in reversed(targets):
            if immutable:
                subprocess.run(["chattr", "-i", str(target)], check=True)
            target.chmod(0o755 if target.is_dir() else 0o644)


def test_random_bytes_are_not_a_database(tmp_path):
    path = random_bytes(tmp_path / "labels.db")
    with pytest.raises(errors.DatabaseUnavailable, match="is not a SQLite database") as caught:
        dbm.connect(path)
    assert str(path) in str(caught.value) and "restore it from a backup" in str(caught.value)


def test_a_truncated_database_is_damaged(full_db):
    truncated(full_db)
    with pytest.raises(errors.DatabaseUnavailable, match="is damaged"):
        with dbm.opened(full_db) as db:
            db.execute("SELECT COUNT(*) FROM images WHERE length(pixels) > 0").fetchone()


def test_a_missing_folder_is_a_database_error(tmp_path):
    with pytest.raises(errors.DatabaseUnavailable, match="does not exist"):
        dbm.connect(tmp_path / "nowhere" / "labels.db")


def test_a_read_only_database_refuses_writes_with_a_sentence(full_db):
    with read_only(full_db), pytest.raises(errors.DatabaseUnavailable, match="read-only") as caught:
        with dbm.opened(full_db) as db, dbm.write(db):
            db["settings"].insert({"key": "probe", "value": "1"})
    assert "write permission" in str(caught.value)


@pytest.mark.parametrize("damage", [random_bytes, truncated])
def test_cli_exits_2_with_one_line_on_a_damaged_database(full_db, damage):
    damage(full_db)
    result = run_cli("images", db_path=full_db)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("bonescan images: database ")


def test_cli_label_on_a_read_only_database_exits_2(full_db):
    with read_only(full_db):
        result = run_cli("label", "1", "--reviewer", "ann", "--exclude", "artifact", db_path=full_db)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "read-only" in result.stderr


def test_app_shows_the_sentence_instead_of_a_traceback(full_db, monkeypatch):
    random_bytes(full_db)
    monkeypatch.setenv(dbm.ENV_VAR, str(full_db))
    app = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=60).run()
    assert not app.exception, [e.value for e in app.exception]
    assert [e.value for e in app.error] and "is not a SQLite database" in app.error[0].value


def test_read_only_fixture_leaves_nothing_locked(full_db):
    with read_only(full_db):
        pass
    shutil.rmtree(full_db.parent)  # fails if anything stayed immutable
