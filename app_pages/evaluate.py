"""Evaluate: metrics with CIs at any threshold, curves, backbone comparison, the per-image
explorer with Grad-CAM, and exports."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from app_pages.common import allowed, cached_study_images, db_path, denial, open_db, reviewer
from bonescan_core import db as dbm
from bonescan_core import evaluation, localisation, pixelstore, plots, report, runs
from bonescan_core import review as rv
from bonescan_core.results import EvaluationResult, decision_threshold

# The explorer table's columns (of evaluation.explorer_rows).
EXPLORER_COLUMNS = ["image_id", "study_id", "view", "subset", "label", "probability", "outcome", "loss", "verdicts", "criteria"]
CARD_METRICS = ("accuracy", "recall", "precision", "f1", "specificity", "npv", "auc", "pr_auc", "brier")


@st.cache_data(max_entries=32, show_spinner=False)
def cached_evaluation(database: str, run_id: int, threshold: float | None) -> EvaluationResult:
    """The run evaluated at ``threshold`` (None: the run's own, see results.decision_threshold)."""
    with dbm.opened(database) as db:  # the database is part of the cache key, so read that one
        return evaluation.evaluate(db, run_id, threshold=threshold)


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
stored_threshold, _ = decision_threshold(None, run.threshold)

metrics_tab, compare_tab, explorer_tab, export_tab = st.tabs(["Metrics", "Compare backbones", "Per-image explorer", "Export"])

with metrics_tab:
    threshold = st.slider("Decision threshold (metastatic when probability >= threshold)", 0.0, 1.0,
                          round(stored_threshold, 3), 0.005, key=f"ev_threshold_{run_id}",
                          help=f"The run's threshold, chosen on validation, is {stored_threshold:.3f}.")
    result = cached_evaluation(database, run_id, round(threshold, 4))
    st.caption(f"Test subset: {result.n_images} images, {result.n_studies} studies, "
               f"{result.n_patients} patients. 95% CIs: bootstrap over patients.")
    for row_start in range(0, len(CARD_METRICS), 5):
        columns = st.columns(5)
        for column, name in zip(columns, CARD_METRICS[row_start:row_start + 5], strict=False):
            metric = result.metrics[name]
            interval = metric.interval_text(2)
            column.metric(plots.metric_name(name), metric.value_text(),
                          help=f"95% CI {metric.interval_text()}" if interval else None)
            if interval:
                column.caption(interval)
    if result.localisation is not None:
        hit_rate = result.localisation["hit_rate"]
        st.metric("Grad-CAM pointing game", "n/a" if hit_rate is None else f"{hit_rate:.3f}",
                  help="Share of true-positive studies with lesion points whose map peak lies on a lesion.")
        st.caption(result.localisation_text())
    level = st.radio("Level", ["image", "study (max over views)"], horizontal=True, key="ev_level")
    shown = result.level("image" if level == "image" else "study")
    test = cached_predictions(database, run_id, "test")
    with open_db() as db:
        epoch_rows = runs.epochs(db, run_id)
    figures = plots.run_figures(evaluation.run_label(run.backbone, run_id), test["label"], test["probability"],
                                threshold, shown.confusion, epoch_rows, unit="images" if level == "image" else "studies")
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
            results = {evaluation.run_label(by_id[i].backbone, i, with_id=True): cached_evaluation(database, i, None)
                       for i in chosen}
            st.plotly_chart(plots.forest_plot(results), key="ev_forest")
            st.dataframe(pd.DataFrame([
                {"run": label, **{plots.metric_name(m): value.metrics[m].value for m in ("accuracy", "recall", "precision", "f1", "auc")}}
                for label, value in results.items()]), hide_index=True)
            st.markdown("**Paired tests on the same test images** (DeLong for AUC, McNemar for decisions):")
            for pair in comparison["pairs"]:
                st.markdown(f"- {pair['summary']}  \n  {pair['accuracy_summary']}")

with explorer_tab:
    threshold_now = st.session_state.get(f"ev_threshold_{run_id}", stored_threshold)
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
        predicted = {row["image_id"]: row["probability"] for row in rows if row["study_id"] == study_id}
        panels, captions = [], []
        try:
            with st.spinner("Computing Grad-CAM..."):
                for image in images:
                    if image["id"] in predicted:
                        shared = localisation.shared_scale(heatmap(run_id, image["id"]), predicted[image["id"]])
                        panels.append(plots.overlay(image["pixels"], shared, opacity=opacity, upper=image["display_max"]))
                    else:
                        grey = pixelstore.to_display(image["pixels"], upper=image["display_max"])
                        panels.append(np.repeat(grey[..., None], 3, axis=2))
                    captions.append(f"{(image['view'] or 'view ?').capitalize()} (image {image['id']})")
            st.image(pixelstore.side_by_side(panels, 700), caption=" | ".join(captions))
            st.caption("Maps on one scale for every image: evidence relative to the image's strongest, times the "
                       "probability, so a confident negative stays cold.")
        except Exception as error:  # noqa: BLE001 - a missing model must not break the explorer
            st.error(f"Grad-CAM is not available for this run: {error}")
        with open_db() as db:
            trail = rv.history(db, study_id)
        if trail:
            st.dataframe(pd.DataFrame(trail)[["created_at", "reviewer", "decision", "label", "criteria", "artifacts", "note"]],
                         hide_index=True)
        reason = st.text_input("Reason for re-review", value=f"run {run_id}: {chosen_row['outcome']}, p={chosen_row['probability']:.2f}",
                               key=f"ex_reason_{image_id}")
        may_flag = allowed("flag")  # with sign-in on, a reader, adjudicator or trainer role
        if not may_flag:
            st.caption(denial("flag"))
        if st.button("Flag for re-review", disabled=not may_flag, key=f"ex_flag_{image_id}") and may_flag:
            with open_db() as db:
                rv.add_flag(db, study_id, reason, reviewer() or "evaluate")
            st.success(f"Study {study_id} is in the Review queue's flagged list.")

with export_tab:
    def metrics_json(database: str = database, run_id: int = run_id) -> str:
        return cached_evaluation(database, run_id, None).to_json_text()

    def predictions_csv(database: str = database, run_id: int = run_id) -> str:
        with dbm.opened(database) as db:
            return report.predictions_csv(db, run_id)

    # Files are made on click (Streamlit calls these then), not on every rerun of the page.
    columns = st.columns(4)
    columns[0].download_button("metrics.json", metrics_json, f"run-{run_id}-metrics.json", "application/json", key="dl_metrics")
    columns[1].download_button("predictions.csv", predictions_csv, f"run-{run_id}-predictions.csv", "text/csv", key="dl_predictions")
    if columns[2].button("Build report.html", key="build_report"):
        with open_db() as db:
            st.session_state[f"report_{run_id}"] = report.report_html(db, run_id)
    if f"report_{run_id}" in st.session_state:
        columns[2].download_button("Download report.html", st.session_state[f"report_{run_id}"], f"run-{run_id}-report.html",
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
