"""The figures build from evaluation results, hold the expected traces, and serialise."""

from __future__ import annotations

import json

import numpy as np
import plotly.graph_objects as go
import pytest

from bonescan_core import evaluation as ev
from bonescan_core import plots


@pytest.fixture(scope="module")
def runs():
    """Labels and three runs' probabilities of 120 images (60 patients, two views each)."""
    rng = np.random.default_rng(0)
    y = (rng.random(120) < 0.4).astype(int)
    out = {}
    for name, separation in (("DenseNet121", 1.4), ("ResNet50", 1.0), ("VGG19", 0.8)):
        out[name] = 1 / (1 + np.exp(-(rng.normal(0, 1, 120) + separation * (2 * y - 1))))
    return y, out


def fake_result(y, p, threshold=0.5):
    """An evaluate()-shaped dict without a database (same construction as evaluate's)."""
    groups = np.arange(y.size) // 2
    values, ci = ev.point_metrics(y, p, threshold), ev.bootstrap_ci(y, p, groups, threshold, n_resamples=200)
    block = {"metrics": {k: {"value": round(values[k], 4), "ci95": [round(ci[k][0], 4), round(ci[k][1], 4)]} for k in ev.METRICS},
             "confusion": ev.confusion(y, p, threshold)}
    return {"threshold": threshold, **block, "study_level": block}


def serialisable(fig: go.Figure) -> None:
    assert isinstance(fig, go.Figure)
    json.loads(fig.to_json())  # what the app and the HTML report need
    assert fig.layout.title.text


def test_confusion_heatmap_shows_counts_and_row_percentages():
    fig = plots.confusion_heatmap({"tp": 52, "fp": 8, "tn": 90, "fn": 21}, threshold=0.41)
    serialisable(fig)
    (heatmap,) = fig.data
    assert list(heatmap.y) == ["Actual: metastatic", "Actual: no metastasis"]
    assert list(heatmap.x) == ["Predicted: metastatic", "Predicted: no metastasis"]
    text = np.array(heatmap.text)
    assert text[0][0] == "<b>52</b><br>71.2%" and text[0][1] == "<b>21</b><br>28.8%"
    assert text[1][0] == "<b>8</b><br>8.2%" and text[1][1] == "<b>90</b><br>91.8%"
    assert np.allclose(np.array(heatmap.z, dtype=float), [[52 / 73, 21 / 73], [8 / 98, 90 / 98]])
    assert (heatmap.zmin, heatmap.zmax) == (0.0, 1.0)
    assert "threshold 0.41" in fig.layout.title.text and "n = 171 images" in fig.layout.title.text
    assert "False negative" in heatmap.customdata[0][1]
    # A class with no cases: no percentage rather than a division by zero.
    empty_row = plots.confusion_heatmap({"tp": 0, "fp": 3, "tn": 5, "fn": 0}, unit="studies")
    assert np.array(empty_row.data[0].text)[0][0] == "<b>0</b><br>—"
    serialisable(empty_row)


def test_roc_figure_overlays_runs_with_operating_points(runs):
    y, probabilities = runs
    curves = {name: ev.roc_points(y, p) for name, p in probabilities.items()}
    fig = plots.roc_figure(curves, operating_thresholds={"DenseNet121": 0.5})
    serialisable(fig)
    names = [trace.name for trace in fig.data]
    assert names[0].startswith("Chance")
    auc = curves["DenseNet121"]["auc"]
    assert f"DenseNet121 (AUC {auc:.2f})" in names
    assert len(fig.data) == 1 + 3 + 1  # chance, three curves, one operating point
    (marker,) = [t for t in fig.data if t.mode == "markers"]
    confusion = ev.confusion(y, probabilities["DenseNet121"], 0.5)
    assert marker.y[0] == pytest.approx(confusion["tp"] / (confusion["tp"] + confusion["fn"]))
    assert marker.x[0] == pytest.approx(confusion["fp"] / (confusion["fp"] + confusion["tn"]))
    assert tuple(fig.layout.xaxis.range) == tuple(fig.layout.yaxis.range) == (-0.01, 1.01)
    # One run's points alone are accepted too.
    assert len(plots.roc_figure(curves["VGG19"]).data) == 2


def test_pr_figure_has_curves_and_the_prevalence_baseline(runs):
    y, probabilities = runs
    curves = {name: ev.pr_points(y, p) for name, p in probabilities.items()}
    fig = plots.pr_figure(curves, operating_thresholds={"ResNet50": 0.5})
    serialisable(fig)
    curve_traces = [t for t in fig.data if t.name and "(AP " in t.name]
    assert len(curve_traces) == 3 and all(t.line.shape == "hv" for t in curve_traces)
    baseline = [t for t in fig.data if t.name and t.name.startswith("Chance")]
    assert len(baseline) == 1 and baseline[0].y[0] == pytest.approx(y.mean())  # one line: same test images
    (marker,) = [t for t in fig.data if t.mode == "markers"]
    confusion = ev.confusion(y, probabilities["ResNet50"], 0.5)
    assert marker.y[0] == pytest.approx(confusion["tp"] / (confusion["tp"] + confusion["fp"]))


