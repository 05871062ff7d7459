"""The node's Klein app over a real twisted.web Site, in memory (issue 2).

Every request goes through ``tests/support/memory_http.py``: a real HTTP/1.1
client (treq over ``twisted.web.client.Agent``) talks to ``QuietSite(NodeApp.resource(),
max_body=65536)`` over an ``iosim`` transport pair whose server side reports
the chosen client IP, so the node tells its neighbours apart exactly as over
TCP. Nothing touches a socket or the global reactor, and nothing waits: with
nothing held by the test, every request is answered while ``post`` pumps the
connections (``successResultOf``), so a node that stalls fails at once.

The node (127.0.0.11) relays through a fake outbound whose answers each test
scripts: a "next node" (127.0.0.12) whose RSA key the test holds, a fake
tracker (127.0.0.1), refusals and timeouts. Its directory is a fake whose
signed copy is made with an Ed25519 key the test holds.

The tests follow PROTOCOL.md §3's status table row by row. Each error row
checks the status, the JSON ``error`` field, and that the relay table (circuits,
OutCIDs, bridges) is the same after the refused request as before it, and that
nothing was relayed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from typing import NamedTuple

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.internet import defer, task
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from onion_twisted import PROTOCOL
from onion_twisted.protocol import cells, control, crypto, wire
from onion_twisted.node.circuits import EXIT, NODE, RelayTable
from onion_twisted.protocol.crypto import BACKWARD, FORWARD, Layer
from onion_twisted.protocol.directory import parse_signed_directory
from onion_twisted.protocol.errors import NextHopFailed, NextHopTimeout
from onion_twisted.net.http_client import BytesProducer, HTTPOutbound
from onion_twisted.net.http_server import QuietSite
from onion_twisted.node.app import NodeApp
from onion_twisted.net.ratelimit import RateLimiter
from onion_twisted.node.relay import NodeRelay

from tests.support.fakes import FakeDirectory, FakeOutbound
from tests.support.memory_http import MemoryAgent, Pumps, memory_client

PORT = 5000
NOW = 1_700_000_000
MAX_BODY = 65536
BURST = 3

NODE_KEY = rsa.generate_private_key(public_exponent=65537, key_size=1024)
NEXT_KEY = rsa.generate_private_key(public_exponent=65537, key_size=1024)
TRACKER_KEY = ed25519.Ed25519PrivateKey.generate()
FORGER_KEY = ed25519.Ed25519PrivateKey.generate()

NODE_IP = "127.0.0.11"
NEXT_IP = "127.0.0.12"
OUTSIDER_IP = "127.0.0.13"      # a host that is not in the directory
SHARER_EXIT_IP = "127.0.0.14"
TRACKER_IP = "127.0.0.1"
PEER_IP = "127.0.0.101"
OTHER_PEER_IP = "127.0.0.102"
STRANGER_IP = "127.0.0.66"

NODE_ADDR = wire.Address(NODE_IP, PORT)
NEXT_ADDR = wire.Address(NEXT_IP, PORT)
OUTSIDER_ADDR = wire.Address(OUTSIDER_IP, PORT)
TRACKER_ADDR = wire.Address(TRACKER_IP, PORT)
PEER_ADDR = wire.Address(PEER_IP, PORT)
URL = NODE_ADDR.url("/")
JSON = {b"Content-Type": [b"application/json"]}

FILES_REPLY = {"type": "files", "files": []}
PONG = b'{"type":"pong"}'


def _directory_body() -> bytes:
    # Indented, with a trailing newline: a node that re-encoded it would change its bytes.
    return json.dumps({"issued": NOW, "nodes": [
        {"address": str(a), "public_key": crypto.public_key_pem(k), "fingerprint": crypto.fingerprint(k)}
        for a, k in ((NODE_ADDR, NODE_KEY), (NEXT_ADDR, NEXT_KEY))]}, indent=2).encode("utf-8") + b"\n"


DIRECTORY_BODY = _directory_body()
DIRECTORY_SIGNATURE = crypto.sign_body(TRACKER_KEY, DIRECTORY_BODY)
SIGNED_DIRECTORY = parse_signed_directory(DIRECTORY_BODY, DIRECTORY_SIGNATURE, TRACKER_KEY.public_key(), PORT)


# --- what a peer does ----------------------------------------------------------------


def create_cell(cid: str, public_key) -> tuple[bytes, Layer]:
    """A CREATE cell for ``cid`` and the session layer it carries."""
    session_key = crypto.new_session_key()
    return cells.encode_cell(cid, crypto.seal_session_key(public_key, session_key)), Layer(session_key)


def sealed_create(public_key) -> tuple[str, Layer]:
    """The ``relay`` of an EXTEND to a node: base64 of a sealed session key."""
    session_key = crypto.new_session_key()
    return wire.b64encode(crypto.seal_session_key(public_key, session_key)), Layer(session_key)


def onion_cell(cid: str, layers: list[Layer], message: bytes) -> bytes:
    return cells.encode_cell(cid, crypto.wrap_onion(layers, message))


def extend_message(to, relay) -> bytes:
    return orjson.dumps({"to": str(to), "relay": relay})


def reply_with(layer: bytes) -> bytes:
    return orjson.dumps({"payload": wire.b64encode(layer)})


def peel_reply(raw: bytes, layers: list[Layer]) -> bytes:
    return crypto.peel_onion(layers, wire.b64decode(orjson.loads(raw)["payload"]))


# --- the fakes around the node ----------------------------------------------------------
# The outbound and the directory are tests/support/fakes.py's; these are the members its routes reach.


class CellTaker:
    """A member's ``POST /`` for a route: a destroy is recorded and answered ``{}``, any other cell ``answer``s."""

    def __init__(self):
        self.received: list[tuple] = []
        self.destroyed: list[str] = []

    def __call__(self, body: bytes) -> bytes:
        cell = cells.parse_cell(body)
        if cell.destroy:
            self.destroyed.append(cell.cid)
            return b"{}"
        return self.answer(cell)

    def answer(self, cell: cells.Cell) -> bytes:
        raise NotImplementedError


