"""What a user sees of their peer (issue 12): which peer it is, and what to do with a failed download.

* The page's title and heading name the peer: its ``name`` key if set, and
  its address; ``/api/status`` says the same under ``peer``.
* ``POST /api/downloads/NAME/retry`` starts a failed download again, with the
  chunks it has; ``DELETE /api/downloads/NAME`` takes a failed or finished
  one off the list (a failed one's partial data too, so a restart does not
  list it again). Both are the user's routes: ``ui_allow``, ``Host`` and
  ``Origin`` checked like the rest of the API; the retry also wants JSON.

The routes are tested over the real Klein app with a fake peer
(``tests/test_peer_app.py``'s harness); ``Peer.retry`` and ``Peer.dismiss``
in a whole in-memory network (``tests/support/peer_network.py``). The page's own
rules (no Download button for the peer's own files, the Retry and Dismiss
buttons) are in the browser tests (``tests/test_browser.py``).
"""

from __future__ import annotations

import os
import re

from onion_twisted.peer.download_state import DONE, FAILED, QUEUED, RECEIVING
from onion_twisted.protocol.errors import Conflict
from onion_twisted.peer.app import PeerApp
from tests.support.deferreds import inline

from tests.support.peer_network import ALICE_IP, BOB_IP, CHUNK
from .test_peer import PeerNetworkCase, UploadWatch, downloaded, finished, partial_files
from .test_peer_app import JSON, STRANGER_IP, FakeDownload, PeerAppTestCase


# --- the routes ------------------------------------------------------------------------------


class StatefulDownload(FakeDownload):
    def __init__(self, name, sha256, state):
        super().__init__(name, sha256)
        self.state = state

    def status(self, now):
        return dict(super().status(now), state=self.state)


class PeerWithRetry:
    """What ``PeerApp`` asks of a peer for Retry and Dismiss, over the fake peer."""

    def retry(self, name):
        self.calls.append(("retry", name))
        d = self.downloads.get(name)
        if d is None:
            raise LookupError(name)
        if d.state != FAILED:
            raise Conflict(f"the download is {d.state}: only a failed one is retried")
        d.state = QUEUED
        return d

    def dismiss(self, name):
        self.calls.append(("dismiss", name))
        d = self.downloads.get(name)
        if d is None:
            raise LookupError(name)
        if d.state not in (FAILED, DONE):
            raise Conflict(f"the download is {d.state}: only a failed or finished one is dismissed")
        del self.downloads[name]


class PageNamesThePeerTests(PeerAppTestCase):
    def page(self, name: str = "", address: str | None = "127.0.0.21:5000") -> str:
        self.make_site(PeerApp(self.peer, ui_allow=self.ui_allow, address=address, name=name))
        answer = self.get("/")
        self.assertEqual(answer.code, 200)
        return answer.body.decode("utf-8")

    @staticmethod
    def title_and_heading(page: str) -> tuple[str, str]:
        title = re.search(r"<title>(.*?)</title>", page, re.S).group(1)
        heading = re.search(r'<h1 id="peer-heading">(.*?)</h1>', page, re.S).group(1)
        return title, heading

    def test_a_named_peer_shows_its_name_and_address(self):
        title, heading = self.title_and_heading(self.page("alice"))
        self.assertEqual(title, "alice · onion_twisted peer at 127.0.0.21:5000")
        self.assertEqual(heading, 'alice <span class="where">onion_twisted peer at 127.0.0.21:5000</span>')

    def test_an_unnamed_peer_shows_its_address(self):
        title, heading = self.title_and_heading(self.page(""))
        self.assertEqual(title, "onion_twisted peer at 127.0.0.21:5000")
        self.assertEqual(heading, "onion_twisted peer at 127.0.0.21:5000")

    def test_the_name_is_text_not_markup(self):
        title, heading = self.title_and_heading(self.page("<b>bob</b> & co"))
        self.assertEqual(title, "&lt;b&gt;bob&lt;/b&gt; &amp; co · onion_twisted peer at 127.0.0.21:5000")
        self.assertTrue(heading.startswith("&lt;b&gt;bob&lt;/b&gt; &amp; co <span"), heading)

    def test_status_says_which_peer(self):
        self.page("alice")
        self.assertEqual(self.get("/api/status").json()["peer"], {"name": "alice", "address": "127.0.0.21:5000"})
        self.page("")
        self.assertEqual(self.get("/api/status").json()["peer"], {"name": None, "address": "127.0.0.21:5000"})


