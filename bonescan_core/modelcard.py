"""A run's model card and its CLAIM 2024 / TRIPOD+AI reporting checklist.

The card (:func:`model_card`) is a list of :class:`Section` (paragraphs and tables) with fixed
ids, written as Markdown (``model_card.md`` in a bundle, :func:`to_markdown`) and as HTML inside
``report.html`` (:func:`to_html`, the ids being anchors). It holds: intended use and limits, the
model and its training configuration, the reference standard and reader agreement, cohorts and
counts with prevalence, the inclusion flow (imported -> excluded by reason -> included ->
train/val/test), internal metrics with CIs, calibration, subgroups, external metrics with CIs,
readers against the model, explainability, and limitations.

:data:`CHECKLIST` lists the items of CLAIM 2024 (Tejani et al., Radiol Artif Intell
2024;6:e240300; 44 items) and TRIPOD+AI (Collins et al., BMJ 2024;385:e078378; 27 items with
their sub-items), each as ``(item id, short paraphrase, where)``: ``where`` is a key of
:data:`WHERE` (a card section, a report section or the bundle) or None when bonescan does not
answer the item (the authors must, in the paper). Paraphrases are short; the published
checklists are the authority.

numpy and the database only (no Keras, no plotting).
"""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bonescan_core import (
    agreement,
    assessment,
    calibration,
    cohorts,
    errors,
    evaluation,
    external,
    prediction,
    readers,
    runs,
    splits,
    subgroups,
)
from bonescan_core.heavy import sqlite_utils
from bonescan_core.results import EvaluationResult, MetricCI
from bonescan_core.review import EXCLUSION_REASONS, latest_reviews, study_statuses

NOT_ADDRESSED = "not addressed"


@dataclass(frozen=True)
class Table:
    """A table of text cells."""

    header: tuple[str, ...]
    rows: list[tuple[str, ...]]


@dataclass(frozen=True)
class Section:
    """One section of the card: ``id`` (an anchor, a key of :data:`WHERE`), title, paragraphs and tables in order."""

    id: str
    title: str
    blocks: list[str | Table] = field(default_factory=list)


WHERE: dict[str, str] = {
    "intended-use": "Model card: Intended use and limits",
    "model": "Model card: Model and training configuration",
    "reference-standard": "Model card: Reference standard and readers",
    "cohorts": "Model card: Cohorts, counts and prevalence",
    "inclusion-flow": "Model card: Inclusion flow",
    "internal": "Model card: Internal test metrics",
    "calibration": "Model card: Calibration",
    "subgroups": "Model card: Subgroups",
    "external": "Model card: External validation",
    "readers": "Model card: Readers vs model",
    "explainability": "Model card: Explainability",
    "limitations": "Model card: Limitations",
    "report-figures": "Report: Figures (confusion matrix, ROC, PR, calibration)",
    "report-reproducibility": "Report: Reproducibility (versions, commit, weights, seeds)",
    "bundle": "Bundle: model.keras, config.json and predict.py",
}
"""Where a checklist item is answered: card section ids, report sections and the bundle."""

