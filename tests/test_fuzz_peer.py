"""Hostile input at a peer, driven by hypothesis (issue 7).

The peer is the real ``Peer`` behind its real ``PeerApp`` and ``QuietSite``,
over temporary share, downloads and data directories; raw requests are
written into in-memory connections from chosen client IPs
(``tests/support/fuzz.py``). Its circuit is made by hand: three hops whose
session keys the test holds, connected, so the test can play the entry node
and send backward cells that peel correctly, and the network behind the entry
answers the peer's messages (a ``transfer`` for what it asks, ``{}`` to
chunks).

The world: two shared files, a download of ``wanted.bin`` (sha256 known, 4
chunks) waiting for its chunks, and one of ``named.bin`` (announced by name
only: size unknown until its first chunk). After every input:

* ``POST /`` answers 200, 400, 403, 404, 409 or 413 (docs/protocol.md,
  choice 52); the user's routes only their documented statuses;
* nothing is logged as an error, no traceback is written;
* a refused cell changed nothing (circuit, replay sets, downloads, uploads,
  early ``transfer_end``s); and whatever was accepted, the tables stay
  within their bounds and a download's size is the transfer's.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import tempfile

import orjson
from hypothesis import example, given, strategies as st
from twisted.internet import defer, task
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from onion_twisted.protocol import cells, crypto, wire
from onion_twisted.peer.circuit import Circuit
from onion_twisted.protocol.crypto import BACKWARD, FORWARD, Layer
from onion_twisted.protocol.directory import NodeEntry
from onion_twisted.peer.download_store import DownloadStore
from onion_twisted.net.http_server import QuietSite
from onion_twisted.peer.peer import Peer
from onion_twisted.peer.app import PeerApp
from onion_twisted.peer.sharing import HashCache, ShareDirectory
from tests.support.fakes import FakeDirectory, FakeOutbound
from tests.support.fuzz import (fired, LoggedErrors, b64, bad_base64, bad_cids, exchange, fuzz_settings, good_base64,
                                headers as header_lists, hostile_bodies, hosts, http_request, json_objects,
                                json_values, methods, paths, post_json, to_json, uuid4s, weighted)
from tests.support.tracker_fakes import NODE_ADDRESSES, NODE_KEYS, NOW, PORT, SHA_A, STRANGER_IP, TRACKER_ADDRESS

PEER_IP = "127.0.0.101"
SERVER = (PEER_IP, PORT)
HOST = f"{PEER_IP}:{PORT}".encode("ascii")
ENTRY_IP = NODE_ADDRESSES[0].host
USER_IP = "127.0.0.1"
IPS = (ENTRY_IP, STRANGER_IP, USER_IP, NODE_ADDRESSES[1].host)
CHUNK = 16384
WANTED = os.urandom(3 * CHUNK + 100)
WANTED_SHA = hashlib.sha256(WANTED).hexdigest()
SHARED = {"a.txt": os.urandom(40_000), "b.bin": b"small"}
MAX_UPLOADS = 2
CELL_STATUSES = frozenset({200, 400, 403, 404, 409, 413})
USER_STATUSES = frozenset({200, 202, 206, 400, 403, 404, 405, 413, 415, 416})


def synchronous(f, *args, **kwargs):
    return defer.maybeDeferred(f, *args, **kwargs)


class NetworkBehindTheEntry(FakeOutbound):
    """The peer's outbound: its messages peel with the hop keys; the 'tracker' answers them."""

    def __init__(self, world):
        super().__init__()
        self.world = world

    def answer(self, sent):
        body = sent.body
        cell = cells.parse_cell(body)
        if cell.destroy:
            return defer.succeed(b"{}")
        message = orjson.loads(self.world.peel_forward(body))
        kind = message.get("type")
        if kind == "request":
            name = message["file"]
            reply = {"type": "transfer", "transfer": "T-" + name, "file": name, "chunk_size": CHUNK,
                     "size": None if name == "named.bin" else len(WANTED) if name == "wanted.bin" else 1000,
                     "sha256": WANTED_SHA if name == "wanted.bin" else None}
        elif kind in ("ls", "list"):
            reply = {"type": "files", "files": []}
        else:
            return defer.succeed(b"{}")
        return defer.succeed(wire.dumps({"payload": b64(self.world.backward(wire.dumps(reply)))}))


