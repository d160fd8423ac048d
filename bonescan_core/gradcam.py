"""Grad-CAM: where in an image a trained classifier found its evidence, as pure computation.

Model and a preprocessed batch in, maps and probabilities out: no database, no files.
Mapping a map back onto a stored image is ``preprocess.to_image_geometry``; explaining the
images of a run, with its cache, is :mod:`bonescan_core.explain`.

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

Keras (and TensorFlow or JAX) is imported only when a model is used.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np

from bonescan_core.heavy import jax_module, keras_module, tensorflow_module

if TYPE_CHECKING:  # pragma: no cover - typing only; keras is imported lazily
    import keras

BATCH_SIZE = 8  # images per forward pass: bounds memory for large N


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
        tf = tensorflow_module()

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
        jax = jax_module()
        jnp = jax.numpy

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
    channel_weights = g.mean(axis=(1, 2))  # (N, C): each channel's importance
    cam = np.maximum(np.einsum("nhwc,nc->nhw", a, channel_weights), 0.0)
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
        inputs: (N, H, W, 3) float32, already preprocessed (``preprocess.to_model_input``);
            or (N, 2, H, W, 3) for a dual-view fusion model (``models.build_model(views=2)``).
        layer_name: the target layer, e.g. ``BACKBONES[name].last_conv_layer``.
        batch_size: inputs per forward pass.

    Returns:
        (maps, probabilities): (N, h, w) float32 in [0, 1] at the layer's spatial resolution
        (all zeros where the layer has no positive evidence), and (N,) float32, the model's
        prediction (output unit 0) for each input. For a fusion model the maps are (2N, h, w),
        each study's anterior then posterior (mirrored, as the model saw it) view, each
        the gradient of the study's one score.
    """
    data = np.asarray(inputs, dtype=np.float32)
    if data.ndim not in (4, 5) or data.shape[-1] != 3 or (data.ndim == 5 and data.shape[1] != 2):
        raise ValueError(f"inputs must be (N, H, W, 3) or (N, 2, H, W, 3), got shape {data.shape}")
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
