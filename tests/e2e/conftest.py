"""Real-browser fixtures: a Streamlit server on a temp database, and a Debian Chromium page.

Fixtures (reusable by every e2e module):

``app_server``
    Module scope: one ``streamlit run streamlit_app.py`` per test module, on a free loopback
    port, with ``$BONESCAN_DB`` pointing at a fresh temp database. Starting Streamlit takes a
    few seconds, so tests in one module share the server *and its database*; put tests that
    need an empty database in a module of their own, or start a private server with
    ``start_app_server(tmp_dir)`` (a context manager) inside a function-scoped fixture.
    Yields an ``AppServer`` with ``.url`` (no trailing slash), ``.db_path``, ``.port``,
    ``.log_path``.

``chromium``
    Session scope: one headless ``/usr/bin/chromium`` (never Playwright's own download).
    Fails, not skips, when Debian's chromium is missing.

``browser_page``
    Function scope: a fresh browser context (own cookies, own Streamlit session) and page,
    viewport 1400x1000. On a failing test, a full-page screenshot is saved to
    ``test-artifacts/<test name>.png`` before the page is closed.

Helpers: ``wait_for_streamlit_idle(page)`` after anything that triggers a rerun, and
``open_app(page, server, path)`` to load a page and wait for its first run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_MISSING = "install Debian's chromium: apt-get install chromium"


def _load_screenshot_script():
    """scripts/screenshot.py: the one place that says how Chromium is launched (the docs shots too)."""
    spec = importlib.util.spec_from_file_location("bonescan_screenshot", REPO / "scripts" / "screenshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


screenshot_script = _load_screenshot_script()
CHROMIUM = screenshot_script.CHROMIUM  # /usr/bin/chromium, never Playwright's download
CHROMIUM_ARGS = screenshot_script.CHROMIUM_ARGS  # --headless=new --no-sandbox ... (root, offline)
VIEWPORT = {"width": 1400, "height": 1000}
SERVER_START_TIMEOUT_S = 180.0


# --------------------------------------------------------------------------- server


@dataclass(frozen=True)
class AppServer:
    """A running ``streamlit run streamlit_app.py``."""

    url: str  # http://127.0.0.1:PORT (no trailing slash)
    port: int
    db_path: Path  # what $BONESCAN_DB points at (created by the app on first use)
    log_path: Path  # the server's stdout + stderr

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
            return response.status == 200 and response.read().decode().strip() == "ok"
    except (urllib.error.URLError, OSError):
        return False


def _stop(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the server's process group, then SIGKILL it if it lingers."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=grace_s)


@contextlib.contextmanager
def start_app_server(workdir: Path, timeout_s: float = SERVER_START_TIMEOUT_S, env: dict[str, str] | None = None
                     ) -> Iterator[AppServer]:
    """Start the app on a free port with ``$BONESCAN_DB=workdir/labels.db``; stop it on exit.

    Fails the test (with the server's output) when ``/_stcore/health`` does not say "ok" within
    ``timeout_s`` or the server exits early.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    db_path = workdir / "labels.db"
    log_path = workdir / "streamlit.log"
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable, "-m", "streamlit", "run", "streamlit_app.py",
        "--server.port", str(port),
        "--server.address", "127.0.0.1",
        "--server.headless", "true",
        "--browser.gatherUsageStats", "false",
    ]
    process_env = {**os.environ, "BONESCAN_DB": str(db_path), "PYTHONPATH": str(REPO), **(env or {})}
    with log_path.open("wb") as log:
        # Own session = own process group, so teardown also ends anything Streamlit spawned.
        process = subprocess.Popen(command, cwd=REPO, env=process_env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    server = AppServer(url=url, port=port, db_path=db_path, log_path=log_path)
    try:
        started = time.monotonic()
        while not _healthy(url):
            if process.poll() is not None:
                pytest.fail(f"streamlit exited with status {process.returncode} before answering "
                            f"{url}/_stcore/health; its output:\n{server.log()}", pytrace=False)
            if time.monotonic() - started > timeout_s:
                pytest.fail(f"streamlit did not answer {url}/_stcore/health with 'ok' within {timeout_s:g} s; "
                            f"its output:\n{server.log()}", pytrace=False)
            time.sleep(0.2)
        yield server
    finally:
        _stop(process)


@pytest.fixture(scope="module")
def app_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    """One app server per test module, on a fresh temp database (see the module docstring)."""
    with start_app_server(tmp_path_factory.mktemp("app_server")) as server:
        yield server


# --------------------------------------------------------------------------- browser


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Keep each phase's report on the item (``item.rep_setup``, ``rep_call``, ``rep_teardown``)."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture(scope="session")
def chromium():
    """Debian's Chromium, headless, shared by the whole session (contexts isolate the tests)."""
    if not CHROMIUM.exists():  # before importing playwright: the message matters most
        pytest.fail(CHROMIUM_MISSING, pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def artifact_name(node_name: str) -> str:
    """``test_x[a/b]`` -> ``test_x_a_b_`` (safe as a file name)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", node_name)


@pytest.fixture
def browser_page(request: pytest.FixtureRequest, app_server: AppServer, chromium):
    """A new page (own context, 1400x1000) on the app; screenshot to test-artifacts/ on failure."""
    from playwright.sync_api import expect

    # Upper bounds only (a passing step never waits them out): a busy CI machine runs several
    # times slower than a quiet one, past Playwright's 5 s default for an assertion.
    expect.set_options(timeout=30_000)
    context = chromium.new_context(viewport=VIEWPORT, base_url=app_server.url)
    context.set_default_timeout(30_000)
    page = context.new_page()
    try:
        yield page
    finally:
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            ARTIFACTS.mkdir(exist_ok=True)
            target = ARTIFACTS / f"{artifact_name(request.node.name)}.png"
            try:
                # Streamlit scrolls a container, not the document: grow the viewport to the content first.
                screenshot_script.grow_to_content(page, VIEWPORT["width"])
                page.screenshot(path=str(target), full_page=True, timeout=10_000)
                sys.stderr.write(f"\nscreenshot of the failing page: {target}\n")
            except Exception as error:  # a dead page must not hide the test's own failure
                sys.stderr.write(f"\ncould not save a screenshot to {target}: {error}\n")
        context.close()


# --------------------------------------------------------------------------- helpers


# Generous: a first Train page load decodes every image once for the near-duplicate check (about
# 10-16 s for 200 images on a loaded 2-core machine); a tolerance, not a timing assertion.
IDLE_TIMEOUT_S = 180.0  # an upper bound (see browser_page)


def wait_for_streamlit_idle(page, timeout_s: float = IDLE_TIMEOUT_S, settle_s: float = 0.4) -> None:
    """Wait until the app is connected and no script run is in progress, steadily for ``settle_s``.

    Streamlit reruns are asynchronous: a click only *requests* a rerun, so right after it the app may
    still look idle. This waits for ``stApp``'s ``data-test-script-state`` to read ``notRunning`` (and
    the "Running..." status widget to be gone) continuously for ``settle_s`` seconds, which covers the
    gap between a click and the start of its rerun as well as the rerun itself.
    """
    try:
        screenshot_script.wait_until_idle(page, timeout_s, settle_s)  # one definition of "idle" for docs and tests
    except TimeoutError as error:
        raise AssertionError(f"the app did not finish its rerun: {error}") from error


def open_app(page, server: AppServer, path: str = "/", timeout_s: float = IDLE_TIMEOUT_S) -> None:
    """Load ``server.url + path`` and wait for the first script run to finish."""
    page.goto(f"{server.url}{path}", wait_until="domcontentloaded")
    page.locator('[data-testid="stApp"]').wait_for(state="attached", timeout=timeout_s * 1000)
    wait_for_streamlit_idle(page, timeout_s=timeout_s)
