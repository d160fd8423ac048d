"""Inference benchmark: seconds per study (anterior + posterior demo phantom) for a loaded run model.

What one study costs once a run's model is in memory, through the app's own code:

* probabilities of both views: ``preprocess.load_images`` (decode, normalise, fit) →
  ``preprocess.image_batches`` → ``predict`` of the model wrapped by
  ``preprocess.with_input_pipeline``, as training predicts its subsets (the wrapper is built
  once per loaded model, not per study: a new wrapper would trace a new predict function);
* a Grad-CAM map of each view: ``explain.explain_image``, as the worker precomputes them and
  the Evaluate page / ``bonescan explain`` asks for them (model from ``load_run_model``'s cache,
  Grad-CAM, map onto the image, store in ``explanations``). Every study is new, so no map
  comes from the cache.

The model is built with ``models.build_model(..., weights="none")`` (offline; the weights'
values do not change the cost), saved as a finished run's ``runs/*.keras`` in a temp database
with demo studies and loaded by ``explain.load_run_model``, as the app loads it. One study warms
it up (traced functions, caches); N further studies are timed. One JSON line per backbone:
study p50/p95/mean (and min/max), p50 of the predict part and of the Grad-CAM part, the
model's load time and the warm-up study. Goal: DenseNet121 study p50 < 1 s (``goal_s``,
``goal_met``).

    python bench/inference.py                         # 646x220, three backbones, N = 20
    python bench/inference.py --quick                 # N = 5
    python bench/inference.py --quick --backbones densenet121 --size 128x64

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

import numpy as np
from common import environment, summary

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GOALS_S = {"densenet121": 1.0}  # study p50


def make_db(folder: Path, n_studies: int) -> Path:
    from bonescan_core import db as dbm
    from bonescan_core.ingest import add_demo_studies

    path = folder / "labels.db"
    with dbm.opened(path) as db:
        add_demo_studies(db, n_studies, seed=0)
    return path


def save_run(db_path: Path, backbone: str, size: tuple[int, int]) -> tuple[int, float]:
    """Build a classifier (weights none), save it as a finished run's model; returns (run id, build seconds)."""
    from bonescan_core import db as dbm
    from bonescan_core import jobs, models
    from bonescan_core.training import file_sha256

    started = time.perf_counter()
    model = models.build_model(backbone, "none", size, seed=0)
    build_s = time.perf_counter() - started
    folder = jobs.runs_dir(db_path)
    folder.mkdir(exist_ok=True)
    name = f"bench-{backbone}-{size[0]}x{size[1]}.keras"
    model.save(folder / name)
    del model
    models.keras_module().backend.clear_session()  # the app's model is the one load_run_model reads back
    config = {"backbone": backbone, "weights": "none", "image_size": list(size), "view_mode": "per_image"}
    with dbm.opened(db_path) as db:
        run_id = jobs.enqueue(db, backbone, config, f"bench-inference-{name}")
        with dbm.write(db):
            db["runs"].update(run_id, {"status": "done", "weights_path": name, "weights_sha256": file_sha256(folder / name)})
    return run_id, build_s


def study_samples(db, study_id: int) -> list:
    from bonescan_core.preprocess import list_samples

    samples = list_samples(db, {study_id: 0}, "per_image")
    assert sorted(s.views[0] for s in samples) == ["anterior", "posterior"], samples
    return samples


def one_study(db, db_path: Path, run_id: int, predictor, size: tuple[int, int], samples: list) -> tuple[float, float]:
    """(predict seconds, Grad-CAM seconds) for one study's two views."""
    from bonescan_core import explain, preprocess

    started = time.perf_counter()
    images = preprocess.load_images(db, samples, size)
    batches = preprocess.image_batches(images, np.zeros(len(samples)), len(samples))
    probabilities = predictor.predict(batches, verbose=0)
    predicted = time.perf_counter()
    assert probabilities.shape == (len(samples), 1), probabilities.shape
    for sample in samples:
        heatmap = explain.explain_image(db, db_path, run_id, sample.key)
        assert heatmap.ndim == 2
    return predicted - started, time.perf_counter() - predicted


def measure(db_path: Path, study_ids: list[int], backbone: str, size: tuple[int, int]) -> dict:
    from bonescan_core import db as dbm
    from bonescan_core import explain, preprocess

    run_id, build_s = save_run(db_path, backbone, size)
    started = time.perf_counter()
    model, bb, model_size = explain.load_run_model(db_path, run_id)
    load_s = time.perf_counter() - started
    assert model_size == size, (model_size, size)
    predictor = preprocess.with_input_pipeline(model, bb)
    with dbm.opened(db_path) as db:
        samples = {study_id: study_samples(db, study_id) for study_id in study_ids}
        warmup = one_study(db, db_path, run_id, predictor, size, samples[study_ids[0]])
        timed = [one_study(db, db_path, run_id, predictor, size, samples[study_id]) for study_id in study_ids[1:]]
    explain.clear_model_cache()
    del model, predictor
    explain.keras_module().backend.clear_session()
    gc.collect()
    predict = [p for p, _ in timed]
    gradcam = [g for _, g in timed]
    study = summary([p + g for p, g in timed])
    goal = GOALS_S.get(backbone)
    return {"backbone": backbone, "size": f"{size[0]}x{size[1]}", "weights": "none", "studies": len(timed),
            "views_per_study": 2, "study_s": study, "predict_p50_s": summary(predict)["p50"],
            "gradcam_p50_s": summary(gradcam)["p50"], "warmup_study_s": round(sum(warmup), 3),
            "load_model_s": round(load_s, 3), "build_model_s": round(build_s, 3),
            "goal_s": goal, "goal_met": None if goal is None else study["p50"] < goal}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 timed studies instead of 20")
    parser.add_argument("--studies", type=int, default=None, help="timed studies per backbone (default 20, --quick 5)")
    parser.add_argument("--backbones", default="resnet50,vgg19,densenet121")
    parser.add_argument("--size", default="646x220", help="HxW (default 646x220, the app's default)")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    n_studies = args.studies or (5 if args.quick else 20)
    size = tuple(int(v) for v in args.size.split("x"))
    from bonescan_core.models import keras_module

    keras = keras_module()
    with tempfile.TemporaryDirectory(prefix="bonescan-bench-") as folder:
        db_path = make_db(Path(folder), n_studies + 1)
        from bonescan_core import db as dbm

        with dbm.opened(db_path) as db:
            study_ids = [row[0] for row in db.execute("SELECT id FROM studies ORDER BY id")]
        for backbone in args.backbones.split(","):
            result = measure(db_path, study_ids, backbone, size)
            print(json.dumps({"bench": "inference", **result, "backend": keras.backend.backend(),
                              "note": "random weights (none): the weights' values do not change the cost",
                              **environment()}), flush=True)


if __name__ == "__main__":
    main()
