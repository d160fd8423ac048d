"""Train one run: split, data, model, phases, threshold, predictions, saved model.

``train_run(db, run_id, config, reporter, runs_dir)`` does one run from start to end in the
calling process (the worker, or ``bonescan train`` in the foreground). The caller owns the
``runs`` row (status, heartbeat, progress, the ``epochs`` table): it passes a
:class:`Reporter` and gets progress, every finished epoch and a cancel check through it.
``train_run`` writes the run's split id (``runs.split_id``) and its ``predictions``, caches
fast-mode ``features``, and saves ``runs_dir/run-<id>/model.keras``.

Modes (``docs/cli.md``):

* ``fast``: frozen backbone, no augmentation; pooled features are computed once per
  (backbone, weights, input size, image) and cached in the ``features`` table, so a re-run
  with other head settings only trains the head (seconds). The trained head is then
  copied into a full model, so a fast run still yields a model for Grad-CAM and export.
* ``head``: frozen backbone, head trained on augmented images.
* ``finetune``: phase ``head`` (as above) for at most ceil(epochs / 2) epochs; then the
  top blocks (``Backbone.finetune_from`` on, BatchNorm kept frozen) are unfrozen and the
  model recompiled at ``finetune_learning_rate`` for the REST of the epoch budget (epochs
  that early stopping saved in the head phase go to fine-tuning). With epochs = 1 only
  the head phase runs.
* ``full``: every layer trains from the start at ``learning_rate`` (what ``weights=none``
  needs).

Importing this module does not import Keras: ``TrainConfig`` is usable by the pages and
``bonescan train --queue`` without TensorFlow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import sqlite_utils

from bonescan_core import db as dbm
from bonescan_core import errors
from bonescan_core import splits as splitting
from bonescan_core.models import BACKBONES, DEFAULT_SIZE, MODES, weights_kind
from bonescan_core.preprocess import AUGMENT_KEYS, PAPER_AUGMENT, VIEW_MODES, Sample

THRESHOLD_RULES = ("youden", "fixed")
FEATURE_SEED = 0  # fast mode: random ("none") backbones are always initialised with this seed, so cached features stay valid
PROGRESS_INTERVAL_S = 0.5
FEATURE_CHUNK = 128  # fast mode decodes this many samples at a time (646 x 220: 73 MB as float32 grey)


class TrainingCancelled(Exception):
    """The reporter asked to stop; the run ended early and saved nothing (no model, no predictions).

    Control flow, not an error: it unwinds a run the user stopped, and the worker records the run
    as cancelled. It stays outside :class:`errors.BonescanError` so that no catch of the error
    family (which reports a failure) can swallow a cancellation.
    """


class TrainingError(errors.BonescanError):
    """The run cannot train as configured (e.g. a subset without images); the message says what to do."""


def _paper_augment() -> dict[str, float | bool]:
    return dict(PAPER_AUGMENT)


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a run (stored as JSON in ``runs.config``).

    Attributes:
        backbone: ``resnet50`` | ``vgg19`` | ``densenet121`` | ``scintinet``.
        weights: ``imagenet``, ``none`` or a path to a weights file. None (and for ``mode``
            and ``image_size`` too): the backbone's default (``Backbone.default_*``).
        mode: ``fast`` | ``head`` | ``finetune`` | ``full`` (module docstring).
        epochs: the epoch budget (shared by the phases of ``finetune``).
        batch_size: images per batch.
        learning_rate: Adam learning rate of the head phase (and of ``full``/``fast``).
        finetune_learning_rate: Adam learning rate after unfreezing (``finetune``).
        image_size: (H, W) model input.
        seed: seeds Keras, NumPy and the split (when ``split_id`` is None).
        split_id: the split to use; None reuses the latest split of the current labels
            with this seed and the default 30 % / 15 % fractions, or makes one.
        augment: augmentation settings (``preprocess.PAPER_AUGMENT``); {} for none.
            Ignored in ``fast`` mode.
        view_mode: ``per_image`` (paper) or ``composite``.
        threshold_rule: ``youden`` (on the validation subset) or ``fixed`` (0.5).
        patience: early stopping patience in epochs, on val_loss (best weights restored).
        dropout: rate before the last Dense layer.
        class_weights: weight the loss by inverse class frequency of the training subset.
        max_train_images: use at most this many training samples (seeded choice); None: all.
    """

    backbone: str
    weights: str = None  # type: ignore[assignment] - None only until __post_init__ fills the backbone's default
    mode: str = None  # type: ignore[assignment]
    epochs: int = 20
    batch_size: int = 16
    learning_rate: float = 1e-3
    finetune_learning_rate: float = 1e-5
    image_size: tuple[int, int] = None  # type: ignore[assignment]
    seed: int = 0
    split_id: int | None = None
    augment: Mapping[str, Any] = field(default_factory=_paper_augment)
    view_mode: str = "per_image"
    threshold_rule: str = "youden"
    patience: int = 5
    dropout: float = 0.3
    class_weights: bool = True
    max_train_images: int | None = None

    def __post_init__(self) -> None:
        bb = BACKBONES.get(self.backbone)
        defaults = (bb.default_weights, bb.default_mode, bb.default_size) if bb else ("imagenet", "finetune", DEFAULT_SIZE)
        for name, default in zip(("weights", "mode", "image_size"), defaults, strict=True):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
        object.__setattr__(self, "augment", dict(self.augment or {}))
        object.__setattr__(self, "weights", str(self.weights))
        problems = []
        if self.backbone not in BACKBONES:
            problems.append(f"backbone must be one of {', '.join(BACKBONES)}")
        if self.mode not in MODES:
            problems.append(f"mode must be one of {', '.join(MODES)}")
        elif bb and self.mode not in bb.modes:
            problems.append(f"{bb.name} trains only in mode {', '.join(bb.modes)} (random weights: nothing to freeze)")
        if bb and not bb.has_imagenet and weights_kind(self.weights) == "imagenet":
            problems.append(f"{bb.name} has no ImageNet weights: use weights none or a weights file")
        if self.view_mode not in VIEW_MODES:
            problems.append(f"view_mode must be one of {', '.join(VIEW_MODES)}")
        if self.threshold_rule not in THRESHOLD_RULES:
            problems.append(f"threshold_rule must be one of {', '.join(THRESHOLD_RULES)}")
        if len(self.image_size) != 2 or min(self.image_size) < 32:
            problems.append("image_size must be (height, width), each at least 32")
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 0:
            problems.append("epochs and batch_size must be at least 1, patience at least 0")
        if not (self.learning_rate > 0 and self.finetune_learning_rate > 0):
            problems.append("learning rates must be positive")
        if not 0.0 <= self.dropout < 1.0:
            problems.append("dropout must be in [0, 1)")
        if self.max_train_images is not None and self.max_train_images < 2:
            problems.append("max_train_images must be at least 2 (or None for all)")
        unknown = sorted(set(self.augment) - set(AUGMENT_KEYS))
        if unknown:
            problems.append(f"unknown augment settings {', '.join(unknown)} (known: {', '.join(AUGMENT_KEYS)})")
        if problems:
            raise errors.InputError("bad training config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict (``image_size`` as a list)."""
        data = dataclasses.asdict(self)
        data["image_size"] = list(self.image_size)
        data["augment"] = dict(self.augment)
        return data

    def to_json(self) -> str:
        """JSON with sorted keys."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | Mapping[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_json`. Unknown keys (e.g. the run additions stored beside
        the settings in ``runs.config``: versions, device, labels hash) are ignored."""
        data = json.loads(text) if isinstance(text, str) else dict(text)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})

    def identity_hash(self) -> str:
        """Hex sha256 of every defining setting (all fields, canonical JSON): equal hashes, same run.

        A weights path counts by its text, not its content.
        """
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def phase_epochs(self) -> dict[str, int]:
        """The epoch budget per phase before early stopping: e.g. finetune, 20 epochs → head 10, finetune 10."""
        if self.mode == "finetune":
            head = math.ceil(self.epochs / 2)
            return {"head": head, "finetune": self.epochs - head}
        return {"full" if self.mode == "full" else "head": self.epochs}


