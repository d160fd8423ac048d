"""Scans: import files, folders or the demo dataset; browse studies; view both views."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from app_pages.common import (
    StudyCatalog,
    allowed,
    cached,
    data_url,
    db_path,
    denial,
    md,
    open_db,
    scan_viewer,
)
from bonescan_core import catalog, ingest
from bonescan_core.cohorts import ALLOWED as COHORT_ALLOWED
from bonescan_core.cohorts import DEFAULT_COHORT, CohortError
from bonescan_core.phantom import OTHER_SCANNER

PAGE_SIZE = 50


def show_outcomes(outcomes: list[ingest.FileOutcome]) -> None:
    """Summary line plus one line per file; rejected files as errors that say what to do."""
    counts = {status: sum(o.status == status for o in outcomes) for status in ("imported", "duplicate", "rejected")}
    summary = ", ".join(f"{n} {status}" for status, n in counts.items() if n)
    (st.warning if counts["rejected"] else st.success)(f"{len(outcomes)} file(s): {summary}.")
    for outcome in outcomes:
        if outcome.status == "rejected":
            st.error(md(outcome.line()), icon=":material/block:")
    with st.expander("Every file", expanded=False):
        st.code("\n".join(o.line() for o in outcomes) or "(none)", language=None)


def progress_callback(bar):
    def update(step: ingest.ProgressStep) -> None:
        bar.progress(step.done / max(step.total, 1), text=f"{step.text()} · {step.name}")
    return update


st.title("Scans")

may_import = allowed("import")  # with sign-in on, the importer role; re-read on every rerun (each click is one)
if not may_import:
    st.warning(denial("import"), icon=":material/lock:")
upload_tab, folder_tab, demo_tab = st.tabs(["Upload files", "Import a folder on this computer", "Demo dataset"])

KEEP_NAMES_HELP = ("Off: each image is stored and shown under a neutral name such as png-3fa9c2d1-ANT "
                   "(format, pixel hash, view), because file names often hold an MRN, a name or a birth date. "
                   "On: the original file name (without folders) is stored and shown in the viewers; a name that "
                   "contains a manifest id or one of the DICOM file's identifiers still gets a neutral name, but a "
                   "patient's name or birth date alone is kept.")
COHORT_HELP = (f"The source of these studies (a hospital, a scanner): {COHORT_ALLOWED}. A split is made from chosen "
               "cohorts; the others are external to its runs. A study already stored keeps its cohort.")

with upload_tab:
    st.caption("TIFF, PNG, JPEG or DICOM. Upload both views of a study together so they are grouped "
               "(file names with A/ANT/anterior and P/POST/posterior, or DICOM study UIDs). "
               f"At most {ingest.MAX_UPLOAD_FILES} files and {ingest.MAX_UPLOAD_BYTES // 1024**2} MiB per upload; "
               "import larger sets as a folder.")
    # Any file type: scanners often export DICOM without an extension, and a file the importer
    # cannot read gets its reason below (a type filter would refuse it with no explanation).
    uploads = st.file_uploader("Scan files", accept_multiple_files=True, key="uploads")
    keep_upload_names = st.checkbox("Keep original file names", key="upload_keep_names", help=KEEP_NAMES_HELP)
    upload_cohort = st.text_input("Cohort", DEFAULT_COHORT, key="upload_cohort", help=COHORT_HELP)
    if st.button("Import uploaded files", disabled=not uploads or not may_import, key="import_uploads") and may_import:
        bar = st.progress(0.0, text="importing")
        try:
            with open_db() as db:
                # The UploadedFile objects themselves: ingest streams each to disk (no second copy in memory).
                outcomes = ingest.import_uploads(db, [(f.name, f) for f in uploads], progress_callback(bar),
                                                 keep_file_names=keep_upload_names, cohort=upload_cohort)
        except (ingest.UploadTooLarge, CohortError) as error:
            st.error(str(error))
        else:
            show_outcomes(outcomes)
        finally:
            bar.empty()

with folder_tab:
    try:
        roots = ingest.allowed_import_roots(db_path())
    except ingest.ImportRootError as error:
        st.error(str(error))
        roots = []
    if roots:
        st.caption("The app imports from " + ", ".join(f"`{root}`" for root in roots) + " (set `BONESCAN_DATA_DIR` "
                   "or `BONESCAN_IMPORT_ROOTS` to change); files linked from elsewhere are refused.")
    folder = st.text_input("Folder or file path", key="import_folder", placeholder=str(roots[0]) if roots else "")
    label_from_folder = st.checkbox("Record class folders (metastatic/, normal/, 0/, 1/...) as labels by reviewer `import`",
                                    key="import_label_from_folder")
    keep_folder_names = st.checkbox("Keep original file names", key="import_keep_names", help=KEEP_NAMES_HELP)
    folder_cohort = st.text_input("Cohort", DEFAULT_COHORT, key="import_cohort", help=COHORT_HELP)
    if st.button("Import folder", disabled=not folder or not roots or not may_import, key="import_folder_button") and may_import:
        bar = st.progress(0.0, text="importing")
        try:
            with open_db() as db:
                outcomes = ingest.import_folder(db, Path(folder), roots=roots, label_from_folder=label_from_folder,
                                                keep_file_names=keep_folder_names, progress=progress_callback(bar),
                                                cohort=folder_cohort)
        except (PermissionError, FileNotFoundError, CohortError) as error:
            st.error(md(error))  # may quote the typed path
        else:
            show_outcomes(outcomes) if outcomes else st.warning("No files found in that folder.")
        finally:
            bar.empty()

with demo_tab:
    st.caption("Synthetic whole-body studies (anterior + posterior, 1024 x 256 counts, Poisson noise), about 40% "
               "metastatic, with benign look-alikes in both classes and reference labels by reviewer `reference`.")
    n_demo = st.number_input("Studies", 10, 1000, 100, 10, key="demo_studies", width=200)
    demo_cohort = st.text_input("Cohort", DEFAULT_COHORT, key="demo_cohort", help=COHORT_HELP)
    demo_shift = st.checkbox("Looks like another scanner", key="demo_shift",
                             help=f"{OTHER_SCANNER.size(1024, 256)[0]} x {OTHER_SCANNER.size(1024, 256)[1]} pixels, "
                                  f"{OTHER_SCANNER.count_scale:g}x the counts, read-out noise, stored as "
                                  f"{OTHER_SCANNER.gain:g} x counts + {OTHER_SCANNER.offset:g}: an external cohort")
    if st.button("Load demo dataset", type="primary", disabled=not may_import, key="load_demo") and may_import:
        bar = st.progress(0.0, text="generating")
        try:
            with open_db() as db:
                outcomes = ingest.add_demo_studies(db, int(n_demo), seed=0, progress=progress_callback(bar),
                                                   cohort=demo_cohort, shift=OTHER_SCANNER if demo_shift else None)
        except CohortError as error:
            st.error(str(error))
        else:
            added = sum(o.status == "imported" for o in outcomes)
            st.success(f"Added {added} demo studies ({len(outcomes) - added} were already there).")
        finally:
            bar.empty()

known: StudyCatalog = cached("study_catalog")
table = known.table

st.subheader(f"Studies ({len(table)})")
if not table:
    st.info("No studies yet: upload files, import a folder, or load the demo dataset above.")
    st.stop()

options = known.options
filters = st.columns(5)
chosen = {
    "label": filters[0].multiselect("Training label", options["label"], key="filter_label"),
    "sex": filters[1].multiselect("Sex", options["sex"], key="filter_sex"),
    "primary_cancer": filters[2].multiselect("Primary cancer", options["primary_cancer"], key="filter_cancer"),
    "origin": filters[3].multiselect("Origin", options["origin"], key="filter_origin"),
    "cohort": filters[4].multiselect("Cohort", options["cohort"], key="filter_cohort"),
}
filtered = any(chosen.values())
rows = catalog.filter_studies(table, chosen) if filtered else table
summary = catalog.characteristics(rows) if filtered else known.characteristics
patients = len({r["patient_id"] for r in rows}) if filtered else known.patients
with st.expander(f"Patient characteristics ({patients} patients, {len(rows)} studies)", expanded=True):
    columns = st.columns(4)
    for column, (title, counts) in zip(columns, [("Sex", summary["sex"]), ("Age band", summary["age_band"]),
                                                ("Primary cancer", summary["primary_cancer"]), ("Training label (studies)", summary["label"])],
                                       strict=True):
        column.dataframe(pd.DataFrame({title: list(counts), "n": list(counts.values())}), hide_index=True)

pages = max(1, -(-len(rows) // PAGE_SIZE))
page = st.number_input(f"Page (of {pages}, {PAGE_SIZE} per page)", 1, pages, 1, key="studies_page") if pages > 1 else 1
shown = rows[(page - 1) * PAGE_SIZE: page * PAGE_SIZE]
with open_db() as db:
    thumbs = catalog.thumbnails(db, [r["id"] for r in shown])
frame = pd.DataFrame(
    {
        "study": [r["id"] for r in shown],
        "anterior": [data_url(thumbs[r["id"]]["anterior"]) if "anterior" in thumbs.get(r["id"], {}) else None for r in shown],
        "posterior": [data_url(thumbs[r["id"]]["posterior"]) if "posterior" in thumbs.get(r["id"], {}) else None for r in shown],
        "label": [r["label"] or "" for r in shown],
        "included": [r["included"] for r in shown],
        "images": [r["n_images"] for r in shown],
        "sex": [r["sex"] or "" for r in shown],
        "age band": [r["age_band"] or "" for r in shown],
        "primary cancer": [r["primary_cancer"] or "" for r in shown],
        "origin": [r["origin"] for r in shown],
        "cohort": [r["cohort"] for r in shown],
    }
)
selection = st.dataframe(
    frame,
    hide_index=True,
    row_height=96,
    height=min(96 * len(frame) + 40, 620),
    column_config={
        "anterior": st.column_config.ImageColumn("Anterior", width="small"),
        "posterior": st.column_config.ImageColumn("Posterior", width="small"),
    },
    on_select="rerun",
    selection_mode="single-row",
    key="studies_table",
)
selected_rows = selection.selection.rows if selection else []
study_id = int(frame["study"].iloc[selected_rows[0]]) if selected_rows else int(frame["study"].iloc[0])
st.subheader(f"Study {study_id}")
st.caption("Select a row in the table to view another study.")
scan_viewer(study_id, key="scans_viewer")
