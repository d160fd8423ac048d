"""Review: read studies in a queue and record decisions by the study's criteria.

Keys: m = Metastatic, n = No metastasis, x = Exclude, j = next, k = previous. A save
appends one review and moves on to the next study in the queue.
"""

from __future__ import annotations

import time

import pandas as pd
import streamlit as st

from app_pages import common, model_panel
from app_pages.common import allowed, cached, cached_study_images, denial, md, open_db, reviewer, scan_viewer, still_signed_in
from bonescan_core import assist, catalog, priors, runs
from bonescan_core import review as rv

METASTATIC_CRITERIA = [c for c, (side, _) in rv.CRITERIA.items() if side == "metastatic"]
NON_METASTATIC_CRITERIA = [c for c, (side, _) in rv.CRITERIA.items() if side == "non_metastatic"]


def form_key(study_id: int, name: str) -> str:
    """Widget keys carry the study id, so every study starts with a clean form."""
    return f"rv_{study_id}_{name}"


def current_review(study_id: int, decision: str, label: str | None) -> rv.Review:
    """The Review the form describes, from the widget state (rv.add_review applies the screening rule)."""
    state = st.session_state
    side = METASTATIC_CRITERIA if label == "metastatic" else NON_METASTATIC_CRITERIA if label else []
    reason = state.get(form_key(study_id, "exclusion_reason"))
    return rv.Review(
        study_id=study_id,
        reviewer=reviewer(),
        decision=decision,
        label=label,
        criteria=tuple(c for c in side if state.get(form_key(study_id, c))),
        exclusion_reason=reason if decision == "exclude" else None,
        artifacts=tuple(a for a in rv.ARTIFACTS if state.get(form_key(study_id, a))),
        confidence=state.get(form_key(study_id, "confidence")),
        note=state.get(form_key(study_id, "note"), ""),
        adjudication=bool(state.get(form_key(study_id, "adjudication"))),
        screening=state.get(form_key(study_id, "screening"), "yes") == "yes",
        assisted=study_id in model_panel.shown_studies(),  # the model's opinion was on screen before this save
    )


def save(study_id: int, decision: str, label: str | None, next_study: int | None) -> None:
    """Button callback: validate, append the review, move to the next study."""
    review = current_review(study_id, decision, label).as_saved()
    if not allowed("label"):  # roles and the sign-in are re-read: a change in this session counts at once
        if still_signed_in():  # else the session has just ended, and the sign-in form says why
            st.session_state["rv_error"] = denial("label")
        return
    started = time.perf_counter()
    try:
        with open_db() as db:
            review_id = rv.add_review(db, review)
    except rv.ReviewError as error:
        st.session_state["rv_error"] = md(error)  # may quote a typed name
        return
    elapsed_ms = (time.perf_counter() - started) * 1000
    what = label.replace("_", " ") if label else f"excluded ({review.exclusion_reason})"
    st.session_state["rv_saved"] = f"Saved review {review_id}: study {study_id} {what} ({elapsed_ms:.0f} ms)."
    if next_study is not None:
        st.session_state["rv_study"] = next_study


def move(target: int | None) -> None:
    if target is not None:
        st.session_state["rv_study"] = target


# --- the patient's other studies beside the current one (issue 14.4) ---------------------------

MAX_BESIDE = 2  # other studies drawn beside the current one at a time (a multiselect picks them when more)