class Reporter(Protocol):
    """What ``train_run`` tells its caller, and asks it."""

    def progress(self, fields: dict[str, Any]) -> None:
        """Called at most every ~0.5 s (and at each phase start): ``phase`` (``preparing``,
        ``features``, ``head``, ``finetune``, ``full``, ``predicting``, ``saving``),
        ``epoch`` (1-based, across phases), ``epochs`` (budget), ``batch`` (1-based),
        ``batches``, ``loss``, ``metrics`` (dict), ``eta_s`` (seconds left, or None)."""

    def epoch_done(self, epoch: int, phase: str, logs: dict[str, float], seconds: float, train_images_per_second: float) -> None:
        """After each epoch: 1-based epoch across phases, its phase, Keras's logs (loss,
        accuracy, auc, val_loss, val_accuracy, val_auc), wall seconds incl. validation,
        training throughput of that epoch (images/s, validation and first batch excluded)."""

    def cancelled(self) -> bool:
        """Polled every batch; return True to stop (``TrainingCancelled`` within a batch or two)."""


class NullReporter:
    """A reporter that ignores everything and never cancels."""

    def progress(self, fields: dict[str, Any]) -> None:
        pass

    def epoch_done(self, epoch: int, phase: str, logs: dict[str, float], seconds: float, train_images_per_second: float) -> None:
        pass

    def cancelled(self) -> bool:
        return False


