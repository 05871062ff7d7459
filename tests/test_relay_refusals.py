"""Relay refusals in the in-memory network (tests/support/relay_network.py): malformed input leaves
every table as it was (§3), and rate limits.
"""

from __future__ import annotations

from twisted.internet import defer

from onion_twisted.protocol import cells, control, crypto, wire
from onion_twisted.protocol.errors import BadRequest, ProtocolError, RateLimited
from tests.support.deferreds import inline
from tests.support.relay_network import (BridgeTestCase, FILES_REPLY, Network, RelayTestCase, TRACKER_IP,
                                         TRACKER_KEY, dumps)


# --- malformed input, rate limits, failing next hops -------------------------------------------


class MalformedTests(BridgeTestCase):
    """Every refused message leaves every table as it was (§3)."""

    def setUp(self):
        d = super().setUp()
        d.addCallback(lambda _: defer.ensureDeferred(self._fresh()))
        return d

    async def _fresh(self):
        self.fresh = await self.requester.create(self.v)  # a one-hop circuit, not extended yet

    async def check(self, label, status, node, source_ip, body, signature=None):
        before = self.net.state()
        received = (len(self.net.tracker.received), len(self.requester.received), len(self.sharer.received))
        try:
            answer = await node.handle(source_ip, body, signature)
        except ProtocolError as e:
            self.assertEqual(e.status, status, f"{label}: {e.status} {e.detail}")
            self.assertTrue(e.detail, label)
        else:
            self.fail(f"{label}: accepted with {answer!r}")
        self.assertEqual(self.net.state(), before, label)
        self.assertEqual((len(self.net.tracker.received), len(self.requester.received),
                          len(self.sharer.received)), received, label)

    @inline
    async def test_malformed_cells(self):
        x, peer = self.x, self.requester.ip
        for label, body in [
            ("empty", b""), ("not json", b"GET / HTTP/1.1"), ("array", b"[]"), ("invalid utf-8", b'{"CID":"\xff"}'),
            ("no CID", dumps({"payload": "AAAA"})), ("CID number", dumps({"CID": 1, "payload": "AAAA"})),
            ("CID uppercase", dumps({"CID": self.r.cid.upper(), "payload": "AAAA"})),
            ("CID v1", dumps({"CID": "35ce8f75-6b57-1824-8597-dd756c75a9c5", "payload": "AAAA"})),
            ("no payload", dumps({"CID": self.r.cid})), ("payload list", dumps({"CID": self.r.cid, "payload": [1]})),
            ("destroy 1", dumps({"CID": self.r.cid, "destroy": 1})),
            ("destroy with payload", dumps({"CID": self.r.cid, "destroy": True, "payload": "AAAA"})),
            ("destroy control", dumps({"CID": "control", "destroy": True})),
            ("deep", b'{"CID":"' + self.r.cid.encode() + b'","payload":' + b"[" * 200 + b"]" * 200 + b"}"),
        ]:
            await self.check(label, 400, x, peer, body)

    @inline
    async def test_malformed_creates(self):
        x, peer = self.x, self.requester.ip
        new = wire.new_circuit_id
        for label, body in [
            ("bad base64", dumps({"CID": new(), "payload": "not base64!"})),
            ("garbage ciphertext", cells.encode_cell(new(), b"\x01" * 128)),
            ("short ciphertext", cells.encode_cell(new(), b"\x01" * 16)),
            ("sealed for another node", cells.encode_cell(new(), crypto.seal_session_key(
                self.y.private_key.public_key(), crypto.new_session_key()))),
            ("32-byte key", cells.encode_cell(new(), crypto.seal_session_key(
                x.private_key.public_key(), b"k" * 32))),
        ]:
            await self.check(label, 400, x, peer, body)

    @inline
    async def test_object_payload_on_an_unknown_cid_is_404(self):
        # Objects come only from the tracker or over a bridge: a gone circuit or bridge.
        body = dumps({"CID": wire.new_circuit_id(), "payload": {"type": "file_chunk"}})
        await self.check("object payload", 404, self.x, self.requester.ip, body)

    @inline
    async def test_malformed_forward_layers(self):
        x, peer = self.x, self.requester.ip
        good = crypto.wrap_onion(self.r.layers, dumps({"type": "list"}))
        tampered = bytearray(good)
        tampered[20] ^= 1
        for label, payload in [
            ("tampered", bytes(tampered)), ("too short", good[:27]), ("empty", b""),
            ("backward layer", self.r.layers[0].wrap(b"{}", crypto.BACKWARD)),
            ("other key", crypto.Layer(crypto.new_session_key()).wrap(b"{}", crypto.FORWARD)),
        ]:
            await self.check(label, 400, x, peer, cells.encode_cell(self.r.cid, payload))
        await self.check("object on a node link", 400, x, peer, cells.encode_cell(self.r.cid, {"type": "list"}))
        await self.check("bad base64", 400, x, peer, dumps({"CID": self.r.cid, "payload": "%%%"}))

    @inline
    async def test_malformed_inside_the_onion_is_502_at_the_entry(self):
        x, peer = self.x, self.requester.ip
        one_layer = self.r.layers[:1]  # X's layer is fine, Y cannot peel what is inside
        await self.check("garbage for Y", 502, x, peer,
                         cells.encode_cell(self.r.cid, crypto.wrap_onion(one_layer, b"\x00" * 64)))
        for label, message in [("not json", b"not json"), ("array", b"[1,2]"), ("string", b'"ls"'),
                               ("deep", b'{"type":"x","d":' + b"[" * 200 + b"]" * 200 + b"}")]:
            await self.check(label, 502, x, peer, self.requester.cell(self.r, message))

    @inline
    async def test_malformed_extends_are_400_and_close_the_circuit(self):
        v, peer = self.v, self.requester.ip
        y = str(self.y.own_address)
        for label, message in [
            ("not json", b"\x00garbage"), ("array", b'["to","relay"]'),
            ("no to", dumps({"relay": "AAAA"})), ("no relay", dumps({"to": y})),
            ("bad address", dumps({"to": "127.0.0.12:0", "relay": "AAAA"})),
            ("address number", dumps({"to": 12, "relay": "AAAA"})),
            ("relay bad base64", dumps({"to": y, "relay": "%%"})),
            ("relay number", dumps({"to": y, "relay": 5})), ("relay null", dumps({"to": y, "relay": None})),
        ]:
            before = self.net.state()
            fresh = await self.requester.create(v)
            sent = len(self.net.log)
            e = await self.refused(BadRequest, v.handle(peer, self.requester.cell(fresh, message)))
            self.assertEqual(e.status, 400, label)
            self.assertEqual(self.net.state(), before, label)  # the circuit is gone, nothing else changed
            # V told the requester its circuit is closed, and sent nothing else anywhere.
            self.assertEqual([(a, body) for _, a, body in self.net.log[sent:]],
                             [(self.requester.address, cells.encode_destroy(fresh.cid))], label)

    @inline
    async def test_malformed_from_the_tracker_and_over_bridges(self):
        z = self.z
        await self.check("base64 from the tracker", 400, z, TRACKER_IP,
                         cells.encode_cell(self.r.tracker_cid, b"\x00" * 40))
        await self.check("bridge base64", 400, z, self.w.own_address.host,
                         cells.encode_cell(self.bridge_cid, b"\x00" * 40))
        body, signature = control.sign_control(TRACKER_KEY, {"type": "make_bridge"})
        await self.check("control missing fields", 400, z, TRACKER_IP, body, signature)
        await self.check("control payload string", 400, z, TRACKER_IP,
                         dumps({"CID": "control", "payload": "AAAA"}),
                         crypto.sign_body(TRACKER_KEY, dumps({"CID": "control", "payload": "AAAA"})))
        await self.check("control unsigned", 403, z, TRACKER_IP,
                         control.sign_control(TRACKER_KEY, self.receive_bridge(self.r, self.s, wire.new_circuit_id()))[0])

    @inline
    async def test_circuit_works_after_malformed_traffic(self):
        await self.check("tampered", 400, self.x, self.requester.ip, cells.encode_cell(self.r.cid, b"\x00" * 60))
        self.assertEqual(await self.requester.request(self.r, {"type": "list"}), FILES_REPLY)


