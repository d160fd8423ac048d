"""Prediction benchmark: ``bonescan predict`` over N studies against the model's bare throughput.

What prediction on new scans costs once a run's model is loaded, through the app's own path
(``prediction.predict_studies``: decode and fit the stored pixels in a loader thread, the
model behind its in-graph input pipeline, calibration, the rows stored), against the bare
``model.predict`` on the very same images already preprocessed (3-channel backbone input in
memory, the same chunks and batch size; preprocessing not timed), the two alternating in
blocks of ``--block`` studies (each block's ``predict_studies`` call pays its own set-up, as
a job of that size would). Goal: predict throughput
>= 0.9 x bare (``ratio``, ``goal_met``): batching, no per-study model reload, decoding hidden
behind inference. Grad-CAM (``prediction.explain_studies``, what a prediction job does next)
is a separate figure, timed on the first ``--gradcam-studies`` studies after the warm-up one
(default 100: its rate per image does not depend on how many; every map of 1,000 studies
would triple the benchmark's time).

The model is built with ``models.build_model(..., weights)`` (``none``: offline; the weights'
values do not change the cost), saved as a finished run's model in a temp database of N
demo studies (two views each, 1024 x 256) and loaded by ``runs.load_model``, as a job loads
it. Every path is warmed up (tracing) before it is timed: predict and bare on the first
chunk, Grad-CAM on the first study, then timed over the next ``--gradcam-studies`` studies (the
first one's maps are stored by the warm-up).

    python bench/predict.py                                    # densenet121, 646x220, 1000 studies
    python bench/predict.py --studies 10 --image-size 128x64   # a quick check
    python bench/predict.py --no-gradcam                       # skip the Grad-CAM figure
    python bench/predict.py --gradcam-studies 999              # maps of every study

Prints one JSON line. Timings, never assertions: nothing in the test suite checks them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from common import environment, image_size

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GOAL_RATIO = 0.9


def make_run(folder: Path, n_studies: int, backbone: str, size: tuple[int, int], weights: str, batch_size: int) -> tuple[Path, int]:
    """A database of demo studies and a finished run (no split) whose model is a fresh ``build_model``."""
    from bonescan_core import db as dbm
    from bonescan_core import heavy, jobs, models, runs
    from bonescan_core.ingest import add_demo_studies

    db_path = folder / "labels.db"
    with dbm.opened(db_path) as db:
        add_demo_studies(db, n_studies, seed=0)
        config = {"backbone": backbone, "weights": weights, "image_size": list(size), "view_mode": "per_image",
                  "batch_size": batch_size}
        run_id = jobs.enqueue(db, backbone, config, "bench-predict")
        path = runs.model_file(db_path, run_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        models.build_model(backbone, weights, size, seed=0).save(path)
        heavy.keras_module().backend.clear_session()
        runs.record_result(db, db_path, run_id, runs.RunResult(
            threshold=0.5, images_per_second=0.0, model_file=path, weights_sha256=runs.file_sha256(path), device="",
            predictions=(), facts={}))
        runs.finish(db, run_id, "done")
    return db_path, run_id


def bare_seconds(model, backbone, chunks, batch_size: int) -> float:
    """Seconds of ``model.predict`` alone over the chunks' preprocessed input (preparing it is not timed)."""
    from bonescan_core import preprocess

    total = 0.0
    for images in chunks:
        x = preprocess.to_model_input(images.astype("float32"), backbone)
        started = time.perf_counter()
        model.predict(x, batch_size=batch_size, verbose=0)
        total += time.perf_counter() - started
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="densenet121", choices=["resnet50", "vgg19", "densenet121"])
    parser.add_argument("--image-size", default="646x220", help="HxW (default 646x220, the app's default)")
    parser.add_argument("--studies", type=int, default=1000, help="studies to predict (two images each; default 1000)")
    parser.add_argument("--weights", default="none", help="none (default, offline) or imagenet")
    parser.add_argument("--batch-size", type=int, default=16, help="the run's batch size (default 16, the app's)")
    parser.add_argument("--no-gradcam", action="store_true", help="skip the Grad-CAM figure")
    parser.add_argument("--block", type=int, default=100,
                        help="studies per block; predict and bare alternate block by block (default 100)")
    parser.add_argument("--gradcam-studies", type=int, default=100, help="studies whose maps are timed (default 100)")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    size = image_size(args.image_size)

    from bonescan_core import db as dbm
    from bonescan_core import prediction, preprocess, runs
    from bonescan_core.heavy import keras_module

    keras = keras_module()
    with tempfile.TemporaryDirectory(prefix="bonescan-bench-") as folder:
        started = time.perf_counter()
        db_path, run_id = make_run(Path(folder), args.studies, args.backbone, size, args.weights, args.batch_size)
        setup_s = time.perf_counter() - started
        with dbm.opened(db_path) as db:
            run = runs.get(db, run_id)
            study_ids = [row[0] for row in db.execute("SELECT id FROM studies ORDER BY id")]
            started = time.perf_counter()
            model, backbone, _ = runs.load_model(db_path, run)
            load_s = time.perf_counter() - started
            chunk = 4 * args.batch_size  # predict_studies' default chunk
            samples = preprocess.list_samples(db, dict.fromkeys(study_ids, 0), "per_image")
            parts = prediction.study_chunks(samples, chunk)
            warm = study_ids[:1]

            # Warm-up: predict and bare trace their step on the first chunk (full and last batch
            # shapes), Grad-CAM on the first study (below).
            prediction.predict_studies(db, db_path, run, sorted({s.study_id for s in parts[0]}))
            bare_seconds(model, backbone, [preprocess.load_images(db, parts[0], size)], args.batch_size)

            # Interleaved in blocks of studies, the order alternating, so that a change in the
            # machine's load (it is shared) falls on both paths alike rather than on one.
            predict_s = bare_s = 0.0
            counts = {"n_studies": 0, "n_images": 0}
            blocks = [study_ids[i : i + args.block] for i in range(0, len(study_ids), args.block)]
            for index, block in enumerate(blocks):
                block_parts = prediction.study_chunks(preprocess.list_samples(db, dict.fromkeys(block, 0), "per_image"), chunk)
                for path in (("predict", "bare") if index % 2 == 0 else ("bare", "predict")):
                    if path == "predict":
                        done = prediction.predict_studies(db, db_path, run, block)
                        predict_s += done["predict_seconds"]
                        counts = {key: counts[key] + done[key] for key in counts}
                    else:
                        images = [preprocess.load_images(db, part, size) for part in block_parts]
                        bare_s += bare_seconds(model, backbone, images, args.batch_size)
                        del images
            gradcam = None
            if not args.no_gradcam:
                prediction.explain_studies(db, db_path, run_id, warm)
                started = time.perf_counter()
                explained = prediction.explain_studies(db, db_path, run_id, study_ids[1:1 + args.gradcam_studies])
                seconds = time.perf_counter() - started
                gradcam = {"studies": len(study_ids[1:1 + args.gradcam_studies]), "images": explained, "seconds": round(seconds, 3), "images_per_second": round(explained / seconds, 3)}
    n_images = counts["n_images"]
    ratio = (n_images / predict_s) / (n_images / bare_s)
    print(json.dumps({
        "bench": "predict", "backbone": args.backbone, "image_size": f"{size[0]}x{size[1]}", "weights": args.weights,
        "batch_size": args.batch_size, "chunk": chunk, "block": args.block, "studies": counts["n_studies"], "images": n_images,
        "predict": {"seconds": round(predict_s, 3), "images_per_second": round(n_images / predict_s, 3)},
        "bare_model_predict": {"seconds": round(bare_s, 3), "images_per_second": round(n_images / bare_s, 3)},
        "ratio": round(ratio, 3), "goal_ratio": GOAL_RATIO, "goal_met": ratio >= GOAL_RATIO,
        "gradcam": gradcam, "load_model_s": round(load_s, 3), "setup_s": round(setup_s, 3),
        "backend": keras.backend.backend(), **environment(),
    }), flush=True)


if __name__ == "__main__":
    main()
