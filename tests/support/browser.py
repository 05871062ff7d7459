"""Headless Chromium for the browser tests (issue 8), driven by Playwright for Python.

The browser is Debian's ``chromium`` at ``/usr/bin/chromium`` (``scripts/test``
installs it when run as root); Playwright never downloads a browser of its
own here (no ``playwright install``): every launch names ``CHROMIUM``.

``BrowserSession`` is one Chromium with a fresh, empty profile (a temporary
user-data directory) and one page. It records every console error and
uncaught page error, saves numbered screenshots under
``test-output/browser/`` at the repository root, and is blocking
(Playwright's sync API): a trial test runs it in a thread of its own
(``threads.deferToThread``), so the reactor stays free, and uses its objects
from that thread only.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from tests.support.processes import REPO

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    # This machine reaches no outside host: no update checks, sync or QUIC attempts.
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic",
]
SCREENSHOTS = REPO / "test-output" / "browser"


def unavailable() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    try:
        importlib.import_module("playwright.sync_api")
    except ImportError as e:
        return f"Playwright for Python is not installed ({e}); scripts/test installs it with the test extras"
    if not os.access(CHROMIUM, os.X_OK):
        return (f"no {CHROMIUM}: scripts/test installs Debian's chromium when run as root "
                "(or: apt-get install chromium)")
    return None


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


class BrowserSession:
    """One headless Chromium, a fresh profile, one page; screenshots named ``PREFIX-NN-STEP.png``."""

    def __init__(self, prefix: str, viewport: tuple[int, int] = (1024, 800)):
        self.prefix = slug(prefix)
        self.viewport = {"width": viewport[0], "height": viewport[1]}
        self.errors: list[str] = []   # console errors and uncaught exceptions, in order
        self.shots: list[Path] = []
        self._step = 0

    def __enter__(self) -> "BrowserSession":
        from playwright.sync_api import sync_playwright

        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for old in SCREENSHOTS.glob(f"{self.prefix}-*.png"):  # this test's shots from an earlier run
            old.unlink()
        self._profile = tempfile.mkdtemp(prefix="onion-chromium-")
        self._playwright = sync_playwright().start()
        try:
            self.context = self._playwright.chromium.launch_persistent_context(
                self._profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                viewport=self.viewport, accept_downloads=True, service_workers="block")
        except BaseException:
            self._playwright.stop()
            shutil.rmtree(self._profile, ignore_errors=True)
            raise
        self.page = self.context.pages[0] if self.context.pages else self.context.new_page()
        self.page.on("console", self._on_console)
        self.page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))
        self.page.on("crash", lambda _: self.errors.append("the page crashed"))
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.context.close()
        finally:
            self._playwright.stop()
            shutil.rmtree(self._profile, ignore_errors=True)

    def _on_console(self, message) -> None:
        if message.type == "error":
            where = message.location or {}
            self.errors.append(f"console error: {message.text} ({where.get('url', '?')}:{where.get('lineNumber', '?')})")

    # --- helpers ---------------------------------------------------------------------------

    def shot(self, step: str) -> Path:
        """A full-page screenshot of the current state: ``test-output/browser/PREFIX-NN-STEP.png``."""
        self._step += 1
        path = SCREENSHOTS / f"{self.prefix}-{self._step:02d}-{slug(step)}.png"
        self.page.screenshot(path=str(path), full_page=True)
        self.shots.append(path)
        return path

    def prove_error_capture(self) -> None:
        """Show that a console error and an uncaught exception would be seen, then forget both:
        "no error" below then means none happened, not that nothing listened."""
        with self.page.expect_console_message(lambda m: m.type == "error" and "onion-probe" in m.text):
            self.page.evaluate("console.error('onion-probe: console')")
        with self.page.expect_event("pageerror", lambda e: "onion-probe" in str(e)):
            self.page.evaluate("setTimeout(function () { throw new Error('onion-probe: uncaught'); }, 0)")
        probes = [e for e in self.errors if "onion-probe" in e]
        if len(probes) != 2:
            raise AssertionError(f"the error listeners saw {probes!r}, not the two probes")
        self.errors = [e for e in self.errors if "onion-probe" not in e]

    def scroll_width(self) -> int:
        return self.page.evaluate("document.scrollingElement.scrollWidth")
