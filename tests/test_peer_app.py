"""The peer's Klein app (issue: the page and the API) over a real twisted.web Site, in memory.

A fake peer (``status()``, ``download()``, ``store.file_path()``,
``receive_cell()``) stands behind ``PeerApp``; every request goes through
``tests/support/memory_http.py`` (a real HTTP/1.1 client and the site's real
channel, from a chosen client IP), so the allow-list sees the connection's
source address as it would over TCP. Nothing waits: with nothing held, each answer is there once
the connections have been pumped (``successResultOf``).
"""

from __future__ import annotations

import html.parser
import os
import re
import tempfile
from pathlib import Path
from typing import NamedTuple

import orjson
from twisted.internet import defer, task
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from onion_twisted import PROTOCOL
from onion_twisted.peer import app as peer_app
from onion_twisted.peer import page
from onion_twisted.peer.download_store import DownloadStore
from onion_twisted.peer.finished_files import FileStreamer, content_disposition
from onion_twisted.protocol.errors import Forbidden
from onion_twisted.net.http_server import QuietSite, ip_allowed, parse_allow
from onion_twisted.peer.app import PeerApp
from tests.support.memory_http import Pumps, memory_client

PEER_URL = "http://127.0.0.1:5000"
USER_IP = "127.0.0.1"
STRANGER_IP = "10.1.2.3"
JSON = {b"Content-Type": [b"application/json"]}
SHA = "ab" * 32
STATIC_DIR = Path(peer_app.__file__).resolve().parent / "static"


def served_index() -> bytes:
    """``index.html`` as the peer at PEER_URL serves it: its address in the title and heading."""
    return (STATIC_DIR / "index.html").read_bytes() \
        .replace(b"<title>onion_twisted peer</title>", b"<title>onion_twisted peer at 127.0.0.1:5000</title>") \
        .replace(b'<h1 id="peer-heading">onion_twisted peer</h1>',
                 b'<h1 id="peer-heading">onion_twisted peer at 127.0.0.1:5000</h1>')


class Answer(NamedTuple):
    code: int
    headers: object
    body: bytes
    length: object  # the announced Content-Length (the client keeps it out of ``headers``)

    def header(self, name: str) -> str | None:
        value = self.headers.getRawHeaders(name)
        return value[0] if value else None

    def json(self):
        return orjson.loads(self.body)


class FakeDownload:
    def __init__(self, name, sha256):
        self.name, self.sha256 = name, sha256

    def status(self, now):
        return {"file": self.name, "state": "queued", "bytes": 0, "size": None, "sha256": self.sha256,
                "error": None, "attempts": 0, "speed": 0.0, "unverified": False, "path": None, "now": now}


class NaiveStore:
    """A store that trusts the name it is given: ``PeerApp`` must not rely on it alone."""

    def __init__(self, root: Path):
        self.root = root
        self.asked: list[str] = []

    def file_path(self, name):
        self.asked.append(name)
        path = self.root / name
        return path if path.exists() else None


class FakePeer:
    def __init__(self, store, clock):
        self.store = store
        self.clock = clock
        self.calls: list[tuple] = []
        self.cells: list[tuple[str, bytes]] = []
        self.cell_error = None
        self.downloads: dict[str, FakeDownload] = {}
        self.catalogue = [{"name": "song.ogg", "size": 1234, "sha256": SHA, "sources": 2}]

    def status(self):
        self.calls.append(("status",))
        return {
            "circuit": {"state": "connected", "detail": "connected",
                        "nodes": [{"address": f"127.0.0.{i}:5000", "fingerprint": "f" * 64} for i in (11, 12, 13)],
                        "age": 42},
            "shared": [{"name": "mine.txt", "size": 3, "sha256": "cd" * 32}],
            "catalogue": self.catalogue,
            "downloads": [d.status(self.clock.seconds()) for d in self.downloads.values()],
        }

    def download(self, name, sha256=None):
        self.calls.append(("download", name, sha256))
        if "/" in name:
            raise ValueError("file name has a path separator or is . or ..")
        d = self.downloads.setdefault(name, FakeDownload(name, sha256))
        return d

    async def receive_cell(self, source_ip, body):
        self.cells.append((source_ip, body))
        if self.cell_error is not None:
            raise self.cell_error
        return b"{}"