@dataclass(frozen=True)
class RunResult:
    """What a finished run produced (the caller stores it in its ``runs`` row).

    Attributes:
        threshold: decision threshold chosen on the validation subset, in [0, 1].
        images_per_second: training throughput over the training epochs only (no
            validation, no first batch of an epoch: no tracing or start-up). In fast mode,
            feature vectors per second through the head.
        weights_path: the saved model, relative to ``runs_dir`` (``run-<id>/model.keras``).
        weights_sha256: hex sha256 of that file.
        device: ``CPU`` or the GPU name(s) the backend reports.
        config_additions: facts to store beside the settings in ``runs.config``:
            ``split_id``, ``labels_hash``, ``n_train`` / ``n_val`` / ``n_test`` (samples:
            images, or studies for composites), ``sample_unit`` (``image`` | ``study``),
            ``phase_epochs`` (epochs run per phase, after early stopping),
            ``class_weights`` ({"0": w0, "1": w1} or None), ``backend``, ``device``,
            ``versions`` (python, keras, tensorflow or jax, numpy), ``precision``
            (``float32`` | ``mixed_float16``), ``notes`` (list of strings), and in fast
            mode ``features_cached`` / ``features_computed`` (samples) and, when some were
            computed, ``feature_images_per_second``.
    """

    threshold: float
    images_per_second: float
    weights_path: str
    weights_sha256: str
    device: str
    config_additions: dict[str, Any]


# --- helpers ----------------------------------------------------------------------------------------

def class_weights_for(labels: np.ndarray) -> dict[int, float]:
    """Inverse-frequency class weights {0: w0, 1: w1}, n / (2 n_c): both classes weigh as much in the loss.

    E.g. 60 % negative / 40 % positive → {0: 0.83, 1: 1.25}. A missing class gets 1.0.
    """
    labels = np.asarray(labels).astype(int)
    n = len(labels)
    return {c: (n / (2.0 * int((labels == c).sum())) if (labels == c).any() else 1.0) for c in (0, 1)}


def choose_threshold(rule: str, labels: np.ndarray, probabilities: np.ndarray) -> float:
    """The decision threshold: Youden's J on (validation) labels and probabilities, or 0.5 for ``fixed``."""
    if rule == "fixed":
        return 0.5
    if rule != "youden":
        raise ValueError(f"unknown threshold rule {rule!r}; one of {', '.join(THRESHOLD_RULES)}")
    from bonescan_core.evaluation import youden_threshold

    return youden_threshold(np.asarray(labels), np.asarray(probabilities))


