"""Hostile input at a node, driven by hypothesis (issue 7).

The node is the real ``NodeRelay`` behind its real Klein app and
``QuietSite``; each request is raw bytes written into a fresh in-memory
connection from a chosen client IP (``tests/support/fuzz.py``), so the HTTP
parser, the size limit, the routing and the relay all see the input. Around
the node: a next node and a tracker that answer like real ones (a refusal
reaches the node as a 502, as over HTTP), a peer and a second exit that take
anything, and a signed directory.

The world holds four circuits through the node, made the way peers make
them: one only created (``entry``), one extended to the next node
(``middle``), two connected to the tracker (``requester``, ``sharer``), with
a bridge between the last two (an incoming end on the requester's circuit,
an outgoing end on the sharer's). Each property sends many inputs and checks
after every one:

* the answer is one of PROTOCOL.md §3's statuses (other routes: their own),
  a JSON error names the error of its status, and no traceback is written
  or logged;
* a refused input changed nothing: circuits, their links, bridges, and
  nothing was sent to a neighbour (but for a 502/504, which is the
  neighbour's answer); no replay set grew, but by the one nonce of a layer
  that authenticated (docs/protocol.md, choice 16).

After an input the node accepted and that changed the table (a destroy from
the right neighbour, a signed control message, an extend), the world is
built again so every example starts from the same state.

``FUZZ_EXAMPLES=10000 scripts/fuzz`` runs the same properties with 10 000
examples each.
"""

from __future__ import annotations

from hypothesis import example, given, strategies as st
from twisted.internet import defer, task
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest
from twisted.web.http_headers import Headers

from onion_twisted.protocol import cells, control, crypto, wire
from onion_twisted.node.circuits import RelayTable
from onion_twisted.protocol.crypto import BACKWARD, FORWARD, Layer
from onion_twisted.protocol.directory import parse_signed_directory
from onion_twisted.net.directory_client import DirectoryClient
from onion_twisted.protocol.errors import ProtocolError
from onion_twisted.net.http_server import QuietSite
from onion_twisted.node.app import NodeApp
from onion_twisted.net.ratelimit import RateLimiter
from onion_twisted.node.relay import NodeRelay
from tests.support.fakes import FakeDirectory, FakeOutbound
from tests.support.fuzz import (CELL_STATUSES, answer_to_everyone, check_answer, fired, LoggedErrors, addresses, b64, bad_base64, bad_cids,
                                deep_nesting, exchange, fuzz_settings, good_base64, headers as header_lists, weighted,
                                hostile_bodies, hosts, http_request, json_bytes, json_objects, json_values, methods,
                                paths, payloads, post_json, to_json, uuid4s)
from tests.test_node_app import (DIRECTORY_BODY, DIRECTORY_SIGNATURE, FORGER_KEY, NEXT_ADDR, NEXT_IP, NEXT_KEY,
                                 NODE_ADDR, NODE_IP, NODE_KEY, NOW, OTHER_PEER_IP, PEER_ADDR, PEER_IP, PORT,
                                 SHARER_EXIT_IP, SIGNED_DIRECTORY, STRANGER_IP, TRACKER_ADDR, TRACKER_IP, TRACKER_KEY,
                                 FakeNextNode, FakeTracker, Recorder, create_cell, extend_message,
                                 sealed_create)

MAX_BODY = 65536
SERVER = (NODE_IP, PORT)
HOST = f"{NODE_IP}:{PORT}".encode("ascii")
SHARER_EXIT = wire.Address(SHARER_EXIT_IP, PORT)
OTHER_PEER = wire.Address(OTHER_PEER_IP, PORT)
TRANSFER = "t-fuzz"
IPS = (PEER_IP, OTHER_PEER_IP, NEXT_IP, TRACKER_IP, SHARER_EXIT_IP, STRANGER_IP)
ROUTES = (b"/", b"/identity", b"/nodes", b"/metrics")
#: The node's other routes answer these (404/405 from the router, 400 from the HTTP parser).
OTHER_ROUTE_STATUSES = frozenset({200, 400, 404, 405, 413})
NEVER_STATUSES = frozenset({500})


