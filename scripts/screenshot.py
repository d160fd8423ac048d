"""Screenshot a page (e.g. the running app) with Debian's headless Chromium, for the docs.

    python scripts/screenshot.py http://127.0.0.1:8501/scans docs/scans-page.png \\
        --width 1400 --height 1800 --click "Demo dataset" --wait-text "Studies (" --full-page

Clicks happen in order; each names a button, a tab, or else any text on the page. On a
Streamlit page the script waits for every rerun to finish (and for the app to settle) before
clicking and before the shot. Same browser settings as the e2e tests (tests/e2e/conftest.py).
Exit status: 0 written; 1 the page did not get there (message on stderr); 2 usage error.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
# Keep in step with tests/e2e/conftest.py (root, offline: no sandbox, no background traffic).
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

_APP_STATE_JS = """() => {
    const app = document.querySelector('[data-testid="stApp"]');
    if (!app) return 'not-streamlit';
    const connection = app.getAttribute('data-test-connection-state');
    if (connection && connection !== 'CONNECTED') return 'connection:' + connection;
    const widget = document.querySelector('[data-testid="stStatusWidget"]');
    if (widget && /running/i.test(widget.innerText + (widget.querySelector('[aria-label]')
            ?.getAttribute('aria-label') ?? ''))) return 'status-widget-running';
    return app.getAttribute('data-test-script-state') || 'no-state';
}"""


def wait_until_idle(page, timeout_s: float, settle_s: float) -> None:
    """Streamlit: no rerun in progress for ``settle_s`` in a row; other pages: just ``settle_s``."""
    deadline = time.monotonic() + timeout_s
    idle_since = None
    state = "unknown"
    while time.monotonic() < deadline:
        state = page.evaluate(_APP_STATE_JS)
        now = time.monotonic()
        if state in ("notRunning", "not-streamlit"):
            idle_since = idle_since or now
            if now - idle_since >= settle_s:
                return
        else:
            idle_since = None
        time.sleep(0.05)
    raise TimeoutError(f"the page was still busy after {timeout_s:.0f} s (state: {state})")


_CONTENT_HEIGHT_JS = """() => {
    // Streamlit scrolls inside a container (stMain), not the document, so a "full page" shot of
    // the document is just the viewport: measure the page-sized scrolling boxes instead (not the
    // small ones inside, like a dataframe's own scroller).
    let height = document.scrollingElement ? document.scrollingElement.scrollHeight : 0;
    for (const el of document.querySelectorAll('*')) {
        const overflow = getComputedStyle(el).overflowY;
        if ((overflow === 'auto' || overflow === 'scroll') && el.scrollHeight > el.clientHeight
                && el.clientHeight >= 0.6 * window.innerHeight) {
            height = Math.max(height, el.scrollHeight + el.getBoundingClientRect().top);
        }
    }
    return Math.ceil(height);
}"""


def grow_to_content(page, width: int, max_height: int = 16_000) -> None:
    """Make the viewport as tall as the content (for --full-page on apps that scroll a container)."""
    height = min(max_height, page.evaluate(_CONTENT_HEIGHT_JS))
    if height > page.viewport_size["height"]:
        page.set_viewport_size({"width": width, "height": height})


def click(page, text: str, timeout_ms: float) -> None:
    """Click a button, else a tab, else any element whose text is ``text``."""
    for locator in (page.get_by_role("button", name=text, exact=True), page.get_by_role("tab", name=text, exact=True)):
        if locator.count():
            locator.first.click(timeout=timeout_ms)
            return
    page.get_by_text(text, exact=True).first.click(timeout=timeout_ms)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Screenshot URL into OUT.png with headless /usr/bin/chromium.")
    parser.add_argument("url")
    parser.add_argument("out", type=Path, metavar="OUT.png")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--click", action="append", default=[], metavar="TEXT",
                        help="click this button/tab/text before the shot (repeatable, in order)")
    parser.add_argument("--wait-text", metavar="TEXT", help="wait until this text is visible before the shot")
    parser.add_argument("--full-page", action="store_true", help="the whole scrollable page, not just the viewport")
    parser.add_argument("--settle", type=float, default=1.5,
                        help="seconds without a rerun before each step and the shot (lets images paint; default 1.5)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds allowed per step (default 60)")
    args = parser.parse_args(argv)
    if not CHROMIUM.exists():
        print("install Debian's chromium: apt-get install chromium", file=sys.stderr)
        return 2

    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    timeout_ms = args.timeout * 1000
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": args.width, "height": args.height})
                page.goto(args.url, wait_until="load", timeout=timeout_ms)
                wait_until_idle(page, args.timeout, args.settle)
                for text in args.click:
                    click(page, text, timeout_ms)
                    wait_until_idle(page, args.timeout, args.settle)
                if args.wait_text:
                    page.get_by_text(args.wait_text).first.wait_for(state="visible", timeout=timeout_ms)
                    wait_until_idle(page, args.timeout, args.settle)
                page.evaluate("window.scrollTo(0, 0)")
                if args.full_page:
                    grow_to_content(page, args.width)
                    wait_until_idle(page, args.timeout, args.settle)  # a resize may rerun/relayout
                args.out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out), full_page=args.full_page, timeout=timeout_ms)
                size = page.evaluate("() => ({width: document.documentElement.scrollWidth,"
                                     " height: Math.max(document.documentElement.scrollHeight, window.innerHeight)})")
            finally:
                browser.close()
    except (PlaywrightError, TimeoutError) as error:
        print(f"screenshot of {args.url} failed: {error}", file=sys.stderr)
        return 1
    print(f"{args.out}: {size['width']}x{size['height']} of {args.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