class PeerAppTestCase(unittest.TestCase):
    ui_allow = ["127.0.0.0/8", "::1"]

    def setUp(self):
        self.tmp = Path(tempfile.mkdtemp())
        self.addCleanup(_rmtree, self.tmp)
        self.downloads_dir = self.tmp / "downloads"
        self.clock = task.Clock()
        self.clock.advance(1000)
        self.peer = FakePeer(DownloadStore(self.downloads_dir), self.clock)
        self.make_site(PeerApp(self.peer, ui_allow=self.ui_allow, address="127.0.0.1:5000"))

    def make_site(self, app):
        self.app = app
        self.site = QuietSite(app.resource(), reactor=MemoryReactorClock())
        self.pumps = Pumps()
        self._clients = {}

    def tearDown(self):
        self.pumps.flush()
        self.assertEqual(len(self.pumps), 0, "a connection was left open")

    def request(self, method, path, *, ip=USER_IP, data=None, headers=None) -> Answer:
        if ip not in self._clients:
            self._clients[ip] = memory_client(self.site, ip, pumps=self.pumps)
        client = self._clients[ip]
        kwargs = {"headers": headers if headers is not None else {}}
        if data is not None:
            kwargs["data"] = data
        d = client.request(method, PEER_URL + path, **kwargs)
        d.addCallback(lambda r: client.content(r).addCallback(lambda raw: Answer(r.code, r.headers, raw, r.length)))
        return self.successResultOf(client.until(d))

    def get(self, path, **kw) -> Answer:
        return self.request("GET", path, **kw)

    def post_download(self, body, *, headers=JSON, ip=USER_IP) -> Answer:
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        return self.request("POST", "/api/downloads", data=data, headers=headers, ip=ip)

    def assertError(self, answer: Answer, code: int, error: str):
        self.assertEqual(answer.code, code, answer.body)
        self.assertEqual(answer.header("Content-Type"), "application/json")
        body = answer.json()
        self.assertEqual(body["error"], error)
        self.assertIsInstance(body["detail"], str)
        self.assertTrue(body["detail"])
        return body


def _rmtree(path: Path):
    for root, dirs, files in os.walk(path, topdown=False):
        for f in files:
            os.unlink(os.path.join(root, f))
        for d in dirs:
            os.rmdir(os.path.join(root, d))
    os.rmdir(path)


# --- the allow-list -------------------------------------------------------------------------


