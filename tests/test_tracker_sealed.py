"""The tracker as the sealed last hop of a circuit (PROTOCOL.md §12, §14), in memory.

``tests/support/sealed_client.SealedClient`` plays the exit and the peer
behind it with ``protocol.ntor`` and ``protocol.onion2``: the ntor handshake
as a string payload on a new (exit IP, CID), then every message inside the
tracker layer, padded. Time is a ``task.Clock``; the tracker's own posts go
to ``TrackerOutbound``.
"""

from __future__ import annotations

import base64
import random

import orjson
from twisted.internet import defer
from twisted.trial import unittest

from onion_twisted.protocol import cells, messages, onion2, wire
from onion_twisted.protocol.errors import BadRequest, Conflict, ProtocolError, RateLimited, UnknownCircuit
from onion_twisted.protocol.onion2 import HopKeys
from onion_twisted.protocol.onion_keys import OnionKeyRing

from tests.support.deferreds import inline
from tests.support.sealed_client import SealedClient, string_cell
from tests.support.tracker_fakes import (NODE_ADDRESSES, NODE_IPS, SHA_A, SHA_B, TrackerHarness, cell, dumps,
                                         new_cid)

REQUESTER_IP, SHARER_IP, OTHER_IP = NODE_IPS[0], NODE_IPS[1], NODE_IPS[2]
SHARER_EXIT = NODE_ADDRESSES[1]
SECRET_NAME = "holiday-in-the-alps.jpg"  # a name that must not leave the sealed layer
FILES = [{"name": SECRET_NAME, "size": 1000, "sha256": SHA_A}]


class SealedCase(unittest.TestCase):
    def setUp(self):
        self.h = TrackerHarness()
        self.sharer = SealedClient(self.h, SHARER_IP)
        self.requester = SealedClient(self.h, REQUESTER_IP)

    def handle(self, exit_ip, body):
        return self.h.handle(exit_ip, body)


