"""Reader sign-in in a real browser: with sign-in required, a page shows only the sign-in form;
a wrong password is refused; the right one opens the Review page under the account's name,
and a label saved there carries that name."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from bonescan_core import accounts
from bonescan_core import db as dbm
from bonescan_core import review as rv
from bonescan_core.ingest import add_demo_studies

from .conftest import AppServer, open_app, wait_for_streamlit_idle

pytestmark = pytest.mark.e2e

PASSWORD = "correct horse battery"


def sign_in(page, name: str, password: str) -> None:
    page.get_by_role("textbox", name="Account name").fill(name)
    page.get_by_role("textbox", name="Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    wait_for_streamlit_idle(page)


def test_sign_in_then_label_under_the_account_name(app_server: AppServer, browser_page) -> None:
    with dbm.opened(app_server.db_path) as db:
        add_demo_studies(db, 3, seed=2)
        accounts.add_account(db, "ann", PASSWORD, ["reader"])
        accounts.set_sign_in(db, True)
    page = browser_page
    open_app(page, app_server, "/review?reviewer=mallory")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    expect(page.get_by_text("Study 1 ·")).to_have_count(0)

    sign_in(page, "ann", "wrong password!")
    expect(page.get_by_test_id("stAlertContentError")).to_be_visible()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()

    page.wait_for_timeout(1200)  # the first failure delays the next attempt for this name by 1 s
    sign_in(page, "ann", PASSWORD)
    expect(page.get_by_test_id("stSidebar")).to_contain_text("Signed in as ann")
    expect(page.get_by_text("Study 1 ·")).to_be_visible()
    page.get_by_role("checkbox", name=rv.CRITERIA["typical_pattern"][1]).check(force=True)
    wait_for_streamlit_idle(page)
    page.get_by_role("heading", name="Review").click()
    page.keyboard.press("m")
    wait_for_streamlit_idle(page)
    expect(page.get_by_text("Study 2 ·")).to_be_visible()
    with dbm.opened(app_server.db_path) as db:
        readers = [row["reviewer"] for row in rv.history(db, 1) if row["reviewer"] != "reference"]
    assert readers == ["ann"], "the review carries the signed-in account, not ?reviewer="
