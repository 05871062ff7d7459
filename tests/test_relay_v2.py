"""NodeRelay on onion-http/2 circuits (PROTOCOL.md §10-§12, §14), in the in-memory relay world.

The peer side is tests/support/v2_client.py: protocol.ntor as the client,
counted layers, padded messages in exit frames, the tracker as a sealed hop.
"""

from __future__ import annotations

import gc
import tracemalloc

import orjson
from twisted.internet import defer
from twisted.trial import unittest

from onion_twisted.net.ratelimit import RateLimiter
from onion_twisted.node.circuits import RelayTable
from onion_twisted.node.relay_v2 import chunk_size_of
from onion_twisted.protocol import bridged, cells, e2e, messages, ntor, onion2, wire
from onion_twisted.protocol.errors import BadRequest, Conflict, Forbidden, UnknownCircuit
from onion_twisted.protocol.onion_keys import ONION_KEY_GRACE, OnionKeyRing
from tests.support.relay_network import FILES_REPLY, TRACKER, TRACKER_IP, RelayTestCase, dumps
from tests.support.v2_client import SealedTracker, V2Client


def inline(f):
    return lambda self: defer.ensureDeferred(f(self))


class V2TestCase(RelayTestCase):
    def setUp(self):
        super().setUp()
        self.tracker = SealedTracker(self.net.clock)
        self.net.tracker = self.net.members[TRACKER] = self.tracker
        self.client = V2Client(self.peer)
        self.client2 = V2Client(self.peer2)

    def posts_from(self, ip, to):
        return [body for sender, address, body in self.net.log if sender == ip and address == to]

    async def assertRefused(self, status, awaitable, what=""):
        before = (self.net.state(), len(self.tracker.received), len(self.net.log))
        try:
            answer = await awaitable
        except Exception as e:
            self.assertEqual(getattr(e, "status", None), status, f"{what}: {e!r}")
        else:
            self.fail(f"{what}: accepted with {answer!r}")
        self.assertEqual((self.net.state(), len(self.tracker.received), len(self.net.log)), before, what)


class BuildTests(V2TestCase):
    @inline
    async def test_three_hops_then_the_tracker_unsealed(self):
        circuit = await self.client.build([self.x, self.y, self.z], connect=False)
        self.assertEqual([c.v2 for c in (self.x.table.by_in[circuit.cid],)], [True])
        self.assertEqual(await self.client.connect(circuit), FILES_REPLY)
        exit_circuit = self.z.table.by_out[circuit.tracker_cid]
        self.assertTrue(exit_circuit.v2)
        self.assertFalse(exit_circuit.sealed)
        # A message after the connect: an OBJECT frame each way.
        self.assertEqual(await self.client.request(circuit, {"type": "list"}), FILES_REPLY)
        self.assertEqual(self.tracker.received[-1], (self.z.own_address.host, circuit.tracker_cid, {"type": "list"}))

    @inline
    async def test_sealed_tracker_hop(self):
        circuit = await self.client.build([self.x, self.y, self.z], tracker=self.tracker)
        exit_circuit = self.z.table.by_out[circuit.tracker_cid]
        self.assertTrue(exit_circuit.sealed)
        self.assertEqual(self.tracker.received[-1][1:], (circuit.tracker_cid, {"type": "ls", "files": ["a"]}))
        self.assertEqual(await self.client.request(circuit, {"type": "list"}), FILES_REPLY)
        # The exit forwards the tracker's layer as bytes: it never sees a message type.
        for body in self.posts_from(self.z.own_address.host, TRACKER):
            self.assertNotIn(b'"type"', body)  # (quotes never occur in base64)

    @inline
    async def test_backward_messages_are_framed_at_the_exit(self):
        sealed = await self.client.build([self.x, self.y, self.z], tracker=self.tracker)
        body = self.tracker.backward_cell(self.z.own_address.host, sealed.tracker_cid, {"type": "request", "n": 1})
        self.assertEqual(await self.z.handle(TRACKER_IP, body), b"{}")
        unsealed = await self.client.build([self.y, self.x, self.z])
        await self.net.from_tracker(self.z, unsealed.tracker_cid, {"type": "request", "n": 2})
        self.assertEqual(self.client.backward(sealed), [{"type": "request", "n": 1}])
        self.assertEqual(self.client.backward(unsealed), [{"type": "request", "n": 2}])

    @inline
    async def test_a_sealed_frame_on_an_unsealed_circuit_is_400(self):
        circuit = await self.client.build([self.x])  # X is the exit
        bogus = onion2.frame(onion2.FRAME_SEALED, b"\0" * 64)
        await self.assertRefused(400, self.client.send(circuit, bogus), "sealed frame, unsealed circuit")
        await self.assertRefused(400, self.client.send(circuit, b"\x07" + onion2.pad_message(b"{}")), "unknown kind")
        body = cells.encode_cell(circuit.tracker_cid, b"\0" * 64)
        await self.assertRefused(400, self.x.handle(TRACKER_IP, body), "tracker layer, unsealed circuit")

    @inline
    async def test_mixed_with_a_v1_hop(self):
        # A /1 entry, /2 middle and exit: each hop keeps the kind its CREATE made.
        circuit = await self.peer.create(self.x)
        v2_state, data = V2Client.handshake(self.y)
        reply = await self.peer.send(circuit, dumps({"to": str(self.y.own_address), "relay": wire.b64encode(data)}))
        v2_state.finish(self.peer.open(reply, circuit.layers))  # AUTH checks through X's /1 layer
        self.assertFalse(self.x.table.by_in[circuit.cid].v2)
        self.assertEqual([c.v2 for c in self.y.table.by_in.values()], [True])


