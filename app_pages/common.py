"""Widgets shared by the pages: sign-in, the sidebar and the scan viewer. Not a page itself."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import streamlit as st

from bonescan_core import accounts, catalog, devices, pixelstore
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


ACCOUNT_KEY = "signed_in_account"  # the accounts.Account signed in to this session


def signed_in() -> accounts.Account | None:
    """The account signed in to this session (None with sign-in off or before signing in)."""
    return st.session_state.get(ACCOUNT_KEY)


def reviewer() -> str:
    """Who is reading: the signed-in account's name, else the sidebar name ('' when none)."""
    account = signed_in()
    return account.name if account is not None else st.session_state.get("reviewer_name", "")


def sign_in_on() -> bool:
    """Whether the app requires sign-in (``bonescan account sign-in on``)."""
    with open_db() as db:
        return accounts.sign_in_required(db)


def allowed(action: str) -> bool:
    """Whether this session's reader may ``label``, ``adjudicate`` or ``train`` (by the roles stored now)."""
    with open_db() as db:
        return accounts.may(db, reviewer(), action)


def denial(action: str) -> str:
    """The message for a reader whose account lacks the role for ``action``."""
    return accounts.denial(action, signed_in())


def _sign_in() -> None:
    """Form callback: check name and password; on success the session carries the account."""
    name, password = st.session_state.get("si_name", ""), st.session_state.get("si_password", "")
    st.session_state["si_password"] = ""  # never kept in the session
    try:
        with open_db() as db:
            account = accounts.authenticate(db, name, password)
    except accounts.SignInFailed as error:
        st.session_state["si_error"] = str(error)
        return
    st.session_state[ACCOUNT_KEY] = account
    st.session_state["reviewer_name"] = account.name


def _sign_out() -> None:
    # Everything goes: on a shared workstation the next reader inherits nothing.
    for key in list(st.session_state):
        del st.session_state[key]


def gate() -> bool:
    """Whether the page may run. With sign-in required and nobody signed in, shows only the
    sign-in form and returns False. A signed-in account is re-read on every rerun, so a
    disabled account is signed out at once and changed roles show at once.
    """
    with open_db() as db:
        required = accounts.sign_in_required(db)
        account = signed_in()
        fresh = accounts.get_account(db, account.name) if required and account is not None else None
    if not required:
        st.session_state.pop(ACCOUNT_KEY, None)
        return True
    if fresh is not None and not fresh.disabled:
        st.session_state[ACCOUNT_KEY] = fresh
        st.session_state["reviewer_name"] = fresh.name
        return True
    st.session_state.pop(ACCOUNT_KEY, None)
    st.session_state["reviewer_name"] = ""
    st.title("Sign in")
    st.caption("This bonescan requires sign-in: your reviews are stored under your account name.")
    if message := st.session_state.pop("si_error", None):
        st.error(message, icon=":material/lock:")
    with st.form("sign_in_form"):
        st.text_input("Account name", key="si_name", autocomplete="username")
        st.text_input("Password", type="password", key="si_password", autocomplete="current-password")
        st.form_submit_button("Sign in", type="primary", on_click=_sign_in)
    st.caption("No account? Ask an administrator: `bonescan account add NAME --role reader`.")
    return False


def sidebar() -> None:
    """Database in use, who is reading, compute device.

    With sign-in, the signed-in account (and a Sign out button); otherwise a free reviewer
    name (also ``?reviewer=NAME``). The name lives in a plain session key: Streamlit drops a
    widget's own state when the user switches pages, and the reviewer must survive that.
    """
    account = signed_in()
    with st.sidebar:
        if account is not None:
            st.markdown(f"Signed in as **{account.name}** ({', '.join(account.roles)})")
            st.button("Sign out", key="sign_out", on_click=_sign_out, icon=":material/logout:")
        else:
            if "reviewer_name" not in st.session_state:
                st.session_state["reviewer_name"] = st.query_params.get("reviewer", "").strip()
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
