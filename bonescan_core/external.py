"""External validation: a run judged on another cohort, and how that cohort differs.

:func:`evaluate_cohort` gives the metrics and patient-bootstrap CIs of ``evaluation.evaluate``
on a cohort's external predictions (``bonescan predict RUN --cohort NAME`` stores them),
always at the thresholds chosen on the run's own validation set: ``results["thresholds"]``
(``image`` and ``study``) when the run stored them, else its one ``runs.threshold``; never
a threshold tuned on the external cohort, which would flatter it. Studies without a label
are left out of the metrics and counted (``n_unlabelled``).

:func:`dataset_shift` sets the cohort beside the run's own test set (internal): intensity
histograms, image sizes, label prevalence and mean predicted probability, the first things
to look at when a model does worse on another scanner.

numpy and the database only (no Keras): ``bonescan evaluate --cohort`` starts fast.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from bonescan_core import cohorts, errors, evaluation, pixelstore, runs, splits
from bonescan_core.heavy import sqlite_utils
from bonescan_core.results import UNITS, EvaluationResult, decision_threshold

SHIFT_BINS = 40  # intensity histogram bins over [0, 1] of the scaled counts
SHIFT_MAX_IMAGES = 120  # images decoded per side for the histogram (a seeded sample beyond that)
SHIFT_PIXEL_STEP = 4  # every 4th pixel of every 4th row: 1/16 of a scan is plenty for a histogram


def run_thresholds(db: sqlite_utils.Database, run: runs.Run) -> dict[str, Any]:
    """The run's validation-chosen thresholds (``evaluation.run_thresholds``) as used on new
    studies: ``{"image", "study", "source", "rule", "target"}``; 0.5 (source ``default``)
    where the run has none."""
    chosen, _ = evaluation.run_thresholds(db, run)
    image, source = decision_threshold(None, chosen["image"])
    study, _ = decision_threshold(None, chosen["study"])
    return {"image": image, "study": study, "source": source, "rule": chosen["rule"], "target": chosen["target"]}


def _cohort_studies(db: sqlite_utils.Database, cohort: str) -> np.ndarray:
    return np.asarray(cohorts.study_ids(db, cohort), dtype=np.int64)


def cohort_predictions(db: sqlite_utils.Database, run_id: int, cohort: str) -> dict[str, dict[str, np.ndarray]]:
    """The run's external predictions on a cohort, labelled ones only, at both levels.

    Returns:
        ``{"image": runs.predictions columns, "study": runs.study_predictions columns (label
        as int64)}``, each masked to the cohort's studies that have a label, and
        ``"n_predicted"`` / ``"n_unlabelled"``: (1,) int64 counts of the cohort's predicted
        studies and of those without a label.
    """
    members = _cohort_studies(db, cohort)
    images = runs.predictions(db, run_id, "external")
    studies = runs.study_predictions(db, run_id, "external")
    in_cohort = np.isin(studies["study_id"], members)
    labelled = in_cohort & ~np.isnan(studies["label"])
    image_mask = np.isin(images["study_id"], members) & (images["label"] != runs.UNKNOWN_LABEL)
    study = {key: values[labelled] for key, values in studies.items()}
    study["label"] = study["label"].astype(np.int64)
    return {"image": {key: values[image_mask] for key, values in images.items()}, "study": study,
            "n_predicted": np.array([in_cohort.sum()]), "n_unlabelled": np.array([(in_cohort & ~labelled).sum()])}


def evaluate_cohort(db: sqlite_utils.Database, run_id: int, cohort: str, n_resamples: int = 1000,
                    seed: int = 0, unit: str = "study") -> EvaluationResult:
    """The run's metrics with CIs on one cohort's external predictions (``evaluate --cohort --json``).

    Image level: the cohort's labelled external image predictions at the run's image
    threshold. Study level: its stored study rows (``study_predictions``: max over a per-image
    run's views, a composite run's one output) at the run's study threshold. Both at the
    thresholds of :func:`run_thresholds`; CIs from the patient bootstrap of
    ``evaluation.evaluate``.

    Returns:
        An ``EvaluationResult`` with ``subset`` ``external``, ``cohort``, ``n_unlabelled``
        (studies left out for having no label) and ``study_threshold``.

    Raises:
        errors.RunNotFound: no such run.
        cohorts.CohortError: a bad cohort name.
        evaluation.NoPredictionsError: the run has no external prediction on the cohort, or
            none of those studies has a label.
    """
    name = cohorts.check_cohort(cohort)
    run = runs.get(db, run_id)
    data = cohort_predictions(db, run_id, name)
    n_unlabelled = int(data["n_unlabelled"][0])
    if not data["n_predicted"][0]:
        raise evaluation.NoPredictionsError(
            f"run {run_id} has no predictions on cohort {name!r}; make them with `bonescan predict {run_id} --cohort {name}`")
    if not data["study"]["study_id"].size:
        raise evaluation.NoPredictionsError(
            f"none of the {n_unlabelled} studies of cohort {name!r} predicted by run {run_id} has a label; "
            "label them on the Review page (or `bonescan label`) to validate on them")
    if unit not in UNITS:
        raise errors.InputError(f"unit must be one of {', '.join(UNITS)}; got {unit!r}")
    thresholds = run_thresholds(db, run)
    y_img, p_img, g_img = (data["image"][key] for key in ("label", "probability", "patient_id"))
    y_study, p_study, g_study = (data["study"][key] for key in ("label", "probability", "patient_id"))
    return EvaluationResult(
        run=int(run.id), backbone=run.backbone, threshold=evaluation._clean(thresholds[unit]),
        threshold_source=thresholds["source"], subset="external", n_images=int(y_img.size),
        n_studies=int(y_study.size), n_patients=int(np.unique(g_img).size),
        image_level=evaluation._level(y_img, p_img, g_img, thresholds["image"], n_resamples, seed),
        study_level=evaluation._level(y_study, p_study, g_study, thresholds["study"], n_resamples, seed),
        study_n_patients=int(np.unique(g_study).size),
        bootstrap={"unit": "patient", "interval": "percentile", "level": 0.95, "n_resamples": n_resamples, "seed": seed},
        unit=unit, threshold_rule=thresholds["rule"], threshold_target=thresholds["target"],
        image_threshold=evaluation._clean(thresholds["image"]), study_threshold=evaluation._clean(thresholds["study"]),
        study_aggregation=evaluation.AGGREGATION_TEXT[run.settings.study_aggregate if run.settings.view_mode == "per_image"
                                                      else "composite"],
        cohort=name, n_unlabelled=n_unlabelled,
    )


# --- dataset shift ---------------------------------------------------------------------------

def scaled_intensities(pixels: np.ndarray, display_max: float | None) -> np.ndarray:
    """Counts scaled by the image's display window: ``pixels / display_max`` (its stored 99.5th
    percentile; recomputed when missing or not positive), a sample of every
    :data:`SHIFT_PIXEL_STEP`-th pixel in both axes, as (n,) float64 clipped to [0, 1]."""
    upper = float(display_max) if display_max and display_max > 0 else pixelstore.display_max(pixels)
    sample = np.asarray(pixels, dtype=np.float64)[::SHIFT_PIXEL_STEP, ::SHIFT_PIXEL_STEP].ravel()
    return np.clip(sample / upper if upper > 0 else np.zeros_like(sample), 0.0, 1.0)


def _side(db: sqlite_utils.Database, study_ids: np.ndarray, predictions: dict[str, np.ndarray], rng: np.random.Generator,
          bins: np.ndarray, max_images: int) -> dict[str, Any]:
    """One side of the panel: histogram, sizes, prevalence and mean probability of these studies."""
    ids = [int(s) for s in study_ids]
    rows: list[tuple[int, int, int, float]] = []
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ", ".join("?" for _ in chunk)
        rows += db.execute(f"SELECT id, height, width, display_max FROM images WHERE study_id IN ({marks}) ORDER BY id",
                           chunk).fetchall()
    picked = sorted(rng.choice(len(rows), size=max_images, replace=False)) if len(rows) > max_images else range(len(rows))
    counts = np.zeros(len(bins) - 1, dtype=np.float64)
    for index in picked:
        image_id, _, _, display_max = rows[index]
        blob = db.execute("SELECT pixels FROM images WHERE id = ?", [image_id]).fetchone()[0]
        counts += np.histogram(scaled_intensities(pixelstore.decode_pixels(blob), display_max), bins=bins)[0]
    labels = predictions["label"]
    known = ~np.isnan(labels)
    return {
        "n_studies": len(ids), "n_images": len(rows), "n_images_histogram": len(picked),
        "histogram": (counts / counts.sum()).round(6).tolist() if counts.sum() else [0.0] * len(counts),
        "sizes": dict(Counter(f"{h}x{w}" for _, h, w, _ in rows).most_common()),
        "n_labelled": int(known.sum()),
        "prevalence": round(float(labels[known].mean()), 4) if known.any() else None,
        "mean_probability": round(float(predictions["probability"].mean()), 4) if predictions["probability"].size else None,
        "n_predicted": int(predictions["probability"].size),
    }


def dataset_shift(db: sqlite_utils.Database, run_id: int, cohort: str, seed: int = 0,
                  max_images: int = SHIFT_MAX_IMAGES) -> dict[str, Any]:
    """The run's test set (internal) beside a cohort (external), for the dataset-shift panel.

    Args:
        cohort: the external cohort (every one of its studies; the probabilities are the
            run's external predictions on it, where made).
        seed, max_images: the histogram decodes at most ``max_images`` images per side, a
            seeded sample beyond that (sizes, prevalence and probabilities use every study).

    Returns:
        ``{"run", "cohort", "bins": (SHIFT_BINS + 1,) edges over [0, 1], "internal": side,
        "external": side}``; a side: ``n_studies``, ``n_images``, ``n_images_histogram``,
        ``histogram`` (fraction of sampled pixels per bin of the counts scaled by each
        image's display window, :func:`scaled_intensities`), ``sizes`` ({"HxW": images}, most
        common first), ``n_labelled``, ``prevalence`` (metastatic share of the labelled
        studies, None without one), ``mean_probability`` (mean study probability, None
        without predictions), ``n_predicted`` (studies with a prediction).

    Raises:
        errors.RunNotFound: no such run.
        cohorts.CohortError: a bad name, or a cohort without studies.
    """
    name = cohorts.check_cohort(cohort)
    run = runs.get(db, run_id)
    external_ids = _cohort_studies(db, name)
    if external_ids.size == 0:
        raise cohorts.CohortError(f"cohort {name!r} has no studies (cohorts: {', '.join(cohorts.list_cohorts(db))})")
    split_id = run.split_id if run.split_id is not None else run.results.facts.get("split_id")
    if split_id is None:
        raise errors.InputError(f"run {run_id} has no split; compare a finished run's test set with a cohort")
    test_ids = np.asarray(splits.get_split(db, int(split_id))["subsets"]["test"], dtype=np.int64)
    bins = np.linspace(0.0, 1.0, SHIFT_BINS + 1)
    rng = np.random.default_rng(seed)
    internal = runs.study_predictions(db, run_id, "test")
    external = runs.study_predictions(db, run_id, "external")
    keep = np.isin(external["study_id"], external_ids)
    external = {key: values[keep] for key, values in external.items()}
    return {
        "run": int(run_id), "cohort": name, "bins": bins.round(6).tolist(),
        "internal": _side(db, test_ids, internal, rng, bins, max_images),
        "external": _side(db, external_ids, external, rng, bins, max_images),
    }
