"""From stored pixels to model input: normalisation, resizing, views, augmentation, batches.

The steps, in order (the paper's min-max normalisation first):

1. per-image min-max normalisation to [0, 1] (:func:`minmax`);
2. resize to (H, W) keeping the aspect ratio, centred and zero-padded, never stretched
   (:func:`fit_to`); after step 1 zero is "no counts", the scan's own background;
3. view handling: ``per_image`` (each image is a sample with its study's label, the
   paper), ``composite`` (anterior and posterior side by side, one sample per study,
   each view fitted into its half, :func:`compose_views`) or ``fusion`` (one sample per
   study: the anterior view and the horizontally mirrored posterior view, each fitted to
   (H, W), stacked, :func:`fusion_views`; the model runs one shared backbone over both);
4. cached as float16 (N, H, W), or (N, 2, H, W) for fusion, in [0, 1]: for training, one
   file per image and frame size on disk, read per batch (``imagecache``; memory stays flat
   as the dataset grows); :func:`load_images` holds them in memory (570 images at
   646 x 220: 160 MB);
5. inside the model's compiled step (:func:`with_input_pipeline`): geometric augmentation
   on training batches only (Keras layers, :func:`make_augmenter`; each view of a
   composite or a fusion sample augmented on its own, so a flip never swaps the
   anterior and posterior halves), x 255 (the 0..255
   range ``preprocess_input`` expects), grey to 3 channels, then the backbone's own
   ``preprocess_input`` (:func:`model_input`; :func:`to_model_input` is the NumPy twin for
   single images, Grad-CAM and feature extraction).

The inverse of steps 2 and 3 lies beside them: :func:`to_image_geometry` maps a map over the
(H, W) frame (a Grad-CAM heatmap) back onto the original image, cutting the padding away
(:func:`content_box`), and :func:`to_view_geometries` does so for each half of a composite.

Importing this module does not import Keras; the augmentation layers and the
``keras.utils.PyDataset`` are created on first use. Everything in the graph uses Keras layers
and ``keras.ops`` only (no ``tf.*``), so it runs under ``KERAS_BACKEND=jax`` too.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from bonescan_core import pixelstore
from bonescan_core.heavy import keras_module, sqlite_utils
from bonescan_core.models import Backbone, get_backbone

VIEW_MODES = ("per_image", "composite", "fusion")
TWO_VIEW_MODES = ("composite", "fusion")  # one sample per study, made of its anterior and posterior view

# The paper lists zoom, horizontal flip, rotation, translation and shear without values;
# these are mild, ImageDataGenerator-style settings for whole-body scans (a body must stay
# in the frame). Keys are the TrainConfig.augment keys; a missing key or 0 turns one off.
PAPER_AUGMENT: dict[str, float | bool] = {
    "flip_horizontal": True,
    "rotation_degrees": 5.0,  # +-5 degrees
    "zoom": 0.1,  # +-10 % in both axes
    "translation": 0.05,  # +-5 % of height and width
    "shear": 0.1,  # +-10 % of the image, both axes
}
AUGMENT_KEYS = tuple(PAPER_AUGMENT)


# --- single images (NumPy) -------------------------------------------------------------------------

def minmax(pixels: np.ndarray) -> np.ndarray:
    """Per-image min-max normalisation.

    Args:
        pixels: (H, W) array of any numeric dtype (counts).

    Returns:
        (H, W) float32 in [0, 1]; a constant image becomes all zeros.
    """
    data = np.asarray(pixels, dtype=np.float32)
    low, high = float(data.min()), float(data.max())
    if not math.isfinite(low) or not math.isfinite(high):
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
        low, high = float(data.min()), float(data.max())
    if high <= low:
        return np.zeros(data.shape, dtype=np.float32)
    return (data - low) / (high - low)


def content_box(shape: tuple[int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Where an image of ``shape`` lands inside ``size`` when fitted by :func:`fit_to`.

    Args:
        shape: (h, w) of the source image.
        size: (H, W) of the target.

    Returns:
        (top, left, height, width) of the resized content inside the (H, W) frame; the rest
        is padding. Grad-CAM uses it to map a heatmap back onto the original image.
    """
    (h, w), (height, width) = shape, size
    scale = min(height / h, width / w)
    new_h = min(height, max(1, round(h * scale)))
    new_w = min(width, max(1, round(w * scale)))
    return (height - new_h) // 2, (width - new_w) // 2, new_h, new_w


