"""Typed results with one formatter each: training progress and a run's evaluation.

The Train page and ``bonescan train`` show the same :class:`Progress` text; the Evaluate
page, ``bonescan evaluate`` (text and ``--json``) and the HTML report show the same
:class:`EvaluationResult`. Standard library only: the CLI imports this on its fast path.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

DEFAULT_THRESHOLD = 0.5
"""The decision threshold of a run that has none stored (and no threshold is given)."""

TRAINING_PHASES = ("head", "finetune", "full")
"""Progress phases counted in epochs; the others (preparing, features, predicting, saving,
explaining) are passes of their own, counted in batches."""


def decision_threshold(argument: float | None, stored: float | None) -> tuple[float, str]:
    """The threshold to decide at, and where it came from.

    Args:
        argument: a threshold the caller chose (a slider, ``--threshold``), or None.
        stored: the run's validation-chosen ``runs.threshold``, or None when it has none.

    Returns:
        ``(threshold, source)``: the argument (``"argument"``), else the stored one
        (``"run"``; 0.0 is a threshold like any other), else :data:`DEFAULT_THRESHOLD`
        (``"default"``).
    """
    if argument is not None:
        return float(argument), "argument"
    if stored is not None:
        return float(stored), "run"
    return DEFAULT_THRESHOLD, "default"


# --- training progress ------------------------------------------------------------------

@dataclass(frozen=True)
class Progress:
    """A run's progress record (``runs.progress``, see ``training.Reporter.progress``).

    ``epoch`` is 1-based across phases; ``batch`` 1-based within the pass; ``eta_s``
    seconds left or None. Missing fields are None.
    """

    phase: str = "starting"
    epoch: int | None = None
    epochs: int | None = None
    batch: int | None = None
    batches: int | None = None
    loss: float | None = None
    eta_s: float | None = None

    @classmethod
    def from_record(cls, record: Mapping[str, Any] | None, epochs: int | None = None) -> Progress:
        """Parse a stored (or live) progress dict; ``epochs`` is the budget when the record has none."""
        record = record or {}
        return cls(
            phase=record.get("phase") or "starting",
            epoch=record.get("epoch"),
            epochs=record.get("epochs") or epochs,
            batch=record.get("batch"),
            batches=record.get("batches"),
            loss=record.get("loss"),
            eta_s=record.get("eta_s"),
        )

    @property
    def counts_epochs(self) -> bool:
        """Whether this phase is a training phase (progress in epochs) rather than a pass of its own."""
        return self.phase in TRAINING_PHASES

    def fraction(self) -> float:
        """Done so far, in [0, 1]: of the epoch budget in a training phase, else of this pass."""
        batch, batches = self.batch or 0, self.batches or 1
        if self.counts_epochs:
            return min(1.0, ((max(self.epoch or 0, 1) - 1) + batch / batches) / (self.epochs or 1))
        return min(1.0, batch / batches)

    def format(self) -> str:
        """One line, e.g. ``head: epoch 3/20, batch 5/40, loss 0.4123, about 1.5 min left``
        or ``predicting: 3/10`` (a prediction pass is not an epoch)."""
        if self.counts_epochs:
            text = f"{self.phase}: epoch {self.epoch or 0}/{self.epochs or 1}, batch {self.batch or 0}/{self.batches or 1}"
        else:
            text = f"{self.phase}: {self.batch}/{self.batches or 1}" if self.batch else self.phase
        if self.loss is not None:
            text += f", loss {self.loss:.4f}"
        if self.eta_s:
            text += f", about {self.eta_s / 60:.1f} min left"
        return text


# --- evaluation ---------------------------------------------------------------------------

@dataclass(frozen=True)
class MetricCI:
    """A metric's point estimate and 95% interval; None where undefined on the data."""

    value: float | None
    ci95: tuple[float | None, float | None] = (None, None)

    def value_text(self, digits: int = 3) -> str:
        """``0.812``, or ``n/a`` when undefined."""
        return "n/a" if self.value is None else f"{self.value:.{digits}f}"

    def interval_text(self, digits: int = 3) -> str:
        """``0.700 to 0.900``, or ``""`` without an interval."""
        low, high = self.ci95
        return "" if low is None or high is None else f"{low:.{digits}f} to {high:.{digits}f}"

    def format(self, digits: int = 3) -> str:
        """``0.812 (95% CI 0.700 to 0.900)``; without an interval just the value or ``n/a``."""
        interval = self.interval_text(digits)
        return self.value_text(digits) + (f" (95% CI {interval})" if interval else "")

    def as_json(self) -> dict[str, Any]:
        return {"value": self.value, "ci95": list(self.ci95)}


def _clean(value: float, digits: int) -> float | None:
    value = float(value)
    return None if math.isnan(value) else round(value, digits)


