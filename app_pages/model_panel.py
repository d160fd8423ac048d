"""The model beside the Review page's scan: a chosen run's out-of-sample probability and Grad-CAM
overlay for the study, under the blind rule of ``assist.model_visible``. Not a page itself.

Which studies had the model on screen is kept in the session (:data:`SHOWN_KEY`): a review saved
for one of them is stored as assisted.
"""

from __future__ import annotations

import numpy as np
import streamlit as st

from app_pages.common import cached_study_images, db_path, open_db
from bonescan_core import assist, errors, evaluation, pixelstore, runs

SHOWN_KEY = "rv_model_shown"  # {study id} whose model opinion this session has displayed


def run_label(run: runs.Run) -> str:
    return f"Run {run.id} · {evaluation.run_label(run.backbone, run.id)} · {run.settings.mode}"


def controls(done_runs: list[runs.Run], blind: bool) -> tuple[int | None, bool]:
    """The run selectbox (newest finished run first) and the "Show model" toggle (off, and
    disabled, in blind mode). Returns (chosen run id or None when no run is finished, show model)."""
    if not done_runs:
        return None, False
    by_id = {run.id: run for run in done_runs}
    row = st.columns([2, 1, 3])
    run_id = row[0].selectbox("Model run", list(by_id), format_func=lambda i: run_label(by_id[i]), key="rv_model_run",
                              help="The run whose opinion is shown, and that the model-based queue orders rank by.")
    show = row[1].toggle("Show model", value=False, key="rv_show_model", disabled=blind,
                         help="Show the model's probability and Grad-CAM map before you read (not in blind mode); "
                              "reviews saved then are recorded as assisted.")
    return run_id, bool(show) and not blind


def shown_studies() -> set[int]:
    """Studies whose model opinion this session has displayed (a save of one is assisted)."""
    return st.session_state.setdefault(SHOWN_KEY, set())


@st.cache_data(max_entries=16, show_spinner=False)
def _overlays(database: str, run_id: int, study_id: int, opacity: float) -> tuple[np.ndarray, str, str | None]:
    """(the study's views with the run's maps, side by side at 700 px; their captions; the
    note on empty maps, or None)."""
    images = cached_study_images(study_id)
    with open_db() as db:
        overlays = assist.study_overlays(db, database, run_id, study_id, images, opacity=opacity)
    captions = " | ".join(f"{o.view_label}: Grad-CAM"
                          + ("" if o.probability is None else f" (p={o.probability:.3f})") for o in overlays)
    return pixelstore.side_by_side([o.rgb for o in overlays], 700), captions, assist.empty_map_note(overlays)


def panel(study_id: int, run_id: int | None, visible: bool, blind: bool) -> None:
    """The model's opinion of the study under ``run_id``, or why it is not shown."""
    if run_id is None:
        return
    st.markdown(f"**Model** (run {run_id})")
    if not visible:
        st.caption("Hidden until you have saved your read of this study (blind mode)." if blind else
                   "Hidden: turn on Show model to see it before reading (your read is then recorded as assisted).")
        return
    with open_db() as db:
        opinion = assist.opinion(db, run_id, study_id)
    if opinion.status == "trained":
        st.info(f"This study trained the model of run {run_id}: its prediction is not shown (only validation, "
                "test and external predictions are).", icon=":material/school:")
        return
    if opinion.status == "missing":
        st.caption(f"Run {run_id} stored no prediction of this study.")
        return
    if opinion.status == "not_predicted":
        st.caption(f"Run {run_id} has not predicted this study yet (it is outside the run's split).")
        if st.button(f"Predict this study with run {run_id}", key=f"rv_predict_{study_id}_{run_id}"):
            try:
                with st.spinner("Predicting and computing Grad-CAM..."), open_db() as db:
                    assist.predict_study(db, db_path(), run_id, study_id)
            except errors.BonescanError as error:
                st.error(str(error))
                return
            st.rerun()
        return
    shown_studies().add(study_id)
    threshold = "" if opinion.threshold is None else \
        f" · study threshold {opinion.threshold:.3f}: **{opinion.called.replace('_', ' ')}**"
    st.markdown(f"{opinion.subset} study · probability of metastasis **{opinion.probability:.3f}**{threshold}")
    opacity = st.slider("Grad-CAM opacity", 0.0, 1.0, 0.45, 0.05, key="rv_model_opacity")
    try:
        with st.spinner("Computing Grad-CAM..."):
            picture, captions, empty_note = _overlays(str(db_path()), run_id, study_id, opacity)
    except errors.BonescanError as error:  # e.g. the run's model file is gone and a map was not stored
        st.error(f"Grad-CAM is not available for this run: {error}")
        return
    st.image(picture, caption=captions)
    if empty_note:
        st.caption(empty_note)
