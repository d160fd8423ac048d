"""Input-pipeline benchmark: training images/s through the real pipeline (database → decode →
resize → disk cache → batches read per step → augment → model) against the same model's train step on tensors already in memory
(the ceiling). One JSON line per (backbone, size): backbone, size, pipeline_ips, ceiling_ips,
ratio. Goal: ratio >= 0.95 with augmentation on.

    python bench/pipeline.py                 # default size 646x220 and 128x64, three backbones
    python bench/pipeline.py --quick         # fewer steps
    KERAS_BACKEND=jax python bench/pipeline.py --mixed-precision   # on a GPU machine (bench/gpu.py)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment  # noqa: E402 - bench/ is on the path only after the line above


def _timed_fit(model, data, steps: int, images_per_batch: int, **fit_args) -> float:
    """Images per second over ``steps`` training batches, the first (tracing) batch excluded."""
    import keras

    marks: list[float] = []

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            marks.append(time.perf_counter())

    model.fit(data, epochs=1, steps_per_epoch=steps + 1, verbose=0, callbacks=[Clock()], **fit_args)
    seconds = marks[-1] - marks[0]
    return steps * images_per_batch / seconds


def _in_memory_batches_class():
    import keras

    class InMemory(keras.utils.PyDataset):
        """Batches sliced from arrays already preprocessed: what a model sees when nothing is left to do."""

        def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int) -> None:
            super().__init__()
            self.x, self.y, self.batch_size = x, y, batch_size

        def __len__(self) -> int:
            return len(self.x) // self.batch_size

        def __getitem__(self, index: int):
            part = slice(index * self.batch_size, (index + 1) * self.batch_size)
            return self.x[part], self.y[part]

    return InMemory


def InMemoryBatches(x: np.ndarray, y: np.ndarray, batch_size: int):  # noqa: N802 - reads as the class it builds
    return _in_memory_batches_class()(x, y, batch_size)


def measure(db_path: Path, backbone: str, size: tuple[int, int], batch_size: int, steps: int, rounds: int = 3,
            seed: int = 0) -> dict:
    """Pipeline and ceiling throughput of one backbone at one input size (weights none).

    The two are timed in alternation, ``rounds`` times each, and the best round of each is
    compared: on a shared machine a neighbour's burst slows one round, never speeds it up.
    """
    import keras

    from bonescan_core import db as dbm
    from bonescan_core import imagecache, models, preprocess
    from bonescan_core.review import study_statuses

    n_needed = batch_size * (steps + 1)
    with dbm.opened(db_path) as db:
        labels = {sid: int(s.label == "metastatic") for sid, s in study_statuses(db).items() if s.included}
        samples = preprocess.list_samples(db, labels)[:n_needed]
        started = time.perf_counter()
        # decode + resize into the disk cache beside the database, as training does; batches read it per step
        images, _ = imagecache.training_images(db, samples, size)
        decode_s = time.perf_counter() - started
    y = np.array([s.label for s in samples], dtype=np.float32)
    model = models.build_model(backbone, "none", size, seed=seed)
    # The pipeline as training.py runs it: grey batches, augmentation and scaling inside the compiled step.
    augmenter = preprocess.make_augmenter(preprocess.PAPER_AUGMENT, seed=seed)
    trainer = preprocess.with_input_pipeline(model, backbone, augmenter)
    trainer.compile(optimizer=keras.optimizers.Adam(1e-4), loss="binary_crossentropy")
    pipeline = preprocess.image_batches(images, y, batch_size, rng=np.random.default_rng(seed))
    # The ceiling: the bare model's train step on preprocessed batches already in memory (no decode, no augmentation).
    bare = models.build_model(backbone, "none", size, seed=seed)
    bare.compile(optimizer=keras.optimizers.Adam(1e-4), loss="binary_crossentropy")
    x = preprocess.to_model_input(np.asarray(images, dtype=np.float32), backbone)
    in_memory = InMemoryBatches(x, y.reshape(-1, 1), batch_size)
    pipeline_rounds, ceiling_rounds = [], []
    for _ in range(rounds):
        pipeline_rounds.append(_timed_fit(trainer, pipeline, steps, batch_size))
        ceiling_rounds.append(_timed_fit(bare, in_memory, steps, batch_size))
    pipeline_ips, ceiling_ips = max(pipeline_rounds), max(ceiling_rounds)
    return {"backbone": backbone, "size": f"{size[0]}x{size[1]}", "batch_size": batch_size, "steps": steps, "rounds": rounds,
            "pipeline_ips": round(pipeline_ips, 2), "ceiling_ips": round(ceiling_ips, 2),
            "ratio": round(pipeline_ips / ceiling_ips, 3),
            "pipeline_rounds": [round(v, 2) for v in pipeline_rounds], "ceiling_rounds": [round(v, 2) for v in ceiling_rounds],
            "decode_resize_s_per_image": round(decode_s / len(samples), 4)}


def make_demo_db(folder: Path, n_studies: int) -> Path:
    from bonescan_core import db as dbm
    from bonescan_core.ingest import add_demo_studies

    path = folder / "labels.db"
    with dbm.opened(path) as db:
        add_demo_studies(db, n_studies, seed=0)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timed steps and rounds")
    parser.add_argument("--backbones", default="resnet50,vgg19,densenet121")
    parser.add_argument("--sizes", default="646x220,128x64", help="HxW,HxW")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mixed-precision", action="store_true", help="mixed_float16 (GPU)")
    args = parser.parse_args()
    import keras

    if args.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    steps, rounds = (3, 2) if args.quick else (6, 3)
    sizes = [tuple(int(v) for v in text.split("x")) for text in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="bonescan-bench-") as folder:
        db_path = make_demo_db(Path(folder), n_studies=(args.batch_size * (steps + 1)) // 2 + 2)
        for size in sizes:
            for backbone in args.backbones.split(","):
                result = measure(db_path, backbone, size, args.batch_size, steps, rounds)
                print(json.dumps({"bench": "pipeline", **result, "precision": keras.mixed_precision.global_policy().name,
                                  **environment(backend=keras.backend.backend())}), flush=True)


if __name__ == "__main__":
    main()