class HandshakeTests(SealedCase):
    @inline
    async def test_handshake_then_a_sealed_ls_answers_inside_the_layer(self):
        await self.sharer.handshake()
        self.assertIn(self.sharer.key, self.h.tracker.sealed)
        self.assertNotIn(self.sharer.key, self.h.catalogue.circuits)  # the ls opens the catalogue entry
        reply = await self.sharer.send({"type": "ls", "files": FILES})
        self.assertEqual(reply, {"type": "files", "files": [{"name": SECRET_NAME, "size": 1000, "sha256": SHA_A,
                                                             "sources": 1}]})
        self.assertIn(self.sharer.key, self.h.catalogue.circuits)
        self.assertEqual(self.h.tracker.sealed.unopened, {})
        # list and error answers come back inside the layer too.
        self.assertEqual((await self.sharer.send({"type": "list"}))["type"], "files")
        refused = await self.sharer.send({"type": "nonsense"})
        self.assertEqual((refused["type"], refused["error"]), ("error", "bad_request"))

    @inline
    async def test_the_answer_is_padded_and_says_nothing_in_clear(self):
        await self.sharer.handshake()
        answer = await self.sharer.post(string_cell(self.sharer.cid, self.sharer.layer(
            dumps({"type": "ls", "files": FILES}))))
        self.assertNotIn(SECRET_NAME.encode(), answer)
        layer = base64.b64decode(orjson.loads(answer)["payload"])
        self.assertEqual(len(layer), 1024 + onion2.OVERHEAD)  # the smallest class

    @inline
    async def test_replayed_layer_is_409_and_changes_nothing(self):
        await self.sharer.handshake()
        await self.sharer.send({"type": "ls", "files": FILES})
        first = self.sharer.sent[-1]
        await self.sharer.send({"type": "ls", "files": [{"name": "other", "size": 5, "sha256": SHA_B}]})
        before = self.h.snapshot()
        e = await self.assertFailure(self.handle(SHARER_IP, first), Conflict)
        self.assertEqual(e.status, 409)
        self.assertEqual(self.h.snapshot(), before)
        self.assertEqual([r["name"] for r in self.h.catalogue.listing()], ["other"])

    @inline
    async def test_a_layer_that_does_not_authenticate_is_400(self):
        await self.sharer.handshake()
        await self.sharer.send({"type": "ls", "files": FILES})
        before = self.h.snapshot()
        forged = bytearray(self.sharer.layer(dumps({"type": "ls", "files": []})))
        forged[-1] ^= 1
        await self.assertFailure(self.handle(SHARER_IP, string_cell(self.sharer.cid, bytes(forged))), BadRequest)
        self.assertEqual(self.h.snapshot(), before)

    @inline
    async def test_handshake_for_another_member_or_an_unknown_key_is_400(self):
        await self.assertFailure(defer.ensureDeferred(self.sharer.handshake(member=bytes(32))), BadRequest)
        await self.assertFailure(defer.ensureDeferred(self.sharer.handshake(onion=OnionKeyRing(self.h.clock).current_public)), BadRequest)
        await self.assertFailure(self.handle(SHARER_IP, string_cell(new_cid(), b"\x02" + bytes(50))), BadRequest)
        self.assertEqual(len(self.h.tracker.sealed), 0)
        self.assertEqual(self.h.catalogue.circuits, {})

    @inline
    async def test_rotated_key_accepted_in_its_grace_then_refused(self):
        ring = self.h.tracker.onion_keys  # in memory, the default lifetime of 7 days
        old = ring.current_public
        self.assertFalse(self.h.tracker.rotate_onion_key())  # not due
        self.h.clock.advance(7 * 86400)
        self.assertTrue(self.h.tracker.rotate_onion_key())
        self.assertNotEqual(self.h.registry.tracker_onion_key, old)
        await SealedClient(self.h, SHARER_IP).handshake(onion=old)  # a peer with yesterday's directory
        self.h.clock.advance(86400 + 1)
        self.assertTrue(self.h.tracker.rotate_onion_key())  # the old key's grace ended
        await self.assertFailure(defer.ensureDeferred(SealedClient(self.h, SHARER_IP).handshake(onion=old)), BadRequest)
        await SealedClient(self.h, SHARER_IP).handshake()

    @inline
    async def test_a_sealed_layer_on_a_circuit_the_tracker_does_not_know_is_404(self):
        # What a restarted tracker sees of a circuit sealed before: the peer builds anew on 404.
        await self.sharer.handshake()
        await self.sharer.send({"type": "ls", "files": FILES})
        layer = self.sharer.layer(dumps({"type": "list"}))
        self.h.tracker.sealed.forget(self.sharer.key)
        self.h.catalogue.forget(self.sharer.key)
        before = self.h.snapshot()
        e = await self.assertFailure(self.handle(SHARER_IP, string_cell(self.sharer.cid, layer)), UnknownCircuit)
        self.assertEqual(e.status, 404)
        self.assertEqual(self.h.snapshot(), before)
        self.assertEqual(len(self.h.tracker.sealed), 0)

    @inline
    async def test_object_payload_on_a_sealed_circuit_is_400(self):
        await self.sharer.handshake()
        await self.sharer.send({"type": "ls", "files": FILES})
        before = self.h.snapshot()
        await self.assertFailure(self.handle(SHARER_IP, cell(self.sharer.cid, {"type": "ls", "files": []})),
                                 BadRequest)
        self.assertEqual(self.h.snapshot(), before)

    @inline
    async def test_a_handshake_on_a_circuit_open_without_the_layer_is_400(self):
        cid = new_cid()
        await self.h.ls(SHARER_IP, cid, FILES)
        await self.assertFailure(defer.ensureDeferred(SealedClient(self.h, SHARER_IP, cid).handshake()), BadRequest)
        self.assertNotIn((SHARER_IP, cid), self.h.tracker.sealed)
        self.assertEqual((await self.h.send(SHARER_IP, cid, {"type": "list"}))["type"], "files")

    @inline
    async def test_sealed_circuits_are_bounded(self):
        self.h = TrackerHarness(max_circuits=2)
        for _ in range(2):
            await SealedClient(self.h, SHARER_IP).handshake()
        await self.assertFailure(defer.ensureDeferred(SealedClient(self.h, SHARER_IP).handshake()), RateLimited)
        self.assertEqual(len(self.h.tracker.sealed), 2)


