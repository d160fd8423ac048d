"""Inference benchmark: seconds per study (anterior + posterior demo phantom) for a loaded run model.

What one study costs once a run's model is in memory, through the app's own path:
``explain.explain_images(db, db_path, run_id, [anterior, posterior])``, as the worker
precomputes a study's maps and the Evaluate page / ``bonescan explain`` asks for them. One
batched Grad-CAM pass gives both views' probabilities (the forward pass the map needs; the
probability is the sigmoid of the logit it differentiates) and both maps, each mapped onto
its image and stored in ``explanations``; the model comes from ``load_run_model``'s cache.
Every study is new, so no map comes from the cache.

The model is built with ``models.build_model(..., weights="none")`` (offline; the weights'
values do not change the cost), saved as a finished run's ``runs/*.keras`` in a temp database
with demo studies and loaded by ``runs.load_model``, as the app loads it. One study warms
it up (traced functions, caches); N further studies are timed. One JSON line per backbone:
study p50/p95/mean (and min/max), the model's load time and the warm-up study. Goal:
DenseNet121 study p50 < 1 s (``goal_s``, ``goal_met``).

    python bench/inference.py                         # 646x220, three backbones, N = 20
    python bench/inference.py --quick                 # N = 5
    python bench/inference.py --quick --backbones densenet121 --size 128x64
    python bench/inference.py --backbones scintinet --size 1024x256 --view-mode fusion   # issue 12: p50 < 0.3 s

Timings, never assertions: nothing in the test suite checks them.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from common import environment, summary

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GOALS_S = {"densenet121": 1.0, "scintinet": 0.3}  # study p50


def make_db(folder: Path, n_studies: int) -> Path:
    from bonescan_core import db as dbm
    from bonescan_core.ingest import add_demo_studies

    path = folder / "labels.db"
    with dbm.opened(path) as db:
        add_demo_studies(db, n_studies, seed=0)
    return path


def save_run(db_path: Path, backbone: str, size: tuple[int, int], view_mode: str = "per_image") -> tuple[int, float]:
    """Build a classifier (weights none), save it as a finished run's model; returns (run id, build seconds)."""
    from bonescan_core import db as dbm
    from bonescan_core import heavy, jobs, models, runs

    started = time.perf_counter()
    model = models.build_model(backbone, "none", size, seed=0, views=2 if view_mode == "fusion" else 1)
    build_s = time.perf_counter() - started
    folder = runs.run_folder(db_path)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"bench-{backbone}-{size[0]}x{size[1]}-{view_mode}.keras"
    model.save(path)
    del model
    heavy.keras_module().backend.clear_session()  # the app's model is the one runs.load_model reads back
    config = {"backbone": backbone, "weights": "none", "image_size": list(size), "view_mode": view_mode,
              "mode": models.BACKBONES[backbone].default_mode}
    with dbm.opened(db_path) as db:
        run_id = jobs.enqueue(db, backbone, config, f"bench-inference-{path.name}")
        runs.record_result(db, db_path, run_id, runs.RunResult(
            threshold=0.5, images_per_second=0.0, model_file=path, weights_sha256=runs.file_sha256(path), device="",
            predictions=(), facts={}))
        runs.finish(db, run_id, "done")
    return run_id, build_s


def study_views(db, study_id: int) -> list[int]:
    """The study's [anterior, posterior] image ids."""
    views = dict(db.execute("SELECT view, id FROM images WHERE study_id = ? ORDER BY id", [study_id]).fetchall())
    assert sorted(views) == ["anterior", "posterior"], views
    return [views["anterior"], views["posterior"]]


def one_study(db, db_path: Path, run_id: int, image_ids: list[int]) -> float:
    """Seconds for one study: both views' probabilities and Grad-CAM maps, stored."""
    from bonescan_core import explain

    started = time.perf_counter()
    explained = explain.explain_images(db, db_path, run_id, image_ids)
    seconds = time.perf_counter() - started
    assert list(explained) == image_ids, explained
    for found in explained.values():
        assert found.heatmap.ndim == 2 and found.probability is not None, found  # computed, not cached
    return seconds


def measure(db_path: Path, study_ids: list[int], backbone: str, size: tuple[int, int], view_mode: str = "per_image") -> dict:
    from bonescan_core import db as dbm
    from bonescan_core import heavy, runs

    run_id, build_s = save_run(db_path, backbone, size, view_mode)
    started = time.perf_counter()
    model, _, model_size = runs.load_model(db_path, run_id)
    load_s = time.perf_counter() - started
    assert model_size == size, (model_size, size)
    with dbm.opened(db_path) as db:
        views = {study_id: study_views(db, study_id) for study_id in study_ids}
        warmup = one_study(db, db_path, run_id, views[study_ids[0]])
        timed = [one_study(db, db_path, run_id, views[study_id]) for study_id in study_ids[1:]]
    runs.clear_model_cache()
    del model
    heavy.keras_module().backend.clear_session()
    gc.collect()
    study = summary(timed)
    goal = GOALS_S.get(backbone)
    return {"backbone": backbone, "size": f"{size[0]}x{size[1]}", "view_mode": view_mode, "weights": "none", "studies": len(timed),
            "views_per_study": 2, "study_s": study, "warmup_study_s": round(warmup, 3),
            "load_model_s": round(load_s, 3), "build_model_s": round(build_s, 3),
            "goal_s": goal, "goal_met": None if goal is None else study["p50"] < goal}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 timed studies instead of 20")
    parser.add_argument("--studies", type=int, default=None, help="timed studies per backbone (default 20, --quick 5)")
    parser.add_argument("--backbones", default="resnet50,vgg19,densenet121")
    parser.add_argument("--size", default="646x220", help="HxW (default 646x220, the app's default)")
    parser.add_argument("--view-mode", default="per_image", help="per_image, composite or fusion")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    n_studies = args.studies or (5 if args.quick else 20)
    size = tuple(int(v) for v in args.size.split("x"))
    from bonescan_core.heavy import keras_module

    keras = keras_module()
    with tempfile.TemporaryDirectory(prefix="bonescan-bench-") as folder:
        db_path = make_db(Path(folder), n_studies + 1)
        from bonescan_core import db as dbm

        with dbm.opened(db_path) as db:
            study_ids = [row[0] for row in db.execute("SELECT id FROM studies ORDER BY id")]
        for backbone in args.backbones.split(","):
            result = measure(db_path, study_ids, backbone, size, args.view_mode)
            print(json.dumps({"bench": "inference", **result, "backend": keras.backend.backend(),
                              "note": "random weights (none): the weights' values do not change the cost",
                              **environment()}), flush=True)


if __name__ == "__main__":
    main()