class FakeNextNode(CellTaker):
    """The next node: answers CREATE with ``created`` and forward messages with a pong."""

    received: list[tuple[str, bytes]]  # (CID, plaintext) of each forward message

    def __init__(self, key):
        super().__init__()
        self.key = key
        self.layers: dict[str, Layer] = {}

    def answer(self, cell: cells.Cell) -> bytes:
        data = cells.payload_bytes(cell)
        layer = self.layers.get(cell.cid)
        if layer is None:
            layer = self.layers[cell.cid] = Layer(crypto.open_session_key(self.key, data))
            return reply_with(layer.wrap(cells.CREATED, BACKWARD))
        _, plaintext = layer.peel(data, FORWARD)
        self.received.append((cell.cid, plaintext))
        return reply_with(layer.wrap(PONG, BACKWARD))


class FakeTracker(CellTaker):
    """The tracker: records each message's (CID, object) and answers a files list."""

    received: list[tuple[str, dict]]  # (CID, message)

    def answer(self, cell: cells.Cell) -> bytes:
        self.received.append((cell.cid, cells.payload_object(cell)))
        return orjson.dumps({"payload": FILES_REPLY})


class Recorder:
    """Any member's ``POST /``: records cells and answers ``{}``."""

    def __init__(self):
        self.received: list[cells.Cell] = []

    def __call__(self, body: bytes) -> bytes:
        self.received.append(cells.parse_cell(body))
        return b"{}"


class NextHopResource(Resource):
    """A next hop over real HTTP: answers ``status``/``body``, or holds the request if status is None."""

    isLeaf = True

    def __init__(self, status, body=b"{}"):
        super().__init__()
        self.status = status
        self.body = body
        self.requests: list[tuple[str, bytes]] = []
        self.held = []

    def render_POST(self, request):
        self.requests.append((request.getClientAddress().host, request.content.getvalue()))
        if self.status is None:
            self.held.append(request)
            return NOT_DONE_YET
        request.setResponseCode(self.status)
        request.setHeader(b"Content-Type", b"application/json")
        if 300 <= self.status < 400:
            request.setHeader(b"Location", b"http://127.0.0.99:5000/internal")
            request.setHeader(b"Set-Cookie", b"tracking=1; Path=/")
        return self.body

    def render_GET(self, request):
        self.requests.append((request.getClientAddress().host, b"GET " + request.uri))
        return b'{"payload": "c2VjcmV0"}'


class ChunkedProducer(BytesProducer):
    """A body of unannounced length: the client sends it chunked, with no Content-Length."""

    def __init__(self, body: bytes, chunk: int = 4096):
        super().__init__(body)
        self.length = UNKNOWN_LENGTH
        self.body = body
        self.chunk = chunk

    def startProducing(self, consumer):
        for i in range(0, len(self.body), self.chunk):
            consumer.write(self.body[i:i + self.chunk])
        return defer.succeed(None)


class StalledProducer(BytesProducer):
    """Announces ``length`` bytes, sends the first ``sent`` of them, then never finishes."""

    def __init__(self, body: bytes, sent: int = 1024):
        super().__init__(body)
        self.body = body
        self.sent = sent

    def startProducing(self, consumer):
        consumer.write(self.body[:self.sent])
        return defer.Deferred()


class Answer(NamedTuple):
    code: int
    headers: object
    raw: bytes

    @property
    def json(self):
        return orjson.loads(self.raw)

    def header(self, name: bytes):
        return self.headers.getRawHeaders(name)


# --- the fixture ----------------------------------------------------------------------------