class NodeWorld:
    """The node, its neighbours, four circuits and a bridge (see the module docstring)."""

    def __init__(self, burst: int = 1_000_000):
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.table = RelayTable(self.clock)
        self.next_node = FakeNextNode(NEXT_KEY)
        self.tracker = FakeTracker()
        self.peer = Recorder()
        self.other_exit = Recorder()
        self.outbound = FakeOutbound({NEXT_ADDR: self.next_node, TRACKER_ADDR: self.tracker, PEER_ADDR: self.peer,
                                        OTHER_PEER: self.peer, SHARER_EXIT: self.other_exit})
        self.directory = FakeDirectory(SIGNED_DIRECTORY, TRACKER_KEY.public_key())
        self.relay = NodeRelay(clock=self.clock, private_key=NODE_KEY, own_address=NODE_ADDR, tracker=TRACKER_ADDR,
                               table=self.table, outbound=self.outbound, directory=self.directory,
                               limiter=RateLimiter(self.clock, rate=1_000_000.0, burst=burst))
        self.site = QuietSite(NodeApp(self.relay, self.directory).resource(), max_body=MAX_BODY,
                              reactor=MemoryReactorClock())
        self.layers: dict[str, Layer] = {}   # circuit role -> the node's session layer
        self.cids: dict[str, str] = {}       # role -> CID ("entry", "middle.out", "bridge.in" ...)
        self.next_layer: Layer | None = None  # the next node's layer of the middle circuit
        self._build()
        self.pristine = self.state()

    # --- building ---------------------------------------------------------------------

    def handle(self, ip, body, signature=None):
        return fired(defer.ensureDeferred(self.relay.handle(ip, body, signature)))

    def _create(self, role: str, ip: str) -> None:
        cid = wire.new_circuit_id()
        body, layer = create_cell(cid, NODE_KEY.public_key())
        self.handle(ip, body)
        self.cids[role], self.layers[role] = cid, layer

    def _build(self) -> None:
        self._create("entry", PEER_IP)
        self._create("middle", PEER_IP)
        relay, self.next_layer = sealed_create(NEXT_KEY.public_key())
        self.forward("middle", extend_message(NEXT_ADDR, relay))
        self.cids["middle.out"] = self.table.by_in[self.cids["middle"]].out_cid
        for role, ip in (("requester", PEER_IP), ("sharer", OTHER_PEER_IP)):
            self._create(role, ip)
            self.handle(ip, self.onion(role, extend_message(TRACKER_ADDR, {"type": "ls", "files": []})))
            self.cids[role + ".out"] = self.table.by_in[self.cids[role]].out_cid
        self.cids["bridge.in"], self.cids["bridge.out"] = wire.new_circuit_id(), wire.new_circuit_id()
        self.control({"type": "receive_bridge", "issued": NOW, "CID": self.cids["requester.out"],
                      "from": str(SHARER_EXIT), "bridge_CID": self.cids["bridge.in"]})
        self.control({"type": "make_bridge", "issued": NOW, "CID": self.cids["sharer.out"], "transfer": TRANSFER,
                      "to": str(SHARER_EXIT), "bridge_CID": self.cids["bridge.out"]})
        self.relay._controls_seen.clear()
        self.outbound.sent.clear()

    def onion(self, role: str, plaintext: bytes) -> bytes:
        return cells.encode_cell(self.cids[role], self.layers[role].wrap(plaintext, FORWARD))

    def forward(self, role: str, plaintext: bytes):
        ip = OTHER_PEER_IP if role == "sharer" else PEER_IP
        return self.handle(ip, self.onion(role, plaintext))

    def control(self, payload: dict, key=TRACKER_KEY):
        body, signature = control.sign_control(key, payload)
        return self.handle(TRACKER_IP, body, signature)

    # --- what must not change ---------------------------------------------------------

    def state(self):
        t = self.table
        return (
            sorted((c.in_cid, c.in_ip, c.out_cid, c.out_ip, c.out_kind, str(c.out_addr), c.extending,
                    sorted(c.bridges_out or {}))
                   for c in t.by_in.values()),
            sorted(t.by_out),
            sorted((b.bridge_cid, b.peer_ip, b.circuit.in_cid) for b in t.bridges_in.values()),
            sorted((b.bridge_cid, b.peer_ip, b.circuit.in_cid, b.transfer) for b in t.bridges_out.values()),
        )

    def nonces(self) -> dict:
        """How many forward nonces each circuit has recorded (its replay set)."""
        return {cid: len(c.nonces or ()) for cid, c in self.table.by_in.items()}

    @property
    def changed(self) -> bool:
        return self.state() != self.pristine

    # --- HTTP ------------------------------------------------------------------------

    def post(self, body: bytes, ip: str, headers=()):
        return exchange(self.site, ip, post_json(body, headers, host=HOST), server=SERVER)

    NEIGHBOURS = {"entry": PEER_IP, "middle": PEER_IP, "requester": PEER_IP, "sharer": OTHER_PEER_IP,
                  "middle.out": NEXT_IP, "requester.out": TRACKER_IP, "sharer.out": TRACKER_IP,
                  "bridge.in": SHARER_EXIT_IP, "bridge.out": SHARER_EXIT_IP}

    def sender(self, ip, cid) -> str:
        """``ip``, or (None) the neighbour a cell under ``cid`` is expected from."""
        if ip is not None:
            return ip
        if isinstance(cid, tuple):
            return self.NEIGHBOURS[cid[1]]
        return TRACKER_IP if cid == "control" else PEER_IP

    def resolve(self, cid):
        """A CID drawn as ("role", name) becomes this world's CID of that role."""
        if isinstance(cid, tuple):
            return self.cids[cid[1]]
        return cid