# (item id, short paraphrase of the published item, key of WHERE or None: not addressed by bonescan)
CHECKLIST: tuple[tuple[str, str, str | None], ...] = (
    # CLAIM 2024
    ("CLAIM 1", "Title: identify the study as AI, with the category of technology (e.g. deep learning)", "model"),
    ("CLAIM 2", "Abstract: structured summary of design, methods, results, conclusions", None),
    ("CLAIM 3", "Background, intended use and clinical role of the AI approach", "intended-use"),
    ("CLAIM 4", "Study aims, objectives and hypotheses", None),
    ("CLAIM 5", "Prospective or retrospective study", None),
    ("CLAIM 6", "Study goal (e.g. model creation, feasibility) and intended use", "intended-use"),
    ("CLAIM 7", "Data sources", "cohorts"),
    ("CLAIM 8", "Eligibility: inclusion and exclusion criteria, how data were selected", "inclusion-flow"),
    ("CLAIM 9", "Data pre-processing steps", "model"),
    ("CLAIM 10", "Selection of data subsets", "inclusion-flow"),
    ("CLAIM 11", "De-identification methods", "cohorts"),
    ("CLAIM 12", "How missing data were handled", "inclusion-flow"),
    ("CLAIM 13", "Image acquisition protocol (equipment, parameters)", None),
    ("CLAIM 14", "Definition of the reference standard, replicable", "reference-standard"),
    ("CLAIM 15", "Rationale for the choice of reference standard", None),
    ("CLAIM 16", "Source and qualifications of the annotators", None),
    ("CLAIM 17", "Annotation procedures and tools", "reference-standard"),
    ("CLAIM 18", "Inter- and intra-rater variability; how discrepancies were resolved", "reference-standard"),
    ("CLAIM 19", "How data were assigned to partitions, with proportions", "inclusion-flow"),
    ("CLAIM 20", "Level at which partitions are disjoint (image, study, patient)", "inclusion-flow"),
    ("CLAIM 21", "Intended sample size of the test set and how it was determined", None),
    ("CLAIM 22", "Model architecture: inputs, outputs, layers", "model"),
    ("CLAIM 23", "Software libraries, frameworks and versions", "report-reproducibility"),
    ("CLAIM 24", "Initialisation of model parameters (e.g. transfer learning)", "model"),
    ("CLAIM 25", "Training: augmentation, hyperparameters, number of models", "model"),
    ("CLAIM 26", "Method of selecting the final model", "model"),
    ("CLAIM 27", "Ensembling, if used", "model"),
    ("CLAIM 28", "Metrics of model performance", "internal"),
    ("CLAIM 29", "Measures of uncertainty and statistical significance", "internal"),
    ("CLAIM 30", "Robustness or sensitivity analysis", None),
    ("CLAIM 31", "Explainability methods and how they were validated", "explainability"),
    ("CLAIM 32", "Evaluation on internal data", "internal"),
    ("CLAIM 33", "Testing on external data, or why not", "external"),
    ("CLAIM 34", "Clinical trial registration, if applicable", None),
    ("CLAIM 35", "Numbers of cases included and excluded, with a flow diagram", "inclusion-flow"),
    ("CLAIM 36", "Demographic and clinical characteristics per partition", "cohorts"),
    ("CLAIM 37", "Performance against the reference standard across partitions and subgroups", "subgroups"),
    ("CLAIM 38", "Estimates of diagnostic accuracy with 95% confidence intervals", "internal"),
    ("CLAIM 39", "Failure analysis of misclassified cases", "report-figures"),
    ("CLAIM 40", "Limitations: bias, statistical uncertainty, generalisability", "limitations"),
    ("CLAIM 41", "Implications for practice, intended use and clinical role", "intended-use"),
    ("CLAIM 42", "Where the full protocol can be accessed", None),
    ("CLAIM 43", "Availability of software, model and data", "bundle"),
    ("CLAIM 44", "Sources of funding and role of funders", None),
    # TRIPOD+AI
    ("TRIPOD+AI 1", "Title: developing or evaluating a prediction model, target population, outcome", None),
    ("TRIPOD+AI 2", "Abstract (TRIPOD+AI for Abstracts)", None),
    ("TRIPOD+AI 3a", "Healthcare context, rationale, existing models", "intended-use"),
    ("TRIPOD+AI 3b", "Target population, intended purpose in the care pathway, intended users", "intended-use"),
    ("TRIPOD+AI 3c", "Known health inequalities between sociodemographic groups", None),
    ("TRIPOD+AI 4", "Objectives: development, evaluation or both", "intended-use"),
    ("TRIPOD+AI 5a", "Data sources for development and evaluation; representativeness", "cohorts"),
    ("TRIPOD+AI 5b", "Dates of the data (start and end of accrual)", "cohorts"),
    ("TRIPOD+AI 6a", "Study setting, number and location of centres", None),
    ("TRIPOD+AI 6b", "Eligibility criteria", "inclusion-flow"),
    ("TRIPOD+AI 6c", "Treatments received, if relevant", None),
    ("TRIPOD+AI 7", "Data pre-processing and quality checking", "model"),
    ("TRIPOD+AI 8a", "Outcome definition, how and when assessed", "reference-standard"),
    ("TRIPOD+AI 8b", "Qualifications and demographics of outcome assessors", None),
    ("TRIPOD+AI 8c", "Blinding of outcome assessment", None),
    ("TRIPOD+AI 9a", "Choice of initial predictors and any pre-selection", "model"),
    ("TRIPOD+AI 9b", "Definition of predictors, how and when measured", "model"),
    ("TRIPOD+AI 9c", "Qualifications of predictor assessors, if subjective", None),
    ("TRIPOD+AI 10", "How the study size was arrived at, and that it suffices", None),
    ("TRIPOD+AI 11", "How missing data were handled; reasons for omitting data", "inclusion-flow"),
    ("TRIPOD+AI 12a", "How the data were used and partitioned", "inclusion-flow"),
    ("TRIPOD+AI 12b", "How predictors were handled (rescaling, transformation)", "model"),
    ("TRIPOD+AI 12c", "Model type, building steps, hyperparameter tuning, internal validation", "model"),
    ("TRIPOD+AI 12d", "Heterogeneity of performance across clusters (e.g. centres)", "subgroups"),
    ("TRIPOD+AI 12e", "Performance measures and plots (discrimination, calibration, utility)", "internal"),
    ("TRIPOD+AI 12f", "Model updating (e.g. recalibration) from the evaluation", "calibration"),
    ("TRIPOD+AI 12g", "How predictions were calculated (code, object, API)", "bundle"),
    ("TRIPOD+AI 13", "Class imbalance methods and any recalibration", "model"),
    ("TRIPOD+AI 14", "Approaches to model fairness", "subgroups"),
    ("TRIPOD+AI 15", "Model output, classification thresholds and how they were chosen", "model"),
    ("TRIPOD+AI 16", "Differences between development and evaluation data", "external"),
    ("TRIPOD+AI 17", "Ethics approval and informed consent", None),
    ("TRIPOD+AI 18a", "Funding and role of funders", None),
    ("TRIPOD+AI 18b", "Conflicts of interest", None),
    ("TRIPOD+AI 18c", "Where the protocol can be accessed", None),
    ("TRIPOD+AI 18d", "Registration", None),
    ("TRIPOD+AI 18e", "Availability of study data", None),
    ("TRIPOD+AI 18f", "Availability of analytical code", "bundle"),
    ("TRIPOD+AI 19", "Patient and public involvement", None),
    ("TRIPOD+AI 20a", "Flow of participants, with and without the outcome", "inclusion-flow"),
    ("TRIPOD+AI 20b", "Characteristics overall and per data source", "cohorts"),
    ("TRIPOD+AI 20c", "Evaluation data compared with development data", "cohorts"),
    ("TRIPOD+AI 21", "Participants and outcome events in each analysis", "cohorts"),
    ("TRIPOD+AI 22", "Full model specification to allow predictions and third-party evaluation", "bundle"),
    ("TRIPOD+AI 23a", "Performance with confidence intervals, including key subgroups", "internal"),
    ("TRIPOD+AI 23b", "Heterogeneity of performance across clusters", "subgroups"),
    ("TRIPOD+AI 24", "Results of any model updating", "calibration"),
    ("TRIPOD+AI 25", "Overall interpretation, including fairness", None),
    ("TRIPOD+AI 26", "Limitations: sample, overfitting, missing data; effects on bias", "limitations"),
    ("TRIPOD+AI 27a", "How poor-quality or missing input data are handled in use", "limitations"),
    ("TRIPOD+AI 27b", "User interaction with the model and expertise required", "intended-use"),
    ("TRIPOD+AI 27c", "Next steps for research, applicability and generalisability", None),
)


