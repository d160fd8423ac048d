"""Shared fixtures: a fresh database per test (sqlite-utils style ``tmp_path`` fixtures)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bonescan_core import db as dbm
from bonescan_core.training import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def tiny_run(**overrides) -> TrainConfig:
    """The settings of a tiny training run whose backbone is not the point, with ``overrides``.

    scintinet per image, weights none, mode full, 1 epoch, batch 8, 64 x 32 (the other fields
    are TrainConfig's defaults): scintinet builds and traces ~5x faster than an ImageNet
    backbone, and 64 x 32 is its smallest useful input.
    """
    settings = {"backbone": "scintinet", "view_mode": "per_image", "weights": "none", "mode": "full", "epochs": 1,
                "batch_size": 8, "image_size": (64, 32)}
    return TrainConfig(**{**settings, **overrides})


@pytest.fixture
def db_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Path of a new, migrated database; also exported as $BONESCAN_DB for the app and CLI."""
    path = tmp_path / "labels.db"
    dbm.connect(path).close()
    monkeypatch.setenv(dbm.ENV_VAR, str(path))
    return path


@pytest.fixture
def db(db_path: Path):
    """An open connection to a new database (closed after the test)."""
    with dbm.opened(db_path) as database:
        yield database


def run_cli(*args: str, db_path: Path | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m bonescan_core ARGS`` in a fresh process, as a user would."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    prefix = ["--db", str(db_path)] if db_path else []
    return subprocess.run([sys.executable, "-m", "bonescan_core", *prefix, *args],
                          capture_output=True, text=True, env=env, cwd=cwd or REPO, timeout=300)


def add_bare_studies(db, n: int) -> list[int]:
    """n studies (one patient each, no images) for tests that only need study rows."""
    ids = []
    with dbm.write(db):
        for i in range(n):
            patient = db["patients"].insert({"key": f"test-patient-{i}", "created_at": dbm.utc_now()}).last_pk
            ids.append(db["studies"].insert({"patient_id": patient, "key": f"test-study-{i}", "origin": "import",
                                             "created_at": dbm.utc_now()}).last_pk)
    return ids


@pytest.fixture
def studies(db) -> list[int]:
    """Ten bare studies in the test database."""
    return add_bare_studies(db, 10)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest first: files of real-browser (e2e) and training (slow) tests start before the quick
    ones, so the two xdist workers (pyproject addopts) end together instead of one of them running
    the browser files alone at the end. The order within each group stays the collection order."""
    def group(item: pytest.Item) -> int:
        return 0 if item.get_closest_marker("e2e") else 1 if item.get_closest_marker("slow") else 2

    items.sort(key=group)
