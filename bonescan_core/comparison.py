"""Paired comparison of runs on the same test studies, and the spread over a run's repeats.

The one way runs are compared (``bonescan compare``, the Evaluate page's comparison tab).
The unit is the **study**, each run at its own **study-level threshold** (:func:`study_threshold`),
and inference is clustered by **patient** (``docs/statistics.md``):

* ΔAUC: clustered DeLong (Obuchowski 1997, :func:`studystats.clustered_delong`): its Wald 95%
  interval and two-sided p are the reported ``ci95`` and ``p`` (an analytic p, not floored at
  2/(B+1) like a bootstrap p; interval and p come from one method, so p < 0.05 exactly when the
  interval excludes 0). The paired patient bootstrap's percentile interval and p of ΔAUC are
  given beside it (``"bootstrap"``), as a check, and are not a second test in the Holm family.
* Δsensitivity, Δspecificity: paired patient-level bootstrap (:func:`studystats.paired_bootstrap`,
  the same resamples for both runs, 2,000 by default, seeded): percentile 95% interval and p.
* McNemar on studies (:func:`studystats.mcnemar_studies`), each run at its own threshold.
* Holm (:func:`studystats.add_holm`) over every p in the result: 4 per pair (ΔAUC, Δsensitivity,
  Δspecificity, McNemar), all pairs together, since they are shown together.

Study rows come from :func:`runs.study_predictions` (stored study rows, else the views collapsed
by max), so a study written once per image (composite runs) counts once.

Repeats: a run trained with ``train --repeats K`` belongs to a repeat group (``runs.repeat_group``,
the id of the group's first run). :func:`repeat_summary` gives the mean ± SD over a group's
finished runs of the headline study-level metrics, and every repeat's value: the seed (or split)
variability a reader must see before believing a difference between two runs.

Only numpy and the light core modules are imported (``bonescan compare`` starts fast).
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from bonescan_core import errors, runs, studystats
from bonescan_core.evaluation import NoPredictionsError, point_metrics, run_label, run_thresholds
from bonescan_core.heavy import sqlite_utils
from bonescan_core.results import decision_threshold

DEFAULT_RESAMPLES = 2000
"""Bootstrap resamples of :func:`compare_runs` (the issue asks for at least 2,000)."""

MIN_RESAMPLES = 2000
"""Fewer resamples are refused: p below 0.001 needs B >= 2,000 (the smallest p is 2 / (B + 1))."""

ROUND_DIGITS = 4
"""Decimals of values and intervals in the JSON (as ``evaluate``)."""

P_DIGITS = 4
"""Significant digits of p-values in the JSON (so a DeLong p of 3e-7 does not round to 0)."""

HEADLINE = (("auc", "auc"), ("sensitivity", "recall"), ("specificity", "specificity"))
"""(JSON name, :func:`evaluation.point_metrics` key) of the metrics :func:`repeat_summary` spreads."""

METHODS = {
    "delta_auc": "clustered DeLong (Obuchowski 1997): Wald 95% CI and p; bootstrap percentile CI and p beside it",
    "delta_sensitivity": "paired patient-level bootstrap: percentile 95% CI, p = 2 min(P(d*<=0), P(d*>=0))",
    "delta_specificity": "paired patient-level bootstrap: percentile 95% CI, p = 2 min(P(d*<=0), P(d*>=0))",
    "mcnemar": "McNemar on studies, each run at its own study threshold",
    "holm": "Holm over every p shown: delta_auc, delta_sensitivity, delta_specificity and mcnemar of every pair",
}


class IncomparableRunsError(errors.InputError):
    """Runs that cannot be compared pairwise (different split, different test studies or labels)."""


class StudyThreshold(NamedTuple):
    """A run's study-level decision threshold and where it came from.

    ``source``: ``"stored"`` (``results.thresholds.study``, chosen on validation studies at
    training), ``"validation"`` (chosen now on the run's validation studies by Youden's J; runs
    trained before study thresholds were stored), or ``"image"`` (the run's image-level threshold,
    or 0.5 without one: its validation studies do not hold both classes).
    """

    value: float
    source: str


def study_threshold(db: sqlite_utils.Database, run: runs.Run) -> StudyThreshold:
    """The study-level threshold a run is judged at (``evaluation.run_thresholds``, the one
    place thresholds are read): stored, else chosen now on its validation studies by the run's
    rule, else (validation of one class) its image threshold, 0.5 without one.

    Args:
        db: open database.
        run: a run (its ``results.facts`` may hold ``{"thresholds": {"study": t, ...}}``).

    Returns:
        :class:`StudyThreshold` (value in [0, 1]).
    """
    chosen, _ = run_thresholds(db, run)
    source = {"run": "stored", "derived": "validation"}.get(chosen["study_source"], "image")
    return StudyThreshold(float(decision_threshold(None, chosen["study"])[0]), source)


def _round(value: float, digits: int = ROUND_DIGITS) -> float | None:
    """A JSON number: rounded, nan (undefined) as None."""
    value = float(value)
    return None if math.isnan(value) else round(value, digits)


def _round_p(p: float) -> float | None:
    """A p-value to :data:`P_DIGITS` significant digits; nan as None."""
    p = float(p)
    return None if math.isnan(p) else float(f"{p:.{P_DIGITS}g}")


def _interval(ci: Sequence[float]) -> list[float | None]:
    return [_round(ci[0]), _round(ci[1])]


def _test_studies(db: sqlite_utils.Database, run: runs.Run, subset: str) -> dict[str, np.ndarray]:
    """The run's study rows of ``subset`` (labels as int64), or NoPredictionsError."""
    data = runs.study_predictions(db, run.id, subset)
    if data["study_id"].size == 0:
        raise NoPredictionsError(f"run {run.id} ({run.status}) has no {subset} predictions; compare finished runs")
    if np.isnan(data["label"]).any():
        raise IncomparableRunsError(f"run {run.id} has {subset} studies without a label; compare on labelled studies")
    return {**data, "label": data["label"].astype(np.int64)}