# --- strategies --------------------------------------------------------------------------------

ROLES = ("entry", "middle", "middle.out", "requester", "requester.out", "sharer", "sharer.out",
         "bridge.in", "bridge.out")
CIRCUITS = ("entry", "middle", "requester", "sharer")
MISSING = object()

known_cids = st.sampled_from(ROLES).map(lambda role: ("role", role))
cids = weighted((5, known_cids), (3, uuid4s), (1, st.just("control")), (2, bad_cids))
ips = st.sampled_from(IPS)
#: None: the neighbour the circuit (or bridge) expects; else any IP, right or wrong.
senders = weighted((3, st.none()), (1, ips))


small_json = json_values(4)
_maybe_cids = weighted((8, cids), (1, st.just(MISSING)))
_maybe_payloads = weighted((3, good_base64), (3, json_objects), (1, bad_base64), (1, small_json), (1, st.just(MISSING)))
_destroys = weighted((6, st.just(MISSING)), (3, st.just(True)), (1, st.just(False)), (1, small_json))
_extra_fields = st.dictionaries(st.text(max_size=8).filter(lambda k: k not in ("CID", "payload", "destroy")),
                                small_json, max_size=2)


@st.composite
def cell_objects(draw):
    """A cell-shaped object: every field right, wrong, missing or extra."""
    cell = {}
    for name, strategy in (("CID", _maybe_cids), ("payload", _maybe_payloads), ("destroy", _destroys)):
        value = draw(strategy)
        if value is not MISSING:
            cell[name] = value
    cell.update(draw(_extra_fields))
    return cell


#: Plaintexts a peer could put inside a valid layer: anything, and extends of every shape.
extends = st.builds(
    lambda to, relay, extra: to_json({**({"to": to} if to is not MISSING else {}),
                                      **({"relay": relay} if relay is not MISSING else {}), **extra}),
    st.one_of(addresses, st.just(MISSING)),
    st.one_of(good_base64, bad_base64, json_objects, json_values(4), st.just(MISSING)),
    st.dictionaries(st.text(max_size=6), json_values(3), max_size=2))
chunk_messages = st.builds(
    lambda kind, transfer, extra: to_json({"type": kind, "transfer": transfer, **extra}),
    st.sampled_from(["file_chunk", "transfer_end"]),
    st.one_of(st.just(TRANSFER), st.text(max_size=10), json_values(3)),
    st.dictionaries(st.sampled_from(["file", "chunk_idx", "data", "status", "size"]), json_values(3), max_size=3))
plaintexts = st.one_of(st.binary(max_size=120), json_bytes(), deep_nesting, extends, chunk_messages)