def weights_id(weights: str) -> str:
    """The feature-cache key of a weights setting: ``imagenet``, ``none`` or the file's sha256."""
    kind = weights_kind(weights)
    return kind if kind != "file" else file_sha256(Path(weights))


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_save(model: Any, target: Path) -> str:
    """Save to a temporary ``.keras`` file beside ``target``, then rename (a reader never sees half a file); returns its sha256."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=".model-", suffix=".keras", dir=target.parent)
    os.close(handle)
    try:
        # An uncompiled model over the same layers: the .keras format would otherwise also
        # store the optimizer's state (Adam: two moments per weight, three times the file),
        # which inference never needs. (clone_model would copy the compile state too.)
        from bonescan_core.models import keras_module

        bare = keras_module().Model(model.inputs, model.outputs, name=model.name)
        bare.save(temp)
        digest = file_sha256(Path(temp))
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    return digest


def _backend_facts() -> tuple[str, str, int, dict[str, str]]:
    """(backend, device description, number of GPUs, versions)."""
    from bonescan_core.models import keras_module

    keras = keras_module()
    backend = keras.backend.backend()
    versions = {"python": platform.python_version(), "keras": keras.__version__, "numpy": np.__version__}
    device, n_gpus = "CPU", 0
    if backend == "tensorflow":
        import tensorflow as tf

        versions["tensorflow"] = tf.__version__
        gpus = tf.config.list_physical_devices("GPU")
        n_gpus = len(gpus)
        if gpus:
            names = []
            for gpu in gpus:
                try:
                    names.append(tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name))
                except (RuntimeError, ValueError):
                    names.append(gpu.name)
            device = names[0] if len(names) == 1 else f"{len(names)} x {names[0]}"
    elif backend == "jax":
        import jax

        versions["jax"] = jax.__version__
        default = jax.devices()[0]
        if default.platform != "cpu":
            n_gpus = len([d for d in jax.devices() if d.platform == default.platform])
            device = str(getattr(default, "device_kind", default.platform))
    else:
        module = __import__(backend)
        versions[backend] = getattr(module, "__version__", "?")
    return backend, device, n_gpus, versions


@contextlib.contextmanager
def _precision_and_strategy(backend: str, n_gpus: int) -> Iterator[tuple[Any, str]]:
    """Mixed precision and a MirroredStrategy on TensorFlow GPUs; the global policy is restored on exit."""
    from bonescan_core.models import keras_module

    keras = keras_module()
    previous = keras.mixed_precision.global_policy().name
    strategy_scope: Any = contextlib.nullcontext()
    precision = "float32"
    if backend == "tensorflow" and n_gpus:
        keras.mixed_precision.set_global_policy("mixed_float16")
        precision = "mixed_float16"
        if n_gpus > 1:
            import tensorflow as tf

            strategy_scope = tf.distribute.MirroredStrategy().scope()
    try:
        with strategy_scope:
            yield strategy_scope, precision
    finally:
        keras.mixed_precision.set_global_policy(previous)


class _Progress:
    """Throttled progress, cancel polling and throughput bookkeeping shared by every phase."""

    def __init__(self, reporter: Reporter, epochs_budget: int) -> None:
        self.reporter = reporter
        self.epochs_budget = epochs_budget
        self.last_sent = 0.0
        self.train_images = 0.0
        self.train_seconds = 0.0

    def send(self, fields: dict[str, Any], force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last_sent >= PROGRESS_INTERVAL_S:
            self.last_sent = now
            self.reporter.progress({"epochs": self.epochs_budget, **fields})

    def check(self) -> None:
        if self.reporter.cancelled():
            raise TrainingCancelled("training cancelled")


def _float_logs(logs: Mapping[str, Any] | None) -> dict[str, float]:
    out = {}
    for key, value in (logs or {}).items():
        with contextlib.suppress(TypeError, ValueError):
            out[key] = float(np.asarray(value))
    return out


def _callback(keras: Any, tracker: _Progress, phase: str, batch_sizes: list[int], last_epoch: int) -> Any:
    """A Keras callback: progress every ~0.5 s, cancel every batch, per-epoch throughput and ``epoch_done``.

    Args:
        batch_sizes: samples in each training batch of an epoch.
        last_epoch: the 0-based epoch index this phase's ``fit`` stops before (for the ETA).
    """
    n_batches = len(batch_sizes)

    class ReporterCallback(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.epoch = 0
            self.first_epoch: int | None = None
            self.epoch_seconds: list[float] = []

        def on_epoch_begin(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
            self.epoch = epoch
            self.first_epoch = epoch if self.first_epoch is None else self.first_epoch
            self.epoch_start = self.batch_begin = time.monotonic()
            self.batch_ends: list[float] = []
            self.first_batch_s = 0.0

        def on_train_batch_begin(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
            self.batch_begin = time.monotonic()

        def on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
            now = time.monotonic()
            self.batch_ends.append(now)
            if batch == 0:
                self.first_batch_s = now - self.batch_begin
            tracker.check()
            values = _float_logs(logs)
            if self.epoch_seconds:  # whole epochs (validation included) once one is done
                left_s = (self.epoch_seconds[-1] / n_batches) * (n_batches - batch - 1)
                left_s += (last_epoch - self.epoch - 1) * float(np.mean(self.epoch_seconds))
            else:
                per_batch = (now - self.epoch_start) / (batch + 1)
                left_s = per_batch * ((last_epoch - self.epoch) * n_batches - batch - 1)
            tracker.send({
                "phase": phase, "epoch": self.epoch + 1, "batch": batch + 1, "batches": n_batches,
                "loss": values.pop("loss", None), "metrics": values, "eta_s": round(max(0.0, left_s), 1),
            }, force=batch == 0)

        def on_test_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
            tracker.check()

        def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
            seconds = time.monotonic() - self.epoch_start
            self.epoch_seconds.append(seconds)
            ends = self.batch_ends
            if len(ends) >= 2:
                # From the end of the first batch (tracing, queue start-up) to the end of the last.
                images, span = float(sum(batch_sizes[1 : len(ends)])), ends[-1] - ends[0]
                tracker.train_images += images
                tracker.train_seconds += span
            else:  # one batch per epoch: its own time (the phase's first one is mostly tracing: not counted)
                images, span = float(sum(batch_sizes[: len(ends)])), self.first_batch_s
                if epoch != self.first_epoch:
                    tracker.train_images += images
                    tracker.train_seconds += span
            rate = images / span if span > 0 else 0.0
            tracker.reporter.epoch_done(epoch + 1, phase, _float_logs(logs), round(seconds, 3), round(rate, 3))

    return ReporterCallback()


def _cancel_callback(keras: Any, tracker: _Progress, phase: str, total: int, done_before: int = 0, per_batch: int = 1) -> Any:
    """A Keras callback for ``predict``: cancel polling and progress per batch.

    Progress reads ``done_before + per_batch * batches done`` of ``total`` (a prediction over
    one chunk of a longer pass counts from where the pass stands).
    """

    class PredictCallback(keras.callbacks.Callback):
        def on_predict_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
            tracker.check()
            tracker.send({"phase": phase, "batch": min(total, done_before + (batch + 1) * per_batch), "batches": total,
                          "eta_s": None})

    return PredictCallback()


def _compile(keras: Any, model: Any, learning_rate: float) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.BinaryCrossentropy(),
        metrics=[keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")],
    )


def _batch_sizes(n: int, batch_size: int) -> list[int]:
    return [min(batch_size, n - start) for start in range(0, n, batch_size)]


@dataclass
class _Data:
    """Samples per subset, their labels (N,) int, and (N, H, W) float16 images once loaded."""

    samples: dict[str, list[Sample]]
    labels: dict[str, np.ndarray]
    images: dict[str, np.ndarray] = field(default_factory=dict)


def _run_exists(db: sqlite_utils.Database, run_id: int) -> bool:
    return db.execute("SELECT 1 FROM runs WHERE id = ?", [run_id]).fetchone() is not None


def _select_samples(db: sqlite_utils.Database, split_id: int, config: TrainConfig, rng: np.random.Generator) -> _Data:
    """The split's samples per subset (labels as stored with the split); training capped at ``max_train_images``."""
    from bonescan_core import preprocess

    members = splitting.split_labels(db, split_id)
    samples: dict[str, list[Sample]] = {}
    for subset in splitting.SUBSETS:
        labels = {sid: int(label == "metastatic") for sid, (s, label) in members.items() if s == subset}
        samples[subset] = preprocess.list_samples(db, labels, config.view_mode)
    train = samples["train"]
    if config.max_train_images is not None and len(train) > config.max_train_images:
        picked = np.sort(rng.choice(len(train), size=config.max_train_images, replace=False))
        samples["train"] = [train[i] for i in picked]
    for subset in splitting.SUBSETS:
        if not samples[subset]:
            raise TrainingError(f"the {subset} subset of split {split_id} has no images; import the studies' images or make a new split")
    if len({s.label for s in samples["train"]}) < 2:
        raise TrainingError(f"the training samples of split {split_id} hold one class only; raise max_train_images or label more studies")
    labels = {subset: np.array([s.label for s in items], dtype=np.int64) for subset, items in samples.items()}
    return _Data(samples, labels)


