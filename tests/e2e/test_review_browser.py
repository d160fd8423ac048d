"""Review page in a real browser: open /review?reviewer=x, tick a criterion, press m, see the
next study and the stored review."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from bonescan_core import db as dbm
from bonescan_core import review as rv
from bonescan_core.ingest import add_demo_studies

from .conftest import AppServer, open_app, wait_for_streamlit_idle

pytestmark = pytest.mark.e2e


def test_keyboard_labelling(app_server: AppServer, browser_page) -> None:
    with dbm.opened(app_server.db_path) as db:
        add_demo_studies(db, 4, seed=11)
    page = browser_page
    open_app(page, app_server, "/review?reviewer=x")
    expect(page.get_by_text("Study 1 ·")).to_be_visible()
    expect(page.get_by_text("0 of 4 read by you")).to_be_visible()

    page.get_by_role("checkbox", name="(a) uptake in a pattern typical of metastasis").check(force=True)
    wait_for_streamlit_idle(page)
    page.get_by_role("heading", name="Review").click()  # focus the page, not a widget, so keys are shortcuts
    page.keyboard.press("m")
    wait_for_streamlit_idle(page)

    expect(page.get_by_text("Study 2 ·")).to_be_visible()
    expect(page.get_by_text("1 of 4 read by you")).to_be_visible()
    with dbm.opened(app_server.db_path) as db:
        rows = [row for row in rv.history(db, 1) if row["reviewer"] == "x"]
    assert len(rows) == 1
    assert (rows[0]["decision"], rows[0]["label"], rows[0]["criteria"]) == ("include", "metastatic", "typical_pattern")

    page.keyboard.press("k")  # back to study 1
    wait_for_streamlit_idle(page)
    expect(page.get_by_text("Study 1 ·")).to_be_visible()
    page.keyboard.press("j")
    wait_for_streamlit_idle(page)
    expect(page.get_by_text("Study 2 ·")).to_be_visible()