class ReplayTests(V2TestCase):
    @inline
    async def test_a_replayed_create_gives_the_replayer_nothing(self):
        handshake = V2Client.handshake(self.x)
        circuit = await self.client.create(self.x, handshake)
        recorded = self.client.cell(circuit, self.client.extend_message(TRACKER, b"\x02" + b"\0" * 96))
        # The replayer sends the recorded CREATE under a CID of its own, from its own address.
        replay_cid = wire.new_circuit_id()
        answer = await self.x.handle(self.peer2.ip, cells.encode_cell(replay_cid, handshake[1]))
        self.assertEqual(len(wire.b64decode(cells.parse_reply(answer))), 64)  # a fresh Y: keys it cannot know
        before = len(self.net.log)
        replayed = cells.encode_cell(replay_cid, cells.payload_bytes(cells.parse_cell(recorded)))
        error = await self.refused(BadRequest, self.x.handle(self.peer2.ip, replayed))
        self.assertEqual(error.status, 400)
        self.assertEqual((len(self.net.log), self.tracker.received), (before, []))
        self.assertIsNone(self.x.table.by_in[replay_cid].out_cid)

    @inline
    async def test_a_replayed_layer_counter_is_409_and_not_relayed(self):
        circuit = await self.client.build([self.x, self.y, self.z])
        cell = self.client.cell(circuit, self.client.message_frame(circuit, {"type": "list"}))
        await self.x.handle(self.peer.ip, cell)
        await self.assertRefused(409, self.x.handle(self.peer.ip, cell), "replayed cell")

    @inline
    async def test_window_too_old_and_reordering(self):
        circuit = await self.client.build([self.x])  # X is the exit
        message = self.client.message_frame(circuit, {"type": "list"})
        keys = circuit.keys[0]
        layers = [keys.seal_forward(message) for _ in range(3)]
        before = len(self.tracker.received)
        for i in (2, 0, 1):  # reordered within the window: accepted
            await self.x.handle(self.peer.ip, cells.encode_cell(circuit.cid, layers[i]))
        self.assertEqual(len(self.tracker.received), before + 3)
        old = keys.seal_forward(message)
        for _ in range(onion2.WINDOW + 10):
            keys.seal_forward(b"")  # counters spent without sending
        await self.x.handle(self.peer.ip, cells.encode_cell(circuit.cid, keys.seal_forward(message)))
        error = await self.refused(Conflict, self.x.handle(self.peer.ip, cells.encode_cell(circuit.cid, old)))
        self.assertIn("too old", error.detail)
        self.assertEqual(len(self.tracker.received), before + 4)


