"""Plotly figures of evaluation results, for the app and the self-contained HTML report.

Pure functions: each takes the plain dicts of :mod:`bonescan_core.evaluation` (or stored
rows) and returns a ``plotly.graph_objects.Figure``; no file or database IO, no Streamlit.
:func:`run_figures` is one run's whole set, for the Evaluate page and the HTML report. The
Grad-CAM overlay (:func:`overlay`, colour map :data:`TURBO`) is the one picture made as an RGB
array instead (the explorer, ``bonescan explain``).
Probability-scale axes run 0..1; every trace has hover text; colours are the Okabe-Ito
palette (distinguishable with colour-vision deficiency), the same run keeping the same
colour across figures when passed in the same order.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from bonescan_core import errors, evaluation, pixelstore

PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
"""Okabe-Ito colours, in the order runs are drawn."""

TEMPLATE = "plotly_white"
GREY = "#888888"
FONT = {"family": "Inter, Segoe UI, Helvetica, Arial, sans-serif", "size": 13}

METRIC_NAMES = {
    "accuracy": "Accuracy",
    "recall": "Recall (sensitivity)",
    "precision": "Precision (PPV)",
    "f1": "F1",
    "specificity": "Specificity",
    "npv": "NPV",
    "auc": "ROC AUC",
    "pr_auc": "PR AUC",
    "brier": "Brier score (lower is better)",
    "loss": "Loss",
}
"""Display names of metric keys (unknown keys are shown title-cased)."""

POSITIVE, NEGATIVE = "metastatic", "no metastasis"


def colour(index: int) -> str:
    """The palette colour of the index-th run (cycles after eight)."""
    return PALETTE[index % len(PALETTE)]


def metric_name(key: str) -> str:
    """Display name of a metric key, e.g. ``"recall"`` -> ``"Recall (sensitivity)"``."""
    return METRIC_NAMES.get(key, key.replace("_", " ").capitalize())


def _layout(fig: go.Figure, title: str, **kwargs: Any) -> go.Figure:
    """Shared look: white template, title top-left, readable fonts; ``kwargs`` override."""
    settings: dict[str, Any] = {
        "template": TEMPLATE,
        "title": {"text": title, "x": 0.0, "xanchor": "left"},
        "font": FONT,
        "hoverlabel": {"font": {"size": 12}},
        "legend": {"bgcolor": "rgba(255,255,255,0.8)"},
        "margin": {"l": 70, "r": 30, "t": 70, "b": 60},
    }
    settings.update(kwargs)  # callers override the defaults (legend position, size, margins)
    fig.update_layout(**settings)
    return fig


def _curves(curves: Mapping[str, Any], key: str) -> dict[str, Mapping[str, Any]]:
    """Accept one curve's points (has ``key``) or ``{name: points}``; return the latter."""
    if key in curves:
        return {"model": curves}
    return dict(curves)


