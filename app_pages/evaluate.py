"""Evaluate: metrics with CIs at any threshold, curves, backbone comparison, the per-image
explorer with Grad-CAM, and exports."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from app_pages.common import allowed, cached_study_images, db_path, denial, open_db, reviewer
from bonescan_core import db as dbm
from bonescan_core import evaluation, pixelstore, plots, report, runs
from bonescan_core import review as rv
from bonescan_core.results import UNIT_LABELS, UNITS, EvaluationResult, decision_threshold

# The explorer table's columns (of evaluation.explorer_rows).
EXPLORER_COLUMNS = ["image_id", "study_id", "view", "subset", "label", "probability", "outcome", "loss", "verdicts", "criteria"]
UNIT_CHOICES = {"per study": "study", "per image (as in the paper)": "image"}
CARD_METRICS = ("accuracy", "recall", "precision", "f1", "specificity", "npv", "auc", "pr_auc", "brier")


@st.cache_data(max_entries=32, show_spinner=False)
def cached_evaluation(database: str, run_id: int, threshold: float | None, unit: str = "study") -> EvaluationResult:
    """The run evaluated at ``threshold`` (None: the run's own validation-chosen thresholds), per ``unit``."""
    with dbm.opened(database) as db:  # the database is part of the cache key, so read that one
        return evaluation.evaluate(db, run_id, threshold=threshold, unit=unit)


@st.cache_data(max_entries=16, show_spinner=False)
def cached_study_predictions(database: str, run_id: int, subset: str, aggregate: str) -> dict:
    with dbm.opened(database) as db:
        return runs.study_predictions(db, run_id, subset, aggregate=aggregate)


@st.cache_data(max_entries=16, show_spinner=False)
def cached_predictions(database: str, run_id: int, subset: str) -> dict:
    with dbm.opened(database) as db:
        return runs.predictions(db, run_id, subset)


def heatmap(run_id: int, image_id: int) -> np.ndarray:
    """The Grad-CAM map of one image: computed once (the model loads on first use; Keras is
    imported only then) and cached in the database."""
    from bonescan_core import explain

    with open_db() as db:
        return explain.explain_image(db, db_path(), run_id, image_id)


def label_of(run: runs.Run) -> str:
    return f"Run {run.id} · {evaluation.run_label(run.backbone, run.id)} · {run.settings.mode} · " \
           f"{run.settings.weights} · split {run.split_id}"


st.title("Evaluate")
with open_db() as db:
    done_runs = runs.list_runs(db, status="done")
if not done_runs:
    st.info("No finished runs yet: train one on the Train page.")
    st.stop()

by_id = {run.id: run for run in done_runs}
run_id = st.selectbox("Run", list(by_id), format_func=lambda i: label_of(by_id[i]), key="ev_run")
run = by_id[run_id]
database = str(db_path())
with open_db() as db:
    chosen_thresholds, _ = evaluation.run_thresholds(db, run)
# The validation-chosen operating points (0.5 for a run without one): the headline everywhere.
validation_threshold = {level: decision_threshold(None, chosen_thresholds[level])[0] for level in UNITS}
stored_threshold = validation_threshold["image"]

unit_choice = st.radio("Unit of analysis", list(UNIT_CHOICES), horizontal=True, key="ev_unit",
                       help="The study is the unit: one probability per study (its views aggregated). "
                            "The paper counted images; its figures are one click away.")
unit = UNIT_CHOICES[unit_choice]
per = UNIT_LABELS[unit]

metrics_tab, compare_tab, explorer_tab, export_tab = st.tabs(["Metrics", "Compare backbones", "Per-image explorer", "Export"])

with metrics_tab:
    headline = validation_threshold[unit]
    threshold = st.slider(f"Decision threshold, {per} (metastatic when probability >= threshold)", 0.0, 1.0,
                          round(headline, 3), 0.005, key=f"ev_threshold_{run_id}_{unit}",
                          help=f"The run's {per} threshold, chosen on validation, is {headline:.3f}.")
    status = evaluation.threshold_status(threshold, headline)
    # At the validation-chosen point each level keeps its own threshold; a moved slider is one threshold.
    result = cached_evaluation(database, run_id, None if status == evaluation.PRE_SPECIFIED else round(threshold, 4), unit)
    st.caption(f"Test subset: {result.n_images} images, {result.n_studies} studies, "
               f"{result.n_patients} patients. Metrics {per}. 95% CIs: bootstrap over patients.")
    if status == evaluation.PRE_SPECIFIED:
        st.caption(f"Operating point {result.threshold:.3f}: {status}, rule {result.threshold_rule or 'stored'}.")
    else:
        st.warning(f"Test metrics below are {status}: {threshold:.3f} instead of the validation-chosen {headline:.3f}.")
    for note in result.notes:
        st.caption(note)
    st.subheader(f"Test metrics {per}" + ("" if status == evaluation.PRE_SPECIFIED else f" — {status}"))
    for row_start in range(0, len(CARD_METRICS), 5):
        columns = st.columns(5)
        for column, name in zip(columns, CARD_METRICS[row_start:row_start + 5], strict=False):
            metric = result.metrics[name]
            interval = metric.interval_text(2)
            column.metric(f"{plots.metric_name(name)} ({per})", metric.value_text(),
                          help=f"95% CI {metric.interval_text()}" if interval else None)
            if interval:
                column.caption(interval)
    if unit == "study":
        test = cached_study_predictions(database, run_id, "test", run.settings.study_aggregate)
        known = np.isfinite(test["label"])
        curve_labels, curve_probabilities = test["label"][known].astype(np.int64), test["probability"][known]
    else:
        test = cached_predictions(database, run_id, "test")
        curve_labels, curve_probabilities = test["label"], test["probability"]
    with open_db() as db:
        epoch_rows = runs.epochs(db, run_id)
    figures = plots.run_figures(evaluation.run_label(run.backbone, run_id), curve_labels, curve_probabilities,
                                result.threshold, result.confusion, epoch_rows, unit="studies" if unit == "study" else "images")
    left, right = st.columns(2)
    left.plotly_chart(figures["confusion"], key="ev_confusion")
    right.plotly_chart(figures["roc"], key="ev_roc")
    left, right = st.columns(2)
    left.plotly_chart(figures["pr"], key="ev_pr")
    right.plotly_chart(figures["calibration"], key="ev_calibration")
    st.plotly_chart(figures["training"], key="ev_training")
    with st.expander("Configuration"):
        st.json(run.config_record())

with compare_tab:
    same_split = [r.id for r in done_runs if r.split_id == run.split_id]
    chosen = st.multiselect("Runs on the same split (the same test images)", same_split,
                            default=[i for i in same_split][:3], format_func=lambda i: label_of(by_id[i]), key="ev_compare")
    if len(chosen) < 2:
        st.info("Choose two or more runs to compare.")
    else:
        try:
            with open_db() as db:
                comparison = evaluation.compare_runs(db, chosen)
        except evaluation.IncomparableRunsError as error:
            st.error(str(error))
        else:
            results = {evaluation.run_label(by_id[i].backbone, i, with_id=True): cached_evaluation(database, i, None, unit)
                       for i in chosen}
            st.caption(f"Metrics {per}, each run at its own validation-chosen threshold.")
            st.plotly_chart(plots.forest_plot(results, level=unit), key="ev_forest")
            st.dataframe(pd.DataFrame([
                {"run": label, "unit": per,
                 **{plots.metric_name(m): value.metrics[m].value for m in ("accuracy", "recall", "precision", "f1", "auc")}}
                for label, value in results.items()]), hide_index=True)
            st.markdown("**Paired tests on the same test images, per image** (DeLong for AUC, McNemar for decisions):")
            for pair in comparison["pairs"]:
                st.markdown(f"- {pair['summary']}  \n  {pair['accuracy_summary']}")

with explorer_tab:
    # The explorer lists images: the image threshold (the slider's, when it shows the image level).
    threshold_now = threshold if unit == "image" and status != evaluation.PRE_SPECIFIED else stored_threshold
    with open_db() as db:
        rows = evaluation.explorer_rows(db, run_id, threshold_now)
    filters = st.columns(4)
    outcomes = filters[0].multiselect("Outcome", ["TP", "FP", "FN", "TN"], key="ex_outcome")
    subsets = filters[1].multiselect("Subset", ["val", "test"], key="ex_subset")
    views = filters[2].multiselect("View", sorted({row["view"] for row in rows if row["view"]}), key="ex_view")
    criterion = filters[3].selectbox("Reader criterion", ["any"] + list(rv.CRITERIA), key="ex_criterion")
    order = st.radio("Sort", list(evaluation.EXPLORER_ORDERS), horizontal=True, key="ex_sort")
    table = pd.DataFrame(evaluation.filter_explorer_rows(rows, outcomes, subsets, views, criterion, order),
                         columns=EXPLORER_COLUMNS)
    picked = st.dataframe(
        table,
        hide_index=True, on_select="rerun", selection_mode="single-row", key=f"ex_table_{run_id}",
        column_config={"probability": st.column_config.ProgressColumn("probability", min_value=0.0, max_value=1.0, format="%.3f"),
                       "loss": st.column_config.NumberColumn(format="%.3f")},
    )
    selected = picked.selection.rows if picked else []
    if table.empty:
        st.info("No predictions match these filters.")
    else:
        chosen_row = table.iloc[selected[0]] if selected else table.iloc[0]
        study_id, image_id = int(chosen_row["study_id"]), int(chosen_row["image_id"])
        st.subheader(f"Study {study_id} · image {image_id} ({chosen_row['view']}) · {chosen_row['outcome']}")
        st.markdown(f"Probability **{chosen_row['probability']:.3f}** · threshold {threshold_now:.3f} · "
                    f"reference label **{'metastatic' if chosen_row['label'] else 'no metastasis'}**")
        opacity = st.slider("Grad-CAM opacity", 0.0, 1.0, 0.45, 0.05, key="ex_opacity")
        images = cached_study_images(study_id)
        predicted = {row["image_id"] for row in rows if row["study_id"] == study_id}
        panels, captions = [], []
        try:
            with st.spinner("Computing Grad-CAM..."):
                for image in images:
                    if image["id"] in predicted:
                        panels.append(plots.overlay(image["pixels"], heatmap(run_id, image["id"]), opacity=opacity,
                                                      upper=image["display_max"]))
                    else:
                        grey = pixelstore.to_display(image["pixels"], upper=image["display_max"])
                        panels.append(np.repeat(grey[..., None], 3, axis=2))
                    captions.append(f"{(image['view'] or 'view ?').capitalize()} (image {image['id']})")
            st.image(pixelstore.side_by_side(panels, 700), caption=" | ".join(captions))
        except Exception as error:  # noqa: BLE001 - a missing model must not break the explorer
            st.error(f"Grad-CAM is not available for this run: {error}")
        with open_db() as db:
            trail = rv.history(db, study_id)
        if trail:
            st.dataframe(pd.DataFrame(trail)[["created_at", "reviewer", "decision", "label", "criteria", "artifacts", "note"]],
                         hide_index=True)
        # The reader reads blind: the flag carries no outcome or probability (review.blind_reason).
        note = st.text_input("Note for the reader (optional; the model's output is never passed on)", value="",
                             key=f"ex_reason_{image_id}")
        reason = rv.blind_reason(note) if note.strip() else rv.BLIND_FLAG_REASON
        may_flag = allowed("flag")  # with sign-in on, a reader, adjudicator or trainer role
        if not may_flag:
            st.caption(denial("flag"))
        if st.button("Flag for re-review", disabled=not may_flag, key=f"ex_flag_{image_id}") and may_flag:
            with open_db() as db:
                rv.add_flag(db, study_id, reason, reviewer() or "evaluate")
            st.success(f"Study {study_id} is in the Review queue's flagged list.")

with export_tab:
    st.caption(f"Downloads {per} (the unit chosen above); the report shows both units.")

    def metrics_json(database: str = database, run_id: int = run_id, unit: str = unit) -> str:
        return cached_evaluation(database, run_id, None, unit).to_json_text()

    def predictions_csv(database: str = database, run_id: int = run_id, unit: str = unit) -> str:
        with dbm.opened(database) as db:
            return report.predictions_csv(db, run_id, unit=unit)

    # Files are made on click (Streamlit calls these then), not on every rerun of the page.
    columns = st.columns(4)
    columns[0].download_button("metrics.json", metrics_json, f"run-{run_id}-metrics.json", "application/json", key="dl_metrics")
    columns[1].download_button(f"predictions.csv ({per})", predictions_csv, f"run-{run_id}-predictions-{unit}.csv", "text/csv",
                               key="dl_predictions")
    if columns[2].button("Build report.html", key="build_report"):
        with open_db() as db:
            st.session_state[f"report_{run_id}_{unit}"] = report.report_html(db, run_id, unit=unit)
    if f"report_{run_id}_{unit}" in st.session_state:
        columns[2].download_button("Download report.html", st.session_state[f"report_{run_id}_{unit}"], f"run-{run_id}-report.html",
                                   "text/html", key="dl_report")
    if columns[3].button("Build model bundle", key="build_bundle"):
        try:
            with open_db() as db:
                st.session_state[f"bundle_{run_id}"] = report.bundle_zip(db, db_path(), run_id)
        except Exception as error:  # noqa: BLE001 - shown to the user with its advice
            st.error(str(error))
    if f"bundle_{run_id}" in st.session_state:
        columns[3].download_button("Download bundle (.zip)", st.session_state[f"bundle_{run_id}"], f"run-{run_id}.zip",
                                   "application/zip", key="dl_bundle")
