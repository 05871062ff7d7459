"""Relay policy in the in-memory network (tests/support/relay_network.py): replay, neighbours, extend
policy.
"""

from __future__ import annotations

from twisted.internet import defer

from onion_twisted.protocol import cells, crypto, wire
from onion_twisted.protocol.errors import BadRequest, Conflict, Forbidden, NextHopFailed, ProtocolError
from tests.support.deferreds import inline
from tests.support.relay_network import PORT, RelayTestCase, STRANGER_IP, TRACKER, TRACKER_IP, dumps


# --- replay, neighbours, extend policy --------------------------------------------------


class ReplayTests(RelayTestCase):
    @inline
    async def test_replayed_forward_cell_is_409_and_not_relayed(self):
        circuit = await self.peer.build([self.x, self.y, self.z])
        body = self.peer.cell(circuit, dumps({"type": "list"}))
        await self.x.handle(self.peer.ip, body)
        count = len(self.net.tracker.received)
        e = await self.refused(Conflict, self.x.handle(self.peer.ip, body))
        self.assertEqual(e.status, 409)
        self.assertEqual(len(self.net.tracker.received), count)

    @inline
    async def test_replay_between_nodes_is_409_and_not_relayed(self):
        circuit = await self.peer.build([self.x, self.y, self.z])
        start = len(self.net.log)
        await self.peer.request(circuit, {"type": "list"})
        # the cell X sent to Y, replayed by an observer who can use X's address
        (sender, address, body), = [entry for entry in self.net.log[start:] if entry[1] == self.y.own_address]
        count = len(self.net.tracker.received)
        await self.refused(Conflict, self.y.handle(sender, body))
        self.assertEqual(len(self.net.tracker.received), count)

    @inline
    async def test_replayed_create_is_not_a_second_circuit(self):
        key = crypto.new_session_key()
        body = cells.encode_cell(wire.new_circuit_id(), crypto.seal_session_key(self.x.private_key.public_key(), key))
        await self.x.handle(self.peer.ip, body)
        # the same CREATE again is a forward cell on that circuit: not a layer of its key
        await self.refused(BadRequest, self.x.handle(self.peer.ip, body))
        self.assertEqual(len(self.x.table), 1)


class NeighbourTests(RelayTestCase):
    @inline
    async def test_stranger_ip_on_in_cid_is_403(self):
        circuit = await self.peer.build([self.x, self.y, self.z])
        count = len(self.net.tracker.received)
        e = await self.refused(Forbidden, self.x.handle(STRANGER_IP, self.peer.cell(circuit, dumps({"type": "list"}))))
        self.assertEqual(e.status, 403)
        self.assertEqual(len(self.net.tracker.received), count)

    @inline
    async def test_stranger_ip_on_out_cid_is_403(self):
        circuit = await self.peer.build([self.x, self.y, self.z])
        body = cells.encode_cell(circuit.tracker_cid, {"type": "request", "file": "a"})
        await self.refused(Forbidden, self.z.handle(STRANGER_IP, body))
        self.assertEqual(self.peer.received, [])

    @inline
    async def test_wrong_hop_on_middle_cids_is_403(self):
        circuit = await self.peer.build([self.x, self.y, self.z])
        at_x = self.circuit_at(self.x, circuit.cid)
        # Y's InCID is X's OutCID: only X may send on it forward, only Z backward on Y's OutCID
        await self.refused(Forbidden, self.y.handle(self.z.own_address.host, cells.encode_cell(at_x.out_cid, b"x" * 40)))
        at_y = self.circuit_at(self.y, at_x.out_cid)
        await self.refused(Forbidden, self.y.handle(self.x.own_address.host, cells.encode_cell(at_y.out_cid, b"x" * 40)))
        self.assertEqual(self.peer.received, [])

    @inline
    async def test_stranger_destroy_is_403_and_circuit_kept(self):
        circuit = await self.peer.build([self.x, self.y, self.z])
        before = self.net.state()
        await self.refused(Forbidden, self.x.handle(STRANGER_IP, cells.encode_destroy(circuit.cid)))
        await self.refused(Forbidden, self.z.handle(STRANGER_IP, cells.encode_destroy(circuit.tracker_cid)))
        self.assertEqual(self.net.state(), before)
        self.assertEqual(self.net.tracker.destroyed, [])


