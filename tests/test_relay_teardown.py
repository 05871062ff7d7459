"""Relay teardown in the in-memory network (tests/support/relay_network.py): destroy (§9), failing next
hops, and their lines in the node's log.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger, LogLevel, formatEvent

from onion_twisted.protocol import cells, wire
from onion_twisted.node.circuits import EXIT
from onion_twisted.protocol.errors import (BadRequest, NextHopAbandoned, NextHopFailed, NextHopTimeout,
                                          UnknownCircuit)
from tests.support.deferreds import inline
from tests.support.relay_network import (BridgeTestCase, FILES_REPLY, PORT, RelayTestCase, STRANGER_IP, TRACKER,
                                         TRACKER_IP, dumps)


# --- teardown (§9) ---------------------------------------------------------------------


class DestroyTests(RelayTestCase):
    @inline
    async def test_destroy_from_peer_reaches_every_hop_and_the_tracker(self):
        circuit = await self.peer.build([self.x, self.y, self.z])
        self.assertEqual(await self.peer.destroy(circuit), b"{}")
        self.assertEqual(self.net.circuit_count(), 0)
        self.assertTrue(all(n.table.by_out == {} for n in self.net.nodes))
        self.assertEqual(self.net.tracker.destroyed, [(self.z.own_address.host, circuit.tracker_cid)])

    @inline
    async def test_destroy_from_tracker_travels_back_to_the_peer(self):
        circuit = await self.peer.build([self.x, self.y, self.z])
        answer = await self.z.handle(TRACKER_IP, cells.encode_destroy(circuit.tracker_cid))
        self.assertEqual(answer, b"{}")
        self.assertEqual(self.net.circuit_count(), 0)
        self.assertTrue(all(n.table.by_out == {} for n in self.net.nodes))
        (source, cell), = self.peer.received
        self.assertEqual((source, cell.cid, cell.destroy), (self.x.own_address.host, circuit.cid, True))
        self.assertEqual(self.net.tracker.destroyed, [])

    @inline
    async def test_destroy_from_the_middle_goes_both_ways(self):
        circuit = await self.peer.build([self.x, self.y, self.z])
        at_y = self.circuit_at(self.y, self.circuit_at(self.x, circuit.cid).out_cid)
        self.net.clock.advance(601)  # Y expires the circuit and tells both neighbours, as the service does
        expired = self.y.table.expire()
        self.assertEqual(expired, [at_y])
        for c in expired:
            self.y.destroy_both_ways(c)
        self.assertEqual(self.net.circuit_count(), 0)
        self.assertEqual(len(self.net.tracker.destroyed), 1)
        self.assertEqual([c.cid for _, c in self.peer.received if c.destroy], [circuit.cid])

    @inline
    async def test_destroy_of_unknown_cid_is_404(self):
        await self.peer.build([self.x, self.y, self.z])
        before = self.net.state()
        e = await self.refused(UnknownCircuit, self.x.handle(self.peer.ip, cells.encode_destroy(wire.new_circuit_id())))
        self.assertEqual((e.status, e.error), (404, "unknown_circuit"))
        self.assertEqual(self.net.state(), before)

    @inline
    async def test_destroy_twice_is_404(self):
        circuit = await self.peer.build([self.x])
        await self.peer.destroy(circuit)
        await self.refused(UnknownCircuit, self.peer.destroy(circuit))

    @inline
    async def test_destroy_with_unreachable_neighbour_still_answers(self):
        circuit = await self.peer.build([self.x, self.y, self.z])
        self.net.down.add(self.y.own_address)
        self.assertEqual(await self.peer.destroy(circuit), b"{}")
        self.assertEqual(len(self.x.table), 0)
        self.assertEqual((len(self.y.table), len(self.z.table)), (1, 1))  # left to idle expiry

    @inline
    async def test_cid_is_unknown_after_destroy(self):
        circuit = await self.peer.build([self.x, self.y, self.z])
        body = self.peer.cell(circuit, dumps({"type": "list"}))
        await self.peer.destroy(circuit)
        count = len(self.net.tracker.received)
        # an unknown CID is a CREATE: this onion is not an RSA ciphertext of X's key
        await self.refused(BadRequest, self.x.handle(self.peer.ip, body))
        self.assertEqual((len(self.x.table), len(self.net.tracker.received)), (0, count))

class NextHopTests(RelayTestCase):
    @inline
    async def test_next_hop_down_is_502_and_closes_the_circuit(self):
        before = self.net.state()
        circuit = await self.peer.create(self.x)
        self.net.down.add(self.y.own_address)
        e = await self.refused(NextHopFailed, self.peer.extend(circuit, self.y))
        self.assertEqual((e.status, e.error), (502, "next_hop_failed"))
        self.assertClosedAfterFailedExtend(circuit, before)
        self.assertEqual(self.x.metrics.extends_failed_total, 1)
        self.net.down.clear()
        fresh = await self.peer.create(self.x)  # a new circuit extends as usual
        await self.peer.extend(fresh, self.y)
        self.assertEqual(len(self.x.table.by_out), 1)

    @inline
    async def test_next_hop_refusing_is_502_and_closes_the_circuit(self):
        before = self.net.state()
        circuit = await self.peer.create(self.x)
        # the CREATE for Y is sealed with Z's key: Y answers 400
        await self.refused(NextHopFailed, self.peer.extend(circuit, self.y, sealed_for=self.z))
        self.assertEqual(self.net.refusals, [(self.y.own_address, 400)])
        self.assertClosedAfterFailedExtend(circuit, before)

    @inline
    async def test_next_hop_timeout_is_504_and_closes_the_circuit(self):
        before = self.net.state()
        circuit = await self.peer.create(self.x)
        self.net.slow.add(self.y.own_address)
        e = await self.refused(NextHopTimeout, self.peer.extend(circuit, self.y))
        self.assertEqual(e.status, 504)
        self.assertClosedAfterFailedExtend(circuit, before)

    @inline
    async def test_tracker_down_at_connect_is_502_and_closes_the_circuit(self):
        before = self.net.state()
        circuit = await self.peer.build([self.x, self.y, self.z], connect=False)
        self.net.down.add(TRACKER)
        await self.refused(NextHopFailed, self.peer.connect(circuit))
        self.assertClosedAfterFailedExtend(circuit, before)
        self.net.down.clear()
        fresh = await self.peer.build([self.x, self.y, self.z], connect=False)
        self.assertEqual(await self.peer.connect(fresh), FILES_REPLY)

    @inline
    async def test_next_hop_failing_on_an_open_circuit_is_502(self):
        circuit = await self.peer.build([self.x, self.y, self.z])
        self.net.down.add(self.z.own_address)
        before = self.net.state()
        await self.refused(NextHopFailed, self.peer.request(circuit, {"type": "list"}))
        self.assertEqual(self.net.refusals, [(self.y.own_address, 502)])
        self.assertEqual(self.net.state(), before)

    @inline
    async def test_malformed_reply_from_next_hop_is_502(self):
        liar = wire.Address(STRANGER_IP, PORT)
        self.net.directory.current.nodes[liar] = None
        message = dumps({"to": str(liar), "relay": wire.b64encode(b"\x00" * 128)})
        before = self.net.state()
        for answer in (b"not json", b"[]", b'{"payload":5}', b'{"payload":"%%"}', b'{"payload":{"type":"created"}}'):
            self.net.stranger.answer = answer
            circuit = await self.peer.create(self.x)
            e = await self.refused(NextHopFailed, self.peer.send(circuit, message))
            self.assertIn("next hop", e.detail)
            self.assertEqual(self.net.state(), before)  # each failed extend closed its circuit

    @inline
    async def test_unreachable_peer_makes_backward_message_502(self):
        circuit = await self.peer.build([self.x, self.y, self.z])
        self.net.down.add(self.peer.address)
        await self.refused(NextHopFailed, self.net.from_tracker(self.z, circuit.tracker_cid, {"type": "ping"}))
        self.assertEqual(self.net.circuit_count(), 3)

# --- relay failures in the node's log (issue 12) ---------------------------------------


class RelayFailureLogTests(BridgeTestCase):
    """A hop that fails is named in the node's log, in safe form: what failed and why,
    never a circuit id nor an address (only with unsafe_logging).

    ``closing`` holds addresses whose POSTs fail as HTTPOutbound says when a
    neighbour closed the connection; other refusals are worded as HTTPOutbound
    words them (the status, never the address, unlike this module's Network).
    """

    def setUp(self):
        self.events: list[dict] = []
        self.closing: set = set()
        self.abandoning: set = set()
        built = super().setUp()
        for node in self.net.nodes:
            node.log = Logger(namespace="onion_twisted.node.relay.NodeRelay", observer=self.events.append)
        network_post = self.net.post

        def post(sender_ip, address, body, headers=None, path="/"):
            if address in self.closing:
                return defer.fail(NextHopFailed("next hop closed the connection"))
            if address in self.abandoning:  # as HTTPOutbound fails a post its caller cancelled
                return defer.fail(NextHopAbandoned("the answer was no longer awaited"))

            def reworded(failure):
                failure.trap(NextHopFailed)
                raise NextHopFailed(f"next hop answered {self.net.refusals[-1][1]}")
            return network_post(sender_ip, address, body, headers, path).addErrback(reworded)

        self.net.post = post
        return built

    def lines(self) -> list[str]:
        return [formatEvent(e) for e in self.events if e.get("log_level") == LogLevel.warn]

    def assertSafe(self, lines):
        secrets = {self.r.cid, self.s.cid, self.r.tracker_cid, self.s.tracker_cid, self.bridge_cid, "127.0.0."}
        for node in self.net.nodes:
            for circuit in node.table.by_in.values():
                secrets |= {circuit.in_cid, circuit.out_cid}
        for line in lines:
            for secret in secrets - {None}:
                self.assertNotIn(secret, line)

    @inline
    async def test_a_backward_cell_the_peer_does_not_take_is_logged_at_each_hop(self):
        self.closing.add(self.requester.address)
        reply = await self.sharer.request(self.s, self.chunk())
        self.assertEqual(reply["error"], "bridge_gone")
        lines = self.lines()
        self.assertEqual(lines, [
            "a backward cell could not be delivered to the previous hop: next hop closed the connection",  # X
            "a backward cell could not be delivered to the previous hop: next hop answered 502",           # Y
            "a backward cell could not be delivered to the previous hop: next hop answered 502",           # Z
            "a chunk could not cross the bridge: next hop answered 502",                                   # W
        ])
        self.assertSafe(lines)

    @inline
    async def test_a_chunk_the_other_exit_does_not_take_is_logged(self):
        self.closing.add(self.z.own_address)
        reply = await self.sharer.request(self.s, self.chunk())
        self.assertEqual(reply["error"], "bridge_gone")
        self.assertEqual(self.lines(), ["a chunk could not cross the bridge: next hop closed the connection"])
        self.assertSafe(self.lines())

    @inline
    async def test_forward_and_tracker_failures_are_logged(self):
        self.closing.add(TRACKER)
        await self.refused(NextHopFailed, self.sharer.request(self.s, {"type": "list"}))
        self.assertEqual(self.lines(), [
            "a message could not be delivered to the tracker: next hop closed the connection",   # W
            "a forward cell could not be delivered to the next hop: next hop answered 502",      # X
            "a forward cell could not be delivered to the next hop: next hop answered 502",      # Y
        ])
        self.assertSafe(self.lines())

    @inline
    async def test_an_answer_no_longer_awaited_is_not_logged(self):
        # Whoever the exit relayed for went away and cancelled: nothing failed on the way.
        # (Here the cancellation comes from below, so the hops before the exit hear its
        # 504 and log that; in a network it comes from above and they hear nothing.)
        self.abandoning.add(TRACKER)
        await self.refused(NextHopFailed, self.sharer.request(self.s, {"type": "list"}))
        lines = self.lines()
        self.assertEqual([line for line in lines if "tracker" in line], [])
        self.assertIn("a forward cell could not be delivered to the next hop: next hop answered 502", lines)

    @inline
    async def test_an_extend_that_fails_is_logged(self):
        circuit = await self.peer.create(self.v)
        self.closing.add(self.w.own_address)
        await self.refused(NextHopFailed, self.peer.extend(circuit, self.w))
        self.assertEqual(self.lines(),
                         ["a circuit could not be extended to the next hop: next hop closed the connection"])
        self.assertSafe(self.lines())

    @inline
    async def test_one_line_a_second_per_kind_with_the_count_of_the_others(self):
        self.closing.add(self.z.own_address)
        for i in range(5):  # each fails and drops the bridge: made again for the next
            bridge_cid = wire.new_circuit_id()
            await self.bridge(self.r, self.s, bridge_cid, f"t{i}")
            await self.sharer.request(self.s, self.chunk(transfer=f"t{i}"))
        self.assertEqual(len(self.lines()), 1)
        self.net.clock.advance(1)
        await self.bridge(self.r, self.s, wire.new_circuit_id(), "t5")
        await self.sharer.request(self.s, self.chunk(transfer="t5"))
        self.assertEqual(self.lines()[1], "a chunk could not cross the bridge: next hop closed the connection"
                                          " (4 more since the last such line)")

    @inline
    async def test_unsafe_logging_names_the_circuit(self):
        self.w.unsafe_logging = True
        self.closing.add(self.z.own_address)
        await self.sharer.request(self.s, self.chunk())
        (line,) = self.lines()
        self.assertIn("a chunk could not cross the bridge: next hop closed the connection", line)
        self.assertIn(self.circuit_at(self.w, self.w_in_cid()).in_cid, line)
        self.assertIn(str(self.z.own_address), line)

    def w_in_cid(self) -> str:
        (cid,) = [c.in_cid for c in self.w.table.by_in.values() if c.out_kind == EXIT]
        return cid
