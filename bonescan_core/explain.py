"""Grad-CAM of stored images under a run: where a trained model found its evidence of metastasis.

The pieces live where they belong: the gradient step in :mod:`bonescan_core.gradcam`
(model + batch → maps and probabilities, pure), the geometry that puts a map back on its
image beside ``fit_to`` in :mod:`bonescan_core.preprocess`, the run's model
(``runs.load_model``, checksum and cache) and the stored maps (``runs.cached_heatmap`` /
``runs.store_heatmaps``) in the run store, the colours in ``plots.overlay``. This module
joins them for a stored image.

Geometry. A stored image (H0, W0) is min-max normalised and fitted into the model's
(H, W) frame keeping its aspect ratio, with zero padding (``preprocess.fit_to``). The
feature map (h, w) covers that frame; ``preprocess.to_image_geometry`` resizes it onto
the frame, cuts the padding away and resizes the rest to (H0, W0), so a heatmap lies
exactly over the image it explains. Composite runs (anterior and posterior side by side in
one input) are supported: ``preprocess.to_view_geometries`` splits the frame first; so are
fusion runs (the two views as two rows of one input, the posterior mirrored): each view's
map is the gradient of the study's one score, the posterior map mirrored back.

Caching. :func:`explain_images` (and :func:`explain_image`, one image) stores each map in
the run store (float16) with the model's probability from the same pass, and computes it
once per run and image; the images it computes go through the model together, in batches,
with their probabilities (one study's two views: one pass). The worker calls it for every
predicted image after a run (``jobs``'s post-run step), so the explorer rarely waits.

Scale. Maps are stored divided by their own maximum; they are shown multiplied by the run's
probability for the image (``localisation.shared_scale``, the reasons are there), so a
confident negative looks cold: :func:`explain_png` and the Evaluate explorer do that.
:func:`explain_summary` is ``bonescan explain --json``: the probability and the map's peak in
the stored image's pixels.

Keras (and TensorFlow or JAX) is imported only when a model is used; this module never
imports streamlit.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from bonescan_core import errors, localisation, pixelstore, plots, runs, studystats
from bonescan_core.gradcam import BATCH_SIZE, gradcam_with_probabilities
from bonescan_core.heavy import sqlite_utils
from bonescan_core.models import DEFAULT_SIZE, Backbone, get_backbone
from bonescan_core.preprocess import (
    TWO_VIEW_MODES,
    compose_views,
    fusion_views,
    list_samples,
    prepare_image,
    to_image_geometry,
    to_model_input,
    to_view_geometries,
)

if TYPE_CHECKING:  # pragma: no cover - typing only; keras is imported lazily
    import keras


# --- maps of raw images ------------------------------------------------------------------------

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


def _explain_fusions(
    model: keras.Model,
    backbone: str | Backbone,
    pairs: list[tuple[np.ndarray | None, np.ndarray | None]],
    image_size: tuple[int, int],
    layer_name: str | None = None,
) -> list[tuple[np.ndarray | None, np.ndarray | None, float]]:
    """(anterior map, posterior map, probability) of each study under a dual-view fusion model
    (input (N, 2, H, W, 3), ``models.build_model(views=2)``), batched; one probability per study.

    The posterior view goes in mirrored (``preprocess.fusion_views``); its map is mirrored
    back before it is put on the posterior image's own geometry.
    """
    bb = get_backbone(backbone)
    size = (int(image_size[0]), int(image_size[1]))
    expected = tuple(model.inputs[0].shape[2:4])
    if None not in expected and expected != size:
        raise ValueError(f"the model takes {expected[0]}x{expected[1]} views, not {size[0]}x{size[1]}; pass its image_size")
    layer = layer_name or bb.last_conv_layer
    step = max(1, BATCH_SIZE // 2)
    out = []
    for start in range(0, len(pairs), step):
        chunk = pairs[start : start + step]
        frames = np.stack([fusion_views(front, back, size) for front, back in chunk])  # (n, 2, H, W)
        inputs = to_model_input(frames.reshape(-1, *size), bb).reshape(len(chunk), 2, *size, 3)
        maps, probabilities = gradcam_with_probabilities(model, inputs, layer, step)
        for index, ((front, back), probability) in enumerate(zip(chunk, probabilities, strict=True)):
            front_map = None if front is None else to_image_geometry(maps[2 * index], size, front.shape)
            back_map = None if back is None else to_image_geometry(maps[2 * index + 1][:, ::-1], size, back.shape)
            out.append((front_map, back_map, float(probability)))
    return out


# --- explanations of stored images -----------------------------------------------------------------

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
        f"run {run_id} sees a study's two views together and image {image_id} is not one of the two views it uses for study {study_id} "
        "(the first anterior and the first posterior image); explain one of those instead"
    )


@dataclass(frozen=True)
class Explained:
    """One image explained under one run (:func:`explain_images`).

    Attributes:
        heatmap: (H0, W0) float32 in [0, 1] on the image's own geometry, at the float16
            precision it is stored with (the same values whether computed now or cached).
        probability: the run model's probability of metastasis for the image (before any
            calibration), from the same forward pass as the map (for a composite run: the
            probability of the study's composite sample, the same for both views), also when
            the map comes from the ``explanations`` cache; None only for a map cached before
            probabilities were stored, of an image the run did not predict.
    """

    heatmap: np.ndarray
    probability: float | None


def explain_images(
    db: sqlite_utils.Database, db_path: str | os.PathLike[str], run_id: int, image_ids: Iterable[int],
    *, need_probability: bool = False,
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
        need_probability: compute again a cached map that has no probability stored.

    Returns:
        {image id: :class:`Explained`} for every id asked for, in the order given.

    Raises:
        errors.RunNotFound: no such run.
        errors.ImageNotFound: no such image.
        runs.ModelUnavailable: the run's model cannot be loaded (see ``runs.load_model``).
        ValueError: a composite run does not use one of the images.
    """
    wanted = list(dict.fromkeys(int(image_id) for image_id in image_ids))
    found: dict[int, Explained] = {}
    for image_id in wanted:
        cached = runs.cached_explanation(db, run_id, image_id)
        if cached is not None and not (need_probability and cached[1] is None):
            found[image_id] = Explained(*cached)
    missing = [image_id for image_id in wanted if image_id not in found]
    if missing:
        run = runs.get(db, run_id)
        pixels = {image_id: _pixels(db, image_id) for image_id in missing}
        if run.settings.view_mode in TWO_VIEW_MODES:
            samples = list(dict.fromkeys(
                tuple(sorted(_composite_members(db, run_id, image_id).items())) for image_id in missing
            ))
            model, bb, size = runs.load_model(db_path, run)
            views = [{slot: pixels[member] if member in pixels else _pixels(db, member) for slot, member in sample}
                     for sample in samples]
            computed: dict[int, tuple[np.ndarray, float]] = {}
            explain_pairs = _explain_composites if run.settings.view_mode == "composite" else _explain_fusions
            for sample, (front, back, probability) in zip(
                samples, explain_pairs(model, bb, [(v.get("anterior"), v.get("posterior")) for v in views], size),
                strict=True,
            ):
                members = dict(sample)
                for slot, heat in (("anterior", front), ("posterior", back)):
                    if heat is not None:
                        computed[members[slot]] = (heat, probability)
        else:
            model, bb, size = runs.load_model(db_path, run)
            computed = dict(zip(missing, _explain_per_image(model, bb, [pixels[i] for i in missing], size), strict=True))
        stored = {member: heat.astype(np.float16) for member, (heat, _) in computed.items()}
        runs.store_heatmaps(db, run_id, stored, {member: probability for member, (_, probability) in computed.items()},
                            {member: localisation.map_peak(heat) for member, heat in stored.items()})
        for member, (heat, probability) in computed.items():
            if member in wanted:
                found[member] = Explained(heat.astype(np.float16).astype(np.float32), probability)
    return {image_id: found[image_id] for image_id in wanted}


def explain_image(
    db: sqlite_utils.Database, db_path: str | os.PathLike[str], run_id: int, image_id: int
) -> np.ndarray:
    """The Grad-CAM heatmap of one stored image under one run, computed once and cached.

    The first call loads the run's model (``runs.load_model``), computes the map and
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
        runs.ModelUnavailable: the run's model cannot be loaded (see ``runs.load_model``).
        ValueError: a composite run does not use this image.
    """
    return explain_images(db, db_path, run_id, [image_id])[int(image_id)].heatmap


def explain_png(
    db: sqlite_utils.Database,
    db_path: str | os.PathLike[str],
    run_id: int,
    image_id: int,
    out_path: str | os.PathLike[str],
    opacity: float = plots.DEFAULT_OPACITY,
) -> Path:
    """Write the Grad-CAM overlay of one image as an RGB PNG (``bonescan explain RUN IMAGE --out FILE``).

    Args:
        out_path: the PNG to write (its folder must exist).
        opacity: colour weight where the heatmap is 1, in [0, 1].
        (others as :func:`explain_image`.)

    Returns:
        The path written. The image keeps its stored geometry (H0 x W0 pixels).
    """
    heat, probability = explained_with_probability(db, db_path, run_id, image_id)
    heatmap = localisation.shared_scale(heat, probability)
    pixels = _pixels(db, image_id)
    path = Path(out_path)
    Image.fromarray(plots.overlay(pixels, heatmap, opacity=opacity), mode="RGB").save(path, format="PNG")
    return path


def explained_with_probability(
    db: sqlite_utils.Database, db_path: str | os.PathLike[str], run_id: int, image_id: int
) -> tuple[np.ndarray, float]:
    """The stored Grad-CAM map of an image (:func:`explain_image`) and the run's probability of
    metastasis for it, as its predictions report it: the stored prediction when the run
    predicted the image, else the model's output from the map's pass, calibrated as the run
    calibrates (``studystats.apply_calibration``; a cached map without one is computed again).

    Returns:
        ((H0, W0) float32 map in [0, 1], divided by its maximum; probability in [0, 1]).
    """
    row = db.execute("SELECT probability FROM predictions WHERE run_id = ? AND image_id = ?", [run_id, image_id]).fetchone()
    explained = explain_images(db, db_path, run_id, [image_id], need_probability=row is None)[int(image_id)]
    if row is not None:
        return explained.heatmap, float(row[0])
    calibration = runs.get(db, run_id).results.facts.get("calibration")
    return explained.heatmap, float(studystats.apply_calibration(calibration, [explained.probability])[0])


def explain_summary(
    db: sqlite_utils.Database, db_path: str | os.PathLike[str], run_id: int, image_id: int
) -> dict[str, object]:
    """``bonescan explain RUN IMAGE --json``: the image, the run's probability for it and the
    peak of its Grad-CAM map.

    Returns:
        ``{"image_id": int, "probability": float in [0, 1] (:func:`explained_with_probability`,
        4 decimals), "peak": [row, col]}``, the peak (``localisation.peak_of``) in the stored
        image's pixels, or None when the map has no positive evidence.

    Raises:
        as :func:`explain_image`.
    """
    heat, probability = explained_with_probability(db, db_path, run_id, image_id)
    peak = localisation.peak_of(heat)
    return {"image_id": int(image_id), "probability": round(probability, 4), "peak": None if peak is None else [peak[0], peak[1]]}


__all__ = [
    "Explained",
    "explain_image",
    "explain_images",
    "explain_png",
    "explained_with_probability",
    "explain_summary",
    "heatmap_for_image",
    "heatmaps_for_composite",
]
