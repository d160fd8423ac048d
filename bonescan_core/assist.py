"""Model-assisted reading: a run's opinion on a study, and the studies whose label it contradicts.

Only out-of-sample opinions. A run's model is shown to a reader, and used to rank labels, only
for studies it did not train on: its validation and test studies (:data:`OUT_OF_SAMPLE`) and
the studies it predicted outside its split (``external``, :mod:`bonescan_core.prediction`).
A study of the run's training subset gets no probability and no map: its prediction would
echo the label it was trained with (:attr:`ModelOpinion.status` ``trained``).

Blind reading stays blind. :func:`model_visible` is the one rule the Review page follows: in
blind mode the model appears only once the reader has saved a read of the study; otherwise
also when the reader turns "Show model" on. A review saved while the model's opinion was on
screen is stored with ``assisted`` = 1 (``review.Review.assisted``, migration
``assisted_reads``), so assisted and unassisted reads can be told apart in agreement and
reader studies.

Likely label errors (:func:`label_errors`) follow confident learning (Northcutt, Jiang and
Chuang 2021, "Confident learning: estimating uncertainty in dataset labels", JAIR 70) for two
classes. Over the run's out-of-sample studies with a current training label
(``review.study_statuses``: the consensus, else the readers' unanimous label), each class's
threshold is the mean probability of that class among the studies labelled with it: t1 =
mean P(metastatic) of studies labelled metastatic, t0 = mean P(no metastasis) = mean (1 - p)
of studies labelled non-metastatic. A study is a candidate when its probability of the other
class reaches that class's threshold (labelled non-metastatic and p >= t1; labelled
metastatic and 1 - p >= t0); its score is the margin, that probability minus the threshold,
in [0, 1]. Worst (largest score) first, ties by study id. A class without an out-of-sample
labelled study has no threshold, so nothing is flagged as belonging to it. The thresholds
adapt to a model that is under- or over-confident for one class, which a fixed 0.5 would not.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bonescan_core import errors, localisation, pixelstore, prediction, runs
from bonescan_core import review as rv
from bonescan_core.heavy import sqlite_utils

OUT_OF_SAMPLE = ("val", "test", "external")  # subsets whose predictions a run made on studies it did not train on
LABEL_VALUES = prediction.LABEL_VALUES  # {"metastatic": 1, "non_metastatic": 0}


@dataclass(frozen=True)
class ModelOpinion:
    """What a run says about one study, as a reader may see it.

    Attributes:
        run_id, study_id: the run and the study.
        status: ``out_of_sample`` (a validation, test or external prediction: ``probability``
            is set), ``trained`` (the study is in the run's training subset: nothing shown),
            ``not_predicted`` (outside the run's split and not predicted yet:
            :func:`predict_study` can) or ``missing`` (in the run's validation or test subset
            but without a stored prediction).
        subset: ``val``, ``test``, ``external``, ``train`` or None.
        probability: the run's study probability of metastasis in [0, 1] (calibrated as the
            run calibrates; a per-image run's study aggregate), only for ``out_of_sample``.
        threshold: the run's validation-chosen study threshold (``evaluation.run_thresholds``).
    """

    run_id: int
    study_id: int
    status: str
    subset: str | None
    probability: float | None
    threshold: float | None

    @property
    def called(self) -> str | None:
        """``metastatic`` / ``non_metastatic`` at the study threshold, None without a probability."""
        if self.probability is None or self.threshold is None:
            return None
        return "metastatic" if self.probability >= self.threshold else "non_metastatic"


def model_visible(blind: bool, show_model: bool, read_by_reader: bool) -> bool:
    """Whether the Review page may show the model's opinion of a study to a reader.

    Args:
        blind: blind mode is on.
        show_model: the reader turned "Show model" on (ignored in blind mode).
        read_by_reader: the reader has saved a read of this study.

    Returns:
        True once the reader has read the study; before that, only outside blind mode with
        "Show model" on (a read saved then is assisted).
    """
    return read_by_reader or (show_model and not blind)


def finished_run(db: sqlite_utils.Database, run_id: int | None) -> runs.Run:
    """The run to ask: ``run_id``, or the newest finished one when None.

    Raises:
        errors.RunNotFound: no such run.
        errors.InputError: the run is not finished, or there is no finished run.
    """
    if run_id is None:
        run_id = runs.newest_done(db)
        if run_id is None:
            raise errors.InputError("no finished run yet: train one (Train page or `bonescan train`) first")
    run = runs.get(db, run_id)
    if run.status != "done":
        raise errors.InputError(f"run {run.id} is {run.status}: only a finished run (status done) has predictions; "
                                "pick one with `bonescan runs --json`")
    return run


def _study_threshold(db: sqlite_utils.Database, run: runs.Run) -> float | None:
    from bonescan_core import evaluation  # numpy-only, but large: only when a threshold is needed

    thresholds, _ = evaluation.run_thresholds(db, run)
    return None if thresholds["study"] is None else float(thresholds["study"])


def out_of_sample_predictions(db: sqlite_utils.Database, run: runs.Run) -> dict[int, tuple[str, float]]:
    """{study id: (subset, study probability)} of the run's validation, test and external studies
    (``runs.study_predictions``, the run's own study aggregate); never a training study."""
    rows = runs.study_predictions(db, run.id, aggregate=run.settings.study_aggregate)
    found: dict[int, tuple[str, float]] = {}
    for study_id, subset, probability in zip(rows["study_id"], rows["subset"], rows["probability"], strict=True):
        if subset in OUT_OF_SAMPLE:
            found[int(study_id)] = (str(subset), float(probability))
    return found


def opinion(db: sqlite_utils.Database, run_id: int, study_id: int) -> ModelOpinion:
    """The run's opinion of a study (:class:`ModelOpinion`); a training study gets none.

    Raises:
        errors.RunNotFound, errors.InputError: as :func:`finished_run`.
    """
    run = finished_run(db, run_id)
    subset = prediction.split_members(db, run).get(study_id)
    if subset == "train":
        return ModelOpinion(run.id, study_id, "trained", "train", None, None)
    threshold = _study_threshold(db, run)
    found = out_of_sample_predictions(db, run).get(study_id)
    if found is not None:
        return ModelOpinion(run.id, study_id, "out_of_sample", found[0], found[1], threshold)
    return ModelOpinion(run.id, study_id, "missing" if subset else "not_predicted", subset, None, threshold)


def predict_study(db: sqlite_utils.Database, db_path: str | os.PathLike[str], run_id: int, study_id: int) -> ModelOpinion:
    """Predict one study outside the run's split now (subset ``external``, with its Grad-CAM maps)
    and return the run's opinion of it. Loads the run's model (Keras).

    Raises:
        prediction.InSplitError: the study belongs to the run's split (train, val or test).
        errors.RunNotFound, errors.InputError: as :func:`finished_run` and ``prediction.choose_studies``.
        runs.ModelUnavailable: the run's model cannot be loaded.
    """
    run = finished_run(db, run_id)
    chosen, _ = prediction.choose_studies(db, run.id, study_ids=[study_id])
    prediction.predict_studies(db, db_path, run, chosen)
    prediction.explain_studies(db, db_path, run.id, chosen)
    return opinion(db, run.id, study_id)


@dataclass(frozen=True)
class Overlay:
    """One image of a study with the run's Grad-CAM map blended in.

    Attributes:
        image_id, view: the image (view may be None).
        rgb: (H0, W0, 3) uint8, the inverted grey display with the map on the shared scale
            (``localisation.shared_scale``: the map times the image's probability, so a
            confident negative stays cold); the plain display when the run has no
            out-of-sample prediction of this image (e.g. a view a composite run does not use).
        probability: the run's probability for the image, None when it has none.
        empty_map: True when the image has a prediction but its Grad-CAM map is zero
            everywhere: no region raised the model's probability of metastasis (the overlay
            is the plain scan, which says nothing by itself).
    """

    image_id: int
    view: str | None
    rgb: np.ndarray
    probability: float | None
    empty_map: bool = False

    @property
    def view_label(self) -> str:
        """``Anterior``, or ``View ?`` when the view is not known."""
        return (self.view or "view ?").capitalize()

    @property
    def name(self) -> str:
        """``Anterior (image 12)``: how a caption names the image."""
        return f"{self.view_label} (image {self.image_id})"


def empty_map_note(overlays: Sequence[Overlay]) -> str | None:
    """A caption for the images whose map is empty, or None when every map shows something."""
    empty = [overlay.name for overlay in overlays if overlay.empty_map]
    if not empty:
        return None
    return (f"{', '.join(empty)}: the Grad-CAM map is empty. No region raised the model's probability of "
            "metastasis, so the overlay is the plain scan.")


def study_overlays(db: sqlite_utils.Database, db_path: str | os.PathLike[str], run_id: int, study_id: int,
                   images: Sequence[dict], opacity: float | None = None) -> list[Overlay]:
    """The Grad-CAM overlays of a study's images under a run, out-of-sample images only.

    Maps come from the run's cache (``runs.cached_explanation``); a missing one is computed
    and stored (``explain.explain_images``, which loads the run's model).

    Args:
        images: the study's images as ``catalog.study_images`` gives them (``id``, ``view``,
            ``pixels``, ``display_max``).
        opacity: colour weight where the map is 1, in [0, 1]; None: ``plots.DEFAULT_OPACITY``.

    Raises:
        errors.InputError: the study is in the run's training subset (no map is shown for it).
        runs.ModelUnavailable: a map must be computed and the run's model cannot be loaded.
    """
    from bonescan_core import plots  # plotly: only for a page that draws

    run = finished_run(db, run_id)
    if prediction.split_members(db, run).get(study_id) == "train":
        raise errors.InputError(f"study {study_id} trained run {run.id}: its map would explain a training prediction")
    marks = ", ".join("?" for _ in images) or "NULL"
    probability = {image_id: float(p) for image_id, p in db.execute(
        f"SELECT image_id, probability FROM predictions WHERE run_id = ? AND subset IN ('val', 'test', 'external') "
        f"AND image_id IN ({marks})", [run.id, *(int(image["id"]) for image in images)]).fetchall()}
    maps = {image_id: cached[0] for image_id in probability
            if (cached := runs.cached_explanation(db, run.id, image_id)) is not None}
    missing = [image_id for image_id in probability if image_id not in maps]
    if missing:
        from bonescan_core import explain  # Keras: only when a map was not computed yet

        maps.update({image_id: done.heatmap for image_id, done in explain.explain_images(db, db_path, run.id, missing).items()})
    overlays = []
    for image in images:
        image_id = int(image["id"])
        empty = False
        if image_id in probability:
            heat = localisation.shared_scale(maps[image_id], probability[image_id])
            rgb = plots.overlay(image["pixels"], heat, opacity=plots.DEFAULT_OPACITY if opacity is None else opacity,
                                upper=image["display_max"])
            empty = localisation.peak_of(maps[image_id]) is None  # no positive value anywhere
        else:
            grey = pixelstore.to_display(image["pixels"], upper=image["display_max"])
            rgb = np.repeat(grey[..., None], 3, axis=2)
        overlays.append(Overlay(image_id, image.get("view"), rgb, probability.get(image_id), empty))
    return overlays


# --- likely label errors ----------------------------------------------------------------------

@dataclass(frozen=True)
class LabelError:
    """A study whose out-of-sample probability contradicts its current label (module docstring).

    Attributes:
        study_id: the study.
        label: its current training label, ``metastatic`` or ``non_metastatic``.
        probability: the run's study probability of metastasis, in [0, 1].
        subset: ``val``, ``test`` or ``external``.
        score: the other class's probability minus that class's threshold, in [0, 1]; larger is worse.
    """

    study_id: int
    label: str
    probability: float
    subset: str
    score: float

    def to_json(self) -> dict[str, object]:
        """``{"study_id", "score"}`` (score to 4 decimals), as ``bonescan queue --json`` prints it."""
        return {"study_id": self.study_id, "score": round(self.score, 4)}


def class_thresholds(labels: np.ndarray, probabilities: np.ndarray) -> dict[int, float | None]:
    """Confident learning's per-class thresholds for two classes.

    Args:
        labels: (n,) int 0/1, the given labels.
        probabilities: (n,) float in [0, 1], P(class 1) out of sample.

    Returns:
        ``{1: mean p of studies labelled 1, 0: mean (1 - p) of studies labelled 0}``, None for a
        class without a study.
    """
    labels, probabilities = np.asarray(labels, dtype=np.int64), np.asarray(probabilities, dtype=np.float64)
    ones, zeros = probabilities[labels == 1], probabilities[labels == 0]
    return {1: float(ones.mean()) if ones.size else None, 0: float((1.0 - zeros).mean()) if zeros.size else None}


def rank_label_errors(study_ids: Sequence[int], labels: Sequence[int], probabilities: Sequence[float]
                      ) -> list[tuple[int, float]]:
    """The candidates for a label error among labelled studies, worst first (module docstring).

    Args:
        study_ids: (n,) study ids.
        labels: (n,) 0/1 given labels (1 = metastatic).
        probabilities: (n,) out-of-sample P(metastatic) in [0, 1].

    Returns:
        [(study id, score)], score in [0, 1] descending, ties by study id.
    """
    ids = np.asarray(study_ids, dtype=np.int64)
    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(probabilities, dtype=np.float64)
    if not (ids.shape == y.shape == p.shape):
        raise ValueError(f"study_ids, labels and probabilities must have one shape; got {ids.shape}, {y.shape}, {p.shape}")
    thresholds = class_thresholds(y, p)
    found = []
    for study_id, label, probability in zip(ids, y, p, strict=True):
        other = 1 - int(label)
        other_probability = probability if other == 1 else 1.0 - probability
        threshold = thresholds[other]
        if threshold is not None and other_probability >= threshold:
            found.append((int(study_id), float(other_probability - threshold)))
    return sorted(found, key=lambda item: (-item[1], item[0]))


def label_errors(db: sqlite_utils.Database, run_id: int | None = None) -> list[LabelError]:
    """The studies whose current label the run's out-of-sample predictions contradict, worst first.

    Args:
        run_id: a finished run; None: the newest finished run.

    Returns:
        :class:`LabelError` rows, largest score first (ties by study id); only studies with a
        current training label and a validation, test or external prediction of the run.

    Raises:
        errors.RunNotFound, errors.InputError: as :func:`finished_run`.
    """
    run = finished_run(db, run_id)
    predicted = out_of_sample_predictions(db, run)
    statuses = rv.study_statuses(db, predicted)
    ids = [s for s in predicted if statuses[s].label in LABEL_VALUES]
    labels = [LABEL_VALUES[statuses[s].label] for s in ids]
    ranked = rank_label_errors(ids, labels, [predicted[s][1] for s in ids])
    return [LabelError(s, statuses[s].label, predicted[s][1], predicted[s][0], score) for s, score in ranked]


# --- the reading queue with the model's orders ---------------------------------------------------------

QUEUE_ORDERS: dict[str, str] = {**rv.QUEUE_ORDERS, "label_errors": "likely label errors first (model vs label)"}
"""Every reading-queue order: the Review page's and ``bonescan queue --order``'s (review's orders
and ``label_errors``, which lives here because it needs a run's out-of-sample predictions)."""


def reading_queue(db: sqlite_utils.Database, reviewer: str, order: str = "unread", run_id: int | None = None
                  ) -> list[tuple[int, float | None]]:
    """Study ids in reading order, with a score where the order has one.

    Args:
        order: one of :data:`QUEUE_ORDERS`: ``label_errors`` (only the candidates of
            :func:`label_errors`, worst first, score = its margin), or an order of
            ``review.review_queue`` (score None).
        run_id: the run ``label_errors`` and ``uncertain`` rank by; None: the newest finished run.

    Returns:
        [(study id, score or None)] in reading order.

    Raises:
        errors.InputError: an unknown order; ``label_errors`` without a finished run, or with a run not done.
        errors.RunNotFound: ``run_id`` does not exist.
    """
    if order not in QUEUE_ORDERS:
        raise errors.InputError(f"unknown queue order {order!r}; one of {', '.join(QUEUE_ORDERS)}")
    if order == "label_errors":
        return [(found.study_id, found.score) for found in label_errors(db, run_id)]
    if order == "uncertain" and run_id is not None:
        finished_run(db, run_id)  # an unknown or unfinished run is refused, not silently replaced
    return [(study_id, None) for study_id in rv.review_queue(db, reviewer, order, run_id=run_id)]