class AllowListTests(PeerAppTestCase):
    def test_loopback_gets_the_page_and_the_api(self):
        self.assertEqual(self.get("/").code, 200)
        self.assertEqual(self.get("/api/status").code, 200)
        self.assertEqual(self.post_download({"file": "song.ogg"}).code, 202)

    def test_a_stranger_is_refused_everything_for_the_user(self):
        (self.downloads_dir / "x").write_bytes(b"secret")
        for method, path, data in [("GET", "/", None), ("GET", "/api/status", None),
                                   ("POST", "/api/downloads", b'{"file": "x"}'), ("GET", "/files/x", None),
                                   ("GET", "/static/app.js", None), ("GET", "/favicon.ico", None),
                                   ("GET", "/no/such/route", None), ("PUT", "/api/status", None)]:
            answer = self.request(method, path, ip=STRANGER_IP, data=data, headers=JSON)
            self.assertError(answer, 403, "forbidden")
            self.assertEqual(answer.header("Cache-Control"), "no-store")
            self.assertNotIn(b"secret", answer.body)
        self.assertEqual(self.peer.calls, [], "a refused request reached the peer")

    def test_cells_reach_the_peer_from_any_address(self):
        answer = self.request("POST", "/", ip=STRANGER_IP, data=b'{"CID": "x"}', headers=JSON)
        self.assertEqual((answer.code, answer.body), (200, b"{}"))
        self.assertEqual(self.peer.cells, [(STRANGER_IP, b'{"CID": "x"}')])

    def test_a_refused_cell_gets_its_protocol_status(self):
        self.peer.cell_error = Forbidden("not this circuit's entry node")
        answer = self.request("POST", "/", ip=STRANGER_IP, data=b"{}", headers=JSON)
        self.assertEqual(self.assertError(answer, 403, "forbidden")["detail"], "not this circuit's entry node")
        self.assertEqual(len(self.peer.cells), 1)

    def test_identity_answers_anyone(self):
        answer = self.get("/identity", ip=STRANGER_IP)
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.json(), {"role": "peer", "address": "127.0.0.1:5000", "public_key": None,
                                         "fingerprint": None, "protocol": PROTOCOL,
                                         "protocols": ["onion-http/1", "onion-http/2"]})

    def test_identity_prefers_the_peers_own_address(self):
        self.peer.own_address = "127.0.0.21:5000"
        self.make_site(PeerApp(self.peer, ui_allow=self.ui_allow, address="127.0.0.1:5000"))
        self.assertEqual(self.get("/identity").json()["address"], "127.0.0.21:5000")

    def test_identity_without_an_address_is_where_the_client_reached_us(self):
        self.make_site(PeerApp(self.peer, ui_allow=self.ui_allow))
        self.assertEqual(self.get("/identity").json()["address"], "127.0.0.1:5000")

    def test_configured_networks_and_bare_addresses(self):
        self.make_site(PeerApp(self.peer, ui_allow=["10.0.0.0/8", "192.168.1.7"]))
        self.assertEqual(self.get("/api/status", ip=STRANGER_IP).code, 200)
        self.assertEqual(self.get("/api/status", ip="192.168.1.7").code, 200)
        self.assertError(self.get("/api/status", ip="192.168.1.8"), 403, "forbidden")
        self.assertError(self.get("/api/status", ip=USER_IP), 403, "forbidden")

    def test_an_empty_allow_list_refuses_everyone(self):
        self.make_site(PeerApp(self.peer, ui_allow=[]))
        self.assertError(self.get("/", ip=USER_IP), 403, "forbidden")
        self.assertEqual(self.request("POST", "/", data=b"{}", headers=JSON).code, 200)

    def test_ip_allowed(self):
        networks = parse_allow(["127.0.0.0/8", "::1", "fd00::/8"])
        self.assertTrue(ip_allowed("127.0.0.5", networks))
        self.assertTrue(ip_allowed("::1", networks))
        self.assertTrue(ip_allowed("::ffff:127.0.0.1", networks))   # a v4 client on a dual-stack socket
        self.assertTrue(ip_allowed("fd12::3", networks))
        self.assertFalse(ip_allowed("::2", networks))
        self.assertFalse(ip_allowed("128.0.0.1", networks))
        self.assertFalse(ip_allowed("not an ip", networks))
        self.assertFalse(ip_allowed(None, networks))

    def test_a_bad_allow_list_entry_is_refused_at_start(self):
        self.assertRaises(ValueError, parse_allow, ["127.0.0.1", "localhost"])
        self.assertRaises(ValueError, PeerApp, self.peer, ["300.0.0.0/8"])


