"""Grad-CAM localisation, measured: map peaks, the shared display scale and the pointing game.

Peaks. A Grad-CAM map is stored on its image's own geometry (``explain``: the map over the
model's frame is put back through ``preprocess.to_image_geometry``), so its peak
(:func:`peak_of`) is a (row, col) in the STORED image's pixels, the coordinates lesion points
use (:mod:`bonescan_core.lesions`). Pixels tied at the maximum (a bilinear upsampling stored as
float16 has small plateaus) resolve to the tied pixel nearest their centroid.

Shared scale. Grad-CAM maps are stored divided by their own maximum (``gradcam.cams_from``),
which shows where the evidence is but not how much: a confident negative's faint evidence
glows as red as a metastasis. They are shown multiplied by the run's probability of
metastasis for that image (:func:`shared_scale`): the colour at a pixel is (evidence there,
relative to the image's strongest) x (the model's probability), on one scale for every image
and run. A confident negative (p ~ 0.02) is cold everywhere; a confident positive's lesion is
hot; the hottest colour means "the model is sure, and this is where". Chosen over a run-wide
constant (the 99th percentile of raw map maxima on validation, say) because it needs nothing
beyond the map and the probability the run already reports, so it holds for every stored map,
old or new, for the views of a composite sample and for runs whose maps are still being
computed, and a colour means the same in every run; the price is that two confident
positives look equally hot whatever their raw Grad-CAM magnitudes (which are in logit units
per feature cell, not comparable across backbones anyway).

Pointing game (Zhang et al., "Top-down neural attention by excitation backprop", ECCV 2016, IJCV 2018):
among the true-positive lesion studies of a subset (reference label metastatic, called
positive at the decision threshold, with at least one lesion point), the share whose map peak
lies within :data:`TOLERANCE_PX` pixels of a lesion point. The tolerance is quoted at the
nominal 1024 x 256 matrix (:data:`REFERENCE_SIZE`) and scaled per axis to the stored image's
size (:func:`nominal_distances`: at 896 x 224 it is 13.1 px). A study's peak is the maximum
of its views' maps on the shared scale (the most suspicious view decides, as the study's
probability is the max over its views), and it is scored against that view's lesion points.
A study whose view maps are not cached yet is left out and counted (``n_without_map``);
a map without positive evidence has no peak and is a miss.

Numpy and the run store only (``evaluate --json`` starts fast; no Keras).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from bonescan_core import cohorts, lesions, runs
from bonescan_core.heavy import sqlite_utils

REFERENCE_SIZE = (1024, 256)
"""(rows, cols) of the nominal whole-body matrix the tolerance is quoted for."""

TOLERANCE_PX = 15.0
"""Pointing-game tolerance in pixels of :data:`REFERENCE_SIZE`: about two diameters of a
mid-sized (3-10 px) phantom metastasis (docs/statistics.md says why)."""


def shared_scale(heatmap: np.ndarray, probability: float | None) -> np.ndarray:
    """A stored map on the shared display scale (module docstring).

    Args:
        heatmap: (H, W) float in [0, 1], divided by its own maximum (as stored).
        probability: the run's probability of metastasis for the image, in [0, 1]; None
            (not known) leaves the map as stored.

    Returns:
        (H, W) float32 in [0, 1]: ``heatmap * probability``.
    """
    heat = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float32)), 0.0, 1.0)
    if probability is None:
        return heat
    return heat * np.float32(min(1.0, max(0.0, float(probability))))


def peak_of(heatmap: np.ndarray) -> tuple[int, int] | None:
    """(row, col) of a map's maximum in its own pixels, or None when it has no positive value.

    Pixels tied at the maximum resolve to the one nearest the centroid of the tied pixels
    (the centre of a plateau; one of the peaks when there are several).
    """
    heat = np.nan_to_num(np.asarray(heatmap, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if heat.ndim != 2 or heat.size == 0:
        raise ValueError(f"a heatmap must be a non-empty (H, W) array, got shape {heat.shape}")
    top = float(heat.max())
    if top <= 0.0:
        return None
    rows, cols = np.nonzero(heat == top)
    if rows.size == 1:
        return int(rows[0]), int(cols[0])
    nearest = int(np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2))
    return int(rows[nearest]), int(cols[nearest])


def nominal_distances(peak: tuple[float, float], points: np.ndarray, shape: tuple[int, int],
                      reference: tuple[int, int] = REFERENCE_SIZE) -> np.ndarray:
    """Distances from a peak to lesion points, in pixels of the reference matrix.

    Args:
        peak: (row, col) in the stored image's pixels.
        points: (k, 2) (row, col) in the same pixels.
        shape: (H, W) of the stored image.
        reference: (rows, cols) the distance is expressed in (default 1024 x 256).

    Returns:
        (k,) float64: ``hypot((dr) * ref_rows / H, (dc) * ref_cols / W)``, so a tolerance in
        reference pixels scales with each axis of the stored image.
    """
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    dr = (p[:, 0] - float(peak[0])) * reference[0] / float(shape[0])
    dc = (p[:, 1] - float(peak[1])) * reference[1] / float(shape[1])
    return np.hypot(dr, dc)


def is_hit(peak: tuple[float, float] | None, points: np.ndarray, shape: tuple[int, int],
           tolerance: float = TOLERANCE_PX) -> bool:
    """Whether a peak lies within ``tolerance`` reference pixels of any point (no peak or no point: False)."""
    if peak is None or np.asarray(points).size == 0:
        return False
    return bool(nominal_distances(peak, points, shape).min() <= tolerance)


@dataclass(frozen=True)
class StudyPointing:
    """One true-positive lesion study in the pointing game.

    Attributes:
        study_id: the study.
        image_id: the view whose shared-scale map holds the study's peak (None: no map had
            positive evidence).
        peak: (row, col) in that image's stored pixels, or None.
        distance: to the nearest lesion point of that view, in reference pixels (None: no
            peak, or no point on that view).
        hit: ``distance <= tolerance``.
    """

    study_id: int
    image_id: int | None
    peak: tuple[int, int] | None
    distance: float | None
    hit: bool


def map_peak(heatmap: np.ndarray) -> tuple[tuple[int, int] | None, float]:
    """(:func:`peak_of`, the map's maximum >= 0) of one stored map: what ``explanations`` keeps
    beside the map (``peak_row``, ``peak_col``, ``peak_value``) so that scoring reads no map."""
    heat = np.nan_to_num(np.asarray(heatmap, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    return peak_of(heat), max(0.0, float(heat.max()))


View = tuple[tuple[int, int] | None, float, float | None]
"""One view of a study: (its map's peak (row, col) or None, the map's maximum as stored, the
run's probability for the image or None)."""


def study_peak(views: Mapping[int, View]) -> tuple[int | None, tuple[int, int] | None]:
    """(image id, (row, col)) of the maximum over a study's maps on the shared scale.

    Args:
        views: {image id: :data:`View`}.

    Returns:
        The image whose map reaches the highest shared-scale value (maximum x probability;
        ties: the lowest image id) and its peak in that image's pixels; (None, None) when no
        map has a positive value.
    """
    best: tuple[float, int] | None = None
    for image_id in sorted(views):
        peak, value, probability = views[image_id]
        top = value * (1.0 if probability is None else min(1.0, max(0.0, float(probability))))
        if peak is not None and top > 0.0 and (best is None or top > best[0]):
            best = (top, image_id)
    if best is None:
        return None, None
    return best[1], views[best[1]][0]


def score_study(study_id: int, views: Mapping[int, View], points: Mapping[int, np.ndarray],
                shapes: Mapping[int, tuple[int, int]], tolerance: float = TOLERANCE_PX) -> StudyPointing:
    """Score one study: its shared-scale peak against the lesion points of the peak's view.

    Args:
        views: {image id: :data:`View`} of the study's predicted images.
        points: {image id: (k, 2) lesion points (row, col)}.
        shapes: {image id: (H, W) of the stored image}.
    """
    image_id, peak = study_peak(views)
    if image_id is None or peak is None:
        return StudyPointing(study_id, image_id, None, None, False)
    here = points.get(image_id)
    if here is None or len(here) == 0:
        return StudyPointing(study_id, image_id, peak, None, False)
    distance = float(nominal_distances(peak, here, shapes[image_id]).min())
    return StudyPointing(study_id, image_id, peak, round(distance, 2), distance <= tolerance)


@dataclass(frozen=True)
class PointingGame:
    """The pointing game of one run on one subset (:func:`pointing_game`).

    Attributes:
        studies: every scored true-positive lesion study.
        n_lesion_studies: studies of the subset with at least one lesion point (any label
            and call); 0 means the subset cannot be scored at all.
        n_without_map: true-positive lesion studies left out because a view's map is not cached.
        tolerance_px: in reference pixels.
    """

    studies: tuple[StudyPointing, ...]
    n_lesion_studies: int
    n_without_map: int
    tolerance_px: float = TOLERANCE_PX

    @property
    def n(self) -> int:
        return len(self.studies)

    @property
    def hits(self) -> int:
        return sum(s.hit for s in self.studies)


def pointing_game(db: sqlite_utils.Database, run_id: int, threshold: float, subset: str = "test",
                  tolerance: float = TOLERANCE_PX, cohort: str | None = None) -> PointingGame:
    """The pointing game of a run's cached Grad-CAM maps on one subset.

    A study's probability and label are the run's study prediction (``runs.study_predictions``,
    as ``evaluate`` uses them); it is a true positive when its label is metastatic and its
    probability >= ``threshold`` (the study threshold). With ``cohort``, only that cohort's
    studies count (external validation). Only cached maps are read: the peaks stored with them
    (``runs.cached_peaks``), or the map itself for one stored without (``runs.cached_heatmap``).

    Args:
        db: open database.
        run_id: a run with predictions.
        threshold: decision threshold (the one the evaluation uses).
        subset: ``test`` (default), ``val`` or ``train``.
        tolerance: in reference pixels.

    Raises:
        errors.RunNotFound: no such run.
    """
    data = runs.predictions(db, run_id, subset)
    studies = runs.study_predictions(db, run_id, subset)
    study_call = {int(s): (label == 1 and p >= threshold) for s, label, p, keep in zip(
        studies["study_id"].tolist(), studies["label"].tolist(), studies["probability"].tolist(),
        cohorts.in_cohort(db, studies["study_id"].tolist(), cohort), strict=True) if keep}
    points = lesions.points_by_image(db, data["image_id"].tolist())
    by_study: dict[int, list[int]] = {}
    for index, study_id in enumerate(data["study_id"].tolist()):
        by_study.setdefault(study_id, []).append(index)
    candidates: dict[int, list[int]] = {}  # true-positive lesion studies: their row indices
    lesion_studies = 0
    for study_id, rows in sorted(by_study.items()):
        if study_id not in study_call or not any(int(data["image_id"][i]) in points for i in rows):
            continue
        lesion_studies += 1
        if study_call[study_id]:
            candidates[study_id] = rows
    image_ids = [int(data["image_id"][i]) for rows in candidates.values() for i in rows]
    peaks = runs.cached_peaks(db, run_id, image_ids)
    for image_id, (_, value) in list(peaks.items()):
        if value is None:  # a map stored without its peak (before migration 011): read the map
            peaks[image_id] = map_peak(runs.cached_heatmap(db, run_id, image_id))
    marks = ", ".join("?" for _ in image_ids)
    shapes = {image_id: (int(h), int(w)) for image_id, h, w in db.execute(
        f"SELECT id, height, width FROM images WHERE id IN ({marks})", image_ids).fetchall()}
    scored, without_map = [], 0
    for study_id, rows in candidates.items():
        ids = [int(data["image_id"][i]) for i in rows]
        if not all(image_id in peaks for image_id in ids):
            without_map += 1
            continue
        views = {image_id: (*peaks[image_id], float(data["probability"][i])) for image_id, i in zip(ids, rows, strict=True)}
        scored.append(score_study(study_id, views, points, shapes, tolerance))
    return PointingGame(tuple(scored), lesion_studies, without_map, tolerance)


def summary(game: PointingGame, interval: Sequence[float | None]) -> dict[str, object]:
    """The ``"localisation"`` object of ``evaluate --json``: ``hit_rate`` (None when n is 0),
    ``ci95`` (the given interval), ``n``, ``hits``, ``n_without_map``, ``tolerance_px`` and
    ``reference_size``."""
    return {
        "hit_rate": round(game.hits / game.n, 4) if game.n else None,
        "ci95": [None if v is None else round(float(v), 4) for v in interval],
        "n": game.n,
        "hits": game.hits,
        "n_without_map": game.n_without_map,
        "tolerance_px": game.tolerance_px,
        "reference_size": list(REFERENCE_SIZE),
    }


__all__ = ["REFERENCE_SIZE", "TOLERANCE_PX", "PointingGame", "StudyPointing", "View", "is_hit", "map_peak",
           "nominal_distances", "peak_of", "pointing_game", "score_study", "shared_scale", "study_peak", "summary"]
