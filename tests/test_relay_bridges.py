"""Relay bridges in the in-memory network (tests/support/relay_network.py): the control messages that
make them, chunks across them, one exit for both ends (§7, §8).
"""

from __future__ import annotations

from onion_twisted.protocol import cells, control, wire
from onion_twisted.protocol.errors import (BadRequest, Conflict, Forbidden, NextHopFailed, ProtocolError,
                                           UnknownCircuit)
from tests.support.deferreds import inline
from tests.support.relay_network import (BridgeTestCase, FILES_REPLY, FORGER_KEY, STRANGER_IP, TRACKER_IP,
                                         TRACKER_KEY, dumps)


# --- bridges (§7, §8) -------------------------------------------------------------------


class BridgeTests(BridgeTestCase):
    def test_control_messages_create_both_ends(self):
        self.assertIn(self.bridge_cid, self.z.table.bridges_in)
        self.assertIn(self.bridge_cid, self.w.table.bridges_out)
        self.assertEqual(self.net.bridge_count(), 2)

    @inline
    async def test_file_chunk_crosses_the_bridge_to_the_requester(self):
        count = len(self.net.tracker.received)
        chunk = self.chunk()
        answer = await self.sharer.send(self.s, dumps(chunk))
        self.assertEqual(answer, b"{}")
        self.assertEqual(self.requester.backward(self.r), [chunk])
        self.assertEqual(len(self.net.tracker.received), count)  # the tracker never saw it

    @inline
    async def test_chunks_arrive_in_order(self):
        chunks = [self.chunk(i, bytes([i]) * 100) for i in range(5)]
        for chunk in chunks:
            await self.sharer.send(self.s, dumps(chunk))
        self.assertEqual(self.requester.backward(self.r), chunks)

    @inline
    async def test_full_size_chunk_crosses_the_bridge(self):
        chunk = self.chunk(data=bytes(range(256)) * 1024)
        await self.sharer.send(self.s, dumps(chunk))
        self.assertEqual(self.requester.backward(self.r), [chunk])

    @inline
    async def test_transfer_end_removes_both_bridge_ends(self):
        await self.sharer.send(self.s, dumps(self.chunk()))
        await self.sharer.send(self.s, dumps(self.end()))
        self.assertEqual(self.requester.backward(self.r), [self.chunk(), self.end()])
        self.assertEqual((self.z.table.bridge_count, self.w.table.bridge_count), (0, 0))
        # afterwards the exit answers a chunk of that transfer as the tracker would, and
        # keeps it from the tracker (docs 17.10, choice 59)
        told = len(self.net.tracker.received)
        reply = await self.sharer.request(self.s, self.chunk(1))
        self.assertEqual((reply["type"], reply["error"]), ("error", "no_bridge"))
        self.assertEqual(len(self.net.tracker.received), told)
        self.assertEqual(len(self.requester.backward(self.r)), 2)

    @inline
    async def test_a_chunk_of_another_transfer_is_answered_no_bridge_at_the_exit(self):
        told = len(self.net.tracker.received)
        reply = await self.sharer.request(self.s, self.chunk(transfer="other"))
        self.assertEqual((reply["type"], reply["error"]), ("error", "no_bridge"))
        self.assertEqual(len(self.net.tracker.received), told)
        self.assertEqual(self.requester.received, [])
        self.assertEqual(self.net.bridge_count(), 2)

    @inline
    async def test_other_messages_of_the_sharer_go_to_the_tracker(self):
        self.assertEqual(await self.sharer.request(self.s, {"type": "list", "transfer": self.transfer}), FILES_REPLY)
        self.assertEqual(self.requester.received, [])

    @inline
    async def test_requester_circuit_has_no_outgoing_bridge(self):
        told = len(self.net.tracker.received)
        reply = await self.requester.request(self.r, self.chunk())
        self.assertEqual((reply["type"], reply["error"]), ("error", "no_bridge"))
        self.assertEqual(len(self.net.tracker.received), told)

    @inline
    async def test_bridge_cid_from_other_ip_is_403(self):
        body = cells.encode_cell(self.bridge_cid, self.chunk())
        for ip in (STRANGER_IP, TRACKER_IP, self.y.own_address.host):
            await self.refused(Forbidden, self.z.handle(ip, body))
        self.assertEqual(self.requester.received, [])
        self.assertEqual(self.net.bridge_count(), 2)

    @inline
    async def test_bridge_cell_must_carry_an_object(self):
        body = cells.encode_cell(self.bridge_cid, b"\x00" * 40)
        await self.refused(BadRequest, self.z.handle(self.w.own_address.host, body))
        self.assertEqual(self.requester.received, [])

    @inline
    async def test_drop_bridge_forgets_each_end(self):
        drop = {"type": "drop_bridge", "issued": self.net.clock.seconds(), "bridge_CID": self.bridge_cid}
        self.assertEqual(await self.net.control(self.z, drop), b"{}")
        self.assertEqual(await self.net.control(self.w, drop), b"{}")
        self.assertEqual(self.net.bridge_count(), 0)
        await self.refused(Conflict, self.net.control(self.w, drop))  # the same signed body again
        await self.refused(UnknownCircuit, self.net.control(self.w, dict(drop, issued=drop["issued"] + 1)))
        reply = await self.sharer.request(self.s, self.chunk())
        self.assertEqual(reply["type"], "error")
        self.assertEqual(self.requester.received, [])

    @inline
    async def test_receive_bridge_replayed_after_drop_under_any_spelling_of_its_signature_is_refused(self):
        # The receive_bridge that made Z's end, captured and replayed after drop_bridge:
        # under its own signature text, and under each other base64 spelling of the
        # same 64 bytes (the low bits of the last digit before the padding are unused).
        bridge_cid = wire.new_circuit_id()
        payload = self.receive_bridge(self.r, self.s, bridge_cid)
        body, signature = control.sign_control(TRACKER_KEY, payload)
        self.assertEqual(await self.z.handle(TRACKER_IP, body, signature), b"{}")
        drop = {"type": "drop_bridge", "issued": self.net.clock.seconds(), "bridge_CID": bridge_cid}
        await self.net.control(self.z, drop)
        self.assertNotIn(bridge_cid, self.z.table.bridges_in)
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
        base = alphabet.index(signature[-3]) & ~0x0F
        spellings = [signature[:-3] + alphabet[base | low] + "==" for low in range(16)]
        self.assertIn(signature, spellings)
        for spelling in spellings:
            e = await self.refused(ProtocolError, self.z.handle(TRACKER_IP, body, spelling))
            self.assertIn(e.status, (403, 409), spelling)
            self.assertNotIn(bridge_cid, self.z.table.bridges_in, spelling)

    @inline
    async def test_bridge_dies_with_its_circuit(self):
        await self.sharer.destroy(self.s)
        self.assertEqual(self.w.table.bridge_count, 0)
        await self.z.handle(TRACKER_IP, cells.encode_destroy(self.r.tracker_cid))
        self.assertEqual(self.z.table.bridge_count, 0)
        self.assertEqual(self.net.circuit_count(), 0)

    @inline
    async def test_bridge_idle_expiry(self):
        self.net.clock.advance(300)
        await self.sharer.send(self.s, dumps(self.chunk()))
        self.net.clock.advance(300.5)
        for node in self.net.nodes:
            node.table.expire()
        self.assertEqual(self.net.bridge_count(), 2)
        self.net.clock.advance(300)
        for node in (self.z, self.w):
            node.table.expire()
        self.assertEqual(self.net.bridge_count(), 0)

    @inline
    async def test_requester_exit_down_is_bridge_gone_for_the_sharer(self):
        # The sharer's circuit is fine; only the bridge is gone: the exit says
        # so in a reply and drops its end, rather than failing the circuit.
        self.net.down.add(self.z.own_address)
        reply = await self.sharer.request(self.s, self.chunk())
        self.assertEqual((reply["type"], reply["error"]), ("error", "bridge_gone"))
        self.assertEqual(self.w.table.bridge_count, 0)
        self.assertEqual(self.z.table.bridge_count, 1)
        # The rest of the sharer's window finds no bridge: no_bridge, from the exit.
        told = len(self.net.tracker.received)
        reply = await self.sharer.request(self.s, self.chunk(1))
        self.assertEqual((reply["type"], reply["error"]), ("error", "no_bridge"))
        self.assertEqual(len(self.net.tracker.received), told)

    @inline
    async def test_deeply_nested_chunk_is_refused_at_the_exit(self):
        # JSON a node can parse but not re-encode must not reach the bridge
        body = dumps(self.chunk())[:-1] + b',"deep":' + b"[" * 300 + b"]" * 300 + b"}"
        before = self.net.state()
        await self.refused(NextHopFailed, self.sharer.send(self.s, body))
        self.assertEqual(self.net.refusals[0], (self.w.own_address, 400))
        self.assertEqual(self.requester.received, [])
        self.assertEqual(self.net.state(), before)


