"""Train one run: split, data, model, phases, calibration, threshold, predictions, saved model.

``train_run(db, config, reporter, model_file)`` does one run from start to end in the
calling process (the worker, or ``bonescan train`` in the foreground), saves the model to
``model_file`` and returns what it computed (:class:`runs.RunResult`: threshold,
predictions, facts, the model's checksum). The caller owns the ``runs`` row and stores
the result through the run store (``runs.record_result``); it passes a :class:`Reporter`
and gets progress, every finished epoch and a cancel check through it. The only table
``train_run`` writes is fast mode's feature cache (``runs.store_features``), chunk by
chunk, so that features computed before a cancel are kept.

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
  the head phase runs. The head phase's best weights and val_loss are kept: when
  fine-tuning ends no better, those weights are restored (and ``facts["notes"]`` says so).
* ``full``: every layer trains from the start at ``learning_rate`` (what ``weights=none``
  needs); from pretrained weights (ImageNet or a file) at ``finetune_learning_rate``.

``lr_schedule`` (``none``, ``cosine``, ``plateau``) shapes each phase's learning rate.
Runs in mode ``full`` or from ``weights none`` re-estimate their BatchNorm statistics
before each validation and before predicting and saving (:mod:`bonescan_core.batchnorm`).

After the phases the model predicts validation and test; the recalibration
(``TrainConfig.calibration``, :mod:`bonescan_core.calibration`) is fitted on the validation
outputs only and applied to both, and only then is the threshold chosen, on the calibrated
validation probabilities. ``results["reproducibility"]`` records versions, commit, the
weights file's sha256, split and seeds; ``TrainConfig.deterministic`` runs the whole run
under deterministic ops (:mod:`bonescan_core.reproducibility`).

Importing this module does not import Keras. The settings (``TrainConfig``) and the result
(``RunResult``) are defined in :mod:`bonescan_core.runs` and importable from here too.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bonescan_core import batchnorm, calibration, errors, imagecache, models, preprocess, reproducibility, runs, studystats
from bonescan_core import splits as splitting
from bonescan_core.heavy import jax_module, keras_module, sqlite_utils, tensorflow_module
from bonescan_core.models import weights_kind
from bonescan_core.preprocess import Sample
from bonescan_core.runs import THRESHOLD_RULES, Prediction, RunResult, StudyPrediction, TrainConfig, file_sha256

__all__ = ["THRESHOLD_RULES", "NullReporter", "Reporter", "RunResult", "TrainConfig", "TrainingCancelled", "TrainingError",
           "class_weights_for", "file_sha256", "run_thresholds", "study_outputs", "train_run", "weights_id"]

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


# --- helpers ----------------------------------------------------------------------------------------

def class_weights_for(labels: np.ndarray) -> dict[int, float]:
    """Inverse-frequency class weights {0: w0, 1: w1}, n / (2 n_c): both classes weigh as much in the loss.

    E.g. 60 % negative / 40 % positive → {0: 0.83, 1: 1.25}. A missing class gets 1.0.
    """
    labels = np.asarray(labels).astype(int)
    n = len(labels)
    return {c: (n / (2.0 * int((labels == c).sum())) if (labels == c).any() else 1.0) for c in (0, 1)}


def study_outputs(samples: list[Sample], probabilities: np.ndarray, view_mode: str,
                  aggregate: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One probability per study from one subset's sample probabilities.

    Args:
        samples: the subset's samples (images for ``per_image``, studies for ``composite``).
        probabilities: (n,) float in [0, 1], one per sample.
        view_mode: ``composite`` samples are studies already: each output is kept as it is.
        aggregate: ``max`` | ``mean`` over a per-image run's views (``studystats.study_scores``).

    Returns:
        (study_ids (s,) int64 ascending, labels (s,) int64 0/1, probabilities (s,) float64).
    """
    study_ids = np.array([sample.study_id for sample in samples], dtype=np.int64)
    labels = {sample.study_id: int(sample.label) for sample in samples}  # a study has one label
    ids, scores = studystats.study_scores(study_ids, probabilities, aggregate if view_mode == "per_image" else "max")
    return ids, np.array([labels[int(i)] for i in ids], dtype=np.int64), scores