def fit_to(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize keeping the aspect ratio, centred in a zero-padded (H, W) frame (pad, never stretch).

    Args:
        image: (h, w) float array in [0, 1].
        size: (H, W) of the output.

    Returns:
        (H, W) float32 in [0, 1]. Bilinear resampling with Pillow's antialiasing when
        shrinking, so a small hot lesion is averaged, not skipped.
    """
    top, left, new_h, new_w = content_box(image.shape, size)
    frame = np.zeros(size, dtype=np.float32)
    if (new_h, new_w) == image.shape:
        resized = np.asarray(image, dtype=np.float32)
    else:
        resized = np.asarray(
            Image.fromarray(np.asarray(image, dtype=np.float32), mode="F").resize((new_w, new_h), Image.Resampling.BILINEAR)
        )
    frame[top : top + new_h, left : left + new_w] = np.clip(resized, 0.0, 1.0)
    return frame


def prepare_image(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Min-max normalise and fit one image: (h, w) counts → (H, W) float32 in [0, 1]."""
    return fit_to(minmax(pixels), size)


def fusion_views(anterior: Any, posterior: Any, size: tuple[int, int],
                 fit: Callable[[Any, tuple[int, int]], np.ndarray] = prepare_image) -> np.ndarray:
    """A fusion sample: the anterior view and the horizontally mirrored posterior view, stacked.

    Mirrored so that the patient's left lies on the same side in both (the posterior view is
    acquired from behind): one shared backbone then sees the same anatomy in the same place.

    Args:
        anterior: (h, w) counts, or None (that view stays blank); or whatever ``fit`` takes.
        posterior: (h, w) counts, or None.
        size: (H, W) each view is fitted to.
        fit: (view, (H, W)) -> (H, W) in [0, 1]; :func:`prepare_image`, or a cache lookup
            giving the same values (``imagecache``).

    Returns:
        (2, H, W) float32 in [0, 1]: row 0 the anterior view, row 1 the posterior view
        mirrored left-right (:func:`prepare_image` each, min-max normalised on its own).
    """
    blank = np.zeros(size, dtype=np.float32)
    front = fit(anterior, size) if anterior is not None else blank
    back = fit(posterior, size)[:, ::-1] if posterior is not None else blank
    return np.stack([front, back])


def composite_halves(size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """The (H, w) frames of a composite's anterior (left) and posterior (right) half: W // 2 and W - W // 2 wide."""
    height, width = size
    return (height, width // 2), (height, width - width // 2)


def compose_views(anterior: Any, posterior: Any, size: tuple[int, int],
                  fit: Callable[[Any, tuple[int, int]], np.ndarray] = prepare_image) -> np.ndarray:
    """Anterior (left half) and posterior (right half) side by side, each normalised and fitted to its half.

    Args:
        anterior: (h, w) counts, or None (that half stays blank); or whatever ``fit`` takes.
        posterior: (h, w) counts, or None.
        size: (H, W) of the composite; the halves are W // 2 and W - W // 2 wide (:func:`composite_halves`).
        fit: (view, (H, w)) -> (H, w) in [0, 1]; :func:`prepare_image`, or a cache lookup
            giving the same values (``imagecache``).

    Returns:
        (H, W) float32 in [0, 1]. Each view is min-max normalised on its own (the views'
        count levels differ). The posterior view is not mirrored: it is shown as acquired.
    """
    parts = [
        fit(view, half) if view is not None else np.zeros(half, dtype=np.float32)
        for view, half in zip((anterior, posterior), composite_halves(size), strict=True)
    ]
    return np.concatenate(parts, axis=1)


# --- the inverse: from the model's frame back onto the image -------------------------------

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
    """Map a heatmap over a composite frame (:func:`compose_views`) back onto each view.

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


def to_model_input(batch: np.ndarray, backbone: str | Backbone) -> np.ndarray:
    """Grey [0, 1] images → the backbone's preprocessed 3-channel input, as NumPy (eager).

    The same computation as :func:`model_input` (one definition serves both), for single
    images: Grad-CAM, feature extraction.

    Args:
        batch: (N, H, W) or (N, H, W, 1) floats in [0, 1].
        backbone: whose ``preprocess_input`` to apply.

    Returns:
        (N, H, W, 3) float32: ``preprocess_input(255 * grey repeated on R, G, B)``.
    """
    data = np.asarray(batch, dtype=np.float32)
    if data.ndim == 3:
        data = data[..., None]
    return np.asarray(keras_module().ops.convert_to_numpy(model_input(data, backbone)), dtype=np.float32)


# --- samples and loading from the database ---------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    """One training sample: an image (``per_image``) or a study's two views (``composite``).

    Attributes:
        study_id: the study it belongs to.
        image_ids: (image,) or (anterior, posterior) ids; a missing view is left out.
        views: the view of each id (``anterior``, ``posterior`` or None); for a composite,
            the half each image fills (``anterior`` left, ``posterior`` right), also for an
            image of unknown view.
        label: 1 metastatic, 0 not.
    """

    study_id: int
    image_ids: tuple[int, ...]
    views: tuple[str | None, ...]
    label: int

    @property
    def key(self) -> int:
        """The image id that names this sample (feature cache, predictions): its first image."""
        return self.image_ids[0]


def _chunks(items: Sequence[int], size: int = 500) -> Iterable[Sequence[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def list_samples(db: sqlite_utils.Database, study_labels: Mapping[int, int], view_mode: str = "per_image") -> list[Sample]:
    """The samples of some studies, without pixels.

    Args:
        study_labels: {study_id: 1 metastatic / 0 not}.
        view_mode: ``per_image`` (one sample per image), or ``composite`` / ``fusion``
            (one per study: its first anterior and first posterior image; images of
            unknown view fill the missing view(s) in id order; further images are not used).

    Returns:
        Samples ordered by study id, then image id.
    """
    if view_mode not in VIEW_MODES:
        raise ValueError(f"unknown view mode {view_mode!r}; choose one of {', '.join(VIEW_MODES)}")
    by_study: dict[int, list[tuple[int, str | None]]] = {}
    ids = sorted(study_labels)
    for chunk in _chunks(ids):
        marks = ", ".join("?" for _ in chunk)
        for image_id, study_id, view in db.execute(
            f"SELECT id, study_id, view FROM images WHERE study_id IN ({marks}) ORDER BY study_id, id", list(chunk)
        ).fetchall():
            by_study.setdefault(study_id, []).append((image_id, view))
    samples: list[Sample] = []
    for study_id in ids:
        images = by_study.get(study_id, [])
        label = int(study_labels[study_id])
        if view_mode == "per_image":
            samples.extend(Sample(study_id, (image_id,), (view,), label) for image_id, view in images)
            continue
        chosen: dict[str, int] = {}
        for image_id, view in images:
            if view in ("anterior", "posterior"):
                chosen.setdefault(view, image_id)
        for image_id, view in images:  # unknown views fill the gaps, in id order
            free = [slot for slot in ("anterior", "posterior") if slot not in chosen]
            if view is None and free:
                chosen[free[0]] = image_id
        slots = [slot for slot in ("anterior", "posterior") if slot in chosen]
        if slots:
            samples.append(Sample(study_id, tuple(chosen[slot] for slot in slots), tuple(slots), label))
    return samples


def load_images(
    db: sqlite_utils.Database,
    samples: Sequence[Sample],
    size: tuple[int, int],
    view_mode: str = "per_image",
    cancelled: Callable[[], bool] | None = None,
) -> np.ndarray:
    """Decode, normalise and fit the samples' pixels.

    Args:
        samples: from :func:`list_samples` with the same ``view_mode``.
        size: (H, W).
        cancelled: polled every 32 samples; when it returns True loading stops with
            ``InterruptedError``.

    Returns:
        (N, H, W) float16 in [0, 1], in the order of ``samples`` (float16 keeps faint
        uptake next to a hot bladder that uint8 would flatten, at 2 bytes a pixel);
        (N, 2, H, W) for ``fusion`` (:func:`fusion_views`).
    """
    out = np.zeros((len(samples), 2, *size) if view_mode == "fusion" else (len(samples), *size), dtype=np.float16)

    def prepare(sample: Sample, blobs: Mapping[int, bytes]) -> np.ndarray:
        arrays = {i: pixelstore.decode_pixels(blobs[i]) for i in sample.image_ids}
        return sample_frame(sample, view_mode, size, lambda image_id, frame: prepare_image(arrays[image_id], frame))

    for index, image in enumerate(map_blobs(db, samples, lambda sample: sample.image_ids, prepare, cancelled)):
        out[index] = image.astype(np.float16)
    return out


def sample_frame(sample: Sample, view_mode: str, size: tuple[int, int],
                 fit: Callable[[int, tuple[int, int]], np.ndarray]) -> np.ndarray:
    """One sample's frame, each of its images fitted by ``fit(image_id, (h, w))``.

    Args:
        sample: from :func:`list_samples` with the same ``view_mode``.
        size: (H, W).
        fit: an image's (h, w) float frame in [0, 1] (:func:`prepare_image` of its pixels, or
            the disk cache's copy of it); (h, w) is ``size``, or a composite's half
            (:func:`frame_sizes` lists what a sample asks for).

    Returns:
        (H, W) for ``per_image`` and ``composite`` (:func:`compose_views`), (2, H, W) for
        ``fusion`` (:func:`fusion_views`).
    """
    if view_mode in TWO_VIEW_MODES:
        slots = dict(zip(sample.views, sample.image_ids, strict=True))
        join = compose_views if view_mode == "composite" else fusion_views
        return join(slots.get("anterior"), slots.get("posterior"), size, fit=fit)
    return fit(sample.image_ids[0], size)


def frame_sizes(sample: Sample, view_mode: str, size: tuple[int, int]) -> list[tuple[int, tuple[int, int]]]:
    """(image_id, (h, w)) for each image :func:`sample_frame` fits: ``size``, or its half of a composite."""
    if view_mode == "composite":
        halves = dict(zip(("anterior", "posterior"), composite_halves(size), strict=True))
        return [(image_id, halves[view]) for image_id, view in zip(sample.image_ids, sample.views, strict=True)]
    return [(image_id, tuple(size)) for image_id in sample.image_ids]


def map_blobs(
    db: sqlite_utils.Database,
    items: Sequence[Any],
    image_ids: Callable[[Any], Iterable[int]],
    work: Callable[[Any, Mapping[int, bytes]], Any],
    cancelled: Callable[[], bool] | None = None,
) -> Iterator[Any]:
    """``work(item, blobs)`` for every item, in order, computed in a thread pool.

    Args:
        items: what to work on (samples, image ids).
        image_ids: the images an item needs; their pixel blobs are read 32 items at a time.
        work: (item, {image_id: pixel blob}) -> result; runs in a worker thread.
        cancelled: polled after every 32 items; when it returns True the iteration stops
            with ``InterruptedError``.

    Yields:
        The results in the order of ``items``.
    """
    # zlib, NumPy and Pillow's resize release the GIL: threads decode in parallel.
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        for start in range(0, len(items), 32):
            chunk = items[start : start + 32]
            ids = sorted({i for item in chunk for i in image_ids(item)})
            marks = ", ".join("?" for _ in ids)
            blobs = dict(db.execute(f"SELECT id, pixels FROM images WHERE id IN ({marks})", ids).fetchall())
            yield from pool.map(work, chunk, [blobs] * len(chunk))
            if cancelled is not None and cancelled():
                raise InterruptedError("cancelled while loading images")


# --- augmentation and batches (Keras) --------------------------------------------------------------

def make_augmenter(augment: Mapping[str, Any] | None, seed: int = 0) -> Any:
    """Geometric augmentation as a ``keras.Sequential`` of preprocessing layers, or None.

    Args:
        augment: settings with :data:`AUGMENT_KEYS` (see :data:`PAPER_AUGMENT`); None, {}
            or all-zero turns augmentation off. Unknown keys are an error.
        seed: seeds each layer (layer k gets seed + k), so a run's augmentation repeats.

    Returns:
        A model taking (N, H, W, C) float and returning the same shape, which changes the
        images only when called with ``training=True``; empty areas are filled with 0 (no
        counts). None when nothing is enabled.
    """
    if not augment:
        return None
    unknown = sorted(set(augment) - set(AUGMENT_KEYS))
    if unknown:
        raise ValueError(f"unknown augmentation settings {', '.join(unknown)}; known: {', '.join(AUGMENT_KEYS)}")
    keras = keras_module()
    fill = {"fill_mode": "constant", "fill_value": 0.0}
    layers: list[Any] = []
    if augment.get("flip_horizontal"):
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed, name="flip"))
    if augment.get("rotation_degrees"):
        layers.append(keras.layers.RandomRotation(float(augment["rotation_degrees"]) / 360.0, seed=seed + 1, name="rotation", **fill))
    if augment.get("zoom"):
        layers.append(keras.layers.RandomZoom(float(augment["zoom"]), seed=seed + 2, name="zoom", **fill))
    if augment.get("translation"):
        factor = float(augment["translation"])
        layers.append(keras.layers.RandomTranslation(factor, factor, seed=seed + 3, name="translation", **fill))
    if augment.get("shear"):
        factor = float(augment["shear"])
        layers.append(keras.layers.RandomShear(factor, factor, seed=seed + 4, name="shear", **fill))
    if not layers:
        return None
    return keras.Sequential(layers, name="augment")


def model_input(grey: Any, backbone: str | Backbone) -> Any:
    """Grey [0, 1] → the backbone's input, in Keras ops (runs inside a compiled step).

    Args:
        grey: (N, H, W, 1) float tensor (or KerasTensor) in [0, 1], possibly augmented.
        backbone: whose ``preprocess_input`` to apply.

    Returns:
        (N, H, W, 3) float32: ``preprocess_input(255 * clip(grey) repeated on R, G, B)``,
        the same values :func:`to_model_input` computes with NumPy.
    """
    ops = keras_module().ops
    rgb = ops.repeat(ops.clip(ops.cast(grey, "float32"), 0.0, 1.0) * 255.0, 3, axis=-1)
    return get_backbone(backbone).preprocess_input(rgb)


def with_input_pipeline(model: Any, backbone: str | Backbone, augmenter: Any = None, view_mode: str = "per_image") -> Any:
    """Wrap a model so that augmentation and input scaling run inside its compiled step.

    The returned model shares every weight with ``model`` (training it trains ``model``):
    (N, H, W, 1) grey in [0, 1] → ``augmenter`` (only when called with ``training=True``)
    → :func:`model_input` → ``model``. Doing this in the graph rather than per batch in
    Python keeps the backbone fed (``bench/pipeline.py``). The wrapper is for fitting and
    predicting only; save ``model`` itself.

    Each view is augmented on its own: a ``composite`` frame is split into its anterior
    (left ``W // 2`` columns) and posterior half, each half augmented, then joined again, so a
    horizontal flip mirrors each view in place instead of swapping them; a ``fusion`` sample
    (N, 2, H, W, 1), recognised by the model's 5-D input, has its two views augmented as
    separate images.

    Args:
        model: a built model taking (N, H, W, 3) backbone input, or (N, 2, H, W, 3) (fusion).
        backbone: whose ``preprocess_input`` applies.
        augmenter: from :func:`make_augmenter`, or None.
        view_mode: ``per_image``, ``composite`` or ``fusion`` (how the frame holds its views).

    Returns:
        A ``keras.Model`` taking (N, H, W, 1) float ((N, 2, H, W, 1) for fusion) and returning
        ``model``'s output.
    """
    keras = keras_module()
    ops = keras.ops
    fusion = len(model.input_shape) == 5
    height, width = model.input_shape[-3:-1]
    grey = keras.Input((2, height, width, 1) if fusion else (height, width, 1), name="grey")
    x = ops.reshape(grey, (-1, height, width, 1)) if fusion else grey  # views as consecutive batch rows
    if augmenter is not None and view_mode == "composite":
        half = width // 2
        x = ops.concatenate([augmenter(x[:, :, :half]), augmenter(x[:, :, half:])], axis=2)
    elif augmenter is not None:
        x = augmenter(x)
    x = keras.layers.Lambda(model_input, arguments={"backbone": get_backbone(backbone).name}, name="model_input")(x)
    if fusion:
        x = ops.reshape(x, (-1, 2, height, width, 3))
    return keras.Model(grey, model(x), name=f"{model.name}_with_input")


@functools.cache
def _batches_class() -> type:
    """``ImageBatches``, a ``keras.utils.PyDataset``, defined on first use (keeps imports light)."""
    keras = keras_module()

    class ImageBatches(keras.utils.PyDataset):
        """Batches of grey images from memory, for a model from :func:`with_input_pipeline`.

        Yields ``(x, y)`` or ``(x, y, sample_weight)``: x (n, H, W, 1) float32 in [0, 1];
        y (n, 1) float32 0/1; weights (n,) float32. Nothing is computed per batch beyond a
        gather: augmentation and scaling happen in the model's compiled step.
        """

        def __init__(
            self,
            images: np.ndarray,
            labels: np.ndarray,
            batch_size: int,
            *,
            rng: np.random.Generator | None = None,
            class_weights: Mapping[int, float] | None = None,
            workers: int = 1,
        ) -> None:
            super().__init__(workers=workers, use_multiprocessing=False)
            if len(images) != len(labels):
                raise ValueError(f"{len(images)} images but {len(labels)} labels")
            self.images = images
            self.labels = np.asarray(labels, dtype=np.float32).reshape(-1, 1)
            self.batch_size = int(batch_size)
            self.rng = rng
            self.class_weights = dict(class_weights) if class_weights else None
            self.order = np.arange(len(images))
            self._shuffle()

        def _shuffle(self) -> None:
            if self.rng is not None:
                self.order = self.rng.permutation(len(self.images))

        def __len__(self) -> int:
            return math.ceil(len(self.images) / self.batch_size)

        def batch_indices(self, index: int) -> np.ndarray:
            """Indices (into ``images``) of batch ``index`` in the current epoch's order."""
            return self.order[index * self.batch_size : (index + 1) * self.batch_size]

        def __getitem__(self, index: int) -> tuple[np.ndarray, ...]:
            picked = np.sort(self.batch_indices(index))  # sorted: contiguous-ish reads, same set
            x = self.images[picked].astype(np.float32)[..., None]
            y = self.labels[picked]
            if self.class_weights is None:
                return x, y
            weights = np.array([self.class_weights[int(label)] for label in y[:, 0]], dtype=np.float32)
            return x, y, weights

        def on_epoch_end(self) -> None:
            self._shuffle()

    return ImageBatches


def image_batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    rng: np.random.Generator | None = None,
    class_weights: Mapping[int, float] | None = None,
    workers: int = 1,
) -> Any:
    """A ``keras.utils.PyDataset`` of grey batches over in-memory images (see ``ImageBatches``).

    Args:
        images: (N, H, W) float16/float32 in [0, 1] from :func:`load_images`, or an array-like
            read from disk per batch (``imagecache.DiskImages``, the same values).
        labels: (N,) 0/1.
        batch_size: samples per batch (the last batch may be smaller).
        rng: shuffles the order at start and after every epoch; None keeps file order
            (validation, test, prediction).
        class_weights: {0: w0, 1: w1}; when given, batches carry per-sample weights.
        workers: PyDataset threads (1: batches are made in the training thread). Images read
            from disk get at least 2, so batches are read ahead in the background (Keras keeps
            up to ``max_queue_size`` = 10 ready) while the model trains.
    """
    if not isinstance(images, np.ndarray):
        workers = max(workers, 2)
    return _batches_class()(images, labels, batch_size, rng=rng, class_weights=class_weights, workers=workers)
