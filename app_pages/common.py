"""Widgets shared by the pages: sign-in, the sidebar and the scan viewer. Not a page itself."""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import streamlit as st

from bonescan_core import accounts, agreement, catalog, devices, errors, pixelstore
from bonescan_core import db as dbm
from bonescan_core import review as rv


def db_path() -> Path:
    """The database every page uses: ``$BONESCAN_DB`` or ``./labels.db``."""
    return dbm.resolve_path(os.environ.get(dbm.ENV_VAR))


@st.cache_resource(show_spinner=False)
def _wal_keeper(database: str) -> object:
    """``db.idle_connection`` of the database, held for the server's life (see there why)."""
    return dbm.idle_connection(database)


def open_db():
    """A short-lived connection for this rerun (``with open_db() as db:``)."""
    path = db_path()
    if path.exists():
        _wal_keeper(str(path))
    return dbm.opened(path)


@st.cache_resource(show_spinner=False)
def _device_line() -> str:
    return devices.describe()


SESSION_KEY = "signed_in_session"  # {"name", "epoch", "last_active"}: who signed in to this session, and when last active
ENDED_KEY = "si_ended"  # why the last session ended, shown above the sign-in form


def _markdown_punctuation() -> str:
    return "".join(chr(c) for c in range(33, 127) if not chr(c).isalnum())


_ESCAPES = str.maketrans({c: "\\" + c for c in _markdown_punctuation()} | {"\n": " ", "\r": " "})


def md(text: object) -> str:
    """``text`` made inert for Streamlit Markdown (st.markdown, st.write, captions, alerts):
    every ASCII punctuation mark backslash-escaped, line breaks turned to spaces.

    For anything a user typed (reviewer and account names, notes, reasons): a name such as
    ``![x](http://host/x.png)`` would otherwise make every viewer's browser fetch the URL.
    """
    return str(text).translate(_ESCAPES)


def _end_session(reason: str | None) -> None:
    """Forget everything in this session (on a shared workstation the next reader inherits
    nothing), keeping only why it ended, for the sign-in form."""
    for key in list(st.session_state):
        del st.session_state[key]
    if reason:
        st.session_state[ENDED_KEY] = reason


def _ticket() -> tuple[str, int] | None:
    """(account name, epoch) of this session's sign-in, if it is still fresh (not idle too long)."""
    ticket = st.session_state.get(SESSION_KEY)
    if not ticket:
        return None
    if accounts.session_expired(ticket["last_active"], time.time(), accounts.idle_limit_s()):
        _end_session(f"You were signed out after {accounts.idle_limit_s() / 60:g} minutes without activity: sign in again.")
        return None
    return ticket["name"], ticket["epoch"]


def _current(db) -> accounts.Account | None:
    """This session's signed-in account, checked against the database now (None if it must sign in)."""
    ticket = _ticket()
    if ticket is None:
        return None
    account = accounts.session_account(db, *ticket)
    if account is None:
        _end_session("Your session ended: the account's password was changed or it was disabled. Sign in again.")
    return account


def signed_in() -> accounts.Account | None:
    """The account signed in to this session, as stored now (None with sign-in off, before
    signing in, or once the session has ended)."""
    with open_db() as db:
        return _current(db) if accounts.sign_in_required(db) else None


def reviewer() -> str:
    """Who is reading: with sign-in on, the signed-in account's name ('' if none); with it
    off, the sidebar name ('' when none). A typed name never counts with sign-in on."""
    with open_db() as db:
        if accounts.sign_in_required(db):
            account = _current(db)
            return account.name if account is not None else ""
    return st.session_state.get("reviewer_name", "")


def sign_in_on() -> bool:
    """Whether the app requires sign-in (``bonescan account sign-in on``)."""
    with open_db() as db:
        return accounts.sign_in_required(db)


def allowed(action: str) -> bool:
    """Whether this session may ``label``, ``adjudicate``, ``train``, ``import`` or ``flag`` now.

    Reads everything now (sign-in setting, the session's account, its roles), so it is safe
    in button callbacks, which run before the page (and the gate): with sign-in on, only a
    session signed in, not idle too long and not ended since counts, never the typed name.
    """
    with open_db() as db:
        required = accounts.sign_in_required(db)
        ticket = _ticket() if required else None
        return accounts.session_permits(db, ticket, action)


def still_signed_in() -> bool:
    """Whether this session may still see the app (sign-in off, or signed in and valid now):
    for fragments, which rerun without the gate."""
    with open_db() as db:
        return not accounts.sign_in_required(db) or _current(db) is not None


def denial(action: str) -> str:
    """The message for a reader whose account lacks the role for ``action``. Shown as Markdown
    unescaped (the command stays readable): account names are letters, digits, ``._@-`` only
    (``accounts.validate_name``), which form no link, image or markup."""
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
    st.session_state[SESSION_KEY] = {"name": account.name, "epoch": account.session_epoch, "last_active": time.time()}
    st.session_state["reviewer_name"] = account.name
    st.session_state.pop(ENDED_KEY, None)


def _sign_out() -> None:
    _end_session(None)


def gate() -> bool:
    """Whether the page may run. With sign-in required and nobody signed in, shows only the
    sign-in form and returns False. The sign-in is checked against the database on every
    rerun (a password changed, or the account disabled, since it signed in ends it), and a
    session idle longer than ``$BONESCAN_SESSION_IDLE_MINUTES`` ends; a rerun counts as
    activity.
    """
    with open_db() as db:
        if not accounts.sign_in_required(db):
            st.session_state.pop(SESSION_KEY, None)
            return True
        try:
            account = _current(db)
        except errors.InputError as error:  # a mistyped BONESCAN_SESSION_IDLE_MINUTES: say so, show nothing
            st.error(str(error), icon=":material/settings:")
            return False
    if account is not None:
        st.session_state[SESSION_KEY]["last_active"] = time.time()
        st.session_state["reviewer_name"] = account.name
        return True
    st.session_state["reviewer_name"] = ""
    st.title("Sign in")
    st.caption("This bonescan requires sign-in: your reviews are stored under your account name.")
    if message := st.session_state.get(ENDED_KEY):
        st.info(message, icon=":material/timer_off:")
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
            st.markdown(f"Signed in as **{md(account.name)}** ({', '.join(account.roles)})")
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


