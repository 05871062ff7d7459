"""Hostile input at the tracker, driven by hypothesis (issue 7).

The tracker is the real ``Tracker`` (catalogue, registry, bridge sequence)
behind its real Klein app and ``QuietSite``; requests are raw bytes written
into in-memory connections from chosen client IPs (``tests/support/fuzz.py``).
Its outbound is ``tests/support/tracker_fakes.TrackerOutbound``: control
messages and requests to sharers succeed, or fail the way the example says.

The world: four directory nodes, a sharing circuit (two files: one with its
sha256, one by name only) and a requesting circuit, at small limits
(``max_files_per_circuit`` 8, ``max_catalogue_entries`` 12,
``max_entries_per_exit`` 8, ``max_nodes`` 5)
so the refusals past them come up too. After every input:

* ``POST /`` answers only PROTOCOL.md §3 statuses, a 200 carries a
  ``files``, ``transfer`` or ``error`` reply, and an ``error`` reply names one
  of the tracker's errors (docs/protocol.md section 11.3);
* nothing is logged as an error, no traceback is written;
* a refused cell, and a message answered ``error``, changed nothing: the
  circuits, their files, the catalogue, the listing, the registry, the
  transfers under way; only a failed bridge sequence sends its
  ``drop_bridge``s.
"""

from __future__ import annotations

import orjson
from hypothesis import example, given, strategies as st
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from onion_twisted.protocol import control, crypto, wire
from onion_twisted.protocol.messages import MAX_RANGES
from onion_twisted.protocol.directory import parse_signed_directory
from onion_twisted.protocol.errors import NextHopFailed, NextHopTimeout
from onion_twisted.net.http_server import QuietSite
from onion_twisted.tracker.app import TrackerApp
from tests.support.fuzz import (CELL_STATUSES, answer_to_everyone, check_answer, LoggedErrors, addresses, bad_cids, exchange,
                                fuzz_settings, headers as header_lists, hostile_bodies, hosts, http_request,
                                json_objects, json_values, methods, paths, post_json, to_json, uuid4s, weighted)
from tests.support.tracker_fakes import (NODE_ADDRESSES, NODE_IPS, NODE_KEYS, PORT, SHA_A, SHA_B, STRANGER_IP,
                                         STRANGER_KEY, TRACKER_IP, TRACKER_KEY, TrackerHarness, identity_body, pem)

MAX_BODY = 65536
SERVER = (TRACKER_IP, PORT)
HOST = f"{TRACKER_IP}:{PORT}".encode("ascii")
ROUTES = (b"/", b"/nodes", b"/identity", b"/metrics")
REQUESTER_IP, SHARER_IP = NODE_IPS[0], NODE_IPS[1]
IPS = (*NODE_IPS, STRANGER_IP, TRACKER_IP)
SIZE = 100_000
REPLY_ERRORS = {"bad_request", "too_many_files", "busy", "not_found", "no_source", "source_failed", "no_bridge"}
REGISTRATION_STATUSES = frozenset({200, 400, 403, 413, 429, 502, 504})
OTHER_ROUTE_STATUSES = frozenset({200, 400, 404, 405, 413})
# Nodes that may register: the first is listed (max_nodes = 5 reached), the second is refused (429).
NEW_NODES = [(wire.Address(f"127.0.0.{31 + i}", PORT), key) for i, key in enumerate([STRANGER_KEY, NODE_KEYS[3]])]


