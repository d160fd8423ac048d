"""From-scratch benchmark: the app's training loop against a bare ``model.fit`` of the same network, same split.

For each seed, on one database of demo phantoms: the split of that seed, then per backbone
(i) the app's loop (``training.train_run``: weights none, ``--mode full`` and the app's
defaults: the paper's augmentation, class weights, early stopping, BatchNorm re-estimation)
and (ii) a bare Keras loop on the same images (the same network from ``models.build_model``
and input scaling, Adam at the same learning rate, binary cross-entropy, ``fit`` for all the
epochs, no augmentation, no callbacks). Prints one JSON line per seed and backbone: image- and
study-level (max over views) validation and test AUC and wall time of each, and the app's notes.

    nice -n 10 python bench/from_scratch.py --studies 64 --size 128x64 --epochs 3 --seeds 0   # a small check (CPU minutes)
    python bench/from_scratch.py    # issue 12's goal: 200 studies, 512x128, 10 epochs, seeds 0,1,2 (hours on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from common import environment  # noqa: E402 - bench/ is on the path only after the lines above


def _aucs(samples, labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float | None]:
    """Image-level and study-level (max over a study's views) ROC AUC, None where one class only."""
    from bonescan_core.evaluation import roc_points
    from bonescan_core.studystats import study_scores

    def auc(y: np.ndarray, p: np.ndarray) -> float | None:
        value = roc_points(y, p)["auc"]
        return None if value != value else round(float(value), 4)  # nan: one class only

    study_ids = np.array([s.study_id for s in samples])
    ids, scores = study_scores(study_ids, probabilities, "max")
    study_labels = np.array([labels[study_ids == sid].max() for sid in ids])
    return {"image_auc": auc(labels, probabilities), "study_auc": auc(study_labels, scores)}


def app_loop(db, config, model_file: Path) -> dict:
    """The app's own training run; AUCs from the predictions it returns."""
    from bonescan_core import training

    started = time.perf_counter()
    result = training.train_run(db, config, training.NullReporter(), model_file)
    seconds = time.perf_counter() - started
    out: dict = {"wall_s": round(seconds, 1), "phase_epochs": result.facts["phase_epochs"], "notes": result.facts["notes"]}
    for subset in ("val", "test"):
        rows = [p for p in result.predictions if p.subset == subset]
        by_image = {p.image_id: p for p in rows}
        samples = _samples_for(db, sorted(by_image))
        labels = np.array([by_image[s.image_ids[0]].label for s in samples])
        probabilities = np.array([by_image[s.image_ids[0]].probability for s in samples])
        out[subset] = _aucs(samples, labels, probabilities)
    return out


def _samples_for(db, image_ids: list[int]):
    from bonescan_core.preprocess import Sample

    rows = {i: s for i, s in db.execute("SELECT id, study_id FROM images").fetchall()}
    return [Sample(rows[i], (i,), (None,), 0) for i in image_ids]


def bare_loop(db, config) -> dict:
    """``model.fit`` of the same network on the same split's images: no augmentation, no callbacks."""
    from bonescan_core import models, preprocess, training
    from bonescan_core.heavy import keras_module

    keras = keras_module()
    started = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    data = training._select_samples(db, config.split_id, config, rng)
    images = {subset: preprocess.load_images(db, data.samples[subset], config.image_size)[..., None].astype(np.float32)
              for subset in ("train", "val", "test")}
    model = models.build_model(config.backbone, "none", config.image_size, config.dropout, seed=config.seed)
    wrapped = preprocess.with_input_pipeline(model, config.backbone)  # the same input scaling, in the graph
    wrapped.compile(optimizer=keras.optimizers.Adam(config.learning_rate), loss=keras.losses.BinaryCrossentropy())
    wrapped.fit(images["train"], data.labels["train"].astype(np.float32), batch_size=config.batch_size,
                epochs=config.epochs, shuffle=True, verbose=0)
    out: dict = {}
    for subset in ("val", "test"):
        probabilities = np.asarray(wrapped.predict(images[subset], batch_size=config.batch_size, verbose=0)).reshape(-1)
        out[subset] = _aucs(data.samples[subset], data.labels[subset], probabilities)
    out["wall_s"] = round(time.perf_counter() - started, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="resnet50,densenet121", help="comma-separated (default resnet50,densenet121)")
    parser.add_argument("--studies", type=int, default=200, help="demo studies (default 200)")
    parser.add_argument("--size", default="512x128", help="HEIGHTxWIDTH (default 512x128)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated split/model seeds (default 0,1,2)")
    parser.add_argument("--demo-seed", type=int, default=0, help="seed of the demo phantoms (default 0)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from bonescan_core import db as dbm
    from bonescan_core import splits
    from bonescan_core.cli import parse_size
    from bonescan_core.ingest import add_demo_studies
    from bonescan_core.training import TrainConfig

    size = parse_size(args.size)
    with tempfile.TemporaryDirectory(prefix="bonescan-from-scratch-") as folder:
        db_path = Path(folder) / "labels.db"
        with dbm.opened(db_path) as db:
            add_demo_studies(db, args.studies, seed=args.demo_seed)
            for seed in (int(s) for s in args.seeds.split(",")):
                split_id = splits.ensure_split(db, seed)
                for backbone in args.backbones.split(","):
                    config = TrainConfig(backbone=backbone, weights="none", mode="full", epochs=args.epochs,
                                         batch_size=args.batch_size, learning_rate=args.lr, image_size=size, seed=seed,
                                         split_id=split_id)
                    app = app_loop(db, config, Path(folder) / f"{backbone}-{seed}.keras")
                    bare = bare_loop(db, config)
                    print(json.dumps({
                        "bench": "from_scratch", "backbone": backbone, "seed": seed, "split_id": split_id,
                        "studies": args.studies, "demo_seed": args.demo_seed, "image_size": list(size), "epochs": args.epochs,
                        "app": app, "bare": bare, "app_config": config.to_dict(), **environment(),
                    }), flush=True)


if __name__ == "__main__":
    main()