class BrowserGuardTests(PeerAppTestCase):
    """A web page the user visits must not drive the API through the user's browser."""

    def test_another_origin_cannot_start_a_download(self):
        headers = dict(JSON, Origin=[b"http://evil.example"])
        self.assertError(self.post_download({"file": "song.ogg"}, headers=headers), 403, "forbidden")
        self.assertNotIn(("download", "song.ogg", None), self.peer.calls)

    def test_the_pages_own_origin_can(self):
        headers = dict(JSON, Origin=[PEER_URL.encode()])
        self.assertEqual(self.post_download({"file": "song.ogg"}, headers=headers).code, 202)

    def test_a_form_post_is_not_json(self):
        headers = {b"Content-Type": [b"text/plain"]}
        self.assertError(self.post_download(b'{"file": "song.ogg"}', headers=headers), 415,
                         "unsupported_media_type")
        self.assertEqual(self.peer.calls, [])

    def test_a_rebound_dns_name_is_refused(self):
        answer = self.get("/api/status", headers={b"Host": [b"evil.example:5000"]})
        self.assertError(answer, 403, "forbidden")
        self.assertEqual(self.get("/api/status", headers={b"Host": [b"localhost:5000"]}).code, 200)


# --- the API ------------------------------------------------------------------------------------


class StatusTests(PeerAppTestCase):
    def test_status_is_the_peers(self):
        self.peer.download("song.ogg")
        answer = self.get("/api/status")
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.header("Content-Type"), "application/json")
        self.assertEqual(answer.header("Cache-Control"), "no-store")
        body = answer.json()
        self.assertEqual(set(body), {"peer", "circuit", "shared", "catalogue", "downloads"})
        self.assertEqual(len(body["circuit"]["nodes"]), 3)
        self.assertEqual(body["catalogue"], self.peer.catalogue)
        [d] = body["downloads"]
        for key in ("file", "state", "bytes", "size", "sha256", "error"):
            self.assertIn(key, d)
        self.assertEqual(d["file"], "song.ogg")


class DownloadRequestTests(PeerAppTestCase):
    def test_accepted(self):
        answer = self.post_download({"file": "song.ogg"})
        self.assertEqual(answer.code, 202)
        self.assertEqual(answer.header("Cache-Control"), "no-store")
        body = answer.json()
        self.assertEqual((body["file"], body["state"], body["sha256"]), ("song.ogg", "queued", None))
        self.assertEqual(body["now"], 1000)  # the status is taken on the peer's clock
        self.assertEqual(self.peer.calls, [("download", "song.ogg", None)])

    def test_with_a_sha256(self):
        answer = self.post_download({"file": "song.ogg", "sha256": SHA.upper()})
        self.assertEqual(answer.code, 202)
        self.assertEqual(self.peer.calls, [("download", "song.ogg", SHA)])
        self.assertEqual(answer.json()["sha256"], SHA)

    def test_null_sha256_is_none(self):
        self.assertEqual(self.post_download({"file": "song.ogg", "sha256": None}).code, 202)
        self.assertEqual(self.peer.calls, [("download", "song.ogg", None)])

    def test_bad_requests(self):
        cases = [b"not json", b"[1, 2]", b'"song.ogg"', b"{}", b'{"file": 5}', b'{"file": ""}',
                 b'{"file": null}', b'{"file": ["a"]}', b'{"file": "a", "sha256": "abc"}',
                 b'{"file": "a", "sha256": 5}', orjson.dumps({"file": "a", "sha256": "g" * 64})]
        for body in cases:
            self.assertError(self.post_download(body), 400, "bad_request")
        self.assertEqual(self.peer.calls, [], "the peer was asked with bad input")

    def test_the_peers_refusal_is_a_400_with_its_reason(self):
        body = self.assertError(self.post_download({"file": "a/b"}), 400, "bad_request")
        self.assertEqual(body["detail"], "file name has a path separator or is . or ..")

    def test_get_is_not_allowed(self):
        answer = self.get("/api/downloads")
        self.assertError(answer, 405, "method_not_allowed")
        self.assertIn("POST", answer.header("Allow"))

    def test_unknown_route_is_a_json_404(self):
        self.assertError(self.get("/api/nothing"), 404, "not_found")


# --- finished files ---------------------------------------------------------------------------------


