"""Readers against the model: each reader's sensitivity and specificity, and their agreement with the model.

Only studies with an out-of-sample prediction of the run count: its ``test`` studies, or its
``external`` predictions (of one cohort, if given). Training and validation studies never do:
the model saw the first and its threshold was chosen on the second.

**Reference (leave-one-reader-out).** A reader is scored against a reference built without
their own reads. For reader R and study s the reference is, in order:

1. the newest adjudication of s, when its adjudicator is not R (an adjudicator decides, having
   seen the readers' verdicts, R's among them: see ``docs/statistics.md``);
2. otherwise the unanimous verdict of the study's other readers (at least one; ``import``
   labels count only when no person other than R read it, as in ``review.study_statuses``).

A reference of ``exclude``, disagreeing other readers, or no other reader at all leave the
study out of R's sensitivity and specificity (counted as ``n_no_reference``). A study R
excluded is not scored either (``n_excluded``).

**Model on the same studies.** The model's sensitivity and specificity are given on exactly
the studies each reader is scored on, against that reader's reference, at the run's
validation-chosen study threshold, with the paired patient-bootstrap difference (reader minus
model). The ROC curve itself is drawn on every labelled study of the subset with the label the
run stored (the label of its split, or of the external prediction).

**Intervals.** 95% percentile intervals from the patient-level bootstrap of
``evaluation.bootstrap_ci`` (1,000 resamples, seed 0 by default): a reader's call is scored as a
probability of 0 or 1 at threshold 0.5, so the reader, the model and their difference are drawn
from the same resamples of patients.

**Kappa.** Cohen's kappa (``agreement.cohen_kappa``, Fleiss-Cohen-Everitt interval) between the
model's call at its study threshold and the reader's label, over the subset's predicted studies
the reader labelled (excluded ones left out); no reference is needed.

numpy and the database only (no Keras, no plotting).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bonescan_core import agreement, cohorts, errors, evaluation, runs, studystats
from bonescan_core.heavy import sqlite_utils
from bonescan_core.results import MetricCI, decision_threshold
from bonescan_core.review import LABELS, SYSTEM_REVIEWERS, latest_reviews, verdict

OUT_OF_SAMPLE = ("test", "external")
"""The subsets whose studies a reader comparison may use."""

N_RESAMPLES = 1000
DIGITS = 4


def _clean(value: float) -> float | None:
    value = float(value)
    return None if math.isnan(value) else round(value, DIGITS)


def _metric(value: float, interval: Sequence[float]) -> MetricCI:
    return MetricCI(_clean(value), (_clean(interval[0]), _clean(interval[1])))


def study_reads(db: sqlite_utils.Database, study_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """Each study's current reads: ``{study_id: {"readers": {name: verdict}, "system": {name: verdict},
    "adjudication": (adjudicator, verdict) or None}}``; verdicts ``metastatic``, ``non_metastatic``
    or ``exclude``, each reviewer's latest (``review.latest_reviews``); the newest adjudication wins."""
    reads: dict[int, dict[str, Any]] = {int(s): {"readers": {}, "system": {}, "adjudication": None} for s in study_ids}
    for row in latest_reviews(db, reads):  # ordered by review id: a later adjudication replaces an earlier one
        entry = reads[row["study_id"]]
        if row["adjudication"]:
            entry["adjudication"] = (row["reviewer"], verdict(row))
        elif row["reviewer"] in SYSTEM_REVIEWERS:
            entry["system"][row["reviewer"]] = verdict(row)
        else:
            entry["readers"][row["reviewer"]] = verdict(row)
    return reads


def reference_without(read: Mapping[str, Any], reader: str) -> str | None:
    """The study's reference label with ``reader``'s own reads left out (module docstring), or None.

    Args:
        read: one entry of :func:`study_reads`.
        reader: the reader being scored.

    Returns:
        ``metastatic`` or ``non_metastatic``; None when the reference is ``exclude``, the
        other readers disagree, or nobody else read the study.
    """
    adjudication = read["adjudication"]
    if adjudication is not None and adjudication[0] != reader:
        decided = adjudication[1]
    else:
        others = {name: v for name, v in read["readers"].items() if name != reader} or dict(read["system"])
        verdicts = set(others.values())
        decided = verdicts.pop() if len(verdicts) == 1 else None
    return decided if decided in LABELS else None


@dataclass(frozen=True)
class ReaderScore:
    """One reader against the leave-one-out reference and against the model (``as_json`` for JSON)."""

    reader: str
    n_read: int  # the subset's predicted studies the reader labelled (metastatic / non_metastatic)
    n_excluded: int  # ... and excluded
    n_scored: int  # labelled studies with a reference without this reader
    n_no_reference: int
    confusion: dict[str, int]  # tp, fp, tn, fn of the reader against the reference
    sensitivity: MetricCI
    specificity: MetricCI
    model_sensitivity: MetricCI  # the model on the same studies, same reference, at its study threshold
    model_specificity: MetricCI
    delta_sensitivity: MetricCI  # reader minus model, paired patient bootstrap
    delta_specificity: MetricCI
    kappa: float | None  # model vs reader, over the n_read studies
    kappa_ci95: tuple[float | None, float | None]
    percent_agreement: float | None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"reader": self.reader, "n_read": self.n_read, "n_excluded": self.n_excluded,
                               "n_scored": self.n_scored, "n_no_reference": self.n_no_reference,
                               "confusion": dict(self.confusion)}
        for name in ("sensitivity", "specificity", "model_sensitivity", "model_specificity", "delta_sensitivity",
                     "delta_specificity"):
            out[name] = getattr(self, name).as_json()
        out.update(kappa=self.kappa, kappa_ci95=list(self.kappa_ci95), percent_agreement=self.percent_agreement)
        return out