class NodeFuzzTests(unittest.TestCase):
    def setUp(self):
        self.world = NodeWorld()

    def fresh(self) -> NodeWorld:
        """The world as built, for the next example."""
        world = self.world
        if world.changed:
            world = self.world = NodeWorld()
        world.relay._controls_seen.clear()
        world.outbound.sent.clear()
        return world

    def send_cell(self, world, body: bytes, ip: str, headers=(), *, context, allowed=CELL_STATUSES, layer_of=None):
        """POST ``body``; check the answer, the logs, and that a refusal changed nothing.

        ``layer_of``: the circuit role whose session key made the cell's layer; its
        replay set may record that one nonce, whatever the answer (choice 16).
        """
        before, nonces = world.state(), world.nonces()
        with LoggedErrors() as errors:
            response = world.post(body, ip, headers)
        self.assertEqual(errors.events, [], f"{context!r} was logged as an error:\n{errors.text()}")
        check_answer(self, response, allowed, context=context)
        recorded = world.cids.get(layer_of)
        for cid, count in world.nonces().items():
            if cid in nonces:
                grew = count - nonces[cid]
                self.assertIn(grew, (0, 1) if cid == recorded else (0,), f"replay set of {cid} for {context!r}")
        if response.status != 200:
            closed = self.closed_by_failed_extend(world, before, recorded)
            self.assertEqual(world.state(), before if closed is None else closed,
                             f"{response.status} for {context!r} changed the table")
            sent = [(s.address, s.body) for s in world.outbound.sent]
            if closed is not None:
                # The circuit's own neighbour is told it is closed; nothing else is new.
                destroy = (wire.Address(world.NEIGHBOURS[layer_of], NODE_ADDR.port), cells.encode_destroy(recorded))
                self.assertIn(destroy, sent, context)
                sent = [s for s in sent if s != destroy]
            if response.status not in (502, 504):  # only those come from a neighbour's answer
                self.assertEqual(sent, [], f"{response.status} for {context!r} was relayed")
        return response

    @staticmethod
    def closed_by_failed_extend(world, before, cid):
        """The table a failed EXTEND on the unextended circuit ``cid`` leaves (that
        circuit closed, docs/protocol.md), or None when ``cid`` is no such circuit
        or is still open: then a refusal must have changed nothing."""
        circuits = before[0]
        if cid is None or cid in world.table.by_in:
            return None
        if not any(c[0] == cid and c[2] is None for c in circuits):
            return None
        return ([c for c in circuits if c[0] != cid], *before[1:])

    # --- the whole HTTP surface -----------------------------------------------------------

    @fuzz_settings(300)
    @given(method=methods, path=paths(ROUTES), host=hosts, extra=header_lists,
           body=st.one_of(st.none(), hostile_bodies()), chunked=st.booleans(), ip=ips)
    # Found by this property: Klein logged a traceback for each (a path or Host not UTF-8),
    # werkzeug made a 500 of a Host that is no IDNA name.
    @example(method=b"GET", path=b"/%ff", host=b"a", extra=[], body=None, chunked=False, ip=PEER_IP)
    @example(method=b"GET", path=b"/", host=b"\xff", extra=[], body=None, chunked=False, ip=PEER_IP)
    @example(method=b"GET", path=b"/", host=b".", extra=[], body=None, chunked=False, ip=PEER_IP)
    @example(method=b"POST", path=b"/", host=b"a..b", extra=[], body=b"{}", chunked=False, ip=PEER_IP)
    def test_any_request_on_any_route(self, method, path, host, extra, body, chunked, ip):
        world = self.fresh()
        raw = http_request(method, path, body, extra, host=host, chunked=chunked)
        framing = any(name.lower() in (b"content-length", b"transfer-encoding", b"expect") for name, _ in extra)
        before = world.state()
        with LoggedErrors() as errors:
            response = exchange(world.site, ip, raw, server=SERVER, head=method == b"HEAD")
        self.assertEqual(errors.events, [], f"{raw[:300]!r} was logged as an error:\n{errors.text()}")
        if response is None:
            # Only a request whose own headers announce more body than it sent is left waiting.
            self.assertTrue(framing, f"no answer to {raw[:300]!r}")
            return
        self.assertNotIn(response.status, NEVER_STATUSES, raw[:300])
        is_cell = method == b"POST" and path == b"/" and body is not None and not framing
        check_answer(self, response, CELL_STATUSES if is_cell else CELL_STATUSES | OTHER_ROUTE_STATUSES,
                     context=raw[:300], head=method == b"HEAD")
        if response.status != 200 or method != b"POST":
            self.assertEqual(world.state(), before, raw[:300])
            self.assertEqual(world.outbound.sent, [], raw[:300])

    @fuzz_settings(100)
    @given(route=st.sampled_from([b"/identity", b"/nodes", b"/metrics", b"/"]), query=st.binary(max_size=20),
           host=hosts)
    def test_read_only_routes_answer_the_same_to_anyone(self, route, query, host):
        # Every address the node knows in a role (peers, next node, tracker, another exit) and a
        # stranger asks the same: the same status, headers and bytes come back to each. The
        # world's clock does not move between them, so nothing in a body may legitimately differ.
        world = self.fresh()
        target = route + (b"?" + query.replace(b" ", b"+").replace(b"\r", b"").replace(b"\n", b"") if query else b"")
        response = answer_to_everyone(self, world.site, IPS, http_request(b"GET", target, host=host), server=SERVER,
                                      context=target)
        self.assertIn(response.status, (200, 400), response.body[:200])  # 400: a Host that is no host name
        if response.status == 200 and route == b"/nodes":
            self.assertEqual(response.body, DIRECTORY_BODY)  # a mirror never changes a byte
            self.assertEqual(response.header(b"x-onion-signature"), DIRECTORY_SIGNATURE.encode("ascii"))

    # --- cells ----------------------------------------------------------------------------

    @fuzz_settings(400)
    @given(cell=cell_objects(), ip=senders, ascii_only=st.booleans(),
           signer=weighted((3, st.just("none")), (1, st.sampled_from(["tracker", "forger", "junk"]))),
           junk=st.binary(max_size=90))
    def test_cells_of_every_shape(self, cell, ip, ascii_only, signer, junk):
        world = self.fresh()
        ip = world.sender(ip, cell.get("CID"))
        if isinstance(cell.get("CID"), tuple):
            cell["CID"] = world.resolve(cell["CID"])
        body = to_json(cell, ascii_only=ascii_only)
        headers = []
        if signer != "none":
            signature = (crypto.sign_body({"tracker": TRACKER_KEY, "forger": FORGER_KEY}[signer], body)
                         if signer != "junk" else b64(junk))
            headers.append((b"X-Onion-Signature", signature.encode("ascii")))
        self.send_cell(world, body, ip, headers, context=cell)

    @fuzz_settings(300)
    @given(body=hostile_bodies(), ip=ips)
    def test_bodies_that_are_not_cells(self, body, ip):
        world = self.fresh()
        response = self.send_cell(world, body, ip, context=body[:200])
        if response.status != 413:
            self.assertNotEqual(response.status, 200, body[:200])

    @fuzz_settings(300)
    @given(role=st.sampled_from(CIRCUITS), plaintext=plaintexts, ip=senders, twice=st.booleans())
    def test_hostile_plaintexts_inside_a_valid_layer(self, role, plaintext, ip, twice):
        """What a peer that holds the session key can make the node do, and replays of it."""
        world = self.fresh()
        ip = world.sender(ip, ("role", role))
        body = world.onion(role, plaintext)
        response = self.send_cell(world, body, ip, context=(role, plaintext[:200]), layer_of=role)
        owner = OTHER_PEER_IP if role == "sharer" else PEER_IP
        if ip != owner:
            self.assertEqual(response.status, 403)
        if twice and not world.changed:
            world.outbound.sent.clear()
            again = self.send_cell(world, body, ip, context=("replay", role, plaintext[:200]), layer_of=role)
            if ip == owner:
                self.assertEqual(again.status, 409, again.body)

    @fuzz_settings(200)
    @given(plaintext=plaintexts, wrong=st.sampled_from(["aad", "key", "truncated", "flipped"]),
           role=st.sampled_from(CIRCUITS), at=st.integers(0, 200))
    def test_layers_that_do_not_peel(self, plaintext, wrong, role, at):
        world = self.fresh()
        layer = world.layers[role]
        if wrong == "aad":
            data = layer.wrap(plaintext, BACKWARD)
        elif wrong == "key":
            data = Layer(crypto.new_session_key()).wrap(plaintext, FORWARD)
        elif wrong == "truncated":
            whole = layer.wrap(plaintext, FORWARD)
            data = whole[:min(at % 40, len(whole) - 1)]
        else:
            data = bytearray(layer.wrap(plaintext, FORWARD))
            data[at % len(data)] ^= 0x01
            data = bytes(data)
        owner = OTHER_PEER_IP if role == "sharer" else PEER_IP
        response = self.send_cell(world, cells.encode_cell(world.cids[role], data), owner, context=(wrong, role))
        self.assertEqual(response.status, 400, response.body)

    @fuzz_settings(200)
    @given(role=st.sampled_from(["middle.out", "requester.out", "sharer.out", "bridge.in"]),
           payload=payloads, ip=senders)
    def test_backward_cells_from_any_neighbour(self, role, payload, ip):
        world = self.fresh()
        ip = world.sender(ip, ("role", role))
        cell = {"CID": world.cids[role]}
        if payload is not None:
            cell["payload"] = payload
        self.send_cell(world, to_json(cell), ip, context=(role, cell))

    # --- control messages -------------------------------------------------------------------

    @fuzz_settings(300)
    @given(kind=weighted((6, st.sampled_from(control.TYPES)), (1, json_values(2))),
           cid=weighted((4, st.sampled_from([("role", "requester.out"), ("role", "sharer.out")])), (1, known_cids),
                        (1, uuid4s), (1, bad_cids)),
           bridge=weighted((3, uuid4s), (2, st.sampled_from([("role", "bridge.in"), ("role", "bridge.out")])),
                           (1, known_cids), (1, bad_cids)),
           transfer=weighted((4, st.text(min_size=1, max_size=20)), (1, st.text(max_size=140)),
                             (1, json_values(2))),
           peer=weighted((4, st.sampled_from(["127.0.0.14:5000", "127.0.0.14", "127.0.0.13:5000"])), (2, addresses)),
           skew=weighted((5, st.integers(-59, 59)), (1, st.sampled_from([-61, -60, 60, 61, 10 ** 9])),
                         (1, st.floats(-1e12, 1e12))),
           issued_type=weighted((6, st.just("number")), (1, st.sampled_from(["string", "missing", "bool"]))),
           signer=weighted((5, st.just("tracker")), (1, st.sampled_from(["forger", "none", "junk"]))),
           twice=st.booleans())
    def test_forged_stale_and_replayed_control_messages(self, kind, cid, bridge, transfer, peer, skew, issued_type,
                                                        signer, twice):
        world = self.fresh()
        payload = {"type": kind, "CID": world.resolve(cid), "bridge_CID": world.resolve(bridge),
                   "transfer": transfer, "to": peer, "from": peer}
        issued = NOW + skew
        if issued_type == "number":
            payload["issued"] = issued
        elif issued_type == "string":
            payload["issued"] = str(issued)
        elif issued_type == "bool":
            payload["issued"] = True
        body = to_json({"CID": "control", "payload": payload})
        headers = []
        if signer == "tracker":
            headers.append((b"X-Onion-Signature", crypto.sign_body(TRACKER_KEY, body).encode("ascii")))
        elif signer == "forger":
            headers.append((b"X-Onion-Signature", crypto.sign_body(FORGER_KEY, body).encode("ascii")))
        elif signer == "junk":
            headers.append((b"X-Onion-Signature", b"AAAA" + body[:20].replace(b"\r", b"").replace(b"\n", b"")))
        response = self.send_cell(world, body, TRACKER_IP, headers, context=payload)
        try:
            wire.loads(body)
        except ProtocolError:  # e.g. a number past the double range: not JSON to this node
            self.assertEqual(response.status, 400, response.body)
            return
        if signer != "tracker":
            self.assertEqual(response.status, 403, response.body)  # checked before any field
        elif issued_type == "number" and abs(skew) > 60:
            self.assertEqual(response.status, 403, response.body)
        if signer == "tracker" and twice:
            # The signature is remembered once the fields check out, whatever the action then does.
            accepted = response.status not in (400, 403)
            world.outbound.sent.clear()
            again = self.send_cell(world, body, STRANGER_IP, headers, context=("replay", payload))
            if accepted:
                self.assertEqual(again.status, 409, again.body)
            else:
                self.assertEqual(again.status, response.status, again.body)


