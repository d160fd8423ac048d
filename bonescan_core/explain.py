"""Grad-CAM: where in a bone scan a trained model found its evidence of metastasis.

Grad-CAM (Selvaraju et al., 2017) weights each channel of a convolutional feature map by
the spatial mean of the gradient of the class score with respect to it, sums the channels,
keeps the positive part and scales it to [0, 1]. Here the score is the metastasis LOGIT
(the input of the final sigmoid), not the probability: a confident model saturates the
sigmoid, whose gradient then underflows to zero in float32 and would blank the map.

How it is computed. The models from :func:`bonescan_core.models.build_model` are one flat
graph, so the graph is cut at the target layer into two sub-models sharing the model's
weights: ``features`` (image → feature map A) and ``head`` (A → logit). The forward pass
through the backbone needs no gradient tape; only the head (pooling, dropout, one Dense) is
differentiated, with respect to A. That keeps it fast and makes the gradient step tiny and
easy to write per backend (:class:`GradCam`): TensorFlow (``tf.GradientTape`` inside a
``tf.function``) and JAX (``jax.grad`` through ``stateless_call`` under ``jax.jit``). A
layer that is not a cut point (a skip connection bypasses it) is still handled on
TensorFlow, by taping the whole model. PyTorch is not implemented (NotImplementedError).
The compiled step is built once per (model, layer) and cached while the model lives. It
returns the score too: the forward pass it runs is the model's own, so the prediction comes
with the map at no extra cost (:func:`gradcam_with_probabilities`; the probability is the
sigmoid of the logit).

Geometry. A stored image (H0, W0) is min-max normalised and fitted into the model's
(H, W) frame keeping its aspect ratio, with zero padding (:func:`preprocess.fit_to`). The
feature map (h, w) covers that frame; :func:`to_image_geometry` resizes it onto the frame,
cuts the padding away with :func:`preprocess.content_box` and resizes the rest to
(H0, W0), so a heatmap lies exactly over the image it explains. Composite runs (anterior
and posterior side by side in one input) are supported: :func:`to_view_geometries` splits
the frame into its two halves first.

Caching. :func:`explain_images` (and :func:`explain_image`, one image) stores each map in
the ``explanations`` table (float16, encoded like pixels) and computes it once per run and
image; the images it computes go through the model together, in batches, with their
probabilities (one study's two views: one pass). Loaded models are kept in a
small in-process cache (:func:`load_run_model`), keyed by file, size and modification
time, so an explorer page that explains image after image loads the model once.

Keras (and TensorFlow or JAX) is imported only when a model is used; this module never
imports streamlit.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import sqlite_utils
from PIL import Image

from bonescan_core import db as dbm
from bonescan_core import errors, jobs, pixelstore
from bonescan_core.models import DEFAULT_SIZE, Backbone, get_backbone, keras_module
from bonescan_core.preprocess import compose_views, content_box, list_samples, prepare_image, to_model_input
from bonescan_core.training import file_sha256

if TYPE_CHECKING:  # pragma: no cover - typing only; keras is imported lazily
    import keras

DEFAULT_OPACITY = 0.4
BATCH_SIZE = 8  # images per forward pass in gradcam() and explain_images(): bounds memory for large N
MODEL_CACHE_SIZE = 2  # loaded run models kept in memory (a DenseNet121 ~30 MB, a ResNet50 ~100 MB)


class ModelUnavailable(errors.Unavailable):
    """A run's saved model cannot be used (none saved, file missing, changed or unreadable); the message says what to do."""


# --- the gradient step, per backend ---------------------------------------------------------------