class TrackerWorld:
    def __init__(self):
        self.h = TrackerHarness(nodes=list(zip(NODE_ADDRESSES, NODE_KEYS)), max_files=8, max_entries=12,
                                max_entries_per_exit=8, max_listing=10)
        self.h.registry.max_nodes = 5
        listed, key = NEW_NODES[0]  # the fifth: the directory is full, another new node gets 429
        self.h.registry.register(listed, pem(key), crypto.fingerprint(key))
        self.tracker = self.h.tracker
        self.site = QuietSite(TrackerApp(self.tracker).resource(), max_body=MAX_BODY, reactor=MemoryReactorClock())
        self.sharer, self.requester = wire.new_circuit_id(), wire.new_circuit_id()
        self._send(SHARER_IP, self.sharer, {"type": "ls", "files": [
            {"name": "f", "size": SIZE, "sha256": SHA_A}, "g", {"name": "f", "size": 5, "sha256": SHA_B}]})
        self._send(REQUESTER_IP, self.requester, {"type": "ls", "files": ["mine"]})
        for address, key in NEW_NODES:
            self.h.outbound.pages[address] = (200, identity_body(key))
        self.h.outbound.posts.clear()
        self.pristine = self.state()

    def _send(self, ip, cid, message):
        results = []
        defer.ensureDeferred(self.h.send(ip, cid, message)).addBoth(results.append)
        assert results and not hasattr(results[0], "check"), results

    def state(self):
        cat, registry = self.h.catalogue, self.h.registry
        return (self.h.snapshot(),
                {k: dict(c.transfers) for k, c in cat.circuits.items()},
                sorted((str(a), n.fingerprint, n.last_seen, n.ip) for a, n in registry.nodes.items()),
                self.tracker.pending)

    @property
    def changed(self) -> bool:
        return self.state() != self.pristine

    def cid(self, drawn):
        if isinstance(drawn, tuple):
            return {"sharer": self.sharer, "requester": self.requester}[drawn[1]]
        return drawn


# --- strategies ------------------------------------------------------------------------------

small_json = json_values(3)
names = weighted(
    (4, st.sampled_from(["f", "g", "mine", "nobody-has-this", "é.txt", "a" * 255, "é" * 127])),
    (2, st.text(min_size=1, max_size=30)),
    (1, st.sampled_from(["", ".", "..", "a/b", "a\\b", "a\x00b", "a\nb", "\x7f", "a" * 256, "é" * 128, "/"])),
    (1, small_json),
)
shas = weighted((3, st.sampled_from([SHA_A, SHA_B])), (1, st.none()),
                (1, st.sampled_from(["A" * 64, "a" * 63, "g" * 64, "", SHA_A + "0"])), (1, small_json))
sizes = weighted((3, st.integers(0, 2 ** 53)), (1, st.sampled_from([-1, 2 ** 53 + 1, 2 ** 64, 1.5, True, "5", None])))
file_items = weighted(
    (2, names),
    (3, st.fixed_dictionaries({"name": names}, optional={"size": sizes, "sha256": shas, "other": small_json})),
    (1, small_json))
BIG_CHUNKS = [[i, i + 1] for i in range(0, 2 * (MAX_RANGES + 1), 2)]  # one range too many
chunk_ranges = weighted(
    (3, st.lists(st.lists(st.integers(-2, 2 ** 54), min_size=2, max_size=2), max_size=5)),
    (1, st.lists(small_json, max_size=3)),
    (1, st.sampled_from([BIG_CHUNKS, BIG_CHUNKS[:MAX_RANGES], [[0, 2 ** 53]], [[3, 3]], [[2, 1]], [[0, True]]])),
    (1, small_json))
chunk_sizes = weighted((3, st.integers(16 * 1024, 4 * 1024 * 1024)),
                       (1, st.sampled_from([None, 16383, 4 * 1024 * 1024 + 1, 0, -1, 65536.0, True, "65536"])),
                       (1, st.integers()))
MISSING = object()
#: ``exclude`` and ``avoid``: transfer ids (known to the tracker or not), too many, or not ids at all.
transfer_id_lists = weighted(
    (3, st.lists(st.one_of(uuid4s, st.text(min_size=1, max_size=8)), max_size=4)),
    (1, st.sampled_from([[f"t{i}" for i in range(65)], [""], ["x" * 129], "t1", [3]])),
    (1, small_json))