class SealedRequestTests(SealedCase):
    @inline
    async def test_request_between_sealed_circuits_names_the_file_only_inside_layers(self):
        await self.sharer.handshake()
        await self.requester.handshake()
        await self.sharer.send({"type": "ls", "files": FILES})
        await self.requester.send({"type": "ls", "files": []})
        reply = await self.requester.send({"type": "request", "file": SECRET_NAME, "chunk_size": 65536})
        self.assertEqual(reply["type"], "transfer", reply)
        self.assertEqual((reply["file"], reply["sha256"]), (SECRET_NAME, SHA_A))
        receive, make, ask = self.h.outbound.posts
        self.assertEqual((receive.kind, make.kind), ("receive_bridge", "make_bridge"))
        for control_post in (receive, make):
            self.assertNotIn(SECRET_NAME.encode(), control_post.body)
        self.assertNotIn(SECRET_NAME.encode(), ask.body)
        self.assertEqual(ask.address, SHARER_EXIT)
        sent = cells.parse_cell(ask.body)
        self.assertEqual(sent.cid, self.sharer.cid)
        self.assertIsInstance(sent.payload, (str, bytes))
        request = orjson.loads(self.sharer.open_layer(cells.payload_bytes(sent)))
        self.assertEqual(request, {"type": "request", "file": SECRET_NAME, "transfer": reply["transfer"],
                                   "chunk_size": 65536, "sha256": SHA_A})
        # The requester's keys (with a window that has not seen its counter) cannot open it.
        k = self.requester.keys
        fresh = HopKeys(k._kf, k._kb, k._nf, k._nb)
        self.assertRaises(BadRequest, fresh.open_backward, cells.payload_bytes(sent))

    @inline
    async def test_request_to_an_unsealed_sharer_goes_as_an_object(self):
        sharer = new_cid()
        await self.h.ls(SHARER_IP, sharer, FILES)
        await self.requester.handshake()
        await self.requester.send({"type": "ls", "files": []})
        reply = await self.requester.send({"type": "request", "file": SECRET_NAME})
        self.assertEqual(reply["type"], "transfer")
        ask = self.h.outbound.posts[-1]
        self.assertEqual(ask.payload["file"], SECRET_NAME)
        self.assertEqual(ask.cell.cid, sharer)