class FileTests(PeerAppTestCase):
    def test_a_finished_file_is_streamed_exactly(self):
        data = bytes(range(256)) * 2000 + b"tail"   # ~500 KiB: several producer rounds
        (self.downloads_dir / "song.ogg").write_bytes(data)
        answer = self.get("/files/song.ogg")
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.body, data)
        self.assertEqual(answer.header("Content-Type"), "application/octet-stream")
        self.assertEqual(answer.length, len(data))
        self.assertEqual(answer.header("Content-Disposition"),
                         "attachment; filename=\"song.ogg\"; filename*=UTF-8''song.ogg")
        self.assertEqual(answer.header("X-Content-Type-Options"), "nosniff")
        self.assertIn("sandbox", answer.header("Content-Security-Policy"))

    def test_a_page_among_the_downloads_is_never_rendered_nor_unzipped(self):
        (self.downloads_dir / "evil.html").write_bytes(b"<script>fetch('/api/status')</script>")
        (self.downloads_dir / "x.tar.gz").write_bytes(b"\x1f\x8b not really")
        for name in ("evil.html", "x.tar.gz"):
            answer = self.get("/files/" + name)
            self.assertEqual(answer.code, 200)
            self.assertEqual(answer.header("Content-Type"), "application/octet-stream")
            self.assertFalse(answer.header("Content-Encoding"))  # treq's decoder leaves an empty one
            self.assertTrue(answer.header("Content-Disposition").startswith("attachment;"))

    def test_a_name_with_spaces_and_accents(self):
        name = "résumé final (1).txt"
        (self.downloads_dir / name).write_bytes(b"hello")
        answer = self.get("/files/r%C3%A9sum%C3%A9%20final%20%281%29.txt")
        self.assertEqual((answer.code, answer.body), (200, b"hello"))
        self.assertEqual(answer.header("Content-Disposition"),
                         "attachment; filename=\"r_sum_ final (1).txt\"; "
                         "filename*=UTF-8''r%C3%A9sum%C3%A9%20final%20%281%29.txt")

    def test_range_requests_resume(self):
        (self.downloads_dir / "song.ogg").write_bytes(b"0123456789")
        for header, code, body, content_range in [
                (b"bytes=4-", 206, b"456789", "bytes 4-9/10"),
                (b"bytes=2-3", 206, b"23", "bytes 2-3/10"),
                (b"bytes=8-100", 206, b"89", "bytes 8-9/10"),
                (b"bytes=-3", 206, b"789", "bytes 7-9/10"),
                (b"bytes=-30", 206, b"0123456789", "bytes 0-9/10"),
                (b"bytes=0-1,4-5", 200, b"0123456789", None),    # several ranges: the whole file
                (b"items=0-1", 200, b"0123456789", None),
                (b"bytes=5-2", 200, b"0123456789", None)]:
            answer = self.get("/files/song.ogg", headers={b"Range": [header]})
            self.assertEqual((answer.code, answer.body, answer.header("Content-Range")),
                             (code, body, content_range), header)
            self.assertEqual(answer.length, len(body))
        answer = self.get("/files/song.ogg", headers={b"Range": [b"bytes=10-"]})
        self.assertError(answer, 416, "range_not_satisfiable")
        self.assertEqual(answer.header("Content-Range"), "bytes */10")

    def test_head_and_empty_files(self):
        (self.downloads_dir / "empty").write_bytes(b"")
        (self.downloads_dir / "song.ogg").write_bytes(b"0123456789")
        answer = self.get("/files/empty")
        self.assertEqual((answer.code, answer.body, answer.length), (200, b"", 0))
        answer = self.request("HEAD", "/files/song.ogg")
        self.assertEqual((answer.code, answer.body), (200, b""))
        self.assertEqual(answer.header("Content-Disposition").split(";")[0], "attachment")

    def test_unknown_file(self):
        self.assertError(self.get("/files/nothing.bin"), 404, "not_found")

    def test_partial_files_are_not_served(self):
        partial = self.downloads_dir / ".partial"
        partial.mkdir()
        (partial / "song.ogg.part").write_bytes(b"half")
        for path in ("/files/.partial", "/files/.partial%2Fsong.ogg.part", "/files/.partial/song.ogg.part"):
            self.assertError(self.get(path), 404, "not_found")

    def test_nothing_outside_the_downloads_even_with_a_naive_store(self):
        (self.tmp / "secret").write_bytes(b"secret")
        self.peer.store = NaiveStore(self.downloads_dir)
        for path in ("/files/..", "/files/%2E%2E", "/files/..%2Fsecret", "/files/%2E%2E%2Fsecret",
                     "/files/../secret", "/files/.", "/files/", "/files/%2Ftmp"):
            answer = self.get(path)
            self.assertEqual(answer.code, 404, path)
            self.assertNotIn(b"secret", answer.body)
        self.assertEqual([n for n in self.peer.store.asked if "/" in n or n in (".", "..")], [])

    def test_a_directory_is_not_a_file(self):
        (self.downloads_dir / "folder").mkdir()
        self.peer.store = NaiveStore(self.downloads_dir)
        self.assertError(self.get("/files/folder"), 404, "not_found")


