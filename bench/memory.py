"""Memory benchmark of training's data pipeline with the disk image cache (issue 17): one JSON line.

What it measures, each in a fresh process (``--child``), on one synthetic database:

* resident memory (``VmHWM`` of /proc/self/status, reset after start-up through
  /proc/self/clear_refs) that a training run's data pipeline adds: list the samples, fill or
  check the disk cache (``imagecache.training_images``), then one epoch of ``model.fit`` over
  ``preprocess.image_batches`` (the background read-ahead included) with a tiny model, at two
  dataset sizes; the slope is reported in MB per 10,000 images (goal <= 50), beside the slope
  of the in-memory path (``BONESCAN_IMAGE_CACHE=memory``) for contrast;
* the share of a second run's time spent decoding (goal <= 5 %), and checking the cache;
* training images/s fed from the disk cache against the same trainer fed from an in-memory
  array and against the bare model's in-memory ceiling (``bench/pipeline.py``'s measure;
  goal >= 0.95), with a real backbone.

The images: one demo study's anterior image, subsampled by ``--source-stride`` (default 4:
256 x 64 counts), stored under a distinct ``pixel_sha256`` per row (the hash of the row's
number), so every row is its own cache entry and its own decode, without generating 20,000
phantoms or a database of 20,000 full-size blobs.

    python bench/memory.py                                # 2,000 and 20,000 images at 128x64
    python bench/memory.py --images 200,1000 --quick      # a quick look
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment  # noqa: E402 - bench/ is on the path only after the line above

STUDY_PREFIX = "bench-memory-"


def proc_status() -> dict[str, float]:
    """VmRSS and VmHWM of this process in MB."""
    found = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            found[name] = int(value.split()[0]) / 1024
    return found


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux: ``5`` into /proc/self/clear_refs); False where refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def build_db(folder: Path, n_images: int, stride: int) -> Path:
    """A database with ``n_images`` synthetic images (two per study, anterior and posterior), all
    carrying the pixels of one demo image subsampled by ``stride``, each under its own sha256."""
    from bonescan_core import db as dbm
    from bonescan_core import pixelstore
    from bonescan_core.ingest import add_demo_studies

    path = folder / "labels.db"
    with dbm.opened(path) as db:
        add_demo_studies(db, 1, seed=0)
        study = dict(zip([c[0] for c in db.execute("SELECT * FROM studies LIMIT 1").description],
                         db.execute("SELECT * FROM studies LIMIT 1").fetchone(), strict=True))
        cursor = db.execute("SELECT * FROM images ORDER BY id LIMIT 1")
        image = dict(zip([c[0] for c in cursor.description], cursor.fetchone(), strict=True))
        pixels = np.ascontiguousarray(pixelstore.decode_pixels(image["pixels"])[::stride, ::stride])
        image.update(pixels=pixelstore.encode_pixels(pixels), height=pixels.shape[0], width=pixels.shape[1], truth=None)
        study_columns = [c for c in study if c != "id"]
        image_columns = [c for c in image if c != "id"]
        with dbm.write(db):
            for first in range(0, n_images // 2, 1000):
                count = min(1000, n_images // 2 - first)
                db.conn.executemany(
                    f"INSERT INTO studies ({', '.join(study_columns)}) VALUES ({', '.join('?' for _ in study_columns)})",
                    [[f"{STUDY_PREFIX}{first + i}" if c == "key" else study[c] for c in study_columns] for i in range(count)])
            ids = [row[0] for row in db.execute("SELECT id FROM studies WHERE key LIKE ? ORDER BY id", [f"{STUDY_PREFIX}%"])]
            for first in range(0, len(ids), 500):
                rows = []
                for offset, study_id in enumerate(ids[first : first + 500]):
                    for view in ("anterior", "posterior"):
                        number = 2 * (first + offset) + (view == "posterior")
                        values = {**image, "study_id": study_id, "view": view, "source": f"bench-{number}",
                                  "pixel_sha256": hashlib.sha256(f"bench-memory-{number}".encode()).hexdigest()}
                        rows.append([values[c] for c in image_columns])
                db.conn.executemany(
                    f"INSERT INTO images ({', '.join(image_columns)}) VALUES ({', '.join('?' for _ in image_columns)})", rows)
    return path


def _samples(db, n_images: int):
    from bonescan_core import preprocess

    ids = [row[0] for row in db.execute("SELECT id FROM studies WHERE key LIKE ? ORDER BY id LIMIT ?",
                                        [f"{STUDY_PREFIX}%", n_images // 2])]
    return preprocess.list_samples(db, {study_id: i % 2 for i, study_id in enumerate(ids)})


def child_pipeline(db_path: Path, n_images: int, mode: str, size: tuple[int, int], batch_size: int) -> dict:
    """One training run's data pipeline in this (fresh) process: resident memory it adds and where its time goes."""
    os.environ["BONESCAN_IMAGE_CACHE"] = mode
    import keras

    from bonescan_core import db as dbm
    from bonescan_core import imagecache, preprocess

    keras.utils.set_random_seed(0)
    inputs = keras.Input((*size, 1))
    x = keras.layers.Conv2D(4, 3, strides=4, activation="relu")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(x)))
    model.compile(optimizer="adam", loss="binary_crossentropy")
    warm = np.zeros((2 * batch_size, *size, 1), dtype=np.float32)
    model.fit(warm, np.zeros((2 * batch_size, 1), dtype=np.float32), batch_size=batch_size, epochs=1, verbose=0)  # traced
    peak_reset = reset_peak()
    base = proc_status()
    started = time.perf_counter()
    with dbm.opened(db_path) as db:
        samples = _samples(db, n_images)
        images, facts = imagecache.training_images(db, samples, size)
    loaded = time.perf_counter()
    labels = np.array([s.label for s in samples])
    model.fit(preprocess.image_batches(images, labels, batch_size, rng=np.random.default_rng(0)), epochs=1, verbose=0,
              shuffle=False)
    done = time.perf_counter()
    end = proc_status()
    total = done - started
    return {"images": len(samples), "mode": mode, "peak_reset": peak_reset, "base_rss_mb": round(base["VmRSS"], 1),
            "end_rss_mb": round(end["VmRSS"], 1), "hwm_mb": round(end["VmHWM"], 1),
            "growth_mb": round(end["VmHWM"] - base["VmRSS"], 1), "load_s": round(loaded - started, 2),
            "epoch_s": round(done - loaded, 2), "total_s": round(total, 2), "cache": facts,
            "decode_share": round(facts.get("decode_s", 0.0) / total, 4),
            "check_share": round(facts.get("check_s", 0.0) / total, 4)}