class RetryAndDismissRouteTests(PeerAppTestCase):
    def setUp(self):
        super().setUp()
        self.peer.__class__ = type("FakePeerWithRetry", (type(self.peer), PeerWithRetry), {})
        for name, state in (("failed.bin", FAILED), ("done.bin", DONE), ("busy.bin", RECEIVING)):
            self.peer.downloads[name] = StatefulDownload(name, None, state)

    def retry(self, name, *, headers=JSON, ip="127.0.0.1"):
        return self.request("POST", f"/api/downloads/{name}/retry", data=b"{}", headers=headers, ip=ip)

    def dismiss(self, name, *, headers=None, ip="127.0.0.1"):
        return self.request("DELETE", f"/api/downloads/{name}", headers=headers or {}, ip=ip)

    def test_retry_starts_a_failed_download_again(self):
        answer = self.retry("failed.bin")
        self.assertEqual(answer.code, 202, answer.body)
        self.assertEqual(answer.header("Cache-Control"), "no-store")
        self.assertEqual((answer.json()["file"], answer.json()["state"]), ("failed.bin", QUEUED))
        self.assertEqual(self.peer.calls, [("retry", "failed.bin")])

    def test_retry_of_what_has_not_failed_or_is_not_listed(self):
        self.assertError(self.retry("busy.bin"), 409, "conflict")
        self.assertError(self.retry("done.bin"), 409, "conflict")
        self.assertError(self.retry("nobody.bin"), 404, "not_found")

    def test_a_name_with_spaces_and_unicode_is_one_path_segment(self):
        self.peer.downloads["my café.txt"] = StatefulDownload("my café.txt", None, FAILED)
        self.assertEqual(self.retry("my%20caf%C3%A9.txt").code, 202)
        self.assertEqual(self.peer.calls, [("retry", "my café.txt")])

    def test_dismiss_takes_a_failed_or_finished_download_off_the_list(self):
        for name in ("failed.bin", "done.bin"):
            answer = self.dismiss(name)
            self.assertEqual(answer.code, 200, answer.body)
            self.assertEqual(answer.json(), {"dismissed": name})
        self.assertEqual([d["file"] for d in self.get("/api/status").json()["downloads"]], ["busy.bin"])

    def test_dismiss_of_a_download_under_way_or_not_listed(self):
        self.assertError(self.dismiss("busy.bin"), 409, "conflict")
        self.assertError(self.dismiss("nobody.bin"), 404, "not_found")
        self.assertIn("busy.bin", self.peer.downloads)

    def test_retry_wants_json(self):
        # A cross-site form can POST text/plain or a form encoding; it cannot send JSON.
        for headers in ({}, {b"Content-Type": [b"text/plain"]},
                        {b"Content-Type": [b"application/x-www-form-urlencoded"]}):
            self.assertError(self.retry("failed.bin", headers=headers), 415, "unsupported_media_type")
        self.assertEqual(self.peer.calls, [])

    def test_strangers_and_other_origins_are_refused(self):
        self.assertError(self.retry("failed.bin", ip=STRANGER_IP), 403, "forbidden")
        self.assertError(self.dismiss("failed.bin", ip=STRANGER_IP), 403, "forbidden")
        evil = {b"Origin": [b"http://evil.example"]}
        self.assertError(self.retry("failed.bin", headers={**JSON, **evil}), 403, "forbidden")
        self.assertError(self.dismiss("failed.bin", headers=evil), 403, "forbidden")
        self.assertEqual(self.peer.calls, [], "a refused request reached the peer")
        self.assertEqual(self.peer.downloads["failed.bin"].state, FAILED)

    def test_other_methods_are_405(self):
        answer = self.request("GET", "/api/downloads/failed.bin/retry")
        self.assertError(answer, 405, "method_not_allowed")
        self.assertError(self.request("PUT", "/api/downloads/failed.bin", data=b"{}", headers=JSON),
                         405, "method_not_allowed")


