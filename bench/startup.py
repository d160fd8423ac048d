"""Start-up benchmark: wall time of CLI commands and of the app's first page load, each from cold.

Prints one JSON line per measurement: median and max seconds over N runs (and every run).

* ``bonescan --help`` and ``bonescan --db DB studies --json`` (DB: a temp database with demo
  studies), each a fresh subprocess. Goal: < 1 s (``goal_s``; ``goal_met``).
* The app: ``streamlit run streamlit_app.py`` started afresh for every run on a free loopback
  port (``BONESCAN_DB`` = the same temp database, ``BONESCAN_AUTOSTART_WORKER=0``), then
  - ``server_ready``: from starting the process until ``/_stcore/health`` answers "ok";
  - ``page_title``: from ``page.goto('/')`` in headless Debian Chromium (Playwright,
    /usr/bin/chromium, launched once beforehand: its own start is not counted) until the
    Scans page's title is visible;
  - ``page_content``: ... until its "Studies (N)" heading is visible;
  - ``page_idle``: ... until the app is idle for good (``wait_until_idle`` of
    scripts/screenshot.py; its settle window is subtracted).
  The first script run of a fresh server imports the app's modules: that is part of a first page load.

    python bench/startup.py            # N = 5 runs of each
    python bench/startup.py --quick    # N = 3 (about a minute on 2 cores)

Timings, never assertions: nothing in the test suite checks them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from common import environment

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CLI_GOAL_S = 1.0
SETTLE_S = 0.5  # seconds of uninterrupted idleness that count as "idle" (then subtracted)


def emit(measure: str, times: list[float], **fields: object) -> None:
    print(json.dumps({"bench": "startup", "measure": measure, **fields, "runs": len(times),
                      "median_s": round(statistics.median(times), 3), "max_s": round(max(times), 3),
                      "runs_s": [round(t, 3) for t in times], **environment()}), flush=True)


def screenshot_script():
    """scripts/screenshot.py: Chromium's path and flags and the one definition of "Streamlit is idle"."""
    spec = importlib.util.spec_from_file_location("bonescan_screenshot", REPO / "scripts" / "screenshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_demo_db(folder: Path, n_studies: int) -> Path:
    from bonescan_core import db as dbm
    from bonescan_core.ingest import add_demo_studies

    path = folder / "labels.db"
    with dbm.opened(path) as db:
        add_demo_studies(db, n_studies, seed=0)
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path


# --- the CLI ---------------------------------------------------------------------------------------

def cli_command() -> list[str]:
    """The installed ``bonescan`` script of this interpreter (not a version manager's shim in front of it)."""
    beside = Path(sys.executable).with_name("bonescan")
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("bonescan")
    return [found] if found else [sys.executable, "-m", "bonescan_core"]


def time_command(command: list[str], runs: int, env: dict[str, str]) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
        times.append(time.perf_counter() - started)
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed with status {result.returncode}:\n{result.stderr}")
    return times


# --- the app ---------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
            return response.status == 200 and response.read().decode().strip() == "ok"
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def app_server(db_path: Path, log_path: Path, timeout_s: float = 120.0) -> Iterator[tuple[str, float]]:
    """A fresh ``streamlit run streamlit_app.py``; yields (url, seconds until its health endpoint said ok)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "streamlit", "run", "streamlit_app.py", "--server.port", str(port),
               "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    env = {**os.environ, "BONESCAN_DB": str(db_path), "BONESCAN_AUTOSTART_WORKER": "0", "PYTHONPATH": str(REPO)}
    with log_path.open("wb") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        while not healthy(url):
            if process.poll() is not None or time.perf_counter() - started > timeout_s:
                raise SystemExit(f"streamlit did not answer {url}/_stcore/health; its output:\n"
                                 f"{log_path.read_text(errors='replace')}")
            time.sleep(0.02)
        yield url, time.perf_counter() - started
    finally:
        # Its own process group: SIGTERM ends whatever Streamlit started too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)


def time_first_page(browser, screenshot, url: str, n_studies: int, timeout_s: float = 120.0) -> dict[str, float]:
    """Seconds from page.goto('/') until the Scans title, the studies heading, and lasting idleness."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        page = context.new_page()
        page.set_default_timeout(timeout_s * 1000)
        started = time.perf_counter()
        page.goto(f"{url}/", wait_until="domcontentloaded")
        page.get_by_role("heading", name="Scans", exact=True).wait_for(state="visible")
        title = time.perf_counter() - started
        page.get_by_role("heading", name=f"Studies ({n_studies})").wait_for(state="visible")
        content = time.perf_counter() - started
        screenshot.wait_until_idle(page, timeout_s, SETTLE_S)
        idle = time.perf_counter() - started - SETTLE_S
    finally:
        context.close()
    return {"page_title": title, "page_content": content, "page_idle": max(idle, content)}


def time_app(db_path: Path, folder: Path, runs: int, n_studies: int) -> tuple[dict[str, list[float]], str]:
    screenshot = screenshot_script()
    if not screenshot.CHROMIUM.exists():
        raise SystemExit("install Debian's chromium: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    times: dict[str, list[float]] = {"server_ready": [], "page_title": [], "page_content": [], "page_idle": []}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(screenshot.CHROMIUM), args=screenshot.CHROMIUM_ARGS,
                                             headless=True)
        try:
            for run in range(runs):
                with app_server(db_path, folder / f"streamlit-{run}.log") as (url, ready_s):
                    times["server_ready"].append(ready_s)
                    for name, seconds in time_first_page(browser, screenshot, url, n_studies).items():
                        times[name].append(seconds)
            version = browser.version
        finally:
            browser.close()
    return times, version


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 runs of each instead of 5")
    parser.add_argument("--runs", type=int, default=None, help="runs of each measurement (default 5, --quick 3)")
    parser.add_argument("--studies", type=int, default=20, help="demo studies in the temp database (default 20)")
    parser.add_argument("--skip-app", action="store_true", help="the CLI only")
    args = parser.parse_args()
    runs = args.runs or (3 if args.quick else 5)
    with tempfile.TemporaryDirectory(prefix="bonescan-bench-") as tmp:
        folder = Path(tmp)
        db_path = make_demo_db(folder, args.studies)
        cli = cli_command()
        # PYTHONPATH: this checkout's bonescan_core, whatever an editable install elsewhere points at.
        env = {**os.environ, "BONESCAN_AUTOSTART_WORKER": "0", "PYTHONPATH": str(REPO)}
        env.pop("BONESCAN_DB", None)
        for label, verb in (("bonescan --help", ["--help"]), ("bonescan studies --json", ["--db", str(db_path), "studies", "--json"])):
            times = time_command(cli + verb, runs, env)
            emit("cli", times, command=label, executable=cli[0], studies=args.studies, goal_s=CLI_GOAL_S,
                 goal_met=statistics.median(times) < CLI_GOAL_S)
        if args.skip_app:
            return
        times, chromium = time_app(db_path, folder, runs, args.studies)
        what = {"server_ready": "process start until /_stcore/health says ok",
                "page_title": "page.goto('/') until the Scans title is visible",
                "page_content": f"page.goto('/') until the 'Studies ({args.studies})' heading is visible",
                "page_idle": f"page.goto('/') until Streamlit is idle for good ({SETTLE_S} s settle subtracted)"}
        for name, values in times.items():
            emit(f"app_{name}", values, what=what[name], studies=args.studies, chromium=chromium, goal_s=None)


if __name__ == "__main__":
    main()