def study_beside_others(study_id: int, others: list[priors.OtherStudy], show_labels: bool) -> None:
    """The study, and beside it the same patient's other studies (``priors.other_studies``
    order: earlier first), all drawn with the one window, gamma and zoom, each captioned
    with its interval. Their training labels only when ``show_labels`` (never in blind mode)."""
    if not others:
        scan_viewer(study_id, key="rv_viewer")
        return
    words = {other.study_id: f"study {other.study_id}, {other.interval}" for other in others}
    st.caption("Other studies of this patient: " + "; ".join(words.values()))
    shown_ids = [other.study_id for other in others[:MAX_BESIDE]]
    if len(others) > MAX_BESIDE:
        shown_ids = st.multiselect("Beside this study", list(words), default=shown_ids, max_selections=MAX_BESIDE,
                                   format_func=words.get, key=form_key(study_id, "beside"))
    shown = [other for other in others if other.study_id in shown_ids]  # kept in priors order
    settings = common.view_settings("rv_viewer")
    with open_db() as db:
        statuses = rv.study_statuses(db, shown_ids) if show_labels and shown_ids else {}
    columns = st.columns(1 + len(shown))
    with columns[0]:
        common.show_study(study_id, settings, f"Study {study_id} (this study)")
    for column, other in zip(columns[1:], shown, strict=True):
        with column:
            common.show_study(other.study_id, settings, f"Study {other.study_id} · {other.interval}")
            if other.study_id in statuses:
                status = statuses[other.study_id]
                st.caption(f"Training label: {(status.label or 'none').replace('_', ' ')} · state: {status.state}")
    if not show_labels:
        st.caption("The other studies' labels are hidden in blind mode.")


st.title("Review")
name = reviewer()
if not name:
    st.warning("Enter your name as Reviewer in the sidebar (or open this page as /review?reviewer=NAME) to start reading.")
    st.stop()
if not allowed("label"):
    st.warning(denial("label"))
    st.stop()

if "study" in st.query_params and st.query_params["study"].isdigit():
    st.session_state["rv_study"] = int(st.query_params.pop("study"))

with open_db() as db:
    done_runs = runs.list_runs(db, status="done")
orders = [o for o in assist.QUEUE_ORDERS if o not in ("uncertain", "label_errors") or done_runs]
top = st.columns([2, 1, 3])
order = top[0].selectbox("Queue", orders, format_func=lambda o: assist.QUEUE_ORDERS[o].capitalize(), key="rv_order")
blind = top[1].toggle("Blind mode", value=True, key="rv_blind",
                      help="Hide other readers' labels, and the model, until you have read the study.")
model_run, show_model = model_panel.controls(done_runs, blind)
if order in ("uncertain", "label_errors"):
    st.caption("This queue is ordered by the model's output, so its order itself hints at the model's opinion.")

with open_db() as db:
    mine = cached("read_by", name)
    total = catalog.count_studies(db)
    adjudicator = rv.is_adjudicator(db, name)
    # The queue is a snapshot, taken when the order, the reader or the number of studies
    # changes (or on Refresh): j/k then walk a stable list, and k returns to the study just saved.
    snapshot_key = (order, name, total, model_run, st.session_state.get("rv_refresh", 0))
    if st.session_state.get("rv_queue_key") != snapshot_key:
        st.session_state["rv_queue"] = [study for study, _ in assist.reading_queue(db, name, order, model_run)]
        st.session_state["rv_queue_key"] = snapshot_key
queue: list[int] = st.session_state["rv_queue"]

top[2].progress(len(mine) / max(total, 1), text=f"{len(mine)} of {total} read by you")
if not queue:
    st.info("Nothing in this queue." if total else "No studies yet: import scans or load the demo dataset on the Scans page.")
    st.stop()

study_id = st.session_state.get("rv_study")
if study_id not in queue:
    study_id = queue[0]
    st.session_state["rv_study"] = study_id
position = queue.index(study_id)
previous_study = queue[position - 1] if position > 0 else None
next_study = queue[position + 1] if position + 1 < len(queue) else None

if message := st.session_state.pop("rv_saved", None):
    st.success(message, icon=":material/check:")
if message := st.session_state.pop("rv_error", None):
    st.error(message, icon=":material/error:")