def _load(db: sqlite_utils.Database, data: _Data, config: TrainConfig, tracker: _Progress, subsets: tuple[str, ...]) -> None:
    from bonescan_core import preprocess

    for subset in subsets:
        tracker.send({"phase": "loading", "subset": subset, "images": len(data.samples[subset])}, force=True)
        try:
            data.images[subset] = preprocess.load_images(
                db, data.samples[subset], config.image_size, config.view_mode, cancelled=tracker.reporter.cancelled
            )
        except InterruptedError as error:
            raise TrainingCancelled("training cancelled while loading images") from error


def _fit_phases(keras: Any, model: Any, config: TrainConfig, data: _Data, tracker: _Progress, rng: np.random.Generator,
                workers: int) -> tuple[dict[str, int], dict[int, float] | None]:
    """Train a full image model by mode and phase; returns (epochs run per phase, class weights)."""
    from bonescan_core import models, preprocess

    bb = models.get_backbone(config.backbone)
    weights = class_weights_for(data.labels["train"]) if config.class_weights else None
    # Augmentation and input scaling run inside the compiled train step (the batches are plain grey arrays).
    trainer = preprocess.with_input_pipeline(model, bb, preprocess.make_augmenter(config.augment, seed=config.seed))
    train_ds = preprocess.image_batches(data.images["train"], data.labels["train"], config.batch_size, rng=rng,
                                        class_weights=weights, workers=workers)
    val_ds = preprocess.image_batches(data.images["val"], data.labels["val"], config.batch_size, workers=workers)
    sizes = _batch_sizes(len(data.labels["train"]), config.batch_size)
    done, ran = 0, {}
    for phase, budget in config.phase_epochs().items():
        if phase == "finetune":
            budget = config.epochs - done  # epochs early stopping saved in the head phase go here
        if budget <= 0:
            continue
        models.freeze_for(model, config.mode, bb, phase="finetune" if phase == "finetune" else "head")
        _compile(keras, trainer, config.finetune_learning_rate if phase == "finetune" else config.learning_rate)
        stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience, restore_best_weights=True)
        tracker.send({"phase": phase, "epoch": done + 1, "batch": 0, "batches": len(sizes), "eta_s": None}, force=True)
        # shuffle=False: the dataset reshuffles itself every epoch with the run's own Generator.
        history = trainer.fit(train_ds, validation_data=val_ds, epochs=done + budget, initial_epoch=done, verbose=0, shuffle=False,
                            callbacks=[_callback(keras, tracker, phase, sizes, done + budget), stopper])
        ran[phase] = len(history.epoch)
        done += ran[phase]
    return ran, weights


