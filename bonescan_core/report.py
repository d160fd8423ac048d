"""Exports of a run: predictions CSV, a self-contained HTML report, and the model bundle.

The bundle's ``model.keras`` stands alone: it takes a scan's raw counts and carries the
app's input pipeline (:mod:`bonescan_core.bundle`), and the bundle's ``predict.py`` runs it
without bonescan.

The same functions serve the Evaluate page's downloads and the CLI (``predictions``,
``export``). Nothing identifying leaves: rows carry database ids only (patients are the
pseudonymous ids of this database), and the config holds settings, not file paths of scans.
"""

from __future__ import annotations

import html
import io
import json
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from bonescan_core import assessment, bundle, calibration, errors, evaluation, modelcard, plots, readers, runs
from bonescan_core.csvfile import write_rows
from bonescan_core.heavy import keras_module, sqlite_utils
from bonescan_core.results import UNIT_LABELS, UNITS, LevelResult

PREDICTION_COLUMNS = ("image_id", "study_id", "patient_id", "view", "subset", "label", "probability")
STUDY_PREDICTION_COLUMNS = ("study_id", "patient_id", "subset", "label", "probability")
BUNDLE_FILES = ("model.keras", "config.json", "metrics.json", "predictions.csv", "report.html", "model_card.md",
                *bundle.CODE_FILES)


def predictions_rows(db: sqlite_utils.Database, run_id: int) -> list[dict[str, Any]]:
    """Every stored prediction of a run (validation, test, then external), by subset then image id;
    an external study's unknown label is an empty cell."""
    data = runs.predictions(db, run_id)
    return [
        {"image_id": int(data["image_id"][i]), "study_id": int(data["study_id"][i]),
         "patient_id": int(data["patient_id"][i]), "view": data["view"][i] or "", "subset": data["subset"][i],
         "label": "" if data["label"][i] == runs.UNKNOWN_LABEL else int(data["label"][i]),
         "probability": round(float(data["probability"][i]), 6)}
        for i in range(len(data["image_id"]))
    ]


def study_predictions_rows(db: sqlite_utils.Database, run_id: int) -> list[dict[str, Any]]:
    """One row per study of a run (``runs.study_predictions``: stored study rows, or an older
    run's views collapsed by its ``study_aggregate``), by subset then study id; an unknown
    label (external studies) is an empty cell."""
    data = runs.study_predictions(db, run_id, aggregate=runs.get(db, run_id).settings.study_aggregate)
    return [
        {"study_id": int(data["study_id"][i]), "patient_id": int(data["patient_id"][i]), "subset": data["subset"][i],
         "label": "" if np.isnan(data["label"][i]) else int(data["label"][i]),
         "probability": round(float(data["probability"][i]), 6)}
        for i in range(len(data["study_id"]))
    ]


def predictions_csv(db: sqlite_utils.Database, run_id: int, unit: str = "image") -> str:
    """``predictions --csv`` text (label 1 = metastatic): ``unit="image"`` (default) columns
    PREDICTION_COLUMNS, one row per image; ``unit="study"`` columns STUDY_PREDICTION_COLUMNS."""
    if unit not in UNITS:
        raise errors.InputError(f"unit must be one of {', '.join(UNITS)}; got {unit!r}")
    buffer = io.StringIO()
    if unit == "study":
        write_rows(buffer, STUDY_PREDICTION_COLUMNS, study_predictions_rows(db, run_id))
    else:
        write_rows(buffer, PREDICTION_COLUMNS, predictions_rows(db, run_id))
    return buffer.getvalue()


def _metrics_table(level: LevelResult, unit: str) -> str:
    """The metrics of one level as an HTML table whose header names its unit (``per study`` / ``per image``)."""
    rows = [
        f"<tr><td>{html.escape(plots.metric_name(name))}</td><td>{metric.value_text()}</td><td>{metric.interval_text()}</td></tr>"
        for name, metric in level.metrics.items()
    ]
    return (f"<table><tr><th>metric ({UNIT_LABELS[unit]})</th><th>value</th><th>95% CI (patient bootstrap)</th></tr>"
            + "".join(rows) + "</table>")


def _reproducibility_table(record: dict[str, Any] | None) -> str:
    """The run's ``results["reproducibility"]`` as a two-column table (runs trained before it: a sentence)."""
    if not record:
        return "<p>Not recorded (the run was trained before bonescan recorded it).</p>"
    rows = [(key, json.dumps(value) if isinstance(value, dict) else ("—" if value is None else str(value)))
            for key, value in record.items()]
    return "<table>" + "".join(f"<tr><td>{html.escape(k)}</td><td><code>{html.escape(v)}</code></td></tr>" for k, v in rows) + "</table>"