def run_thresholds(config: TrainConfig, image_labels: np.ndarray, image_probabilities: np.ndarray,
                   study_labels: np.ndarray, study_probabilities: np.ndarray, notes: list[str] | None = None) -> dict[str, Any]:
    """The run's ``results["thresholds"]``: one rule (``config.threshold_rule`` with its
    ``threshold_target``) applied to validation samples (``image``: images, or studies for a
    composite run) and to validation studies (``study``). (n,) 0/1 labels, probabilities in [0, 1].

    A level whose rule cannot be applied (one class in validation, an NPV target no threshold
    reaches) gets ``studystats.FIXED_THRESHOLD`` (0.5) and a sentence in ``notes``: the trained
    model is kept rather than lost at the last step.
    """
    rule, target = config.threshold_rule, config.threshold_target
    chosen = {}
    for level, labels, probabilities in (("image", image_labels, image_probabilities), ("study", study_labels, study_probabilities)):
        try:
            chosen[level] = float(studystats.choose_threshold(labels, probabilities, rule, target).value)
        except errors.InputError as error:
            chosen[level] = studystats.FIXED_THRESHOLD
            if notes is not None:
                notes.append(f"the {level} threshold could not be chosen by rule {rule} on the validation subset ({error}); "
                             f"it is {studystats.FIXED_THRESHOLD}")
    return {**chosen, "rule": rule, "target": target}


def weights_id(weights: str) -> str:
    """The feature-cache key of a weights setting: ``imagenet``, ``none`` or the file's sha256."""
    kind = weights_kind(weights)
    return kind if kind != "file" else file_sha256(Path(weights))


def _atomic_save(model: Any, target: Path) -> str:
    """Save to a temporary ``.keras`` file beside ``target``, then rename (a reader never sees half a file); returns its sha256."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=".model-", suffix=".keras", dir=target.parent)
    os.close(handle)
    try:
        # An uncompiled model over the same layers: the .keras format would otherwise also
        # store the optimizer's state (Adam: two moments per weight, three times the file),
        # which inference never needs. (clone_model would copy the compile state too.)
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
    keras = keras_module()
    backend = keras.backend.backend()
    versions = {"python": platform.python_version(), "keras": keras.__version__, "numpy": np.__version__}
    device, n_gpus = "CPU", 0
    if backend == "tensorflow":
        tf = tensorflow_module()
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
        jax = jax_module()
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
    keras = keras_module()
    previous = keras.mixed_precision.global_policy().name
    strategy_scope: Any = contextlib.nullcontext()
    precision = "float32"
    if backend == "tensorflow" and n_gpus:
        keras.mixed_precision.set_global_policy("mixed_float16")
        precision = "mixed_float16"
        if n_gpus > 1:
            tf = tensorflow_module()
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
    """Samples per subset, their labels (N,) int, and (N, H, W) float16 images once loaded
    (an ``imagecache.DiskImages`` read per batch, or an in-memory array: the same values)."""

    samples: dict[str, list[Sample]]
    labels: dict[str, np.ndarray]
    images: dict[str, np.ndarray] = field(default_factory=dict)


def _select_samples(db: sqlite_utils.Database, split_id: int, config: TrainConfig, rng: np.random.Generator) -> _Data:
    """The split's samples per subset (labels as stored with the split); training capped at ``max_train_images``."""
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


def _load(db: sqlite_utils.Database, data: _Data, config: TrainConfig, tracker: _Progress,
          subsets: tuple[str, ...]) -> dict[str, Any]:
    """Each subset's images: read per batch from the disk cache (``imagecache``), or in memory.
    Returns the ``image_cache`` fact: per subset, what was reused and what decoded."""
    facts: dict[str, Any] = {}
    for subset in subsets:
        tracker.send({"phase": "loading", "subset": subset, "images": len(data.samples[subset])}, force=True)
        try:
            data.images[subset], facts[subset] = imagecache.training_images(
                db, data.samples[subset], config.image_size, config.view_mode, cancelled=tracker.reporter.cancelled
            )
        except InterruptedError as error:
            raise TrainingCancelled("training cancelled while loading images") from error
    return {"image_cache": facts}


