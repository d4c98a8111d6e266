"""The published pages with static sliders in headless Chromium, with the network blocked.

Serves the quick build on 127.0.0.1, aborts every request that leaves
loopback, drags the static slider and checks that the plotted data changes,
that nothing tried to leave loopback and that the page raised no JavaScript
error. Skips (visibly) where Debian's Chromium is not installed, unless env
NESTED_LAB_REQUIRE_BROWSER=1.
"""

from __future__ import annotations

import functools
import os
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import pytest

pytestmark = [pytest.mark.book, pytest.mark.browser]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
LOOPBACK = {"127.0.0.1", "localhost", "[::1]", "::1"}
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SLIDER_PAGES = ["notebooks/00_reading_this_book.html", "notebooks/01_meta_loss_collapse.html",
                "notebooks/02_cortexgpt_instability.html", "notebooks/04_titan_self_modification.html",
                "notebooks/05_nested_optimizers.html", "notebooks/06_stability_plasticity.html"]


def _require_chromium() -> None:
    if os.path.exists(CHROMIUM):
        return
    if os.environ.get("NESTED_LAB_REQUIRE_BROWSER") == "1":
        pytest.fail(f"NESTED_LAB_REQUIRE_BROWSER=1 but no Chromium at {CHROMIUM} (apt-get install chromium)")
    pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's chromium to run the browser test")


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def site(quick_book):
    handler = functools.partial(_QuietHandler, directory=str(quick_book.html))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser():
    _require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _open(browser, url: str):
    """A page at ``url`` whose requests off loopback are aborted and recorded."""
    page = browser.new_page()
    left_loopback, js_errors = [], []

    def guard(route) -> None:
        host = urlparse(route.request.url).hostname or ""
        if route.request.url.startswith(("data:", "blob:")) or host in LOOPBACK:
            route.continue_()
        else:
            left_loopback.append(route.request.url)
            route.abort()

    page.route("**/*", guard)
    page.on("pageerror", lambda error: js_errors.append(str(error)))
    page.goto(url, wait_until="load")
    return page, left_loopback, js_errors


def _plotted_y(page) -> list:
    return page.evaluate(
        "() => document.querySelector('.nested-lab-static-slider .plotly-graph-div').data"
        ".map(trace => Array.from(trace.y))"
    )


@pytest.mark.parametrize("path", SLIDER_PAGES)
def test_static_slider_works_offline(browser, site, path):
    page, left_loopback, js_errors = _open(browser, f"{site}/{path}")
    page.wait_for_selector(".nested-lab-static-slider .slider-rail-rect", timeout=15_000)
    before = _plotted_y(page)
    page.locator(".nested-lab-static-slider .slider-rail-rect").first.scroll_into_view_if_needed()
    rail = page.locator(".nested-lab-static-slider .slider-rail-rect").first.bounding_box()
    grip = page.locator(".nested-lab-static-slider .slider-grip-rect").first.bounding_box()
    page.mouse.move(grip["x"] + grip["width"] / 2, grip["y"] + grip["height"] / 2)
    page.mouse.down()
    page.mouse.move(rail["x"] + rail["width"] * 0.95, rail["y"] + rail["height"] / 2, steps=10)
    page.mouse.up()
    page.wait_for_timeout(300)
    after = _plotted_y(page)
    page.close()
    assert after != before, "moving the slider did not change the plotted data"
    assert not left_loopback, f"requests left loopback: {left_loopback}"
    assert not js_errors, f"JavaScript errors: {js_errors}"


@pytest.mark.parametrize("path", ["book/intro.html", "book/ledger.html", "notebooks/03_cortexgpt_stabilized.html"])
def test_text_pages_raise_no_javascript_error(browser, site, path):
    page, left_loopback, js_errors = _open(browser, f"{site}/{path}")
    page.wait_for_timeout(300)
    page.close()
    assert not left_loopback, f"requests left loopback: {left_loopback}"
    assert not js_errors, f"JavaScript errors: {js_errors}"