def _calibration_and_subgroups(db: sqlite_utils.Database, run_id: int, result: Any) -> str:
    """The report's calibration section (sentence, reliability before/after, decision curve) and subgroup forest plot."""
    parts = []
    curves = calibration.run_curves(db, run_id, result.subset)
    if result.calibration is not None and curves is not None:
        figures = [plots.reliability_before_after(curves["reliability"]), plots.decision_curve_figure(curves["decision"])]
        parts.append(f"<h2>Calibration (test studies)</h2><p>{html.escape(calibration.summary_text(result.calibration))}</p>"
                     '<div class="grid">' + "".join(f"<div>{f.to_html(full_html=False, include_plotlyjs=False)}</div>"
                                                    for f in figures) + "</div>")
    if result.subgroups:
        parts.append("<h2>Subgroups</h2><p>Groups with fewer than 10 positive or negative units are marked small.</p>"
                     + plots.subgroup_forest(result.subgroups).to_html(full_html=False, include_plotlyjs=False))
    return "".join(parts)


def readers_section(db: sqlite_utils.Database, run_id: int, comparison: readers.ReaderComparison | None) -> str:
    """The report's "Readers vs model" section: a sentence, and when a reader could be scored the
    readers-on-ROC figure and the per-reader table (``readers.compare`` on the test studies)."""
    if comparison is None:
        return ""
    parts = [f'<h2 id="readers-vs-model">Readers vs model ({html.escape(comparison.where)})</h2>',
             f"<p>{html.escape(readers.summary_text(comparison))} Only studies with out-of-sample predictions count. "
             "95% CIs: percentile bootstrap over patients; kappa: Cohen's, model at its study threshold vs the reader.</p>"]
    if any(r.n_scored for r in comparison.readers):
        run = runs.get(db, run_id)
        figure = plots.readers_roc_figure(evaluation.run_label(run.backbone, run_id), comparison.roc, comparison.threshold,
                                          [r.as_json() for r in comparison.readers])
        parts.append(figure.to_html(full_html=False, include_plotlyjs=False))
        rows = comparison.table_rows()
        header = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row.values()) + "</tr>" for row in rows)
        parts.append(f"<table><tr>{header}</tr>{body}</table>")
    return "".join(parts)


def _reader_comparison(db: sqlite_utils.Database, run_id: int) -> readers.ReaderComparison | None:
    """``readers.compare`` on the run's test studies, None when it has none."""
    try:
        return readers.compare(db, run_id)
    except evaluation.NoPredictionsError:
        return None


def model_card_markdown(db: sqlite_utils.Database, run_id: int) -> str:
    """The bundle's ``model_card.md``: the run's model card and the CLAIM 2024 / TRIPOD+AI checklist (:mod:`modelcard`)."""
    run = runs.get(db, run_id)
    title = f"Model card: {evaluation.run_label(run.backbone, run_id, with_id=True)}, bone metastasis on whole-body bone scans"
    return modelcard.to_markdown(modelcard.model_card(db, run_id, reader_result=_reader_comparison(db, run_id)), title)


def report_html(db: sqlite_utils.Database, run_id: int, threshold: float | None = None, unit: str = "study") -> str:
    """A self-contained HTML report (plotly.js inlined once; opens with no network).

    Contents: backbone and run, metrics with CIs per study and per image (``unit`` first; the
    image level is the paper's), confusion matrix, ROC/PR/calibration curves of ``unit``
    (every table and figure title names its unit), training curves, calibration of the test
    studies (reliability before/after, decision curve), subgroups, readers against the model
    (:func:`readers_section`), the reproducibility record, the full configuration, the model card
    and the CLAIM 2024 / TRIPOD+AI checklist (:mod:`modelcard`; the card at the run's own
    thresholds whatever ``threshold`` is).
    """
    run = runs.get(db, run_id)
    result = assessment.evaluate(db, run_id, threshold=threshold, unit=unit)
    name = evaluation.run_label(run.backbone, run_id, with_id=True)
    if unit == "study":
        data = runs.study_predictions(db, run_id, "test", aggregate=run.settings.study_aggregate)
        known = np.isfinite(data["label"])
        labels, probabilities = data["label"][known].astype(np.int64), data["probability"][known]
    else:
        data = runs.predictions(db, run_id, "test")
        labels, probabilities = data["label"], data["probability"]
    figures = plots.run_figures(name, labels, probabilities, result.threshold, result.confusion,
                                runs.epochs(db, run_id), unit="studies" if unit == "study" else "images").values()
    parts = [figure.to_html(full_html=False, include_plotlyjs=(index == 0)) for index, figure in enumerate(figures)]
    config = json.dumps(run.config_record(), indent=2, sort_keys=True)
    rule = html.escape(str(result.threshold_rule or "stored")) + (
        f" (target {result.threshold_target:g})" if result.threshold_target is not None else "")
    levels = {
        "study": f"<h2>Per study ({html.escape(result.study_aggregation)}; threshold {result.level_threshold('study'):.3f}, "
                 f"chosen on validation studies)</h2>"
                 + (_metrics_table(result.study_level, "study") if result.study_level else "<p>n/a</p>"),
        "image": f"<h2>Per image (as in the paper; threshold {result.level_threshold('image'):.3f}, chosen on validation "
                 f"images)</h2>{_metrics_table(result.image_level, 'image')}",
    }
    other = "image" if unit == "study" else "study"
    comparison = _reader_comparison(db, run_id)
    card = modelcard.model_card(db, run_id, result=result if threshold is None else None, reader_result=comparison)
    notes = "".join(f"<p><em>Note: {html.escape(note)}</em></p>" for note in result.notes)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>bonescan run {run_id}: {html.escape(name)}</title>