class SealedTeardownTests(SealedCase):
    async def open_circuit(self):
        await self.sharer.handshake()
        await self.sharer.send({"type": "ls", "files": FILES})

    @inline
    async def test_layered_destroy_forgets_the_circuit(self):
        await self.open_circuit()
        self.assertEqual(await self.sharer.destroy(), b"{}")
        self.assertNotIn(self.sharer.key, self.h.tracker.sealed)
        self.assertEqual(self.h.catalogue.circuits, {})
        self.assertEqual(self.h.catalogue.listing(), [])
        # Sent again (a replay), the circuit is unknown now.
        await self.assertFailure(self.handle(SHARER_IP, self.sharer.sent[-1]), UnknownCircuit)

    @inline
    async def test_forged_or_wrong_layered_destroys_change_nothing(self):
        await self.open_circuit()
        before = self.h.snapshot()
        forged = orjson.dumps({"CID": self.sharer.cid, "destroy": True,
                               "payload": base64.b64encode((1000).to_bytes(8, "big") + bytes(200)).decode()})
        await self.assertFailure(self.handle(SHARER_IP, forged), BadRequest)
        # An authentic layer holding something other than {"type":"destroy"}.
        await self.assertFailure(defer.ensureDeferred(self.sharer.destroy(b'{"type":"destroy","x":1}')), BadRequest)
        # A layer of an earlier message, replayed as a destroy.
        replayed = orjson.loads(self.sharer.sent[0])["payload"]
        body = orjson.dumps({"CID": self.sharer.cid, "destroy": True, "payload": replayed})
        await self.assertFailure(self.handle(SHARER_IP, body), Conflict)
        await self.assertFailure(self.handle(SHARER_IP, orjson.dumps(
            {"CID": self.sharer.cid, "destroy": True, "payload": "not base64!"})), BadRequest)
        self.assertEqual(self.h.snapshot(), before)
        self.assertIn(self.sharer.key, self.h.tracker.sealed)
        self.assertEqual((await self.sharer.send({"type": "list"}))["files"][0]["name"], SECRET_NAME)

    @inline
    async def test_layered_destroy_on_an_unsealed_or_unknown_circuit(self):
        cid = new_cid()
        await self.h.ls(SHARER_IP, cid, FILES)
        body = orjson.dumps({"CID": cid, "destroy": True, "payload": base64.b64encode(bytes(100)).decode()})
        await self.assertFailure(self.handle(SHARER_IP, body), BadRequest)
        self.assertIn((SHARER_IP, cid), self.h.catalogue.circuits)
        body = orjson.dumps({"CID": new_cid(), "destroy": True, "payload": base64.b64encode(bytes(100)).decode()})
        await self.assertFailure(self.handle(SHARER_IP, body), UnknownCircuit)

    @inline
    async def test_bare_destroy_from_the_exit_forgets_a_sealed_circuit(self):
        await self.open_circuit()
        self.assertEqual(await self.handle(SHARER_IP, dumps({"CID": self.sharer.cid, "destroy": True})), b"{}")
        self.assertNotIn(self.sharer.key, self.h.tracker.sealed)
        self.assertEqual(self.h.catalogue.circuits, {})
        # A circuit that only shook hands is known too.
        await self.requester.handshake()
        self.assertEqual(await self.handle(REQUESTER_IP, dumps({"CID": self.requester.cid, "destroy": True})),
                         b"{}")
        self.assertEqual(len(self.h.tracker.sealed), 0)

    @inline
    async def test_keys_expire_with_the_catalogue_and_lone_handshakes_after_the_idle_time(self):
        self.h = TrackerHarness(idle_timeout=600.0, heartbeat=10_000.0)
        self.sharer, lone = SealedClient(self.h, SHARER_IP), SealedClient(self.h, OTHER_IP)
        await self.open_circuit()
        await lone.handshake()
        self.h.clock.advance(300)
        self.h.tracker.expire()
        self.assertEqual(set(self.h.tracker.sealed.hops), {self.sharer.key, lone.key})
        self.h.clock.advance(301)
        self.h.tracker.expire()
        self.assertEqual(len(self.h.tracker.sealed), 0)
        self.assertEqual(self.h.catalogue.circuits, {})


class SealedFuzzTests(SealedCase):
    @inline
    async def test_mangled_sealed_cells_are_refused_with_a_status_and_change_nothing(self):
        rng = random.Random(7)
        refused = 0
        for _ in range(300):
            if self.sharer.key not in self.h.tracker.sealed:
                # A mangled "payload" name can leave a bare destroy, which closes the circuit: a new one.
                self.sharer = SealedClient(self.h, SHARER_IP)
                await self.sharer.handshake()
                await self.sharer.send({"type": "ls", "files": FILES})
            body = bytearray(rng.choice([
                string_cell(self.sharer.cid, self.sharer.layer(dumps({"type": "ls", "files": []}))),
                self.sharer.destroy_body()]))
            for _ in range(rng.randint(1, 4)):
                body[rng.randrange(len(body))] = rng.randrange(256)
            before = self.h.snapshot()
            try:
                await self.handle(SHARER_IP, bytes(body))
            except ProtocolError as e:
                refused += 1
                self.assertIn(e.status, (400, 404, 409))
                self.assertEqual(self.h.snapshot(), before)
        self.assertGreater(refused, 250)


