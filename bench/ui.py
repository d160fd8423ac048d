"""UI benchmark: a database with many studies; Review, Scans and Agreement page reruns, the
save of one review, the Evaluate page with a finished run of many predictions, database
bytes per image. Prints one JSON object per measurement.

    python bench/ui.py --studies 50000 --db /tmp/ui50k/labels.db   # the scale goals (~18 GB, builds once)
    python bench/ui.py                                             # 10,000 studies (~3 GB, a few minutes)
    python bench/ui.py --quick                                     # 1,000 studies

Studies are built from a few real phantom studies: every image row holds a real encoded
full-size pixel blob and thumbnail (so page and database sizes are honest), with a unique
content hash per row. ``--db`` keeps the database (and reuses it when it is there: building
50,000 studies takes a while). Goals at 50,000 studies (100,000 images): Scans rerun < 150 ms,
Review rerun < 100 ms, Agreement rerun < 150 ms, Evaluate with a 25,000-prediction run first
load < 1.5 s and rerun < 300 ms, save < 20 ms, <= 200 KB per full-size image.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment  # noqa: E402

from bonescan_core import db as dbm  # noqa: E402
from bonescan_core import jobs, pixelstore  # noqa: E402
from bonescan_core import review as rv  # noqa: E402
from bonescan_core.phantom import make_studies  # noqa: E402


def emit(**fields: object) -> None:
    print(json.dumps({"bench": "ui", **fields, **environment()}), flush=True)


def build_database(path: Path, n_studies: int, seed: int = 0) -> float:
    """n studies x 2 full-size images, reference-labelled; returns seconds taken."""
    started = time.perf_counter()
    templates = []
    for phantom in make_studies(20, seed):
        views = {}
        for view in ("anterior", "posterior"):
            pixels = getattr(phantom, view)
            views[view] = (pixelstore.encode_pixels(pixels), pixelstore.make_thumbnail(pixels), pixelstore.display_max(pixels))
        templates.append((phantom.metastatic, views))
    now = dbm.utc_now()
    with dbm.opened(path) as db:
        with dbm.write(db):
            db["patients"].insert_all(
                ({"id": i + 1, "key": f"bench-{i}", "sex": "FM"[i % 2], "age_band": "60-69", "created_at": now}
                 for i in range(n_studies)), batch_size=1000)
            db["studies"].insert_all(
                ({"id": i + 1, "patient_id": i + 1, "key": f"bench-{i}", "origin": "demo", "created_at": now}
                 for i in range(n_studies)), batch_size=1000)
            rows = (
                {"study_id": i + 1, "view": view, "source": f"bench-{i}-{view}", "format": "phantom", "height": 1024,
                 "width": 256, "dtype": "uint16", "pixels": templates[i % len(templates)][1][view][0],
                 "pixel_sha256": f"bench-{i}-{view}", "thumbnail": templates[i % len(templates)][1][view][1],
                 "display_max": templates[i % len(templates)][1][view][2], "created_at": now}
                for i in range(n_studies) for view in ("anterior", "posterior")
            )
            db["images"].insert_all(rows, batch_size=500)
            db["reviews"].insert_all(
                ({"study_id": i + 1, "reviewer": "reference", "created_at": now, "decision": "include",
                  "label": "metastatic" if templates[i % len(templates)][0] else "non_metastatic",
                  "criteria": "typical_pattern" if templates[i % len(templates)][0] else "no_abnormal_uptake"}
                 for i in range(n_studies)), batch_size=1000)
    return time.perf_counter() - started


def add_finished_run(path: Path, n_images: int, seed: int = 0) -> int:
    """A done run with ``n_images`` predictions (a third validation, the rest test) and 20 epochs
    of curves, as a finished training writes them; no model file (the explorer says so)."""
    from bonescan_core.training import TrainConfig

    rng = np.random.default_rng(seed)
    config = TrainConfig(backbone="densenet121", weights="imagenet", mode="finetune", epochs=20)
    with dbm.opened(path) as db:
        run_id = jobs.enqueue(db, config.backbone, config.to_dict(), config.identity_hash())
        images = db.execute("SELECT images.id, reviews.label FROM images JOIN reviews USING (study_id) "
                            "WHERE reviews.reviewer = 'reference' ORDER BY images.id LIMIT ?", [n_images]).fetchall()
        with dbm.write(db):
            db["runs"].update(run_id, {"status": "done", "threshold": 0.5, "finished_at": dbm.utc_now()})
            db["predictions"].insert_all(
                {"run_id": run_id, "image_id": image_id, "subset": "val" if i % 3 == 0 else "test",
                 "label": int(label == "metastatic"),
                 "probability": float(np.clip(rng.normal(0.7 if label == "metastatic" else 0.3, 0.2), 0, 1))}
                for i, (image_id, label) in enumerate(images))
            db["epochs"].insert_all(
                {"run_id": run_id, "epoch": e, "phase": "finetune", "loss": 1 / e, "val_loss": 1.2 / e,
                 "metrics": json.dumps({"auc": 1 - 0.5 / e}), "seconds": 60.0, "train_images_per_second": 3.0}
                for e in range(1, 21))
    return run_id


def time_saves(path: Path, n: int = 50) -> list[float]:
    """Milliseconds per review save, as the Review page does it (open, validate, insert, commit)."""
    times = []
    for i in range(n):
        started = time.perf_counter()
        with dbm.opened(path) as db:
            rv.add_review(db, rv.Review(i + 1, "bench", "include", label="metastatic", criteria=("typical_pattern",)))
        times.append((time.perf_counter() - started) * 1000)
    return times


def time_page(path: Path, page: str, reruns: int = 5, fresh: bool = False) -> dict:
    """AppTest: first run and rerun times (ms) of one page of the real app; ``fresh``: with
    Streamlit's in-process caches emptied first (as in a new server process)."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    if fresh:
        st.cache_data.clear()
        st.cache_resource.clear()
    os.environ[dbm.ENV_VAR] = str(path)
    app = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=300)
    app.query_params["reviewer"] = "bench"
    started = time.perf_counter()
    app.run()
    if page != "app_pages/scans.py":
        app.switch_page(page).run()
    first = (time.perf_counter() - started) * 1000
    times = []
    for _ in range(reruns):
        started = time.perf_counter()
        app.run()
        times.append((time.perf_counter() - started) * 1000)
    assert not app.exception, [e.value for e in app.exception]
    return {"first_ms": round(first, 1), "rerun_ms_median": round(statistics.median(times), 1),
            "rerun_ms_max": round(max(times), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 studies instead of 10,000")
    parser.add_argument("--studies", type=int, default=None)
    parser.add_argument("--predictions", type=int, default=25_000, help="the finished run's predictions (capped by images)")
    parser.add_argument("--db", type=Path, default=None, help="keep the database here (reused when it exists)")
    args = parser.parse_args()
    n_studies = args.studies or (1_000 if args.quick else 10_000)
    with tempfile.TemporaryDirectory(prefix="bonescan-bench-") as folder:
        path = args.db or Path(folder) / "labels.db"
        seconds = None
        if not path.exists():
            seconds = round(build_database(path, n_studies), 1)
            add_finished_run(path, args.predictions)
        with dbm.opened(path) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            n_images = db["images"].count
            n_studies = db["studies"].count
            n_predictions = db["predictions"].count
        size = path.stat().st_size
        emit(measure="database", studies=n_studies, images=n_images, build_s=seconds,
             bytes_per_image=round(size / n_images), goal_bytes_per_image=200_000)
        saves = time_saves(path)
        emit(measure="review_save", studies=n_studies, n=len(saves), ms_median=round(statistics.median(saves), 2),
             ms_p95=round(float(np.percentile(saves, 95)), 2), goal_ms=20)
        goals = {"review.py": (None, 100), "scans.py": (None, 150), "agreement.py": (None, 150), "evaluate.py": (1500, 300)}
        for page, (first_goal, rerun_goal) in goals.items():
            emit(measure="page", page=page, studies=n_studies, predictions=n_predictions if page == "evaluate.py" else None,
                 **time_page(path, f"app_pages/{page}"), goal_first_ms=first_goal, goal_rerun_ms=rerun_goal)
        # Evaluate's first load in a fresh process, with the run's evaluation stored (what an idle
        # worker or an earlier load left) and with none (this load bootstraps and stores it).
        for stored in (False, True):
            if not stored:
                with dbm.opened(path) as db, dbm.write(db):
                    db.execute("DELETE FROM evaluation_cache")
            emit(measure="page", page="evaluate.py", studies=n_studies, predictions=n_predictions,
                 evaluation="stored" if stored else "computed on this load",
                 **time_page(path, "app_pages/evaluate.py", reruns=3, fresh=True), goal_first_ms=1500, goal_rerun_ms=300)


if __name__ == "__main__":
    main()