class VersionTests(V2TestCase):
    @inline
    async def test_accept_v1_false_refuses_a_v1_create_with_403(self):
        self.x.accept_v1 = False
        error = await self.refused(Forbidden, self.peer.create(self.x))
        self.assertEqual(error.detail, "this node accepts onion-http/2 circuits only")
        self.assertEqual(len(self.x.table), 0)
        circuit = await self.client.build([self.x, self.y, self.z])  # /2 still builds
        self.assertEqual(await self.client.request(circuit, {"type": "list"}), FILES_REPLY)

    @inline
    async def test_a_v1_create_works_with_accept_v1(self):
        circuit = await self.peer.build([self.x, self.y, self.z])
        self.assertFalse(self.x.table.by_in[circuit.cid].v2)
        self.assertEqual(await self.peer.request(circuit, {"type": "list"}), FILES_REPLY)

    @inline
    async def test_a_node_of_v1_only_refuses_a_handshake_and_relays_v1(self):
        # speak_v2 = false: the node as it was before /2; a /1 circuit still crosses it.
        handshake = V2Client.handshake(self.x)[1]
        self.x.onion_keys = None
        error = await self.refused(BadRequest, self.x.handle(self.peer.ip, cells.encode_cell(wire.new_circuit_id(),
                                                                                             handshake)))
        self.assertIn("onion-http/1 only", error.detail)
        self.assertEqual(len(self.x.table), 0)
        circuit = await self.peer.build([self.x, self.y, self.z])
        self.assertEqual(await self.peer.request(circuit, {"type": "list"}), FILES_REPLY)

    @inline
    async def test_handshakes_for_another_member_or_key(self):
        state, data = ntor.client_start(self.y.member_id, self.x.onion_keys.current_public)
        await self.assertRefused(400, self.x.handle(self.peer.ip, cells.encode_cell(wire.new_circuit_id(), data)))
        state, data = ntor.client_start(self.x.member_id, self.y.onion_keys.current_public)
        await self.assertRefused(400, self.x.handle(self.peer.ip, cells.encode_cell(wire.new_circuit_id(), data)))

    @inline
    async def test_v2_creates_spend_the_create_budget(self):
        for _ in range(20):  # the world's burst per peer
            await self.client.create(self.x)
        _, data = V2Client.handshake(self.x)
        await self.assertRefused(429, self.x.handle(self.peer.ip, cells.encode_cell(wire.new_circuit_id(), data)))

    @inline
    async def test_onion_key_rotation_keeps_the_old_key_for_its_grace(self):
        ring = self.x.onion_keys = OnionKeyRing(self.net.clock, lifetime=3600)
        old = V2Client.handshake(self.x)
        self.net.clock.advance(3600)
        self.assertTrue(ring.rotate_if_due())
        self.assertNotEqual(ring.current_public, old[0].onion)
        await self.client.create(self.x, old)  # within the grace: accepted
        self.net.clock.advance(ONION_KEY_GRACE + 1)
        _, data = ntor.client_start(self.x.member_id, old[0].onion)
        error = await self.refused(BadRequest, self.x.handle(self.peer.ip, cells.encode_cell(wire.new_circuit_id(), data)))
        self.assertIn("unknown onion key", error.detail)
        await self.client.create(self.x)  # the new key works