def checklist_rows() -> list[tuple[str, str, str]]:
    """``(item id, text, answer)`` per :data:`CHECKLIST` item: the answer names where it is answered, else "not addressed"."""
    return [(item, text, WHERE[where] if where is not None else NOT_ADDRESSED) for item, text, where in CHECKLIST]


# --- the inclusion flow ----------------------------------------------------------------------

def _exclusion_reasons(db: sqlite_utils.Database, excluded: Sequence[int]) -> Counter:
    """Reason per excluded study: the adjudicator's, else the readers' when they all gave one, else ``reasons differ``."""
    by_study: dict[int, dict[str, Any]] = {}
    for row in latest_reviews(db, excluded):
        entry = by_study.setdefault(row["study_id"], {"adjudication": None, "readers": set()})
        if row["decision"] != "exclude":
            continue
        if row["adjudication"]:
            entry["adjudication"] = row["exclusion_reason"]
        else:
            entry["readers"].add(row["exclusion_reason"])
    reasons: Counter = Counter()
    for study_id in excluded:
        entry = by_study.get(study_id, {"adjudication": None, "readers": set()})
        if entry["adjudication"]:
            reasons[entry["adjudication"]] += 1
        elif len(entry["readers"]) == 1:
            reasons[next(iter(entry["readers"]))] += 1
        else:
            reasons["reasons differ"] += 1
    return reasons