class PeerWorld:
    def __init__(self, base: str):
        self.base = base
        share, downloads, data = (os.path.join(base, d) for d in ("share", "downloads", "data"))
        for path in (share, downloads, data):
            os.makedirs(path)
        for name, content in SHARED.items():
            with open(os.path.join(share, name), "wb") as f:
                f.write(content)
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.outbound = NetworkBehindTheEntry(self)
        self.peer = Peer(clock=self.clock, outbound=self.outbound, directory=FakeDirectory(), tracker=TRACKER_ADDRESS,
                         share=ShareDirectory(share, HashCache(data), run_in_thread=synchronous),
                         store=DownloadStore(downloads), data_dir=data, chunk_size=CHUNK, window=4,
                         rng=random.Random(1), run_in_thread=synchronous, max_uploads=MAX_UPLOADS,
                         max_circuits=1, circuit_lifetime=0)
        fired(defer.ensureDeferred(self.peer.rescan()))
        keys = [crypto.new_session_key() for _ in range(3)]
        self.hop_layers = [Layer(k) for k in keys]
        hops = [NodeEntry(a, crypto.public_key_pem(k), crypto.fingerprint(k))
                for a, k in zip(NODE_ADDRESSES, NODE_KEYS)]
        circuit = self.circuit = Circuit(self.outbound, hops[:3], TRACKER_ADDRESS)
        circuit.layers = [Layer(k) for k in keys]
        circuit._nonces = [set() for _ in keys]
        circuit.connected = True
        self.peer.keeper.adopt(circuit)
        self.app = PeerApp(self.peer, ui_allow=["127.0.0.0/24"], address=f"{PEER_IP}:{PORT}")
        self.site = QuietSite(self.app.resource(), max_body=65536, reactor=MemoryReactorClock())
        self.wanted = self.peer.download("wanted.bin", WANTED_SHA)
        self.named = self.peer.download("named.bin")
        self.outbound.sent.clear()
        self.pristine = self.state()

    def backward(self, data: bytes, layers=None) -> bytes:
        """``data`` as the exit, the middle and the entry wrap it on its way to the peer."""
        for layer in reversed(layers if layers is not None else self.hop_layers):
            data = layer.wrap(data, BACKWARD)
        return data

    def peel_forward(self, body: bytes) -> bytes:
        """What the peer sent in a cell, as the exit would read it."""
        data = wire.b64decode(cells.parse_cell(body).payload)
        for layer in self.hop_layers:
            _, data = layer.peel(data, FORWARD)
        return data

    def state(self):
        peer = self.peer
        return (
            peer.circuit, peer.circuit_state, [len(s) for s in self.circuit._nonces],
            sorted((name, d.state, d.size, d.chunk_size, d.chunks.have if d.chunks else None, d.sha256,
                    [(t.transfer, sorted(t.seen), t.outcome, t.chunks) for t in d.transfers])
                   for name, d in peer.downloads.items()),
            sorted(peer.uploads), sorted(peer._orphan_ends),
        )

    @property
    def changed(self) -> bool:
        return self.state() != self.pristine

    def close(self):
        for d in self.peer.downloads.values():
            d.close()
        shutil.rmtree(self.base, ignore_errors=True)




# --- strategies ----------------------------------------------------------------------------------

small_json = json_values(3)
LONGEST = ("a" * 251 + ".bin", "é" * 127, "x" * 255)  # names of 255 bytes: the longest a file may have
names = weighted((4, st.sampled_from(["wanted.bin", "named.bin", "a.txt", "b.bin", "nobody.txt"])),
                 (1, st.sampled_from(LONGEST)),
                 (1, st.sampled_from(["", ".", "..", "../a.txt", "a.txt/", ".hidden", "a" * 300, "a\x00b"])),
                 (1, st.text(max_size=20)), (1, small_json))
transfers = weighted((4, st.sampled_from(["T-wanted.bin", "T-named.bin", "T-other"])), (1, st.text(max_size=140)),
                     (1, small_json))
integers = weighted((4, st.integers(-2, 10)), (1, st.integers()),
                    (1, st.sampled_from([2 ** 53, 2 ** 63, 10 ** 30, CHUNK, len(WANTED), 1.0, True, "1", None])))
chunk_sizes = weighted((3, st.just(CHUNK)), (1, st.sampled_from([1, 2, 100, 16383, 4 * 1024 * 1024 + 1, 0, -5])),
                       (1, integers))
sizes = weighted((3, st.just(len(WANTED))), (2, st.integers(0, 10 ** 6)),
                 (1, st.sampled_from([2 ** 32, 2 ** 40, 2 ** 53, 2 ** 62, 10 ** 20, -1])), (1, integers))
data_fields = weighted((3, st.integers(0, 3).map(lambda i: b64(WANTED[i * CHUNK:(i + 1) * CHUNK]))),
                       (2, good_base64), (1, bad_base64), (1, small_json))


def _object(fields):
    return {k: v for k, v in fields.items() if v is not MISSING}