@dataclass(frozen=True)
class ReaderComparison:
    """Every reader of a run's out-of-sample studies against the model (:func:`compare`)."""

    run: int
    subset: str  # "test" or "external"
    cohort: str | None
    threshold: float  # the run's study threshold (validation-chosen; 0.5 when it has none)
    n_studies: int  # labelled studies of the subset: the ROC curve's
    n_patients: int
    roc: dict[str, Any]  # evaluation.roc_points of those studies
    readers: list[ReaderScore] = field(default_factory=list)
    bootstrap: dict[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        """``test studies`` or ``external studies of cohort X``."""
        return "test studies" if self.subset == "test" else (
            f"external studies of cohort {self.cohort}" if self.cohort else "external studies")

    def as_json(self) -> dict[str, Any]:
        return {"run": self.run, "subset": self.subset, "cohort": self.cohort, "threshold": self.threshold,
                "n_studies": self.n_studies, "n_patients": self.n_patients,
                "auc": _clean(self.roc["auc"]),
                "readers": [r.as_json() for r in self.readers], "bootstrap": dict(self.bootstrap)}

    def table_rows(self) -> list[dict[str, Any]]:
        """One row per reader for a table (the Evaluate page, the report): counts and ``0.812 (95% CI ...)`` texts."""
        return [{"reader": r.reader, "studies scored": r.n_scored, "sensitivity": r.sensitivity.format(),
                 "specificity": r.specificity.format(), "model sensitivity": r.model_sensitivity.format(),
                 "model specificity": r.model_specificity.format(), "Δ sensitivity (reader − model)": r.delta_sensitivity.format(),
                 "Δ specificity (reader − model)": r.delta_specificity.format(),
                 "kappa vs model": MetricCI(r.kappa, r.kappa_ci95).format(), "studies read": r.n_read,
                 "excluded": r.n_excluded, "no reference": r.n_no_reference}
                for r in self.readers]


def _subset_studies(db: sqlite_utils.Database, run: runs.Run, subset: str, cohort: str | None) -> dict[str, np.ndarray]:
    if subset not in OUT_OF_SAMPLE:
        raise errors.InputError(f"readers are compared with the model on out-of-sample studies only: subset must be "
                                f"one of {', '.join(OUT_OF_SAMPLE)}; got {subset!r}")
    if cohort is not None and subset != "external":
        raise errors.InputError("a cohort names external studies: use subset external with a cohort")
    studies = runs.study_predictions(db, run.id, subset, aggregate=run.settings.study_aggregate)
    if cohort is not None:
        keep = np.asarray(cohorts.in_cohort(db, studies["study_id"].tolist(), cohorts.check_cohort(cohort)), dtype=bool)
        studies = {key: values[keep] for key, values in studies.items()}
    if not studies["study_id"].size:
        raise evaluation.NoPredictionsError(
            f"run {run.id} has no {subset} predictions" + (f" on cohort {cohort!r}" if cohort else "")
            + "; compare readers on a finished run's test studies, or predict a cohort with `bonescan predict`")
    return studies


def _score(reader: str, reads: Mapping[int, Mapping[str, Any]], studies: Mapping[str, np.ndarray], threshold: float,
           n_resamples: int, seed: int) -> ReaderScore | None:
    """One reader's :class:`ReaderScore`; None when the reader read none of the studies."""
    ids, patients, probabilities = studies["study_id"], studies["patient_id"], studies["probability"]
    own = [(i, reads[int(s)]["readers"].get(reader)) for i, s in enumerate(ids)]
    read_at = [i for i, v in own if v is not None]
    if not read_at:
        return None
    labelled = [i for i in read_at if own[i][1] in LABELS]
    scored, reference = [], []
    for i in labelled:
        truth = reference_without(reads[int(ids[i])], reader)
        if truth is not None:
            scored.append(i)
            reference.append(int(truth == "metastatic"))
    y = np.asarray(reference, dtype=np.int64)
    calls = np.asarray([float(own[i][1] == "metastatic") for i in scored])
    p = probabilities[scored]
    groups = patients[scored]
    nan2 = (math.nan, math.nan)
    if y.size:
        reader_ci = evaluation.bootstrap_ci(y, calls, groups, 0.5, n_resamples=n_resamples, seed=seed)
        model_ci = evaluation.bootstrap_ci(y, p, groups, threshold, n_resamples=n_resamples, seed=seed)
        paired = studystats.paired_bootstrap(y, calls, p, groups, 0.5, threshold, n_resamples=n_resamples, seed=seed)
        reader_point = evaluation.point_metrics(y, calls, 0.5)
        model_point = evaluation.point_metrics(y, p, threshold)
        counts = evaluation.confusion(y, calls, 0.5)
    else:
        reader_ci = model_ci = {"recall": nan2, "specificity": nan2}
        reader_point = model_point = {"recall": math.nan, "specificity": math.nan}
        paired = {name: {"value": math.nan, "ci95": nan2} for name in ("delta_sensitivity", "delta_specificity")}
        counts = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    model_calls = ["metastatic" if probabilities[i] >= threshold else "non_metastatic" for i in labelled]
    reader_labels = [own[i][1] for i in labelled]
    kappa, kappa_ci = agreement.cohen_kappa(reader_labels, model_calls) if labelled else (math.nan, nan2)
    agree = 100.0 * sum(a == b for a, b in zip(reader_labels, model_calls, strict=True)) / len(labelled) if labelled else math.nan
    return ReaderScore(
        reader=reader, n_read=len(labelled), n_excluded=len(read_at) - len(labelled), n_scored=int(y.size),
        n_no_reference=len(labelled) - int(y.size), confusion={k: int(v) for k, v in counts.items()},
        sensitivity=_metric(reader_point["recall"], reader_ci["recall"]),
        specificity=_metric(reader_point["specificity"], reader_ci["specificity"]),
        model_sensitivity=_metric(model_point["recall"], model_ci["recall"]),
        model_specificity=_metric(model_point["specificity"], model_ci["specificity"]),
        delta_sensitivity=_metric(paired["delta_sensitivity"]["value"], paired["delta_sensitivity"]["ci95"]),
        delta_specificity=_metric(paired["delta_specificity"]["value"], paired["delta_specificity"]["ci95"]),
        kappa=_clean(kappa), kappa_ci95=(_clean(kappa_ci[0]), _clean(kappa_ci[1])), percent_agreement=_clean(agree),
    )


def compare(db: sqlite_utils.Database, run_id: int, subset: str = "test", cohort: str | None = None,
            n_resamples: int = N_RESAMPLES, seed: int = 0) -> ReaderComparison:
    """Every reader of the run's out-of-sample studies against the leave-one-out reference and the model.

    Args:
        run_id: a run with predictions on ``subset``.
        subset: ``test`` (default) or ``external`` (then ``cohort`` may narrow it to one cohort).
        n_resamples, seed: of the patient bootstrap behind every interval.

    Returns:
        A :class:`ReaderComparison`: the model's ROC points on the subset's labelled studies (the
        run's stored labels), its study threshold, and one :class:`ReaderScore` per reader who read
        at least one of the subset's studies, by name. Readers are people: ``import`` labels and
        adjudications are not readers.

    Raises:
        errors.InputError: a subset other than test/external, or a cohort without ``external``.
        errors.RunNotFound: no such run.
        evaluation.NoPredictionsError: the run has no predictions there.
    """
    run = runs.get(db, run_id)
    studies = _subset_studies(db, run, subset, cohort)
    chosen, _ = evaluation.run_thresholds(db, run)
    threshold, _ = decision_threshold(None, chosen["study"])
    reads = study_reads(db, studies["study_id"].tolist())
    names = sorted({name for entry in reads.values() for name in entry["readers"]})
    scores = [score for name in names
              if (score := _score(name, reads, studies, threshold, n_resamples, seed)) is not None]
    known = np.isfinite(studies["label"])
    labels = studies["label"][known].astype(np.int64)
    roc = evaluation.roc_points(labels, studies["probability"][known])  # empty, auc nan, with one class
    return ReaderComparison(
        run=run.id, subset=subset, cohort=cohort, threshold=float(threshold), n_studies=int(labels.size),
        n_patients=int(np.unique(studies["patient_id"][known]).size), roc=roc, readers=scores,
        bootstrap={"unit": "patient", "interval": "percentile", "level": 0.95, "n_resamples": n_resamples, "seed": seed},
    )


def summary_text(result: ReaderComparison) -> str:
    """The comparison in a sentence or two (the Evaluate page, the report, the model card)."""
    if not result.readers:
        return (f"No reader has read the run's {result.where}: read them on the Review page to compare readers "
                "with the model.")
    parts = []
    for r in result.readers:
        if r.n_scored:
            parts.append(f"{r.reader}: sensitivity {r.sensitivity.format()}, specificity {r.specificity.format()} on "
                         f"{r.n_scored} studies (model on the same studies {r.model_sensitivity.value_text()} / "
                         f"{r.model_specificity.value_text()}); kappa with the model "
                         f"{MetricCI(r.kappa, r.kappa_ci95).format()}")
        else:
            parts.append(f"{r.reader}: no study with a reference without this reader ({r.n_read} read)")
    return (f"Readers on the run's {result.where}, each against the reference without their own reads, the model at "
            f"its study threshold {result.threshold:.3f}. " + "; ".join(parts) + ".")