class NodeAppCase(unittest.TestCase):
    timeout = 10

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.table = RelayTable(self.clock)
        self.limiter = RateLimiter(self.clock, rate=1.0, burst=BURST)
        # A route's refusal (NextHopFailed, NextHopTimeout) reaches the node as the route raised it.
        self.outbound = FakeOutbound(as_http=False)
        self.outbound.unreachable = "next hop is unreachable"
        self.next_node = FakeNextNode(NEXT_KEY)
        self.tracker = FakeTracker()
        self.peer_member = Recorder()
        self.outbound.routes.update({NEXT_ADDR: self.next_node, TRACKER_ADDR: self.tracker,
                                     PEER_ADDR: self.peer_member})
        self.directory = FakeDirectory(SIGNED_DIRECTORY, TRACKER_KEY.public_key())
        self.relay = NodeRelay(clock=self.clock, private_key=NODE_KEY, own_address=NODE_ADDR,
                               tracker=TRACKER_ADDR, table=self.table, outbound=self.outbound,
                               directory=self.directory, limiter=self.limiter)
        self.handled: list[tuple] = []
        handle = self.relay.handle

        async def spy(*args):
            self.handled.append(args)
            return await handle(*args)

        self.relay.handle = spy
        self.app = NodeApp(self.relay, self.directory)
        self.site = QuietSite(self.app.resource(), max_body=MAX_BODY, reactor=MemoryReactorClock())
        self.pumps = Pumps()
        self._clients = {}

    def tearDown(self):
        self.pumps.flush()
        self.assertEqual(len(self.pumps), 0, "a connection was left open")

    # --- HTTP ------------------------------------------------------------------------------

    def client(self, ip):
        if ip not in self._clients:
            self._clients[ip] = memory_client(self.site, ip, pumps=self.pumps)
        return self._clients[ip]

    def request(self, method, path="/", *, ip=PEER_IP, data=None, headers=None) -> defer.Deferred:
        """Deferred[Answer]; fired unless the node is waiting on something the test holds."""
        client = self.client(ip)
        kwargs = {"headers": headers if headers is not None else JSON}
        if data is not None:
            kwargs["data"] = data
        d = client.request(method, NODE_ADDR.url(path), **kwargs)
        d.addCallback(lambda r: client.content(r).addCallback(lambda raw: Answer(r.code, r.headers, raw)))
        answered = []
        d.addBoth(lambda result: answered.append(True) or result)
        client.until(d)
        for _ in range(16):  # a bulk cell waits for the reactor's next turn (cell_scheduler.py)
            if answered or not len(self.app.cells):
                break
            self.clock.advance(0)
            client.until(d)
        return d

    def post_pending(self, body, *, ip=PEER_IP, headers=None) -> defer.Deferred:
        return self.request("POST", data=body, ip=ip, headers=headers)

    def post(self, body, *, ip=PEER_IP, headers=None) -> Answer:
        """POST / and its answer: in memory, with nothing held, the node answers at once."""
        return self.successResultOf(self.post_pending(body, ip=ip, headers=headers))

    def get(self, path, *, ip=PEER_IP) -> Answer:
        return self.successResultOf(self.request("GET", path, ip=ip))

    def control_headers(self, signature: str) -> dict:
        return {b"Content-Type": [b"application/json"], b"X-Onion-Signature": [signature.encode("ascii")]}

    def post_control(self, payload, *, key=TRACKER_KEY):
        body, signature = control.sign_control(key, payload)
        return self.post(body, ip=TRACKER_IP, headers=self.control_headers(signature))

    # --- state ------------------------------------------------------------------------------

    def state(self):
        t = self.table
        return {
            "circuits": len(t),
            "bridges": t.bridge_count,
            "by_in": sorted(t.by_in),
            "by_out": sorted(t.by_out),
            "links": sorted((c.in_cid, c.in_ip, c.out_cid, c.out_kind, str(c.out_addr), c.extending)
                            for c in t.by_in.values()),
            "bridges_in": sorted(t.bridges_in),
            "bridges_out": sorted(t.bridges_out),
        }

    def assertError(self, answer: Answer, status: int, error: str):
        self.assertEqual((answer.code, answer.json.get("error")), (status, error), answer.raw)
        self.assertIsInstance(answer.json.get("detail"), str)
        self.assertEqual(answer.header(b"Content-Type"), [b"application/json"])

    def assertRefused(self, status: int, error: str, body: bytes, *, ip=PEER_IP, headers=None) -> Answer:
        """Send ``body``: the answer is ``status``/``error``, no state changed, nothing was relayed."""
        before, circuits, bridges = self.state(), len(self.table), self.table.bridge_count
        sent = len(self.outbound.sent)
        answer = self.post(body, ip=ip, headers=headers)
        self.assertError(answer, status, error)
        self.assertEqual((len(self.table), self.table.bridge_count), (circuits, bridges))
        self.assertEqual(self.state(), before)
        self.assertEqual(self.outbound.sent[sent:], [])
        return answer

    def assertExtendRefusedAndClosed(self, status: int, error: str, cid: str, body: bytes, *, ip=PEER_IP) -> Answer:
        """Send a failing EXTEND on circuit ``cid``: the answer is ``status``/``error``, the
        circuit is gone (a failed EXTEND closes it), the neighbour it came from is told by
        a destroy, and nothing else changed."""
        before = self.state()
        sent = len(self.outbound.sent)
        answer = self.post(body, ip=ip)
        self.assertError(answer, status, error)
        expected = dict(before, circuits=before["circuits"] - 1,
                        by_in=[c for c in before["by_in"] if c != cid],
                        links=[link for link in before["links"] if link[0] != cid])
        self.assertEqual(self.state(), expected)
        destroys = [(s.address, s.body) for s in self.outbound.sent[sent:] if cells.parse_cell(s.body).destroy]
        self.assertEqual(destroys, [(wire.Address(ip, NODE_ADDR.port), cells.encode_destroy(cid))])
        return answer

    # --- circuits --------------------------------------------------------------------------

    def open_circuit(self, ip=PEER_IP) -> tuple[str, list[Layer]]:
        cid = wire.new_circuit_id()
        body, layer = create_cell(cid, NODE_KEY.public_key())
        answer = self.post(body, ip=ip)
        self.assertEqual(answer.code, 200, answer.raw)
        self.assertEqual(peel_reply(answer.raw, [layer]), cells.CREATED)
        return cid, [layer]

    def extend_to_next(self) -> tuple[str, list[Layer], str]:
        cid, layers = self.open_circuit()
        relay, next_layer = sealed_create(NEXT_KEY.public_key())
        answer = self.post(onion_cell(cid, layers, extend_message(NEXT_ADDR, relay)))
        self.assertEqual(answer.code, 200, answer.raw)
        layers = layers + [next_layer]
        self.assertEqual(peel_reply(answer.raw, layers), cells.CREATED)
        return cid, layers, self.outbound.to(NEXT_ADDR)[-1].cell.cid

    def extend_to_tracker(self) -> tuple[str, list[Layer], str]:
        cid, layers = self.open_circuit()
        answer = self.post(onion_cell(cid, layers, extend_message(TRACKER_ADDR, {"type": "ls", "files": []})))
        self.assertEqual(answer.code, 200, answer.raw)
        self.assertEqual(orjson.loads(peel_reply(answer.raw, layers)), FILES_REPLY)
        return cid, layers, self.tracker.received[-1][0]


# --- GET routes ---------------------------------------------------------------------------------