# --- Peer.retry and Peer.dismiss in a whole network -------------------------------------------


class RetryAndDismissTests(PeerNetworkCase):
    async def failed_half_way(self):
        """Bob shares big.bin; alice holds 6 of its 20 chunks when bob leaves for good, and gives up.

        The bytes and alice's failed download.
        """
        data, d = await self.partly_downloaded(20 * CHUNK, 6)
        await self.net.run(self.bob.stop())
        self.net.pump(until=finished(d))
        self.assertEqual(d.state, FAILED)
        self.assertTrue(d.error.startswith("gave up after 5 attempts"), d.error)
        self.assertGreaterEqual(d.chunks.have, 6)
        return data, d

    @inline
    async def test_retry_resumes_a_failed_download_with_the_chunks_it_had(self):
        data, d = await self.failed_half_way()
        had = d.chunks.bytes_received
        bob = self.net.make_peer(BOB_IP, "bob")
        await self.net.start(bob)
        self.net.pump(until=lambda: self.net.tracker.catalogue.names.get("big.bin"))
        watch = UploadWatch(bob)
        self.assertIs(self.alice.retry("big.bin"), d, "the same download, with its chunk map")
        self.assertEqual((d.attempts, d.error), (1, None))  # its first attempt since the retry is under way
        self.assertNotEqual(d.state, FAILED)
        self.net.pump(until=finished(d))
        self.assertEqual(d.state, DONE, d.error)
        self.assertTrue(downloaded(self.net, "big.bin") == data, "the retried file differs from bob's")
        self.assertEqual(watch.bytes_sent(), len(data) - had, "only the missing chunks were sent")

    @inline
    async def test_a_retried_download_is_no_longer_marked_failed_on_disk(self):
        data, d = await self.failed_half_way()
        self.alice.retry("big.bin")
        await self.net.run(self.alice.stop())
        alice = self.net.make_peer(ALICE_IP, "alice")
        await self.net.start(alice)
        self.assertNotEqual(alice.downloads["big.bin"].state, FAILED, "a restart resumes it")

    @inline
    async def test_only_a_failed_download_is_retried(self):
        data, d = await self.partly_downloaded(20 * CHUNK, 2)
        self.assertRaises(Conflict, self.alice.retry, "big.bin")
        self.assertRaises(LookupError, self.alice.retry, "nobody.bin")

    @inline
    async def test_dismiss_takes_a_failed_download_and_its_partial_data_away(self):
        data, d = await self.failed_half_way()
        self.assertEqual(partial_files(self.net, ALICE_IP), ["big.bin.json", "big.bin.part"])
        self.alice.dismiss("big.bin")
        self.assertNotIn("big.bin", self.alice.downloads)
        self.assertEqual([x["file"] for x in self.alice.status()["downloads"]], [])
        self.assertEqual(partial_files(self.net, ALICE_IP), [])
        await self.net.run(self.alice.stop())
        alice = self.net.make_peer(ALICE_IP, "alice")
        await self.net.start(alice)
        self.assertEqual(alice.downloads, {}, "a restart does not bring it back")

    @inline
    async def test_dismiss_of_a_finished_download_keeps_the_file(self):
        data = await self.bob_shares_and_start("small.bin", 3 * CHUNK)
        d = self.alice.download("small.bin")
        self.net.pump(until=finished(d))
        self.assertEqual(d.state, DONE, d.error)
        self.alice.dismiss("small.bin")
        self.assertNotIn("small.bin", self.alice.downloads)
        self.assertTrue(downloaded(self.net, "small.bin") == data)

    @inline
    async def test_a_download_under_way_is_not_dismissed(self):
        data, d = await self.partly_downloaded(20 * CHUNK, 2)
        self.assertRaises(Conflict, self.alice.dismiss, "big.bin")
        self.assertRaises(LookupError, self.alice.dismiss, "nobody.bin")
        self.assertIn("big.bin", self.alice.downloads)
        self.assertTrue(os.path.exists(d.part_path))