def _fmt(value: Any, digits: int = 3) -> str:
    """A number for hover text; '—' for None or nan."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{float(value):.{digits}f}"


def _threshold_text(thresholds: np.ndarray) -> list[str]:
    return ["nothing predicted positive" if not np.isfinite(t) else f"≥ {t:.3f}" for t in np.asarray(thresholds, dtype=float)]


def _unit_square(fig: go.Figure, x_title: str, y_title: str) -> None:
    """0..1 on both axes (a hair of padding so lines on the border show), equal scale.

    When the container is not square the plot shrinks toward its lower-left corner, so
    legends placed in paper coordinates near (0, 0) stay inside the axes.
    """
    pad = 0.01
    fig.update_xaxes(title=x_title, range=[-pad, 1 + pad], constrain="domain", constraintoward="left",
                     tick0=0, dtick=0.2, zeroline=False)
    fig.update_yaxes(title=y_title, range=[-pad, 1 + pad], scaleanchor="x", scaleratio=1, constrain="domain",
                     constraintoward="bottom", tick0=0, dtick=0.2, zeroline=False)


# --- confusion matrix -------------------------------------------------------------------

def confusion_heatmap(confusion: Mapping[str, int], threshold: float | None = None, unit: str = "images",
                      title: str | None = None) -> go.Figure:
    """2x2 confusion matrix: counts and row percentages, shaded by row percentage.

    Rows are the truth (Actual: metastatic, no metastasis), columns the prediction; row
    percentages are sensitivity / miss rate on the metastatic row and false-positive rate /
    specificity on the other, so the colour reads the same whatever the class balance.

    Args:
        confusion: ``{"tp", "fp", "tn", "fn"}`` counts (as :func:`evaluation.confusion`).
        threshold: the decision threshold, shown in the title.
        unit: what is counted ("images" or "studies"), for the text.
        title: overrides the default title.
    """
    tp, fn, fp, tn = (int(confusion[k]) for k in ("tp", "fn", "fp", "tn"))
    counts = np.array([[tp, fn], [fp, tn]])
    row_totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(row_totals > 0, counts / np.maximum(row_totals, 1), np.nan)
    actual = [f"Actual: {POSITIVE}", f"Actual: {NEGATIVE}"]
    predicted = [f"Predicted: {POSITIVE}", f"Predicted: {NEGATIVE}"]
    names = [["True positive", "False negative"], ["False positive", "True negative"]]
    text = [[f"<b>{counts[i, j]}</b><br>{'—' if np.isnan(share[i, j]) else f'{share[i, j]:.1%}'}" for j in range(2)] for i in range(2)]
    hover = [
        [f"{names[i][j]}<br>{actual[i]}<br>{predicted[j]}<br>{counts[i, j]} {unit}"
         + ("" if np.isnan(share[i, j]) else f" ({share[i, j]:.1%} of actual {[POSITIVE, NEGATIVE][i]})")
         for j in range(2)]
        for i in range(2)
    ]
    fig = go.Figure(go.Heatmap(
        z=share, x=predicted, y=actual, text=text, texttemplate="%{text}", textfont={"size": 18},
        customdata=hover, hovertemplate="%{customdata}<extra></extra>",
        colorscale="Blues", zmin=0.0, zmax=1.0, xgap=3, ygap=3,
        colorbar={"title": {"text": "Row %"}, "tickformat": ".0%"},
    ))
    n = int(counts.sum())
    default = f"Confusion matrix (n = {n} {unit})" + ("" if threshold is None else f", threshold {threshold:.2f}")
    _layout(fig, title or default, width=560, height=460)
    fig.update_yaxes(autorange="reversed", title=None)  # metastatic row on top
    fig.update_xaxes(side="bottom", title=None)
    return fig


# --- curves -----------------------------------------------------------------------------

def _operating_index(thresholds: np.ndarray, threshold: float) -> int | None:
    """Index of the curve point for 'predict positive when p >= threshold': the point with
    the smallest curve threshold that is still >= it (the curves keep every distinct score)."""
    t = np.asarray(thresholds, dtype=float)
    candidates = np.flatnonzero(t >= threshold)
    if candidates.size == 0:
        return None
    return int(candidates[np.argmin(t[candidates])])


def roc_figure(curves: Mapping[str, Any], operating_thresholds: Mapping[str, float] | None = None,
               title: str = "ROC curve") -> go.Figure:
    """ROC curves of one or more runs, with the chance diagonal.

    Args:
        curves: ``{name: evaluation.roc_points(...)}`` (or a single roc_points dict).
        operating_thresholds: ``{name: threshold}``: marks each run's operating point.
        title: figure title.
    """
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="Chance (AUC 0.50)",
                             line={"color": GREY, "dash": "dash", "width": 1}, hoverinfo="skip"))
    for i, (name, points) in enumerate(_curves(curves, "fpr").items()):
        fpr, tpr = np.asarray(points["fpr"], dtype=float), np.asarray(points["tpr"], dtype=float)
        fig.add_trace(go.Scatter(
            x=fpr, y=tpr, mode="lines", name=f"{name} (AUC {_fmt(points.get('auc'), 2)})", legendgroup=name,
            line={"color": colour(i), "width": 2.5}, text=_threshold_text(points["thresholds"]),
            hovertemplate=f"<b>{name}</b><br>threshold %{{text}}<br>sensitivity %{{y:.3f}}<br>"
                          "specificity %{customdata:.3f}<extra></extra>",
            customdata=1.0 - fpr,
        ))
        if operating_thresholds and name in operating_thresholds and fpr.size:
            at = _operating_index(points["thresholds"], operating_thresholds[name])
            if at is not None:
                fig.add_trace(go.Scatter(
                    x=[fpr[at]], y=[tpr[at]], mode="markers", name=f"{name} @ {operating_thresholds[name]:.2f}",
                    legendgroup=name, showlegend=False,
                    marker={"color": colour(i), "size": 12, "symbol": "circle", "line": {"color": "white", "width": 2}},
                    hovertemplate=f"<b>{name}</b> operating point<br>threshold {operating_thresholds[name]:.3f}<br>"
                                  f"sensitivity {tpr[at]:.3f}<br>specificity {1 - fpr[at]:.3f}<extra></extra>",
                ))
    _layout(fig, title, width=620, height=650, legend={"x": 0.98, "y": 0.02, "xanchor": "right", "yanchor": "bottom",
                                                       "bgcolor": "rgba(255,255,255,0.8)"})
    _unit_square(fig, "1 − specificity (false-positive rate)", "Sensitivity (true-positive rate)")
    return fig


def readers_roc_figure(name: str, roc: Mapping[str, Any], threshold: float, readers: Sequence[Mapping[str, Any]],
                       title: str = "Readers on the model's ROC curve (per study)") -> go.Figure:
    """The model's study-level ROC curve with its operating point, and each reader as a point
    (1 − specificity, sensitivity) with 95% CI whiskers on both axes.

    Args:
        name: the model's name (legend).
        roc: ``evaluation.roc_points`` of the model's studies.
        threshold: the model's study threshold (its operating point).
        readers: ``readers.ReaderScore.as_json()`` dicts: ``reader``, ``n_scored``, ``sensitivity``
            and ``specificity`` as ``{"value", "ci95"}``; a reader without a value is not drawn.
        title: figure title.
    """
    fig = roc_figure({name: roc}, {name: threshold}, title=title)
    drawn = [r for r in readers if r["sensitivity"]["value"] is not None and r["specificity"]["value"] is not None]
    symbols = ("diamond", "square", "triangle-up", "cross", "star", "x", "pentagon", "hexagon")
    for i, reader in enumerate(drawn):
        sens, spec = reader["sensitivity"], reader["specificity"]
        x, y = 1.0 - spec["value"], sens["value"]
        s_low, s_high = (sens["ci95"] or [None, None])[:2]
        c_low, c_high = (spec["ci95"] or [None, None])[:2]
        fig.add_trace(go.Scatter(
            x=[x], y=[y], mode="markers", name=f"{reader['reader']} (n = {reader['n_scored']})",
            marker={"color": colour(i + 1), "size": 12, "symbol": symbols[i % len(symbols)],
                    "line": {"color": "white", "width": 1}},
            # 1 − specificity runs the other way: its upper end is 1 − the specificity's lower bound.
            error_x={"type": "data", "symmetric": False, "array": [0.0 if c_low is None else (1.0 - c_low) - x],
                     "arrayminus": [0.0 if c_high is None else x - (1.0 - c_high)], "color": colour(i + 1), "thickness": 1.5},
            error_y={"type": "data", "symmetric": False, "array": [0.0 if s_high is None else s_high - y],
                     "arrayminus": [0.0 if s_low is None else y - s_low], "color": colour(i + 1), "thickness": 1.5},
            hovertemplate=(f"<b>{reader['reader']}</b> ({reader['n_scored']} studies)<br>sensitivity {_fmt(y)} "
                           f"(95% CI {_fmt(s_low)}–{_fmt(s_high)})<br>specificity {_fmt(spec['value'])} "
                           f"(95% CI {_fmt(c_low)}–{_fmt(c_high)})<extra></extra>"),
        ))
    return fig


def pr_figure(curves: Mapping[str, Any], operating_thresholds: Mapping[str, float] | None = None,
              title: str = "Precision–recall curve") -> go.Figure:
    """Precision-recall curves (step-wise, as average precision integrates them) with the
    prevalence baseline of a random classifier.

    Args:
        curves: ``{name: evaluation.pr_points(...)}`` (or a single pr_points dict).
        operating_thresholds: ``{name: threshold}``: marks each run's operating point.
        title: figure title.
    """
    fig = go.Figure()
    prevalences: list[float] = []
    for i, (name, points) in enumerate(_curves(curves, "recall").items()):
        recall, precision = np.asarray(points["recall"], dtype=float), np.asarray(points["precision"], dtype=float)
        fig.add_trace(go.Scatter(
            x=recall, y=precision, mode="lines", line_shape="hv", name=f"{name} (AP {_fmt(points.get('ap'), 2)})",
            legendgroup=name, line={"color": colour(i), "width": 2.5}, text=_threshold_text(points["thresholds"]),
            hovertemplate=f"<b>{name}</b><br>threshold %{{text}}<br>recall %{{x:.3f}}<br>precision %{{y:.3f}}<extra></extra>",
        ))
        prevalence = points.get("prevalence")
        if prevalence is not None and not math.isnan(prevalence) and all(abs(prevalence - q) > 1e-9 for q in prevalences):
            prevalences.append(float(prevalence))
        if operating_thresholds and name in operating_thresholds and recall.size:
            at = _operating_index(points["thresholds"], operating_thresholds[name])
            if at is not None:
                fig.add_trace(go.Scatter(
                    x=[recall[at]], y=[precision[at]], mode="markers", name=f"{name} @ {operating_thresholds[name]:.2f}",
                    legendgroup=name, showlegend=False,
                    marker={"color": colour(i), "size": 12, "line": {"color": "white", "width": 2}},
                    hovertemplate=f"<b>{name}</b> operating point<br>threshold {operating_thresholds[name]:.3f}<br>"
                                  f"recall {recall[at]:.3f}<br>precision {precision[at]:.3f}<extra></extra>",
                ))
    for prevalence in prevalences:
        fig.add_trace(go.Scatter(
            x=[0, 1], y=[prevalence, prevalence], mode="lines", name=f"Chance (prevalence {prevalence:.2f})",
            line={"color": GREY, "dash": "dash", "width": 1},
            hovertemplate=f"random classifier: precision = prevalence {prevalence:.3f}<extra></extra>",
        ))
    _layout(fig, title, width=620, height=650, legend={"x": 0.02, "y": 0.02, "xanchor": "left", "yanchor": "bottom",
                                                       "bgcolor": "rgba(255,255,255,0.8)"})
    _unit_square(fig, "Recall (sensitivity)", "Precision (PPV)")
    return fig


def calibration_figure(curves: Mapping[str, Any], title: str = "Calibration (reliability diagram)",
                       unit: str = "images") -> go.Figure:
    """Reliability diagram: observed frequency of metastasis vs mean predicted probability
    per bin, with Wilson 95% intervals, over a histogram of how many images (or studies)
    fall in each bin.

    Args:
        curves: ``{name: evaluation.calibration_points(...)}`` (or a single one).
        title: figure title.
        unit: ``"images"`` or ``"studies"``: what the points count (the histogram's axis).
    """
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.74, 0.26], vertical_spacing=0.05)
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="Perfectly calibrated",
                             line={"color": GREY, "dash": "dash", "width": 1}, hoverinfo="skip"), row=1, col=1)
    named = _curves(curves, "mean_predicted")
    for i, (name, points) in enumerate(named.items()):
        count = np.asarray(points["count"])
        filled = count > 0
        predicted = np.asarray(points["mean_predicted"], dtype=float)[filled]
        observed = np.asarray(points["observed"], dtype=float)[filled]
        low = np.asarray(points["observed_low"], dtype=float)[filled]
        high = np.asarray(points["observed_high"], dtype=float)[filled]
        lower, upper = np.asarray(points["bin_lower"])[filled], np.asarray(points["bin_upper"])[filled]
        hover = [f"bin {a:.2f}–{b:.2f}, n = {c}<br>mean predicted {p:.3f}<br>observed {o:.3f} (95% CI {lo:.2f}–{hi:.2f})"
                 for a, b, c, p, o, lo, hi in zip(lower, upper, count[filled], predicted, observed, low, high, strict=True)]
        fig.add_trace(go.Scatter(
            x=predicted, y=observed, mode="lines+markers", legendgroup=name,
            name=f"{name} (ECE {_fmt(points.get('ece'), 3)}, Brier {_fmt(points.get('brier'), 3)})",
            line={"color": colour(i), "width": 2}, marker={"size": 8},
            error_y={"type": "data", "symmetric": False, "array": high - observed, "arrayminus": observed - low,
                     "color": colour(i), "thickness": 1.2, "width": 4},
            text=hover, hovertemplate=f"<b>{name}</b><br>%{{text}}<extra></extra>",
        ), row=1, col=1)
        width = np.asarray(points["bin_upper"]) - np.asarray(points["bin_lower"])
        fig.add_trace(go.Bar(
            x=(np.asarray(points["bin_lower"]) + np.asarray(points["bin_upper"])) / 2, y=count,
            width=width / max(len(named), 1) * 0.9, offsetgroup=str(i), legendgroup=name, showlegend=False,
            name=name, marker={"color": colour(i), "opacity": 0.75},
            hovertemplate=f"<b>{name}</b><br>p in %{{x:.2f}} ± {width[0] / 2:.2f}: %{{y}} {unit}<extra></extra>",
        ), row=2, col=1)
    _layout(fig, title, width=640, height=680, barmode="group", bargap=0.05,
            legend={"x": 0.98, "y": 0.31, "xanchor": "right", "yanchor": "bottom", "bgcolor": "rgba(255,255,255,0.8)"})
    fig.update_xaxes(range=[-0.01, 1.01], tick0=0, dtick=0.1, zeroline=False)
    fig.update_xaxes(title="Mean predicted probability of metastasis", row=2, col=1)
    fig.update_yaxes(title="Observed frequency", range=[-0.01, 1.01], tick0=0, dtick=0.2, zeroline=False, row=1, col=1)
    fig.update_yaxes(title=unit.capitalize(), rangemode="tozero", row=2, col=1)
    return fig


# --- training ---------------------------------------------------------------------------

def _row_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """The epoch row's metrics dict (stored as JSON text in the epochs table)."""
    metrics = row.get("metrics") or {}
    if isinstance(metrics, str):
        metrics = json.loads(metrics) if metrics.strip() else {}
    return {str(k): v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def training_curves(epochs: Sequence[Mapping[str, Any]], title: str = "Training curves") -> go.Figure:
    """Loss (top) and metrics (bottom) per epoch; training solid, validation dashed; the
    training phases (head, finetune, full) shaded with their names.

    Args:
        epochs: rows with ``epoch`` (1-based), ``phase``, ``loss``, ``val_loss`` and
            ``metrics`` (dict or its JSON text: ``accuracy``, ``val_accuracy``, ``auc``, ...),
            as stored in the ``epochs`` table; any order.
        title: figure title.
    """
    rows = sorted(epochs, key=lambda r: r["epoch"])
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08, row_heights=[0.5, 0.5],
                        subplot_titles=("Loss", "Metrics"))
    _layout(fig, title, width=760, height=620, hovermode="x unified")
    if not rows:
        fig.add_annotation(text="No epochs recorded yet", x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                           font={"size": 16, "color": GREY})
        return fig
    x = [int(r["epoch"]) for r in rows]

    def series(values: list[Any]) -> list[float | None]:
        return [None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in values]

    for key, dash, label in (("loss", "solid", "train loss"), ("val_loss", "dash", "validation loss")):
        values = series([r.get(key) for r in rows])
        if any(v is not None for v in values):
            fig.add_trace(go.Scatter(x=x, y=values, mode="lines+markers", name=label, legendgroup="loss",
                                     line={"color": "#333333", "dash": dash, "width": 2}, marker={"size": 5},
                                     hovertemplate=f"{label} %{{y:.4f}}<extra></extra>"), row=1, col=1)
    per_row = [_row_metrics(r) for r in rows]
    keys = sorted({k.removeprefix("val_") for m in per_row for k in m if k.removeprefix("val_") != "loss"})
    for i, key in enumerate(keys):
        for prefix, dash, split in (("", "solid", "train"), ("val_", "dash", "validation")):
            values = series([m.get(prefix + key) for m in per_row])
            if any(v is not None for v in values):
                fig.add_trace(go.Scatter(x=x, y=values, mode="lines+markers", name=f"{split} {metric_name(key).lower()}",
                                         legendgroup=key, line={"color": colour(i), "dash": dash, "width": 2},
                                         marker={"size": 5}, hovertemplate=f"{split} {key} %{{y:.3f}}<extra></extra>"),
                              row=2, col=1)
    # Shade each phase; a change of phase is where fine-tuning starts (loss often jumps).
    phases: list[tuple[str, int, int]] = []
    for r in rows:
        phase = str(r.get("phase") or "")
        if phases and phases[-1][0] == phase:
            phases[-1] = (phase, phases[-1][1], int(r["epoch"]))
        else:
            phases.append((phase, int(r["epoch"]), int(r["epoch"])))
    for k, (phase, start, end) in enumerate(phases):
        if k % 2:
            fig.add_vrect(x0=start - 0.5, x1=end + 0.5, fillcolor="#000000", opacity=0.05, line_width=0, layer="below",
                          row="all", col=1)
        if phase:
            fig.add_annotation(x=start - 0.5, y=1.0, xref="x", yref="y domain", text=phase, showarrow=False,
                               xanchor="left", yanchor="top", font={"size": 11, "color": GREY})
    fig.update_xaxes(title="Epoch", row=2, col=1)
    fig.update_xaxes(range=[x[0] - 0.6, x[-1] + 0.6], dtick=max(1, math.ceil(len(x) / 15)))
    fig.update_yaxes(title="Loss", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title="Value", range=[0, 1.02], row=2, col=1)
    return fig


# --- a run's figure set ------------------------------------------------------------------

RUN_FIGURES = ("confusion", "roc", "pr", "calibration", "training")
"""The figures of one run, in the order the Evaluate page and the report show them."""


def run_figures(
    name: str,
    labels: Any,
    probabilities: Any,
    threshold: float,
    confusion: Mapping[str, int],
    epochs: Sequence[Mapping[str, Any]],
    unit: str = "images",
) -> dict[str, go.Figure]:
    """Every figure of one run: the Evaluate page's Metrics tab and the HTML report.

    Args:
        name: the run's display name (legend and operating-point labels).
        labels, probabilities: (n,) 0/1 and [0, 1] test predictions, one per ``unit``
            (images, or studies); the curves are drawn over them.
        threshold: the decision threshold (operating points, confusion title).
        confusion: ``{tp, fp, tn, fn}`` at ``threshold``, counted in ``unit``.
        epochs: the run's stored epoch rows (training curves).
        unit: ``"images"`` or ``"studies"``: what the curves and ``confusion`` count; every
            title but the training curves' says it (``per image`` / ``per study``).

    Returns:
        ``{key: figure}`` for each key of :data:`RUN_FIGURES`, in that order.
    """
    per = {"images": "per image", "studies": "per study"}[unit]
    n = sum(int(v) for v in confusion.values())
    return {
        "confusion": confusion_heatmap(confusion, threshold, unit=unit,
                                       title=f"Confusion matrix, {per} (n = {n} {unit}), threshold {threshold:.2f}"),
        "roc": roc_figure({name: evaluation.roc_points(labels, probabilities)}, {name: threshold}, title=f"ROC curve ({per})"),
        "pr": pr_figure({name: evaluation.pr_points(labels, probabilities)}, {name: threshold},
                        title=f"Precision–recall curve ({per})"),
        "calibration": calibration_figure({name: evaluation.calibration_points(labels, probabilities)},
                                          title=f"Calibration (reliability diagram, {per})", unit=unit),
        "training": training_curves(epochs),
    }


# --- forest plot ------------------------------------------------------------------------

def forest_plot(
    results: Mapping[str, Mapping[str, Any]],
    metrics: Sequence[str] = ("accuracy", "recall", "precision", "f1", "auc"),
    level: str = "image",
    reference: Mapping[str, Mapping[str, float]] | None = None,
    title: str | None = None,
) -> go.Figure:
    """The paper's Figure 6 with uncertainty: each metric a group, one row per run in it,
    the point estimate with its 95% CI whiskers.

    Args:
        results: ``{run label: evaluation.evaluate(...)}`` (an ``EvaluationResult`` or its
            ``as_json()`` dict), drawn in this order.
        metrics: metric keys, top to bottom.
        level: ``"image"`` (``result["image_level"]``; the top-level metrics of a result
            without it) or ``"study"`` (``result["study_level"]``); the title says which.
        reference: optional published values without CIs, ``{label: {metric: value}}``,
            e.g. ``{"Paper: DenseNet121": {"accuracy": 0.83, ...}}``; drawn as open diamonds.
        title: overrides the default title.
    """
    if level not in ("image", "study"):
        raise ValueError('level must be "image" or "study"')
    series: dict[str, dict[str, tuple[float | None, float | None, float | None]]] = {}
    for label, result in results.items():
        if hasattr(result, "as_json"):
            result = result.as_json()
        # The top-level metrics are of the result's own unit; each level has its block.
        block = result["study_level"] if level == "study" else result.get("image_level", result)
        values = block["metrics"]
        series[label] = {}
        for m in metrics:
            entry = values.get(m) or {}
            low, high = (entry.get("ci95") or [None, None])[:2]
            series[label][m] = (entry.get("value"), low, high)
    for label, values in (reference or {}).items():
        series[label] = {m: (values.get(m), None, None) for m in metrics}
    labels = list(series)
    per_group = len(labels) + 1  # one blank row between metric groups

    fig = go.Figure()
    for i, label in enumerate(labels):
        is_reference = label in (reference or {}) and label not in results
        xs, ys, plus, minus, hover = [], [], [], [], []
        for g, m in enumerate(metrics):
            value, low, high = series[label][m]
            ys.append(g * per_group + i)
            xs.append(value)
            plus.append(0.0 if value is None or high is None else high - value)
            minus.append(0.0 if value is None or low is None else value - low)
            ci = "" if low is None or high is None else f" (95% CI {_fmt(low)}–{_fmt(high)})"
            hover.append(f"<b>{label}</b><br>{metric_name(m)}: {_fmt(value)}{ci}")
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="markers", name=label, text=hover, hovertemplate="%{text}<extra></extra>",
            marker={"color": colour(i), "size": 10 if not is_reference else 11,
                    "symbol": "diamond-open" if is_reference else "circle", "line": {"width": 2 if is_reference else 0}},
            error_x={"type": "data", "symmetric": False, "array": plus, "arrayminus": minus,
                     "color": colour(i), "thickness": 2, "width": 5},
        ))
    # Alternate light bands behind the metric groups, and the metric name at each group's centre.
    for g in range(len(metrics)):
        if g % 2 == 0:
            fig.add_hrect(y0=g * per_group - 0.5, y1=g * per_group + len(labels) - 0.5, fillcolor="#000000",
                          opacity=0.04, line_width=0, layer="below")
    fig.update_yaxes(
        tickmode="array", tickvals=[g * per_group + (len(labels) - 1) / 2 for g in range(len(metrics))],
        ticktext=[metric_name(m) for m in metrics], autorange=False,
        range=[len(metrics) * per_group - 1.0, -1.0],  # reversed: first metric on top
        showgrid=False, zeroline=False,
    )
    fig.update_xaxes(title="Value (point estimate and 95% CI)", range=[0, 1.0], tick0=0, dtick=0.1, zeroline=False)
    level_text = "per study" if level == "study" else "per image"
    default = f"Test-set metrics, {level_text}, with 95% patient-bootstrap CIs"
    height = 140 + 26 * len(metrics) * per_group
    _layout(fig, title or default, width=760, height=max(360, height),
            legend={"orientation": "h", "x": 0.0, "y": -0.12, "xanchor": "left", "yanchor": "top"},
            margin={"l": 160, "r": 30, "t": 70, "b": 90})
    return fig