class ReadOnlyRoutesTests(NodeAppCase):
    def test_identity_names_the_node_and_its_key(self):
        answer = self.get("/identity")
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.header(b"Content-Type"), [b"application/json"])
        identity = answer.json
        der = NODE_KEY.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
        self.assertEqual(identity["role"], "node")
        self.assertEqual(identity["protocol"], "onion-http/2")
        self.assertEqual(identity["protocol"], PROTOCOL)
        self.assertEqual(identity["address"], "127.0.0.11:5000")
        self.assertEqual(identity["fingerprint"], hashlib.sha256(der).hexdigest())
        published = serialization.load_pem_public_key(identity["public_key"].encode("ascii"))
        self.assertEqual(published.public_numbers(), NODE_KEY.public_key().public_numbers())
        self.assertTrue(identity["public_key"].startswith("-----BEGIN PUBLIC KEY-----"))

    def test_identity_shows_protocols_and_the_current_onion_key(self):
        identity = self.get("/identity").json
        self.assertEqual(identity["protocols"], ["onion-http/1", "onion-http/2"])
        self.assertEqual(base64.b64decode(identity["onion_key"]), self.relay.onion_keys.current_public)
        # A rotated key shows at once; a node refusing /1 lists only /2.
        self.clock.advance(self.relay.onion_keys.lifetime)
        self.assertTrue(self.relay.onion_keys.rotate_if_due())
        self.relay.accept_v1 = False
        identity = self.get("/identity").json
        self.assertEqual(base64.b64decode(identity["onion_key"]), self.relay.onion_keys.current_public)
        self.assertEqual((identity["protocol"], identity["protocols"]), ("onion-http/2", ["onion-http/2"]))
        # A node of /1 only (speak_v2 = false) shows no onion key.
        self.relay.accept_v1, self.relay.onion_keys = True, None
        identity = self.get("/identity").json
        self.assertEqual((identity["protocol"], identity["protocols"]), ("onion-http/1", ["onion-http/1"]))
        self.assertNotIn("onion_key", identity)

    def test_nodes_mirrors_the_tracker_body_and_signature_byte_for_byte(self):
        answer = self.get("/nodes")
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.raw, DIRECTORY_BODY)
        self.assertEqual(answer.header(b"X-Onion-Signature"), [DIRECTORY_SIGNATURE.encode("ascii")])
        self.assertTrue(crypto.verify_body(TRACKER_KEY.public_key(), answer.raw,
                                           answer.header(b"X-Onion-Signature")[0]))

    def test_nodes_is_503_before_any_directory(self):
        self.directory.current = None
        answer = self.get("/nodes")
        self.assertError(answer, 503, "unavailable")
        self.assertIsNone(answer.header(b"X-Onion-Signature"))

    def test_metrics_is_prometheus_text_counting_the_traffic(self):
        cid, layers, _ = self.extend_to_next()
        self.assertEqual(self.post(onion_cell(cid, layers, b'{"type":"ping"}')).code, 200)
        self.assertRefused(400, "bad_request", b"{")
        self.assertRefused(403, "forbidden", onion_cell(cid, layers, b"{}"), ip=STRANGER_IP)
        answer = self.get("/metrics")
        self.assertEqual(answer.code, 200)
        self.assertTrue(answer.header(b"Content-Type")[0].startswith(b"text/plain; version=0.0.4"))
        text = answer.raw.decode("utf-8")
        self.assertTrue(text.endswith("\n"))
        samples, types = {}, {}
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(" ")
                types[name] = kind
            elif line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                samples[name] = float(value)
        self.assertEqual(types["onion_node_circuits"], "gauge")
        self.assertEqual(types["onion_node_cells_total"], "counter")
        self.assertEqual(types["onion_node_errors_total"], "counter")
        self.assertEqual(types["onion_node_creates_total"], "counter")
        self.assertEqual(samples["onion_node_circuits"], 1)
        # The extend and the ping went forward; their two replies came back.
        self.assertEqual(samples['onion_node_cells_total{direction="forward"}'], 2)
        self.assertEqual(samples['onion_node_cells_total{direction="backward"}'], 2)
        self.assertEqual(samples['onion_node_errors_total{status="400"}'], 1)
        self.assertEqual(samples['onion_node_errors_total{status="403"}'], 1)
        self.assertEqual(samples["onion_node_creates_total"], 1)
        self.assertEqual(types["onion_node_queued_bytes_peak"], "gauge")
        self.assertEqual(samples["onion_node_queued_cells"], 0)  # small cells are never queued
        self.assertEqual(samples["onion_node_queued_bytes_peak"], 0)

    def test_status_page_shows_the_fingerprint_and_never_a_cid_nor_an_address(self):
        cid, layers, out_cid = self.extend_to_next()
        self.assertEqual(self.post(onion_cell(cid, layers, b'{"type":"ping"}')).code, 200)
        answer = self.get("/", ip=PEER_IP)
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.header(b"Content-Type"), [b"text/html; charset=utf-8"])
        page = answer.raw.decode("utf-8")
        self.assertTrue(page.lstrip().lower().startswith("<!doctype html>"))
        self.assertIn(crypto.fingerprint(NODE_KEY), page)
        for secret in (cid, out_cid, PEER_IP, NEXT_IP):
            self.assertNotIn(secret, page)


# --- 200 -------------------------------------------------------------------------------------------