class ViewSettings(NamedTuple):
    """How a viewer draws a study: upper window (% of the 99.5th percentile), gamma, zoom (display height, px)."""

    window: int
    gamma: float
    height: int


def view_settings(key: str) -> ViewSettings:
    """The viewer's window, gamma and zoom sliders (widget keys ``KEY_window``, ``KEY_gamma``, ``KEY_zoom``)."""
    controls = st.columns(3)
    window = controls[0].slider("Upper window (% of the 99.5th percentile)", 10, 300, 100, 5, key=f"{key}_window",
                                help="Lower it to see faint uptake; raise it to separate hot lesions.")
    gamma = controls[1].slider("Gamma", 0.3, 2.0, 1.0, 0.05, key=f"{key}_gamma", help="Below 1 brightens faint uptake.")
    height = controls[2].slider("Zoom (display height, px)", 300, 1400, 700, 50, key=f"{key}_zoom")
    return ViewSettings(window, gamma, height)


def show_study(study_id: int, settings: ViewSettings, title: str = "") -> None:
    """Both views of a study side by side, inverted grey (NM convention), drawn with ``settings``;
    the composed picture is cached per setting, so a rerun redraws nothing. ``title`` leads the
    caption (``Study 12 · 94 days earlier``)."""
    images = cached_study_images(study_id)
    if not images:
        st.info(f"{title}: this study has no images." if title else "This study has no images.")
        return
    captions = " | ".join(f"{(image['view'] or 'view unknown').capitalize()} ({image['source']})" for image in images)
    st.image(_displayed(str(db_path()), study_id, *settings), caption=f"{title} · {captions}" if title else captions)


def scan_viewer(study_id: int, key: str) -> ViewSettings | None:
    """Both views of a study side by side with window, gamma and zoom sliders (:func:`show_study`).

    Args:
        study_id: the study shown.
        key: prefix for the widget keys (one viewer per key).

    Returns:
        The settings it drew with (None when the study has no images): other studies drawn
        beside it with :func:`show_study` and these look the same.
    """
    if not cached_study_images(study_id):
        st.info("This study has no images.")
        return None
    settings = view_settings(key)
    show_study(study_id, settings)
    return settings


@st.cache_data(max_entries=32, show_spinner=False)
def _displayed(database: str, study_id: int, window: int, gamma: float, height: int) -> np.ndarray:
    """The viewer's picture: (height, W) uint8, the study's views windowed and side by side."""
    images = _study_images(database, study_id)
    shown = [pixelstore.to_display(image["pixels"], upper=image["display_max"] * window / 100.0, gamma=gamma)
             for image in images]
    return pixelstore.side_by_side(shown, height)


@st.cache_data(max_entries=64, show_spinner=False)
def _study_images(database: str, study_id: int) -> list[dict]:
    with dbm.opened(database) as db:
        return catalog.study_images(db, study_id)


def data_version() -> int:
    """The database's data version (``db.data_version``): what the study caches below are keyed by."""
    with open_db() as db:
        return dbm.data_version(db)


class StudyCatalog(NamedTuple):
    """The Scans page's whole-database view, computed once per data version: every study row
    (``catalog.study_table``), the filters' choices, the unfiltered characteristics and the
    number of patients."""

    table: tuple[dict, ...]
    options: dict[str, list[str]]
    characteristics: dict[str, dict[str, int]]
    patients: int


def _study_catalog(db) -> StudyCatalog:
    table = catalog.study_table(db)
    return StudyCatalog(tuple(table), catalog.filter_options(table), catalog.characteristics(table),
                        len({row["patient_id"] for row in table}))


# What pages derive from the studies' tables, by name (with their arguments): recomputed only
# when the data version moved.
_DERIVED: dict[str, Callable[..., Any]] = {
    "study_catalog": _study_catalog,
    "study_statuses": rv.study_statuses,
    "label_counts": lambda db: catalog.label_counts(rv.study_statuses(db)),
    "reader_pairs": agreement.pairwise,
    "read_by": rv.read_by,
}


# cache_resource, not cache_data: no copy on each hit (unpickling 50,000 rows would cost more
# than a page's whole budget), so callers must not change what they get. The key holds the data
# version: any stored change makes a new entry, so a page never shows a stale label.
@st.cache_resource(max_entries=4 * len(_DERIVED), show_spinner=False)
def _derived(database: str, version: int, name: str, *args: Any) -> Any:
    with dbm.opened(database) as db:
        return _DERIVED[name](db, *args)


def cached(name: str, *args: Any) -> Any:
    """What ``name`` in the table above derives from the database (read-only), as of its current
    data version: ``study_catalog`` (:class:`StudyCatalog`), ``study_statuses``
    (``review.study_statuses``), ``label_counts`` (``catalog.label_counts``), ``reader_pairs``
    (``agreement.pairwise``), ``read_by`` (a reviewer's read studies; pass the name)."""
    return _derived(str(db_path()), data_version(), name, *args)


def cached_study_images(study_id: int) -> list[dict]:
    """A study's decoded images, cached per database and study (pixels never change)."""
    return _study_images(str(db_path()), study_id)