# --- calibration and decision curve (issue 11) ------------------------------------------

def reliability_before_after(reliability: Mapping[str, Mapping[str, Any]], title: str | None = None,
                             unit: str = "studies") -> go.Figure:
    """Reliability diagram over equal-mass bins, before (raw) and after calibration.

    Args:
        reliability: ``calibration.reliability(...)``: ``{"raw": ..., "calibrated": ...}``, each
            ``studystats.ece_equal_mass``'s ``{"ece", "mean_predicted", "observed", "count"}``.
        title: overrides the default title.
        unit: what the bins count, for the hover text.
    """
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="Perfectly calibrated",
                             line={"color": GREY, "dash": "dash", "width": 1}, hoverinfo="skip"))
    styles = {"raw": ("Before calibration (raw)", colour(1), "dot"), "calibrated": ("After calibration", colour(0), "solid")}
    for key, (name, line_colour, dash) in styles.items():
        points = reliability.get(key)
        if not points:
            continue
        predicted = np.asarray(points["mean_predicted"], dtype=float)
        observed = np.asarray(points["observed"], dtype=float)
        count = np.asarray(points["count"])
        hover = [f"{c} {unit}<br>mean predicted {p:.3f}<br>observed {o:.3f}"
                 for c, p, o in zip(count, predicted, observed, strict=True)]
        fig.add_trace(go.Scatter(
            x=predicted, y=observed, mode="lines+markers", name=f"{name}, ECE {_fmt(points.get('ece'), 3)}",
            line={"color": line_colour, "width": 2, "dash": dash}, marker={"size": 8}, text=hover,
            hovertemplate=f"<b>{name}</b><br>%{{text}}<extra></extra>",
        ))
    _layout(fig, title or f"Reliability, equal-mass bins ({unit})", width=560, height=560,
            legend={"x": 0.98, "y": 0.02, "xanchor": "right", "yanchor": "bottom", "bgcolor": "rgba(255,255,255,0.8)"})
    _unit_square(fig, "Mean predicted probability of metastasis", "Observed frequency")
    return fig