class AcceptedTests(NodeAppCase):
    def test_200_create_reply_peels_to_created(self):
        cid = wire.new_circuit_id()
        body, layer = create_cell(cid, NODE_KEY.public_key())
        answer = self.post(body)
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.header(b"Content-Type"), [b"application/json"])
        self.assertEqual(set(answer.json), {"payload"})
        self.assertEqual(peel_reply(answer.raw, [layer]), b'{"type":"created"}')
        self.assertEqual(self.table.by_in[cid].in_ip, PEER_IP)
        self.assertIsNone(self.table.by_in[cid].out_cid)
        self.assertEqual(self.outbound.sent, [])

    def test_200_extend_to_a_node_then_forward_message(self):
        cid, layers, out_cid = self.extend_to_next()
        circuit = self.table.by_in[cid]
        self.assertEqual((circuit.out_addr, circuit.out_ip, circuit.out_kind), (NEXT_ADDR, NEXT_IP, NODE))
        self.assertIs(self.table.by_out[out_cid], circuit)
        self.assertNotEqual(out_cid, cid)
        answer = self.post(onion_cell(cid, layers, b'{"type":"ping"}'))
        self.assertEqual(answer.code, 200)
        self.assertEqual(peel_reply(answer.raw, layers), PONG)
        self.assertEqual(self.next_node.received, [(out_cid, b'{"type":"ping"}')])

    def test_200_extend_to_the_tracker_then_forward_object(self):
        cid, layers, out_cid = self.extend_to_tracker()
        self.assertEqual(self.table.by_in[cid].out_kind, EXIT)
        answer = self.post(onion_cell(cid, layers, b'{"type":"list"}'))
        self.assertEqual(answer.code, 200)
        self.assertEqual(orjson.loads(peel_reply(answer.raw, layers)), FILES_REPLY)
        self.assertEqual(self.tracker.received, [(out_cid, {"type": "ls", "files": []}),
                                                 (out_cid, {"type": "list"})])

    def test_200_backward_from_the_next_hop_goes_to_the_peer(self):
        cid, layers, out_cid = self.extend_to_next()
        inner = os.urandom(40)
        answer = self.post(cells.encode_cell(out_cid, inner), ip=NEXT_IP)
        self.assertEqual((answer.code, answer.json), (200, {}))
        [cell] = self.peer_member.received
        self.assertEqual(cell.cid, cid)
        _, data = layers[0].peel(wire.b64decode(cell.payload), BACKWARD)
        self.assertEqual(data, inner)

    def test_200_destroy_drops_the_circuit_and_passes_it_on(self):
        cid, layers, out_cid = self.extend_to_next()
        answer = self.post(cells.encode_destroy(cid))
        self.assertEqual((answer.code, answer.json), (200, {}))
        self.assertEqual((len(self.table), self.table.by_out), (0, {}))
        self.assertEqual(self.next_node.destroyed, [out_cid])

    def test_200_signed_control_make_receive_drop_bridge(self):
        _, _, out_cid = self.extend_to_tracker()
        sending, receiving = wire.new_circuit_id(), wire.new_circuit_id()
        answer = self.post_control({"type": "make_bridge", "issued": NOW, "CID": out_cid,
                                          "transfer": "t1", "to": OUTSIDER_IP, "bridge_CID": sending})
        self.assertEqual((answer.code, answer.json), (200, {}))
        self.assertEqual(self.table.bridge_count, 1)
        self.assertEqual(self.table.bridges_out[sending].peer_addr, OUTSIDER_ADDR)
        answer = self.post_control({"type": "receive_bridge", "issued": NOW - 30, "CID": out_cid,
                                          "from": f"{SHARER_EXIT_IP}:{PORT}", "bridge_CID": receiving})
        self.assertEqual((answer.code, answer.json), (200, {}))
        self.assertEqual(self.table.bridge_count, 2)
        self.assertEqual(self.table.bridges_in[receiving].peer_ip, SHARER_EXIT_IP)
        answer = self.post_control({"type": "drop_bridge", "issued": NOW, "bridge_CID": sending})
        self.assertEqual((answer.code, answer.json), (200, {}))
        self.assertEqual((self.table.bridge_count, list(self.table.bridges_in)), (1, [receiving]))
        answer = self.post_control({"type": "drop_bridge", "issued": NOW, "bridge_CID": receiving})
        self.assertEqual((answer.code, answer.json), (200, {}))
        self.assertEqual(self.table.bridge_count, 0)
        self.assertEqual(len(self.table), 1)

    def test_200_file_chunk_crosses_the_bridge_not_the_tracker(self):
        cid, layers, out_cid = self.extend_to_tracker()
        bridge_cid = wire.new_circuit_id()
        other_exit = Recorder()
        self.outbound.routes[OUTSIDER_ADDR] = other_exit
        answer = self.post_control({"type": "make_bridge", "issued": NOW, "CID": out_cid,
                                          "transfer": "t1", "to": OUTSIDER_IP, "bridge_CID": bridge_cid})
        self.assertEqual(answer.code, 200)
        chunk = {"type": "file_chunk", "transfer": "t1", "file": "a", "chunk_idx": 0,
                 "chunk_size": 16384, "size": 1, "data": "eA=="}
        answer = self.post(onion_cell(cid, layers, orjson.dumps(chunk)))
        self.assertEqual((answer.code, answer.json), (200, {}))
        self.assertEqual([(c.cid, c.payload) for c in other_exit.received], [(bridge_cid, chunk)])
        self.assertEqual(len(self.tracker.received), 1)  # only the first ls


# --- 400 -------------------------------------------------------------------------------------------


