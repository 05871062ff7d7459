"""The peer's page in a real browser (issue 8): headless Chromium, driven by Playwright.

Each test starts its own whole network with ``LocalNetwork`` (what
``./scripts/demo`` runs: tracker, six nodes, alice and bob as ``twistd``
processes) on a random ``127.R1.R2.x`` base, with small files, and its own
Chromium with a fresh profile (``tests.support.browser``), so each runs
alone and in any order. Every test opens alice's page as a person would and:

* the typed name: types the name of bob's binary into the input, presses
  Download, watches the progress bar reach 100 % (never going back), then
  follows the finished file's link and compares the SHA-256 of what the link
  serves with bob's copy on disk;
* the catalogue: clicks an entry's Download button; the page asks for that
  file with the catalogue's hash, and the download completes; alice's own
  files are marked "shared by you", with no button, and a click on them asks
  for nothing; the downloaded file then shows in alice's shared list marked
  "seeding (downloaded)" (seed_downloads), her own file not;
* the narrow screen: at 375 px wide nothing overflows sideways and the input
  and button are on screen and clickable; an empty name, a name nobody shares
  (a clear message shows) and a long name without a break are typed and sent;
  the failed download's Retry (it fails again) and Dismiss (it leaves the
  list) are on screen and work.

The page's title and heading name alice and her address.

In every test: no console error nor uncaught exception over the whole
session (the listeners are first shown to catch both), and every form
control has an accessible name (the input by its <label>). Screenshots of
each step go to ``test-output/browser/`` at the repository root.

Without Playwright or ``/usr/bin/chromium`` the tests skip and say why;
under CI (``CI`` set) they fail instead: there ``scripts/test`` installs both.
Nothing sleeps to wait: the network starts and stops in a thread, and the
browser waits with Playwright's own deadlines.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from urllib.parse import quote

from twisted.internet import threads
from twisted.trial import unittest

from onion_twisted.ops.localnet import SAMPLES, LocalNetwork
from tests.support import browser
from tests.support.processes import PORT, allocate_prefix, sha256_file, tail_files

TRACKER_HOST, ALICE_HOST, BOB_HOST = 10, 21, 22
NODES = 6
ALL_HOSTS = (TRACKER_HOST, *range(TRACKER_HOST + 1, TRACKER_HOST + 1 + NODES), ALICE_HOST, BOB_HOST)
BIG_MIB = 2
BIG_NAME = f"big-{BIG_MIB}MiB.bin"                  # bob's binary (LocalNetwork.make_samples)
CLICKED_NAME = "poem.txt"                           # one of bob's SAMPLES
OWN_NAME = "recipes.txt"                            # one of alice's SAMPLES
LONG_NAME = "an_unusually_long_file_name_without_any_space_or_hyphen_anywhere_in_it.txt"
UNKNOWN_NAME = "nobody-shares-this-file.txt"
NARROW = (375, 740)
START_TIMEOUT = 45         # seconds for the network to come up
READY_MS = 25_000          # the page connected and bob's files in its catalogue
TRANSFER_MS = 30_000       # one download, from the click to "done"
assert CLICKED_NAME in SAMPLES["bob"] and OWN_NAME in SAMPLES["alice"]


def css_string(text: str) -> str:
    """``text`` as a quoted CSS string (for an attribute selector)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# Records each download's percent as the page shows it, change by change.
WATCH_PROGRESS = """() => {
  const list = document.getElementById("downloads-list");
  const seen = window.__onionProgress = {};
  const record = () => {
    for (const li of list.children) {
      const text = li.querySelector(".percent").textContent;
      const values = seen[li.dataset.key] || (seen[li.dataset.key] = []);
      if (text && values[values.length - 1] !== text) { values.push(text); }
    }
  };
  new MutationObserver(record).observe(list, {subtree: true, childList: true, characterData: true});
  record();
}"""

# Every form control, and whether it is shown.
CONTROLS = "input, select, textarea, button, progress, [role=button], [role=textbox], [contenteditable]"