def decision_curve_figure(curve: Mapping[str, Any], title: str | None = None) -> go.Figure:
    """Decision curve (Vickers & Elkin 2006): net benefit of the model, treat-all and treat-none vs threshold probability.

    Args:
        curve: ``studystats.decision_curve``'s ``{"threshold", "net_benefit", "treat_all", "treat_none"}``.
        title: overrides the default title.
    """
    t = np.asarray(curve["threshold"], dtype=float)
    model, treat_all = np.asarray(curve["net_benefit"], dtype=float), np.asarray(curve["treat_all"], dtype=float)
    fig = go.Figure()
    for name, values, line in (("Model", model, {"color": colour(0), "width": 2.5}),
                               ("Treat all", treat_all, {"color": colour(1), "width": 1.5, "dash": "dot"}),
                               ("Treat none", np.asarray(curve["treat_none"], dtype=float), {"color": GREY, "width": 1.5})):
        fig.add_trace(go.Scatter(x=t, y=values, mode="lines", name=name, line=line,
                                 hovertemplate=f"<b>{name}</b><br>threshold %{{x:.2f}}<br>net benefit %{{y:.3f}}<extra></extra>"))
    finite = model[np.isfinite(model)]
    top = max(float(finite.max()) if finite.size else 0.0, float(treat_all[0]) if t.size else 0.0, 0.05)
    fig.update_xaxes(title="Threshold probability", range=[0, 1], tick0=0, dtick=0.1, zeroline=False)
    fig.update_yaxes(title="Net benefit", range=[-0.05 * top - 0.01, top * 1.1], zeroline=False)
    _layout(fig, title or "Decision curve (studies)", width=640, height=460,
            legend={"x": 0.98, "y": 0.98, "xanchor": "right", "yanchor": "top", "bgcolor": "rgba(255,255,255,0.8)"})
    return fig


