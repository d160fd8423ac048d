"""Widgets shared by the pages: the sidebar and the scan viewer. Not a page itself."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import streamlit as st

from bonescan_core import catalog, devices, pixelstore
from bonescan_core import db as dbm


def db_path() -> Path:
    """The database every page uses: ``$BONESCAN_DB`` or ``./labels.db``."""
    return dbm.resolve_path(os.environ.get(dbm.ENV_VAR))


def open_db():
    """A short-lived connection for this rerun (``with open_db() as db:``)."""
    return dbm.opened(db_path())


@st.cache_resource(show_spinner=False)
def _device_line() -> str:
    return devices.describe()


def reviewer() -> str:
    """The reviewer name from the sidebar ('' when none is entered)."""
    return st.session_state.get("reviewer_name", "")


def sidebar() -> None:
    """Database in use, reviewer name (also ``?reviewer=NAME``), compute device.

    The name lives in a plain session key: Streamlit drops a widget's own state when the
    user switches pages, and the reviewer must survive that.
    """
    if "reviewer_name" not in st.session_state:
        st.session_state["reviewer_name"] = st.query_params.get("reviewer", "").strip()
    with st.sidebar:
        name = st.text_input("Reviewer", value=st.session_state["reviewer_name"], key="reviewer_input",
                             placeholder="your name or initials",
                             help="Every review is stored under this name. Also settable as ?reviewer=NAME in the URL.")
        st.session_state["reviewer_name"] = name.strip()
        if name.strip():
            st.query_params["reviewer"] = name.strip()
        st.caption(f"Database: `{db_path()}`")
        st.caption(f"Compute: {_device_line()}")


def data_url(png: bytes) -> str:
    """PNG bytes as a data: URL (for image columns in tables)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def scan_viewer(images: list[dict], key: str) -> None:
    """Both views side by side, inverted grey (NM convention), with window and gamma.

    Args:
        images: dicts with ``pixels`` ((H, W) array), ``view``, ``source``, ``display_max``
            (see ``catalog.study_images``).
        key: prefix for the widget keys (one viewer per key).
    """
    if not images:
        st.info("This study has no images.")
        return
    controls = st.columns(3)
    window = controls[0].slider("Upper window (% of the 99.5th percentile)", 10, 300, 100, 5, key=f"{key}_window",
                                help="Lower it to see faint uptake; raise it to separate hot lesions.")
    gamma = controls[1].slider("Gamma", 0.3, 2.0, 1.0, 0.05, key=f"{key}_gamma", help="Below 1 brightens faint uptake.")
    height = controls[2].slider("Zoom (display height, px)", 300, 1400, 700, 50, key=f"{key}_zoom")
    shown = [pixelstore.to_display(image["pixels"], upper=image["display_max"] * window / 100.0, gamma=gamma) for image in images]
    captions = " | ".join(f"{(image['view'] or 'view unknown').capitalize()} ({image['source']})" for image in images)
    st.image(pixelstore.side_by_side(shown, height), caption=captions)


@st.cache_data(max_entries=64, show_spinner=False)
def _study_images(database: str, study_id: int) -> list[dict]:
    with dbm.opened(database) as db:
        return catalog.study_images(db, study_id)


def cached_study_images(study_id: int) -> list[dict]:
    """A study's decoded images, cached per database and study (pixels never change)."""
    return _study_images(str(db_path()), study_id)