def test_calibration_figure_has_reliability_and_counts(runs):
    y, probabilities = runs
    curves = {name: ev.calibration_points(y, p) for name, p in probabilities.items()}
    fig = plots.calibration_figure(curves)
    serialisable(fig)
    scatters = [t for t in fig.data if isinstance(t, go.Scatter) and t.name != "Perfectly calibrated"]
    bars = [t for t in fig.data if isinstance(t, go.Bar)]
    assert len(scatters) == len(bars) == 3
    densenet = curves["DenseNet121"]
    filled = densenet["count"] > 0
    np.testing.assert_allclose(scatters[0].x, densenet["mean_predicted"][filled])
    np.testing.assert_allclose(scatters[0].y, densenet["observed"][filled])
    assert sum(bars[0].y) == y.size
    assert "ECE" in scatters[0].name and tuple(fig.layout.yaxis.range) == (-0.01, 1.01)
    assert fig.layout.yaxis2.title.text == "Images"


def test_a_per_study_calibration_figure_counts_studies(runs):
    y, probabilities = runs
    fig = plots.run_figures("ResNet50", y, probabilities["ResNet50"], 0.5, ev.confusion(y, probabilities["ResNet50"], 0.5),
                            [], unit="studies")["calibration"]
    assert fig.layout.yaxis2.title.text == "Studies"
    assert all("studies" in t.hovertemplate for t in fig.data if isinstance(t, go.Bar))


def test_training_curves_from_stored_epoch_rows():
    rows = [
        {"epoch": e, "phase": "head" if e <= 3 else "finetune", "loss": 1.0 / e, "val_loss": 1.2 / e,
         "metrics": json.dumps({"accuracy": 0.5 + e / 20, "val_accuracy": 0.45 + e / 20, "auc": 0.6 + e / 20})}
        for e in (5, 1, 2, 3, 4)  # any order
    ]
    rows[0]["val_loss"] = None  # a missing value is a gap, not an error
    fig = plots.training_curves(rows)
    serialisable(fig)
    names = [t.name for t in fig.data]
    assert names[:2] == ["train loss", "validation loss"]
    assert {"train accuracy", "validation accuracy", "train roc auc"} <= set(names)
    assert "validation roc auc" not in names  # not recorded
    assert list(fig.data[0].x) == [1, 2, 3, 4, 5]
    assert [a.text for a in fig.layout.annotations if a.text in ("head", "finetune")] == ["head", "finetune"]
    # metrics as a dict works as well; no epochs gives an explanatory empty figure
    rows[1]["metrics"] = {"accuracy": 0.7}
    serialisable(plots.training_curves(rows))
    empty = plots.training_curves([])
    assert any("No epochs" in a.text for a in empty.layout.annotations)


def test_forest_plot_one_row_per_run_per_metric(runs):
    y, probabilities = runs
    results = {name: fake_result(y, p) for name, p in probabilities.items()}
    metrics = ("accuracy", "recall", "precision", "f1", "auc")
    fig = plots.forest_plot(results, metrics=metrics)
    serialisable(fig)
    assert [t.name for t in fig.data] == list(results)
    for trace, (name, result) in zip(fig.data, results.items(), strict=True):
        values = [result["metrics"][m]["value"] for m in metrics]
        lows = [result["metrics"][m]["ci95"][0] for m in metrics]
        highs = [result["metrics"][m]["ci95"][1] for m in metrics]
        assert list(trace.x) == pytest.approx(values)
        assert list(trace.error_x.array) == pytest.approx([h - v for h, v in zip(highs, values, strict=True)])
        assert list(trace.error_x.arrayminus) == pytest.approx([v - lo for v, lo in zip(values, lows, strict=True)])
        assert len(set(trace.y)) == len(metrics)
        assert name in trace.text[0] and "95% CI" in trace.text[0]
    # Rows of one metric sit together: the group's y positions are consecutive.
    first_metric_rows = sorted(trace.y[0] for trace in fig.data)
    assert first_metric_rows == [0, 1, 2]
    assert list(fig.layout.yaxis.ticktext) == ["Accuracy", "Recall (sensitivity)", "Precision (PPV)", "F1", "ROC AUC"]
    assert tuple(fig.layout.xaxis.range) == (0, 1.0)


def test_forest_plot_with_the_papers_values_and_missing_metrics(runs):
    y, probabilities = runs
    result = fake_result(y, probabilities["VGG19"])
    result["metrics"]["precision"] = {"value": None, "ci95": [None, None]}  # undefined on these images
    paper = {"Paper: DenseNet121": {"accuracy": 0.83, "recall": 0.76, "precision": 0.86, "f1": 0.81}}
    fig = plots.forest_plot({"VGG19": result}, reference=paper, level="study")
    serialisable(fig)
    assert [t.name for t in fig.data] == ["VGG19", "Paper: DenseNet121"]
    assert fig.data[0].x[2] is None and fig.data[1].x[0] == 0.83 and fig.data[1].marker.symbol == "diamond-open"
    assert "per study" in fig.layout.title.text
    with pytest.raises(ValueError, match="level"):
        plots.forest_plot({"VGG19": result}, level="patient")


def test_run_figures_is_the_pages_and_the_reports_set(runs):
    y, probabilities = runs
    figures = plots.run_figures("DenseNet121", y, probabilities["DenseNet121"], 0.4, {"tp": 3, "fp": 1, "tn": 5, "fn": 2}, [], unit="studies")
    assert list(figures) == list(plots.RUN_FIGURES)
    assert "(n = 11 studies), threshold 0.40" in figures["confusion"].layout.title.text
    roc_names = [trace.name for trace in figures["roc"].data]
    assert "DenseNet121 @ 0.40" in roc_names and any(name.startswith("DenseNet121 (AUC ") for name in roc_names)
    assert any(trace.name == "DenseNet121 @ 0.40" for trace in figures["pr"].data)