SUBGROUP_NAMES = {"sex": "Sex", "age_band": "Age band", "primary_cancer": "Primary cancer", "cohort": "Cohort", "view": "View"}


def subgroup_forest(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str] = ("auc", "sensitivity", "specificity"),
                    title: str | None = None) -> go.Figure:
    """Forest plot of subgroup metrics: one row per group (``subgroups.run_subgroups`` rows), one
    column per metric, the point estimate with its 95% CI; groups marked ``small`` (fewer than
    10 positives or negatives) are drawn hollow and labelled "(small)"."""
    rows = list(rows)
    labels = [f"{SUBGROUP_NAMES.get(r['by'], r['by'])}: {r['group']} (n={r['n']}, {r['n_positive']}+)"
              + (" (small)" if r["small"] else "") for r in rows]
    fig = make_subplots(rows=1, cols=len(metrics), shared_yaxes=True, horizontal_spacing=0.03,
                        subplot_titles=[{"auc": "ROC AUC", "sensitivity": "Sensitivity", "specificity": "Specificity"}.get(m, m)
                                        for m in metrics])
    for c, metric in enumerate(metrics, start=1):
        for small in (False, True):
            picked = [i for i, r in enumerate(rows) if bool(r["small"]) == small]
            if not picked:
                continue
            xs, plus, minus, hover = [], [], [], []
            for i in picked:
                entry = rows[i]["metrics"].get(metric) or {}
                value, (low, high) = entry.get("value"), (entry.get("ci95") or [None, None])[:2]
                xs.append(value)
                plus.append(0.0 if value is None or high is None else high - value)
                minus.append(0.0 if value is None or low is None else value - low)
                hover.append(f"<b>{labels[i]}</b><br>{metric}: {_fmt(value)} (95% CI {_fmt(low)}–{_fmt(high)})")
            fig.add_trace(go.Scatter(
                x=xs, y=[labels[i] for i in picked], mode="markers", text=hover, hovertemplate="%{text}<extra></extra>",
                name="fewer than 10 positives or negatives" if small else "group", legendgroup=str(small), showlegend=c == 1,
                marker={"color": GREY if small else colour(0), "size": 9, "symbol": "circle-open" if small else "circle",
                        "line": {"width": 2}},
                error_x={"type": "data", "symmetric": False, "array": plus, "arrayminus": minus,
                         "color": GREY if small else colour(0), "thickness": 1.5, "width": 4},
            ), row=1, col=c)
        fig.update_xaxes(range=[0, 1.02], dtick=0.25, row=1, col=c)
    fig.update_yaxes(autorange="reversed", categoryorder="array", categoryarray=labels)
    _layout(fig, title or "Subgroups (test set, 95% patient-bootstrap CIs)", width=900,
            height=max(320, 120 + 28 * len(rows)), margin={"l": 290, "r": 30, "t": 80, "b": 70},
            legend={"orientation": "h", "x": 0.0, "y": -0.08, "xanchor": "left", "yanchor": "top"})
    return fig
