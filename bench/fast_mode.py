"""Fast-mode benchmark: a head-only run on demo phantoms per backbone, first run (computes and
caches the pooled features) and re-run (every feature from the cache), against one inference
pass over the same images and one epoch of full fine-tuning.

One JSON line per backbone with ``first_run_s``, ``rerun_s``, ``inference_pass_s``,
``first_over_inference`` and ``finetune_epoch_s``; the runs are timed in one process, as
the background worker runs them (TensorFlow already imported). Goals: re-run < 10 s, first
run <= 1.2 x one inference pass.

    python bench/fast_mode.py                          # 570 images, three backbones, 646x220 (about 1.5 h on 2 cores)
    python bench/fast_mode.py --quick                  # 120 images, resnet50 only
    python bench/fast_mode.py --backbones densenet121 --images 570 --no-finetune
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


class PhaseClock:
    """A training reporter that notes when each phase (preparing, features, head, saving, ...) starts."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.phases: dict[str, float] = {}

    def progress(self, fields: dict) -> None:
        self.phases.setdefault(fields.get("phase", "?"), round(time.perf_counter() - self.started, 2))

    def epoch_done(self, *args) -> None:
        pass

    def cancelled(self) -> bool:
        return False


def timed_run(db_path: Path, config) -> tuple[float, dict]:
    """Enqueue and train one run in this process; (wall seconds, facts incl. when each phase began)."""
    from bonescan_core import db as dbm
    from bonescan_core import jobs, runs, training

    with dbm.opened(db_path) as db:
        run_id = jobs.enqueue(db, config.backbone, config.to_dict(), config.identity_hash())
        jobs.claim_next(db, run_id)
        clock = PhaseClock()
        result = training.train_run(db, config, clock, runs.model_file(db_path, run_id))
    seconds = time.perf_counter() - clock.started
    return seconds, {**result.facts, "phase_starts_s": clock.phases}


def inference_pass_s(db_path: Path, backbone: str, size: tuple[int, int], batch_size: int) -> tuple[float, int]:
    """Seconds for one pass of the pooled-feature model over every image, already decoded and in
    memory (the least a first fast run can cost), and the number of images."""
    from bonescan_core import db as dbm
    from bonescan_core import models, preprocess
    from bonescan_core.review import study_statuses

    with dbm.opened(db_path) as db:
        labels = {sid: int(s.label == "metastatic") for sid, s in study_statuses(db).items() if s.included}
        samples = preprocess.list_samples(db, labels)
        images = preprocess.load_images(db, samples, size)
    extractor = models.features_of(models.build_model(backbone, "none", size, seed=0))
    x = preprocess.to_model_input(images, backbone)
    extractor.predict(x[:batch_size], batch_size=batch_size, verbose=0)  # trace once, outside the clock
    started = time.perf_counter()
    extractor.predict(x, batch_size=batch_size, verbose=0)
    return time.perf_counter() - started, len(samples)


def measure(backbone: str, n_images: int, size: tuple[int, int], batch_size: int, finetune: bool) -> dict:
    from bonescan_core import db as dbm
    from bonescan_core import splits
    from bonescan_core.ingest import add_demo_studies
    from bonescan_core.training import TrainConfig

    with tempfile.TemporaryDirectory(prefix="bonescan-fast-") as folder:
        db_path = Path(folder) / "labels.db"
        with dbm.opened(db_path) as db:
            add_demo_studies(db, n_images // 2, seed=0)  # two views per study, reference labels
            split_id = splits.ensure_split(db, seed=0)
        base = {"backbone": backbone, "weights": "none", "image_size": size, "batch_size": batch_size, "split_id": split_id}
        first_s, first = timed_run(db_path, TrainConfig(mode="fast", epochs=20, learning_rate=1e-3, **base))
        # A re-run with other head settings: every feature comes from the cache.
        rerun_s, rerun = timed_run(db_path, TrainConfig(mode="fast", epochs=30, learning_rate=3e-4, dropout=0.5, **base))
        pass_s, n = inference_pass_s(db_path, backbone, size, batch_size)
        finetune_s = None
        if finetune:
            finetune_s, _ = timed_run(db_path, TrainConfig(mode="full", epochs=1, augment={}, **base))
    return {
        "backbone": backbone, "size": f"{size[0]}x{size[1]}", "images": n, "batch_size": batch_size,
        "first_run_s": round(first_s, 2), "features_computed": first.get("features_computed"),
        "feature_images_per_second": first.get("feature_images_per_second"),
        "rerun_s": round(rerun_s, 2), "rerun_features_cached": rerun.get("features_cached"),
        "rerun_features_computed": rerun.get("features_computed"),
        "first_phase_starts_s": first["phase_starts_s"], "rerun_phase_starts_s": rerun["phase_starts_s"],
        "inference_pass_s": round(pass_s, 2), "first_over_inference": round(first_s / pass_s, 3),
        "finetune_epoch_s": None if finetune_s is None else round(finetune_s, 1),
        "goals": {"rerun_under_10_s": rerun_s < 10, "first_within_1_2_inference": first_s <= 1.2 * pass_s},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="120 images, resnet50 only")
    parser.add_argument("--backbones", default=None, help="comma-separated (default: all three; --quick: resnet50)")
    parser.add_argument("--images", type=int, default=None, help="demo images (two per study; default 570, --quick 120)")
    parser.add_argument("--size", default="646x220", help="HxW")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-finetune", action="store_true", help="skip the one-epoch full fine-tuning comparison")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    backbones = (args.backbones or ("resnet50" if args.quick else "resnet50,vgg19,densenet121")).split(",")
    n_images = args.images or (120 if args.quick else 570)
    size = tuple(int(v) for v in args.size.split("x"))
    from bonescan_core.heavy import keras_module

    keras_module()  # a worker imports TensorFlow once, before its first run: keep that out of the clocks
    for backbone in backbones:
        result = measure(backbone, n_images, size, args.batch_size, finetune=not args.no_finetune)
        print(json.dumps({"bench": "fast_mode", **result, **environment()}), flush=True)


if __name__ == "__main__":
    main()