class RateLimitTests(RelayTestCase):
    def setUp(self):
        super().setUp()
        self.net = Network(burst=3)
        self.peer, self.peer2 = self.net.peers
        self.x = self.net.nodes[0]

    async def create_at_x(self, times: int):
        """``times`` CREATEs from the first peer at X."""
        for _ in range(times):
            await self.peer.create(self.x)

    @inline
    async def test_429_after_the_create_burst(self):
        await self.create_at_x(3)
        before = self.net.state()
        e = await self.refused(RateLimited, self.peer.create(self.x))
        self.assertEqual((e.status, e.error), (429, "rate_limited"))
        self.assertEqual(self.net.state(), before)
        self.assertEqual(len(self.x.table), 3)

    @inline
    async def test_limit_is_per_source_ip(self):
        await self.create_at_x(3)
        await self.refused(RateLimited, self.peer.create(self.x))
        await self.peer2.create(self.x)
        self.assertEqual(len(self.x.table), 4)

    @inline
    async def test_tokens_come_back_with_time(self):
        await self.create_at_x(3)
        await self.refused(RateLimited, self.peer.create(self.x))
        self.net.clock.advance(1)
        await self.peer.create(self.x)
        await self.refused(RateLimited, self.peer.create(self.x))

    @inline
    async def test_traffic_on_existing_circuits_is_not_limited(self):
        circuit = await self.peer.build([self.x], connect=True)
        await self.create_at_x(2)
        await self.refused(RateLimited, self.peer.create(self.x))
        for _ in range(10):
            self.assertEqual(await self.peer.request(circuit, {"type": "list"}), FILES_REPLY)