def compare_runs(db: sqlite_utils.Database, run_ids: Sequence[int], n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                 subset: str = "test") -> dict[str, Any]:
    """Paired, clustered comparison of two or more runs on the same test studies.

    Args:
        db: open database.
        run_ids: two or more distinct run ids of one split (repeats are dropped, order kept).
        n_resamples: bootstrap resamples B, at least :data:`MIN_RESAMPLES`.
        seed: seed of the bootstrap (the same for every pair: each pair sees the same resamples).
        subset: the studies compared (``"test"``).

    Returns:
        A JSON-ready dict (values rounded to 4 decimals, p to 4 significant digits, undefined
        as None)::

            {"unit": "study", "subset", "n_studies", "n_patients",
             "runs": [{"run", "backbone", "label", "threshold", "threshold_source", "auc",
                       "sensitivity", "specificity", "repeat_group"}],
             "pairs": [{"a", "b", "label_a", "label_b",
                        "delta_auc": {"value", "ci95", "p", "p_holm", "bootstrap": {"ci95", "p"}},
                        "delta_sensitivity": {"value", "ci95", "p", "p_holm"},
                        "delta_specificity": {...},
                        "mcnemar": {"b", "c", "p", "p_holm", "method"}}],
             "bootstrap": {"unit": "patient", "interval": "percentile", "n_resamples", "seed"},
             "methods": METHODS,
             "repeats": [...]}   # only when a compared run's repeat group has >= 2 finished runs

        Deltas are run a minus run b; pairs in the order of ``run_ids``. ``b`` of McNemar counts
        the studies only run a called right, ``c`` those only run b called right. ``repeats``:
        :func:`repeat_summary` of each such group, in order of first appearance.

    Raises:
        errors.InputError: fewer than two distinct runs, or too few resamples.
        errors.RunNotFound, NoPredictionsError: a run that does not exist or has no test studies.
        IncomparableRunsError: runs of different splits, or on different test studies or labels.
    """
    ids = list(dict.fromkeys(int(r) for r in run_ids))
    if len(ids) < 2:
        raise errors.InputError("compare needs at least two different runs, e.g. `bonescan compare 3 4`")
    if n_resamples < MIN_RESAMPLES:
        raise errors.InputError(f"use at least {MIN_RESAMPLES} bootstrap resamples (p below 0.001 needs them); got {n_resamples}")
    chosen = [runs.get(db, r) for r in ids]
    splits = {run.id: run.split_id for run in chosen}
    if len(set(splits.values())) != 1:
        detail = ", ".join(f"run {r}: split {s}" for r, s in splits.items())
        raise IncomparableRunsError(f"runs were trained on different splits ({detail}); compare runs of one split")
    data = {run.id: _test_studies(db, run, subset) for run in chosen}
    reference = data[ids[0]]
    for r in ids[1:]:
        if not np.array_equal(data[r]["study_id"], reference["study_id"]):
            raise IncomparableRunsError(f"runs {ids[0]} and {r} have predictions on different {subset} studies; "
                                        "re-run prediction so both cover the same studies")
        if not np.array_equal(data[r]["label"], reference["label"]):
            raise IncomparableRunsError(f"runs {ids[0]} and {r} disagree on the labels of the same studies; "
                                        "the labels changed between runs: train them again on one split")
    y, patients = reference["label"], reference["patient_id"]
    thresholds = {run.id: study_threshold(db, run) for run in chosen}
    labels = {run.id: run_label(run.backbone, run.id, with_id=True) for run in chosen}

    pairs, shown = [], []  # shown: every result carrying a p, in the order Holm's output is read back
    for a, b in itertools.combinations(ids, 2):
        sa, sb, ta, tb = data[a]["probability"], data[b]["probability"], thresholds[a].value, thresholds[b].value
        boot = studystats.paired_bootstrap(y, sa, sb, patients, ta, tb, n_resamples=n_resamples, seed=seed)
        delong = studystats.clustered_delong(y, sa, sb, patients)
        mcnemar = studystats.mcnemar_studies(y, sa, sb, ta, tb)
        pairs.append((a, b, boot, delong, mcnemar))
        shown += [delong, boot["delta_sensitivity"], boot["delta_specificity"], mcnemar]
    adjusted = iter(r["p_holm"] for r in studystats.add_holm(shown))

    pair_rows = []
    for a, b, boot, delong, mcnemar in pairs:
        auc_boot = boot["delta_auc"]
        row: dict[str, Any] = {"a": a, "b": b, "label_a": labels[a], "label_b": labels[b]}
        row["delta_auc"] = {"value": _round(delong["delta"]), "ci95": _interval(delong["ci95"]), "p": _round_p(delong["p"]),
                            "p_holm": _round_p(next(adjusted)),
                            "bootstrap": {"ci95": _interval(auc_boot["ci95"]), "p": _round_p(auc_boot["p"])}}
        for name in ("delta_sensitivity", "delta_specificity"):
            part = boot[name]
            row[name] = {"value": _round(part["value"]), "ci95": _interval(part["ci95"]), "p": _round_p(part["p"]),
                         "p_holm": _round_p(next(adjusted))}
        row["mcnemar"] = {"b": mcnemar["b"], "c": mcnemar["c"], "p": _round_p(mcnemar["p"]), "p_holm": _round_p(next(adjusted)),
                          "method": mcnemar["method"]}
        pair_rows.append(row)

    run_rows = []
    for run in chosen:
        metrics = point_metrics(y, data[run.id]["probability"], thresholds[run.id].value)
        run_rows.append({"run": run.id, "backbone": run.backbone, "label": labels[run.id],
                         "threshold": _round(thresholds[run.id].value), "threshold_source": thresholds[run.id].source,
                         **{name: _round(metrics[key]) for name, key in HEADLINE}, "repeat_group": run.repeat_group})
    result: dict[str, Any] = {
        "unit": "study", "subset": subset, "n_studies": int(y.size), "n_patients": int(np.unique(patients).size),
        "runs": run_rows, "pairs": pair_rows,
        "bootstrap": {"unit": "patient", "interval": "percentile", "n_resamples": int(n_resamples), "seed": int(seed)},
        "methods": dict(METHODS),
    }
    groups = list(dict.fromkeys(run.repeat_group for run in chosen if run.repeat_group is not None))
    summaries = [summary for summary in (repeat_summary(db, group, subset) for group in groups) if summary["n"] >= 2]
    if summaries:
        result["repeats"] = summaries
    return result