class GradCam:
    """The compiled Grad-CAM step for one (model, layer): image batch → (feature map, gradient, score).

    Built by :func:`grad_cam_for` and cached per model; call it with preprocessed input.

    Attributes:
        layer_name: the target layer.
        backend: ``"tensorflow"`` or ``"jax"``.
        split: True when the graph was cut at the layer (only the head is differentiated);
            False when the whole model is taped (TensorFlow only, for a layer that is not a
            cut point).
        uses_logit: True when the score is the pre-sigmoid logit of the final Dense layer;
            False when it is the model's first output unit itself.
    """

    def __init__(self, model: keras.Model, layer_name: str) -> None:
        keras = keras_module()
        self.layer_name = layer_name
        self.backend = keras.backend.backend()
        try:
            layer = model.get_layer(layer_name)
        except ValueError:
            convs = [lay.name for lay in model.layers if isinstance(lay, keras.layers.Conv2D)][-3:]
            raise ValueError(
                f"model {model.name!r} has no layer {layer_name!r}; Grad-CAM needs a convolutional "
                f"layer's name (e.g. the backbone's last_conv_layer; this model's last Conv2D layers: {', '.join(convs)})"
            ) from None
        target = layer.output
        if len(target.shape) != 4:
            raise ValueError(f"layer {layer_name!r} outputs shape {tuple(target.shape)}; Grad-CAM needs a (N, h, w, C) feature map")

        # Score the logit when the model ends in Dense(sigmoid) (the bonescan head): the head
        # sub-model stops at the Dense layer's input and the logit is computed from its kernel.
        last = model.layers[-1]
        self._dense = None
        if (
            len(model.outputs) == 1
            and isinstance(last, keras.layers.Dense)
            and last.activation is keras.activations.sigmoid
            and last.output is model.outputs[0]
        ):
            self._dense = last
        self.uses_logit = self._dense is not None
        score_input = self._dense.input if self._dense is not None else model.outputs[0]

        self.split = True
        try:
            self._features = keras.Model(model.inputs, target, name=f"{model.name}_gradcam_features")
            self._head = keras.Model(target, score_input, name=f"{model.name}_gradcam_head")
        except ValueError:
            # Graph disconnected: something after the layer also reads an earlier tensor.
            self.split = False
            self._joint = keras.Model(model.inputs, [target, score_input], name=f"{model.name}_gradcam")

        if self.backend == "tensorflow":
            self._step = self._tensorflow_step(model)
        elif self.backend == "jax":
            if not self.split:
                raise ValueError(
                    f"layer {layer_name!r} is not a cut point of {model.name!r} (a skip connection bypasses it); "
                    "under the JAX backend Grad-CAM needs a layer whose output alone determines the prediction, "
                    "such as the backbone's last_conv_layer"
                )
            self._step = self._jax_step()
        else:
            raise NotImplementedError(
                f"Grad-CAM is implemented for the tensorflow and jax Keras backends, not {self.backend!r}; "
                "set KERAS_BACKEND=tensorflow or KERAS_BACKEND=jax"
            )

    def _score(self, h: Any, kernel: Any = None, bias: Any = None) -> Any:
        """(N,) float32 score: the logit of output unit 0, or that output itself."""
        ops = keras_module().ops
        h = ops.cast(h, "float32")
        if self._dense is None:
            return ops.reshape(h, (ops.shape(h)[0], -1))[:, 0]
        z = ops.matmul(h, ops.cast(kernel[:, :1], "float32"))[:, 0]
        return z + ops.cast(bias[0], "float32") if bias is not None else z

    def _tensorflow_step(self, model: keras.Model) -> Any:
        import tensorflow as tf

        dense = self._dense
        spec = tf.TensorSpec((None, *model.inputs[0].shape[1:]), tf.float32)

        def kernel_bias() -> tuple[Any, Any]:
            return (dense.kernel, dense.bias) if dense is not None else (None, None)

        if self.split:
            features, head = self._features, self._head

            @tf.function(input_signature=[spec])
            def step(x: Any) -> tuple[Any, Any, Any]:
                a = features(x, training=False)
                with tf.GradientTape() as tape:
                    tape.watch(a)
                    score = self._score(head(a, training=False), *kernel_bias())
                grad = tape.gradient(score, a)
                return a, grad if grad is not None else tf.zeros_like(a), score
        else:
            joint = self._joint

            @tf.function(input_signature=[spec])
            def step(x: Any) -> tuple[Any, Any, Any]:
                with tf.GradientTape() as tape:
                    a, h = joint(x, training=False)
                    score = self._score(h, *kernel_bias())
                grad = tape.gradient(score, a)
                return a, grad if grad is not None else tf.zeros_like(a), score

        return step

    def _jax_step(self) -> Any:
        import jax
        import jax.numpy as jnp

        features, head = self._features, self._head

        def score_sum(a: Any, head_state: tuple[Any, ...]) -> tuple[Any, Any]:
            trainable, non_trainable, kernel, bias = head_state
            h, _ = head.stateless_call(trainable, non_trainable, a, training=False)
            score = self._score(h, kernel, bias)
            # Samples are independent in inference mode, so the gradient of the sum is each
            # sample's own gradient; the per-sample scores ride along as auxiliary output.
            return jnp.sum(score), score

        def step(feature_state: tuple[Any, Any], head_state: tuple[Any, ...], x: Any) -> tuple[Any, Any, Any]:
            a, _ = features.stateless_call(*feature_state, x, training=False)
            grad, score = jax.grad(score_sum, has_aux=True)(a, head_state)
            return a, grad, score

        jitted = jax.jit(step)

        def call(x: Any) -> tuple[Any, Any, Any]:
            # Variable values are passed in, not closed over, so the step sees current weights.
            feature_state = ([v.value for v in features.trainable_variables], [v.value for v in features.non_trainable_variables])
            dense = self._dense
            head_state = (
                [v.value for v in head.trainable_variables],
                [v.value for v in head.non_trainable_variables],
                dense.kernel.value if dense is not None else None,
                dense.bias.value if dense is not None and dense.bias is not None else None,
            )
            return jitted(feature_state, head_state, jnp.asarray(x))

        return call

    def __call__(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Feature map, gradient of the score with respect to it, and the score itself.

        Args:
            inputs: (N, H, W, 3) float32, already preprocessed for the model.

        Returns:
            (A, dS/dA, S): two (N, h, w, C) float32 arrays and the (N,) float32 scores (the
            logits when :attr:`uses_logit`, else the model's first output unit); one forward
            pass gives all three (:meth:`probabilities` turns S into the model's prediction).
        """
        a, grad, score = self._step(np.asarray(inputs, dtype=np.float32))
        return _numpy(a), _numpy(grad), _numpy(score).reshape(-1)

    def probabilities(self, scores: np.ndarray) -> np.ndarray:
        """(N,) float32 probabilities from the step's scores: sigmoid of the logits when
        :attr:`uses_logit` (as the model's own Dense(sigmoid) computes them), else the scores,
        which are then the model's output already."""
        z = np.asarray(scores, dtype=np.float64)
        if not self.uses_logit:
            return z.astype(np.float32)
        return (0.5 * (1.0 + np.tanh(0.5 * z))).astype(np.float32)  # the sigmoid, without overflow in exp


def _numpy(tensor: Any) -> np.ndarray:
    """A backend tensor as a float32 NumPy array (``.numpy()`` for TensorFlow: no copy-keyword deprecation warning)."""
    value = tensor.numpy() if hasattr(tensor, "numpy") else tensor
    return np.asarray(value, dtype=np.float32)


_GRAD_CAMS: weakref.WeakKeyDictionary[Any, dict[str, GradCam]] = weakref.WeakKeyDictionary()
_GRAD_CAMS_LOCK = threading.Lock()


def grad_cam_for(model: keras.Model, layer_name: str) -> GradCam:
    """The cached :class:`GradCam` of (model, layer), built on first use.

    The cache holds the model weakly: a model that is no longer used elsewhere is freed
    together with its Grad-CAM sub-models.
    """
    with _GRAD_CAMS_LOCK:
        per_model = _GRAD_CAMS.setdefault(model, {})
        cam = per_model.get(layer_name)
        if cam is None:
            cam = per_model[layer_name] = GradCam(model, layer_name)
        return cam


def cams_from(features: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """Combine feature maps and gradients into normalised Grad-CAM maps.

    Args:
        features: (N, h, w, C) float feature maps A.
        grads: (N, h, w, C) float gradients dS/dA.

    Returns:
        (N, h, w) float32 in [0, 1]: ReLU(sum_c mean_hw(dS/dA_c) * A_c), divided by its
        per-image maximum. A map with no positive value (or only non-finite ones) is all
        zeros, never NaN.
    """
    a = np.nan_to_num(np.asarray(features, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    g = np.nan_to_num(np.asarray(grads, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    weights = g.mean(axis=(1, 2))  # (N, C): each channel's importance
    cam = np.maximum(np.einsum("nhwc,nc->nhw", a, weights), 0.0)
    peak = cam.max(axis=(1, 2), keepdims=True)
    usable = np.isfinite(peak) & (peak > 0.0)
    cam = np.where(usable, cam / np.where(usable, peak, 1.0), 0.0)
    return np.clip(np.nan_to_num(cam, nan=0.0), 0.0, 1.0).astype(np.float32)


def gradcam_with_probabilities(
    model: keras.Model, inputs: np.ndarray, layer_name: str, batch_size: int = BATCH_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM heatmaps of the metastasis score, and the model's probabilities, from one pass.

    The Grad-CAM step runs the whole forward pass to reach the score it differentiates, so
    the prediction costs nothing more: the probability is the sigmoid of that logit (or the
    output itself, see :attr:`GradCam.uses_logit`).

    Args:
        model: a Keras functional model with one sigmoid output (e.g. from ``build_model``).
        inputs: (N, H, W, 3) float32, already preprocessed (``preprocess.to_model_input``).
        layer_name: the target layer, e.g. ``BACKBONES[name].last_conv_layer``.
        batch_size: images per forward pass.

    Returns:
        (maps, probabilities): (N, h, w) float32 in [0, 1] at the layer's spatial resolution
        (all zeros where the layer has no positive evidence), and (N,) float32, the model's
        prediction (output unit 0) for each input.
    """
    data = np.asarray(inputs, dtype=np.float32)
    if data.ndim != 4 or data.shape[-1] != 3:
        raise ValueError(f"inputs must be (N, H, W, 3), got shape {data.shape}")
    cam = grad_cam_for(model, layer_name)
    maps, probabilities = [], []
    for start in range(0, len(data), max(1, int(batch_size))):
        features, grads, scores = cam(data[start : start + max(1, int(batch_size))])
        maps.append(cams_from(features, grads))
        probabilities.append(cam.probabilities(scores))
    if not maps:
        h, w = (int(v or 0) for v in model.get_layer(layer_name).output.shape[1:3])
        return np.zeros((0, h, w), dtype=np.float32), np.zeros((0,), dtype=np.float32)
    return np.concatenate(maps, axis=0), np.concatenate(probabilities, axis=0)


def gradcam(model: keras.Model, inputs: np.ndarray, layer_name: str, batch_size: int = BATCH_SIZE) -> np.ndarray:
    """Grad-CAM heatmaps of the metastasis score at one convolutional layer: the maps of
    :func:`gradcam_with_probabilities` (same arguments), (N, h, w) float32 in [0, 1]."""
    return gradcam_with_probabilities(model, inputs, layer_name, batch_size)[0]


# --- geometry: from the model's frame back onto the image -------------------------------------

def _resize(values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 2-D float map to (rows, cols)."""
    rows, cols = int(shape[0]), int(shape[1])
    data = np.asarray(values, dtype=np.float32)
    if data.shape == (rows, cols):
        return data.copy()
    return np.asarray(Image.fromarray(data, mode="F").resize((cols, rows), Image.Resampling.BILINEAR), dtype=np.float32)


def to_image_geometry(heatmap: np.ndarray, size: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """Map a heatmap over the model's (H, W) frame back onto the original image.

    Args:
        heatmap: (h, w) float map covering the whole (H, W) frame, padding included (a
            Grad-CAM map at the conv layer's resolution, or one already at (H, W)).
        size: (H, W) of the frame the image was fitted into (``preprocess.fit_to``).
        shape: (H0, W0) of the original image.

    Returns:
        (H0, W0) float32 in [0, 1]: the frame map resized to (H, W), the padding cut away
        (``content_box``), the content resized to (H0, W0), bilinear throughout.
    """
    frame = _resize(heatmap, size)
    top, left, height, width = content_box((int(shape[0]), int(shape[1])), (int(size[0]), int(size[1])))
    content = frame[top : top + height, left : left + width]
    return np.clip(_resize(content, shape), 0.0, 1.0).astype(np.float32)


def to_view_geometries(
    heatmap: np.ndarray,
    size: tuple[int, int],
    anterior_shape: tuple[int, int] | None,
    posterior_shape: tuple[int, int] | None,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Map a heatmap over a composite frame (``compose_views``) back onto each view.

    Args:
        heatmap: (h, w) float map covering the whole (H, W) composite frame.
        size: (H, W) of the composite: anterior in the left W // 2 columns, posterior in
            the other W - W // 2.
        anterior_shape: (H0, W0) of the anterior image, or None if it was missing.
        posterior_shape: likewise for the posterior image.

    Returns:
        (anterior map, posterior map): each (H0, W0) float32 in [0, 1] on its own view's
        geometry, or None for a missing view.
    """
    height, width = int(size[0]), int(size[1])
    frame = _resize(heatmap, (height, width))
    half = width // 2
    halves = ((frame[:, :half], anterior_shape), (frame[:, half:], posterior_shape))
    out = [None if shape is None else to_image_geometry(part, part.shape, shape) for part, shape in halves]
    return out[0], out[1]


def _check_size(model: keras.Model, image_size: tuple[int, int]) -> tuple[int, int]:
    size = (int(image_size[0]), int(image_size[1]))
    expected = tuple(model.inputs[0].shape[1:3])
    if None not in expected and expected != size:
        raise ValueError(f"the model takes {expected[0]}x{expected[1]} images, not {size[0]}x{size[1]}; pass its image_size")
    return size


def heatmap_for_image(
    model: keras.Model,
    backbone: str | Backbone,
    pixels: np.ndarray,
    image_size: tuple[int, int] = DEFAULT_SIZE,
    layer_name: str | None = None,
) -> np.ndarray:
    """Grad-CAM of one stored image, on that image's own geometry.

    Args:
        model: the classifier (input (None, H, W, 3) preprocessed for ``backbone``).
        backbone: whose ``preprocess_input`` and ``last_conv_layer`` apply.
        pixels: (H0, W0) raw counts, any numeric dtype, as stored.
        image_size: (H, W) the model takes.
        layer_name: target layer; default ``backbone.last_conv_layer``.

    Returns:
        (H0, W0) float32 in [0, 1]. Values are relative to the maximum over the whole model
        frame, so a map whose evidence lies in the padding stays faint here.
    """
    return _explain_per_image(model, backbone, [pixels], image_size, layer_name)[0][0]


def heatmaps_for_composite(
    model: keras.Model,
    backbone: str | Backbone,
    anterior: np.ndarray | None,
    posterior: np.ndarray | None,
    image_size: tuple[int, int] = DEFAULT_SIZE,
    layer_name: str | None = None,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Grad-CAM of one composite sample (both views side by side), mapped onto each view.

    Args:
        anterior: (H0, W0) raw counts of the anterior view, or None.
        posterior: (H1, W1) raw counts of the posterior view, or None.
        (others as :func:`heatmap_for_image`.)

    Returns:
        (anterior map, posterior map): float32 in [0, 1] on each view's geometry, None for
        a missing view.
    """
    front, back, _ = _explain_composites(model, backbone, [(anterior, posterior)], image_size, layer_name)[0]
    return front, back


def _frames_gradcam(
    model: keras.Model, bb: Backbone, frames: list[np.ndarray], layer_name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Maps (N, h, w) and probabilities (N,) of grey (H, W) frames in [0, 1], ``BATCH_SIZE``
    frames per forward pass (and per ``to_model_input``, which bounds the 3-channel copy)."""
    step = max(1, BATCH_SIZE)
    parts = [
        gradcam_with_probabilities(model, to_model_input(np.stack(frames[start : start + step]), bb), layer_name, step)
        for start in range(0, len(frames), step)
    ]
    return np.concatenate([m for m, _ in parts], axis=0), np.concatenate([p for _, p in parts], axis=0)


def _explain_per_image(
    model: keras.Model,
    backbone: str | Backbone,
    images: list[np.ndarray],
    image_size: tuple[int, int],
    layer_name: str | None = None,
) -> list[tuple[np.ndarray, float]]:
    """(heatmap on the image's geometry, probability) of each (H0, W0) raw image, batched."""
    bb = get_backbone(backbone)
    size = _check_size(model, image_size)
    maps, probabilities = _frames_gradcam(model, bb, [prepare_image(p, size) for p in images], layer_name or bb.last_conv_layer)
    return [(to_image_geometry(cam, size, p.shape), float(prob)) for cam, prob, p in zip(maps, probabilities, images, strict=True)]


def _explain_composites(
    model: keras.Model,
    backbone: str | Backbone,
    pairs: list[tuple[np.ndarray | None, np.ndarray | None]],
    image_size: tuple[int, int],
    layer_name: str | None = None,
) -> list[tuple[np.ndarray | None, np.ndarray | None, float]]:
    """(anterior map, posterior map, probability) of each composite sample (anterior,
    posterior raw images, either may be None), batched; one probability per sample."""
    bb = get_backbone(backbone)
    size = _check_size(model, image_size)
    frames = [compose_views(front, back, size) for front, back in pairs]
    maps, probabilities = _frames_gradcam(model, bb, frames, layer_name or bb.last_conv_layer)
    out = []
    for cam, prob, (front, back) in zip(maps, probabilities, pairs, strict=True):
        front_map, back_map = to_view_geometries(
            cam, size, None if front is None else front.shape, None if back is None else back.shape
        )
        out.append((front_map, back_map, float(prob)))
    return out


# --- display ---------------------------------------------------------------------------------------

def _turbo_lut() -> np.ndarray:
    """(256, 3) uint8 "turbo"-like rainbow: dark blue → cyan → green → yellow → red.

    Polynomial fit of Google's Turbo colour map (A. Mikhailov, 2019), evaluated once;
    perceptually smoother than jet and readable for colour-blind viewers at its ends.
    """
    x = np.linspace(0.0, 1.0, 256)
    r = 0.13572138 + x * (4.61539260 + x * (-42.66032258 + x * (132.13108234 + x * (-152.94239396 + x * 59.28637943))))
    g = 0.09140261 + x * (2.19418839 + x * (4.84296658 + x * (-14.18503333 + x * (4.27729857 + x * 2.82956604))))
    b = 0.10667330 + x * (12.64194608 + x * (-60.58204836 + x * (110.36276771 + x * (-89.90310912 + x * 27.34824973))))
    return (np.clip(np.stack([r, g, b], axis=1), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


TURBO = _turbo_lut()


def colorize(heatmap: np.ndarray) -> np.ndarray:
    """(H, W) float heatmap in [0, 1] → (H, W, 3) uint8 RGB through :data:`TURBO`."""
    index = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float32)), 0.0, 1.0) * 255.0 + 0.5
    return TURBO[index.astype(np.intp)]


def overlay(
    pixels: np.ndarray,
    heatmap: np.ndarray,
    opacity: float = DEFAULT_OPACITY,
    upper: float | None = None,
    gamma: float = 1.0,
) -> np.ndarray:
    """The scan as a reader sees it, with the heatmap blended in where it is high.

    Args:
        pixels: (H, W) raw counts, any numeric dtype.
        heatmap: (H, W) float in [0, 1] on the same geometry (``heatmap_for_image``).
        opacity: colour weight where the heatmap is 1, in [0, 1]; 0 gives the plain display.
        upper: display window top in counts (``pixelstore.to_display``); default its 99.5th
            percentile.
        gamma: display gamma (``pixelstore.to_display``).

    Returns:
        (H, W, 3) uint8 RGB: the inverted grey NM display (hot = black), mixed per pixel with
        the turbo colour of the heatmap by alpha = opacity * heatmap, so regions the model
        ignored stay untouched and readable.
    """
    heat = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float32)), 0.0, 1.0)
    if heat.shape != pixels.shape:
        raise ValueError(
            f"heatmap shape {heat.shape} differs from the image's {pixels.shape}; map it onto the image first "
            "(heatmap_for_image / to_image_geometry)"
        )
    if not 0.0 <= opacity <= 1.0:
        raise errors.InputError(f"opacity must be in [0, 1], got {opacity}")
    grey = pixelstore.to_display(pixels, upper=upper, gamma=gamma).astype(np.float32)[..., None]
    alpha = (np.float32(opacity) * heat)[..., None]
    mixed = (1.0 - alpha) * grey + alpha * colorize(heat).astype(np.float32)
    return np.clip(mixed + 0.5, 0.0, 255.0).astype(np.uint8)


# --- run models ------------------------------------------------------------------------------------

_MODELS: collections.OrderedDict[tuple[Any, ...], Any] = collections.OrderedDict()
_MODELS_LOCK = threading.Lock()


def clear_model_cache() -> None:
    """Forget every loaded run model (e.g. after replacing a file by hand)."""
    with _MODELS_LOCK:
        _MODELS.clear()


def _run_record(db_path: str | os.PathLike[str], run: int | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(run, Mapping):
        record = dict(run)
    else:
        with dbm.opened(db_path) as database:
            record = jobs.get_run(database, int(run))
    config = record.get("config") or {}
    record["config"] = json.loads(config) if isinstance(config, str) else dict(config)
    return record


def load_run_model(db_path: str | os.PathLike[str], run: int | Mapping[str, Any]) -> tuple[keras.Model, Backbone, tuple[int, int]]:
    """Load a finished run's saved model (``runs/<weights_path>`` beside the database).

    The file is checked against ``runs.weights_sha256`` when recorded, and loaded with
    ``keras.saving.load_model(path, compile=False, safe_mode=True)`` (no code from the file
    runs). Loaded models are cached in this process (at most ``MODEL_CACHE_SIZE``), keyed by
    path, size and modification time: a replaced file is loaded (and checked) again.

    Args:
        db_path: the database file; models live in ``runs/`` beside it.
        run: a run id, or a run row as a dict (``jobs.get_run``; ``config`` decoded or JSON).

    Returns:
        (model, backbone, image_size): the Keras model, its :class:`Backbone` and the (H, W)
        it takes.

    Raises:
        errors.RunNotFound: no such run (when given an id).
        ModelUnavailable: the run saved no model, or its file is missing, does not match its
            checksum, cannot be loaded, or is not a classifier of the run's backbone.
    """
    record = _run_record(db_path, run)
    run_id = record.get("id")
    config = record["config"]
    bb = get_backbone(config.get("backbone") or record.get("backbone"))
    image_size = tuple(int(v) for v in config.get("image_size") or DEFAULT_SIZE)
    weights_path = record.get("weights_path")
    if not weights_path:
        raise ModelUnavailable(
            f"run {run_id} has no saved model (status {record.get('status')}): only finished runs can be explained; "
            "wait for it to finish, or train it again"
        )
    folder = jobs.runs_dir(Path(db_path))
    path = (folder / weights_path).resolve()
    if not path.is_relative_to(folder):
        raise ModelUnavailable(f"run {run_id}'s model path {weights_path!r} points outside {folder}; train the run again")
    try:
        stat = path.stat()
    except OSError:
        raise ModelUnavailable(
            f"the model file of run {run_id} is missing ({path}); restore runs/{weights_path} from a backup, or train the run again"
        ) from None
    expected = record.get("weights_sha256")
    key = (str(path), stat.st_size, stat.st_mtime_ns, expected)
    with _MODELS_LOCK:
        if key in _MODELS:
            _MODELS.move_to_end(key)
            return _MODELS[key], bb, image_size
        if expected:
            actual = file_sha256(path)
            if actual != expected:
                raise ModelUnavailable(
                    f"the model file of run {run_id} ({path}) does not match its recorded checksum "
                    f"(sha256 {actual[:12]}..., expected {expected[:12]}...): it was changed or corrupted; "
                    "restore the original file, or train the run again"
                )
        keras = keras_module()
        try:
            model = keras.saving.load_model(str(path), compile=False, safe_mode=True)
        except Exception as error:  # Keras raises many types (ValueError, OSError, zipfile.BadZipFile, ...)
            raise ModelUnavailable(
                f"the model file of run {run_id} ({path}) cannot be loaded ({type(error).__name__}: {error}); "
                "it may be corrupted or written by an incompatible version: restore the file, or train the run again"
            ) from None
        try:
            model.get_layer(bb.last_conv_layer)
        except ValueError:
            raise ModelUnavailable(
                f"the model file of run {run_id} ({path}) is not a {bb.name} classifier (no layer {bb.last_conv_layer!r}); "
                "restore the run's own file, or train the run again"
            ) from None
        _MODELS[key] = model
        while len(_MODELS) > MODEL_CACHE_SIZE:
            _MODELS.popitem(last=False)
        return model, bb, image_size


# --- explanations of stored images -----------------------------------------------------------------

def cached_heatmap(db: sqlite_utils.Database, run_id: int, image_id: int) -> np.ndarray | None:
    """The stored heatmap of (run, image) as (H0, W0) float32 in [0, 1], or None if not computed yet."""
    row = db.execute("SELECT heatmap FROM explanations WHERE run_id = ? AND image_id = ?", [run_id, image_id]).fetchone()
    return None if row is None else pixelstore.decode_pixels(row[0]).astype(np.float32)


def _pixels(db: sqlite_utils.Database, image_id: int) -> np.ndarray:
    row = db.execute("SELECT pixels FROM images WHERE id = ?", [image_id]).fetchone()
    if row is None:
        raise errors.ImageNotFound(f"image {image_id} does not exist; list them with `bonescan images --json`")
    return pixelstore.decode_pixels(row[0])


def _composite_members(db: sqlite_utils.Database, run_id: int, image_id: int) -> dict[str, int]:
    """{slot: image id} of the composite sample (as training built it) that holds ``image_id``."""
    study_id = db.execute("SELECT study_id FROM images WHERE id = ?", [image_id]).fetchone()[0]
    for sample in list_samples(db, {study_id: 0}, "composite"):
        if image_id in sample.image_ids:
            return dict(zip(sample.views, sample.image_ids, strict=True))
    raise errors.InputError(
        f"run {run_id} is a composite run and image {image_id} is not one of the two views it uses for study {study_id} "
        "(the first anterior and the first posterior image); explain one of those instead"
    )


@dataclass(frozen=True)
class Explained:
    """One image explained under one run (:func:`explain_images`).

    Attributes:
        heatmap: (H0, W0) float32 in [0, 1] on the image's own geometry, at the float16
            precision it is stored with (the same values whether computed now or cached).
        probability: the run model's probability of metastasis for the image, from the same
            forward pass as the map (for a composite run: the probability of the study's
            composite sample, the same for both views); None when the map came from the
            ``explanations`` cache, which stores maps only (the run's ``predictions`` hold
            what training predicted).
    """

    heatmap: np.ndarray
    probability: float | None


def explain_images(
    db: sqlite_utils.Database, db_path: str | os.PathLike[str], run_id: int, image_ids: Iterable[int]
) -> dict[int, Explained]:
    """Grad-CAM maps and probabilities of several stored images under one run, in batched passes.

    Maps already in ``explanations`` are read from there (no model is loaded if all are).
    The others are computed together: each image prepared as training prepares it, then
    ``BATCH_SIZE`` images per Grad-CAM pass, whose forward pass also gives the probability
    (:func:`gradcam_with_probabilities`), each map put back on its image's geometry; all of
    them are stored in ``explanations`` (float16) in one write. For a composite run each
    sample (a study's two views side by side) is one input: both of its maps are stored,
    also for a view not asked for, and both views get the sample's probability.

    Args:
        db: an open database.
        db_path: its file (the run's model is in ``runs/`` beside it).
        run_id: a finished run.
        image_ids: images of the database (a repeated id is explained once).

    Returns:
        {image id: :class:`Explained`} for every id asked for, in the order given.

    Raises:
        errors.RunNotFound: no such run.
        errors.ImageNotFound: no such image.
        ModelUnavailable: the run's model cannot be loaded (see :func:`load_run_model`).
        ValueError: a composite run does not use one of the images.
    """
    wanted = list(dict.fromkeys(int(image_id) for image_id in image_ids))
    found: dict[int, Explained] = {}
    for image_id in wanted:
        cached = cached_heatmap(db, run_id, image_id)
        if cached is not None:
            found[image_id] = Explained(cached, None)
    missing = [image_id for image_id in wanted if image_id not in found]
    if missing:
        run = jobs.get_run(db, run_id)
        pixels = {image_id: _pixels(db, image_id) for image_id in missing}
        if run["config"].get("view_mode", "per_image") == "composite":
            samples = list(dict.fromkeys(
                tuple(sorted(_composite_members(db, run_id, image_id).items())) for image_id in missing
            ))
            model, bb, size = load_run_model(db_path, run)
            views = [{slot: pixels[member] if member in pixels else _pixels(db, member) for slot, member in sample}
                     for sample in samples]
            computed: dict[int, tuple[np.ndarray, float]] = {}
            for sample, (front, back, probability) in zip(
                samples, _explain_composites(model, bb, [(v.get("anterior"), v.get("posterior")) for v in views], size),
                strict=True,
            ):
                members = dict(sample)
                for slot, heat in (("anterior", front), ("posterior", back)):
                    if heat is not None:
                        computed[members[slot]] = (heat, probability)
        else:
            model, bb, size = load_run_model(db_path, run)
            computed = dict(zip(missing, _explain_per_image(model, bb, [pixels[i] for i in missing], size), strict=True))
        rows = [
            {"run_id": run_id, "image_id": member, "heatmap": pixelstore.encode_pixels(heat.astype(np.float16))}
            for member, (heat, _) in computed.items()
        ]
        with dbm.write(db):
            # Another process may have stored the same map meanwhile: same inputs, same map.
            db["explanations"].insert_all(rows, replace=True)
        for member, (heat, probability) in computed.items():
            if member in wanted:
                found[member] = Explained(heat.astype(np.float16).astype(np.float32), probability)
    return {image_id: found[image_id] for image_id in wanted}


def explain_image(
    db: sqlite_utils.Database, db_path: str | os.PathLike[str], run_id: int, image_id: int
) -> np.ndarray:
    """The Grad-CAM heatmap of one stored image under one run, computed once and cached.

    The first call loads the run's model (:func:`load_run_model`), computes the map and
    stores it in ``explanations`` (float16); later calls read it from there. For a composite
    run, both views of the sample are explained by one forward pass and both maps stored.
    The heatmap of :func:`explain_images` for this one image.

    Args:
        db: an open database.
        db_path: its file (the run's model is in ``runs/`` beside it).
        run_id: a finished run.
        image_id: an image of the database.

    Returns:
        (H0, W0) float32 in [0, 1] on the image's own geometry (float16 precision, the
        same values on every call).

    Raises:
        errors.RunNotFound: no such run.
        errors.ImageNotFound: no such image.
        ModelUnavailable: the run's model cannot be loaded (see :func:`load_run_model`).
        ValueError: a composite run does not use this image.
    """
    return explain_images(db, db_path, run_id, [image_id])[int(image_id)].heatmap


def explain_png(
    db: sqlite_utils.Database,
    db_path: str | os.PathLike[str],
    run_id: int,
    image_id: int,
    out_path: str | os.PathLike[str],
    opacity: float = DEFAULT_OPACITY,
) -> Path:
    """Write the Grad-CAM overlay of one image as an RGB PNG (``bonescan explain RUN IMAGE --out FILE``).

    Args:
        out_path: the PNG to write (its folder must exist).
        opacity: colour weight where the heatmap is 1, in [0, 1].
        (others as :func:`explain_image`.)

    Returns:
        The path written. The image keeps its stored geometry (H0 x W0 pixels).
    """
    heatmap = explain_image(db, db_path, run_id, image_id)
    pixels = _pixels(db, image_id)
    path = Path(out_path)
    Image.fromarray(overlay(pixels, heatmap, opacity=opacity), mode="RGB").save(path, format="PNG")
    return path


__all__ = [
    "DEFAULT_OPACITY",
    "Explained",
    "GradCam",
    "ModelUnavailable",
    "TURBO",
    "cached_heatmap",
    "cams_from",
    "clear_model_cache",
    "colorize",
    "explain_image",
    "explain_images",
    "explain_png",
    "grad_cam_for",
    "gradcam",
    "gradcam_with_probabilities",
    "heatmap_for_image",
    "heatmaps_for_composite",
    "load_run_model",
    "overlay",
    "to_image_geometry",
    "to_view_geometries",
]