def inclusion_flow(db: sqlite_utils.Database, run: runs.Run) -> dict[str, Any]:
    """The run's inclusion flow over the cohorts of its split, from the reviews as they are now.

    Returns:
        ``{"cohorts": [names], "imported": n, "excluded": n, "excluded_by_reason": {reason: n},
        "unread": n, "awaiting_adjudication": n, "included": n, "subsets": {"train": n, "val": n,
        "test": n}, "included_after_split": n, "split_no_longer_included": n, "grouping", "seed",
        "test_fraction", "val_fraction"}``; imported = excluded + unread + awaiting_adjudication +
        included. A run without a split gives subsets of 0.
    """
    info = splits.split_info(db, run.split_id) if run.split_id is not None else None
    chosen = info["cohorts"] if info and info["cohorts"] else cohorts.list_cohorts(db)
    marks = ", ".join("?" for _ in chosen)
    ids = [row[0] for row in db.execute(f"SELECT id FROM studies WHERE cohort IN ({marks}) ORDER BY id", chosen).fetchall()]
    statuses = study_statuses(db, ids) if ids else {}
    groups: dict[str, list[int]] = {"included": [], "excluded": [], "unread": [], "awaiting": []}
    for study_id, status in statuses.items():
        if status.label is not None:
            groups["included"].append(study_id)
        elif status.adjudicated == "exclude" or status.state == "excluded":
            groups["excluded"].append(study_id)
        elif status.state == "unread":
            groups["unread"].append(study_id)
        else:
            groups["awaiting"].append(study_id)
    members = splits.split_labels(db, run.split_id) if run.split_id is not None else {}
    subsets = Counter(subset for subset, _ in members.values())
    included = set(groups["included"])
    return {
        "cohorts": list(chosen), "imported": len(ids), "excluded": len(groups["excluded"]),
        "excluded_by_reason": dict(sorted(_exclusion_reasons(db, groups["excluded"]).items())),
        "unread": len(groups["unread"]), "awaiting_adjudication": len(groups["awaiting"]), "included": len(included),
        "subsets": {subset: int(subsets.get(subset, 0)) for subset in splits.SUBSETS},
        "included_after_split": len(included - set(members)) if members else 0,
        "split_no_longer_included": len(set(members) - included),
        "grouping": info["grouping"] if info else None, "seed": info["seed"] if info else None,
        "test_fraction": info["test_fraction"] if info else None, "val_fraction": info["val_fraction"] if info else None,
    }


