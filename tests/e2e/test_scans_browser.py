"""Scans page in a real browser: reviewer from the URL, load the demo dataset, view a study."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from playwright.sync_api import expect

from .conftest import REPO, VIEWPORT, AppServer, open_app, start_app_server, wait_for_streamlit_idle

pytestmark = pytest.mark.e2e

# The Scans page is st.navigation's default page, which Streamlit serves at the app root ("/").
SCANS = "/"


def test_load_demo_dataset_and_view_a_study(app_server: AppServer, browser_page) -> None:
    page = browser_page
    open_app(page, app_server, f"{SCANS}?reviewer=alice")
    expect(page.get_by_role("dialog")).to_have_count(0)

    sidebar = page.get_by_test_id("stSidebar")
    expect(sidebar.get_by_role("textbox", name="Reviewer", exact=True)).to_have_value("alice")
    expect(page.get_by_role("heading", name="Studies (0)")).to_be_visible()

    page.get_by_role("tab", name="Demo dataset").click()
    studies = page.get_by_role("spinbutton", name="Studies", exact=True)
    studies.fill("10")
    studies.press("Enter")  # number_input commits on Enter (or blur)
    wait_for_streamlit_idle(page)
    expect(studies).to_have_value("10")

    page.get_by_role("button", name="Load demo dataset").click()
    expect(page.get_by_test_id("stAlertContentSuccess")).to_contain_text("Added 10", timeout=45_000)
    wait_for_streamlit_idle(page)
    expect(page.get_by_role("heading", name="Studies (10)")).to_be_visible()

    # The viewer below the table shows both views of the first study side by side in one
    # image (tight comparison), decoded by the browser.
    images = page.locator('[data-testid="stImage"] img')
    images.first.scroll_into_view_if_needed()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=images.first.element_handle(),
                           timeout=15_000)
    expect(images).to_have_count(1)
    expect(page.get_by_text("Anterior (phantom-0-0000-anterior) | Posterior (phantom-0-0000-posterior)")).to_be_visible()
    size = images.first.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert size[0] > size[1] / 4 * 2 * 0.9, "two 1:4 views next to each other are at least half as wide as tall"

    result = subprocess.run(
        [sys.executable, "-m", "bonescan_core", "--db", str(app_server.db_path), "studies", "--json"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert len(rows) == 10
    assert [row["n_images"] for row in rows] == [2] * 10


def test_first_request_after_server_start_runs_the_router(tmp_path, chromium) -> None:
    """A bookmarked deep link works as the very first request after a server start.

    (Regression: while the page scripts lived in ``pages/``, Streamlit's legacy pages-folder
    mode ran ``pages/review.py`` directly on a fresh server: no router, no sidebar.)
    """
    with start_app_server(tmp_path) as server:
        context = chromium.new_context(viewport=VIEWPORT)
        try:
            page = context.new_page()
            open_app(page, server, "/review?reviewer=alice")
            sidebar = page.get_by_test_id("stSidebar")
            expect(sidebar.get_by_role("textbox", name="Reviewer", exact=True)).to_have_value("alice", timeout=2_000)
        finally:
            context.close()


def test_upload_good_and_bad_files(app_server: AppServer, browser_page, tmp_path) -> None:
    """Several files at once through the upload widget: the good pair becomes one study, the bad
    file gets its reason on the page, and no traceback is shown."""
    import numpy as np
    from PIL import Image

    from bonescan_core.phantom import make_study

    phantom = make_study(np.random.default_rng(5), metastatic=True, height=512, width=128)
    Image.fromarray(phantom.anterior).save(tmp_path / "upload_case_ANT.png")
    Image.fromarray(phantom.posterior).save(tmp_path / "upload_case_POST.png")
    (tmp_path / "notes.png").write_text("not an image")

    page = browser_page
    open_app(page, app_server, f"{SCANS}?reviewer=alice")
    page.get_by_test_id("stFileUploaderDropzoneInput").set_input_files(
        [str(tmp_path / name) for name in ("upload_case_ANT.png", "upload_case_POST.png", "notes.png")])
    wait_for_streamlit_idle(page)
    page.get_by_role("button", name="Import uploaded files").click()
    wait_for_streamlit_idle(page)
    expect(page.get_by_text("3 file(s): 2 imported, 1 rejected.")).to_be_visible(timeout=30_000)
    expect(page.get_by_test_id("stAlertContentError").get_by_text("notes.png: rejected: not an image")).to_be_visible()
    expect(page.get_by_test_id("stException")).to_have_count(0)


def test_every_malformed_file_is_rejected_on_the_page_with_its_reason(app_server: AppServer, browser_page, tmp_path) -> None:
    """The whole malformed-input corpus (tests/bad_corpus.py) through the upload widget at once:
    each file is named with its reason, nothing is imported, no traceback."""
    sys.path.insert(0, str(REPO / "tests"))
    from bad_corpus import make_bad_corpus

    from bonescan_core import db as dbm

    expected = make_bad_corpus(tmp_path / "bad")
    with dbm.opened(app_server.db_path) as db:
        images_before = db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
    page = browser_page
    open_app(page, app_server, SCANS)
    page.get_by_test_id("stFileUploaderDropzoneInput").set_input_files([str(tmp_path / "bad" / name) for name in expected])
    wait_for_streamlit_idle(page, timeout_s=60)
    page.get_by_role("button", name="Import uploaded files").click()
    wait_for_streamlit_idle(page, timeout_s=120)
    expect(page.get_by_text(f"{len(expected)} file(s): {len(expected)} rejected.")).to_be_visible(timeout=60_000)
    errors = page.get_by_test_id("stAlertContentError").all_inner_texts()
    shown = "\n".join(errors)
    missing = [name for name, reason in expected.items() if f"{name}: rejected" not in shown or reason not in shown]
    assert not missing, f"{len(missing)} of {len(expected)} files lack their message on the page: {missing}"
    expect(page.get_by_test_id("stException")).to_have_count(0)
    with dbm.opened(app_server.db_path) as db:
        assert db.execute("SELECT COUNT(*) FROM images").fetchone()[0] == images_before