@dataclass(frozen=True)
class LevelResult:
    """Metrics and confusion counts at one level (images, or studies)."""

    metrics: dict[str, MetricCI]
    confusion: dict[str, int]  # tp, fp, tn, fn

    @classmethod
    def from_values(cls, values: Mapping[str, float], intervals: Mapping[str, tuple[float, float]],
                    confusion: Mapping[str, int], names: tuple[str, ...], digits: int) -> LevelResult:
        """From ``point_metrics`` values, ``bootstrap_ci`` intervals (nan where undefined) and counts;
        rounded to ``digits`` decimals, nan becoming None."""
        return cls(
            metrics={name: MetricCI(_clean(values[name], digits),
                                    (_clean(intervals[name][0], digits), _clean(intervals[name][1], digits)))
                     for name in names},
            confusion={key: int(value) for key, value in confusion.items()},
        )

    def as_json(self) -> dict[str, Any]:
        return {"metrics": {name: metric.as_json() for name, metric in self.metrics.items()}, "confusion": dict(self.confusion)}

    def text_lines(self) -> list[str]:
        """One line per metric, then the confusion counts (what ``bonescan evaluate`` prints)."""
        lines = []
        for name, metric in self.metrics.items():
            interval = metric.interval_text()
            lines.append(f"  {name:<12} {metric.value_text()}" + (f"  (95% CI {interval})" if interval else ""))
        lines.append("  confusion    " + ", ".join(f"{key} {value}" for key, value in self.confusion.items()))
        return lines


UNITS = ("study", "image")
"""The units of analysis :func:`evaluation.evaluate` reports on (the study is the primary one)."""

UNIT_LABELS = {"study": "per study", "image": "per image"}
"""How a table, card, plot or report names the unit it shows."""