def _message(kind, fields):
    message = {} if kind is MISSING else {"type": kind}
    message.update({k: v for k, v in fields.items() if v is not MISSING})
    return message


maybe = lambda strategy: weighted((4, strategy), (1, st.just(MISSING)))  # noqa: E731
messages = weighted(
    (3, st.builds(_message, st.just("ls"), st.fixed_dictionaries({"files": maybe(weighted(
        (4, st.lists(file_items, max_size=10)), (1, small_json)))}))),
    (1, st.builds(_message, st.just("list"), st.fixed_dictionaries({"extra": maybe(small_json)}))),
    (4, st.builds(_message, st.just("request"), st.fixed_dictionaries({
        "file": weighted((3, st.sampled_from(["f", "g", "mine"])), (2, names)),
        "sha256": weighted((3, st.just(MISSING)), (2, shas)),
        "chunk_size": weighted((3, st.just(MISSING)), (2, chunk_sizes)),
        "chunks": weighted((3, st.just(MISSING)), (2, chunk_ranges)),
        "exclude": weighted((3, st.just(MISSING)), (1, transfer_id_lists)),
        "avoid": weighted((3, st.just(MISSING)), (1, transfer_id_lists))}))),
    (1, st.builds(_message, st.sampled_from(["file_chunk", "transfer_end"]),
                  st.fixed_dictionaries({"transfer": maybe(small_json), "data": maybe(small_json)}))),
    (1, st.builds(_message, weighted((1, st.just(MISSING)), (2, small_json)), json_objects)),
)
cids = weighted((4, st.sampled_from([("c", "sharer"), ("c", "requester")])), (3, uuid4s),
                (1, st.just("control")), (1, bad_cids))
#: How the nodes answer the bridge sequence: all well, or one step refused or silent.
failures = weighted((4, st.just(None)), (1, st.sampled_from([
    ("receive_bridge", NextHopFailed("next hop answered 404 unknown_circuit")),
    ("make_bridge", NextHopTimeout("next hop did not answer in time")),
    ("request", NextHopFailed("next hop refused the connection"))])))