def flow_lines(flow: dict[str, Any]) -> list[str]:
    """The flow as indented text lines (a flow diagram in words)."""
    lines = [f"Imported: {flow['imported']} studies (cohorts {', '.join(flow['cohorts']) or '-'})",
             f"  Excluded: {flow['excluded']}"]
    lines += [f"    {EXCLUSION_REASONS.get(reason, reason)}: {n}" for reason, n in flow["excluded_by_reason"].items()]
    lines += [f"  Not yet read: {flow['unread']}", f"  Readers disagree, awaiting adjudication: {flow['awaiting_adjudication']}",
              f"Included (with a reference label): {flow['included']}"]
    subsets = flow["subsets"]
    lines.append(f"  In this run's split: {sum(subsets.values())} -> train {subsets['train']}, validation {subsets['val']}, "
                 f"test {subsets['test']}")
    if flow["included_after_split"]:
        lines.append(f"  Labelled after the split (not in this run): {flow['included_after_split']}")
    if flow["split_no_longer_included"]:
        lines.append(f"  In the split but without a label now (re-read since): {flow['split_no_longer_included']}")
    return lines


# --- the card --------------------------------------------------------------------------------

def _pct(part: int, whole: int) -> str:
    return f"{part} ({100.0 * part / whole:.1f}%)" if whole else f"{part}"


def _cohort_rows(db: sqlite_utils.Database, run: runs.Run, flow: dict[str, Any]) -> list[tuple[str, ...]]:
    """Per partition (train, val, test of the split; each external cohort predicted): studies, patients,
    metastatic (prevalence), sex F/M/unknown, study years."""
    rows = []
    members = splits.split_labels(db, run.split_id) if run.split_id is not None else {}
    parts: list[tuple[str, list[int], list[int]]] = []
    for subset in splits.SUBSETS:
        ids = sorted(s for s, (sub, _) in members.items() if sub == subset)
        parts.append((subset, ids, [s for s in ids if members[s][1] == "metastatic"]))
    statuses = None
    for cohort in sorted(set(cohorts.list_cohorts(db)) - set(flow["cohorts"])):
        ids = prediction.external_studies(db, run.id, cohort)
        if ids:
            statuses = statuses or study_statuses(db)
            labelled = [s for s in ids if statuses[s].label is not None]
            parts.append((f"external: {cohort}", labelled, [s for s in labelled if statuses[s].label == "metastatic"]))
    for name, ids, positives in parts:
        attributes = subgroups.study_attributes(db, np.asarray(ids, dtype=np.int64))
        sexes = Counter(attributes["sex"].tolist())
        marks = ", ".join("?" for _ in ids) or "NULL"
        patients, low, high = db.execute(f"SELECT COUNT(DISTINCT patient_id), MIN(study_year), MAX(study_year) FROM studies "
                                         f"WHERE id IN ({marks})", ids).fetchone()
        years = "unknown" if low is None else (str(low) if low == high else f"{low}-{high}")
        rows.append((name, str(len(ids)), str(patients), _pct(len(positives), len(ids)),
                     f"{sexes.get('F', 0)} / {sexes.get('M', 0)} / {len(ids) - sexes.get('F', 0) - sexes.get('M', 0)}", years))
    return rows


METRIC_ROWS = ("auc", "recall", "specificity", "precision", "npv", "accuracy", "brier")


def _metric_table(result: EvaluationResult) -> Table:
    level = result.study_level if result.study_level is not None else result.image_level
    return Table(("metric (per study)", "value", "95% CI (patient bootstrap)"),
                 [(name_of(m), level.metrics[m].value_text(), level.metrics[m].interval_text() or "-") for m in METRIC_ROWS])


def name_of(metric: str) -> str:
    """A metric key's name in the card."""
    return {"auc": "ROC AUC", "recall": "Sensitivity", "specificity": "Specificity", "precision": "PPV", "npv": "NPV",
            "accuracy": "Accuracy", "brier": "Brier score"}.get(metric, metric)


