"""``scintinet``: a small fully convolutional network for planar whole-body bone scans, trained from scratch.

Why it is shaped as it is: ``docs/scintinet.md``. In short, a bone-scan metastasis is a small
focal hot spot (3-10 px at 1024 x 256) that is 1.5-4 x brighter than the bone around it, and a
scan is positive if ANY place shows one. So the network

1. scales each image by its own 99.5th percentile inside the model (counts differ by patient,
   dose and acquisition time; a saved model takes any positive scale of the counts);
2. reads every full-resolution pixel in its first layer (a 5 x 5 convolution of stride 2) and
   then halves the resolution with max pooling, which keeps a 1-3 px hot spot alive where
   striding or averaging would dilute it;
3. looks at "local bone" (receptive field ~160 px at 1024 x 256: a vertebra and its
   neighbours, a few ribs, both knees) with plain 3 x 3 convolutions, GroupNorm (statistics
   per image, so batch size 1-16 and inference behave the same) and ReLU;
4. turns the last feature map (stride 16) into a 1 x 1 **lesion-evidence map** (one logit per
   place) and pools it with a smooth maximum (log-sum-exp, :func:`smooth_max`): the image's
   logit is, within ``log(places) / SHARPNESS``, the strongest evidence anywhere, and unlike a
   hard maximum every place gets a gradient (a hard max trains one place per image per step:
   on 100 demo studies it had not started to learn after 7 epochs).

The graph is one flat Keras functional model built from ``keras.layers`` and ``keras.ops``
only (runs under TensorFlow and JAX; saved and loaded with ``safe_mode=True``, no custom
classes). It fits the app's registry contract (``bonescan_core.models``): input ``image``
(None, H, W, 3) float32 (the app repeats the grey view on three channels; any channel layout of
one grey image works because the channels are averaged), output (None, 1) float32 sigmoid from
``head_dense``, layers ``head_pool`` / ``head_dropout`` / ``head_dense`` present, Grad-CAM on
:data:`LAST_CONV_LAYER` (the input of the evidence map).

Importing this module does not import Keras.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from bonescan_core.heavy import keras_module

if TYPE_CHECKING:  # pragma: no cover - typing only; keras is imported lazily
    import keras

DEFAULT_SIZE: tuple[int, int] = (1024, 256)  # (H, W): one stored view at its own resolution
PERCENTILE = 99.5  # per-image reference intensity: robust to a few hot pixels, above most bone
SAMPLE = 4  # the percentile is taken on every 4th pixel in both axes (a 1/16 sample)
CLIP = 4.0  # after scaling: lesions up to ~4 x bone stay distinct, a bladder or injection site saturates
# The stem: (filters, kernel, stride). A strided 5 x 5 convolution reads every full-resolution pixel
# (kernel > stride) but writes a half-resolution map: no full-size activation map is ever stored.
STEM: tuple[int, int, int] = (16, 5, 2)
# (filters, convolutions, dilation of the last one) per stage; a 2 x 2 max pool precedes each stage.
STAGES: tuple[tuple[int, int, int], ...] = ((32, 2, 1), (64, 2, 1), (128, 2, 2))
SHARPNESS = 1.0  # log-sum-exp pooling: weights places by exp(SHARPNESS * logit); large → hard max, small → mean
LAST_CONV_LAYER = "features"  # the stride-16 feature map the evidence map reads; Grad-CAM's target
N_FEATURES = STAGES[-1][0]


def robust_scale(image: Any, percentile: float = PERCENTILE, clip: float = CLIP) -> Any:
    """Per-image intensity scaling in Keras ops: divide by the image's own ``percentile``, clip.

    Args:
        image: (N, H, W, C) float tensor (or KerasTensor), counts of any non-negative scale;
            the C channels are averaged into one grey image first.
        percentile: the reference level, the value that ``100 - percentile`` % of the pixels
            reach, estimated on a regular 1-in-:data:`SAMPLE` x :data:`SAMPLE` pixel grid
            (with ``top_k``, cheaper than a sort; all pixels for images under 32 px a side).
        clip: upper bound after scaling.

    Returns:
        (N, H, W, 1) float32 in [0, clip]. Invariant to a positive factor on ``image`` (up to
        float rounding): the reference scales with it. An image whose percentile is 0 (mostly
        empty) is scaled by 1 % of its maximum instead; an all-zero image stays zero.
    """
    ops = keras_module().ops
    grey = ops.mean(ops.cast(image, "float32"), axis=-1, keepdims=True)
    # The percentile of every SAMPLE-th pixel in both axes: at 1024 x 256 a 16 k-pixel sample, whose
    # top_k is ~16 x cheaper than that of all 262 k pixels (which cost a third of a forward pass).
    sample = grey[:, ::SAMPLE, ::SAMPLE, 0] if min(grey.shape[1], grey.shape[2]) >= 8 * SAMPLE else grey[..., 0]
    height, width = int(sample.shape[1]), int(sample.shape[2])
    k = max(1, math.ceil(height * width * (100.0 - percentile) / 100.0))
    top, _ = ops.top_k(ops.reshape(sample, (-1, height * width)), k, sorted=True)  # (N, k), largest first
    reference = ops.maximum(top[:, -1], 0.01 * top[:, 0])
    reference = ops.reshape(ops.maximum(reference, 1e-30), (-1, 1, 1, 1))  # 1e-30: only an all-zero image hits it
    return ops.clip(grey / reference, 0.0, clip)


def smooth_max(evidence: Any, sharpness: float = SHARPNESS) -> Any:
    """Log-sum-exp pooling of an evidence map, in Keras ops: a maximum that every place contributes to.

    Args:
        evidence: (N, h, w, 1) float logits (static h, w).
        sharpness: r in ``(logsumexp(r * s) - log(h * w)) / r``.

    Returns:
        (N, 1) float32, between the mean and the maximum of each map; at most
        ``log(h * w) / sharpness`` below the maximum. Its gradient weights each place by its
        softmax share, so a scan's label reaches every place that might hold its lesion.
    """
    ops = keras_module().ops
    places = int(evidence.shape[1]) * int(evidence.shape[2])
    flat = ops.reshape(ops.cast(evidence, "float32"), (-1, places))  # float32: exp under mixed precision
    return (ops.logsumexp(sharpness * flat, axis=1, keepdims=True) - math.log(places)) / sharpness


def build(image_size: tuple[int, int] = DEFAULT_SIZE, dropout: float = 0.3, seed: int = 0,
          sharpness: float = SHARPNESS, views: int = 1) -> keras.Model:
    """Build an untrained scintinet (random weights, seeded).

    Args:
        image_size: (H, W) of the input; at least 32 x 32. Any size works (the network is fully
            convolutional, "same" padding); 1024 x 256 is the stored view size it is designed for.
        dropout: rate of ``head_dropout``, a channel dropout on the feature map before the
            evidence map (a dropout on the single pooled value would only add noise).
        seed: seeds every initialiser and the dropout; call ``keras.utils.set_random_seed``
            before as well for full reproducibility.
        sharpness: of the log-sum-exp pooling (:func:`smooth_max`).
        views: 1 (one image a sample) or 2 (dual-view fusion, ``view_mode="fusion"``: the
            input is (None, 2, H, W, 3), anterior then the mirrored posterior view; both go
            through the same layers (shared weights), each gets its own evidence map, and
            the smooth maximum runs over the places of both maps, so a lesion in either
            view makes the study positive).

    Returns:
        A ``keras.Model`` named ``bonescan_scintinet``: input ``image`` (None, H, W, 3) float32
        (with ``views=2``: (None, 2, H, W, 3), and ``features`` / ``evidence`` hold 2 rows per study)
        (raw counts or the app's 0..255, any positive scale); output (None, 1) float32, the
        probability of metastasis. Layers: :func:`robust_scale` ops, ``stem``/``stageK_convJ`` Conv2D with
        ``*_norm`` GroupNorm and ReLU, ``poolK`` MaxPooling2D, ``features`` (last ReLU, the
        (None, H/16, W/16, 128) map), ``head_dropout``, ``evidence`` (1 x 1 Conv2D → (None,
        H/16, W/16, 1) logits), :func:`smooth_max` ops and ``head_pool`` (an Identity layer
        naming its (None, 1) result), ``head_dense`` (Dense(1, sigmoid), kernel 1 and bias 0
        at start: the pooled evidence is the logit).
    """
    keras = keras_module()
    layers = keras.layers
    height, width = (int(v) for v in image_size)
    if height < 32 or width < 32:
        raise ValueError(f"image size {height}x{width} is too small: scintinet needs at least 32x32")
    if views not in (1, 2):
        raise ValueError(f"views must be 1 or 2, not {views}")
    shape = (height, width, 3) if views == 1 else (2, height, width, 3)
    inputs = keras.Input(shape=shape, dtype="float32", name="image")
    # Fusion: the views become consecutive rows of the batch, so every layer is shared by both.
    x = robust_scale(inputs if views == 1 else keras.ops.reshape(inputs, (-1, height, width, 3)))
    counter = iter(range(10_000))

    def init() -> Any:
        return keras.initializers.HeNormal(seed=seed + next(counter))

    def conv_norm_relu(x: Any, filters: int, kernel: int, name: str, strides: int = 1, dilation: int = 1,
                       relu_name: str | None = None) -> Any:
        x = layers.Conv2D(filters, kernel, strides=strides, padding="same", dilation_rate=dilation, use_bias=False,
                          kernel_initializer=init(), name=name)(x)
        # Groups of 8 channels: statistics per image, so batch size and inference do not matter.
        x = layers.GroupNormalization(groups=max(1, filters // 8), name=f"{name}_norm")(x)
        return layers.Activation("relu", name=relu_name or f"{name}_relu")(x)

    filters, kernel, stride = STEM
    x = conv_norm_relu(x, filters, kernel, "stem", strides=stride)
    for stage, (filters, n_convs, dilation) in enumerate(STAGES, start=1):
        # Max, not mean or stride: a 1-3 px hot spot survives the halving at full strength.
        x = layers.MaxPooling2D(2, padding="same", name=f"pool{stage}")(x)
        for index in range(n_convs):
            last_of_stage = index == n_convs - 1
            x = conv_norm_relu(x, filters, 3, f"stage{stage}_conv{index + 1}", dilation=dilation if last_of_stage else 1,
                               relu_name=LAST_CONV_LAYER if last_of_stage and stage == len(STAGES) else None)
    x = layers.SpatialDropout2D(dropout, seed=seed, name="head_dropout")(x)
    evidence = layers.Conv2D(1, 1, kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 1), name="evidence")(x)
    if views == 2:  # (2N, h, w, 1) → (N, 2h, w, 1): a study's two evidence maps stacked, pooled together
        h, w = int(evidence.shape[1]), int(evidence.shape[2])
        evidence = keras.ops.reshape(evidence, (-1, 2 * h, w, 1))
    pooled = layers.Identity(name="head_pool")(smooth_max(evidence, sharpness))
    outputs = layers.Dense(1, activation="sigmoid", dtype="float32", name="head_dense",  # float32 under mixed precision
                           kernel_initializer="ones", bias_initializer="zeros")(pooled)
    return keras.Model(inputs, outputs, name="bonescan_scintinet")
