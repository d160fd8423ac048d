"""The disk cache of decoded training images (``imagecache``): the same pixels as the in-memory path,
reused by a second run without decoding, damaged entries rebuilt, atomic writes, ``bonescan cache``."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_run

from bonescan_core import db as dbm
from bonescan_core import errors, imagecache, pixelstore, preprocess, runs, splits, training
from bonescan_core.cli import main
from bonescan_core.ingest import add_demo_studies

SIZE = (64, 33)  # an odd width: a composite's halves are frames of two sizes (16 and 17 columns)


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory) -> Path:
    """A database with 20 demo studies (40 images), made once per module."""
    path = tmp_path_factory.mktemp("cache-demo") / "labels.db"
    with dbm.opened(path) as db:
        add_demo_studies(db, 20, seed=0)
    return path


@pytest.fixture
def demo_db(demo_file, tmp_path):
    """A copy of the demo database in its own folder, so each test starts with an empty cache."""
    path = tmp_path / "demo.db"
    shutil.copy(demo_file, path)
    with dbm.opened(path) as db:
        yield db


def all_samples(db, view_mode: str) -> list[preprocess.Sample]:
    labels = {sid: i % 2 for i, (sid,) in enumerate(db.execute("SELECT id FROM studies ORDER BY id").fetchall())}
    return preprocess.list_samples(db, labels, view_mode)


@pytest.fixture
def decodes(monkeypatch) -> list[int]:
    """Counts ``pixelstore.decode_pixels`` calls (the one place stored pixels are decoded)."""
    calls: list[int] = []
    original = pixelstore.decode_pixels

    def counting(blob: bytes) -> np.ndarray:
        calls.append(1)
        return original(blob)

    monkeypatch.setattr(pixelstore, "decode_pixels", counting)
    return calls


@pytest.mark.parametrize("view_mode", preprocess.VIEW_MODES)
def test_disk_frames_and_batches_equal_the_in_memory_ones(demo_db, view_mode):
    samples = all_samples(demo_db, view_mode)
    in_memory = preprocess.load_images(demo_db, samples, SIZE, view_mode)
    on_disk, facts = imagecache.training_images(demo_db, samples, SIZE, view_mode)
    assert isinstance(on_disk, imagecache.DiskImages) and facts["mode"] == "disk" and facts["decoded"] > 0
    assert on_disk.shape == in_memory.shape and on_disk.dtype == in_memory.dtype == np.float16
    read = on_disk[np.arange(len(samples))]
    assert read.dtype == np.float16 and np.array_equal(read, in_memory)
    assert np.array_equal(on_disk[3], in_memory[3]) and np.array_equal(on_disk[2:5], in_memory[2:5])
    assert np.array_equal(on_disk[..., None][0:4], in_memory[..., None][0:4])  # batchnorm's view
    labels = np.array([s.label for s in samples])
    from_disk = preprocess.image_batches(on_disk, labels, 8, rng=np.random.default_rng(3))
    from_memory = preprocess.image_batches(in_memory, labels, 8, rng=np.random.default_rng(3))
    assert from_disk.workers >= 2 and from_memory.workers == 1  # disk batches are read ahead in the background
    for index in range(len(from_memory)):
        (x_disk, y_disk), (x_memory, y_memory) = from_disk[index], from_memory[index]
        assert x_disk.dtype == x_memory.dtype == np.float32
        assert np.array_equal(x_disk, x_memory) and np.array_equal(y_disk, y_memory)


def test_entries_are_keyed_by_pixel_hash_size_and_version(demo_db):
    samples = all_samples(demo_db, "per_image")[:3]
    cache = imagecache.for_database(demo_db)
    db_path = Path(demo_db.execute("PRAGMA database_list").fetchone()[2])
    assert cache.root == runs.runs_root(db_path) / "cache"
    shas, _ = cache.ensure(demo_db, samples, SIZE)
    stored = dict(demo_db.execute("SELECT id, pixel_sha256 FROM images").fetchall())
    for sample in samples:
        sha = stored[sample.key]
        assert shas[sample.key] == sha
        path = cache.root / f"v{imagecache.PREPROCESS_VERSION}" / "64x33" / sha[:2] / f"{sha}.npy"
        assert cache.path(sha, SIZE) == path
        assert np.load(path).dtype == np.float16 and np.load(path).shape == SIZE  # a plain .npy file


def test_a_second_run_reuses_the_cache_without_decoding(demo_db, decodes):
    samples = all_samples(demo_db, "composite")
    _, first = imagecache.training_images(demo_db, samples, SIZE, "composite")
    assert first["decoded"] == len(decodes) == 40 and first["reused"] == 0
    decodes.clear()
    images, second = imagecache.training_images(demo_db, samples, SIZE, "composite")
    assert len(decodes) == 0 and second["decoded"] == 0 and second["reused"] == 40
    images[np.arange(len(samples))]  # reading batches decodes nothing either
    assert len(decodes) == 0
    # Another view mode at the same size reuses the per_image frames: only the composite halves were new.
    _, per_image = imagecache.training_images(demo_db, all_samples(demo_db, "per_image"), SIZE, "per_image")
    assert per_image["decoded"] == 40 and per_image["reused"] == 0
    _, fusion = imagecache.training_images(demo_db, all_samples(demo_db, "fusion"), SIZE, "fusion")
    assert fusion["decoded"] == 0 and fusion["reused"] == 40


def test_a_truncated_or_damaged_entry_is_detected_and_rebuilt(demo_db, decodes):
    samples = all_samples(demo_db, "per_image")
    cache = imagecache.for_database(demo_db)
    shas, _ = cache.ensure(demo_db, samples, SIZE)
    truncated, damaged = cache.path(shas[samples[0].key], SIZE), cache.path(shas[samples[1].key], SIZE)
    truncated.write_bytes(truncated.read_bytes()[:-10])
    data = bytearray(damaged.read_bytes())
    data[data.index(b"(64, 33)") : data.index(b"(64, 33)") + 8] = b"(33, 64)"  # same length, another shape
    damaged.write_bytes(bytes(data))
    assert cache.state(shas[samples[0].key], SIZE) == cache.state(shas[samples[1].key], SIZE) == "damaged"
    with pytest.raises(imagecache.CacheUnavailable, match="damaged"):
        cache.read(shas[samples[0].key], SIZE)
    decodes.clear()
    images, facts = imagecache.training_images(demo_db, samples, SIZE)
    assert facts["damaged"] == 2 and facts["decoded"] == 2 == len(decodes) and facts["reused"] == 38
    assert np.array_equal(images[np.arange(len(samples))], preprocess.load_images(demo_db, samples, SIZE))


def test_a_write_cut_short_leaves_no_entry_under_its_name(demo_db, monkeypatch):
    samples = all_samples(demo_db, "per_image")[:2]
    cache = imagecache.for_database(demo_db)

    def killed(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(imagecache.os, "replace", killed)
    with pytest.raises(imagecache.CacheUnavailable, match="free disk space"):
        cache.ensure(demo_db, samples, SIZE)
    monkeypatch.undo()
    assert cache.summary()["entries"] == 0 and not list(cache.root.rglob("*.npy"))
    assert not list(cache.root.rglob("*.tmp"))  # the temporary file was removed too
    # A process killed mid-write leaves only its temporary file: never read, counted as unfinished, cleared.
    sha = demo_db.execute("SELECT pixel_sha256 FROM images WHERE id = ?", [samples[0].key]).fetchone()[0]
    path = cache.path(sha, SIZE)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_name(f"{path.name}.999-1.tmp").write_bytes(cache.header(SIZE) + b"\0" * 100)
    assert cache.state(sha, SIZE) == "missing" and cache.summary()["unfinished"] == 1


def test_cache_command_reports_and_clears(demo_db, monkeypatch, capsys):
    db_path = demo_db.execute("PRAGMA database_list").fetchone()[2]
    samples = all_samples(demo_db, "per_image")
    imagecache.training_images(demo_db, samples, SIZE)
    imagecache.training_images(demo_db, samples[:5], (32, 16))
    assert main(["--db", db_path, "cache", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    entry_bytes = imagecache.ImageCache(summary["path"]).entry_bytes
    assert summary["entries"] == 45 and summary["version"] == imagecache.PREPROCESS_VERSION and summary["unfinished"] == 0
    assert summary["bytes"] == 40 * entry_bytes(SIZE) + 5 * entry_bytes((32, 16))
    assert sorted((s["size"], s["entries"]) for s in summary["sizes"]) == [("32x16", 5), ("64x33", 40)]
    assert main(["--db", db_path, "cache"]) == 0
    assert capsys.readouterr().out.startswith(f"{summary['path']}: 45 entries")
    assert main(["--db", db_path, "cache", "--clear", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"path": summary["path"], "removed_entries": 45,
                                                   "removed_bytes": summary["bytes"]}
    assert not Path(summary["path"]).exists()
    assert main(["--db", db_path, "cache", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["entries"] == 0


def test_memory_mode_and_a_wrong_setting(demo_db, monkeypatch):
    samples = all_samples(demo_db, "per_image")[:4]
    monkeypatch.setenv(imagecache.ENV_VAR, "memory")
    images, facts = imagecache.training_images(demo_db, samples, SIZE)
    assert isinstance(images, np.ndarray) and facts["mode"] == "memory"
    monkeypatch.setenv(imagecache.ENV_VAR, "ram")
    with pytest.raises(errors.InputError, match="disk or memory"):
        imagecache.training_images(demo_db, samples, SIZE)


class Quiet:
    """A Reporter that never cancels."""

    def progress(self, fields: dict) -> None:
        pass

    def epoch_done(self, *args) -> None:
        pass

    def cancelled(self) -> bool:
        return False


def test_a_run_trains_on_the_cached_pixels_and_the_next_run_decodes_nothing(demo_db, tmp_path, monkeypatch, decodes):
    """Two runs of different backbones on the same split: the first fills the cache, and the
    pixels its batches hold are those of the in-memory path; the second decodes no image."""
    seen: list = []
    original = preprocess.image_batches

    def spy(images, *args, **kwargs):
        seen.append(images)
        return original(images, *args, **kwargs)

    monkeypatch.setattr(preprocess, "image_batches", spy)
    split_id = splits.ensure_split(demo_db, 0)
    decodes.clear()
    config = tiny_run(image_size=SIZE, augment={}, split_id=split_id)
    first = training.train_run(demo_db, config, Quiet(), tmp_path / "a" / "model.keras")
    n_images = first.facts["n_train"] + first.facts["n_val"] + first.facts["n_test"]
    assert len(decodes) == n_images == sum(f["decoded"] for f in first.facts["image_cache"].values())
    train_images = seen[0]
    assert isinstance(train_images, imagecache.DiskImages) and len(train_images) == first.facts["n_train"]
    expected = preprocess.load_images(demo_db, train_images.samples, SIZE)
    assert np.array_equal(train_images[np.arange(len(train_images))], expected)

    decodes.clear()
    again = dataclasses.replace(config, seed=config.seed + 1)  # another run of the same size: its pixels are cached
    second = training.train_run(demo_db, again, Quiet(), tmp_path / "b" / "model.keras")
    assert len(decodes) == 0
    assert {subset: (f["mode"], f["decoded"]) for subset, f in second.facts["image_cache"].items()} == {
        "train": ("disk", 0), "val": ("disk", 0), "test": ("disk", 0)}
    assert sum(f["reused"] for f in second.facts["image_cache"].values()) == n_images