class TeardownTests(V2TestCase):
    @inline
    async def test_layered_destroy_unsealed(self):
        other = await self.client2.build([self.y, self.x, self.w])
        circuit = await self.client.build([self.x, self.y, self.z])
        self.assertEqual(await self.client.destroy(circuit), b"{}")
        for node in (self.x, self.y, self.z):
            self.assertNotIn(circuit.cid, node.table.by_in)
        self.assertEqual(self.net.circuit_count(), 3)  # the other circuit is intact
        self.assertIn((self.z.own_address.host, circuit.tracker_cid), self.tracker.destroyed)
        self.assertIsNotNone(other)

    @inline
    async def test_layered_destroy_sealed_reaches_the_tracker_in_its_layer(self):
        circuit = await self.client.build([self.x, self.y, self.z], tracker=self.tracker)
        await self.client.destroy(circuit)
        self.assertEqual(self.net.circuit_count(), 0)
        self.assertEqual(self.tracker.sealed_destroys,
                         [(self.z.own_address.host, circuit.tracker_cid, onion2.DESTROY)])

    @inline
    async def test_replayed_and_forged_destroys_change_nothing(self):
        circuit = await self.client.build([self.x, self.y, self.z])
        old = self.client.cell(circuit, self.client.message_frame(circuit, {"type": "list"}))
        await self.x.handle(self.peer.ip, old)
        # A destroy whose layer was a cell's already seen: 409.
        replayed = dumps({"CID": circuit.cid, "destroy": True, "payload": orjson.loads(old)["payload"]})
        await self.assertRefused(409, self.x.handle(self.peer.ip, replayed), "replayed counter")
        # One that does not authenticate: 400.
        forged = cells.encode_destroy(circuit.cid, (5000).to_bytes(8, "big") + bytes(200))
        await self.assertRefused(400, self.x.handle(self.peer.ip, forged), "forged")
        # From a stranger's address: 403.
        cell = self.client.destroy_cell(circuit)
        await self.assertRefused(403, self.x.handle(self.peer2.ip, cell), "stranger")
        # The real one works once; the same cell again is for a circuit gone.
        await self.x.handle(self.peer.ip, cell)
        self.assertEqual(self.net.circuit_count(), 0)
        await self.refused(UnknownCircuit, self.x.handle(self.peer.ip, cell))

    @inline
    async def test_a_layered_destroy_on_a_v1_circuit_is_400(self):
        circuit = await self.peer.build([self.x, self.y, self.z])
        body = cells.encode_destroy(circuit.cid, bytes(100))
        await self.assertRefused(400, self.x.handle(self.peer.ip, body), "v1 circuit")

    @inline
    async def test_bare_destroy_from_the_peer_closes_every_hop(self):
        circuit = await self.client.build([self.x, self.y, self.z], tracker=self.tracker)
        await self.x.handle(self.peer.ip, cells.encode_destroy(circuit.cid))
        self.assertEqual(self.net.circuit_count(), 0)
        self.assertIn((self.z.own_address.host, circuit.tracker_cid), self.tracker.destroyed)

    @inline
    async def test_bare_destroy_from_the_tracker_closes_back_to_the_peer(self):
        circuit = await self.client.build([self.x, self.y, self.z], tracker=self.tracker)
        await self.z.handle(TRACKER_IP, cells.encode_destroy(circuit.tracker_cid))
        self.assertEqual(self.net.circuit_count(), 0)
        self.assertIn((self.x.own_address.host, circuit.cid),
                      [(ip, cell.cid) for ip, cell in self.peer.received if cell.destroy])


