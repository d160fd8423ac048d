"""Learning benchmark: a from-scratch run on demo phantoms in a CPU-feasible configuration.
Prints one JSON line: configuration, wall time (from enqueueing to done, like pressing Train),
training images/s, test AUC (image and study level) with its 95% CI.

    python bench/learning.py              # 200 studies, ResNet50 from scratch at 128x64, 30 epochs (~15 min, 2 cores)
    python bench/learning.py --quick      # 60 studies, 10 epochs (a smoke run; too small to show learning)

    # scintinet with the defaults `bonescan train --backbone scintinet` uses (weights none, mode full,
    # 1024x256, view mode fusion, 20 epochs, patience 10, no augmentation); override with
    # --epochs/--image-size/--view-mode/--patience:
    python bench/learning.py --backbone scintinet --studies 100 --demo-seed 7 --epochs 4 --image-size 512x128
    # issue 12's goal run (300 demo studies, seed 7; goal: study-level test AUC >= 0.90 in <= 15 min on 2 cores):
    python bench/learning.py --backbone scintinet --studies 300 --demo-seed 7
    python bench/learning.py --lr-schedule cosine   # the same with a learning-rate schedule (none, cosine, plateau)
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

from common import environment, image_size  # noqa: E402 - bench/ is on the path only after the line above


def _metric(block: dict | None, name: str) -> dict | None:
    return block and block["metrics"].get(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--backbone", default="resnet50", help="resnet50 (default, the historic configuration) or scintinet, ...")
    parser.add_argument("--studies", type=int, default=None)
    parser.add_argument("--demo-seed", type=int, default=0, help="seed of the demo phantoms (issue 12 uses 7)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--image-size", type=image_size, default=None, metavar="HxW")
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--view-mode", default=None, help="per_image, composite or fusion (default: the backbone's)")
    parser.add_argument("--patience", type=int, default=None)
    parser.add_argument("--lr-schedule", default="none", choices=["none", "cosine", "plateau"])
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from bonescan_core import db as dbm
    from bonescan_core import evaluation, jobs, runs
    from bonescan_core.ingest import add_demo_studies
    from bonescan_core.training import TrainConfig

    n_studies = args.studies or (60 if args.quick else 200)
    if args.backbone == "resnet50":
        epochs = args.epochs or (10 if args.quick else 30)
        # From scratch, a small network input and no augmentation learn within CPU minutes; early
        # stopping stays off (patience = epochs) so BatchNorm statistics have time to settle.
        config = TrainConfig(backbone="resnet50", weights="none", mode="full", epochs=epochs, batch_size=16,
                             learning_rate=1e-3, image_size=args.image_size or (128, 64), augment={}, patience=epochs,
                             seed=0, lr_schedule=args.lr_schedule)
    else:  # the backbone's own defaults (what `bonescan train --backbone NAME` runs), with the overrides given
        overrides = {"epochs": args.epochs, "image_size": args.image_size, "augment": {} if args.no_augment else None,
                     "view_mode": args.view_mode, "patience": args.patience}
        config = TrainConfig(backbone=args.backbone, seed=0, lr_schedule=args.lr_schedule,
                             **{k: v for k, v in overrides.items() if v is not None})
    with tempfile.TemporaryDirectory(prefix="bonescan-learning-") as folder:
        db_path = Path(folder) / "labels.db"
        with dbm.opened(db_path) as db:
            add_demo_studies(db, n_studies, seed=args.demo_seed)
            run_id = jobs.enqueue(db, config.backbone, config.to_dict(), config.identity_hash())
        started = time.perf_counter()
        jobs.run_worker(db_path, once=True, echo=lambda line: None)
        seconds = time.perf_counter() - started
        with dbm.opened(db_path) as db:
            run = runs.get(db, run_id)
            result = evaluation.evaluate(db, run_id).as_json() if run.status == "done" else None
            epochs_run = runs.epochs(db, run_id) if run.status == "done" else []
    study = result and result["study_level"]
    print(json.dumps({
        "bench": "learning", "status": run.status, "error": run.error, "studies": n_studies, "demo_seed": args.demo_seed,
        "config": config.to_dict(), "wall_s": round(seconds, 1), "images_per_second": run.results.images_per_second,
        "epochs_run": len(epochs_run), "split": {k: run.results.facts.get(k) for k in ("n_train", "n_val", "n_test")},
        "test_images": result and result["n_images"], "test_auc": _metric(result, "auc"),
        "test_accuracy": _metric(result, "accuracy"), "threshold": run.threshold,
        "test_studies": study and study["n_studies"], "study_test_auc": _metric(study, "auc"),
        "localisation": result and result.get("localisation"),  # the pointing game of the worker's cached maps
        "val_auc_per_epoch": [round(e["metrics"]["val_auc"], 4) for e in epochs_run if e["metrics"].get("val_auc") is not None],
        **environment(),
    }), flush=True)


if __name__ == "__main__":
    main()