class BadRequestTests(NodeAppCase):
    def test_400_malformed_json(self):
        self.assertRefused(400, "bad_request", b'{"CID": "')

    def test_400_not_an_object(self):
        self.assertRefused(400, "bad_request", b'["CID", "payload"]')

    def test_400_missing_cid(self):
        self.assertRefused(400, "bad_request", orjson.dumps({"payload": "AAAA"}))

    def test_400_missing_payload(self):
        self.assertRefused(400, "bad_request", orjson.dumps({"CID": wire.new_circuit_id()}))

    def test_400_bad_base64(self):
        answer = self.assertRefused(400, "bad_request",
                                    orjson.dumps({"CID": wire.new_circuit_id(), "payload": "no*base64!"}))
        self.assertIn("base64", answer.json["detail"])

    def test_400_undecryptable_create(self):
        sealed_for_another = crypto.seal_session_key(NEXT_KEY.public_key(), crypto.new_session_key())
        self.assertRefused(400, "bad_request", cells.encode_cell(wire.new_circuit_id(), sealed_for_another))
        self.assertRefused(400, "bad_request", cells.encode_cell(wire.new_circuit_id(), os.urandom(128)))

    def test_400_undecryptable_layer_on_a_known_circuit(self):
        cid, layers = self.open_circuit()
        self.assertRefused(400, "bad_request", cells.encode_cell(cid, os.urandom(64)))
        # Under the right key but with the backward AAD: a reflected layer.
        reflected = layers[0].wrap(b'{"to": "127.0.0.12", "relay": "AAAA"}', BACKWARD)
        self.assertRefused(400, "bad_request", cells.encode_cell(cid, reflected))
        self.assertIsNone(self.table.by_in[cid].nonces)

    def test_400_invalid_utf8(self):
        cid = wire.new_circuit_id().encode("ascii")
        self.assertRefused(400, "bad_request", b'{"CID": "' + cid + b'", "payload": "\xff\xfeAA"}')

    def test_400_invalid_utf8_inside_the_layer(self):
        cid, layers = self.open_circuit()
        self.assertExtendRefusedAndClosed(400, "bad_request", cid,
                                          onion_cell(cid, layers, b'{"to": "127.0.0.12", "relay": "\xff"}'))


# --- 403 ---------------------------------------------------------------------------------------------


class ForbiddenTests(NodeAppCase):
    def test_403_forward_from_a_wrong_neighbour(self):
        cid, layers = self.open_circuit()
        relay, _ = sealed_create(NEXT_KEY.public_key())
        cell = onion_cell(cid, layers, extend_message(NEXT_ADDR, relay))
        self.assertRefused(403, "forbidden", cell, ip=STRANGER_IP)
        # The stranger used up nothing: the same cell from the peer still extends.
        self.assertEqual(self.post(cell).code, 200)
        self.assertEqual(self.table.by_in[cid].out_addr, NEXT_ADDR)

    def test_403_backward_from_a_wrong_neighbour(self):
        _, _, out_cid = self.extend_to_next()
        self.assertRefused(403, "forbidden", cells.encode_cell(out_cid, os.urandom(40)), ip=STRANGER_IP)
        # ... nor from the peer, which is the circuit's other end.
        self.assertRefused(403, "forbidden", cells.encode_cell(out_cid, os.urandom(40)), ip=PEER_IP)
        self.assertEqual(self.peer_member.received, [])

    def test_403_bad_control_signature(self):
        _, _, out_cid = self.extend_to_tracker()
        payload = {"type": "make_bridge", "issued": NOW, "CID": out_cid, "transfer": "t1",
                   "to": OUTSIDER_IP, "bridge_CID": wire.new_circuit_id()}
        body, forged = control.sign_control(FORGER_KEY, payload)
        self.assertRefused(403, "forbidden", body, ip=TRACKER_IP, headers=self.control_headers(forged))
        self.assertRefused(403, "forbidden", body, ip=TRACKER_IP, headers=JSON)
        # A good signature over other bytes does not carry over.
        _, good = control.sign_control(TRACKER_KEY, payload)
        self.assertRefused(403, "forbidden", body.replace(b"t1", b"t2"), ip=TRACKER_IP,
                           headers=self.control_headers(good))
        self.assertEqual(self.table.bridge_count, 0)

    def test_403_control_issued_61_seconds_ago(self):
        _, _, out_cid = self.extend_to_tracker()
        payload = {"type": "make_bridge", "issued": NOW - 61, "CID": out_cid, "transfer": "t1",
                   "to": OUTSIDER_IP, "bridge_CID": wire.new_circuit_id()}
        body, signature = control.sign_control(TRACKER_KEY, payload)
        answer = self.assertRefused(403, "forbidden", body, ip=TRACKER_IP,
                                    headers=self.control_headers(signature))
        self.assertIn("stale", answer.json["detail"])
        # The same message issued 59 s ago is accepted.
        answer = self.post_control(dict(payload, issued=NOW - 59))
        self.assertEqual(answer.code, 200)
        self.assertEqual(self.table.bridge_count, 1)

    def test_403_exit_policy_object_relay_to_a_non_tracker(self):
        cid, layers = self.open_circuit()
        cell = onion_cell(cid, layers, extend_message(NEXT_ADDR, {"type": "ls", "files": []}))
        answer = self.assertExtendRefusedAndClosed(403, "forbidden", cid, cell)
        self.assertIn("exit policy", answer.json["detail"])
        self.assertEqual(self.outbound.to(NEXT_ADDR), [])

    def test_403_extend_to_an_address_not_in_the_directory(self):
        cid, layers = self.open_circuit()
        relay, _ = sealed_create(NEXT_KEY.public_key())
        self.assertExtendRefusedAndClosed(403, "forbidden", cid,
                                          onion_cell(cid, layers, extend_message(OUTSIDER_ADDR, relay)))
        self.assertEqual(self.directory.asked, [OUTSIDER_ADDR])
        self.assertEqual(self.outbound.to(OUTSIDER_ADDR), [])


# --- 404 ------------------------------------------------------------------------------------------------