# --- the signed directory a node (or a peer) fetches --------------------------------------------


class DirectorySource(FakeOutbound):
    """A tracker or a mirror that answers ``GET /nodes`` with whatever the test says (``page``)."""

    def __init__(self):
        super().__init__(record=False)
        self.page = (200, Headers(), b"{}")

    def get(self, address, path):
        return defer.succeed(self.page)


def signed_directory(nodes, issued, key=TRACKER_KEY) -> tuple[bytes, str]:
    body = to_json({"issued": issued, "nodes": nodes})
    return body, crypto.sign_body(key, body)


node_entries = st.one_of(
    st.just({"address": str(NEXT_ADDR), "public_key": crypto.public_key_pem(NEXT_KEY),
             "fingerprint": crypto.fingerprint(NEXT_KEY)}),
    st.builds(lambda address, fp: {"address": address, "public_key": crypto.public_key_pem(NEXT_KEY),
                                   "fingerprint": fp},
              addresses, st.one_of(st.none(), st.text(max_size=64), st.just(crypto.fingerprint(NODE_KEY)))),
    st.builds(lambda pem: {"address": "127.0.0.30:5000", "public_key": pem},
              st.one_of(st.text(max_size=100), st.just(crypto.public_key_pem(NODE_KEY)[:-30]),
                        st.just(crypto.public_key_pem(NODE_KEY).replace("A", "B", 3)), json_values(2))),
    json_values(3))