def _spread(values: Sequence[float | None]) -> dict[str, Any]:
    """``{"mean", "sd", "values"}`` over the defined values: sample SD (n - 1), None below 2 values."""
    defined = [v for v in values if v is not None]
    mean = _round(statistics.fmean(defined)) if defined else None
    sd = _round(statistics.stdev(defined)) if len(defined) >= 2 else None
    return {"mean": mean, "sd": sd, "values": list(values)}


def repeat_summary(db: sqlite_utils.Database, group: int, subset: str = "test") -> dict[str, Any]:
    """Mean ± SD of the headline study-level metrics over a repeat group's finished runs.

    Each repeat is judged as in :func:`compare_runs`: on its own test studies (with
    ``--resplit`` each repeat has its own split), at its own :func:`study_threshold`.

    Args:
        db: open database.
        group: a repeat group id (the id of the group's first run).
        subset: the studies scored (``"test"``).

    Returns:
        ``{"group", "backbone", "n" (finished runs with test studies), "runs": [ids],
        "seeds": [...], "split_ids": [...], "auc": {"mean", "sd", "values"}, "sensitivity":
        {...}, "specificity": {...}}``; values aligned with ``runs``, rounded to 4 decimals,
        undefined as None; ``sd`` is the sample SD, None with fewer than two values.

    Raises:
        errors.NotFound: no run belongs to the group.
    """
    members = runs.repeat_group_runs(db, group)
    if not members:
        raise errors.NotFound(f"repeat group {group} has no runs; list runs with `bonescan runs --json` (field repeat_group)")
    finished = []
    for run in members:
        if run.status != "done":
            continue
        data = runs.study_predictions(db, run.id, subset)
        if data["study_id"].size == 0 or np.isnan(data["label"]).any():
            continue
        metrics = point_metrics(data["label"].astype(np.int64), data["probability"], study_threshold(db, run).value)
        finished.append((run, metrics))
    return {
        "group": int(group), "backbone": members[0].backbone, "n": len(finished),
        "runs": [run.id for run, _ in finished], "seeds": [run.settings.seed for run, _ in finished],
        "split_ids": [run.split_id for run, _ in finished],
        **{name: _spread([_round(metrics[key]) for _, metrics in finished]) for name, key in HEADLINE},
    }