def _phase_learning_rate(config: TrainConfig, phase: str) -> float:
    """The Adam learning rate of a phase: ``finetune_learning_rate`` after unfreezing, and for ``full``
    from pretrained weights (ImageNet or a file: at a head-phase rate the first steps would wipe out
    what the weights know); ``learning_rate`` otherwise."""
    if phase == "finetune" or (phase == "full" and weights_kind(config.weights) != "none"):
        return config.finetune_learning_rate
    return config.learning_rate


def _learning_rate(keras: Any, config: TrainConfig, rate: float, epochs: int, steps_per_epoch: int) -> tuple[Any, list[Any]]:
    """(learning rate or schedule for the optimizer, extra callbacks) of one phase, by ``config.lr_schedule``.

    ``cosine``: decays from ``rate`` to 1 % of it over the phase's epoch budget (in steps);
    ``plateau``: halves the rate when val_loss has not improved for max(1, patience // 2)
    epochs (before early stopping gives up), down to 1 % of it; ``none``: constant.
    """
    if config.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(rate, decay_steps=max(1, epochs * steps_per_epoch), alpha=0.01), []
    if config.lr_schedule == "plateau":
        return rate, [keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=max(1, config.patience // 2),
                                                        min_lr=rate * 0.01, verbose=0)]
    return rate, []


def _best_val_loss(history: Any) -> float:
    """The lowest finite val_loss of a ``fit`` history (what EarlyStopping restored), or inf."""
    losses = [float(v) for v in history.history.get("val_loss", []) if np.isfinite(v)]
    return min(losses) if losses else float("inf")


def _fit_phases(keras: Any, model: Any, config: TrainConfig, data: _Data, tracker: _Progress, rng: np.random.Generator,
                workers: int, notes: list[str]) -> tuple[dict[str, int], dict[int, float] | None]:
    """Train a full image model by mode and phase; returns (epochs run per phase, class weights).

    BatchNorm statistics are re-estimated (``batchnorm``) before each validation and at the
    end when ``batchnorm.applies``. In ``finetune``, the head phase's best weights and
    val_loss are kept, and restored (with a line in ``notes``) when fine-tuning ends no
    better.
    """
    bb = models.get_backbone(config.backbone)
    class_weights = class_weights_for(data.labels["train"]) if config.class_weights else None
    # Augmentation and input scaling run inside the compiled train step (the batches are plain grey arrays).
    trainer = preprocess.with_input_pipeline(model, bb, preprocess.make_augmenter(config.augment, seed=config.seed), config.view_mode)
    train_ds = preprocess.image_batches(data.images["train"], data.labels["train"], config.batch_size, rng=rng,
                                        class_weights=class_weights, workers=workers)
    val_ds = preprocess.image_batches(data.images["val"], data.labels["val"], config.batch_size, workers=workers)
    sizes = _batch_sizes(len(data.labels["train"]), config.batch_size)
    bn_callbacks, reestimate = _batchnorm_reestimation(keras, model, config, data, tracker)
    head_best: tuple[float, list[Any]] | None = None  # (val_loss, weights) at the end of finetune's head phase
    done, ran = 0, {}
    for phase, budget in config.phase_epochs().items():
        if phase == "finetune":
            budget = config.epochs - done  # epochs early stopping saved in the head phase go here
        if budget <= 0:
            continue
        models.freeze_for(model, config.mode, bb, phase="finetune" if phase == "finetune" else "head")
        rate, schedule_callbacks = _learning_rate(keras, config, _phase_learning_rate(config, phase), budget, len(sizes))
        _compile(keras, trainer, rate)
        stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience, restore_best_weights=True)
        tracker.send({"phase": phase, "epoch": done + 1, "batch": 0, "batches": len(sizes), "eta_s": None}, force=True)
        # shuffle=False: the dataset reshuffles itself every epoch with the run's own Generator.
        history = trainer.fit(train_ds, validation_data=val_ds, epochs=done + budget, initial_epoch=done, verbose=0, shuffle=False,
                            callbacks=[_callback(keras, tracker, phase, sizes, done + budget), *bn_callbacks,
                                       *schedule_callbacks, stopper])
        ran[phase] = len(history.epoch)
        done += ran[phase]
        if phase == "head" and config.mode == "finetune":
            head_best = (_best_val_loss(history), model.get_weights())
        elif phase == "finetune" and head_best is not None and not _best_val_loss(history) < head_best[0]:
            model.set_weights(head_best[1])
            notes.append(f"fine-tuning did not improve on the head phase (best val_loss {_best_val_loss(history):.4f} vs "
                         f"{head_best[0]:.4f}); the head phase's weights were kept")
    reestimate()  # before predicting and saving: the statistics of the weights that are kept
    return ran, class_weights