class DirectoryFuzzTests(unittest.TestCase):
    """Forged, stale and malformed directories never replace the verified copy."""

    def setUp(self):
        self.source = DirectorySource()
        self.client = DirectoryClient(task.Clock(), self.source, TRACKER_ADDR,
                                      tracker_key=crypto.tracker_public_b64(TRACKER_KEY), default_port=PORT)
        self.source.page = (200, Headers({b"X-Onion-Signature": [DIRECTORY_SIGNATURE.encode("ascii")]}),
                              DIRECTORY_BODY)
        self.held = fired(defer.ensureDeferred(self.client.fetch_from(TRACKER_ADDR)))

    @fuzz_settings(200)
    @given(nodes=st.one_of(st.lists(node_entries, max_size=3), json_values(3)),
           issued=st.one_of(st.integers(NOW - 10 ** 6, NOW + 10 ** 6), json_values(1)),
           how=st.sampled_from(["forger", "flipped", "none", "junk", "tracker", "other-body"]),
           status=st.sampled_from([200, 200, 200, 404, 503]), extra=json_bytes())
    def test_forged_and_hostile_directories(self, nodes, issued, how, status, extra):
        self.client.current = self.held
        body, signature = signed_directory(nodes, issued, FORGER_KEY if how == "forger" else TRACKER_KEY)
        if how == "flipped":
            body = body.replace(b"127", b"128", 1) if b"127" in body else body + b" "
        elif how == "other-body":
            body = extra
        headers = Headers()
        if how == "junk":
            headers.setRawHeaders(b"X-Onion-Signature", [b"!" + signature.encode("ascii")])
        elif how != "none":
            headers.setRawHeaders(b"X-Onion-Signature", [signature.encode("ascii")])
        self.source.page = (status, headers, body)
        with LoggedErrors() as errors:
            d = defer.ensureDeferred(self.client.fetch_from(NEXT_ADDR))
            outcome = []
            d.addBoth(outcome.append)
        self.assertEqual(errors.events, [], errors.text())
        [result] = outcome
        if hasattr(result, "check"):
            self.assertIsNotNone(result.check(ProtocolError), result.getTraceback())
            self.assertIs(self.client.current, self.held)
            return
        # Adopted only what the tracker signed, well formed, and not older than the copy held.
        self.assertEqual((how, status), ("tracker", 200))
        parse_signed_directory(body, signature, TRACKER_KEY.public_key(), PORT)
        if isinstance(issued, (int, float)) and not isinstance(issued, bool) and issued < NOW:
            self.assertIs(self.client.current, self.held)
        else:
            self.assertEqual(self.client.current.body, body)