class UnknownCircuitTests(NodeAppCase):
    def test_404_destroy_for_an_unknown_cid(self):
        self.open_circuit()
        self.assertRefused(404, "unknown_circuit", cells.encode_destroy(wire.new_circuit_id()))

    def test_404_drop_bridge_for_an_unknown_bridge(self):
        body, signature = control.sign_control(TRACKER_KEY, {"type": "drop_bridge", "issued": NOW,
                                                             "bridge_CID": wire.new_circuit_id()})
        self.assertRefused(404, "unknown_circuit", body, ip=TRACKER_IP,
                           headers=self.control_headers(signature))

    def test_404_make_bridge_for_an_unknown_circuit(self):
        exit_in_cid, _, _ = self.extend_to_tracker()
        _, _, node_out_cid = self.extend_to_next()
        # Unknown; an InCID (not an exit's OutCID); the OutCID of a circuit that goes on to a node.
        for unknown in (wire.new_circuit_id(), exit_in_cid, node_out_cid):
            for payload in ({"type": "make_bridge", "transfer": "t1", "to": OUTSIDER_IP},
                            {"type": "receive_bridge", "from": SHARER_EXIT_IP}):
                body, signature = control.sign_control(TRACKER_KEY, dict(
                    payload, issued=NOW, CID=unknown, bridge_CID=wire.new_circuit_id()))
                self.assertRefused(404, "unknown_circuit", body, ip=TRACKER_IP,
                                   headers=self.control_headers(signature))


# --- 409 ------------------------------------------------------------------------------------------------


class ConflictTests(NodeAppCase):
    def test_409_replayed_layer_is_not_relayed(self):
        cid, layers, out_cid = self.extend_to_next()
        cell = onion_cell(cid, layers, b'{"type":"ping"}')
        sent = len(self.outbound.to(NEXT_ADDR))
        self.assertEqual(self.post(cell).code, 200)
        self.assertRefused(409, "conflict", cell)
        self.assertEqual(len(self.outbound.to(NEXT_ADDR)), sent + 1)
        self.assertEqual(self.next_node.received, [(out_cid, b'{"type":"ping"}')])

    def test_409_extend_while_another_extend_is_in_progress(self):
        cid, layers = self.open_circuit()
        held = []

        def hold(body):
            held.append((body, defer.Deferred()))
            return held[-1][1]

        self.outbound.routes[NEXT_ADDR] = hold
        relay, next_layer = sealed_create(NEXT_KEY.public_key())
        first = self.post_pending(onion_cell(cid, layers, extend_message(NEXT_ADDR, relay)))
        self.assertNoResult(first)
        self.assertEqual(len(held), 1)
        self.assertTrue(self.table.by_in[cid].extending)
        other, _ = sealed_create(NEXT_KEY.public_key())
        self.assertRefused(409, "conflict", onion_cell(cid, layers, extend_message(NEXT_ADDR, other)))
        self.assertEqual(len(held), 1)
        self.assertIsNone(self.table.by_in[cid].out_cid)
        # The next node answers the first extend: it completes.
        body, d = held[0]
        d.callback(self.next_node(body))
        self.client(PEER_IP).until(first)
        answer = self.successResultOf(first)
        self.assertEqual(answer.code, 200)
        self.assertEqual(peel_reply(answer.raw, layers + [next_layer]), cells.CREATED)
        self.assertEqual(self.table.by_in[cid].out_cid, cells.parse_cell(body).cid)
        self.assertFalse(self.table.by_in[cid].extending)


# --- 413 -------------------------------------------------------------------------------------------------


class TooLargeTests(NodeAppCase):
    def setUp(self):
        super().setUp()
        self.lengths = []   # the length each request announced (None: chunked)
        self.kept = []      # body bytes each request accepted before it refused the rest
        lengths, kept = self.lengths, self.kept

        class Recording(self.site.requestFactory):
            def gotLength(self, length):
                lengths.append(length)
                kept.append(0)
                super().gotLength(length)

            def handleContentChunk(self, data):
                super().handleContentChunk(data)
                if not self._too_large:
                    kept[-1] += len(data)

        self.site.requestFactory = Recording

    def cell_of_size(self, size: int) -> bytes:
        head = b'{"CID":"' + wire.new_circuit_id().encode("ascii") + b'","payload":"'
        body = head + b"A" * (size - len(head) - 2) + b'"}'
        self.assertEqual(len(body), size)
        return body

    def test_413_body_over_max_body_with_content_length(self):
        self.open_circuit()
        handled = len(self.handled)
        self.assertRefused(413, "too_large", self.cell_of_size(MAX_BODY + 1))
        self.assertEqual(self.lengths[-1], MAX_BODY + 1)
        self.assertEqual(self.kept[-1], 0)  # refused on the announced length, before any body byte
        # The answer does not wait for the body: 1 KiB of the announced 64 KiB + 1 was sent.
        self.assertRefused(413, "too_large", StalledProducer(self.cell_of_size(MAX_BODY + 1)))
        self.assertEqual(self.lengths[-1], MAX_BODY + 1)
        self.assertEqual(len(self.handled), handled)

    def test_413_body_over_max_body_without_content_length(self):
        self.open_circuit()
        handled = len(self.handled)
        self.assertRefused(413, "too_large", ChunkedProducer(self.cell_of_size(MAX_BODY + 1)))
        self.assertIsNone(self.lengths[-1])
        self.assertLessEqual(self.kept[-1], MAX_BODY)
        self.assertEqual(len(self.handled), handled)

    def test_a_body_of_exactly_max_body_reaches_the_handler(self):
        handled = len(self.handled)
        answer = self.post(self.cell_of_size(MAX_BODY))
        self.assertEqual(len(self.handled), handled + 1)
        self.assertError(answer, 400, "bad_request")  # 49 KiB of "A" is no RSA ciphertext
        answer = self.post(ChunkedProducer(self.cell_of_size(MAX_BODY)))
        self.assertEqual(len(self.handled), handled + 2)
        self.assertError(answer, 400, "bad_request")


# --- 429 --------------------------------------------------------------------------------------------------


