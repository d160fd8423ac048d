"""Train: choose backbones and settings, enqueue, and watch the runs live.

The page only enqueues: a background worker (started here when none is alive) trains one
run at a time and writes progress to the database, which the live panel polls.
"""

from __future__ import annotations

import streamlit as st

from app_pages.common import allowed, cached, db_path, denial, md, open_db, still_signed_in
from bonescan_core import availability, catalog, errors, jobs, plots, runs, splits, training
from bonescan_core import db as dbm
from bonescan_core.cohorts import list_cohorts
from bonescan_core.models import BACKBONES, DEFAULT_SIZE, MODES
from bonescan_core.preprocess import PAPER_AUGMENT
from bonescan_core.results import Progress

MODE_HELP = {
    "fast": "frozen backbone, cached features: re-runs train only the head (seconds)",
    "head": "frozen backbone, head trained with augmentation",
    "finetune": "head first, then the top blocks unfrozen (BatchNorm frozen) at a lower learning rate",
    "full": "every layer trains from the start (what weights 'none' needs; pretrained: at the fine-tuning rate)",
}
LIVE_EVERY_S = 2
GROUPING_TEXT = {"patient": "by patient", "study": "by study: some studies' patients are unknown (no DICOM or manifest), "
                                                   "so each of those is its own patient"}
THRESHOLD_RULE_HELP = {
    "youden": "Youden's J (sensitivity + specificity - 1, maximal)",
    "sensitivity": "the highest threshold reaching a target sensitivity",
    "npv": "the highest threshold reaching a target negative predictive value",
    "fixed": "0.5, not chosen on data",
}


@st.cache_data(max_entries=8, show_spinner="Looking for near-duplicate images across the split's subsets...")
def cached_near_duplicates(database: str, split_id: int) -> list[dict]:
    """splits.near_duplicates of a split (its members never change: the id is the key)."""
    with dbm.opened(database) as db:
        return splits.near_duplicates(db, split_id)

st.title("Train")

statuses = cached("study_statuses")
with open_db() as db:
    split_id = splits.latest_split(db)
    split = splits.get_split(db, split_id) if split_id else None
    cohort_names = list_cohorts(db)

counts = cached("label_counts")
cards = st.columns(4)
cards[0].metric("Included, metastatic", counts["metastatic"])
cards[1].metric("Included, no metastasis", counts["non_metastatic"])
cards[2].metric("Waiting for adjudication", counts["waiting"])
cards[3].metric("Not used (unread or excluded)", counts["unused"])
if split:
    st.caption(f"Current split {split['id']} (grouped {GROUPING_TEXT[split['grouping']]}; stratified): " + "; ".join(
        f"{name} {n['studies']} studies ({n['metastatic']} metastatic)"
        for name, n in catalog.split_label_counts(statuses, split["subsets"]).items()))
    duplicates = cached_near_duplicates(str(db_path()), split["id"])
    if duplicates:
        st.warning(f"{len(duplicates)} pair(s) of near-duplicate images sit in different subsets of split {split['id']} "
                   f"(difference hash within {splits.NEAR_DUPLICATE_BITS} of 64 bits, block means correlating at {splits.NEAR_DUPLICATE_CORRELATION:g} or more): the same scan may be trained on "
                   "and tested on. Check them on the Scans page before training: "
                   + ", ".join(f"images {d['a']} ({d['subsets'][0]}) and {d['b']} ({d['subsets'][1]})" for d in duplicates[:10])
                   + (" ..." if len(duplicates) > 10 else ""), icon=":material/content_copy:")

# Before anyone presses Train: can ImageNet weights be had here? (cached probe; docs in availability)
offer = availability.training_offer()
if offer.message:
    st.warning(md(offer.message), icon=":material/cloud_off:")

can_train = allowed("train")
if not can_train:
    st.warning(denial("train"), icon=":material/lock:")