def child_ratio(db_path: Path, size: tuple[int, int], backbone: str, batch_size: int, steps: int, rounds: int) -> dict:
    """Training images/s of one trainer fed from the disk cache and from memory, and the bare ceiling."""
    import keras
    from pipeline import InMemoryBatches, _timed_fit

    from bonescan_core import db as dbm
    from bonescan_core import imagecache, models, preprocess

    with dbm.opened(db_path) as db:
        samples = _samples(db, batch_size * (steps + 1))  # even: whole studies
        on_disk, facts = imagecache.training_images(db, samples, size)
        in_memory = preprocess.load_images(db, samples, size)
    assert isinstance(on_disk, imagecache.DiskImages)
    y = np.array([s.label for s in samples], dtype=np.float32)
    model = models.build_model(backbone, "none", size, seed=0)
    trainer = preprocess.with_input_pipeline(model, backbone, preprocess.make_augmenter(preprocess.PAPER_AUGMENT, seed=0))
    trainer.compile(optimizer=keras.optimizers.Adam(1e-4), loss="binary_crossentropy")
    bare = models.build_model(backbone, "none", size, seed=0)
    bare.compile(optimizer=keras.optimizers.Adam(1e-4), loss="binary_crossentropy")
    ceiling_batches = InMemoryBatches(preprocess.to_model_input(in_memory.astype(np.float32), backbone), y.reshape(-1, 1),
                                      batch_size)
    timings: dict[str, list[float]] = {"disk": [], "memory": [], "ceiling": []}
    for _ in range(rounds):  # alternated; the best round of each counts (a neighbour's burst only slows one)
        timings["disk"].append(_timed_fit(trainer, preprocess.image_batches(on_disk, y, batch_size, rng=np.random.default_rng(0)),
                                          steps, batch_size))
        timings["memory"].append(_timed_fit(trainer, preprocess.image_batches(in_memory, y, batch_size,
                                                                              rng=np.random.default_rng(0)), steps, batch_size))
        timings["ceiling"].append(_timed_fit(bare, ceiling_batches, steps, batch_size))
    best = {name: max(values) for name, values in timings.items()}
    return {"backbone": backbone, "batch_size": batch_size, "steps": steps, "rounds": rounds, "cache": facts,
            "disk_ips": round(best["disk"], 2), "memory_ips": round(best["memory"], 2), "ceiling_ips": round(best["ceiling"], 2),
            "disk_vs_ceiling": round(best["disk"] / best["ceiling"], 3),
            "disk_vs_memory": round(best["disk"] / best["memory"], 3),
            "rounds_ips": {name: [round(v, 2) for v in values] for name, values in timings.items()}}