class BrowserTests(unittest.TestCase):
    timeout = 120  # trial's limit; the test's own deadlines are shorter

    def setUp(self):
        why = browser.unavailable()
        if why is not None:
            if os.environ.get("CI"):
                self.fail(f"the browser tests cannot run in CI: {why}")
            raise unittest.SkipTest(why)
        self.prefix = allocate_prefix(ALL_HOSTS, PORT)
        self.run_dir = Path(self.mktemp()).resolve()
        self.net = LocalNetwork(self.run_dir, base=f"{self.prefix}.{TRACKER_HOST}", port=PORT, nodes=NODES,
                                big_mib=BIG_MIB, key_bits=1024)
        self.assertEqual(self.net.peer_ips["alice"], f"{self.prefix}.{ALICE_HOST}")
        self.bob_share = self.run_dir / "bob" / "share"
        self.bob_share.mkdir(parents=True)
        (self.bob_share / LONG_NAME).write_text("A file with a long name.\n" * 10)
        self.addCleanup(lambda: threads.deferToThread(self.net.stop))
        self.started = time.monotonic()
        return threads.deferToThread(self.net.start, START_TIMEOUT).addErrback(self._not_started)

    def _not_started(self, failure):
        failure.trap(RuntimeError)
        raise self.failureException(f"the network did not start: {failure.value}\n"
                                    f"{self.tails('tracker', 'node1', 'alice', 'bob')}")

    def tails(self, *names: str, lines: int = 20) -> str:
        return tail_files({f"{name}/{file}": self.run_dir / name / file
                           for name in names for file in (f"{name}.log", "stderr.log")}, lines)

    # --- the browser, in a thread of its own ---------------------------------------------------

    def in_browser(self, scenario, viewport=(1024, 800)):
        """Run ``scenario(session)`` in a new Chromium on alice's page, in a thread; a Deferred."""
        up = time.monotonic() - self.started

        def run():
            began = time.monotonic()
            with browser.BrowserSession(self._testMethodName.removeprefix("test_"), viewport) as b:
                try:
                    self.open_page(b)
                    scenario(b)
                    self.assert_labelled(b.page)
                    self.assertEqual(b.errors, [], "the page logged errors")
                except Exception as e:
                    try:
                        b.shot("failure")
                        said = b.page.locator("#form-message").text_content(timeout=1000)
                    except Exception:  # noqa: BLE001 - the page may be gone: report the first failure
                        said = "?"
                    raise self.failureException(
                        f"{e}\n(the page's message: {said!r}; errors: {b.errors}; screenshots in "
                        f"{browser.SCREENSHOTS})\n{self.tails('alice', 'bob')}") from None
            print(f"\n{self._testMethodName}: network up in {up:.1f} s, browser part {time.monotonic() - began:.1f} s, "
                  f"{len(b.shots)} screenshots in {browser.SCREENSHOTS}", file=sys.stderr)
        return threads.deferToThread(run)

    def open_page(self, b: browser.BrowserSession) -> None:
        from playwright.sync_api import expect

        page = b.page
        response = page.goto(self.net.page("alice"))
        self.assertEqual(response.status, 200)
        where = f"onion_twisted peer at {self.net.peer_ips['alice']}:{PORT}"
        self.assertEqual(page.title(), f"alice · {where}")
        expect(page.get_by_role("heading", level=1)).to_have_text(f"alice {where}")
        b.prove_error_capture()
        expect(page.locator("#connection")).to_have_text("Connected to the peer.", timeout=READY_MS)
        for name in (BIG_NAME, CLICKED_NAME, LONG_NAME):  # bob's files, as his announcement made them
            expect(self.catalogue_row(page, name)).to_be_visible(timeout=READY_MS)
        expect(page.locator("#circuit-state")).to_have_text("connected")
        page.evaluate(WATCH_PROGRESS)
        b.shot("page")

    @staticmethod
    def catalogue_row(page, name: str):
        return page.locator(f"#catalogue-body tr[data-name={css_string(name)}]")

    @staticmethod
    def download_item(page, name: str):
        return page.locator(f"#downloads-list > li[data-key={css_string(name)}]")

    def form_parts(self, page):
        """The file input, found by its label as a person reads it, and the form's button."""
        return page.get_by_label("File name", exact=True), page.get_by_role("button", name="Download", exact=True)

    def wait_done(self, page, name: str):
        """Until ``name``'s download shows done, its bar full at 100 %; its list item."""
        from playwright.sync_api import expect

        item = self.download_item(page, name)
        expect(item).to_be_visible(timeout=TRANSFER_MS)
        expect(item.locator(".state")).to_have_text(re.compile(r"^(done|failed)$"), timeout=TRANSFER_MS)
        self.assertEqual(item.locator(".state").text_content(), "done",
                         f"the download of {name} failed: {item.locator('.error').text_content()!r}")
        expect(item.locator(".percent")).to_have_text("100%")
        expect(item.locator("progress")).to_have_js_property("value", 1)
        expect(item.locator("progress")).to_have_js_property("max", 1)
        expect(page.locator("#form-message")).to_have_text(f"{name} is downloaded and verified.")
        seen = page.evaluate("name => window.__onionProgress[name] || []", name)
        percents = [int(p.rstrip("%")) for p in seen]
        self.assertEqual(percents[-1:], [100], f"the bar showed {seen}")
        self.assertEqual(percents, sorted(percents), f"the bar went back: {seen}")
        return item

    def save_and_hash(self, b: browser.BrowserSession, item, name: str) -> str:
        """Follow the finished file's link as a person would (a download); the SHA-256 of what it served."""
        from playwright.sync_api import expect

        link = item.get_by_role("link", name=f"Save {name}", exact=True)
        expect(link).to_be_visible()
        self.assertEqual(link.get_attribute("href"), "/files/" + quote(name, safe="!~*'()"))  # encodeURIComponent
        with b.page.expect_download(timeout=TRANSFER_MS) as info:
            link.click()
        download = info.value
        self.assertEqual(download.suggested_filename, name)
        self.assertIsNone(download.failure())
        return sha256_file(download.path())

    def assert_labelled(self, page) -> None:
        """Every shown form control has an accessible name; the input's is its <label>'s text."""
        from playwright.sync_api import expect

        expect(page.get_by_label("File name", exact=True)).to_have_id("file-input")
        controls = page.locator(CONTROLS)

        def layout():  # which controls are shown, in order: a locator's nth() re-resolves
            return [c.is_visible() for c in controls.all()]

        for attempt in range(3):
            before = layout()
            shown = [c for c, visible in zip(controls.all(), before) if visible]
            # the input, the form's button, and the catalogue's buttons at least: not a vacuous check
            self.assertGreaterEqual(len(shown), 5, "too few controls found to check")
            try:
                for control in shown:
                    what = control.evaluate("e => e.outerHTML.slice(0, 120)")
                    expect(control, f"no accessible name: {what}").to_have_accessible_name(re.compile(r"\S"))
                return
            except AssertionError:
                # The page re-rendered under the check (a row's button hides once its
                # file is downloaded), so nth(i) is another control now: check again.
                if attempt == 2 or layout() == before:
                    raise

    def assert_fits(self, page, width: int, *wanted) -> None:
        """No sideways scrolling at ``width``, and each of ``wanted`` wholly on screen and clickable."""
        self.assertLessEqual(page.evaluate("document.scrollingElement.scrollWidth"), width,
                             "the page scrolls sideways")
        for locator in wanted:
            box = locator.bounding_box()
            self.assertIsNotNone(box, f"{locator} is not shown")
            self.assertGreaterEqual(box["x"], 0, f"{locator} starts left of the screen: {box}")
            self.assertLessEqual(box["x"] + box["width"], width, f"{locator} ends right of the screen: {box}")
            locator.click(trial=True, timeout=5000)  # visible, enabled, not covered: a click would land

    # --- the tests -------------------------------------------------------------------------------

    def test_typed_name_downloads_and_the_link_serves_bobs_bytes(self):
        bob_sha = sha256_file(self.bob_share / BIG_NAME)

        def scenario(b):
            file_input, button = self.form_parts(b.page)
            file_input.click()
            file_input.press_sequentially(BIG_NAME)
            b.shot("typed")
            button.click()
            item = self.wait_done(b.page, BIG_NAME)
            # The page says what the network could see of it (§13): here, nothing of its bytes.
            from playwright.sync_api import expect
            expect(item.locator(".privacy")).to_have_text(
                "end-to-end encrypted; every chunk checked against the file's root before it was written")
            b.shot("done")
            self.assertEqual(self.save_and_hash(b, self.download_item(b.page, BIG_NAME), BIG_NAME), bob_sha,
                             "what the link served is not bob's file")
            b.shot("saved")
        return self.in_browser(scenario)

    def test_catalogue_click_starts_and_completes_a_download(self):
        bob_sha = sha256_file(self.bob_share / CLICKED_NAME)

        def scenario(b):
            from playwright.sync_api import expect

            page = b.page
            row = self.catalogue_row(page, CLICKED_NAME)
            expect(row.locator(".name")).to_have_text(CLICKED_NAME)
            expect(self.download_item(page, CLICKED_NAME)).to_have_count(0)
            with page.expect_request(lambda r: r.method == "POST" and r.url.endswith("/api/downloads")) as asked:
                row.get_by_role("button", name=f"Download {CLICKED_NAME}", exact=True).click()
            request = asked.value
            # The click asked for that entry, by the hash the catalogue lists.
            self.assertEqual(request.post_data_json, {"file": CLICKED_NAME, "sha256": bob_sha})
            self.assertEqual(request.response().status, 202)
            expect(page.locator("#form-message")).to_have_text(
                re.compile(rf"^(Downloading {re.escape(CLICKED_NAME)}…|{re.escape(CLICKED_NAME)} is downloaded and verified\.)$"))
            b.shot("clicked")
            item = self.wait_done(page, CLICKED_NAME)
            b.shot("done")
            self.assertEqual(self.save_and_hash(b, item, CLICKED_NAME), bob_sha)

            # Alice's own file: listed, marked as hers, nothing to click.
            own = self.catalogue_row(page, OWN_NAME)
            expect(own.locator(".yours")).to_have_text("shared by you", timeout=READY_MS)
            expect(own.get_by_role("button")).to_have_count(0)
            asked = []
            page.on("request", lambda r: asked.append(r.url) if r.method == "POST" else None)
            own.locator(".name").click()
            # The page would say "Asking for ..." at once (startDownload) had the click asked.
            expect(page.locator("#form-message")).not_to_contain_text(OWN_NAME)
            self.assertEqual(asked, [], "a click on alice's own file asked for it")
            expect(self.download_item(page, OWN_NAME)).to_have_count(0)
            b.shot("own file")

            # Seeding: the verified download is shared on from alice's downloads folder, and
            # marked so (within a rescan_interval); her own shared file is not.
            seeded = page.locator("#shared-body tr", has=page.locator(".file-name", has_text=CLICKED_NAME))
            expect(seeded.locator(".seeding")).to_be_visible(timeout=READY_MS)
            expect(seeded.locator(".seeding")).to_have_text("seeding (downloaded)")
            own_shared = page.locator("#shared-body tr", has=page.locator(".file-name", has_text=OWN_NAME))
            expect(own_shared).to_have_count(1)
            expect(own_shared.locator(".seeding")).to_be_hidden()
            b.shot("seeding")
        return self.in_browser(scenario)

    def test_narrow_screen_unknown_name_and_a_long_one(self):
        width = NARROW[0]

        def scenario(b):
            from playwright.sync_api import expect

            page = b.page
            self.assertEqual(page.evaluate("window.innerWidth"), width)
            file_input, button = self.form_parts(page)
            self.assert_fits(page, width, file_input, button)
            for name in (BIG_NAME, LONG_NAME):  # the catalogue's buttons are on screen, long names wrap
                self.assert_fits(page, width, self.catalogue_row(page, name).get_by_role("button"))

            button.click()  # nothing typed yet
            expect(page.locator("#form-message")).to_have_text("Type the name of a file first.")
            expect(file_input).to_be_focused()

            file_input.press_sequentially(UNKNOWN_NAME)
            b.shot("unknown typed")
            file_input.press("Enter")
            message = page.locator("#form-message")
            expect(message).to_have_text(f"{UNKNOWN_NAME}: nobody shares this file", timeout=TRANSFER_MS)
            expect(message).to_have_class(re.compile(r"\berror\b"))
            expect(message).to_be_visible()
            item = self.download_item(page, UNKNOWN_NAME)
            expect(item.locator(".state")).to_have_text("failed")
            expect(item.get_by_role("alert")).to_have_text("nobody shares this file")
            expect(item.locator(".file-link")).to_be_hidden()
            expect(item.locator("progress")).to_be_hidden()  # no bar still moving for a failed download
            self.assert_fits(page, width, file_input, button, message)
            b.shot("nobody shares it")

            retry = item.get_by_role("button", name=f"Retry {UNKNOWN_NAME}", exact=True)
            dismiss = item.get_by_role("button", name=f"Dismiss {UNKNOWN_NAME}", exact=True)
            self.assert_fits(page, width, retry, dismiss)
            self.assert_labelled(page)
            with page.expect_request(lambda r: r.method == "POST" and r.url.endswith("/retry")) as asked:
                retry.click()
            self.assertEqual(asked.value.url, f"{self.net.page('alice').rstrip('/')}/api/downloads/"
                             f"{quote(UNKNOWN_NAME, safe='')}/retry")
            self.assertEqual(asked.value.response().status, 202)
            expect(message).to_have_text(f"{UNKNOWN_NAME}: nobody shares this file", timeout=TRANSFER_MS)
            expect(item.locator(".state")).to_have_text("failed")
            with page.expect_request(lambda r: r.method == "DELETE") as asked:
                dismiss.click()
            self.assertEqual(asked.value.response().status, 200)
            expect(item).to_have_count(0)
            expect(message).to_have_text(f"{UNKNOWN_NAME} is off the list.")
            b.shot("dismissed")

            file_input.fill(LONG_NAME)
            button.click()
            item = self.wait_done(page, LONG_NAME)
            self.assert_fits(page, width, file_input, button, item.locator(".file-link"), item.locator("progress"))
            b.shot("long name done")
        return self.in_browser(scenario, viewport=NARROW)


class CssStringTests(unittest.SynchronousTestCase):
    def test_quotes_and_backslashes_escaped(self):
        self.assertEqual(css_string('a"b\\c'), '"a\\"b\\\\c"')
        self.assertEqual(json.loads(css_string("poem.txt")), "poem.txt")