class PaddingTests(V2TestCase):
    @inline
    async def test_the_middle_sees_one_length_for_short_and_longer_messages(self):
        for tracker in (None, self.tracker):
            circuit = await self.client.build([self.x, self.y, self.z], tracker=tracker)
            sizes = []
            for message in ({"type": "list"}, {"type": "ls", "files": ["f" * 600]}):
                before = len(self.net.log)
                await self.client.request(circuit, message)
                into_middle = [b for s, a, b in self.net.log[before:] if a == self.y.own_address]
                sizes.append([len(b) for b in into_middle])
            self.assertEqual(len(sizes[0]), 1)
            self.assertEqual(sizes[0], sizes[1], f"sealed={tracker is not None}")

    @inline
    async def test_a_chunk_is_padded_to_its_transfer_class_backward(self):
        circuit = await self.client.build([self.x, self.y, self.z])
        chunk = {"type": "file_chunk", "transfer": "t", "chunk_idx": 0, "chunk_size": 16384,
                 "data": wire.b64encode(b"x" * 10)}
        before = len(self.net.log)
        await self.net.from_tracker(self.z, circuit.tracker_cid, chunk)
        [layer] = [cells.payload_bytes(cells.parse_cell(b)) for s, a, b in self.net.log[before:]
                   if a == self.y.own_address]
        self.assertEqual(len(layer), 1 + onion2.chunk_class(16384) + onion2.OVERHEAD)
        self.assertEqual(self.client.backward(circuit), [chunk])


class MemoryTests(V2TestCase):
    def test_an_idle_v2_circuit_costs_under_1_kib(self):
        """Built to the tracker (both CIDs, both indexes) and used once each way's window
        exists: what an idle /2 circuit holds, the client's state freed before the count."""
        count = 2000
        clock = self.net.clock
        node = self.x
        node.table = RelayTable(clock)
        node.limiter = RateLimiter(clock, rate=1e9, burst=10**9)
        node.work_limiter = RateLimiter(clock, rate=1e9, burst=10**9, max_keys=1)
        self.net.members[TRACKER] = Quiet()
        self.net.log = NoLog()
        connect = onion2.pad_message(dumps({"to": str(TRACKER), "relay": {"type": "ls", "files": []}}))
        gc.collect()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            for _ in range(count):
                circuit = self.successResultOf(defer.ensureDeferred(self.client.create(node)))
                answer = self.successResultOf(defer.ensureDeferred(self.client.send(circuit, connect)))
                self.assertEqual(answer, b"{}")
            del circuit, answer
            gc.collect()
            used = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
        self.assertEqual((len(node.table), len(node.table.by_out)), (count, count))
        self.assertIsNotNone(next(iter(node.table.by_in.values())).layer._seen_f)
        self.assertLess(used / count, 1024, f"{used / count:.0f} bytes per circuit")


class Quiet:
    def handle(self, source_ip, body):
        return b"{}"


class NoLog(list):
    def append(self, item):
        pass


class BridgeV2Tests(V2TestCase):
    """Requester R = X, Y, Z and sharer S = Y, X, W, both /2 and sealed; bridge W -> Z (§12:
    bridged chunks travel as OBJECT frames, outside the tracker's layer)."""

    @inline
    async def test_chunks_cross_the_bridge_framed_and_padded(self):
        requester, sharer = self.client, self.client2
        r = await requester.build([self.x, self.y, self.z], tracker=self.tracker)
        s = await sharer.build([self.y, self.x, self.w], tracker=self.tracker)
        bridge_cid, now = wire.new_circuit_id(), self.net.clock.seconds()
        await self.net.control(self.z, {"type": "receive_bridge", "issued": now, "CID": r.tracker_cid,
                                        "bridge_CID": bridge_cid, "from": str(self.w.own_address)})
        await self.net.control(self.w, {"type": "make_bridge", "issued": now, "CID": s.tracker_cid,
                                        "transfer": "t1", "to": str(self.z.own_address), "bridge_CID": bridge_cid})
        received = len(self.tracker.received)
        short = {"type": "file_chunk", "transfer": "t1", "file": "a", "chunk_idx": 1, "chunk_size": 16384,
                 "size": 5, "data": wire.b64encode(b"hello")}
        end = {"type": "transfer_end", "transfer": "t1", "status": "ok"}
        before = len(self.net.log)
        self.assertIsNone(await sharer.request(s, short))
        self.assertIsNone(await sharer.request(s, end))
        self.assertEqual(requester.backward(r), [short, end])
        self.assertEqual(len(self.tracker.received), received)  # the tracker never saw them
        self.assertEqual((self.z.table.bridge_count, self.w.table.bridge_count), (0, 0))
        # Backward from the requester's middle hop to its entry: a short chunk has a full one's size.
        out_cid = self.x.table.by_in[r.cid].out_cid
        [chunk_layer, _] = [cells.payload_bytes(cell) for cell in
                            (cells.parse_cell(b) for sender, a, b in self.net.log[before:]
                             if sender == self.y.own_address.host and a == self.x.own_address)
                            if cell.cid == out_cid]
        self.assertEqual(len(chunk_layer), 1 + onion2.chunk_class(16384) + 2 * onion2.OVERHEAD)