# --- dataset shift ------------------------------------------------------------------------------

def shift_figures(shift: Mapping[str, Any]) -> dict[str, go.Figure]:
    """The dataset-shift panel: the run's test set (internal) beside an external cohort.

    Args:
        shift: ``external.dataset_shift(...)``: ``bins``, ``cohort``, and ``internal`` /
            ``external`` sides with ``histogram``, ``sizes``, ``prevalence``,
            ``mean_probability``.

    Returns:
        ``{"intensity": histograms of the scaled counts (log fraction of pixels), "sizes":
        images per size, "summary": label prevalence and mean predicted probability}``;
        internal in the first palette colour, external in the second.
    """
    edges = np.asarray(shift["bins"], dtype=float)
    centres = (edges[:-1] + edges[1:]) / 2
    sides = {"internal (test set)": shift["internal"], f"external ({shift['cohort']})": shift["external"]}

    intensity = go.Figure()
    for i, (name, side) in enumerate(sides.items()):
        intensity.add_trace(go.Scatter(
            x=centres, y=side["histogram"], mode="lines", name=name, line={"color": colour(i), "width": 2, "shape": "hvh"},
            hovertemplate=f"<b>{name}</b><br>scaled counts %{{x:.3f}}<br>%{{y:.4f}} of pixels<extra></extra>"))
    intensity.update_xaxes(title="Counts / image's display window (99.5th percentile), clipped at 1", range=[0, 1])
    intensity.update_yaxes(title="Fraction of pixels (log)", type="log")
    _layout(intensity, "Intensity histograms", legend={"x": 0.98, "y": 0.98, "xanchor": "right"})

    sizes = go.Figure()
    every = list(dict.fromkeys([*shift["internal"]["sizes"], *shift["external"]["sizes"]]))
    for i, (name, side) in enumerate(sides.items()):
        total = max(1, side["n_images"])
        sizes.add_trace(go.Bar(
            x=every, y=[side["sizes"].get(size, 0) / total for size in every], name=name, marker_color=colour(i),
            text=[str(side["sizes"].get(size, 0)) for size in every], textposition="outside",
            hovertemplate=f"<b>{name}</b><br>%{{x}}: %{{text}} images<extra></extra>"))
    sizes.update_xaxes(title="Stored image size (height x width)", type="category")
    sizes.update_yaxes(title="Share of images", range=[0, 1.15])
    _layout(sizes, "Image sizes", barmode="group")

    summary = go.Figure()
    quantities = {"prevalence": "Label prevalence (metastatic)", "mean_probability": "Mean predicted probability"}
    for i, (name, side) in enumerate(sides.items()):
        values = [side[key] for key in quantities]
        summary.add_trace(go.Bar(
            x=list(quantities.values()), y=[v if v is not None else 0 for v in values], name=name, marker_color=colour(i),
            text=[_fmt(v) for v in values], textposition="outside",
            hovertemplate=f"<b>{name}</b><br>%{{x}}: %{{text}}<extra></extra>"))
    summary.update_yaxes(title="Share / probability", range=[0, 1.1])
    _layout(summary, "Prevalence and mean predicted probability (studies)", barmode="group")
    return {"intensity": intensity, "sizes": sizes, "summary": summary}