def _external_sections(db: sqlite_utils.Database, run: runs.Run, flow: dict[str, Any]) -> list[str | Table]:
    blocks: list[str | Table] = []
    for cohort in sorted(set(cohorts.list_cohorts(db)) - set(flow["cohorts"])):
        if not prediction.external_studies(db, run.id, cohort):
            continue
        try:
            ext = external.evaluate_cohort(db, run.id, cohort)
        except evaluation.NoPredictionsError as error:
            blocks.append(f"Cohort {cohort}: {error}")
            continue
        blocks.append(f"Cohort {cohort} ({ext.n_studies} labelled studies of {ext.study_n_patients} patients; "
                      f"{ext.n_unlabelled} unlabelled left out), at the thresholds chosen on the run's validation set "
                      f"(study {ext.level_threshold('study'):.3f}).")
        blocks.append(_metric_table(ext))
    if not blocks:
        blocks.append("No external validation: the run has not predicted any cohort outside its split "
                      "(`bonescan predict RUN --cohort NAME`).")
    return blocks


def model_card(db: sqlite_utils.Database, run_id: int, result: EvaluationResult | None = None,
               reader_result: readers.ReaderComparison | None = None) -> list[Section]:
    """The model card of a run as :class:`Section` s (ids: the card keys of :data:`WHERE`).

    Args:
        result: the run's ``assessment.evaluate`` on its test studies (computed when None).
        reader_result: ``readers.compare`` on its test studies (computed when None).
    """
    run = runs.get(db, run_id)
    result = result or assessment.evaluate(db, run_id)
    if reader_result is None:
        try:
            reader_result = readers.compare(db, run_id)
        except errors.BonescanError:
            reader_result = None
    settings = run.settings
    flow = inclusion_flow(db, run)
    name = evaluation.run_label(run.backbone, run_id)
    external_blocks = _external_sections(db, run, flow)
    demo = db.execute("SELECT COUNT(*) FROM studies WHERE origin = 'demo'").fetchone()[0]
    facts = run.results.facts
    thresholds = facts.get("thresholds") or {}
    calibration_record = facts.get("calibration") or {"method": "not recorded with the run"}
    sections = [
        Section("intended-use", "Intended use and limits", [
            f"{name} (run {run_id}) estimates the probability that a whole-body bone scan (anterior and posterior views) "
            "shows bone metastasis, for adults referred for metastasis screening, to support a nuclear-medicine reader "
            "(triage and a second opinion). It is a research model: it does not diagnose, and every call needs a reader.",
            "Not for: indications other than metastasis screening (excluded by the protocol), metabolic bone disease, "
            "osteomyelitis, prosthesis loosening or primary bone tumours; images other than planar whole-body "
            "scintigraphy; scanners, cohorts or populations unlike those below without external validation.",
            "This card documents the development of the model and its internal (held-out test) testing"
            + (", and external testing." if any(isinstance(b, Table) for b in external_blocks)
               else "; there is no external testing yet."),
            *([f"Warning: {demo} studies of this database are synthetic demo phantoms; a model trained on them is a "
               "demonstration, not a clinical tool."] if demo else []),
        ]),
        Section("model", "Model and training configuration", [
            f"Deep learning: a {name} convolutional neural network, weights {settings.weights} "
            f"({'transfer learning from ImageNet' if settings.weights == 'imagenet' else 'as named'}), mode {settings.mode}, "
            f"view mode {settings.view_mode}, one sigmoid output (probability of metastasis). Input: the scan's raw counts, "
            f"min-max scaled to [0, 1], fitted to {settings.image_size[0]} x {settings.image_size[1]} keeping the aspect ratio "
            "(zero padding), grey repeated to three channels, the backbone's own input scaling. No ensembling.",
            Table(("setting", "value"), [
                ("epochs (budget), early-stopping patience", f"{settings.epochs}, {settings.patience} (on validation loss, best weights kept)"),
                ("batch size, learning rates", f"{settings.batch_size}, {settings.learning_rate:g} / fine-tune {settings.finetune_learning_rate:g}"),
                ("learning-rate schedule, dropout", f"{settings.lr_schedule}, {settings.dropout:g}"),
                ("augmentation", ", ".join(f"{k} {v}" for k, v in (settings.augment or {}).items()) or "none"),
                ("class imbalance", "class weights (inverse frequency)" if settings.class_weights else
                 "no class weighting; the threshold is chosen on validation"),
                ("calibration (fitted on validation)", ", ".join(f"{k} {v}" for k, v in calibration_record.items())),
                ("output and threshold", f"calibrated probability; metastatic when >= the study threshold "
                 f"{result.level_threshold('study'):.3f}, rule {thresholds.get('rule', settings.threshold_rule)}"
                 + (f" {settings.threshold_target:g}" if settings.threshold_target is not None else "") + ", chosen on validation"),
                ("study probability", result.study_aggregation),
                ("seed, split", f"{settings.seed}, split {run.split_id}"),
            ]),
            "Every setting is in the bundle's config.json; versions and the weights' sha256 in the report's Reproducibility section.",
        ]),
    ]
    pairs = agreement.pairwise(db)
    sections.append(Section("reference-standard", "Reference standard and readers", [
        "Outcome: bone metastasis present or absent on the study, read on bonescan's Review page by the criteria of "
        "Magboo & Magboo (metastatic: typical pattern, new lesions on follow-up, flare, correlative destruction, "
        "enlarging lesions; non-metastatic: trauma, periarticular uptake, non-osseous disease, equivocal lesions, no "
        "abnormal uptake). The reference label of a study is the adjudicator's consensus when there is one, else its "
        "readers' unanimous verdict; studies whose readers disagree wait for adjudication and are not used.",
        *([Table(("readers", "studies both labelled", "Cohen's kappa (95% CI)", "agreement"),
                 [(" / ".join(p.reviewers), str(p.n), MetricCI(p.kappa, p.kappa_ci95 or (None, None)).format(),
                   "-" if p.percent_agreement is None else f"{p.percent_agreement:.1f}%") for p in pairs if p.n])]
          if any(p.n for p in pairs) else ["Inter-reader agreement: no two readers have labelled the same study."]),
    ]))
    sections.append(Section("cohorts", "Cohorts, counts and prevalence", [
        f"Development data: cohort(s) {', '.join(flow['cohorts']) or '-'} (the run's split); other cohorts are external. "
        "Stored de-identified: salted hashes for patients and studies, sex, 10-year age band, study year only.",
        Table(("partition", "studies", "patients", "metastatic (prevalence)", "sex F / M / unknown", "study years"),
              _cohort_rows(db, run, flow)),
    ]))
    grouping = {"patient": "by patient (no patient in two partitions)",
                "study": "by study (some patients unknown: their studies may fall in two partitions)"}.get(flow["grouping"], "-")
    fractions = ("" if flow["test_fraction"] is None else
                 f" {flow['test_fraction']:.0%} test, then {flow['val_fraction']:.0%} of the rest validation,")
    sections.append(Section("inclusion-flow", "Inclusion flow", [
        "```\n" + "\n".join(flow_lines(flow)) + "\n```",
        f"Partitions:{fractions} stratified by label, seed {flow['seed']}, disjoint {grouping}. Excluded, unread and "
        "disagreeing studies have no reference label and are left out; subgroup values that are unknown are left out of "
        "that subgroup only.",
    ]))
    sections.append(Section("internal", "Internal test metrics", [
        f"Held-out test set: {result.n_studies} studies of {result.study_n_patients} patients, per study "
        f"({result.study_aggregation}), at the study threshold {result.level_threshold('study'):.3f} chosen on validation. "
        f"95% CIs: percentile bootstrap over patients ({result.bootstrap.get('n_resamples', 1000)} resamples).",
        _metric_table(result),
    ]))
    sections.append(Section("calibration", "Calibration", [
        calibration.summary_text(result.calibration) if result.calibration is not None else
        "No labelled test studies to assess calibration on."]))
    if result.subgroups:
        rows = [(f"{row['by']}: {row['group']}", str(row["n"]), MetricCI(**row["metrics"]["auc"]).format(),
                 MetricCI(**row["metrics"]["sensitivity"]).format(), MetricCI(**row["metrics"]["specificity"]).format(),
                 "small" if row["small"] else "") for row in result.subgroups]
        subgroup_blocks: list[str | Table] = [
            "Test set, at the run's thresholds. No fairness method was applied; performance is reported per group. "
            "Groups with fewer than 10 positive or negative units are marked small.",
            Table(("group", "n", "AUC (95% CI)", "sensitivity (95% CI)", "specificity (95% CI)", ""), rows)]
    else:
        subgroup_blocks = ["No subgroup has a second group to compare with (sex, age band, primary cancer, cohort, view)."]
    sections.append(Section("subgroups", "Subgroups", subgroup_blocks))
    sections.append(Section("external", "External validation", external_blocks))
    sections.append(Section("readers", "Readers vs model", [
        readers.summary_text(reader_result) if reader_result is not None else "No test predictions to compare readers with."]))
    sections.append(Section("explainability", "Explainability", [
        "Grad-CAM maps of every prediction, on one scale (evidence relative to the image's strongest, times the "
        "probability). " + (f"Pointing game on test studies with lesion points: {result.localisation_text()}."
                            if result.localisation_text() else "No test study carries lesion points, so the maps were not scored.")]))
    sections.append(Section("limitations", "Limitations", [
        "The reference standard is the readers' consensus on the scan itself, not histopathology or follow-up imaging, so "
        "the model learns the readers' calls, errors included. Sample sizes were not chosen by a power calculation; "
        "intervals are wide for small test sets. Thresholds were chosen on a validation set from the same cohort(s). "
        "Performance on other scanners, sites and populations is unknown without external validation.",
        "Input quality: files that cannot be decoded, are blank, hold NaN or are under 64 px a side are refused on import "
        "and by the bundle's predict.py; unreadable or poor-quality scans are excluded by readers, so the model has not "
        "learned them and its output on them is not meaningful.",
    ]))
    return sections