with st.form("train_form"):
    chosen = st.multiselect("Backbones (trained one after another on the same split)", list(BACKBONES),
                            default=list(offer.backbones), key="tr_backbones")
    left, middle, right = st.columns(3)
    weights = left.radio("Weights", list(offer.weights), index=offer.weights.index(offer.default_weights),
                         horizontal=True, key="tr_weights",
                         help="imagenet: Keras downloads them once into ~/.keras/models")
    weights_file = left.text_input("Weights file (for 'file')", key="tr_weights_file")
    mode = middle.selectbox("Mode", MODES, index=MODES.index(offer.default_mode), format_func=lambda m: f"{m}: {MODE_HELP[m]}",
                            key="tr_mode")
    epochs = right.number_input("Epochs", 1, 500, 20, key="tr_epochs")
    left2, middle2, right2 = st.columns(3)
    learning_rate = left2.number_input("Learning rate", 1e-6, 1.0, 1e-3, format="%.6f", key="tr_lr")
    batch_size = middle2.number_input("Batch size", 1, 256, 16, key="tr_batch")
    seed = right2.number_input("Seed", 0, 2**31 - 1, 0, key="tr_seed")
    size_columns = st.columns(2)
    height = size_columns[0].number_input("Input height", 32, 2048, DEFAULT_SIZE[0], key="tr_height")
    width = size_columns[1].number_input("Input width", 32, 1024, DEFAULT_SIZE[1], key="tr_width")
    st.markdown("Augmentation (training images only; paper defaults)")
    switches = st.columns(len(PAPER_AUGMENT))
    augment = {}
    for column, (name, default) in zip(switches, PAPER_AUGMENT.items(), strict=True):
        if column.toggle(name.replace("_", " "), value=True, key=f"tr_aug_{name}"):
            augment[name] = default
    repeat_left, repeat_right = st.columns(2)
    repeats = repeat_left.number_input("Repeats (seeds S, S+1, ...)", 1, 20, 1, key="tr_repeats",
                                       help="Train each backbone this many times as one repeat group: Evaluate and "
                                            "compare show every repeat and their mean ± SD, the seed-to-seed noise "
                                            "floor a difference between backbones must exceed.")
    resplit = repeat_right.checkbox("A new patient-grouped split per repeat", key="tr_resplit",
                                    help="Repeat k trains on the split made with seed S+k (otherwise every repeat "
                                         "uses the one split of seed S).")
    options = st.columns(3)
    class_weights = options[0].checkbox(
        "Class weights", value=False, key="tr_class_weights",
        help="Weight the loss by inverse class frequency. Off by default: the threshold chosen on validation handles the "
             "imbalance, and the weights shift the probabilities (by about log(w1/w0) on the log-odds scale).")
    calibration = options[1].selectbox(
        "Calibration (fitted on validation)", list(runs.CALIBRATION_METHODS), key="tr_calibration",
        help="temperature: one temperature on the logit; platt: intercept and slope; none: raw outputs. "
             "Fitted on the validation predictions only; the threshold is chosen after it.")
    deterministic = options[2].checkbox("Deterministic ops", value=False, key="tr_deterministic",
                                        help="Repeatable kernels for this run (TensorFlow); slower on a GPU.")
    rule_column, target_column, aggregate_column = st.columns(3)
    threshold_rule = rule_column.selectbox("Threshold rule (on validation)", list(THRESHOLD_RULE_HELP), key="tr_rule",
                                           format_func=lambda r: f"{r}: {THRESHOLD_RULE_HELP[r]}",
                                           help="Chosen on validation images and, separately, validation studies.")
    threshold_target = target_column.number_input("Target (sensitivity / npv rules)", 0.01, 1.0, 0.90, 0.01,
                                                  key="tr_target")
    study_aggregate = aggregate_column.radio("Study probability from its views", ["max", "mean"], horizontal=True,
                                             key="tr_aggregate", help="max: the most suspicious view decides")
    chosen_cohorts = st.multiselect("Cohorts (the split is made from their studies; the others stay external)",
                                    cohort_names, default=cohort_names, key="tr_cohorts",
                                    help="None chosen: every cohort.")
    submitted = st.form_submit_button("Train", type="primary", disabled=not can_train)

prefer = " Prefer imagenet weights." if offer.message is None else ""
if weights == "none" and mode != "full":
    st.warning("Weights 'none' starts from random weights: only mode 'full' trains them, and from scratch on a few "
               "hundred scans a network rarely generalises." + prefer)