MISSING = object()
maybe = lambda strategy: weighted((5, strategy), (1, st.just(MISSING)))  # noqa: E731
backward_messages = weighted(
    (4, st.builds(_object, st.fixed_dictionaries({
        "type": st.just("file_chunk"), "transfer": maybe(transfers), "file": maybe(names),
        "chunk_idx": maybe(integers), "chunk_size": maybe(chunk_sizes), "size": maybe(sizes),
        "data": maybe(data_fields)}))),
    (2, st.builds(_object, st.fixed_dictionaries({
        "type": st.just("transfer_end"), "transfer": maybe(transfers),
        "status": maybe(weighted((3, st.sampled_from(["ok", "error"])), (1, small_json))),
        "detail": maybe(small_json)}))),
    (2, st.builds(_object, st.fixed_dictionaries({
        "type": st.just("request"), "transfer": maybe(transfers), "file": maybe(names),
        "chunk_size": maybe(chunk_sizes), "chunks": maybe(st.lists(st.lists(integers, max_size=3), max_size=4)),
        "sha256": maybe(weighted((1, st.just(SHA_A)), (1, small_json)))}))),
    (1, json_objects),
)
#: How the cell's payload is made: right, or wrong in one way.
wrappings = weighted((6, st.just("right")),
                     (1, st.sampled_from(["two-layers", "four-layers", "forward-aad", "reversed", "flipped",
                                          "not-json", "not-object"])))


