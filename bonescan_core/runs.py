"""The run store: the one owner of the ``runs``, ``epochs``, ``predictions``, ``explanations``
and ``features`` tables and of the runs folder.

Every other module reads and writes runs through here: the job queue and its worker
(``jobs``), training's feature cache (``training``), Grad-CAM's map cache (``explain``),
evaluation, review and the pages. A run comes out as a typed :class:`Run`: its settings
as a :class:`TrainConfig` (what was asked for, ``runs.config``) and its results apart
(:class:`RunResults`: threshold, throughput, device, model file and the facts training
learned, ``runs.results``), so neither can be mistaken for the other.

Runs folder. Trained models live in ``runs/`` beside the database, in a folder of their
own per database (:func:`run_folder`: ``runs/<database stem>-<8 hex of its path's
sha256>/run-<id>/model.keras``), so that two databases in one folder never overwrite each
other's ``run-<id>``. A run's model path is stored relative to ``runs/`` (``weights_path``),
so runs saved before the per-database folders (``run-<id>/model.keras``) are still found.

Models. :func:`load_model` loads a finished run's model with Keras's safe mode after
checking its sha256, and keeps the last ``MODEL_CACHE_SIZE`` in memory. Keras is imported
only there; importing this module does not import Keras (``TrainConfig`` is usable by the
pages and ``bonescan train --queue`` without TensorFlow).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bonescan_core import db as dbm
from bonescan_core import errors, pixelstore
from bonescan_core.heavy import keras_module, sqlite_utils
from bonescan_core.models import BACKBONES, DEFAULT_SIZE, MODES, Backbone, get_backbone, weights_kind
from bonescan_core.preprocess import AUGMENT_KEYS, PAPER_AUGMENT, VIEW_MODES
from bonescan_core.results import DEFAULT_THRESHOLD

THRESHOLD_RULES = ("youden", "sensitivity", "npv", "fixed")  # studystats.choose_threshold's rules (a test keeps them equal)
TARGET_RULES = ("sensitivity", "npv")  # the rules that need TrainConfig.threshold_target
STUDY_AGGREGATES = ("max", "mean")  # how a per-image run's views make its study probability
CALIBRATION_METHODS = ("temperature", "platt", "none")
LR_SCHEDULES = ("none", "cosine", "plateau")  # learning-rate schedule per phase (training._learning_rate)
RUNS_FOLDER = "runs"
MODEL_CACHE_SIZE = 2  # loaded run models kept in memory (a DenseNet121 ~30 MB, a ResNet50 ~100 MB)
SUBSETS = ("train", "val", "test")
UNKNOWN_LABEL = -1  # runs.predictions' label of an external study nobody has labelled (stored as NULL)


class ModelUnavailable(errors.Unavailable):
    """A run's saved model cannot be used (none saved, file missing, changed or unreadable); the message says what to do."""


# --- settings -----------------------------------------------------------------------------------