elif weights == "none" and prefer:
    st.warning("Training from scratch on a few hundred scans rarely generalises; ImageNet weights usually do much better.")

if submitted:  # never True while disabled (no trainer role): Streamlit drops a disabled button's click
    refusal = offer.refusal(chosen, weights)
    if not chosen:
        st.error("Choose at least one backbone.")
    elif refusal:
        st.error(refusal)
    else:
        try:
            config = training.TrainConfig(
                backbone=chosen[0], weights=weights_file.strip() if weights == "file" else weights, mode=mode,
                epochs=int(epochs), batch_size=int(batch_size), learning_rate=float(learning_rate),
                image_size=(int(height), int(width)), seed=int(seed), augment=augment, class_weights=class_weights,
                calibration=calibration, deterministic=deterministic, threshold_rule=threshold_rule,
                threshold_target=float(threshold_target) if threshold_rule in runs.TARGET_RULES else None,
                study_aggregate=study_aggregate,
            )
            with open_db() as db:
                messages = [queued.message for queued in jobs.enqueue_backbones(
                    db, chosen, config, cohorts=chosen_cohorts or None, repeats=int(repeats), resplit=resplit)]
            started = jobs.ensure_worker(db_path())
            st.success("; ".join(messages) + (". Started a background worker." if started else "."))
        except (errors.InputError, ValueError) as error:  # splits.SplitError is an InputError
            st.error(str(error))


@st.fragment(run_every=LIVE_EVERY_S)
def live_runs() -> None:
    """The runs, newest first: status, progress, ETA, curves, cancel. Polls the database."""
    if not still_signed_in():  # a fragment rerun skips the router's gate: check here, then show the sign-in form
        st.rerun(scope="app")
    with open_db() as db:
        shown = runs.list_runs(db)[:12]
        worker = jobs.worker_alive(db)
        curves = {run.id: runs.epochs(db, run.id) for run in shown if run.status in ("running", "done")}
    active = [run for run in shown if run.status in jobs.ACTIVE]
    may_train = allowed("train")
    st.subheader("Runs")
    st.caption(("A worker is running." if worker else "No worker is running.")
               + (f" {len(active)} run(s) queued or running." if active else ""))
    if active and not worker and may_train:
        if st.button("Start a worker", key="tr_start_worker"):
            jobs.ensure_worker(db_path())
    for run in shown:
        title = (f"Run {run.id} · {run.backbone} · {run.settings.mode} · {run.status}"
                 + (f" · {run.results.device}" if run.results.device else "")
                 + (f" · seed {run.settings.seed}, repeat group {run.repeat_group}" if run.repeat_group is not None else ""))
        with st.expander(title, expanded=run.status == "running"):
            progress = Progress.from_record(run.progress, run.settings.epochs)
            if run.status == "running":
                st.progress(progress.fraction(), text=progress.format())
            if run.status in jobs.ACTIVE and may_train:
                st.button("Cancel", key=f"tr_cancel_{run.id}", on_click=cancel, args=(run.id,))
            if run.error:
                st.error(md(run.error))  # may quote a typed weights path
            if run.status == "done":
                chosen = run.results.facts.get("thresholds") or {}
                study = f", per study {chosen['study']:.3f}" if chosen.get("study") is not None else ""
                st.caption(f"threshold per image {run.threshold:.3f}{study} ({run.settings.threshold_rule}) · "
                           f"{run.results.images_per_second or 0:.1f} training images/s")
                if progress.phase == "explaining" and (progress.batch or 0) < (progress.batches or 0):
                    st.caption(f"Grad-CAM maps ready for {progress.batch} of {progress.batches} studies; "
                               "the others are computed when first viewed in the explorer.")
            if curves.get(run.id):
                st.plotly_chart(plots.training_curves(curves[run.id]), key=f"tr_curves_{run.id}_{len(curves[run.id])}")


def cancel(run_id: int) -> None:
    if not allowed("train"):
        return
    with open_db() as db:
        jobs.request_cancel(db, run_id)


live_runs()