# --- the page and its files ----------------------------------------------------------------------------


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.labels_for, self.controls, self.scripts, self.links = set(), set(), [], [], []
        self.inline_handlers, self.inline_styles, self.script_bodies = [], [], []
        self._in_script = False
        self.buttons_text, self._button = [], None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        for name, _ in attrs:
            if name.startswith("on"):
                self.inline_handlers.append((tag, name))
            if name == "style":
                self.inline_styles.append(tag)
        if tag == "label" and "for" in a:
            self.labels_for.add(a["for"])
        if tag in ("input", "select", "textarea") and a.get("type") != "hidden":
            self.controls.append(a)
        if tag == "script":
            self.scripts.append(a)
            self._in_script = True
        if tag == "link":
            self.links.append(a)
        if tag == "button":
            self._button = (a, [])

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False
        if tag == "button" and self._button is not None:
            self.buttons_text.append((self._button[0], "".join(self._button[1]).strip()))
            self._button = None

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.script_bodies.append(data)
        if self._button is not None:
            self._button[1].append(data)


class PageTests(PeerAppTestCase):
    def page(self) -> tuple[Answer, _Page]:
        answer = self.get("/")
        parsed = _Page()
        parsed.feed(answer.body.decode("utf-8"))
        return answer, parsed

    def test_the_page_and_its_headers(self):
        answer, page = self.page()
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.header("Content-Type"), "text/html; charset=utf-8")
        csp = answer.header("Content-Security-Policy")
        self.assertIsNotNone(csp)
        self.assertIn("default-src 'self'", [d.strip() for d in csp.split(";")])
        self.assertNotIn("unsafe", csp)
        self.assertEqual(answer.header("X-Content-Type-Options"), "nosniff")
        self.assertEqual(answer.header("Cache-Control"), "no-store")
        self.assertEqual(answer.body, served_index())

    def test_the_page_has_what_the_issue_asks_for(self):
        _, page = self.page()
        for element in ("get-form", "file-input", "catalogue-names", "form-message", "downloads-list",
                        "catalogue-body", "shared-body", "circuit-nodes", "circuit-age"):
            self.assertIn(element, page.ids)
        [file_input] = [c for c in page.controls if c.get("id") == "file-input"]
        self.assertEqual(file_input.get("list"), "catalogue-names")
        self.assertEqual([s.get("src") for s in page.scripts], ["/static/app.js"])

    def test_every_control_has_a_label_and_every_button_a_name(self):
        _, page = self.page()
        self.assertTrue(page.controls)
        for control in page.controls:
            self.assertTrue(control.get("id") in page.labels_for or control.get("aria-label"), control)
        for attrs, text in page.buttons_text:
            self.assertTrue(text or attrs.get("aria-label"), attrs)

    def test_nothing_the_csp_would_block(self):
        _, page = self.page()
        self.assertEqual(page.inline_handlers, [])
        self.assertEqual(page.inline_styles, [])
        self.assertEqual(page.script_bodies, [])
        js = (STATIC_DIR / "app.js").read_text("utf-8")
        for forbidden in ("eval(", "new Function", "innerHTML", "outerHTML", "insertAdjacentHTML",
                          "document.write", ".setAttribute(\"style\"", "setAttribute(\"on"):
            self.assertNotIn(forbidden, js)

    def test_every_element_the_script_uses_is_on_the_page(self):
        _, page = self.page()
        js = (STATIC_DIR / "app.js").read_text("utf-8")
        used = set(re.findall(r"\$\(\"([\w-]+)\"\)", js)) | set(re.findall(r"getElementById\(\"([\w-]+)\"\)", js))
        self.assertTrue(used)
        self.assertEqual(used - page.ids, set())

    def test_the_page_fits_a_phone(self):
        _, page = self.page()
        self.assertIn(b'name="viewport" content="width=device-width',
                      (STATIC_DIR / "index.html").read_bytes())
        css = (STATIC_DIR / "style.css").read_text("utf-8")
        self.assertRegex(css, r"@media \(max-width: *\d+(rem|px)\)")
        for width in re.findall(r"(?<![-\w])(?:min-)?width:\s*(\d+)px", css):
            self.assertLessEqual(int(width), 375, "a fixed width wider than a phone")

    def test_static_files_and_their_types(self):
        for name, kind in [("app.js", "text/javascript; charset=utf-8"), ("style.css", "text/css; charset=utf-8"),
                           ("index.html", "text/html; charset=utf-8"), ("favicon.png", "image/png")]:
            answer = self.get("/static/" + name)
            self.assertEqual(answer.code, 200, name)
            self.assertEqual(answer.header("Content-Type"), kind)
            self.assertEqual(answer.header("X-Content-Type-Options"), "nosniff")
            self.assertEqual(answer.body, served_index() if name == "index.html" else (STATIC_DIR / name).read_bytes())
        self.assertEqual(self.get("/favicon.ico").body, (STATIC_DIR / "favicon.png").read_bytes())

    def test_only_the_shipped_files(self):
        for path in ("/static/app.py", "/static/../app.py", "/static/%2E%2E%2Fapp.py", "/static/../page.py",
                     "/static/", "/static/app.js.map", "/static/APP.JS"):
            answer = self.get(path)
            self.assertEqual(answer.code, 404, path)
            self.assertNotIn(b"class PeerApp", answer.body)

    def test_nothing_from_the_internet(self):
        shipped = sorted(p for p in STATIC_DIR.iterdir() if p.is_file())
        self.assertEqual({p.name for p in shipped}, set(page.STATIC_TYPES))
        for path in shipped:
            data = path.read_bytes().lower()
            self.assertNotIn(b"http://", data, path.name)
            self.assertNotIn(b"https://", data, path.name)
            self.assertIsNone(re.search(rb"""(src|href|url)\s*[=(]\s*["']?//""", data), path.name)
            self.assertNotIn(b"@import", data, path.name)