<style>
body {{ font-family: Inter, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }} td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: left; }}
pre {{ background: #f6f6f6; padding: 1em; overflow-x: auto; }} .grid {{ display: grid; grid-template-columns: 1fr 1fr; }}
</style></head><body>
<h1>{html.escape(name)} — bone metastasis, run {run_id}</h1>
<p>Test subset: {result.n_images} images, {result.n_studies} studies, {result.n_patients} patients. The unit of analysis is
the {html.escape(unit)} ({UNIT_LABELS[unit]}). Decision threshold {result.threshold:.3f} ({html.escape(result.threshold_source)};
rule {rule}, chosen on the validation subset unless stated).
Device: {html.escape(str(run.results.device or 'unknown'))}. Status: {html.escape(run.status)}.</p>
{notes}{levels[unit]}{levels[other]}
<h2 id="report-figures">Figures ({UNIT_LABELS[unit]})</h2><div class="grid">{''.join(f'<div>{part}</div>' for part in parts)}</div>
{_calibration_and_subgroups(db, run_id, result)}
{readers_section(db, run_id, comparison)}
<h2 id="report-reproducibility">Reproducibility</h2>{_reproducibility_table(run.results.facts.get("reproducibility"))}
<h2>Configuration</h2><pre>{html.escape(config)}</pre>
<h2 id="model-card">Model card</h2>{modelcard.to_html(card)}
<h2 id="checklist">Reporting checklist (CLAIM 2024, TRIPOD+AI)</h2>
<p>Where each item is answered in this report, its model card or the bundle; "not addressed": the authors must answer
it in the paper.</p>{modelcard.checklist_html()}
<p><small>Generated by bonescan. Confidence intervals: percentile bootstrap over patients,
{result.bootstrap.get('n_resamples', 1000)} resamples.</small></p>
</body></html>
"""


def bundle_config(run: runs.Run) -> dict[str, Any]:
    """A bundle's ``config.json``: the run's configuration (settings and facts, so also a stored
    ``calibration`` and ``thresholds``), its decision ``threshold``, and ``model_input``, which
    says what the exported model takes."""
    record = run.config_record()
    record.setdefault("threshold", run.results.threshold)
    views = ["anterior", "posterior"] if run.settings.view_mode == "composite" else ["counts"]
    record["model_input"] = {
        "inputs": views, "shape": [1, None, None, 1], "dtype": "float32",
        "pixels": "the image's raw counts (negatives set to 0), any size; the model normalises and fits them itself",
        "output": "probability before calibration",
    }
    return record


def export_bundle(db: sqlite_utils.Database, db_path: Path, run_id: int, out_dir: Path) -> list[Path]:
    """Write BUNDLE_FILES for a finished run into ``out_dir`` (created); returns the paths.

    The run's model (checked against its sha256 and loaded with ``safe_mode=True`` by
    ``runs.load_model``: Keras loads here, export is a model verb) is wrapped by
    :func:`bundle.standalone_model` and saved as ``model.keras``, which is loaded back in safe
    mode before anything else is written, so a bundle never carries a broken model.
    ``predict.py`` and ``bonescan_layers.py`` run it without bonescan.
    """
    run = runs.get(db, run_id)
    if run.status != "done":
        raise errors.InputError(f"run {run_id} is {run.status}; only finished runs can be exported")
    model, backbone, _ = runs.load_model(db_path, run)  # raises ModelUnavailable with advice
    out_dir.mkdir(parents=True, exist_ok=True)
    exported = out_dir / "model.keras"
    bundle.standalone_model(model, backbone, run.settings.view_mode, run.settings.mode).save(exported)
    keras_module().saving.load_model(exported, compile=False, safe_mode=True)
    (out_dir / "config.json").write_text(json.dumps(bundle_config(run), indent=2, sort_keys=True))
    (out_dir / "metrics.json").write_text(assessment.evaluate(db, run_id).to_json_text())
    (out_dir / "predictions.csv").write_text(predictions_csv(db, run_id))
    (out_dir / "report.html").write_text(report_html(db, run_id), encoding="utf-8")
    (out_dir / "model_card.md").write_text(model_card_markdown(db, run_id), encoding="utf-8")
    bundle.write_code(out_dir)
    return [out_dir / name for name in BUNDLE_FILES]


def bundle_zip(db: sqlite_utils.Database, db_path: Path, run_id: int) -> bytes:
    """The model bundle (:func:`export_bundle`'s files) as zip bytes, each file under ``run-<id>/``.

    For a download: the files are written to a temporary folder that is removed afterwards.
    Raises what :func:`export_bundle` raises.
    """
    buffer = io.BytesIO()
    with tempfile.TemporaryDirectory() as folder:
        files = export_bundle(db, db_path, run_id, Path(folder) / f"run-{run_id}")
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in files:
                archive.write(path, f"run-{run_id}/{path.name}")
    return buffer.getvalue()