class ChunkSizeOfTests(unittest.SynchronousTestCase):
    def test_a_file_chunk_with_a_valid_chunk_size_has_its_class(self):
        for size in (messages.MIN_CHUNK, 262144, messages.MAX_CHUNK):
            self.assertEqual(chunk_size_of({"type": "file_chunk", "transfer": "t", "chunk_size": size}), size)

    def test_a_transfer_start_or_end_is_padded_by_its_length_whatever_its_chunk_size(self):
        for kind in ("transfer_start", "transfer_end"):
            self.assertIsNone(chunk_size_of({"type": kind, "transfer": "t", "chunk_size": 262144}), kind)

    def test_anything_else_is_none(self):
        for size in (True, 262144.0, "262144", None, messages.MIN_CHUNK - 1, messages.MAX_CHUNK + 1, -1):
            for kind in messages.CHUNK_TYPES:
                self.assertIsNone(chunk_size_of({"type": kind, "chunk_size": size}), (kind, size))
        for kind in ("transfer", "request", "files", None):  # chunk_size in a message that is not bridged
            self.assertIsNone(chunk_size_of({"type": kind, "chunk_size": 262144}), kind)
        self.assertIsNone(chunk_size_of([{"type": "file_chunk", "chunk_size": 262144}]))


E2E_CHUNK = 262144


def transfer_start(transfer: str) -> dict:
    """A sharer's §13 transfer_start, made as the sharer makes it."""
    y, cipher = e2e.sharer_side(e2e.public_bytes(e2e.new_private()), transfer)
    return orjson.loads(bridged.transfer_start_message(transfer, E2E_CHUNK, y, cipher.seal_leaves(bytes(64))))