class PeerFuzzTests(unittest.TestCase):
    def setUp(self):
        self.root = tempfile.mkdtemp(prefix="fuzz-peer-")
        self.addCleanup(shutil.rmtree, self.root, True)
        self.worlds = 0
        self.world = self.make_world()

    def make_world(self) -> PeerWorld:
        self.worlds += 1
        world = PeerWorld(os.path.join(self.root, str(self.worlds)))
        self.addCleanup(world.close)
        return world

    def fresh(self) -> PeerWorld:
        if self.world.changed:
            self.world.close()
            self.world = self.make_world()
        self.world.outbound.sent.clear()
        return self.world

    def exchange(self, world, ip, raw, *, head=False):
        with LoggedErrors() as errors:
            response = exchange(world.site, ip, raw, server=SERVER, head=head)
        self.assertEqual(errors.events, [], f"{raw[:300]!r} was logged as an error:\n{errors.text()}")
        if response is not None:
            self.assertNotIn(b"Traceback", response.body)
        return response

    def assertBounded(self, world):
        peer = world.peer
        self.assertLessEqual(len(peer.uploads), MAX_UPLOADS)
        self.assertLessEqual(len(peer._orphan_ends), 1000)
        d = world.wanted
        if d.chunks is not None:  # the transfer said 4 chunks of 16 KiB: no chunk changes that
            self.assertEqual((d.chunks.size, d.chunks.chunk_size), (len(WANTED), CHUNK))
        for d in peer.downloads.values():
            if d.chunks is not None:
                self.assertLessEqual(d.chunks.count, 1 << 22)

    # --- cells from the entry node ------------------------------------------------------------

    @fuzz_settings(400)
    @given(message=backward_messages, wrapping=wrappings,
           cid=weighted((6, st.just("ours")), (1, uuid4s), (1, bad_cids)),
           ip=weighted((6, st.just(ENTRY_IP)), (1, st.sampled_from(IPS))),
           extra=weighted((6, st.just({})), (1, st.sampled_from([{"destroy": True}, {"destroy": False},
                                                                 {"destroy": 1}, {"x": 1}]))),
           twice=st.booleans(), flip=st.integers(0, 10 ** 6))
    def test_backward_cells_of_every_shape(self, message, wrapping, cid, ip, extra, twice, flip):
        world = self.fresh()
        data = to_json(message)
        if wrapping == "not-json":
            data = data[:-1]
        elif wrapping == "not-object":
            data = b"[" + data + b"]"
        layers = world.hop_layers
        if wrapping == "two-layers":
            payload = world.backward(data, layers[:2])
        elif wrapping == "four-layers":
            payload = world.backward(data, layers + [Layer(crypto.new_session_key())])
        elif wrapping == "reversed":
            payload = world.backward(data, layers[::-1])
        elif wrapping == "forward-aad":
            payload = data
            for layer in reversed(layers):
                payload = layer.wrap(payload, FORWARD)
        else:
            payload = world.backward(data)
            if wrapping == "flipped":
                payload = bytearray(payload)
                payload[flip % len(payload)] ^= 0x40
                payload = bytes(payload)
        cell = {"CID": world.circuit.cid if cid == "ours" else cid, "payload": b64(payload), **extra}
        if extra.get("destroy") is True:
            del cell["payload"]
        body = to_json(cell)
        for attempt in range(2 if twice else 1):
            before = world.state()
            response = self.exchange(world, ip, post_json(body, host=HOST))
            self.assertIsNotNone(response)
            self.assertIn(response.status, CELL_STATUSES, (response.body[:200], message))
            if response.status != 200:
                after = world.state()
                # A cell whose three layers authenticate has its nonces recorded even when what
                # they held is refused (not JSON, not an object), like a node's forward layers
                # (docs/protocol.md section 2, choice 16); a replay of it is then 409, not 400.
                grew = [a - b for a, b in zip(after[2], before[2])]
                self.assertIn(grew, ([0, 0, 0], [1, 1, 1]), message)
                if grew == [1, 1, 1]:
                    self.assertIn(wrapping, ("right", "not-json", "not-object", "four-layers"), message)
                self.assertEqual(after[:2] + after[3:], before[:2] + before[3:],
                                 (response.status, response.body, message))
            elif attempt == 1:
                self.fail(f"a replayed backward cell was accepted: {message!r}")
            self.assertBounded(world)
            if world.peer.circuit is not world.circuit:
                break  # destroyed from the entry: the peer rebuilds

    @fuzz_settings(200)
    @given(body=hostile_bodies(), ip=st.sampled_from(IPS))
    def test_bodies_that_are_not_cells(self, body, ip):
        world = self.fresh()
        before = world.state()
        response = self.exchange(world, ip, post_json(body, host=HOST))
        self.assertIn(response.status, (400, 404, 413), response.body)
        self.assertEqual(world.state(), before)

    # --- the user's routes ------------------------------------------------------------------------

    @fuzz_settings(300)
    @given(method=methods, path=paths((b"/", b"/identity", b"/api/status", b"/api/downloads", b"/files/a.txt",
                                       b"/files/wanted.bin", b"/static/app.js", b"/static/index.html",
                                       b"/favicon.ico", b"/files/")),
           host=hosts, extra=header_lists, body=st.one_of(st.none(), hostile_bodies()), chunked=st.booleans(),
           ip=st.sampled_from(IPS))
    # Found by this property: Klein logged a traceback for each (a path or Host not UTF-8),
    # werkzeug made a 500 of a Host that is no IDNA name.
    @example(method=b"GET", path=b"/%ff", host=b"a", extra=[], body=None, chunked=False, ip=USER_IP)
    @example(method=b"GET", path=b"/", host=b"\xff", extra=[], body=None, chunked=False, ip=USER_IP)
    @example(method=b"GET", path=b"/", host=b".", extra=[], body=None, chunked=False, ip=USER_IP)
    @example(method=b"POST", path=b"/", host=b"a..b", extra=[], body=b"{}", chunked=False, ip=USER_IP)
    def test_any_request_on_any_route(self, method, path, host, extra, body, chunked, ip):
        world = self.fresh()
        raw = http_request(method, path, body, extra, host=host, chunked=chunked)
        framing = any(name.lower() in (b"content-length", b"transfer-encoding", b"expect") for name, _ in extra)
        response = self.exchange(world, ip, raw, head=method == b"HEAD")
        if response is None:
            self.assertTrue(framing, f"no answer to {raw[:300]!r}")
            return
        self.assertIn(response.status, CELL_STATUSES | USER_STATUSES, raw[:300])
        self.assertBounded(world)

    @fuzz_settings(300)
    @given(name=names, sha=weighted((3, st.none()), (1, st.just(WANTED_SHA)), (1, small_json)),
           extra=st.dictionaries(st.text(max_size=5), small_json, max_size=2),
           content_type=weighted((5, st.just(b"application/json")),
                                 (1, st.sampled_from([b"text/plain", b"application/json; charset=utf-8",
                                                      b"APPLICATION/JSON", b"multipart/form-data", b""]))),
           origin=weighted((5, st.none()), (1, st.sampled_from([b"http://evil.example", b"http://127.0.0.101:5000",
                                                                b"null", b"\xff"]))),
           ip=weighted((4, st.just(USER_IP)), (1, st.sampled_from(IPS))), as_json=st.booleans())
    def test_download_requests_of_every_shape(self, name, sha, extra, content_type, origin, ip, as_json):
        world = self.fresh()
        body = {"file": name, **extra}
        if sha is not None:
            body["sha256"] = sha
        headers = [(b"Content-Type", content_type)] if content_type else []
        if origin is not None:
            headers.append((b"Origin", origin))
        raw = http_request(b"POST", b"/api/downloads", to_json(body, ascii_only=as_json), headers, host=HOST)
        before = sorted(world.peer.downloads)
        response = self.exchange(world, ip, raw)
        self.assertIn(response.status, (202, 400, 403, 413, 415), response.body)
        if response.status != 202:
            self.assertEqual(sorted(world.peer.downloads), before)
            self.assertEqual(orjson.loads(response.body)["error"],
                             {400: "bad_request", 403: "forbidden", 415: "unsupported_media_type",
                              413: "too_large"}[response.status])
        self.assertBounded(world)