class RateLimitedTests(NodeAppCase):
    def test_429_more_creates_from_one_ip_than_the_burst(self):
        for _ in range(BURST):
            self.open_circuit()
        self.assertEqual(len(self.table), BURST)
        body, _ = create_cell(wire.new_circuit_id(), NODE_KEY.public_key())
        self.assertRefused(429, "rate_limited", body)
        self.assertEqual(len(self.table), BURST)
        # Per IP: another peer still gets its circuit.
        self.open_circuit(ip=OTHER_PEER_IP)
        self.assertEqual(len(self.table), BURST + 1)


# --- 502 / 504 -------------------------------------------------------------------------------------------


class NextHopTests(NodeAppCase):
    def extend_refused(self, status, error):
        cid, layers = self.open_circuit()
        relay, _ = sealed_create(NEXT_KEY.public_key())
        answer = self.assertExtendRefusedAndClosed(status, error, cid,
                                                   onion_cell(cid, layers, extend_message(NEXT_ADDR, relay)))
        self.assertEqual(self.table.by_out, {})
        self.assertEqual(len(self.outbound.to(NEXT_ADDR)), 1)
        return cid, layers, answer

    def raise_(self, exc):
        def route(body):
            raise exc
        return route

    def test_502_next_hop_refused(self):
        self.outbound.routes[NEXT_ADDR] = self.raise_(NextHopFailed("next hop refused the connection"))
        self.extend_refused(502, "next_hop_failed")
        # Nothing is stuck: once the next hop answers, a new circuit extends.
        self.outbound.routes[NEXT_ADDR] = self.next_node
        self.extend_to_next()

    def test_502_next_hop_answered_malformed_200(self):
        self.outbound.routes[NEXT_ADDR] = lambda body: b"<html>"
        self.extend_refused(502, "next_hop_failed")

    def test_502_next_hop_answered_non_200_over_http(self):
        """The real HTTPOutbound, in memory, to a next hop that answers 403."""
        next_hop = NextHopResource(403, b'{"error":"forbidden","detail":"no"}')
        site = QuietSite(next_hop, reactor=MemoryReactorClock())
        self.relay.outbound = self.outbound = HTTPOutbound(
            self.clock, bind_ip=NODE_IP, agent=MemoryAgent(site, NODE_IP, pumps=self.pumps))
        cid, layers = self.open_circuit()
        relay, _ = sealed_create(NEXT_KEY.public_key())
        before = self.state()
        answer = self.post(onion_cell(cid, layers, extend_message(NEXT_ADDR, relay)))
        self.assertError(answer, 502, "next_hop_failed")
        self.assertIn("403", answer.json["detail"])
        self.assertEqual(self.state()["by_in"], [c for c in before["by_in"] if c != cid])  # closed
        # The memory agent reaches one site whatever the address: the second request
        # is the destroy that tells the peer its circuit is closed.
        [(source_ip, body), (_, destroy)] = next_hop.requests
        self.assertEqual(destroy, cells.encode_destroy(cid))
        self.assertEqual(source_ip, NODE_IP)
        self.assertEqual(cells.parse_cell(body).payload, relay)

    def test_502_next_hop_redirect_is_not_followed(self):
        """A next hop answering 303 gets 502: the node never GETs the Location on its behalf."""
        next_hop = NextHopResource(303, b"{}")
        site = QuietSite(next_hop, reactor=MemoryReactorClock())
        self.relay.outbound = self.outbound = HTTPOutbound(
            self.clock, bind_ip=NODE_IP, agent=MemoryAgent(site, NODE_IP, pumps=self.pumps))
        cid, layers = self.open_circuit()
        relay, _ = sealed_create(NEXT_KEY.public_key())
        answer = self.post(onion_cell(cid, layers, extend_message(NEXT_ADDR, relay)))
        self.assertError(answer, 502, "next_hop_failed")
        self.assertIn("303", answer.json["detail"])
        # the POST, then the destroy that closes the circuit (the memory agent reaches one
        # site whatever the address): no GET of the Location
        self.assertEqual([body[:3] for _, body in next_hop.requests][0], b'{"C')
        self.assertEqual([body for _, body in next_hop.requests][1:], [cells.encode_destroy(cid)])
        self.assertEqual(list(self.relay.outbound.http._cookiejar), [])  # and no cookie kept

    def test_504_next_hop_timeout(self):
        self.outbound.routes[NEXT_ADDR] = self.raise_(NextHopTimeout("next hop did not answer in time"))
        self.extend_refused(504, "next_hop_timeout")

    def test_504_next_hop_silent_over_http(self):
        """The real HTTPOutbound, in memory, to a next hop that never answers: 504 after 30 s."""
        next_hop = NextHopResource(None)
        site = QuietSite(next_hop, reactor=MemoryReactorClock())
        self.relay.outbound = HTTPOutbound(self.clock, bind_ip=NODE_IP, timeout=30,
                                           agent=MemoryAgent(site, NODE_IP, pumps=self.pumps))
        cid, layers = self.open_circuit()
        relay, _ = sealed_create(NEXT_KEY.public_key())
        before = self.state()
        pending = self.post_pending(onion_cell(cid, layers, extend_message(NEXT_ADDR, relay)))
        self.assertNoResult(pending)
        self.assertEqual(len(next_hop.held), 1)
        self.clock.advance(29)
        self.client(PEER_IP).until(pending)
        self.assertNoResult(pending)
        self.clock.advance(1)
        self.client(PEER_IP).until(pending)
        self.assertError(self.successResultOf(pending), 504, "next_hop_timeout")
        self.assertEqual(self.state()["by_in"], [c for c in before["by_in"] if c != cid])  # closed
        # The memory agent reaches one site whatever the address: the second held
        # request is the destroy that tells the peer. Answer it, to close its connection.
        self.assertEqual([r.content.getvalue() for r in next_hop.held[1:]], [cells.encode_destroy(cid)])
        next_hop.held[1].write(b"{}")
        next_hop.held[1].finish()
