"""``scintinet``: a small fully convolutional network for planar whole-body bone scans, trained from scratch.

Why it is shaped as it is: ``docs/scintinet.md``. In short, a bone-scan metastasis is a small
focal hot spot (3-10 px at 1024 x 256) that is 1.5-4 x brighter than the bone around it, and a
scan is positive if ANY place shows one. So the network

1. scales each image by its own 99.5th percentile inside the model (counts differ by patient,
   dose and acquisition time; a saved model takes any positive scale of the counts);
1b. adds fixed, non-learned **reader channels** (:func:`reader_channels`): the contrast of each
   place over the local bone around it, its left-right asymmetry and (fusion) the other view's
   contrast at the same place, as a reader compares; the grey image alone left the network at
   chance for 50-300 training steps on the demo phantoms, because the hottest places of a scan
   are not lesions (docs/scintinet.md, "Reader channels");
2. reads every full-resolution pixel in its first layer (a 5 x 5 convolution of stride 2) and
   then halves the resolution with max pooling, which keeps a 1-3 px hot spot alive where
   striding or averaging would dilute it;
3. looks at "local bone" (receptive field ~160 px at 1024 x 256: a vertebra and its
   neighbours, a few ribs, both knees) with plain 3 x 3 convolutions and ReLU, and no
   normalisation layer: GroupNorm's per-image statistics let the network read the whole
   image's lesion burden in the air and the legs, and BatchNorm needs large batches (without
   one, batch size 1-16 and inference behave the same);
4. turns the last feature map (stride 16) into a 1 x 1 **lesion-evidence map** (one logit per
   place; with the reader channels, plus a 1 x 1 convolution of their cell maxima, starting as
   their sum) and pools it with a smooth maximum (log-sum-exp, :func:`smooth_max`): the image's
   logit is, within ``log(places) / SHARPNESS``, the strongest evidence anywhere, and unlike a
   hard maximum every place gets a gradient (a hard max trains one place per image per step:
   on 100 demo studies it had not started to learn after 7 epochs).

The graph is one flat Keras functional model built from ``keras.layers`` and ``keras.ops``
only (runs under TensorFlow and JAX; saved and loaded with ``safe_mode=True``, no custom
classes). It fits the app's registry contract (``bonescan_core.models``): input ``image``
(None, H, W, 3) float32 (the app repeats the grey view on three channels; any channel layout of
one grey image works because the channels are averaged), output (None, 1) float32 sigmoid from
``head_dense``, layers ``head_pool`` / ``head_dropout`` / ``head_dense`` present, Grad-CAM on
:data:`LAST_CONV_LAYER` (the evidence map itself).

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
READER = True  # fixed reader channels in, and pooled to the last stage (docs/scintinet.md, "Reader channels")
SHARPNESS = 1.0  # log-sum-exp pooling: weights places by exp(SHARPNESS * logit); large → hard max, small → mean
# Reader channels (:func:`reader_channels`), in pixels at the nominal 1024 x 256 and scaled with the input height.
SMOOTH = 5  # box filter against Poisson noise before any ratio (odd; 3 at 512 x 128)
RING_RADII: tuple[int, ...] = (8, 16)  # "local bone" = the maximum on a ring this far out: > a lesion's radius (3-10 px)
RING_FLOOR = 0.05  # added to the ring level (in units of the 99.5th percentile): empty background is not a "peak"
CONTRAST_CLIP = 8.0  # point contrast above this (injection sites, bladder edges) saturates
MIRROR_WINDOW: tuple[int, int] = (9, 33)  # tolerance of the left-right comparison: the midline is within ±3 % of the centre
OTHER_VIEW_WINDOW = 9  # the other view's contrast is taken as its maximum this close to the same place
# Grad-CAM's target: the evidence map itself (one logit per stride-16 place). Not `features`: the
# reader cells reach the evidence beside it, so `features` is no cut point of the graph (Grad-CAM
# under JAX needs one) and a map of it would miss the direct reader path. On one channel, Grad-CAM
# is ReLU(evidence) over its maximum: the places that raise the probability of metastasis.
LAST_CONV_LAYER = "evidence"
N_FEATURES = 1


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


def _nominal(pixels: int, height: int, odd: bool = False) -> int:
    """A length quoted in pixels at the nominal height 1024, at ``height`` (at least 1; odd if asked)."""
    n = max(1, round(pixels * height / 1024))
    return n + 1 - n % 2 if odd else n


def _ring_max(x: Any, radius: int) -> Any:
    """(N, H, W, 1) → the maximum of ``x`` at 8 points ``radius`` px away (N, NE, E, ...; zero outside the image)."""
    ops = keras_module().ops
    height, width = int(x.shape[1]), int(x.shape[2])
    padded = ops.pad(x, [[0, 0], [radius, radius], [radius, radius], [0, 0]])
    diagonal = math.ceil(radius / math.sqrt(2.0))  # at least radius away: the ring never cuts into a focus
    out = None
    for dr, dc in ((-radius, 0), (radius, 0), (0, -radius), (0, radius),
                   (-diagonal, -diagonal), (-diagonal, diagonal), (diagonal, -diagonal), (diagonal, diagonal)):
        shifted = padded[:, radius + dr: radius + dr + height, radius + dc: radius + dc + width, :]
        out = shifted if out is None else ops.maximum(out, shifted)
    return out


def reader_channels(scaled: Any, views: int = 1) -> Any:
    """Fixed (non-learned) input channels that look at a bone scan as a reader does, in Keras ops.

    A metastasis in the phantoms (and in patients) is a focus 1.5-4 x brighter than the bone
    around it; a diffusely bright bone, the bladder's interior and a long bone are not foci.
    Degenerative uptake and normal anatomy are near-symmetric, and a real lesion shows in both
    views at the same place. So, from the robustly scaled image ``s``:

    1. ``s`` itself (how bright, in units of the image's 99.5th percentile: an injection site
       or the bladder saturates at :data:`CLIP`);
    2. two **point contrasts**, ``box(s) / (ring_max(box(s), d) + RING_FLOOR)`` for the ring
       radii :data:`RING_RADII` (8 and 16 px at 1024 x 256): the value at a place over the
       highest value 8 points ``d`` away, i.e. over the local bone (the phantoms define a
       lesion's contrast over the local bone maximum in the same way). On a vertebra or a rib
       the ring still lies on bone (ratio ~1); on a focus it lies beside it (ratio 1.5-4 and
       more); clipped at :data:`CONTRAST_CLIP`;
    3. **asymmetry**: the large-ring contrast minus the maximum of its left-right mirror image
       within :data:`MIRROR_WINDOW` (the body's midline is not exactly the image's centre):
       ~0 for a symmetric pair (both knees, both shoulders, facet joints, midline anatomy),
       positive for a one-sided focus;
    4. with ``views=2`` (fusion): the **other view's** large-ring contrast at the same place
       (its maximum within :data:`OTHER_VIEW_WINDOW`; the posterior view arrives mirrored, so
       places match): a lesion's far view shows 50-85 % of its excess.

    Every length is quoted at 1024 x 256 and scaled with the input height, so the channels
    mean the same at 512 x 128. All of it is plain ``keras.ops`` (no weights, nothing to
    register: the model saves and loads with ``safe_mode=True``, also in the standalone bundle).

    Args:
        scaled: (N, H, W, 1) float32 from :func:`robust_scale` (with ``views=2``, N = 2 x studies,
            a study's anterior and mirrored posterior view in consecutive rows).
        views: 1 or 2.

    Returns:
        (N, H, W, 4) float32 (``views=2``: (N, H, W, 5)): s in [0, CLIP], two contrasts in
        [0, CONTRAST_CLIP], asymmetry in [-CONTRAST_CLIP, CONTRAST_CLIP] (and the other view's
        contrast in [0, CONTRAST_CLIP]). Invariant to a positive factor on the counts (``s`` is).
    """
    ops = keras_module().ops
    height, width = int(scaled.shape[1]), int(scaled.shape[2])
    k = _nominal(SMOOTH, height, odd=True)
    smooth = ops.average_pool(scaled, k, strides=1, padding="same") if k > 1 else scaled
    contrasts = [ops.clip(smooth / (_ring_max(smooth, _nominal(d, height)) + RING_FLOOR), 0.0, CONTRAST_CLIP)
                 for d in RING_RADII]
    large = contrasts[-1]
    window = (_nominal(MIRROR_WINDOW[0], height, odd=True), _nominal(MIRROR_WINDOW[1], height, odd=True))
    mirrored = ops.max_pool(ops.flip(large, axis=2), window, strides=1, padding="same")
    channels = [scaled, *contrasts, large - mirrored]
    if views == 2:
        w = _nominal(OTHER_VIEW_WINDOW, height, odd=True)
        other = ops.reshape(ops.flip(ops.reshape(large, (-1, 2, height, width, 1)), axis=1), (-1, height, width, 1))
        channels.append(ops.max_pool(other, w, strides=1, padding="same"))
    return ops.concatenate(channels, axis=-1)


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
          sharpness: float = SHARPNESS, views: int = 1, reader: bool = READER) -> keras.Model:
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
        reader: feed the network the fixed :func:`reader_channels` (and their maximum over each
            stride-16 cell again at the last stage, so the evidence map is two convolutions from
            them); False: the grey image only (the first version).

    Returns:
        A ``keras.Model`` named ``bonescan_scintinet``: input ``image`` (None, H, W, 3) float32
        (with ``views=2``: (None, 2, H, W, 3), and ``features`` / ``evidence`` hold 2 rows per study)
        (raw counts or the app's 0..255, any positive scale); output (None, 1) float32, the
        probability of metastasis. Layers: :func:`robust_scale` ops, ``stem``/``stageK_convJ`` Conv2D
        (no bias) and ReLU, ``poolK`` MaxPooling2D, ``features`` (last ReLU, the
        (None, H/16, W/16, 128) map), ``head_dropout``, ``evidence`` ((None, H/16, W/16, 1)
        logits: a 1 x 1 Conv2D of the features, ``evidence_learned``, plus with the reader
        channels a 1 x 1 Conv2D without bias of the reader cells, ``evidence_reader``, kernel 1
        at start), :func:`smooth_max` ops and ``head_pool`` (an Identity layer
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
    if reader:
        x = reader_channels(x, views)
    reader_input = x
    counter = iter(range(10_000))

    def init() -> Any:
        return keras.initializers.HeNormal(seed=seed + next(counter))

    def conv_relu(x: Any, filters: int, kernel: int, name: str, strides: int = 1, dilation: int = 1,
                  relu_name: str | None = None) -> Any:
        # No normalisation layer: GroupNorm's per-image statistics carried the whole image's lesion
        # burden to every place, and the network learnt to read it in the air and the legs
        # (docs/scintinet.md, "No normalisation layer"). BatchNorm needs large batches. No bias either
        # (as measured): a ReLU network without biases maps an empty place to zero evidence features.
        x = layers.Conv2D(filters, kernel, strides=strides, padding="same", dilation_rate=dilation, use_bias=False,
                          kernel_initializer=init(), name=name)(x)
        return layers.Activation("relu", name=relu_name or f"{name}_relu")(x)

    filters, kernel, stride = STEM
    x = conv_relu(x, filters, kernel, "stem", strides=stride)
    for stage, (filters, n_convs, dilation) in enumerate(STAGES, start=1):
        # Max, not mean or stride: a 1-3 px hot spot survives the halving at full strength.
        x = layers.MaxPooling2D(2, padding="same", name=f"pool{stage}")(x)
        if reader and stage == len(STAGES):
            # The channels again, max over each stride-16 cell: the last stage starts from the signal
            # itself (a focus's contrast), not only from what three stages made of it.
            cells = layers.MaxPooling2D(stride * 2 ** stage, padding="same", name="reader_cells")(reader_input)
            x = layers.Concatenate(name="reader_skip")([x, cells])
        for index in range(n_convs):
            last_of_stage = index == n_convs - 1
            x = conv_relu(x, filters, 3, f"stage{stage}_conv{index + 1}", dilation=dilation if last_of_stage else 1,
                               relu_name="features" if last_of_stage and stage == len(STAGES) else None)
    x = layers.SpatialDropout2D(dropout, seed=seed, name="head_dropout")(x)
    learned = layers.Conv2D(1, 1, kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 1),
                            name="evidence" if not reader else "evidence_learned")(x)
    if reader:
        # The reader channels' cell maxima also reach the evidence directly (a 1 x 1 conv, starting as
        # their sum): each place starts as a contrast detector, and the learned part adds to it.
        direct = layers.Conv2D(1, 1, kernel_initializer="ones", use_bias=False, name="evidence_reader")(cells)
        evidence = layers.Add(name="evidence")([learned, direct])
    else:
        evidence = learned
    if views == 2:  # (2N, h, w, 1) → (N, 2h, w, 1): a study's two evidence maps stacked, pooled together
        h, w = int(evidence.shape[1]), int(evidence.shape[2])
        evidence = keras.ops.reshape(evidence, (-1, 2 * h, w, 1))
    pooled = layers.Identity(name="head_pool")(smooth_max(evidence, sharpness))
    outputs = layers.Dense(1, activation="sigmoid", dtype="float32", name="head_dense",  # float32 under mixed precision
                           kernel_initializer="ones", bias_initializer="zeros")(pooled)
    return keras.Model(inputs, outputs, name="bonescan_scintinet")