class ContentDispositionTests(unittest.TestCase):
    def test_quotes_and_backslashes_never_break_the_header(self):
        value = content_disposition('a"b\\c;d.txt').decode("ascii")
        self.assertEqual(value, "attachment; filename=\"a_b_c_d.txt\"; filename*=UTF-8''a%22b%5Cc%3Bd.txt")

    def test_any_name_gives_an_ascii_header(self):
        value = content_disposition("日本\r\n.txt")
        self.assertEqual(value.decode("ascii"),
                         "attachment; filename=\"____.txt\"; filename*=UTF-8''%E6%97%A5%E6%9C%AC%0D%0A.txt")


# --- the file producer ----------------------------------------------------------------------------------


class StreamingRequest:
    """What FileStreamer uses of a request; pauses the producer after every ``pause_every`` writes."""

    def __init__(self, pause_every=None, resume_inside_write=False):
        self.writes: list[bytes] = []
        self.producer = None
        self.streaming = None
        self.lost = False
        self.pause_every = pause_every
        self.resume_inside_write = resume_inside_write

    def registerProducer(self, producer, streaming):
        self.producer, self.streaming = producer, streaming

    def unregisterProducer(self):
        self.producer = None

    def write(self, data):
        self.writes.append(data)
        if self.resume_inside_write:
            self.producer.resumeProducing()   # as a transport that drains at once may do
        if self.pause_every and len(self.writes) % self.pause_every == 0:
            self.producer.pauseProducing()

    def loseConnection(self):
        self.lost = True


