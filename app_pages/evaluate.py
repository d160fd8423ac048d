"""Evaluate: metrics with CIs at any threshold, curves, backbone comparison, the per-image
explorer with Grad-CAM, external validation (predict another cohort, its metrics at the run's
validation thresholds, the dataset-shift panel), and exports."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from app_pages.common import allowed, cached_study_images, data_version, db_path, denial, open_db, reviewer, still_signed_in
from bonescan_core import (
    assessment,
    assist,
    calibration,
    comparison,
    errors,
    evaluation,
    external,
    jobs,
    pixelstore,
    plots,
    prediction,
    readers,
    report,
    runs,
)
from bonescan_core import db as dbm
from bonescan_core import review as rv
from bonescan_core.cohorts import list_cohorts
from bonescan_core.results import UNIT_LABELS, UNITS, EvaluationResult, Progress, decision_threshold

# The explorer table's columns (of evaluation.explorer_rows).
EXPLORER_COLUMNS = ["image_id", "study_id", "view", "subset", "label", "probability", "outcome", "loss", "verdicts", "criteria"]
UNIT_CHOICES = {"per study": "study", "per image (as in the paper)": "image"}
CARD_METRICS = ("accuracy", "recall", "precision", "f1", "specificity", "npv", "auc", "pr_auc", "brier")
LIVE_EVERY_S = 2  # prediction jobs' progress


@st.cache_data(max_entries=32, show_spinner=False)
def cached_evaluation(database: str, run_id: int, threshold: float | None, unit: str = "study",
                      version: int = 0) -> EvaluationResult:
    """The run evaluated at ``threshold`` (None: the run's own validation-chosen thresholds), per
    ``unit``, as of data ``version``. At the run's own thresholds it is stored in the database
    (assessment.stored_evaluation): bootstrapped once per run and inputs, not once per process."""
    with dbm.opened(database) as db:  # the database is part of the cache key, so read that one
        if threshold is None:
            return assessment.stored_evaluation(db, run_id, unit=unit)
        return assessment.evaluate(db, run_id, threshold=threshold, unit=unit)


@st.cache_data(max_entries=16, show_spinner=False)
def cached_study_predictions(database: str, run_id: int, subset: str, aggregate: str) -> dict:
    with dbm.opened(database) as db:
        return runs.study_predictions(db, run_id, subset, aggregate=aggregate)


@st.cache_data(max_entries=16, show_spinner=False)
def cached_predictions(database: str, run_id: int, subset: str) -> dict:
    with dbm.opened(database) as db:
        return runs.predictions(db, run_id, subset)


@st.cache_data(max_entries=16, show_spinner=False)
def cached_comparison(database: str, run_ids: tuple[int, ...]) -> dict:
    """comparison.compare_runs of these runs (2,000 resamples, seed 0); finished runs do not change."""
    with dbm.opened(database) as db:
        return comparison.compare_runs(db, list(run_ids))


@st.cache_data(max_entries=16, show_spinner=False)
def cached_repeats(database: str, group: int, finished: int) -> dict:
    """comparison.repeat_summary of a repeat group (``finished``, its count of done runs, keys the cache)."""
    with dbm.opened(database) as db:
        return comparison.repeat_summary(db, group)


def show_repeats(summary: dict, where: str) -> None:
    """A repeat group's every repeat and its mean ± SD (study level, each at its study threshold)."""
    st.markdown(f"**Repeats of {evaluation.run_label(summary['backbone'], summary['group'])} "
                f"(group {summary['group']}, {summary['n']} finished runs)**: per study, each repeat at its own "
                "study threshold; the spread between seeds is the noise floor of any comparison.")
    st.dataframe(pd.DataFrame(comparison.repeat_table(summary)), hide_index=True, key=f"ev_repeats_{where}_{summary['group']}")


@st.cache_resource(max_entries=16, show_spinner=False)
def cached_calibration_figures(database: str, run_id: int) -> tuple | None:
    """Reliability (raw vs calibrated) and decision-curve figures of the run's test studies (read-only)."""
    with dbm.opened(database) as db:
        curves = calibration.run_curves(db, run_id, "test")
    if curves is None:
        return None
    return plots.reliability_before_after(curves["reliability"]), plots.decision_curve_figure(curves["decision"])


def external_stamp(database: str, run_id: int) -> tuple[int, int]:
    """Changes when a prediction of the run lands: the cached external results below are keyed on it."""
    with dbm.opened(database) as db:
        return prediction.external_stamp(db, run_id)


@st.cache_data(max_entries=16, show_spinner=False)
def cached_external(database: str, run_id: int, cohort: str, stamp: tuple[int, int]) -> EvaluationResult:
    """The run on a cohort's external predictions, at its validation thresholds (``stamp``: see external_stamp)."""
    with dbm.opened(database) as db:
        return assessment.evaluate(db, run_id, cohort=cohort)


@st.cache_data(max_entries=16, show_spinner=False)
def cached_cohort_predictions(database: str, run_id: int, cohort: str, stamp: tuple[int, int]) -> dict:
    with dbm.opened(database) as db:
        return external.cohort_predictions(db, run_id, cohort)


@st.cache_data(max_entries=8, show_spinner="Reading both sets' images...")
def cached_shift(database: str, run_id: int, cohort: str, stamp: tuple[int, int]) -> dict:
    with dbm.opened(database) as db:
        return external.dataset_shift(db, run_id, cohort)


@st.cache_data(max_entries=16, show_spinner=False)
def cached_thresholds(database: str, run_id: int) -> dict:
    """evaluation.run_thresholds of a finished run (its stored results do not change)."""
    with dbm.opened(database) as db:
        return evaluation.run_thresholds(db, runs.get(db, run_id))[0]


@st.cache_data(max_entries=16, show_spinner="Comparing readers with the model...")
def cached_readers(database: str, run_id: int, cohort: str | None, version: int) -> readers.ReaderComparison:
    """readers.compare on the run's test studies (cohort None) or an external cohort; ``version``: the readers' reviews."""
    with dbm.opened(database) as db:
        return readers.compare(db, run_id, "test" if cohort is None else "external", cohort)


def show_readers(database: str, run_id: int, run_name: str) -> None:
    """The Metrics tab's "Readers vs model": each reader on the model's ROC curve, the per-reader table."""
    st.subheader("Readers vs model")
    with open_db() as db:
        predicted = [c for c in list_cohorts(db) if prediction.external_studies(db, run_id, c)]
    scope = st.selectbox("Studies", [None, *predicted], key=f"rd_scope_{run_id}",
                         format_func=lambda c: "the run's test studies" if c is None else f"cohort {c} (external)")
    st.caption("Only studies with out-of-sample predictions count (the run's test studies, or an external cohort it "
               "predicted). Each reader is scored against the reference without their own reads (leave-one-reader-out); "
               "the model at its study threshold chosen on validation. 95% CIs: bootstrap over patients.")
    try:
        comparison = cached_readers(database, run_id, scope, data_version())
    except errors.BonescanError as error:
        st.info(str(error))
        return
    if not any(r.n_scored for r in comparison.readers):
        st.info(readers.summary_text(comparison))
    else:
        st.plotly_chart(plots.readers_roc_figure(run_name, comparison.roc, comparison.threshold,
                                                 [r.as_json() for r in comparison.readers]), key="ev_readers_roc")
    if comparison.readers:
        st.dataframe(pd.DataFrame(comparison.table_rows()), hide_index=True, key="ev_readers_table")


# cache_resource: figures and 25,000 explorer rows are not copied on each rerun (read-only).
@st.cache_resource(max_entries=8, show_spinner=False)
def cached_figures(database: str, run_id: int, unit: str, threshold: float, _labels: np.ndarray,
                   _probabilities: np.ndarray, _confusion: dict) -> dict:
    """plots.run_figures of a finished run at one unit and threshold (the arrays follow from the key)."""
    with dbm.opened(database) as db:
        run, epoch_rows = runs.get(db, run_id), runs.epochs(db, run_id)
    return plots.run_figures(evaluation.run_label(run.backbone, run_id), _labels, _probabilities, threshold, _confusion,
                             epoch_rows, unit="studies" if unit == "study" else "images")


@st.cache_resource(max_entries=8, show_spinner=False)
def cached_subgroup_forest(database: str, run_id: int, threshold: float | None, unit: str, version: int,
                           _rows: list) -> object:
    """plots.subgroup_forest of the evaluation shown (its rows follow from the key), read-only."""
    return plots.subgroup_forest(_rows)


@st.cache_resource(max_entries=8, show_spinner=False)
def cached_explorer_rows(database: str, run_id: int, threshold: float, version: int) -> list[dict]:
    """evaluation.explorer_rows, recomputed when the threshold or the readers' reviews (data version) change."""
    with dbm.opened(database) as db:
        return evaluation.explorer_rows(db, run_id, threshold)


@st.cache_resource(max_entries=8, show_spinner=False)
def cached_explorer_table(database: str, run_id: int, threshold: float, version: int, outcomes: tuple, subsets: tuple,
                          views: tuple, criterion: str, order: str) -> pd.DataFrame:
    """The explorer's table for these filters (evaluation.filter_explorer_rows), read-only."""
    rows = cached_explorer_rows(database, run_id, threshold, version)
    return pd.DataFrame(evaluation.filter_explorer_rows(rows, outcomes, subsets, views, criterion, order),
                        columns=EXPLORER_COLUMNS)


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
chosen_thresholds = cached_thresholds(database, run_id)
# The validation-chosen operating points (0.5 for a run without one): the headline everywhere.
validation_threshold = {level: decision_threshold(None, chosen_thresholds[level])[0] for level in UNITS}
stored_threshold = validation_threshold["image"]

unit_choice = st.radio("Unit of analysis", list(UNIT_CHOICES), horizontal=True, key="ev_unit",
                       help="The study is the unit: one probability per study (its views aggregated). "
                            "The paper counted images; its figures are one click away.")
unit = UNIT_CHOICES[unit_choice]
per = UNIT_LABELS[unit]

metrics_tab, compare_tab, explorer_tab, external_tab, export_tab = st.tabs(
    ["Metrics", "Compare backbones", "Per-image explorer", "External cohort", "Export"])

with metrics_tab:
    headline = validation_threshold[unit]
    threshold = st.slider(f"Decision threshold, {per} (metastatic when probability >= threshold)", 0.0, 1.0,
                          round(headline, 3), 0.005, key=f"ev_threshold_{run_id}_{unit}",
                          help=f"The run's {per} threshold, chosen on validation, is {headline:.3f}.")
    status = evaluation.threshold_status(threshold, headline)
    # At the validation-chosen point each level keeps its own threshold; a moved slider is one threshold.
    threshold_argument = None if status == evaluation.PRE_SPECIFIED else round(threshold, 4)
    result = cached_evaluation(database, run_id, threshold_argument, unit, data_version())
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
    if result.localisation is not None:
        hit_rate = result.localisation["hit_rate"]
        st.metric("Grad-CAM pointing game", "n/a" if hit_rate is None else f"{hit_rate:.3f}",
                  help="Share of true-positive studies with lesion points whose map peak lies on a lesion.")
        st.caption(result.localisation_text())
    if unit == "study":
        test = cached_study_predictions(database, run_id, "test", run.settings.study_aggregate)
        known = np.isfinite(test["label"])
        curve_labels, curve_probabilities = test["label"][known].astype(np.int64), test["probability"][known]
    else:
        test = cached_predictions(database, run_id, "test")
        curve_labels, curve_probabilities = test["label"], test["probability"]
    figures = cached_figures(database, run_id, unit, result.threshold, curve_labels, curve_probabilities, result.confusion)
    left, right = st.columns(2)
    left.plotly_chart(figures["confusion"], key="ev_confusion")
    right.plotly_chart(figures["roc"], key="ev_roc")
    left, right = st.columns(2)
    left.plotly_chart(figures["pr"], key="ev_pr")
    right.plotly_chart(figures["calibration"], key="ev_calibration")
    st.plotly_chart(figures["training"], key="ev_training")
    if run.repeat_group is not None:
        with open_db() as db:
            group_runs = runs.repeat_group_runs(db, run.repeat_group)
        finished = sum(r.status == "done" for r in group_runs)
        if finished >= 2:
            show_repeats(cached_repeats(database, run.repeat_group, finished), "metrics")
    st.subheader("Calibration (test studies)")
    curve_figures = cached_calibration_figures(database, run_id)
    if result.calibration is None or curve_figures is None:
        st.info("No labelled test studies to assess calibration on.")
    else:
        st.caption(calibration.summary_text(result.calibration))
        left, right = st.columns(2)
        left.plotly_chart(curve_figures[0], key="ev_reliability")
        right.plotly_chart(curve_figures[1], key="ev_decision")
    st.subheader("Subgroups (test set)")
    if result.subgroups:
        st.caption("AUC, sensitivity and specificity at the run's threshold; hollow grey: fewer than 10 positive "
                   "or negative units, too small to read. Sex, age band, primary cancer, cohort: studies; view: images.")
        st.plotly_chart(cached_subgroup_forest(database, run_id, threshold_argument, unit, data_version(), result.subgroups),
                        key="ev_subgroups")
    else:
        st.info("No subgroup has a second group to compare with (sex, age band, primary cancer, cohort and view unknown or uniform).")
    show_readers(database, run_id, evaluation.run_label(run.backbone, run_id))
    with st.expander("Configuration"):
        st.json(run.config_record())

with compare_tab:
    same_split = [r.id for r in done_runs if r.split_id == run.split_id]
    chosen = st.multiselect("Runs on the same split (the same test studies)", same_split,
                            default=[i for i in same_split][:3], format_func=lambda i: label_of(by_id[i]), key="ev_compare")
    if len(chosen) < 2:
        st.info("Choose two or more runs to compare.")
    else:
        try:
            comparison_result = cached_comparison(database, tuple(chosen))
        except (comparison.IncomparableRunsError, evaluation.NoPredictionsError) as error:
            st.error(str(error))
        else:
            results = {evaluation.run_label(by_id[i].backbone, i, with_id=True): cached_evaluation(database, i, None, unit, data_version())
                       for i in chosen}
            st.caption(f"Metrics {per}, each run at its own validation-chosen threshold.")
            st.plotly_chart(plots.forest_plot(results, level=unit), key="ev_forest")
            st.markdown(f"**Per study, paired by patient**: {comparison_result['n_studies']} test studies of "
                        f"{comparison_result['n_patients']} patients, each run at its own study threshold chosen on "
                        "validation.")
            st.dataframe(pd.DataFrame([
                {"run": row["label"], "study threshold": row["threshold"], "threshold from": row["threshold_source"],
                 **{plots.metric_name(key): row[name] for name, key in comparison.HEADLINE}}
                for row in comparison_result["runs"]]), hide_index=True, key="ev_compare_runs",
                column_config={name: st.column_config.NumberColumn(format="%.3f")
                               for name in ["study threshold", *(plots.metric_name(key) for _, key in comparison.HEADLINE)]})
            pair_rows = comparison.pair_table(comparison_result)
            st.dataframe(pd.DataFrame(pair_rows), hide_index=True, key="ev_compare_pairs",
                         height=35 * (len(pair_rows) + 1) + 3)  # every row in view: the Holm family is the whole table
            st.caption(f"Differences are the first run minus the second. ΔAUC: clustered DeLong (Obuchowski), patients as "
                       f"clusters; Δsensitivity and Δspecificity: paired patient bootstrap "
                       f"({comparison_result['bootstrap']['n_resamples']} resamples, the same for both runs); McNemar on "
                       "studies. Holm p: adjusted over every p in this table.")
            for summary in comparison_result.get("repeats", []):
                show_repeats(summary, "compare")

with explorer_tab:
    # The explorer lists images: the image threshold (the slider's, when it shows the image level).
    threshold_now = threshold if unit == "image" and status != evaluation.PRE_SPECIFIED else stored_threshold
    rows = cached_explorer_rows(database, run_id, threshold_now, data_version())
    filters = st.columns(4)
    outcomes = filters[0].multiselect("Outcome", ["TP", "FP", "FN", "TN"], key="ex_outcome")
    subsets = filters[1].multiselect("Subset", ["val", "test"], key="ex_subset")
    views = filters[2].multiselect("View", sorted({row["view"] for row in rows if row["view"]}), key="ex_view")
    criterion = filters[3].selectbox("Reader criterion", ["any"] + list(rv.CRITERIA), key="ex_criterion")
    order = st.radio("Sort", list(evaluation.EXPLORER_ORDERS), horizontal=True, key="ex_sort")
    table = cached_explorer_table(database, run_id, threshold_now, data_version(), tuple(outcomes), tuple(subsets),
                                  tuple(views), criterion, order)
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
        try:
            with st.spinner("Computing Grad-CAM..."), open_db() as db:
                overlays = assist.study_overlays(db, db_path(), run_id, study_id, cached_study_images(study_id),
                                                 opacity=opacity)
            st.image(pixelstore.side_by_side([overlay.rgb for overlay in overlays], 700),
                     caption=" | ".join(overlay.name for overlay in overlays))
            st.caption("Maps on one scale for every image: evidence relative to the image's strongest, times the "
                       "probability, so a confident negative stays cold.")
            if note := assist.empty_map_note(overlays):
                st.caption(note)
        except errors.BonescanError as error:  # e.g. the run's model file is gone and a map was not stored
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

def start_prediction(run_id: int, cohort: str | None) -> None:
    """Queue a prediction job of the run (a cohort, or the unread studies with None) and start a worker."""
    if not allowed("train"):
        return
    try:
        with open_db() as db:
            job_id = prediction.enqueue(db, run_id, cohort=cohort, unread=cohort is None)
    except errors.BonescanError as error:
        st.session_state["pr_message"] = ("error", str(error))
        return
    started = jobs.ensure_worker(db_path())
    st.session_state["pr_message"] = ("success", f"Prediction job {job_id} queued" + ("; started a background worker." if started else "."))


def cancel_prediction(job_id: int) -> None:
    if allowed("train"):
        with open_db() as db:
            prediction.request_cancel(db, job_id)


@st.fragment(run_every=LIVE_EVERY_S)
def live_predictions(run_id: int) -> None:
    """The run's prediction jobs, newest first: status, progress, cancel. Polls the database."""
    if not still_signed_in():  # a fragment rerun skips the router's gate
        st.rerun(scope="app")
    with open_db() as db:
        shown = prediction.list_jobs(db, run_id)[:5]
    for job in shown:
        line = f"Prediction job {job.id} · {job.selection} · {len(job.study_ids)} studies · {job.status}"
        if job.status == "running":
            progress = Progress.from_record(job.progress)
            st.progress(progress.fraction(), text=f"{line} · {progress.format()}")
        else:
            st.caption(line + (f": {job.error}" if job.error else ""))
        if job.status in ("queued", "running") and allowed("train"):
            st.button("Cancel", key=f"pr_cancel_{job.id}", on_click=cancel_prediction, args=(job.id,))


with external_tab:
    with open_db() as db:
        cohort_list = list_cohorts(db)
    st.markdown("The run's locked model (its calibration and validation thresholds) over studies outside its split: "
                "another cohort, or the scans nobody has read yet. Predictions are stored as subset `external`, "
                "with their Grad-CAM maps; predicting again replaces them.")
    columns = st.columns([2, 1])
    target = columns[0].selectbox("Predict", ["unread", *cohort_list], key="pr_target",
                                  format_func=lambda c: "the unread studies" if c == "unread" else f"cohort {c}")
    may_predict = allowed("train")  # it runs in the training worker
    columns[1].button("Predict", key="pr_start", disabled=not may_predict, on_click=start_prediction,
                      args=(run_id, None if target == "unread" else target))
    if not may_predict:
        st.caption(denial("train"))
    if "pr_message" in st.session_state:
        kind, text = st.session_state.pop("pr_message")
        (st.error if kind == "error" else st.success)(text)
    live_predictions(run_id)

    cohort = st.selectbox("Validate on cohort", cohort_list, index=None, key="ev_cohort",
                          placeholder="choose a cohort with external predictions")
    if cohort is not None:
        stamp = external_stamp(database, run_id)
        try:
            ext = cached_external(database, run_id, cohort, stamp)
        except evaluation.NoPredictionsError as error:
            st.info(str(error))
        else:
            study_threshold, image_threshold = ext.level_threshold("study"), ext.level_threshold("image")
            st.caption(f"Cohort {cohort} (external): {ext.n_images} images, {ext.n_studies} studies, {ext.n_patients} "
                       f"patients; {ext.n_unlabelled} unlabelled studies left out. Thresholds chosen on the run's "
                       f"validation set: image {image_threshold:.3f}, study {study_threshold:.3f}. "
                       "95% CIs: bootstrap over patients.")
            ext_level = st.radio("Level", ["study", "image"], horizontal=True, key="ex_level")
            shown_ext = ext.level(ext_level)
            for row_start in range(0, len(CARD_METRICS), 5):
                cells = st.columns(5)
                for cell, name in zip(cells, CARD_METRICS[row_start:row_start + 5], strict=False):
                    metric = shown_ext.metrics[name]
                    cell.metric(plots.metric_name(name), metric.value_text(),
                                help=f"95% CI {metric.interval_text()}" if metric.interval_text() else None)
            rows = cached_cohort_predictions(database, run_id, cohort, stamp)[ext_level]
            used = study_threshold if ext_level == "study" else image_threshold
            name = evaluation.run_label(run.backbone, run_id)
            left, right = st.columns(2)
            left.plotly_chart(plots.confusion_heatmap(shown_ext.confusion, used, unit="studies" if ext_level == "study" else "images"),
                              key="ex_confusion")
            right.plotly_chart(plots.roc_figure({name: evaluation.roc_points(rows["label"], rows["probability"])},
                                                {name: used}), key="ex_roc")
            if ext.calibration is not None:
                st.markdown(f"**Calibration on cohort {cohort}** (studies, the run's stored calibration): "
                            + calibration.summary_text(ext.calibration, f"Cohort {cohort} studies"))
            if ext.localisation_text() is not None:
                st.markdown(f"**Grad-CAM pointing game on cohort {cohort}:** {ext.localisation_text()}")
            if ext.subgroups:
                st.plotly_chart(plots.subgroup_forest(ext.subgroups, title=f"Subgroups, cohort {cohort} (external)"),
                                key="ex_subgroups")
        st.subheader(f"Dataset shift: the run's test set vs cohort {cohort}")
        try:
            shift = cached_shift(database, run_id, cohort, stamp)
        except errors.BonescanError as error:
            st.info(str(error))
        else:
            shift_plots = plots.shift_figures(shift)
            st.plotly_chart(shift_plots["intensity"], key="ex_shift_intensity")
            left, right = st.columns(2)
            left.plotly_chart(shift_plots["sizes"], key="ex_shift_sizes")
            right.plotly_chart(shift_plots["summary"], key="ex_shift_summary")

with export_tab:
    st.caption(f"Downloads {per} (the unit chosen above); the report shows both units.")

    def metrics_json(database: str = database, run_id: int = run_id, unit: str = unit) -> str:
        return cached_evaluation(database, run_id, None, unit, data_version()).to_json_text()

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