nav = st.columns([1, 1, 1, 3])
nav[0].button("Previous (k)", shortcut="K", on_click=move, args=(previous_study,), disabled=previous_study is None, key="rv_prev")
nav[1].button("Next (j)", shortcut="J", on_click=move, args=(next_study,), disabled=next_study is None, key="rv_next")
nav[2].button("Refresh queue", key="rv_refresh_button",
              on_click=lambda: st.session_state.update(rv_refresh=st.session_state.get("rv_refresh", 0) + 1))
nav[3].markdown(f"**Study {study_id}** · {position + 1} of {len(queue)} in this queue"
                + (" · you have read it" if study_id in mine else ""))
with open_db() as db:
    flag_reasons = rv.open_flags(db).get(study_id, [])  # neutral texts: no model outcome or probability (blind_reason)
if flag_reasons:
    st.caption("Flagged for re-review: " + "; ".join(dict.fromkeys(flag_reasons)))
with open_db() as db:
    others = priors.other_studies(db, study_id)

viewer_column, form_column = st.columns([3, 2] if others else [1, 1])
with viewer_column:
    study_beside_others(study_id, others, show_labels=not blind)
    model_panel.panel(study_id, model_run, assist.model_visible(blind, show_model, study_id in mine), blind)
if next_study is not None:
    cached_study_images(next_study)  # decode the next study now, so it shows at once after a save

with form_column:
    st.radio("Indication is metastasis screening", ["yes", "no"], horizontal=True, key=form_key(study_id, "screening"))
    st.markdown("**Metastatic** when any of:")
    earlier = priors.earlier_notice(others)  # (b) and (e) compare with an earlier study
    for criterion in METASTATIC_CRITERIA:
        st.checkbox(rv.CRITERIA[criterion][1], key=form_key(study_id, criterion))
        if earlier and criterion in priors.NEEDS_EARLIER:
            st.caption(earlier)
    st.markdown("**No metastasis** when any of:")
    for criterion in NON_METASTATIC_CRITERIA:
        st.checkbox(rv.CRITERIA[criterion][1], key=form_key(study_id, criterion))
    st.markdown("**Artifacts** (recorded, not excluding):")
    for artifact, words in rv.ARTIFACTS.items():
        st.checkbox(words, key=form_key(study_id, artifact))
    st.selectbox("Exclusion reason (for Exclude)", list(rv.EXCLUSION_REASONS), index=None,
                 format_func=lambda r: rv.EXCLUSION_REASONS[r], placeholder="choose a reason to exclude",
                 key=form_key(study_id, "exclusion_reason"))
    st.select_slider("Confidence", options=[1, 2, 3, 4, 5], value=3, key=form_key(study_id, "confidence"))
    st.text_input("Note", key=form_key(study_id, "note"))
    if adjudicator:
        st.checkbox("Record as the consensus (adjudication)", key=form_key(study_id, "adjudication"))
    buttons = st.columns(3)
    buttons[0].button("Metastatic", shortcut="M", type="primary", on_click=save,
                      args=(study_id, "include", "metastatic", next_study), key="rv_metastatic")
    buttons[1].button("No metastasis", shortcut="N", type="primary", on_click=save,
                      args=(study_id, "include", "non_metastatic", next_study), key="rv_no_metastasis")
    buttons[2].button("Exclude", shortcut="X", on_click=save, args=(study_id, "exclude", None, next_study), key="rv_exclude")

    st.divider()
    with open_db() as db:
        trail = rv.history(db, study_id)
        status = rv.study_statuses(db, [study_id])[study_id]
    if blind and study_id not in mine:
        st.caption("Other readers' labels and the history are hidden until you have read this study (blind mode).")
    else:
        training = status.label.replace("_", " ") if status.label else "none"
        st.markdown(f"**Training label:** {training} · state: {status.state}")
        if trail:
            st.dataframe(
                pd.DataFrame(trail)[["created_at", "reviewer", "decision", "label", "criteria", "exclusion_reason",
                                     "artifacts", "confidence", "note", "adjudication"]],
                hide_index=True,
            )