class ExtendPolicyTests(RelayTestCase):
    @inline
    async def test_extend_to_non_directory_address_is_403_and_closes_the_circuit(self):
        before = self.net.state()
        circuit = await self.peer.create(self.x)
        stranger = wire.Address(STRANGER_IP, PORT)
        message = dumps({"to": str(stranger), "relay": wire.b64encode(b"\x00" * 128)})
        e = await self.refused(Forbidden, self.peer.send(circuit, message))
        self.assertEqual(e.status, 403)
        self.assertEqual(self.net.stranger.received, [])
        self.assertClosedAfterFailedExtend(circuit, before)
        # The circuit is gone: a second try on it is no extend, and opens nothing.
        await self.refused(ProtocolError, self.peer.extend(circuit, self.y))
        self.assertEqual(self.net.state(), before)

    @inline
    async def test_extend_to_directory_node_on_other_port_is_403(self):
        circuit = await self.peer.create(self.x)
        message = dumps({"to": f"{self.y.own_address.host}:5001", "relay": wire.b64encode(b"\x00" * 128)})
        await self.refused(Forbidden, self.peer.send(circuit, message))
        self.assertEqual(self.x.table.by_out, {})

    @inline
    async def test_extend_to_itself_is_403(self):
        before = self.net.state()
        circuit = await self.peer.create(self.x)
        await self.refused(Forbidden, self.peer.send(circuit, self.peer.extend_message(self.x, crypto.new_session_key())))
        self.assertClosedAfterFailedExtend(circuit, before)

    @inline
    async def test_extend_to_tracker_with_a_create_is_403(self):
        # R a string means "a node": the tracker is not one
        circuit = await self.peer.create(self.x)
        message = dumps({"to": str(TRACKER), "relay": wire.b64encode(b"\x00" * 128)})
        await self.refused(Forbidden, self.peer.send(circuit, message))
        self.assertEqual(self.net.tracker.received, [])

    @inline
    async def test_exit_to_non_tracker_is_403(self):
        for to in (self.y.own_address, wire.Address(STRANGER_IP, PORT), wire.Address(TRACKER_IP, 5001)):
            circuit = await self.peer.create(self.x)
            message = dumps({"to": str(to), "relay": {"type": "ls", "files": []}})
            e = await self.refused(Forbidden, self.peer.send(circuit, message))
            self.assertIn("exit policy", e.detail)
        self.assertEqual(self.x.table.by_out, {})
        self.assertEqual((len(self.x.table), self.net.stranger.received, len(self.y.table)), (0, [], 0))

    @inline
    async def test_exit_policy_at_third_hop_is_502_to_the_peer(self):
        before = self.net.state()
        circuit = await self.peer.build([self.x, self.y, self.z], connect=False)
        message = dumps({"to": str(self.w.own_address), "relay": {"type": "ls", "files": []}})
        await self.refused(NextHopFailed, self.peer.send(circuit, message))
        self.assertEqual(self.net.refusals[0], (self.z.own_address, 403))
        self.assertEqual(self.z.metrics.errors[403], 1)
        # Z closed its part and told Y, which told X, which told the peer.
        self.assertClosedAfterFailedExtend(circuit, before)
        self.assertEqual(self.w.table.by_in, {})

    @inline
    async def test_extend_while_one_is_in_progress_is_409(self):
        circuit = await self.peer.create(self.x)
        self.net.holding.add(self.y.own_address)
        first = defer.ensureDeferred(self.peer.extend(circuit, self.y))
        self.assertNoResult(first)
        self.assertTrue(self.circuit_at(self.x, circuit.cid).extending)
        e = await self.refused(Conflict, self.peer.send(circuit, self.peer.extend_message(self.z, crypto.new_session_key())))
        self.assertEqual(e.status, 409)
        # a plain message cannot overtake the extend either
        await self.refused(Conflict, self.peer.send(circuit, dumps({"type": "list"})))
        self.net.release()
        await first
        self.assertEqual(circuit.hops, [self.x, self.y])
        self.assertEqual(list(self.x.table.by_out.values()), [self.circuit_at(self.x, circuit.cid)])
        self.assertEqual([len(n.table) for n in self.net.nodes], [1, 1, 0, 0, 0])

    @inline
    async def test_second_extend_after_extend_goes_further(self):
        circuit = await self.peer.build([self.x, self.y], connect=False)
        await self.peer.extend(circuit, self.z)
        self.assertEqual([len(n.table) for n in self.net.nodes], [1, 1, 1, 0, 0])
        self.assertEqual(len(self.x.table.by_out), 1)

    @inline
    async def test_destroy_during_extend_leaves_nothing(self):
        circuit = await self.peer.create(self.x)
        self.net.holding.add(self.y.own_address)
        first = defer.ensureDeferred(self.peer.extend(circuit, self.y))
        await self.peer.destroy(circuit)
        self.net.release()
        await self.refused(Conflict, first)
        self.assertEqual((len(self.x.table), self.x.table.by_out), (0, {}))
        self.assertEqual(len(self.y.table), 0)  # the destroy was passed on to the new hop

    @inline
    async def test_destroy_during_connect_reaches_the_tracker(self):
        circuit = await self.peer.build([self.x, self.y], connect=False)
        self.net.holding.add(TRACKER)
        first = defer.ensureDeferred(self.peer.connect(circuit))
        await self.peer.destroy(circuit)
        self.net.release()
        await self.refused(NextHopFailed, first)  # Y answered 409 to X
        self.assertEqual(self.net.circuit_count(), 0)
        (exit_ip, cid, _), = self.net.tracker.received
        self.assertEqual(self.net.tracker.destroyed, [(exit_ip, cid)])