class BridgeE2ETests(V2TestCase):
    """§13's bridged objects (transfer_start, sealed file_chunk, transfer_end with chunk_size)
    between two sealed /2 circuits: A = X, Y, Z and B = Y, X, W."""

    def setUp(self):
        super().setUp()
        self.a = self.successResultOf(defer.ensureDeferred(self.client.build([self.x, self.y, self.z],
                                                                             tracker=self.tracker)))
        self.b = self.successResultOf(defer.ensureDeferred(self.client2.build([self.y, self.x, self.w],
                                                                              tracker=self.tracker)))

    async def bridge(self, requester, sharer, transfer):
        """The tracker's two controls: the requester's exit receives, the sharer's exit sends."""
        bridge_cid, now = wire.new_circuit_id(), self.net.clock.seconds()
        await self.net.control(requester.exit, {"type": "receive_bridge", "issued": now, "CID": requester.tracker_cid,
                                                "bridge_CID": bridge_cid, "from": str(sharer.exit.own_address)})
        await self.net.control(sharer.exit, {"type": "make_bridge", "issued": now, "CID": sharer.tracker_cid,
                                             "transfer": transfer, "to": str(requester.exit.own_address),
                                             "bridge_CID": bridge_cid})

    @staticmethod
    async def send_object(client, circuit, message: dict):
        """An OBJECT frame from the sharer to its exit (v2_client seals what is not a §8 chunk type)."""
        framed = onion2.frame(onion2.FRAME_OBJECT, onion2.pad_message(dumps(message), chunk_size=E2E_CHUNK))
        return client.open_reply(circuit, await client.send(circuit, framed))

    def entry_layers(self, circuit, before):
        """The backward layers the requester's middle hop sent its entry since log entry ``before``:
        what the entry (the hop that knows the peer) sees of each object's length."""
        entry, middle = circuit.hops[0], circuit.hops[1]
        out_cid = entry.table.by_in[circuit.cid].out_cid
        return [len(cells.payload_bytes(cell)) for cell in
                (cells.parse_cell(b) for sender, a, b in self.net.log[before:]
                 if sender == middle.own_address.host and a == entry.own_address)
                if cell.cid == out_cid]

    @inline
    async def test_transfer_start_crosses_the_bridge_both_ways_padded_by_its_length(self):
        ways = ((self.client, self.a, self.client2, self.b, "t-w-to-z"),
                (self.client2, self.b, self.client, self.a, "t-z-to-w"))
        for requester, r, sharer, s, transfer in ways:
            await self.bridge(r, s, transfer)
            start, received, before = transfer_start(transfer), len(self.tracker.received), len(self.net.log)
            self.assertIsNone(await self.send_object(sharer, s, start))
            self.assertEqual(requester.backward(r)[-1], start, transfer)
            self.assertEqual(len(self.tracker.received), received, "the tracker never sees it")
            # A message's class (§14), not a chunk's: the entry sees 1 KiB for this short one.
            self.assertEqual(self.entry_layers(r, before), [1 + 1024 + 2 * onion2.OVERHEAD], transfer)
            self.assertEqual((r.exit.table.bridge_count, s.exit.table.bridge_count), (1, 1), "the bridge stays")
            await self.send_object(sharer, s, bridged.transfer_end_message(transfer, chunk_size=E2E_CHUNK))
            self.assertEqual((r.exit.table.bridge_count, s.exit.table.bridge_count), (0, 0))

    @inline
    async def test_transfer_end_is_padded_by_its_length_with_or_without_chunk_size(self):
        ends = []
        for chunk_size, padded in ((E2E_CHUNK, 1024), (None, 1024)):
            transfer = f"t-{chunk_size}"
            await self.bridge(self.a, self.b, transfer)
            ends.append(bridged.transfer_end_message(transfer, chunk_size=chunk_size))
            before = len(self.net.log)
            await self.send_object(self.client2, self.b, ends[-1])
            # A message's class either way: an older sharer's chunk_size field changes nothing.
            self.assertEqual(self.entry_layers(self.a, before), [1 + padded + 2 * onion2.OVERHEAD], chunk_size)
            self.assertEqual(self.z.table.bridge_count, 0, "the end closes the bridge")
        self.assertEqual(self.client.backward(self.a)[-2:], ends)  # peeled once: layer counters are not replayed

    @inline
    async def test_a_sealed_file_chunk_crosses_the_bridge(self):
        await self.bridge(self.a, self.b, "t1")
        _, cipher = e2e.sharer_side(e2e.public_bytes(e2e.new_private()), "t1")
        chunk = orjson.loads(bridged.sealed_chunk_message("t1", 3, E2E_CHUNK, cipher.seal_chunk(3, b"piece")))
        self.assertTrue(bridged.is_sealed_chunk(chunk))  # no "file": a §13 chunk
        received, before = len(self.tracker.received), len(self.net.log)
        self.assertIsNone(await self.send_object(self.client2, self.b, chunk))
        self.assertEqual(self.client.backward(self.a)[-1], chunk)
        self.assertEqual(len(self.tracker.received), received)
        self.assertEqual(self.entry_layers(self.a, before), [1 + onion2.chunk_class(E2E_CHUNK) + 2 * onion2.OVERHEAD])