# --- rendering --------------------------------------------------------------------------------

def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(sections: Sequence[Section], title: str, checklist: bool = True) -> str:
    """The card as Markdown (``model_card.md``), with the checklist table at the end when ``checklist``."""
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Table):
                lines.append("| " + " | ".join(_md_cell(h) for h in block.header) + " |")
                lines.append("|" + "---|" * len(block.header))
                lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            else:
                lines.append(block)
            lines.append("")
    if checklist:
        lines += ["## Reporting checklist (CLAIM 2024, TRIPOD+AI)", "",
                  "Where each item is answered; \"not addressed\": the authors must answer it in the paper.", "",
                  "| item | what | where |", "|---|---|---|"]
        lines += [f"| {item} | {_md_cell(text)} | {answer} |" for item, text, answer in checklist_rows()]
        lines.append("")
    return "\n".join(lines)


def _html_block(block: str | Table) -> str:
    if isinstance(block, Table):
        head = "".join(f"<th>{html.escape(h)}</th>" for h in block.header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in block.rows)
        return f"<table><tr>{head}</tr>{body}</table>"
    if block.startswith("```"):
        return f"<pre>{html.escape(block.strip('`').strip())}</pre>"
    return f"<p>{html.escape(block)}</p>"


def to_html(sections: Sequence[Section], heading_level: int = 3) -> str:
    """The card's sections as HTML (each ``<section id=...>``, the anchors of :data:`WHERE`)."""
    h = f"h{heading_level}"
    return "".join(f'<section id="{s.id}"><{h}>{html.escape(s.title)}</{h}>' + "".join(_html_block(b) for b in s.blocks)
                   + "</section>" for s in sections)


def checklist_html() -> str:
    """The checklist as an HTML table (item, what, where answered)."""
    rows = "".join(f"<tr><td>{html.escape(item)}</td><td>{html.escape(text)}</td><td>{html.escape(answer)}</td></tr>"
                   for item, text, answer in checklist_rows())
    return f"<table><tr><th>item</th><th>what</th><th>where answered</th></tr>{rows}</table>"