# --- §13: which transfers are end to end ---------------------------------------------------

ROOT = "d" * 64
ROOT_FILES = [{"name": SECRET_NAME, "size": 1000, "sha256": SHA_A, "root": ROOT}]
KEY = bytes(range(1, 33))  # the requester's ephemeral X25519 public key
E2E_REQUEST = messages.request_message(SECRET_NAME, 262144, key=KEY)


class SealedE2ETests(SealedCase):
    """The transfer is end to end only when both circuits are sealed and the entry has a root:
    the requester's key must cross no exit in the clear, on its way in or out."""

    def sharer_request(self, ask) -> dict:
        sent = cells.parse_cell(ask.body)
        if isinstance(sent.payload, dict):  # an unsealed sharer: an object, readable at its exit
            return sent.payload
        return orjson.loads(self.sharer.open_layer(cells.payload_bytes(sent)))

    async def share(self, files=ROOT_FILES, sealed_sharer=True):
        if sealed_sharer:
            await self.sharer.handshake()
            await self.sharer.send({"type": "ls", "files": files})
        else:
            await self.h.ls(SHARER_IP, new_cid(), files)

    @inline
    async def test_sealed_requester_and_sealed_sharer_of_a_root_entry(self):
        await self.share()
        await self.requester.handshake()
        reply = await self.requester.send(E2E_REQUEST)
        self.assertEqual((reply["type"], reply["root"], reply["size"], reply.get("e2e")),
                         ("transfer", ROOT, 1000, True), reply)
        self.assertIs(messages.parse_transfer(reply).e2e, True)
        receive, make, ask = self.h.outbound.posts
        request = self.sharer_request(ask)
        self.assertEqual((request["key"], request["root"]), (wire.b64encode(KEY), ROOT))
        self.assertEqual(messages.parse_source_request(request).key, KEY)
        for post in (receive, make, ask):  # the key rides in the sealed layers only
            self.assertNotIn(wire.b64encode(KEY).encode(), post.body)

    @inline
    async def test_an_unsealed_requester_gets_no_e2e_and_the_sharer_no_key(self):
        await self.share()
        requester = new_cid()
        await self.h.ls(REQUESTER_IP, requester, [])
        reply = await self.h.send(REQUESTER_IP, requester, E2E_REQUEST)  # a /1 object: its exit read the key
        self.assertEqual((reply["type"], reply["root"]), ("transfer", ROOT), reply)
        self.assertNotIn("e2e", reply)
        request = self.sharer_request(self.h.outbound.posts[-1])
        self.assertNotIn("key", request)
        self.assertEqual(request["root"], ROOT)  # the sharer still knows which content

    @inline
    async def test_an_unsealed_sharer_gets_no_key(self):
        await self.share(sealed_sharer=False)
        await self.requester.handshake()
        reply = await self.requester.send(E2E_REQUEST)
        self.assertEqual((reply["type"], reply.get("e2e")), ("transfer", None), reply)
        ask = self.h.outbound.posts[-1]
        self.assertEqual(ask.payload["root"], ROOT)  # an object: its exit reads it
        self.assertNotIn("key", ask.payload)

    @inline
    async def test_an_entry_without_a_root_is_not_end_to_end(self):
        await self.share(files=FILES)
        await self.requester.handshake()
        reply = await self.requester.send(E2E_REQUEST)
        self.assertEqual((reply["type"], "root" in reply, "e2e" in reply), ("transfer", False, False), reply)
        self.assertNotIn("key", self.sharer_request(self.h.outbound.posts[-1]))

    @inline
    async def test_a_key_with_a_chunk_size_of_no_whole_pieces_is_bad_request(self):
        await self.share()
        await self.requester.handshake()
        reply = await self.requester.send(dict(E2E_REQUEST, chunk_size=65536))
        self.assertEqual((reply["type"], reply["error"]), ("error", "bad_request"))
        self.assertEqual(self.h.outbound.posts, [])
