"""Fixed-step probes of scintinet's training settings on demo phantoms (why does it (not) learn?).

Builds the demo database and the split once (cached as .npz under the system temp folder), then
trains one scintinet per variant for a fixed number of steps with a plain loop over the app's
own data path (``preprocess.load_images`` → ``with_input_pipeline``), and prints one JSON line
per evaluation: variant, step, seconds, training loss, validation image AUC and study AUC.

    python bench/scintinet_probe.py --studies 100 --size 512x128 --steps 150 --variants base,noaug,hardmax
    python bench/scintinet_probe.py --studies 100 --size 512x128 --view-mode fusion --variants noaug

Variants (comma-separated): ``base`` (paper augmentation, lr 1e-3, the model's pooling),
``noaug`` (no augmentation), ``hardmax`` (no augmentation, log-sum-exp sharpness 10, close to
a hard max), ``lr3`` (no augmentation, lr 3e-3), ``flip`` (horizontal flip only), ``b8`` (no
augmentation, batch 8) — all on the grey image only (``reader=False``, the first version) —
and, with the fixed reader channels (``scintinet.reader_channels``, no augmentation):
``reader`` (lr 1e-3, sharpness 1, batch 16), ``reader_r3`` / ``reader_r5`` / ``reader_r10``
(log-sum-exp sharpness 3 / 5 / 10), ``reader_warmup`` (the learning rate rises linearly over
the first 25 steps), ``reader_lr3`` (lr 3e-3 with that warm-up), ``reader_b32`` (batch 32).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = {
    "base": {"augment": "paper", "lr": 1e-3, "sharpness": None, "batch": 16},
    "noaug": {"augment": None, "lr": 1e-3, "sharpness": None, "batch": 16},
    "hardmax": {"augment": None, "lr": 1e-3, "sharpness": 10.0, "batch": 16},
    "lr3": {"augment": None, "lr": 3e-3, "sharpness": None, "batch": 16},
    "flip": {"augment": {"flip_horizontal": True}, "lr": 1e-3, "sharpness": None, "batch": 16},
    "b8": {"augment": None, "lr": 1e-3, "sharpness": None, "batch": 8},
    # With the fixed reader channels (scintinet.reader_channels); the variants above are the grey image only.
    "reader": {"augment": None, "lr": 1e-3, "sharpness": None, "batch": 16, "reader": True},
    "reader_r3": {"augment": None, "lr": 1e-3, "sharpness": 3.0, "batch": 16, "reader": True},
    "reader_r5": {"augment": None, "lr": 1e-3, "sharpness": 5.0, "batch": 16, "reader": True},
    "reader_r10": {"augment": None, "lr": 1e-3, "sharpness": 10.0, "batch": 16, "reader": True},
    "reader_warmup": {"augment": None, "lr": 1e-3, "sharpness": None, "batch": 16, "reader": True, "warmup": 25},
    "reader_lr3": {"augment": None, "lr": 3e-3, "sharpness": None, "batch": 16, "reader": True, "warmup": 25},
    "reader_b32": {"augment": None, "lr": 1e-3, "sharpness": None, "batch": 32, "reader": True},
}


def _size(text: str) -> tuple[int, int]:
    height, width = (int(part) for part in text.lower().split("x"))
    return height, width


def load_data(studies: int, demo_seed: int, size: tuple[int, int], view_mode: str) -> dict[str, np.ndarray]:
    """{train_x, train_y, val_x, val_y, val_study}: images (N, H, W) or (N, 2, H, W) float16 and labels."""
    cache = Path(tempfile.gettempdir()) / f"scintinet-probe-{studies}-{demo_seed}-{size[0]}x{size[1]}-{view_mode}.npz"
    if cache.exists():
        return dict(np.load(cache))
    single = Path(str(cache).replace(view_mode, "per_image"))
    if view_mode == "fusion" and single.exists():
        # The demo stores each study's anterior then posterior image: consecutive rows of the per-image cache.
        data, out = dict(np.load(single)), {}
        for subset in ("train", "val"):
            x = data[f"{subset}_x"].reshape(-1, 2, *size)
            x[:, 1] = x[:, 1, :, ::-1]
            out[f"{subset}_x"], out[f"{subset}_y"], out[f"{subset}_study"] = x, data[f"{subset}_y"][::2], data[f"{subset}_study"][::2]
            assert (data[f"{subset}_study"][1::2] == out[f"{subset}_study"]).all()
        return out
    from bonescan_core import db as dbm
    from bonescan_core import preprocess
    from bonescan_core import splits as splitting
    from bonescan_core.ingest import add_demo_studies

    out: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as folder, dbm.opened(Path(folder) / "labels.db") as db:
        add_demo_studies(db, studies, seed=demo_seed)
        members = splitting.split_labels(db, splitting.ensure_split(db, 0))
        for subset in ("train", "val"):
            labels = {sid: int(label == "metastatic") for sid, (s, label) in members.items() if s == subset}
            samples = preprocess.list_samples(db, labels, view_mode)
            out[f"{subset}_x"] = preprocess.load_images(db, samples, size, view_mode)
            out[f"{subset}_y"] = np.array([s.label for s in samples])
            out[f"{subset}_study"] = np.array([s.study_id for s in samples])
    np.savez(cache, **out)
    return out


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    from bonescan_core.evaluation import point_metrics

    return round(float(point_metrics(labels, scores, 0.5)["auc"]), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=100)
    parser.add_argument("--demo-seed", type=int, default=7)
    parser.add_argument("--size", type=_size, default=(512, 128))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--view-mode", default="per_image")
    parser.add_argument("--variants", default="base,noaug,hardmax")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from bonescan_core import models, preprocess, scintinet
    from bonescan_core.training import class_weights_for

    keras = models.keras_module()
    data = load_data(args.studies, args.demo_seed, args.size, args.view_mode)
    for name in args.variants.split(","):
        variant = VARIANTS[name]
        keras.utils.set_random_seed(0)
        rng = np.random.default_rng(0)
        sharpness = variant["sharpness"] or scintinet.SHARPNESS
        fusion = args.view_mode == "fusion"
        model = scintinet.build(args.size, seed=0, sharpness=sharpness, views=2 if fusion else 1,
                                reader=variant.get("reader", False))
        augment = preprocess.PAPER_AUGMENT if variant["augment"] == "paper" else variant["augment"]
        trainer = preprocess.with_input_pipeline(model, "scintinet", preprocess.make_augmenter(augment, seed=0))
        predictor = preprocess.with_input_pipeline(model, "scintinet")
        optimizer = keras.optimizers.Adam(variant["lr"])
        trainer.compile(optimizer=optimizer, loss="binary_crossentropy")
        weights = class_weights_for(data["train_y"])
        x, y = data["train_x"], data["train_y"].astype(np.float32)
        started, order, losses = time.perf_counter(), np.array([], dtype=int), []
        for step in range(1, args.steps + 1):
            if order.size < variant["batch"]:
                order = np.concatenate([order, rng.permutation(len(x))])
            picked, order = order[: variant["batch"]], order[variant["batch"]:]
            if variant.get("warmup"):
                optimizer.learning_rate.assign(variant["lr"] * min(1.0, step / variant["warmup"]))
            batch = x[picked].astype(np.float32)[..., None]
            losses.append(float(trainer.train_on_batch(batch, y[picked, None],
                                                      sample_weight=np.array([weights[int(v)] for v in y[picked]]))))
            if step % args.every == 0 or step == args.steps:
                p = predictor.predict(data["val_x"].astype(np.float32)[..., None], batch_size=32, verbose=0).reshape(-1)
                studies = np.unique(data["val_study"])
                study_p = np.array([p[data["val_study"] == s].max() for s in studies])
                study_y = np.array([data["val_y"][data["val_study"] == s][0] for s in studies])
                print(json.dumps({"variant": name, "view_mode": args.view_mode, "size": list(args.size), "step": step,
                                  "seconds": round(time.perf_counter() - started, 1), "loss": round(float(np.mean(losses[-args.every:])), 4),
                                  "val_auc": auc(data["val_y"], p), "val_study_auc": auc(study_y, study_p),
                                  "val_p_std": round(float(p.std()), 4), "n_train": int(len(x))}), flush=True)


if __name__ == "__main__":
    main()
