"""Learning benchmark: a from-scratch run on demo phantoms in a CPU-feasible configuration.
Prints one JSON line: configuration, wall time, test AUC with its 95% CI.

    python bench/learning.py              # 200 studies, ResNet50 from scratch at 128x64, 30 epochs (~15 min, 2 cores)
    python bench/learning.py --quick      # 60 studies, 10 epochs (a smoke run; too small to show learning)
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

from common import environment  # noqa: E402 - bench/ is on the path only after the line above


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--studies", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--lr-schedule", default="none", choices=["none", "cosine", "plateau"])
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from bonescan_core import db as dbm
    from bonescan_core import evaluation, jobs, runs
    from bonescan_core.ingest import add_demo_studies
    from bonescan_core.training import TrainConfig

    n_studies = args.studies or (60 if args.quick else 200)
    epochs = args.epochs or (10 if args.quick else 30)
    # From scratch, a small network input and no augmentation learn within CPU minutes; early
    # stopping stays off (patience = epochs) so BatchNorm statistics have time to settle.
    config = TrainConfig(backbone="resnet50", weights="none", mode="full", epochs=epochs, batch_size=16,
                         learning_rate=1e-3, image_size=(128, 64), augment={}, patience=epochs, seed=0,
                         lr_schedule=args.lr_schedule)
    with tempfile.TemporaryDirectory(prefix="bonescan-learning-") as folder:
        db_path = Path(folder) / "labels.db"
        with dbm.opened(db_path) as db:
            add_demo_studies(db, n_studies, seed=0)
            run_id = jobs.enqueue(db, config.backbone, config.to_dict(), config.identity_hash())
        started = time.perf_counter()
        jobs.run_worker(db_path, once=True, echo=lambda line: None)
        seconds = time.perf_counter() - started
        with dbm.opened(db_path) as db:
            run = runs.get(db, run_id)
            result = evaluation.evaluate(db, run_id).as_json() if run.status == "done" else None
    print(json.dumps({
        "bench": "learning", "status": run.status, "error": run.error, "studies": n_studies,
        "config": config.to_dict(), "wall_s": round(seconds, 1), "images_per_second": run.results.images_per_second,
        "test_images": result and result["n_images"], "test_auc": result and result["metrics"]["auc"],
        "test_accuracy": result and result["metrics"]["accuracy"], "threshold": run.threshold,
        **environment(),
    }), flush=True)


if __name__ == "__main__":
    main()