class FileStreamerTests(unittest.TestCase):
    def open_file(self, data: bytes):
        fd, name = tempfile.mkstemp()
        os.write(fd, data)
        os.close(fd)
        self.addCleanup(os.unlink, name)
        return open(name, "rb")

    def streamer(self, request, data, offset=0, length=None):
        s = FileStreamer(request, self.open_file(data), offset, len(data) - offset
                                  if length is None else length)
        s.chunk = 4
        return s

    def test_it_stops_when_paused_and_goes_on_when_resumed(self):
        request = StreamingRequest(pause_every=1)
        s = self.streamer(request, b"0123456789")
        d = s.start()
        self.assertTrue(request.streaming)
        self.assertEqual(request.writes, [b"0123"])
        self.assertNoResult(d)
        s.resumeProducing()
        self.assertEqual(request.writes, [b"0123", b"4567"])
        s.resumeProducing()
        s.resumeProducing()
        self.assertEqual(b"".join(request.writes), b"0123456789")
        self.assertIsNone(self.successResultOf(d))
        self.assertIsNone(request.producer)
        self.assertTrue(s.file.closed)
        self.assertFalse(request.lost)

    def test_a_resume_from_inside_a_write_does_not_recurse(self):
        request = StreamingRequest(resume_inside_write=True)
        d = self.streamer(request, b"x" * 100).start()
        self.assertEqual(b"".join(request.writes), b"x" * 100)
        self.assertEqual(len(request.writes), 25)
        self.successResultOf(d)

    def test_an_offset_and_a_length(self):
        request = StreamingRequest()
        self.successResultOf(self.streamer(request, b"0123456789", offset=3, length=5).start())
        self.assertEqual(b"".join(request.writes), b"34567")

    def test_a_client_that_goes_away_closes_the_file(self):
        request = StreamingRequest(pause_every=1)
        s = self.streamer(request, b"0123456789")
        d = s.start()
        d.cancel()   # what Klein does when the connection is lost
        self.failureResultOf(d, defer.CancelledError)
        self.assertTrue(s.file.closed)
        self.assertIsNone(request.producer)
        s.resumeProducing()
        self.assertEqual(request.writes, [b"0123"])

    def test_stop_producing_closes_the_file(self):
        request = StreamingRequest(pause_every=1)
        s = self.streamer(request, b"0123456789")
        s.start()
        s.stopProducing()
        self.assertTrue(s.file.closed)
        s.resumeProducing()
        self.assertEqual(request.writes, [b"0123"])

    def test_a_file_that_shrank_is_not_passed_off_as_whole(self):
        request = StreamingRequest()
        d = self.streamer(request, b"0123456789", length=50).start()
        self.successResultOf(d)
        self.assertEqual(b"".join(request.writes), b"0123456789")
        self.assertTrue(request.lost)


class InternalErrorTests(PeerAppTestCase):
    def test_a_bug_is_a_json_500_and_logged(self):
        def broken():
            raise RuntimeError("boom")

        self.peer.status = broken
        answer = self.get("/api/status")
        self.assertError(answer, 500, "internal")
        self.assertNotIn(b"boom", answer.body)
        self.assertNotIn(b"Traceback", answer.body)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