# --- Grad-CAM overlays (RGB arrays) --------------------------------------------------------------

DEFAULT_OPACITY = 0.4


def _turbo_lut() -> np.ndarray:
    """(256, 3) uint8 "turbo"-like rainbow: dark blue → cyan → green → yellow → red.

    Polynomial fit of Google's Turbo colour map (A. Mikhailov, 2019), evaluated once;
    perceptually smoother than jet and readable for colour-blind viewers at its ends.
    """
    x = np.linspace(0.0, 1.0, 256)
    r = 0.13572138 + x * (4.61539260 + x * (-42.66032258 + x * (132.13108234 + x * (-152.94239396 + x * 59.28637943))))
    g = 0.09140261 + x * (2.19418839 + x * (4.84296658 + x * (-14.18503333 + x * (4.27729857 + x * 2.82956604))))
    b = 0.10667330 + x * (12.64194608 + x * (-60.58204836 + x * (110.36276771 + x * (-89.90310912 + x * 27.34824973))))
    return (np.clip(np.stack([r, g, b], axis=1), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


TURBO = _turbo_lut()


def colorize(heatmap: np.ndarray) -> np.ndarray:
    """(H, W) float heatmap in [0, 1] → (H, W, 3) uint8 RGB through :data:`TURBO`."""
    index = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float32)), 0.0, 1.0) * 255.0 + 0.5
    return TURBO[index.astype(np.intp)]


