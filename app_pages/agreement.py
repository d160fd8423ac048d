"""Agreement: Cohen's kappa per reader pair, the 2x2 tables, disagreements, adjudicators."""

from __future__ import annotations

from urllib.parse import quote

import pandas as pd
import streamlit as st

from app_pages.common import cached, md, open_db, reviewer, sign_in_on
from bonescan_core import review as rv

st.title("Agreement")

pairs = cached("reader_pairs")
counts = cached("label_counts")
with open_db() as db:
    judges = rv.adjudicators(db)

cards = st.columns(4)
cards[0].metric("Studies", counts["studies"])
cards[1].metric("With a training label", counts["labelled"])
cards[2].metric("Waiting for adjudication", counts["waiting"])
cards[3].metric("Excluded", counts["excluded"])

if not pairs:
    st.info("No two readers have read the same study yet.")
else:
    st.dataframe(
        pd.DataFrame(
            {
                "reader A": [p.reviewers[0] for p in pairs],
                "reader B": [p.reviewers[1] for p in pairs],
                "n (both labelled)": [p.n for p in pairs],
                "agreement %": [p.percent_agreement for p in pairs],
                "Cohen's kappa": [p.kappa for p in pairs],
                "95% CI": ["" if p.kappa_ci95 is None else f"{p.kappa_ci95[0]:.2f} to {p.kappa_ci95[1]:.2f}" for p in pairs],
                "disagreements": [len(p.disagreements) for p in pairs],
            }
        ),
        hide_index=True,
    )
    labels = {f"{p.reviewers[0]} vs {p.reviewers[1]}": p for p in pairs}
    chosen = labels[st.selectbox("Pair", list(labels), key="ag_pair")]
    first, second = chosen.reviewers
    left, right = st.columns([1, 2])
    with left:
        st.markdown(f"**2x2 table** (rows: {md(first)}, columns: {md(second)})")
        st.dataframe(
            pd.DataFrame(chosen.table, index=[f"{first}: metastatic", f"{first}: no metastasis"],
                         columns=[f"{second}: metastatic", f"{second}: no metastasis"])
        )
    with right:
        st.markdown(f"**Disagreements** ({len(chosen.disagreements)}) — open one in Review")
        if chosen.disagreements:
            name = reviewer()
            suffix = f"&reviewer={quote(name, safe='')}" if name and not sign_in_on() else ""  # with sign-in the account is the reader
            st.dataframe(
                pd.DataFrame(
                    {
                        "study": [d["study_id"] for d in chosen.disagreements],
                        first: [d[first] for d in chosen.disagreements],
                        second: [d[second] for d in chosen.disagreements],
                        "open": [f"/review?study={d['study_id']}{suffix}" for d in chosen.disagreements],
                    }
                ),
                hide_index=True,
                column_config={"open": st.column_config.LinkColumn("Open in Review", display_text="open")},
            )

st.subheader("Adjudicators")
st.caption("An adjudicator records the consensus of disagreeing readers (in Review, with 'Record as the consensus'). "
           "The training label is the consensus if there is one, else the readers' unanimous label.")
st.markdown(md(", ".join(judges)) if judges else "None yet.")  # names are typed by anyone: inert
if sign_in_on():
    st.caption("Sign-in is on: the adjudicators are the accounts with the adjudicator role, set by an administrator "
               "with `bonescan account roles NAME --role adjudicator` (listing the account's other roles too).")
    st.stop()
candidate = st.text_input("Reviewer name", key="ag_candidate", value=reviewer())
cols = st.columns(2)
if cols[0].button("Make adjudicator", disabled=not candidate.strip(), key="ag_make"):
    with open_db() as db:
        rv.set_adjudicator(db, candidate, True)
    st.rerun()
if cols[1].button("Remove adjudicator", disabled=candidate.strip() not in judges, key="ag_remove"):
    with open_db() as db:
        rv.set_adjudicator(db, candidate, False)
    st.rerun()