def _paper_augment() -> dict[str, float | bool]:
    return dict(PAPER_AUGMENT)


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a run (stored as JSON in ``runs.config``; results go to ``runs.results``).

    Attributes:
        backbone: ``resnet50`` | ``vgg19`` | ``densenet121`` | ``scintinet``.
        weights: ``imagenet``, ``none`` or a path to a weights file. None (and for ``mode``,
            ``image_size`` and ``view_mode`` too): the backbone's default (``Backbone.default_*``).
        mode: ``fast`` | ``head`` | ``finetune`` | ``full`` (``training`` module docstring).
        epochs: the epoch budget (shared by the phases of ``finetune``).
        batch_size: images per batch.
        learning_rate: Adam learning rate of the head phase (and of ``full``/``fast``).
        finetune_learning_rate: Adam learning rate after unfreezing (``finetune``).
        image_size: (H, W) model input.
        seed: seeds Keras, NumPy and the split (when ``split_id`` is None).
        split_id: the split to use; None reuses the latest split of the current labels
            with this seed and the default 30 % / 15 % fractions, or makes one.
        augment: augmentation settings (``preprocess.PAPER_AUGMENT``); {} for none; None:
            the backbone's default (paper; ``scintinet``: none). Ignored in ``fast`` mode.
        view_mode: ``per_image`` (paper), ``composite`` (both views side by side in one
            frame) or ``fusion`` (one shared backbone over the anterior and the mirrored
            posterior view, pooled features combined: one output per study; not in ``fast``
            mode).
        threshold_rule: how the decision thresholds are chosen on the validation subset
            (``studystats.choose_threshold``): ``youden`` (default), ``sensitivity`` or ``npv``
            (the highest threshold reaching ``threshold_target``), or ``fixed`` (0.5).
        threshold_target: the target of rule ``sensitivity`` / ``npv`` in (0, 1], e.g. 0.90;
            None for ``youden`` and ``fixed``.
        study_aggregate: a per-image run's study probability from its views: ``max`` (the
            most suspicious view decides, default) or ``mean``. Composite and fusion runs have
            one output per study and ignore it.
        patience: early stopping patience in epochs, on val_loss (best weights restored);
            None: the backbone's default (5; ``scintinet``: 10).
        dropout: rate before the last Dense layer.
        class_weights: weight the loss by inverse class frequency of the training subset
            (off by default: the validation-chosen threshold handles the imbalance, and the
            weights would shift the output's log-odds by about log(w1 / w0)).
        max_train_images: use at most this many training samples (seeded choice); None: all.
        calibration: ``temperature`` (default), ``platt`` or ``none``: the recalibration fitted
            on the validation predictions after training (``calibration`` module); thresholds
            are chosen on the calibrated validation probabilities.
        deterministic: seed every library and switch on TensorFlow's deterministic ops
            (slower on a GPU; the same run repeats exactly on the same machine and versions).
        lr_schedule: ``none`` (constant), ``cosine`` (cosine decay to 1 % over each phase's
            epoch budget) or ``plateau`` (halve when val_loss has not improved for
            max(1, patience // 2) epochs).
    """

    backbone: str
    weights: str = None  # type: ignore[assignment] - None only until __post_init__ fills the backbone's default
    mode: str = None  # type: ignore[assignment]
    epochs: int = 20
    batch_size: int = 16
    learning_rate: float = 1e-3
    finetune_learning_rate: float = 1e-5
    image_size: tuple[int, int] = None  # type: ignore[assignment]
    seed: int = 0
    split_id: int | None = None
    augment: Mapping[str, Any] = None  # type: ignore[assignment]
    view_mode: str = None  # type: ignore[assignment]
    threshold_rule: str = "youden"
    threshold_target: float | None = None
    study_aggregate: str = "max"
    patience: int = None  # type: ignore[assignment]
    dropout: float = 0.3
    class_weights: bool = False
    max_train_images: int | None = None
    calibration: str = "temperature"
    deterministic: bool = False
    lr_schedule: str = "none"

    def __post_init__(self) -> None:
        bb = BACKBONES.get(self.backbone)
        defaults = ((bb.default_weights, bb.default_mode, bb.default_size, bb.default_view_mode) if bb
                    else ("imagenet", "finetune", DEFAULT_SIZE, "per_image"))
        for name, default in zip(("weights", "mode", "image_size", "view_mode"), defaults, strict=True):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        if self.augment is None:
            object.__setattr__(self, "augment", _paper_augment() if bb is None or bb.default_augment == "paper" else {})
        if self.patience is None:
            object.__setattr__(self, "patience", bb.default_patience if bb else 5)
        object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
        object.__setattr__(self, "augment", dict(self.augment or {}))
        object.__setattr__(self, "weights", str(self.weights))
        problems = []
        if self.backbone not in BACKBONES:
            problems.append(f"backbone must be one of {', '.join(BACKBONES)}")
        if self.mode not in MODES:
            problems.append(f"mode must be one of {', '.join(MODES)}")
        elif bb and self.mode not in bb.modes:
            problems.append(f"{bb.name} trains only in mode {', '.join(bb.modes)} (random weights: nothing to freeze)")
        if bb and not bb.has_imagenet and weights_kind(self.weights) == "imagenet":
            problems.append(f"{bb.name} has no ImageNet weights: use weights none or a weights file")
        if self.view_mode not in VIEW_MODES:
            problems.append(f"view_mode must be one of {', '.join(VIEW_MODES)}")
        elif self.view_mode == "fusion" and self.mode == "fast":
            problems.append("view_mode fusion trains the backbone over both views and cannot use fast mode's cached "
                            "per-image features: use mode head, finetune or full")
        if self.threshold_rule not in THRESHOLD_RULES:
            problems.append(f"threshold_rule must be one of {', '.join(THRESHOLD_RULES)}")
        elif self.threshold_rule in TARGET_RULES and not (self.threshold_target is not None and 0.0 < self.threshold_target <= 1.0):
            problems.append(f"threshold_rule {self.threshold_rule} needs a threshold_target in (0, 1], e.g. 0.90")
        elif self.threshold_rule not in TARGET_RULES and self.threshold_target is not None:
            problems.append(f"threshold_rule {self.threshold_rule} takes no threshold_target (only sensitivity and npv do)")
        if self.study_aggregate not in STUDY_AGGREGATES:
            problems.append(f"study_aggregate must be one of {', '.join(STUDY_AGGREGATES)}")
        if self.calibration not in CALIBRATION_METHODS:
            problems.append(f"calibration must be one of {', '.join(CALIBRATION_METHODS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            problems.append(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}")
        if len(self.image_size) != 2 or min(self.image_size) < 32:
            problems.append("image_size must be (height, width), each at least 32")
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 0:
            problems.append("epochs and batch_size must be at least 1, patience at least 0")
        if not (self.learning_rate > 0 and self.finetune_learning_rate > 0):
            problems.append("learning rates must be positive")
        if not 0.0 <= self.dropout < 1.0:
            problems.append("dropout must be in [0, 1)")
        if self.max_train_images is not None and self.max_train_images < 2:
            problems.append("max_train_images must be at least 2 (or None for all)")
        unknown = sorted(set(self.augment) - set(AUGMENT_KEYS))
        if unknown:
            problems.append(f"unknown augment settings {', '.join(unknown)} (known: {', '.join(AUGMENT_KEYS)})")
        if problems:
            raise errors.InputError("bad training config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict (``image_size`` as a list)."""
        data = dataclasses.asdict(self)
        data["image_size"] = list(self.image_size)
        data["augment"] = dict(self.augment)
        return data

    def to_json(self) -> str:
        """JSON with sorted keys."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | Mapping[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_json`. Unknown keys are ignored (a settings dict that carries
        more, e.g. the merged record of :meth:`Run.config_record`, reads back as its settings)."""
        data = json.loads(text) if isinstance(text, str) else dict(text)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})

    def identity_hash(self) -> str:
        """Hex sha256 of every defining setting (all fields, canonical JSON): equal hashes, same run.

        A weights path counts by its text, not its content.
        """
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def phase_epochs(self) -> dict[str, int]:
        """The epoch budget per phase before early stopping: e.g. finetune, 20 epochs → head 10, finetune 10."""
        if self.mode == "finetune":
            head = -(-self.epochs // 2)
            return {"head": head, "finetune": self.epochs - head}
        return {"full" if self.mode == "full" else "head": self.epochs}


SETTING_NAMES = frozenset(f.name for f in dataclasses.fields(TrainConfig))


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- what training produces, and a stored run ---------------------------------------------------

@dataclass(frozen=True)
class Prediction:
    """One stored prediction: the image, its subset, its 0/1 label (1 = metastatic) and the
    model's probability of metastasis in [0, 1] (calibrated when the run is). A composite
    sample's probability belongs to both of its images. ``raw_probability``: the model's
    output before calibration, None when the run was not calibrated."""

    image_id: int
    subset: str
    label: int
    probability: float
    raw_probability: float | None = None


@dataclass(frozen=True)
class StudyPrediction:
    """One stored study-level prediction: the study, its subset, its 0/1 label (1 =
    metastatic) and the run's study probability in [0, 1] (a per-image run's views
    aggregated by ``TrainConfig.study_aggregate``; a composite run's one output), calibrated
    when the run is, with the raw one beside it (None: the run is not calibrated)."""

    study_id: int
    subset: str
    label: int
    probability: float
    raw_probability: float | None = None


@dataclass(frozen=True)
class RunResult:
    """What ``training.train_run`` computed; the caller stores it (:func:`record_result`).

    Attributes:
        threshold: decision threshold chosen on the validation subset, in [0, 1].
        images_per_second: training throughput over the training epochs only (no
            validation, no first batch of an epoch: no tracing or start-up). In fast mode,
            feature vectors per second through the head.
        model_file: where the model was saved (absolute; the store keeps it relative to
            ``runs/``).
        weights_sha256: hex sha256 of that file.
        device: ``CPU`` or the GPU name(s) the backend reports.
        predictions: every validation and test image's :class:`Prediction` (calibrated
            probability, and the raw one when the run is calibrated).
        facts: what training learned, stored in ``runs.results``: ``thresholds``
            (``{"image": t, "study": t, "rule": rule, "target": x or None}``: the image- and
            study-level thresholds chosen on validation images / studies), ``split_id``,
            ``labels_hash``, ``n_train`` / ``n_val`` / ``n_test`` (samples: images, or
            studies for composites), ``sample_unit`` (``image`` | ``study``),
            ``phase_epochs`` (epochs run per phase, after early stopping),
            ``class_weights`` ({"0": w0, "1": w1} or None), ``backend``, ``device``,
            ``versions`` (python, keras, tensorflow or jax, numpy), ``precision``
            (``float32`` | ``mixed_float16``), ``notes`` (list of strings), ``calibration``
            (the fitted recalibration, ``calibration.fit``), ``reproducibility``
            (``reproducibility.record``), and in fast
            mode ``features_cached`` / ``features_computed`` (samples) and, when some were
            computed, ``feature_images_per_second``.
    """

    threshold: float
    images_per_second: float
    model_file: Path
    weights_sha256: str
    device: str
    predictions: tuple[Prediction, ...]
    facts: dict[str, Any]
    study_predictions: tuple[StudyPrediction, ...] = ()
    """Every validation and test study's :class:`StudyPrediction` (one row per study)."""


@dataclass(frozen=True)
class RunResults:
    """A run's results (None until it finished training).

    Attributes:
        threshold: decision threshold chosen on validation, in [0, 1].
        images_per_second: training throughput (:class:`RunResult`).
        device: where it trained.
        weights_path: its model file relative to ``runs/`` beside the database.
        weights_sha256: hex sha256 of that file.
        facts: what training learned (:attr:`RunResult.facts`); {} before that.
    """

    threshold: float | None = None
    images_per_second: float | None = None
    device: str | None = None
    weights_path: str | None = None
    weights_sha256: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Run:
    """One row of ``runs``, typed.

    Attributes:
        id, backbone, status: ``status`` is one of ``jobs.STATUSES``.
        settings: what was asked for.
        results: what came out (:class:`RunResults`).
        split_id: the split it trained on (None until known).
        config_hash: identity of the settings (duplicate detection).
        progress: the last progress record (``training.Reporter.progress`` fields), or None.
        cancel_requested: a cancel was asked for while it ran.
        error: why it failed or was interrupted (one line), or None.
        created_at, started_at, finished_at, heartbeat_at: ISO 8601 UTC times (or None).
        worker_pid: the worker process that claimed it.
        repeat_group: the id of the first run of its repeat group (``train --repeats K``; the
            first run's own id for that run), or None for a run trained alone.
    """

    id: int
    backbone: str
    status: str
    settings: TrainConfig
    results: RunResults
    split_id: int | None = None
    config_hash: str = ""
    progress: dict[str, Any] | None = None
    cancel_requested: bool = False
    error: str | None = None
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    heartbeat_at: str | None = None
    worker_pid: int | None = None
    repeat_group: int | None = None

    @property
    def threshold(self) -> float | None:
        """The validation-chosen threshold (None before the run finished)."""
        return self.results.threshold

    def config_record(self) -> dict[str, Any]:
        """Settings and facts in one dict: what ``runs --json``, the report and a bundle's
        ``config.json`` show as a run's configuration."""
        return {**self.settings.to_dict(), **self.results.facts}

    def to_json(self) -> dict[str, Any]:
        """``bonescan runs --json``: id, backbone, status, device, images_per_second, config,
        error, threshold, split_id, created/started/finished times, progress and repeat_group."""
        return {
            "id": self.id, "backbone": self.backbone, "status": self.status, "device": self.results.device,
            "images_per_second": self.results.images_per_second, "config": self.config_record(), "error": self.error,
            "threshold": self.results.threshold, "split_id": self.split_id, "created_at": self.created_at,
            "started_at": self.started_at, "finished_at": self.finished_at, "progress": self.progress,
            "repeat_group": self.repeat_group,
        }


# What a stored settings record without a key meant: runs trained before calibration existed were not calibrated.
_ABSENT_SETTINGS = {"calibration": "none"}


def _run(row: Mapping[str, Any]) -> Run:
    # The backbone column is the run's backbone; a settings record without it still reads.
    settings = TrainConfig.from_json({"backbone": row["backbone"], **_ABSENT_SETTINGS, **json.loads(row["config"] or "{}")})
    return Run(
        id=int(row["id"]), backbone=row["backbone"], status=row["status"], settings=settings,
        results=RunResults(
            threshold=row["threshold"], images_per_second=row["images_per_second"], device=row["device"],
            weights_path=row["weights_path"], weights_sha256=row["weights_sha256"],
            facts=json.loads(row["results"]) if row.get("results") else {},
        ),
        split_id=row["split_id"], config_hash=row["config_hash"],
        progress=json.loads(row["progress"]) if row["progress"] else None,
        cancel_requested=bool(row["cancel_requested"]), error=row["error"], created_at=row["created_at"],
        started_at=row["started_at"], finished_at=row["finished_at"], heartbeat_at=row["heartbeat_at"],
        worker_pid=row["worker_pid"], repeat_group=row.get("repeat_group"),
    )


def _not_found(run_id: int) -> errors.RunNotFound:
    return errors.RunNotFound(f"run {run_id} does not exist; list them with `bonescan runs --json`")


# --- reading runs -----------------------------------------------------------------------------

def get(db: sqlite_utils.Database, run_id: int) -> Run:
    """One run.

    Raises:
        errors.RunNotFound: no run with this id.
    """
    rows = list(db.query("SELECT * FROM runs WHERE id = ?", [int(run_id)]))
    if not rows:
        raise _not_found(run_id)
    return _run(rows[0])


def list_runs(db: sqlite_utils.Database, status: str | None = None) -> list[Run]:
    """Every run (or those with ``status``), newest first."""
    if status is None:
        return [_run(row) for row in db.query("SELECT * FROM runs ORDER BY id DESC")]
    return [_run(row) for row in db.query("SELECT * FROM runs WHERE status = ? ORDER BY id DESC", [status])]


def repeat_group_runs(db: sqlite_utils.Database, group: int) -> list[Run]:
    """The runs of a repeat group (any status), in id order (the first is the group's id)."""
    return [_run(row) for row in db.query("SELECT * FROM runs WHERE repeat_group = ? ORDER BY id", [int(group)])]


def newest_done(db: sqlite_utils.Database) -> int | None:
    """Id of the newest run with status ``done`` (None before any training)."""
    row = db.execute("SELECT id FROM runs WHERE status = 'done' ORDER BY id DESC LIMIT 1").fetchone()
    return row[0] if row else None


def any_queued(db: sqlite_utils.Database) -> bool:
    """Whether a run waits in the queue."""
    return db.execute("SELECT 1 FROM runs WHERE status = 'queued' LIMIT 1").fetchone() is not None


def epochs(db: sqlite_utils.Database, run_id: int) -> list[dict]:
    """A run's epoch rows (``run_id, epoch, phase, loss, val_loss, metrics`` (dict),
    ``seconds, train_images_per_second``), in order."""
    rows = [dict(row) for row in db.query("SELECT * FROM epochs WHERE run_id = ? ORDER BY epoch", [run_id])]
    for row in rows:
        row["metrics"] = json.loads(row["metrics"] or "{}")
    return rows


def predictions(db: sqlite_utils.Database, run_id: int, subset: str | None = None) -> dict[str, np.ndarray]:
    """A run's stored predictions with each image's study, patient and view.

    Args:
        subset: ``"test"``, ``"val"``, ``"train"`` or ``"external"``; None (default) for every subset.

    Returns:
        ``{"image_id", "study_id", "patient_id"}``: (n,) int64; ``"view"``: (n,) object
        (str or None); ``"subset"``: (n,) object; ``"label"``: (n,) int64 0/1, or
        :data:`UNKNOWN_LABEL` (-1) for an external study without a label;
        ``"probability"``: (n,) float64; ordered by subset (train, val, test, external) then image id.
        Empty arrays when there are none.

    Raises:
        errors.RunNotFound: no such run.
    """
    if db.execute("SELECT 1 FROM runs WHERE id = ?", [run_id]).fetchone() is None:
        raise _not_found(run_id)
    rows = db.execute(
        """SELECT p.image_id, i.study_id, s.patient_id, i.view, p.subset, p.label, p.probability
           FROM predictions p JOIN images i ON i.id = p.image_id JOIN studies s ON s.id = i.study_id
           WHERE p.run_id = ? AND (? IS NULL OR p.subset = ?)
           ORDER BY CASE p.subset WHEN 'train' THEN 0 WHEN 'val' THEN 1 WHEN 'test' THEN 2 ELSE 3 END, p.image_id""",
        [run_id, subset, subset],
    ).fetchall()
    columns = list(zip(*rows, strict=True)) if rows else [()] * 7
    return {
        "image_id": np.asarray(columns[0], dtype=np.int64),
        "study_id": np.asarray(columns[1], dtype=np.int64),
        "patient_id": np.asarray(columns[2], dtype=np.int64),
        "view": np.asarray(columns[3], dtype=object),
        "subset": np.asarray(columns[4], dtype=object),
        "label": np.asarray([UNKNOWN_LABEL if v is None else v for v in columns[5]], dtype=np.int64),
        "probability": np.asarray(columns[6], dtype=np.float64),
    }


def _study_rows_sql(how: str) -> str:
    """The query of :func:`study_predictions` with image rows collapsed by ``how`` (MAX or AVG).

    Stored study rows per subset: an older run that later predicted external studies has study
    rows for ``external`` only, and its val/test studies still come from their image rows.
    """
    return f"""SELECT * FROM (
                SELECT p.study_id, s.patient_id, p.subset, p.label, p.probability,
                       COALESCE(p.raw_probability, p.probability)
                FROM study_predictions p JOIN studies s ON s.id = p.study_id
                WHERE p.run_id = ? AND (? IS NULL OR p.subset = ?)
              UNION ALL
                -- label is constant within a study (a study has one label), so MAX(label) is that label.
                SELECT i.study_id, s.patient_id, p.subset, MAX(p.label), {how}(p.probability),
                       {how}(COALESCE(p.raw_probability, p.probability))
                FROM predictions p JOIN images i ON i.id = p.image_id JOIN studies s ON s.id = i.study_id
                WHERE p.run_id = ? AND (? IS NULL OR p.subset = ?)
                  AND p.subset NOT IN (SELECT DISTINCT subset FROM study_predictions WHERE run_id = ?)
                GROUP BY i.study_id, s.patient_id, p.subset) p
              ORDER BY CASE p.subset WHEN 'train' THEN 0 WHEN 'val' THEN 1 WHEN 'test' THEN 2 ELSE 3 END, 1"""


_STUDY_ROWS_SQL = {"max": _study_rows_sql("MAX"), "mean": _study_rows_sql("AVG")}


def study_predictions(db: sqlite_utils.Database, run_id: int, subset: str | None = None,
                      aggregate: str = "max") -> dict[str, np.ndarray]:
    """A run's study-level predictions: one row per study, the study as the unit of analysis.

    Rows of ``study_predictions`` for the subsets where the run stored them (runs trained since
    migration 010, and predictions on external studies); otherwise (older runs) each study's image
    predictions collapsed with ``aggregate`` (``max``: the most suspicious view decides;
    ``mean``), so a study written once per image counts once.

    Args:
        subset: ``"train"``, ``"val"``, ``"test"`` or ``"external"``; None for every subset.
        aggregate: ``"max"`` or ``"mean"``, used only for runs without stored study rows.

    Returns:
        ``{"study_id", "patient_id"}``: (s,) int64; ``"subset"``: (s,) object; ``"label"``:
        (s,) float64 0/1, nan where the study has no label (external studies only);
        ``"probability"``: (s,) float64 in [0, 1]; ``"raw_probability"``: (s,) float64, the
        output before calibration (equal to ``probability`` for an uncalibrated run);
        ordered by subset (train, val, test, external) then study id.

    Raises:
        errors.RunNotFound: no such run.
        errors.InputError: unknown ``aggregate``.
    """
    if aggregate not in ("max", "mean"):
        raise errors.InputError(f"study aggregation must be max or mean; got {aggregate!r}")
    if db.execute("SELECT 1 FROM runs WHERE id = ?", [run_id]).fetchone() is None:
        raise _not_found(run_id)
    rows = db.execute(_STUDY_ROWS_SQL[aggregate], [run_id, subset, subset, run_id, subset, subset, run_id]).fetchall()
    columns = list(zip(*rows, strict=True)) if rows else [()] * 6
    return {
        "study_id": np.asarray(columns[0], dtype=np.int64),
        "patient_id": np.asarray(columns[1], dtype=np.int64),
        "subset": np.asarray(columns[2], dtype=object),
        "label": np.asarray([np.nan if v is None else v for v in columns[3]], dtype=np.float64),
        "probability": np.asarray(columns[4], dtype=np.float64),
        "raw_probability": np.asarray(columns[5], dtype=np.float64),
    }


def studies_by_margin(db: sqlite_utils.Database, run_id: int) -> list[int]:
    """Study ids with a prediction of the run, closest to its decision first: ordered by the
    smallest |probability - threshold| over the study's images (the default threshold of
    :func:`results.decision_threshold` when the run has none), then by id."""
    sql = """
        SELECT i.study_id, MIN(ABS(p.probability - COALESCE(r.threshold, ?))) AS margin
        FROM predictions p JOIN images i ON i.id = p.image_id JOIN runs r ON r.id = p.run_id
        WHERE p.run_id = ? GROUP BY i.study_id ORDER BY margin, i.study_id
    """
    return [row[0] for row in db.execute(sql, [DEFAULT_THRESHOLD, run_id]).fetchall()]


# --- the queue's rows -------------------------------------------------------------------------

def active_with_hash(db: sqlite_utils.Database, config_hash: str) -> tuple[int, str] | None:
    """(id, status) of the oldest queued or running run with these settings, or None."""
    row = db.execute(
        "SELECT id, status FROM runs WHERE config_hash = ? AND status IN ('queued', 'running') ORDER BY id LIMIT 1",
        [config_hash],
    ).fetchone()
    return None if row is None else (row[0], row[1])


def insert_queued(db: sqlite_utils.Database, settings: TrainConfig | Mapping[str, Any], config_hash: str) -> int:
    """Add a queued run with these settings (call inside ``dbm.write``); returns its id."""
    config = settings if isinstance(settings, TrainConfig) else TrainConfig.from_json(settings)
    return db["runs"].insert({
        "backbone": config.backbone, "status": "queued", "config": config.to_json(), "config_hash": config_hash,
        "split_id": config.split_id, "created_at": dbm.utc_now(), "results": "{}",
    }).last_pk


def set_repeat_group(db: sqlite_utils.Database, run_ids: Iterable[int]) -> int:
    """Make these runs one repeat group, identified by the smallest (first) id; returns it.

    Opens its own transaction unless one is open.
    """
    ids = sorted(int(r) for r in run_ids)
    if not ids:
        raise errors.InputError("a repeat group needs at least one run")
    marks = ", ".join("?" for _ in ids)
    sql = f"UPDATE runs SET repeat_group = ? WHERE id IN ({marks})"
    if db.conn.in_transaction:
        db.execute(sql, [ids[0], *ids])
    else:
        with dbm.write(db):
            db.execute(sql, [ids[0], *ids])
    return ids[0]


def status_of(db: sqlite_utils.Database, run_id: int) -> str:
    """The run's status.

    Raises:
        errors.RunNotFound: no such run.
    """
    row = db.execute("SELECT status FROM runs WHERE id = ?", [run_id]).fetchone()
    if row is None:
        raise _not_found(run_id)
    return row[0]


def next_queued(db: sqlite_utils.Database, run_id: int | None = None) -> int | None:
    """Id of the oldest queued run (or ``run_id`` if it is queued), or None."""
    if run_id is None:
        row = db.execute("SELECT id FROM runs WHERE status = 'queued' ORDER BY id LIMIT 1").fetchone()
    else:
        row = db.execute("SELECT id FROM runs WHERE status = 'queued' AND id = ?", [run_id]).fetchone()
    return None if row is None else row[0]


def mark_running(db: sqlite_utils.Database, run_id: int, pid: int) -> None:
    """The run is taken by worker ``pid`` now (call inside ``dbm.write``)."""
    now = dbm.utc_now()
    db.execute("UPDATE runs SET status = 'running', started_at = ?, heartbeat_at = ?, worker_pid = ? WHERE id = ?",
               [now, now, pid, run_id])


def running(db: sqlite_utils.Database) -> list[tuple[int, str | None, int | None]]:
    """(id, heartbeat_at, worker_pid) of every running run."""
    return [tuple(row) for row in db.execute("SELECT id, heartbeat_at, worker_pid FROM runs WHERE status = 'running'").fetchall()]


def finish(db: sqlite_utils.Database, run_id: int, status: str, error: str | None = None) -> None:
    """Record a run's final status (and why, for failed or interrupted runs); opens its own
    transaction unless one is open."""
    now = dbm.utc_now()
    sql = "UPDATE runs SET status = ?, finished_at = ?, error = ?, heartbeat_at = ? WHERE id = ?"
    if db.conn.in_transaction:
        db.execute(sql, [status, now, error, now, run_id])
    else:
        with dbm.write(db):
            db.execute(sql, [status, now, error, now, run_id])


def request_cancel(db: sqlite_utils.Database, run_id: int) -> None:
    """Flag a running run to stop (call inside ``dbm.write``)."""
    db.execute("UPDATE runs SET cancel_requested = 1 WHERE id = ?", [run_id])


def cancel_requested(db: sqlite_utils.Database, run_id: int) -> bool:
    """Whether the run was asked to stop."""
    row = db.execute("SELECT cancel_requested FROM runs WHERE id = ?", [run_id]).fetchone()
    return bool(row and row[0])


def heartbeat(db: sqlite_utils.Database, run_id: int) -> None:
    """The run's worker is alive now."""
    with dbm.write(db):
        db.execute("UPDATE runs SET heartbeat_at = ? WHERE id = ?", [dbm.utc_now(), run_id])


def set_progress(db: sqlite_utils.Database, run_id: int, fields: Mapping[str, Any]) -> None:
    """Store the run's progress record (and a heartbeat)."""
    with dbm.write(db):
        db.execute("UPDATE runs SET progress = ?, heartbeat_at = ? WHERE id = ?",
                   [json.dumps(dict(fields), default=float), dbm.utc_now(), run_id])


def add_epoch(db: sqlite_utils.Database, run_id: int, epoch: int, phase: str, logs: Mapping[str, float], seconds: float,
              train_images_per_second: float) -> None:
    """Store one finished epoch (``training.Reporter.epoch_done``'s arguments)."""
    metrics = {k: float(v) for k, v in logs.items() if k not in ("loss", "val_loss")}
    with dbm.write(db):
        db["epochs"].upsert(
            {"run_id": run_id, "epoch": epoch, "phase": phase, "loss": _float(logs.get("loss")),
             "val_loss": _float(logs.get("val_loss")), "metrics": json.dumps(metrics), "seconds": seconds,
             "train_images_per_second": train_images_per_second},
            pk=("run_id", "epoch"),
        )


def _float(value: object) -> float | None:
    return None if value is None else float(value)


def record_result(db: sqlite_utils.Database, db_path: str | os.PathLike[str], run_id: int, result: RunResult) -> None:
    """Store what a run computed, in one transaction: its results (threshold, throughput,
    device, model path relative to ``runs/``, checksum, facts), the split it used, its image
    predictions and its study predictions (each replacing any)."""
    weights_path = stored_path(db_path, result.model_file)
    rows = [{"run_id": run_id, "image_id": p.image_id, "subset": p.subset, "label": int(p.label),
             "probability": float(p.probability), "raw_probability": _float(p.raw_probability)} for p in result.predictions]
    study_rows = [{"run_id": run_id, "study_id": p.study_id, "subset": p.subset, "label": int(p.label),
                   "probability": float(p.probability), "raw_probability": _float(p.raw_probability)}
                  for p in result.study_predictions]
    with dbm.write(db):
        if db.execute("SELECT 1 FROM runs WHERE id = ?", [run_id]).fetchone() is None:
            raise _not_found(run_id)
        db["runs"].update(run_id, {
            "threshold": result.threshold, "images_per_second": result.images_per_second, "device": result.device,
            "weights_path": weights_path, "weights_sha256": result.weights_sha256,
            "results": json.dumps(result.facts, sort_keys=True), "split_id": result.facts.get("split_id"),
        })
        db.execute("DELETE FROM predictions WHERE run_id = ?", [run_id])
        db["predictions"].insert_all(rows)
        db.execute("DELETE FROM study_predictions WHERE run_id = ?", [run_id])
        db["study_predictions"].insert_all(study_rows)


def store_external_predictions(db: sqlite_utils.Database, run_id: int, images: Iterable[Mapping[str, Any]],
                               studies: Iterable[Mapping[str, Any]]) -> None:
    """Store a run's predictions on studies outside its split (subset ``external``), in one write.

    Rows are keyed (run, image) and (run, study): predicting a study again replaces its rows,
    so a re-run leaves the same rows, never duplicates.

    Args:
        images: ``{"image_id", "label", "probability", "raw_probability"}`` per image: label
            0/1 or None (unlabelled), probability (calibrated when the run is) in [0, 1],
            raw_probability the model's output, or None when the run is not calibrated.
        studies: ``{"study_id", "label", "probability", "raw_probability"}`` per study, alike.
    """
    image_rows = [{"run_id": run_id, "image_id": int(r["image_id"]), "subset": "external", "label": r["label"],
                   "probability": float(r["probability"]), "raw_probability": r["raw_probability"]} for r in images]
    study_rows = [{"run_id": run_id, "study_id": int(r["study_id"]), "subset": "external", "label": r["label"],
                   "probability": float(r["probability"]), "raw_probability": r["raw_probability"]} for r in studies]
    with dbm.write(db):
        db["predictions"].insert_all(image_rows, replace=True)
        db["study_predictions"].insert_all(study_rows, replace=True)


# --- the runs folder --------------------------------------------------------------------------

def runs_root(db_path: str | os.PathLike[str]) -> Path:
    """``runs/`` beside the database: stored model paths are relative to it."""
    return Path(db_path).resolve().parent / RUNS_FOLDER


def run_folder(db_path: str | os.PathLike[str]) -> Path:
    """This database's own folder under ``runs/``: ``<stem>-<first 8 hex of sha256(resolved
    path)>``, e.g. ``runs/labels-3f2a9c1e``. Models of new runs and the worker's log go here,
    so databases that share a folder never overwrite each other's files."""
    path = Path(db_path).resolve()
    return runs_root(path) / f"{path.stem}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


def model_file(db_path: str | os.PathLike[str], run_id: int) -> Path:
    """Where a run's model is saved: ``run_folder(db_path) / f"run-{run_id}" / "model.keras"``."""
    return run_folder(db_path) / f"run-{int(run_id)}" / "model.keras"


def stored_path(db_path: str | os.PathLike[str], path: str | os.PathLike[str]) -> str:
    """``path`` as stored in ``runs.weights_path``: relative to ``runs/``, with ``/``."""
    return Path(path).resolve().relative_to(runs_root(db_path)).as_posix()


def weights_file(db_path: str | os.PathLike[str], run: Run) -> Path:
    """The absolute path of a run's model file (it may not exist).

    Raises:
        ModelUnavailable: the run saved no model, or its stored path leads outside ``runs/``.
    """
    weights_path = run.results.weights_path
    if not weights_path:
        raise ModelUnavailable(
            f"run {run.id} has no saved model (status {run.status}): only finished runs can be explained or exported; "
            "wait for it to finish, or train it again"
        )
    root = runs_root(db_path)
    path = (root / weights_path).resolve()
    if not path.is_relative_to(root):
        raise ModelUnavailable(f"run {run.id}'s model path {weights_path!r} points outside {root}; train the run again")
    return path


# --- loading a run's model ----------------------------------------------------------------------

_MODELS: collections.OrderedDict[tuple[Any, ...], Any] = collections.OrderedDict()
_MODELS_LOCK = threading.Lock()


def clear_model_cache() -> None:
    """Forget every loaded run model (e.g. after replacing a file by hand)."""
    with _MODELS_LOCK:
        _MODELS.clear()


def load_model(db_path: str | os.PathLike[str], run: Run | int) -> tuple[Any, Backbone, tuple[int, int]]:
    """Load a finished run's saved model.

    The file is checked against the run's recorded sha256, and loaded with
    ``keras.saving.load_model(path, compile=False, safe_mode=True)`` (no code from the file
    runs). Loaded models are cached in this process (at most ``MODEL_CACHE_SIZE``), keyed by
    path, size, modification time and checksum: a replaced file is loaded (and checked) again.

    Args:
        db_path: the database file; models live in ``runs/`` beside it.
        run: a :class:`Run`, or a run id.

    Returns:
        (model, backbone, image_size): the Keras model, its :class:`Backbone` and the (H, W)
        it takes.

    Raises:
        errors.RunNotFound: no such run (when given an id).
        ModelUnavailable: the run saved no model, or its file is missing, does not match its
            checksum, cannot be loaded, or is not a classifier of the run's backbone.
    """
    if not isinstance(run, Run):
        with dbm.opened(db_path) as database:
            run = get(database, int(run))
    bb = get_backbone(run.settings.backbone or run.backbone)
    image_size = tuple(int(v) for v in run.settings.image_size)
    path = weights_file(db_path, run)
    try:
        stat = path.stat()
    except OSError:
        raise ModelUnavailable(
            f"the model file of run {run.id} is missing ({path}); restore runs/{run.results.weights_path} from a backup, "
            "or train the run again"
        ) from None
    expected = run.results.weights_sha256
    key = (str(path), stat.st_size, stat.st_mtime_ns, expected)
    with _MODELS_LOCK:
        if key in _MODELS:
            _MODELS.move_to_end(key)
            return _MODELS[key], bb, image_size
        if expected:
            actual = file_sha256(path)
            if actual != expected:
                raise ModelUnavailable(
                    f"the model file of run {run.id} ({path}) does not match its recorded checksum "
                    f"(sha256 {actual[:12]}..., expected {expected[:12]}...): it was changed or corrupted; "
                    "restore the original file, or train the run again"
                )
        keras = keras_module()
        try:
            model = keras.saving.load_model(str(path), compile=False, safe_mode=True)
        except Exception as error:  # Keras raises many types (ValueError, OSError, zipfile.BadZipFile, ...)
            raise ModelUnavailable(
                f"the model file of run {run.id} ({path}) cannot be loaded ({type(error).__name__}: {error}); "
                "it may be corrupted or written by an incompatible version: restore the file, or train the run again"
            ) from None
        try:
            model.get_layer(bb.last_conv_layer)
        except ValueError:
            raise ModelUnavailable(
                f"the model file of run {run.id} ({path}) is not a {bb.name} classifier (no layer {bb.last_conv_layer!r}); "
                "restore the run's own file, or train the run again"
            ) from None
        _MODELS[key] = model
        while len(_MODELS) > MODEL_CACHE_SIZE:
            _MODELS.popitem(last=False)
        return model, bb, image_size


# --- Grad-CAM maps (explanations) ----------------------------------------------------------------

def cached_heatmap(db: sqlite_utils.Database, run_id: int, image_id: int) -> np.ndarray | None:
    """The stored heatmap of (run, image) as (H0, W0) float32 in [0, 1] (divided by its own
    maximum; ``localisation.shared_scale`` puts it on the display scale), or None if not
    computed yet."""
    cached = cached_explanation(db, run_id, image_id)
    return None if cached is None else cached[0]


def cached_explanation(db: sqlite_utils.Database, run_id: int, image_id: int) -> tuple[np.ndarray, float | None] | None:
    """(heatmap as :func:`cached_heatmap`, the model's probability from the pass that made it,
    before calibration; None for a map stored before that was kept) of (run, image), or None
    if not computed yet."""
    row = db.execute("SELECT heatmap, probability FROM explanations WHERE run_id = ? AND image_id = ?",
                     [run_id, image_id]).fetchone()
    return None if row is None else (pixelstore.decode_pixels(row[0]).astype(np.float32), row[1])


def store_heatmaps(db: sqlite_utils.Database, run_id: int, heatmaps: Mapping[int, np.ndarray],
                   probabilities: Mapping[int, float] | None = None,
                   peaks: Mapping[int, tuple[tuple[int, int] | None, float]] | None = None) -> None:
    """Store {image id: (H0, W0) map in [0, 1]} of a run as float16 in one write, with where
    given {image id: the model's probability (before calibration) from the same pass} and
    {image id: ((row, col) of the stored map's peak or None, its maximum)}
    (``localisation.map_peak`` of the float16 map). Another process may have stored the same
    map meanwhile: same inputs, same map, so it is replaced."""
    probabilities, peaks = probabilities or {}, peaks or {}
    rows = []
    for image_id, heat in heatmaps.items():
        peak, value = peaks.get(image_id, (None, None))
        rows.append({"run_id": run_id, "image_id": int(image_id),
                     "heatmap": pixelstore.encode_pixels(np.asarray(heat).astype(np.float16)),
                     "probability": None if probabilities.get(image_id) is None else float(probabilities[image_id]),
                     "peak_row": None if peak is None else int(peak[0]), "peak_col": None if peak is None else int(peak[1]),
                     "peak_value": None if value is None else float(value)})
    with dbm.write(db):
        db["explanations"].insert_all(rows, replace=True)


def cached_peaks(db: sqlite_utils.Database, run_id: int, image_ids: Iterable[int]
                 ) -> dict[int, tuple[tuple[int, int] | None, float | None]]:
    """{image id: ((row, col) of the stored map's peak or None, the map's maximum; None when
    not stored with the map)} of the images of ``image_ids`` that have a cached map (others
    left out)."""
    wanted = sorted({int(i) for i in image_ids})
    found: dict[int, tuple[tuple[int, int] | None, float | None]] = {}
    for start in range(0, len(wanted), 500):
        chunk = wanted[start:start + 500]
        marks = ", ".join("?" for _ in chunk)
        for image_id, row, col, value in db.execute(
                f"SELECT image_id, peak_row, peak_col, peak_value FROM explanations WHERE run_id = ? AND image_id IN ({marks})",
                [run_id, *chunk]).fetchall():
            found[image_id] = (None if row is None else (int(row), int(col)), value)
    return found


def unexplained_by_study(db: sqlite_utils.Database, run_id: int) -> dict[int, list[int]]:
    """{study id: [image ids]} of the run's predicted images without a stored map; test
    images' studies first (``subset`` descending: test, val), then by image id."""
    studies: dict[int, list[int]] = {}
    for image_id, study_id in db.execute(
        "SELECT p.image_id, i.study_id FROM predictions p JOIN images i ON i.id = p.image_id "
        "WHERE p.run_id = ? AND p.image_id NOT IN (SELECT image_id FROM explanations WHERE run_id = ?) "
        "ORDER BY p.subset DESC, p.image_id", [run_id, run_id]):
        studies.setdefault(study_id, []).append(image_id)
    return studies


# --- fast mode's feature cache --------------------------------------------------------------------

def cached_features(db: sqlite_utils.Database, backbone: str, weights: str, size: tuple[int, int],
                    image_ids: Iterable[int]) -> dict[int, np.ndarray]:
    """{image id: (n_features,) float16} of the cached pooled features of these images under
    (backbone, weights key, (H, W)); images without a cached vector are left out."""
    wanted = set(image_ids)
    found = {}
    for image_id, blob in db.execute(
        "SELECT image_id, vector FROM features WHERE backbone = ? AND weights = ? AND height = ? AND width = ?",
        [backbone, weights, int(size[0]), int(size[1])],
    ).fetchall():
        if image_id in wanted:
            found[image_id] = np.frombuffer(blob, dtype=np.float16)
    return found


def store_features(db: sqlite_utils.Database, backbone: str, weights: str, size: tuple[int, int],
                   vectors: Mapping[int, np.ndarray]) -> None:
    """Cache {image id: pooled feature vector} (stored as float16) in one write."""
    rows = [{"backbone": backbone, "weights": weights, "height": int(size[0]), "width": int(size[1]),
             "image_id": int(image_id), "vector": np.asarray(vector, dtype=np.float16).tobytes()}
            for image_id, vector in vectors.items()]
    with dbm.write(db):
        db["features"].insert_all(rows, replace=True)
