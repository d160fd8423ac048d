"""Re-estimate BatchNorm moving statistics, so that inference matches what training saw.

Why: a BatchNormalization layer normalises with the current batch's mean and variance
while it trains, but with its *moving* statistics at inference (validation, prediction,
Grad-CAM, the saved model). Keras updates those with momentum 0.99 per step, so after
the ~20 steps of an epoch on a few hundred scans they still hold mostly their initial
values (mean 0, variance 1) when a network trains from scratch: DenseNet121's inference
activations then differ from its batch-statistics ones by ~93 % (issue 12), and every
image gets the same probability. Fine-tuning with frozen ImageNet BatchNorm does not have
the problem (its statistics are ImageNet's and stay fixed).

The fix (as ``torch.optim.swa_utils.update_bn``): before each validation, before
predicting and before saving, run the model in training mode over the un-augmented
training images and set every BatchNorm layer's moving mean and variance to the exact
average of its per-batch means and variances (weighted by batch size). Momentum is set
to 0 during the pass, so after each batch the layer's moving statistics ARE that batch's
statistics; they are read back and averaged here, then momentum is restored.

``applies(mode, weights)`` says which runs need it: ``full`` (every BatchNorm layer
trains) and any run from random weights (``weights none``). Importing this module does
not import Keras.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from bonescan_core.heavy import keras_module


def applies(mode: str, weights: str) -> bool:
    """Whether a run's BatchNorm statistics must be re-estimated: mode ``full``, or weights ``none``."""
    from bonescan_core.models import weights_kind  # models imports nothing heavy either

    return mode == "full" or weights_kind(weights) == "none"


def batchnorm_layers(model: Any) -> list[Any]:
    """Every ``keras.layers.BatchNormalization`` in ``model``, nested models included, each once, in graph order."""
    keras = keras_module()
    found: list[Any] = []
    seen: set[int] = set()

    def walk(layer: Any) -> None:
        if id(layer) in seen:
            return
        seen.add(id(layer))
        if isinstance(layer, keras.layers.BatchNormalization):
            found.append(layer)
        for inner in getattr(layer, "layers", ()):
            walk(inner)

    for layer in model.layers:
        walk(layer)
    return found


def reestimate(model: Any, images: np.ndarray, batch_size: int, cancelled: Callable[[], bool] | None = None) -> int:
    """Set every BatchNorm layer's moving statistics to the average of its batch statistics over ``images``.

    Args:
        model: a model that takes ``images`` as they are (e.g. the un-augmented wrapper of
            ``preprocess.with_input_pipeline``); it is called in training mode, batch by
            batch, outside any compiled step. Only BatchNorm layers behave differently in
            training mode in the bonescan models (and the head's Dropout, which comes after
            the last BatchNorm and so changes nothing here).
        images: (N, H, W, C) model input, any float dtype; not augmented.
        batch_size: images per batch (the training batch size: the statistics are those of
            batches like the ones training normalised with).
        cancelled: polled before each batch; when it returns True the pass stops and the
            layers keep the statistics they had (nothing is half-written).

    Returns:
        The number of BatchNorm layers re-estimated (0 when the model has none, e.g. VGG19,
        or when ``images`` is empty or the pass was cancelled).

    Side effects:
        Each BatchNorm layer's ``moving_mean`` and ``moving_variance`` (float32, one value
        per channel). Its ``momentum`` and ``trainable`` are restored before returning, even
        on error. A frozen BatchNorm layer is re-estimated too (a frozen random backbone of a
        ``weights none`` run needs statistics as much as a trained one).
    """
    keras = keras_module()
    layers = batchnorm_layers(model)
    n = len(images)
    if not layers or n == 0:
        return 0
    saved = [(layer.momentum, layer.trainable, keras.ops.convert_to_numpy(layer.moving_mean),
              keras.ops.convert_to_numpy(layer.moving_variance)) for layer in layers]
    sums_mean = [np.zeros(layer.moving_mean.shape, dtype=np.float64) for layer in layers]
    sums_var = [np.zeros(layer.moving_variance.shape, dtype=np.float64) for layer in layers]
    finished = False
    try:
        for layer in layers:
            layer.momentum = 0.0  # moving statistics := this batch's statistics (read back below)
            layer.trainable = True  # Keras 3 runs a frozen BatchNorm in inference mode even when training=True
        for start in range(0, n, batch_size):
            if cancelled is not None and cancelled():
                return 0
            batch = np.asarray(images[start : start + batch_size], dtype=np.float32)
            model(batch, training=True)
            for index, layer in enumerate(layers):
                sums_mean[index] += len(batch) * keras.ops.convert_to_numpy(layer.moving_mean).astype(np.float64)
                sums_var[index] += len(batch) * keras.ops.convert_to_numpy(layer.moving_variance).astype(np.float64)
        finished = True
    finally:
        for index, (layer, (momentum, trainable, mean, variance)) in enumerate(zip(layers, saved, strict=True)):
            layer.momentum = momentum
            layer.trainable = trainable
            if finished:
                layer.moving_mean.assign((sums_mean[index] / n).astype(np.float32))
                layer.moving_variance.assign((sums_var[index] / n).astype(np.float32))
            else:  # cancelled or failed: put back what was there before the pass
                layer.moving_mean.assign(mean)
                layer.moving_variance.assign(variance)
    return len(layers)


def callback(keras: Any, model: Any, images: np.ndarray, batch_size: int,
             cancelled: Callable[[], bool] | None = None) -> Any:
    """A Keras callback that re-estimates ``model``'s BatchNorm statistics before each validation of ``fit``.

    ``fit`` calls ``on_test_begin`` just before it evaluates the validation data, after the
    epoch's last training step; the statistics are thus those of the weights validated (and
    of the weights ``EarlyStopping(restore_best_weights=True)`` keeps, which include them).
    """

    class ReestimateBatchNorm(keras.callbacks.Callback):
        def on_test_begin(self, logs: Any = None) -> None:
            reestimate(model, images, batch_size, cancelled)

    return ReestimateBatchNorm()