def _batchnorm_reestimation(keras: Any, model: Any, config: TrainConfig, data: _Data,
                            tracker: _Progress) -> tuple[list[Any], Any]:
    """([callback re-estimating before each validation], a function re-estimating now), or ([], a no-op).

    Un-augmented training images, through the model's input scaling (``batchnorm`` says why).
    """
    if not batchnorm.applies(config.mode, config.weights):
        return [], lambda: 0
    plain = preprocess.with_input_pipeline(model, config.backbone)
    images = data.images["train"][..., None]  # (N, H, W, 1): the wrapper's grey input

    def now() -> int:
        return batchnorm.reestimate(plain, images, config.batch_size, tracker.reporter.cancelled)

    return [batchnorm.callback(keras, plain, images, config.batch_size, tracker.reporter.cancelled)], now


def _predict_images(keras: Any, model: Any, config: TrainConfig, data: _Data, subsets: tuple[str, ...], tracker: _Progress,
                    workers: int) -> dict[str, np.ndarray]:
    """{subset: (N,) float64 probabilities}; one wrapped predictor, so its predict step is traced once."""
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
    bb = models.get_backbone(config.backbone)
    key = _feature_key(config)
    cached = runs.cached_features(db, bb.name, key, config.image_size, {s.key for items in data.samples.values() for s in items})
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
            computed = {sample.key: vector for sample, vector in zip(chunk, vectors, strict=True)}
            cached.update(computed)
            done += len(vectors)
            elapsed = time.monotonic() - started
            tracker.send({"phase": "features", "batch": done, "batches": len(missing),
                          "eta_s": round(elapsed / done * (len(missing) - done), 1)})
            runs.store_features(db, bb.name, key, config.image_size, computed)
        facts["feature_images_per_second"] = round(done / max(time.monotonic() - started, 1e-9), 3)
    features = {subset: np.stack([cached[s.key] for s in items]).astype(np.float32) for subset, items in data.samples.items()}
    return features, facts


def _fit_fast(keras: Any, model: Any, config: TrainConfig, data: _Data, features: dict[str, np.ndarray],
              tracker: _Progress) -> tuple[Any, dict[str, int], dict[int, float] | None]:
    """Train the head on cached features; copy it into the full model. Returns (head, epochs run, class weights)."""
    keras.utils.set_random_seed(config.seed)  # the head's own randomness follows the run's seed
    bb = models.get_backbone(config.backbone)
    head = models.head_model(bb.n_features, config.dropout, config.seed)
    class_weights = class_weights_for(data.labels["train"]) if config.class_weights else None
    sizes = _batch_sizes(len(data.labels["train"]), config.batch_size)
    rate, schedule_callbacks = _learning_rate(keras, config, config.learning_rate, config.epochs, len(sizes))
    _compile(keras, head, rate)
    stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience, restore_best_weights=True)
    tracker.send({"phase": "head", "epoch": 1, "batch": 0, "batches": len(sizes), "eta_s": None}, force=True)
    history = head.fit(
        features["train"], data.labels["train"].astype(np.float32).reshape(-1, 1),
        batch_size=config.batch_size, epochs=config.epochs, shuffle=True, verbose=0, class_weight=class_weights,
        validation_data=(features["val"], data.labels["val"].astype(np.float32).reshape(-1, 1)),
        callbacks=[_callback(keras, tracker, "head", sizes, config.epochs), *schedule_callbacks, stopper],
    )
    models.transplant_head(head, model)
    return head, {"head": len(history.epoch)}, class_weights