def _predict_images(keras: Any, model: Any, config: TrainConfig, data: _Data, subsets: tuple[str, ...], tracker: _Progress,
                    workers: int) -> dict[str, np.ndarray]:
    """{subset: (N,) float64 probabilities}; one wrapped predictor, so its predict step is traced once."""
    from bonescan_core import preprocess

    predictor = preprocess.with_input_pipeline(model, config.backbone)
    probabilities = {}
    for subset in subsets:
        dataset = preprocess.image_batches(data.images[subset], data.labels[subset], config.batch_size, workers=workers)
        callback = _cancel_callback(keras, tracker, "predicting", len(dataset))
        probabilities[subset] = np.asarray(predictor.predict(dataset, verbose=0, callbacks=[callback]), dtype=np.float64).reshape(-1)
    return probabilities


def _feature_key(config: TrainConfig) -> str:
    """The ``features.weights`` value: weights id, plus ``#composite`` for two-view composites (keyed by the anterior image id)."""
    return weights_id(config.weights) + ("#composite" if config.view_mode == "composite" else "")


def _features(keras: Any, db: sqlite_utils.Database, model: Any, config: TrainConfig, data: _Data,
              tracker: _Progress) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Pooled features of every sample, from the cache or computed once and cached (float16).

    Returns:
        ({subset: (N, n_features) float32}, facts: features_cached, features_computed,
        feature_images_per_second).
    """
    from bonescan_core import models, preprocess

    bb = models.get_backbone(config.backbone)
    key = _feature_key(config)
    height, width = config.image_size
    wanted = {s.key for items in data.samples.values() for s in items}
    cached: dict[int, np.ndarray] = {}
    for image_id, blob in db.execute(
        "SELECT image_id, vector FROM features WHERE backbone = ? AND weights = ? AND height = ? AND width = ?",
        [bb.name, key, height, width],
    ).fetchall():
        if image_id in wanted:
            cached[image_id] = np.frombuffer(blob, dtype=np.float16)
    missing = [s for items in data.samples.values() for s in items if s.key not in cached]
    facts: dict[str, Any] = {"features_cached": len(cached), "features_computed": len(missing)}
    if missing:
        # Grey images in, pooled features out; the scaling to the backbone's input runs in the graph.
        extractor = preprocess.with_input_pipeline(models.features_of(model), bb)
        step = max(1, config.batch_size)
        started, done = time.monotonic(), 0
        for start in range(0, len(missing), FEATURE_CHUNK):  # bounded memory: decode a chunk at a time
            chunk = missing[start : start + FEATURE_CHUNK]
            tracker.check()
            try:
                images = preprocess.load_images(db, chunk, config.image_size, config.view_mode, cancelled=tracker.reporter.cancelled)
            except InterruptedError as error:
                raise TrainingCancelled("training cancelled while loading images") from error
            # predict(): the compiled inference step, exactly one inference pass (bench/fast_mode.py).
            vectors = np.asarray(extractor.predict(images[..., None].astype(np.float32), batch_size=step, verbose=0,
                                                   callbacks=[_cancel_callback(keras, tracker, "features", len(missing), done, step)]),
                                 dtype=np.float16)
            rows = []
            for sample, vector in zip(chunk, vectors, strict=True):
                cached[sample.key] = vector
                rows.append({"backbone": bb.name, "weights": key, "height": height, "width": width,
                             "image_id": sample.key, "vector": vector.tobytes()})
            done += len(vectors)
            elapsed = time.monotonic() - started
            tracker.send({"phase": "features", "batch": done, "batches": len(missing),
                          "eta_s": round(elapsed / done * (len(missing) - done), 1)})
            with dbm.write(db):
                db["features"].insert_all(rows, replace=True)
        facts["feature_images_per_second"] = round(done / max(time.monotonic() - started, 1e-9), 3)
    features = {subset: np.stack([cached[s.key] for s in items]).astype(np.float32) for subset, items in data.samples.items()}
    return features, facts


def _fit_fast(keras: Any, model: Any, config: TrainConfig, data: _Data, features: dict[str, np.ndarray],
              tracker: _Progress) -> tuple[Any, dict[str, int], dict[int, float] | None]:
    """Train the head on cached features; copy it into the full model. Returns (head, epochs run, class weights)."""
    from bonescan_core import models

    keras.utils.set_random_seed(config.seed)  # the head's own randomness follows the run's seed
    bb = models.get_backbone(config.backbone)
    head = models.head_model(bb.n_features, config.dropout, config.seed)
    weights = class_weights_for(data.labels["train"]) if config.class_weights else None
    _compile(keras, head, config.learning_rate)
    sizes = _batch_sizes(len(data.labels["train"]), config.batch_size)
    stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience, restore_best_weights=True)
    tracker.send({"phase": "head", "epoch": 1, "batch": 0, "batches": len(sizes), "eta_s": None}, force=True)
    history = head.fit(
        features["train"], data.labels["train"].astype(np.float32).reshape(-1, 1),
        batch_size=config.batch_size, epochs=config.epochs, shuffle=True, verbose=0, class_weight=weights,
        validation_data=(features["val"], data.labels["val"].astype(np.float32).reshape(-1, 1)),
        callbacks=[_callback(keras, tracker, "head", sizes, config.epochs), stopper],
    )
    models.transplant_head(head, model)
    return head, {"head": len(history.epoch)}, weights


def train_run(db: sqlite_utils.Database, run_id: int, config: TrainConfig, reporter: Reporter, runs_dir: Path) -> RunResult:
    """Train, threshold, predict and save one run (see the module docstring for the modes).

    Args:
        db: open database; the ``runs`` row ``run_id`` must exist (the caller made it).
        run_id: the run; its ``split_id`` is set here and its ``predictions`` replaced.
        config: the settings.
        reporter: progress, epochs and cancel (:class:`Reporter`).
        runs_dir: the ``runs/`` folder beside the database; the model goes to
            ``runs_dir / f"run-{run_id}" / "model.keras"`` (written atomically).

    Returns:
        :class:`RunResult`.

    Raises:
        TrainingCancelled: ``reporter.cancelled()`` returned True (nothing saved; the split
            id may already be set).
        TrainingError: the run row is missing, or a subset has no images or the training
            samples one class only.
        splits.SplitError: no split can be made (too few labels) or ``split_id`` is unknown.
        models.WeightsUnavailable / models.WeightsIncompatible: weights cannot be loaded.
    """
    from bonescan_core import models
    from bonescan_core.models import keras_module

    keras = keras_module()
    runs_dir = Path(runs_dir)
    tracker = _Progress(reporter, config.epochs)
    tracker.send({"phase": "preparing", "epoch": 0, "batch": 0, "batches": 0, "eta_s": None}, force=True)
    if not _run_exists(db, run_id):
        raise TrainingError(f"run {run_id} does not exist; enqueue the run first, then train it")
    notes: list[str] = []
    bb = models.get_backbone(config.backbone)
    if weights_kind(config.weights) == "none" and config.mode != "full":
        notes.append(f"weights none with mode {config.mode}: the frozen layers keep their random initial weights; "
                     "mode full trains them all")

    split_id = config.split_id if config.split_id is not None else splitting.ensure_split(db, config.seed)
    info = splitting.split_info(db, split_id)
    with dbm.write(db):
        db.execute("UPDATE runs SET split_id = ? WHERE id = ?", [split_id, run_id])

    rng = np.random.default_rng(config.seed)  # shuffling and the training subsample: explicit, not global
    keras.utils.set_random_seed(config.seed)
    data = _select_samples(db, split_id, config, rng)
    backend, device, n_gpus, versions = _backend_facts()
    # Threads keep an accelerator fed while batches are augmented; on a CPU they would only compete with it.
    workers = min(4, os.cpu_count() or 1) if n_gpus and config.mode != "fast" else 1
    additions: dict[str, Any] = {
        "split_id": split_id, "labels_hash": info["labels_hash"],
        "n_train": len(data.samples["train"]), "n_val": len(data.samples["val"]), "n_test": len(data.samples["test"]),
        "sample_unit": "study" if config.view_mode == "composite" else "image",
        "backend": backend, "device": device, "versions": versions,
    }
    with _precision_and_strategy(backend, n_gpus) as (_, precision):
        if config.mode == "fast":
            model = models.build_model(bb, config.weights, config.image_size, config.dropout, seed=FEATURE_SEED)
            features, facts = _features(keras, db, model, config, data, tracker)
            additions.update(facts)
            head, ran, weights = _fit_fast(keras, model, config, data, features, tracker)
            probabilities = {
                subset: np.asarray(keras.ops.convert_to_numpy(head(features[subset], training=False)), dtype=np.float64).reshape(-1)
                for subset in ("val", "test")
            }
        else:
            _load(db, data, config, tracker, ("train", "val", "test"))
            model = models.build_model(bb, config.weights, config.image_size, config.dropout, seed=config.seed)
            ran, weights = _fit_phases(keras, model, config, data, tracker, rng, workers)
            probabilities = _predict_images(keras, model, config, data, ("val", "test"), tracker, workers)
    tracker.check()
    threshold = choose_threshold(config.threshold_rule, data.labels["val"], probabilities["val"])

    tracker.send({"phase": "saving", "eta_s": None}, force=True)
    relative = f"run-{run_id}/model.keras"
    sha = _atomic_save(model, runs_dir / relative)
    rows = [
        {"run_id": run_id, "image_id": image_id, "subset": subset, "label": sample.label, "probability": float(probability)}
        for subset in ("val", "test")
        for sample, probability in zip(data.samples[subset], probabilities[subset], strict=True)
        for image_id in sample.image_ids  # a composite's probability belongs to both of its images
    ]
    with dbm.write(db):
        db.execute("DELETE FROM predictions WHERE run_id = ?", [run_id])
        db["predictions"].insert_all(rows)
    ips = tracker.train_images / tracker.train_seconds if tracker.train_seconds > 0 else 0.0
    additions.update({
        "phase_epochs": ran, "precision": precision, "notes": notes,
        "class_weights": {str(k): round(v, 6) for k, v in weights.items()} if weights else None,
    })
    return RunResult(
        threshold=float(threshold), images_per_second=round(ips, 3), weights_path=relative, weights_sha256=sha,
        device=device, config_additions=additions,
    )