def overlay(
    pixels: np.ndarray,
    heatmap: np.ndarray,
    opacity: float = DEFAULT_OPACITY,
    upper: float | None = None,
    gamma: float = 1.0,
) -> np.ndarray:
    """The scan as a reader sees it, with the heatmap blended in where it is high.

    Args:
        pixels: (H, W) raw counts, any numeric dtype.
        heatmap: (H, W) float in [0, 1] on the same geometry (``explain.heatmap_for_image``), on the
            shared scale where maps are compared (``localisation.shared_scale``).
        opacity: colour weight where the heatmap is 1, in [0, 1]; 0 gives the plain display.
        upper: display window top in counts (``pixelstore.to_display``); default its 99.5th
            percentile.
        gamma: display gamma (``pixelstore.to_display``).

    Returns:
        (H, W, 3) uint8 RGB: the inverted grey NM display (hot = black), mixed per pixel with
        the turbo colour of the heatmap by alpha = opacity * heatmap, so regions the model
        ignored stay untouched and readable.
    """
    heat = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float32)), 0.0, 1.0)
    if heat.shape != pixels.shape:
        raise ValueError(
            f"heatmap shape {heat.shape} differs from the image's {pixels.shape}; map it onto the image first "
            "(explain.heatmap_for_image / preprocess.to_image_geometry)"
        )
    if not 0.0 <= opacity <= 1.0:
        raise errors.InputError(f"opacity must be in [0, 1], got {opacity}")
    grey = pixelstore.to_display(pixels, upper=upper, gamma=gamma).astype(np.float32)[..., None]
    alpha = (np.float32(opacity) * heat)[..., None]
    mixed = (1.0 - alpha) * grey + alpha * colorize(heat).astype(np.float32)
    return np.clip(mixed + 0.5, 0.0, 255.0).astype(np.uint8)
