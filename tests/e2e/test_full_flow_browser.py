"""The whole workflow in a real browser, as a newcomer would click it: load the demo dataset,
label three studies with the keyboard, start a tiny training run on the Train page, wait for
the background worker to finish it, then see the confusion matrix and a Grad-CAM overlay on
the Evaluate page."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time

import pytest
from playwright.sync_api import expect

from bonescan_core import db as dbm
from bonescan_core import evaluation, jobs, runs
from bonescan_core import review as rv

from .conftest import AppServer, open_app, wait_for_streamlit_idle

pytestmark = pytest.mark.e2e

RUN_TIMEOUT_S = 900  # ResNet50 from scratch at 64x32 on 100 demo studies: about 1.5 minutes here, ~3x that on CI


@pytest.fixture
def stop_worker(app_server: AppServer):
    """The app starts a background worker of its own; end it with the test."""
    yield
    with dbm.opened(app_server.db_path) as db:
        row = db.execute("SELECT value FROM settings WHERE key = ?", [jobs.WORKER_KEY]).fetchone()
    if row:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(json.loads(row[0])["pid"], signal.SIGTERM)


def label_with_keyboard(page, criterion: str, key: str) -> None:
    page.get_by_role("checkbox", name=criterion).check(force=True)
    wait_for_streamlit_idle(page)
    page.get_by_role("heading", name="Review").click()  # focus the page, not a widget, so keys are shortcuts
    page.keyboard.press(key)
    wait_for_streamlit_idle(page)


def set_number(page, label: str, value: int) -> None:
    field = page.get_by_role("spinbutton", name=label, exact=True)
    field.fill(str(value))
    field.press("Tab")  # commits the value to the form


def test_demo_label_train_evaluate(app_server: AppServer, browser_page, stop_worker) -> None:
    page = browser_page

    # 1. Demo dataset, one click (100 studies with reference labels).
    open_app(page, app_server, "/")
    page.get_by_role("tab", name="Demo dataset").click()
    page.get_by_role("button", name="Load demo dataset").click()
    expect(page.get_by_test_id("stAlertContentSuccess")).to_contain_text("Added", timeout=300_000)
    wait_for_streamlit_idle(page)

    # 2. Three studies labelled with the keyboard (m: metastatic, n: no metastasis).
    open_app(page, app_server, "/review?reviewer=e2e")
    expect(page.get_by_text("Study 1 ·")).to_be_visible()
    label_with_keyboard(page, rv.CRITERIA["typical_pattern"][1], "m")
    expect(page.get_by_text("Study 2 ·")).to_be_visible()
    label_with_keyboard(page, rv.CRITERIA["no_abnormal_uptake"][1], "n")
    expect(page.get_by_text("Study 3 ·")).to_be_visible()
    label_with_keyboard(page, rv.CRITERIA["flare"][1], "m")
    expect(page.get_by_text("3 of 100 read by you")).to_be_visible()
    with dbm.opened(app_server.db_path) as db:
        mine = db.execute("SELECT study_id, label FROM reviews WHERE reviewer = 'e2e' ORDER BY study_id").fetchall()
    assert [tuple(row) for row in mine] == [(1, "metastatic"), (2, "non_metastatic"), (3, "metastatic")]

    # 3. A tiny run from the Train page: ResNet50 only, from scratch, 64x32, one epoch.
    open_app(page, app_server, "/train")
    backbones = page.get_by_role("combobox").first
    backbones.click()
    for _ in range(4):  # clear what the page pre-selects (online: the ImageNet backbones; offline: scintinet)
        backbones.press("Backspace")
    page.get_by_role("option", name="resnet50", exact=True).click()
    page.keyboard.press("Escape")
    page.get_by_test_id("stRadio").get_by_text("none", exact=True).click()
    page.get_by_test_id("stSelectbox").filter(has_text="Mode").click()
    page.get_by_role("option", name="full: every layer trains").click()
    set_number(page, "Epochs", 1)
    set_number(page, "Batch size", 8)
    set_number(page, "Input height", 64)
    set_number(page, "Input width", 32)
    page.get_by_role("button", name="Train").click()
    wait_for_streamlit_idle(page)
    expect(page.get_by_test_id("stAlertContentSuccess")).to_contain_text("(resnet50) queued")

    with dbm.opened(app_server.db_path) as db:
        listed = runs.list_runs(db)
    assert [(run.backbone, run.settings.mode, run.settings.weights, list(run.settings.image_size))
            for run in listed] == [("resnet50", "full", "none", [64, 32])]
    run_id = listed[0].id
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        with dbm.opened(app_server.db_path) as db:
            run = runs.get(db, run_id)
        if run.status not in jobs.ACTIVE or time.monotonic() > deadline:
            break
        time.sleep(2)
    worker_log = runs.run_folder(app_server.db_path) / "worker.log"
    assert run.status == "done", f"run {run_id}: {run.status} {run.error}\n{worker_log.read_text()[-3000:]}"
    expect(page.get_by_text(f"Run {run_id} · resnet50 · full · done")).to_be_visible(timeout=30_000)  # the live panel

    # 4. Evaluate: the confusion matrix, then a Grad-CAM overlay in the per-image explorer.
    open_app(page, app_server, "/evaluate")
    confusion = page.get_by_test_id("stPlotlyChart").first
    expect(confusion).to_contain_text("Confusion matrix", timeout=30_000)
    expect(confusion).to_contain_text("Predicted")
    page.get_by_role("tab", name="Per-image explorer").click()
    wait_for_streamlit_idle(page, timeout_s=120)
    # The image the model finds most suspicious: a one-epoch model's top-loss image may be a
    # confident miss whose map is empty (which machine's arithmetic decides), never this one.
    page.get_by_test_id("stRadio").filter(has_text="Sort").get_by_text("highest probability first").click()
    wait_for_streamlit_idle(page, timeout_s=120)
    with dbm.opened(app_server.db_path) as db:
        rows = evaluation.explorer_rows(db, run_id, 0.5)
    first = evaluation.filter_explorer_rows(rows, order="highest probability first")[0]
    expect(page.get_by_text(f"Study {first['study_id']} · image {first['image_id']}")).to_be_visible()
    expect(page.get_by_test_id("stAlertContentError")).to_have_count(0)
    expect(page.get_by_text("Grad-CAM opacity")).to_be_visible()
    overlay = page.get_by_test_id("stImage").locator("img").first
    overlay.scroll_into_view_if_needed()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=overlay.element_handle(), timeout=30_000)
    with dbm.opened(app_server.db_path) as db:  # the maps the page computed and stored for the study
        study_maps = [runs.cached_explanation(db, run_id, row["image_id"]) for row in rows
                      if row["study_id"] == first["study_id"]]
    assert study_maps and all(cached is not None for cached in study_maps), "the explorer stored no map of its study"
    if max(float(heat.max()) for heat, _ in study_maps) == 0:  # nothing to colour: the page must say so
        expect(page.get_by_text("the Grad-CAM map is empty")).to_be_visible()
        return
    # The scan itself is grey (R = G = B); the heatmap colours it. Count coloured pixels.
    coloured = overlay.evaluate("""img => {
        const canvas = document.createElement('canvas');
        canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
        const context = canvas.getContext('2d');
        context.drawImage(img, 0, 0);
        const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
        let count = 0;
        for (let i = 0; i < data.length; i += 4) {
            if (Math.abs(data[i] - data[i + 1]) > 30 || Math.abs(data[i + 1] - data[i + 2]) > 30) count++;
        }
        return count / (canvas.width * canvas.height);
    }""")
    assert coloured > 0.01, f"only {coloured:.2%} of the explorer image is coloured: no Grad-CAM overlay"