class BridgeControlTests(BridgeTestCase):
    """Refused control messages create no bridge (§7)."""

    def setUp(self):
        d = super().setUp()
        d.addCallback(lambda _: self._snapshot())
        return d

    def _snapshot(self):
        self.before = self.net.state()
        self.new_bridge = wire.new_circuit_id()

    async def check_refused(self, exc_type, node, payload, **kw):
        e = await self.refused(exc_type, self.net.control(node, payload, **kw))
        self.assertEqual(self.net.state(), self.before)
        return e

    @inline
    async def test_bad_signature_is_403(self):
        bridge_cid = wire.new_circuit_id()
        payload = self.receive_bridge(self.r, self.s, bridge_cid)
        e = await self.check_refused(Forbidden, self.z, payload, key=FORGER_KEY)
        self.assertEqual(e.status, 403)
        await self.check_refused(Forbidden, self.z, payload, signature="")
        await self.check_refused(Forbidden, self.z, payload, signature="not base64")
        _, other_signature = control.sign_control(TRACKER_KEY, self.receive_bridge(self.r, self.s, wire.new_circuit_id()))
        await self.check_refused(Forbidden, self.z, payload, signature=other_signature)

    @inline
    async def test_stale_issued_is_403(self):
        now = self.net.clock.seconds()
        for issued in (now - 61, now + 61):
            e = await self.check_refused(Forbidden, self.w, self.make_bridge(self.r, self.s, self.new_bridge, "t-2",
                                                                            issued=issued))
            self.assertIn("stale", e.detail)

    @inline
    async def test_issued_59_s_ago_is_accepted(self):
        payload = self.make_bridge(self.r, self.s, self.new_bridge, "t-2", issued=self.net.clock.seconds() - 59)
        self.assertEqual(await self.net.control(self.w, payload), b"{}")
        self.assertIn(self.new_bridge, self.w.table.bridges_out)

    @inline
    async def test_node_without_tracker_key_refuses(self):
        self.net.directory.key = None
        await self.check_refused(Forbidden, self.z, self.receive_bridge(self.r, self.s, self.new_bridge))

    @inline
    async def test_bridge_for_unknown_circuit_is_404(self):
        await self.check_refused(UnknownCircuit, self.z, self.receive_bridge(self.r, self.s, self.new_bridge,
                                                                             CID=wire.new_circuit_id()))
        # not an exit of that circuit: X's OutCID of R is a node link
        at_x = self.circuit_at(self.x, self.r.cid)
        await self.check_refused(UnknownCircuit, self.x, self.receive_bridge(self.r, self.s, self.new_bridge,
                                                                             CID=at_x.out_cid))

    @inline
    async def test_duplicate_bridge_cid_is_409(self):
        await self.check_refused(Conflict, self.z, self.receive_bridge(self.r, self.s, self.bridge_cid))

    @inline
    async def test_malformed_control_is_400(self):
        for payload in ({"type": "receive_bridge"},
                        self.receive_bridge(self.r, self.s, self.new_bridge, type="open_proxy"),
                        self.receive_bridge(self.r, self.s, "not-a-uuid"),
                        self.receive_bridge(self.r, self.s, self.new_bridge, **{"from": "bad address!"}),
                        self.make_bridge(self.r, self.s, self.new_bridge, ""),
                        self.receive_bridge(self.r, self.s, self.new_bridge, issued="now")):
            await self.check_refused(BadRequest, self.z, payload)


class SameExitTests(BridgeTestCase):
    """§7: "Both exits may be the same node." R = X, Y, Z and S = Y, X, Z."""

    sharer_exit = "z"

    @inline
    async def test_chunks_cross_a_bridge_inside_one_node(self):
        self.assertEqual(self.z.table.bridge_count, 2)
        await self.sharer.send(self.s, dumps(self.chunk()))
        await self.sharer.send(self.s, dumps(self.end()))
        self.assertEqual(self.requester.backward(self.r), [self.chunk(), self.end()])
        self.assertEqual(self.z.table.bridge_count, 0)
        self.assertEqual(len(self.net.tracker.received), 2)  # the two ls only

    @inline
    async def test_drop_bridge_drops_both_ends(self):
        drop = {"type": "drop_bridge", "issued": self.net.clock.seconds(), "bridge_CID": self.bridge_cid}
        await self.net.control(self.z, drop)
        self.assertEqual(self.z.table.bridge_count, 0)