def _p_text(p: float | None) -> str:
    if p is None:
        return "p undefined"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _ci_text(ci: Sequence[float | None]) -> str:
    return "CI undefined" if ci[0] is None else f"95% CI {ci[0]:+.3f} to {ci[1]:+.3f}"


def _value_text(value: float | None) -> str:
    return "undefined" if value is None else f"{value:+.3f}"


def pair_table(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per pair and quantity, for the page's table: ``pair``, ``quantity``, ``difference``,
    ``95% CI``, ``p``, ``Holm p``, ``method``, ``bootstrap check`` (ΔAUC's bootstrap interval and
    p, outside the Holm family; empty on the other rows). Strings, as printed."""
    rows = []
    for pair in result["pairs"]:
        name = f"{pair['label_a']} − {pair['label_b']}"
        for key, quantity, method in (("delta_auc", "ΔAUC", "clustered DeLong"),
                                      ("delta_sensitivity", "Δsensitivity", "paired bootstrap"),
                                      ("delta_specificity", "Δspecificity", "paired bootstrap")):
            part = pair[key]
            check = part.get("bootstrap")
            rows.append({"pair": name, "quantity": quantity, "difference": _value_text(part["value"]),
                         "95% CI": _ci_text(part["ci95"]), "p": _p_text(part["p"]), "Holm p": _p_text(part["p_holm"]),
                         "method": method,
                         "bootstrap check": f"{_ci_text(check['ci95'])}, {_p_text(check['p'])}" if check else ""})
        test = pair["mcnemar"]
        rows.append({"pair": name, "quantity": "McNemar", "difference": f"{test['b']} vs {test['c']} discordant",
                     "95% CI": "", "p": _p_text(test["p"]), "Holm p": _p_text(test["p_holm"]), "method": test["method"],
                     "bootstrap check": ""})
    return rows


REPEAT_COLUMNS = {"auc": "AUC", "sensitivity": "Sensitivity", "specificity": "Specificity"}
"""Display names of :func:`repeat_table`'s metric columns."""


def repeat_table(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every repeat of a :func:`repeat_summary` and a last ``mean ± SD`` row: ``run``, ``seed``,
    ``split``, ``AUC``, ``Sensitivity``, ``Specificity`` (strings)."""
    def number(value: float | None) -> str:
        return "undefined" if value is None else f"{value:.3f}"

    def spread(part: Mapping[str, Any]) -> str:
        if part["mean"] is None:
            return "undefined"
        return f"{part['mean']:.3f} ± {'n/a' if part['sd'] is None else format(part['sd'], '.3f')}"

    rows = [{"run": str(run), "seed": str(seed), "split": str(split),
             **{REPEAT_COLUMNS[name]: number(summary[name]["values"][i]) for name, _ in HEADLINE}}
            for i, (run, seed, split) in enumerate(zip(summary["runs"], summary["seeds"], summary["split_ids"], strict=True))]
    rows.append({"run": "mean ± SD", "seed": "", "split": "", **{REPEAT_COLUMNS[name]: spread(summary[name]) for name, _ in HEADLINE}})
    return rows


def format_text(result: Mapping[str, Any]) -> str:
    """The readable form ``bonescan compare`` prints without ``--json``."""
    lines = [f"Per study, paired by patient: {result['n_studies']} {result['subset']} studies of {result['n_patients']} patients; "
             f"bootstrap {result['bootstrap']['n_resamples']} resamples (seed {result['bootstrap']['seed']}); "
             "Holm over every p below."]
    for run in result["runs"]:
        lines.append(f"  {run['label']}: study threshold {run['threshold']:.3f} ({run['threshold_source']}), "
                     f"AUC {_number(run['auc'])}, sensitivity {_number(run['sensitivity'])}, "
                     f"specificity {_number(run['specificity'])}")
    for row in pair_table(result):
        ci = f", {row['95% CI']}" if row["95% CI"] else ""
        check = f" (bootstrap check: {row['bootstrap check']})" if row["bootstrap check"] else ""
        lines.append(f"{row['pair']}: {row['quantity']} {row['difference']}{ci}, {row['p']} (Holm {row['Holm p']}); "
                     f"{row['method']}{check}")
    for summary in result.get("repeats", []):
        lines.append(f"Repeat group {summary['group']} ({run_label(summary['backbone'], summary['group'])}, "
                     f"{summary['n']} finished runs):")
        for row in repeat_table(summary):
            name = row["run"] if row["run"] == "mean ± SD" else f"run {row['run']} (seed {row['seed']}, split {row['split']})"
            lines.append(f"  {name}: AUC {row['AUC']}, sensitivity {row['Sensitivity']}, specificity {row['Specificity']}")
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.3f}"