class TrackerFuzzTests(unittest.TestCase):
    def setUp(self):
        self.world = TrackerWorld()

    def fresh(self) -> TrackerWorld:
        if self.world.changed:
            self.world = TrackerWorld()
        self.world.h.outbound.posts.clear()
        self.world.h.outbound.gets.clear()
        self.world.h.outbound.failures.clear()
        return self.world

    def exchange(self, world, ip, raw, *, head=False):
        with LoggedErrors() as errors:
            response = exchange(world.site, ip, raw, server=SERVER, head=head)
        self.assertEqual(errors.events, [], f"{raw[:300]!r} was logged as an error:\n{errors.text()}")
        return response

    # --- the whole HTTP surface ------------------------------------------------------------

    @fuzz_settings(300)
    @given(method=methods, path=paths(ROUTES), host=hosts, extra=header_lists,
           body=st.one_of(st.none(), hostile_bodies()), chunked=st.booleans(), ip=st.sampled_from(IPS))
    # Found by this property: Klein logged a traceback for each (a path or Host not UTF-8),
    # werkzeug made a 500 of a Host that is no IDNA name.
    @example(method=b"GET", path=b"/%ff", host=b"a", extra=[], body=None, chunked=False, ip=NODE_IPS[0])
    @example(method=b"GET", path=b"/", host=b"\xff", extra=[], body=None, chunked=False, ip=NODE_IPS[0])
    @example(method=b"GET", path=b"/", host=b".", extra=[], body=None, chunked=False, ip=NODE_IPS[0])
    @example(method=b"POST", path=b"/", host=b"a..b", extra=[], body=b"{}", chunked=False, ip=NODE_IPS[0])
    def test_any_request_on_any_route(self, method, path, host, extra, body, chunked, ip):
        world = self.fresh()
        raw = http_request(method, path, body, extra, host=host, chunked=chunked)
        framing = any(name.lower() in (b"content-length", b"transfer-encoding", b"expect") for name, _ in extra)
        before = world.state()
        response = self.exchange(world, ip, raw, head=method == b"HEAD")
        if response is None:
            self.assertTrue(framing, f"no answer to {raw[:300]!r}")
            return
        self.assertIn(response.status, CELL_STATUSES | REGISTRATION_STATUSES | OTHER_ROUTE_STATUSES, raw[:300])
        self.assertNotIn(b"Traceback", response.body)
        if response.status != 200 or method != b"POST":
            self.assertEqual(world.state(), before, raw[:300])
            self.assertEqual(world.h.outbound.posts, [], raw[:300])

    @fuzz_settings(100)
    @given(route=st.sampled_from([b"/nodes", b"/identity"]), host=hosts)
    def test_signed_directory_and_identity_to_anyone(self, route, host):
        # Every node, a stranger and the tracker's own address ask the same: the same status,
        # headers (the signature among them) and bytes come back to each. The directory is
        # signed again only once a heartbeat has passed, and the world's clock does not move
        # between the requests, so not even its "issued" may differ.
        world = self.fresh()
        response = answer_to_everyone(self, world.site, IPS, http_request(b"GET", route, host=host), server=SERVER,
                                      context=(route, host))
        self.assertIn(response.status, (200, 400))  # 400: a Host that is no host name
        if response.status == 200 and route == b"/nodes":
            directory = parse_signed_directory(response.body, response.header(b"x-onion-signature"),
                                               TRACKER_KEY.public_key(), PORT)
            self.assertEqual(set(directory.nodes), {*NODE_ADDRESSES, NEW_NODES[0][0]})

    # --- cells from exits ------------------------------------------------------------------

    @fuzz_settings(400)
    @given(cid=cids, message=messages, ip=weighted((5, st.sampled_from(NODE_IPS[:2])), (1, st.sampled_from(IPS))),
           destroy=weighted((6, st.just(MISSING)), (1, st.just(True)), (1, small_json)), failure=failures,
           extra=st.dictionaries(st.sampled_from(["x", "destroy2", "CID2"]), small_json, max_size=1))
    def test_messages_of_every_shape(self, cid, message, ip, destroy, failure, extra):
        world = self.fresh()
        if failure is not None:
            world.h.outbound.failures[failure[0]] = failure[1]
        cell = {"CID": world.cid(cid), "payload": message, **extra}
        if destroy is not MISSING:
            cell["destroy"] = destroy
            if destroy is True:
                del cell["payload"]
        body = to_json(cell)
        before = world.state()
        response = self.exchange(world, ip, post_json(body, host=HOST))
        check_answer(self, response, CELL_STATUSES, context=cell)
        if response.status != 200:
            self.assertEqual(world.state(), before, f"{response.status} for {cell!r} changed the tracker")
            self.assertEqual(world.h.outbound.posts, [], cell)
            return
        answer = orjson.loads(response.body)
        if destroy is True:
            self.assertEqual(answer, {})
            return
        reply = answer["payload"]
        self.assertIn(reply.get("type"), ("files", "transfer", "error"), reply)
        if reply["type"] == "error":
            self.assertIn(reply["error"], REPLY_ERRORS, reply)
            self.assertIsInstance(reply["detail"], str)
            after = world.state()
            if message.get("type") == "request" and reply["error"] != "bad_request":
                # A well-formed request records its circuit (docs/protocol.md, choice 31), nothing else.
                key = (ip, cell["CID"])
                circuits = dict(after[0][0])
                if key not in before[0][0] and key in circuits:
                    self.assertEqual(circuits.pop(key)[1], ())
                    after = ((circuits, *after[0][1:]), {k: v for k, v in after[1].items() if k != key},
                             *after[2:])
            if reply["error"] == "source_failed" and failure is not None and failure[0] != "receive_bridge":
                # The source's exit failed its step: that circuit (the sharer's, or the world's
                # requester when the sharer asked for its file) is forgotten, nothing else changes.
                gone = set(before[0][0]) - set(after[0][0])
                self.assertEqual(len(gone), 1, f"source_failed for {cell!r} forgot {gone}")
                self.assertEqual(after[0][0], {k: v for k, v in before[0][0].items() if k not in gone})
                self.assertEqual(after[2:], before[2:])
                return
            self.assertEqual(after, before, f"{reply['error']} for {cell!r} changed the tracker")
            kinds = world.h.outbound.kinds()
            if reply["error"] == "source_failed":
                self.assertTrue(set(kinds) <= {"receive_bridge", "make_bridge", "request", "drop_bridge"}, kinds)
            else:
                self.assertEqual(kinds, [], reply)
        elif reply["type"] == "files":
            self.assertLessEqual(len(reply["files"]), 10)
        else:
            self.assertTrue(wire.is_circuit_id(reply["transfer"]), reply)
            for post in world.h.outbound.posts:
                if post.is_control:  # what the tracker signs, a node accepts
                    control.verify_control(post.body, post.signature, post.payload, TRACKER_KEY.public_key(),
                                           world.h.clock.seconds(), 60.0, PORT)

    # --- registrations -----------------------------------------------------------------------

    @fuzz_settings(300)
    @given(which=st.integers(0, len(NEW_NODES) + len(NODE_ADDRESSES) - 1),
           address=weighted((4, st.none()), (1, addresses)),
           key=weighted((4, st.none()), (1, st.sampled_from(["other", "small-junk", "ec", "truncated"])),
                        (1, json_values(2))),
           ip=weighted((4, st.none()), (1, st.sampled_from(IPS))),
           identity=weighted((4, st.just("right")), (1, st.sampled_from(["other", "404", "junk", "down", "slow"]))),
           extra=st.dictionaries(st.text(max_size=6), json_values(2), max_size=2),
           drop=weighted((8, st.none()), (1, st.sampled_from(["address", "public_key"]))))
    def test_registrations_of_every_shape(self, which, address, key, ip, identity, extra, drop):
        world = self.fresh()
        nodes = NEW_NODES + list(zip(NODE_ADDRESSES, NODE_KEYS))
        node_address, node_key = nodes[which]
        if identity != "right":
            world.h.outbound.pages[node_address] = {
                "other": (200, identity_body(NODE_KEYS[(which + 1) % 4])), "404": (404, b"{}"),
                "junk": (200, b"\xff{"), "down": NextHopFailed("next hop refused the connection"),
                "slow": NextHopTimeout("next hop did not answer in time")}[identity]
        public_key = pem(node_key)
        if key == "other":
            public_key = pem(NODE_KEYS[(which + 2) % 4])
        elif key == "small-junk":
            public_key = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"
        elif key == "ec":
            public_key = EC_PEM
        elif key == "truncated":
            public_key = public_key[:len(public_key) // 2]
        elif key is not None:
            public_key = key
        body = {"address": address if address is not None else str(node_address), "public_key": public_key, **extra}
        if drop:
            body.pop(drop, None)
        source = ip if ip is not None else node_address.host
        before = world.state()
        response = self.exchange(world, source, post_json(to_json(body), path=b"/nodes", host=HOST))
        check_answer(self, response, REGISTRATION_STATUSES, context=body)
        if response.status != 200:
            self.assertEqual(world.state(), before, f"{response.status} for {body!r} changed the registry")
            return
        self.assertEqual(orjson.loads(response.body), {"registered": True, "heartbeat": 30})
        listed = world.h.registry.nodes[wire.parse_address(body["address"], PORT)]
        self.assertEqual(listed.fingerprint, crypto.fingerprint(crypto.load_public_key_pem(body["public_key"])))
        self.assertEqual(listed.ip, source)


def _ec_pem() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


EC_PEM = _ec_pem()
