"""Fast-mode benchmark: a head-only run on demo phantoms per backbone, first run (computes and
caches the pooled features) and re-run (every feature from the cache), against one inference
pass over the same images and one epoch of full fine-tuning.

One JSON line per backbone with ``first_run_s``, ``rerun_s``, ``inference_pass_s``,
``first_over_inference`` and ``finetune_epoch_s``; those runs are timed in one process, as
the background worker runs them (TensorFlow already imported). Then the two paths a user
waits on, for a re-run with every feature cached (issue 17, point 7): ``cli_rerun_s``, the
wall time of ``bonescan train --mode fast`` as a fresh subprocess (Python start, TensorFlow's
import, model building, training, saving: until the command exits), and ``page_*_s``, the Train
page's path: the run enqueued as the page does, a worker (``jobs.ensure_worker``) trains it,
timed until the run's status is ``done``; ``page_cold_s`` starts the worker (none was
running), ``page_warm_s`` finds it idle. Goals: re-run < 10 s, first run <= 1.2 x one
inference pass, CLI re-run < 10 s wall, page < 5 s.

    python bench/fast_mode.py                          # 570 images, three backbones, 646x220 (about 1.5 h on 2 cores)
    python bench/fast_mode.py --quick                  # 120 images, resnet50 only
    python bench/fast_mode.py --backbones densenet121 --images 570 --no-finetune
    python bench/fast_mode.py --backbones resnet50 --images 400 --no-finetune --no-pass   # the user's paths only
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
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


def cli_rerun_s(db_path: Path, backbone: str, size: tuple[int, int], batch_size: int, split_id: int) -> tuple[float, dict]:
    """Wall seconds of ``bonescan train --mode fast`` (other head settings than the runs before,
    so a new run) in a fresh Python process, until it exits; and the run's facts."""
    from bonescan_core import db as dbm
    from bonescan_core import runs

    command = [sys.executable, "-m", "bonescan_core", "--db", str(db_path), "train", "--backbone", backbone,
               "--weights", "none", "--mode", "fast", "--image-size", f"{size[0]}x{size[1]}",
               "--batch-size", str(batch_size), "--epochs", "25", "--lr", "5e-4", "--split", str(split_id)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - started
    with dbm.opened(db_path) as db:
        run = runs.get(db, int(done.stdout.split()[-1]))
    return seconds, {**run.results.facts, "status": run.status}


def page_path_s(db_path: Path, config) -> tuple[float, dict]:
    """The Train page's path: enqueue as the page does, ``jobs.ensure_worker``, then poll the
    run (every 50 ms) until it is done; wall seconds and the run's facts."""
    from bonescan_core import db as dbm
    from bonescan_core import jobs, runs

    started = time.perf_counter()
    with dbm.opened(db_path) as db:
        run_id = jobs.enqueue_backbones(db, [config.backbone], config)[0].run_id
    jobs.ensure_worker(db_path, idle_exit_s=300.0)
    while True:
        with dbm.opened(db_path) as db:
            run = runs.get(db, run_id)
        if run.status not in ("queued", "running"):
            break
        time.sleep(0.05)
    return time.perf_counter() - started, {**run.results.facts, "status": run.status}


def stop_worker(db_path: Path) -> None:
    """Stop the worker :func:`page_path_s` started (its pid from the heartbeat row)."""
    from bonescan_core import db as dbm
    from bonescan_core import jobs

    with dbm.opened(db_path) as db:
        row = db.execute("SELECT value FROM settings WHERE key = ?", [jobs.WORKER_KEY]).fetchone()
    pid = json.loads(row[0]).get("pid") if row else None
    if pid:
        os.kill(int(pid), signal.SIGTERM)


def measure(backbone: str, n_images: int, size: tuple[int, int], batch_size: int, finetune: bool,
            inference_pass: bool = True) -> dict:
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
        cli_s, cli = cli_rerun_s(db_path, backbone, size, batch_size, split_id)
        try:
            cold_s, cold = page_path_s(db_path, TrainConfig(mode="fast", epochs=15, learning_rate=2e-3, **base))
            warm_s, warm = page_path_s(db_path, TrainConfig(mode="fast", epochs=10, learning_rate=1e-3, dropout=0.3, **base))
        finally:
            stop_worker(db_path)
        pass_s, n = inference_pass_s(db_path, backbone, size, batch_size) if inference_pass else (float("nan"), n_images)
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
        "cli_rerun_s": round(cli_s, 2), "cli_rerun": {k: cli.get(k) for k in ("status", "features_cached", "features_computed")},
        "page_cold_s": round(cold_s, 2), "page_warm_s": round(warm_s, 2),
        "page_runs": [{k: r.get(k) for k in ("status", "features_cached", "features_computed")} for r in (cold, warm)],
        "inference_pass_s": round(pass_s, 2), "first_over_inference": round(first_s / pass_s, 3),
        "finetune_epoch_s": None if finetune_s is None else round(finetune_s, 1),
        "goals": {"rerun_under_10_s": rerun_s < 10, "first_within_1_2_inference": first_s <= 1.2 * pass_s,
                  "cli_rerun_under_10_s": cli_s < 10, "page_warm_under_5_s": warm_s < 5},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="120 images, resnet50 only")
    parser.add_argument("--backbones", default=None, help="comma-separated (default: all three; --quick: resnet50)")
    parser.add_argument("--images", type=int, default=None, help="demo images (two per study; default 570, --quick 120)")
    parser.add_argument("--size", default="646x220", help="HxW")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-finetune", action="store_true", help="skip the one-epoch full fine-tuning comparison")
    parser.add_argument("--no-pass", action="store_true", help="skip the inference-pass baseline")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    backbones = (args.backbones or ("resnet50" if args.quick else "resnet50,vgg19,densenet121")).split(",")
    n_images = args.images or (120 if args.quick else 570)
    size = tuple(int(v) for v in args.size.split("x"))
    from bonescan_core.heavy import keras_module

    keras_module()  # a worker imports TensorFlow once, before its first run: keep that out of the clocks
    for backbone in backbones:
        result = measure(backbone, n_images, size, args.batch_size, finetune=not args.no_finetune,
                         inference_pass=not args.no_pass)
        print(json.dumps({"bench": "fast_mode", **result, **environment()}), flush=True)


if __name__ == "__main__":
    main()