def _deterministic_if_asked(function: Any) -> Any:
    """Run ``train_run`` inside ``reproducibility.deterministic_ops(config.deterministic, config.seed)``:
    deterministic kernels for this run only (the worker trains later runs in the same process)."""

    @functools.wraps(function)
    def wrapper(db: sqlite_utils.Database, config: TrainConfig, reporter: Reporter, model_file: Path) -> RunResult:
        with reproducibility.deterministic_ops(config.deterministic, config.seed):
            return function(db, config, reporter, model_file)

    return wrapper


def _calibrate(config: TrainConfig, val_labels: np.ndarray, raw: dict[str, np.ndarray],
               notes: list[str]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Fit ``config.calibration`` on the validation samples' raw outputs only and apply it to every subset.

    Returns ({subset: (N,) calibrated probabilities}, the calibration record stored as
    ``results["calibration"]``); a fit that falls back to none adds its reason to ``notes``.
    """
    record, note = calibration.fit(config.calibration, val_labels, raw["val"])
    if note:
        notes.append(note)
    return calibration.calibrated_subsets(record, raw), record


@_deterministic_if_asked
def train_run(db: sqlite_utils.Database, config: TrainConfig, reporter: Reporter, model_file: Path) -> RunResult:
    """Train, threshold, predict and save one run (see the module docstring for the modes).

    Args:
        db: open database (labels, split, images; fast mode's feature cache).
        config: the settings.
        reporter: progress, epochs and cancel (:class:`Reporter`).
        model_file: where to save the model (written atomically), e.g.
            ``runs.model_file(db_path, run_id)``.

    Returns:
        :class:`runs.RunResult` (threshold, throughput, model checksum, device, the
        validation and test predictions, and the facts); the caller stores it.

    Raises:
        TrainingCancelled: ``reporter.cancelled()`` returned True (nothing saved).
        TrainingError: a subset has no images or the training samples one class only.
        splits.SplitError: no split can be made (too few labels) or ``split_id`` is unknown.
        models.WeightsUnavailable / models.WeightsIncompatible: weights cannot be loaded.
    """
    keras = keras_module()
    model_file = Path(model_file)
    tracker = _Progress(reporter, config.epochs)
    tracker.send({"phase": "preparing", "epoch": 0, "batch": 0, "batches": 0, "eta_s": None}, force=True)
    notes: list[str] = []
    bb = models.get_backbone(config.backbone)
    if weights_kind(config.weights) == "none" and config.mode != "full":
        notes.append(f"weights none with mode {config.mode}: the frozen layers keep their random initial weights; "
                     "mode full trains them all")
    if config.mode == "full" and weights_kind(config.weights) != "none":
        notes.append(f"mode full from pretrained weights trains at the fine-tuning learning rate {config.finetune_learning_rate:g}, "
                     f"not {config.learning_rate:g}")

    split_id = config.split_id if config.split_id is not None else splitting.ensure_split(db, config.seed)
    info = splitting.split_info(db, split_id)

    rng = np.random.default_rng(config.seed)  # shuffling and the training subsample: explicit, not global
    keras.utils.set_random_seed(config.seed)
    data = _select_samples(db, split_id, config, rng)
    backend, device, n_gpus, versions = _backend_facts()
    # Threads keep an accelerator fed while batches are augmented; on a CPU they would only compete with it.
    workers = min(4, os.cpu_count() or 1) if n_gpus and config.mode != "fast" else 1
    facts: dict[str, Any] = {
        "split_id": split_id, "labels_hash": info["labels_hash"],
        "n_train": len(data.samples["train"]), "n_val": len(data.samples["val"]), "n_test": len(data.samples["test"]),
        "sample_unit": "study" if config.view_mode in preprocess.TWO_VIEW_MODES else "image",
        "backend": backend, "device": device, "versions": versions,
    }
    with _precision_and_strategy(backend, n_gpus) as (_, precision):
        if config.mode == "fast":
            model = models.build_model(bb, config.weights, config.image_size, config.dropout, seed=FEATURE_SEED)
            features, feature_facts = _features(keras, db, model, config, data, tracker)
            facts.update(feature_facts)
            head, ran, class_weights = _fit_fast(keras, model, config, data, features, tracker)
            probabilities = {
                subset: np.asarray(keras.ops.convert_to_numpy(head(features[subset], training=False)), dtype=np.float64).reshape(-1)
                for subset in ("val", "test")
            }
        else:
            facts.update(_load(db, data, config, tracker, ("train", "val", "test")))
            model = models.build_model(bb, config.weights, config.image_size, config.dropout, seed=config.seed,
                                       views=2 if config.view_mode == "fusion" else 1)
            ran, class_weights = _fit_phases(keras, model, config, data, tracker, rng, workers, notes)
            probabilities = _predict_images(keras, model, config, data, ("val", "test"), tracker, workers)
    tracker.check()
    # Calibration first, on validation only: thresholds are chosen on calibrated validation probabilities.
    raw_probabilities = probabilities
    probabilities, calibration_record = _calibrate(config, data.labels["val"], raw_probabilities, notes)
    calibrated = calibration_record["method"] != "none"
    # The study is the unit: its raw score (the views aggregated, or a composite's one output) gets
    # its own calibration, fitted on the validation studies' scores (the max of calibrated views
    # would run high), before the study threshold is chosen on them.
    raw_studies = {subset: study_outputs(data.samples[subset], raw_probabilities[subset], config.view_mode,
                                         config.study_aggregate) for subset in ("val", "test")}
    study_probabilities, study_calibration = _calibrate(
        config, raw_studies["val"][1], {subset: raw_studies[subset][2] for subset in raw_studies}, notes)
    thresholds = run_thresholds(config, data.labels["val"], probabilities["val"], raw_studies["val"][1],
                                study_probabilities["val"], notes)

    tracker.send({"phase": "saving", "eta_s": None}, force=True)
    sha = _atomic_save(model, model_file)
    predictions = tuple(
        Prediction(image_id=image_id, subset=subset, label=int(sample.label), probability=float(probability),
                   raw_probability=float(raw) if calibrated else None)
        for subset in ("val", "test")
        for sample, probability, raw in zip(data.samples[subset], probabilities[subset], raw_probabilities[subset], strict=True)
        for image_id in sample.image_ids  # a composite's probability belongs to both of its images
    )
    study_predictions = tuple(
        StudyPrediction(study_id=int(study_id), subset=subset, label=int(label), probability=float(probability),
                        raw_probability=float(raw) if calibrated else None)
        for subset in ("val", "test")
        for study_id, label, raw, probability in zip(*raw_studies[subset], study_probabilities[subset], strict=True)
    )
    ips = tracker.train_images / tracker.train_seconds if tracker.train_seconds > 0 else 0.0
    facts.update({
        "phase_epochs": ran, "precision": precision, "notes": notes, "thresholds": thresholds,
        "class_weights": {str(k): round(v, 6) for k, v in class_weights.items()} if class_weights else None,
        "calibration": calibration_record, "study_calibration": study_calibration,
        "reproducibility": reproducibility.record(config, split_id, info["labels_hash"], info["seed"],
                                                  FEATURE_SEED if config.mode == "fast" else None),
    })
    return RunResult(
        threshold=thresholds["image"], images_per_second=round(ips, 3), model_file=model_file, weights_sha256=sha,
        device=device, predictions=predictions, facts=facts, study_predictions=study_predictions,
    )