def _run_child(args: list[str], options: list[str]) -> dict:
    result = subprocess.run([sys.executable, __file__, *options, "--child", *args], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"})
    if result.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{result.stderr[-3000:]}")
    line = result.stdout.strip().splitlines()[-1]
    print(line, file=sys.stderr, flush=True)  # each measurement as it comes (the summary line waits for all)
    return json.loads(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default="2000,20000", help="two dataset sizes, N1,N2 (images)")
    parser.add_argument("--size", default="128x64", help="model input HxW")
    parser.add_argument("--batch-size", type=int, default=32, help="batch of the memory runs")
    parser.add_argument("--source-stride", type=int, default=4, help="subsampling of the demo image the rows share")
    parser.add_argument("--backbone", default="resnet50", help="backbone of the images/s comparison")
    parser.add_argument("--quick", action="store_true", help="fewer timed steps and rounds in the images/s comparison")
    parser.add_argument("--no-memory-path", action="store_true", help="skip the in-memory path's runs")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    if args.child:
        kind, db_path = args.child[0], Path(args.child[1])
        if kind == "pipeline":
            result = child_pipeline(db_path, int(args.child[2]), args.child[3], size, args.batch_size)
        else:
            result = child_ratio(db_path, size, args.backbone, 8, *((3, 2) if args.quick else (6, 3)))
        print(json.dumps(result), flush=True)
        return
    small, large = (int(v) for v in args.images.split(","))
    options = ["--size", args.size, "--batch-size", str(args.batch_size), "--backbone", args.backbone,
               *(["--quick"] if args.quick else [])]
    with tempfile.TemporaryDirectory(prefix="bonescan-memory-") as folder:
        started = time.perf_counter()
        db_path = build_db(Path(folder), large, args.source_stride)
        build_s = time.perf_counter() - started
        runs = {"first_small": _run_child(["pipeline", str(db_path), str(small), "disk"], options),
                "first_large": _run_child(["pipeline", str(db_path), str(large), "disk"], options),
                "second_small": _run_child(["pipeline", str(db_path), str(small), "disk"], options),
                "second_large": _run_child(["pipeline", str(db_path), str(large), "disk"], options)}
        if not args.no_memory_path:
            runs["memory_small"] = _run_child(["pipeline", str(db_path), str(small), "memory"], options)
            runs["memory_large"] = _run_child(["pipeline", str(db_path), str(large), "memory"], options)
        ratio = _run_child(["ratio", str(db_path)], options)
        cache_bytes = sum(p.stat().st_size for p in (Path(folder) / "runs" / "cache").rglob("*.npy"))

    def per_10k(first: str, second: str) -> float:
        a, b = runs[first], runs[second]
        return round((b["growth_mb"] - a["growth_mb"]) / (b["images"] - a["images"]) * 10_000, 1)

    second = runs["second_large"]
    out = {"bench": "memory", "size": args.size, "images": [small, large], "source_stride": args.source_stride,
           "db_build_s": round(build_s, 1), "cache_mb": round(cache_bytes / 1e6, 1),
           "disk_mb_per_10000_images": per_10k("second_small", "second_large"),
           "disk_first_run_mb_per_10000_images": per_10k("first_small", "first_large"),
           "memory_mb_per_10000_images": per_10k("memory_small", "memory_large") if "memory_large" in runs else None,
           "second_run_decode_share": second["decode_share"], "second_run_check_share": second["check_share"],
           "disk_vs_ceiling": ratio["disk_vs_ceiling"], "disk_vs_memory": ratio["disk_vs_memory"],
           "runs": runs, "ratio": ratio, **environment()}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