@dataclass(frozen=True)
class EvaluationResult:
    """One run evaluated on one subset (``evaluation.evaluate``).

    ``unit``: ``study`` (the primary unit, one row per study) or ``image`` (the paper's unit):
    the level that :attr:`metrics`, :attr:`confusion`, ``threshold`` and the top of
    :meth:`as_json` describe. Both levels are always computed, each at its own threshold:
    ``image_threshold`` chosen on validation images, ``study_threshold`` on validation studies
    (by ``threshold_rule``; an explicit threshold applies to both).
    ``threshold_source``: ``argument``, ``run``, ``derived`` (the study threshold of a run
    trained before study thresholds were stored, chosen now on its stored validation
    predictions) or ``default`` (:func:`decision_threshold`).
    ``study_level``: the metrics with one row per study (``study_aggregation`` says how), with
    ``study_n_patients`` patients; None when not computed. ``notes``: sentences a reader needs.
    ``cohort`` and ``n_unlabelled``: on an external cohort (``external.evaluate_cohort``), its
    name and how many of its predicted studies have no label (left out); None otherwise.
    ``localisation``: the Grad-CAM pointing game (``evaluation.localisation_summary``:
    ``hit_rate``, ``ci95``, ``n``, ...), None when no study of the subset has lesion points.
    """

    run: int
    backbone: str
    threshold: float
    threshold_source: str
    subset: str
    n_images: int
    n_studies: int
    n_patients: int
    image_level: LevelResult
    study_level: LevelResult | None = None
    study_n_patients: int | None = None
    bootstrap: dict[str, Any] = field(default_factory=dict)
    unit: str = "image"
    threshold_rule: str | None = None
    threshold_target: float | None = None
    image_threshold: float | None = None
    study_threshold: float | None = None
    study_aggregation: str = "max probability over the study's views"
    notes: tuple[str, ...] = ()
    calibration: dict[str, Any] | None = None  # calibration.summary on the subset's studies
    subgroups: list[dict[str, Any]] | None = None  # subgroups.run_subgroups rows
    cohort: str | None = None
    n_unlabelled: int | None = None
    localisation: dict[str, Any] | None = None

    @property
    def unit_label(self) -> str:
        """``per study`` or ``per image``: what every table, card and plot of this result says."""
        return UNIT_LABELS[self.unit]

    @property
    def metrics(self) -> dict[str, MetricCI]:
        """The metrics of :attr:`unit`."""
        return self.level(self.unit).metrics

    @property
    def confusion(self) -> dict[str, int]:
        """The confusion counts of :attr:`unit`."""
        return self.level(self.unit).confusion

    def level(self, name: str) -> LevelResult:
        """``"image"`` or ``"study"`` level results."""
        if name == "study":
            if self.study_level is None:
                raise ValueError("this result has no study-level metrics")
            return self.study_level
        return self.image_level

    def level_threshold(self, name: str) -> float:
        """The threshold the ``"image"`` or ``"study"`` level was decided at."""
        chosen = self.study_threshold if name == "study" else self.image_threshold
        return self.threshold if chosen is None else chosen

    def as_json(self) -> dict[str, Any]:
        """The ``evaluate --json`` object (``docs/cli.md``): ``run, backbone, threshold,
        threshold_source, subset, n_images, n_studies, n_patients, metrics {name: {value,
        ci95}}, confusion {tp, fp, tn, fn}`` of :attr:`unit`, then ``unit``,
        ``threshold_rule``, ``threshold_target``, ``image_level``, ``study_level``, ``notes``,
        ``bootstrap``, ``calibration`` (``calibration.summary``), ``subgroups``
        (``subgroups.run_subgroups``) and ``localisation`` (absent when no study has lesion
        points); on an external cohort also ``cohort`` and ``n_unlabelled``."""
        out: dict[str, Any] = {
            "run": self.run, "backbone": self.backbone, "threshold": self.threshold,
            "threshold_source": self.threshold_source, "subset": self.subset, "n_images": self.n_images,
            "n_studies": self.n_studies, "n_patients": self.n_patients, **self.level(self.unit).as_json(),
            "unit": self.unit, "threshold_rule": self.threshold_rule, "threshold_target": self.threshold_target,
            "image_level": {"threshold": self.level_threshold("image"), "n_images": self.n_images,
                            "n_patients": self.n_patients, **self.image_level.as_json()},
        }
        if self.study_level is not None:
            out["study_level"] = {"aggregation": self.study_aggregation, "threshold": self.level_threshold("study"),
                                  "n_studies": self.n_studies, "n_patients": self.study_n_patients,
                                  **self.study_level.as_json()}
        out["notes"] = list(self.notes)
        if self.bootstrap:
            out["bootstrap"] = dict(self.bootstrap)
        if self.calibration is not None:
            out["calibration"] = dict(self.calibration)
        if self.subgroups is not None:
            out["subgroups"] = [dict(row) for row in self.subgroups]
        if self.cohort is not None:
            out["cohort"] = self.cohort
            out["n_unlabelled"] = self.n_unlabelled
        if self.localisation is not None:  # absent without lesion points: the output is what it was
            out["localisation"] = dict(self.localisation)
        return out

    def to_record(self) -> str:
        """Every field as JSON text, for storing (``assessment.stored_evaluation``); read back with
        :meth:`from_record`. Floats keep their exact value (JSON writes the shortest repr that
        reads back to the same float; nan as ``NaN``)."""
        return json.dumps(asdict(self))

    @classmethod
    def from_record(cls, text: str) -> EvaluationResult:
        """The result :meth:`to_record` wrote: ``as_json()`` of it is the original's."""
        record = json.loads(text)

        def level(value: Mapping[str, Any] | None) -> LevelResult | None:
            if value is None:
                return None
            return LevelResult(metrics={name: MetricCI(metric["value"], tuple(metric["ci95"]))
                                        for name, metric in value["metrics"].items()},
                               confusion=dict(value["confusion"]))

        known = {f.name for f in fields(cls)}
        record = {name: value for name, value in record.items() if name in known}
        record["image_level"] = level(record["image_level"])
        record["study_level"] = level(record.get("study_level"))
        record["notes"] = tuple(record.get("notes", ()))
        return cls(**record)

    def to_json_text(self) -> str:
        """:meth:`as_json` as indented JSON text (the ``metrics.json`` download and bundle file)."""
        return json.dumps(self.as_json(), indent=2)

    def headline(self) -> str:
        """``run 3 (densenet121), test, per study: 60 images, 30 studies, threshold 0.450 (youden)``."""
        rule = self.threshold_rule or "stored"
        if self.threshold_target is not None:
            rule += f" {self.threshold_target:g}"
        where = self.subset if self.cohort is None else f"cohort {self.cohort} (external)"
        text = (f"run {self.run} ({self.backbone}), {where}, {self.unit_label}: {self.n_images} images, "
                f"{self.n_studies} studies, threshold {self.threshold:.3f} ({rule}, {self.threshold_source})")
        return text if self.n_unlabelled is None else f"{text}; {self.n_unlabelled} unlabelled studies left out"

    def format_text(self) -> str:
        """What ``bonescan evaluate`` prints without ``--json``: the headline, the metrics of
        :attr:`unit`, the pointing game, then any notes (``note: ...``)."""
        return "\n".join([self.headline(), *self.level(self.unit).text_lines(), *self.localisation_lines(),
                          *(f"note: {n}" for n in self.notes)])

    def localisation_text(self) -> str | None:
        """The pointing game in one sentence (the Evaluate page, :meth:`format_text`); None
        without lesion points."""
        if self.localisation is None:
            return None
        loc = self.localisation
        if loc["hit_rate"] is None:
            text = "no true-positive study with lesion points to score"
        else:
            low, high = loc["ci95"]
            text = (f"{loc['hit_rate']:.3f} (95% CI {low:.3f} to {high:.3f}): the map peak lies within "
                    f"{loc['tolerance_px']:g} px (at 1024x256) of a lesion in {loc['hits']} of {loc['n']} "
                    "true-positive lesion studies")
        if loc.get("n_without_map"):
            text += f"; {loc['n_without_map']} left out, their maps not computed yet"
        return text

    def localisation_lines(self) -> list[str]:
        """The pointing-game line of :meth:`format_text` (none without lesion points)."""
        text = self.localisation_text()
        return [] if text is None else [f"  localisation {text}"]
