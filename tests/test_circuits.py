"""circuits.py: the relay table of PROTOCOL.md §4, §7, §9, on a task.Clock."""

from twisted.internet import task
from twisted.trial import unittest

from onion_twisted.protocol import crypto, wire
from onion_twisted.node.circuits import EXIT, NODE, RelayTable
from onion_twisted.protocol.errors import Conflict, Forbidden, RateLimited, UnknownCircuit

PEER = "127.0.0.101"
NEXT = wire.Address("127.0.0.12", 5000)
TRACKER = wire.Address("127.0.0.1", 5000)
OTHER_EXIT = wire.Address("127.0.0.14", 5000)


def cid() -> str:
    return wire.new_circuit_id()


class CircuitTableTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1000)
        self.key = crypto.new_session_key()
        self.table = RelayTable(self.clock, idle_timeout=600)

    def new_circuit(self):
        """A circuit from PEER under a fresh CID."""
        return self.table.create(PEER, cid(), self.key)

    def test_create_and_lookup_by_in_cid(self):
        in_cid = cid()
        circuit = self.table.create(PEER, in_cid, self.key)
        self.assertIs(self.table.forward(in_cid, PEER), circuit)
        self.assertEqual((circuit.in_ip, circuit.in_cid, circuit.out_cid, circuit.last_used),
                         (PEER, in_cid, None, 1000))
        self.assertEqual(len(self.table), 1)

    def test_unknown_cids_are_none(self):
        self.assertIsNone(self.table.forward(cid(), PEER))
        self.assertIsNone(self.table.backward(cid(), PEER))

    def test_attach_and_lookup_by_out_cid(self):
        circuit = self.new_circuit()
        out_cid = cid()
        self.table.attach(circuit, NEXT, "127.0.0.12", out_cid, NODE)
        self.assertIs(self.table.backward(out_cid, "127.0.0.12"), circuit)
        self.assertEqual((circuit.out_addr, circuit.out_cid, circuit.out_kind), (NEXT, out_cid, NODE))
        # an OutCID is not an InCID and vice versa
        self.assertIsNone(self.table.forward(out_cid, "127.0.0.12"))
        self.assertIsNone(self.table.backward(circuit.in_cid, PEER))

    def test_session_key_layer(self):
        circuit = self.new_circuit()
        layer = crypto.Layer(self.key).wrap(b"m", crypto.FORWARD)
        self.assertEqual(self.table.peel_forward(circuit, layer), b"m")

    def test_forward_from_wrong_neighbour_is_forbidden(self):
        in_cid = cid()
        self.table.create(PEER, in_cid, self.key)
        e = self.assertRaises(Forbidden, self.table.forward, in_cid, "127.0.0.102")
        self.assertEqual(e.status, 403)

    def test_backward_from_wrong_neighbour_is_forbidden(self):
        circuit = self.new_circuit()
        out_cid = cid()
        self.table.attach(circuit, NEXT, "127.0.0.12", out_cid, NODE)
        e = self.assertRaises(Forbidden, self.table.backward, out_cid, PEER)
        self.assertEqual(e.status, 403)

    def test_duplicate_in_cid_is_conflict(self):
        in_cid = cid()
        self.table.create(PEER, in_cid, self.key)
        self.assertRaises(Conflict, self.table.create, PEER, in_cid, self.key)
        self.assertEqual(len(self.table), 1)

    def test_in_cid_equal_to_an_out_cid_is_conflict(self):
        circuit = self.new_circuit()
        out_cid = cid()
        self.table.attach(circuit, NEXT, "127.0.0.12", out_cid, NODE)
        self.assertRaises(Conflict, self.table.create, "127.0.0.12", out_cid, self.key)

    def test_replayed_nonce_is_conflict(self):
        circuit = self.new_circuit()
        layer = crypto.Layer(self.key).wrap(b"m", crypto.FORWARD)
        self.table.peel_forward(circuit, layer)
        e = self.assertRaises(Conflict, self.table.peel_forward, circuit, layer)
        self.assertEqual(e.status, 409)

    def test_fresh_nonces_accepted(self):
        circuit = self.new_circuit()
        layer = crypto.Layer(self.key)
        for i in range(20):
            self.assertEqual(self.table.peel_forward(circuit, layer.wrap(b"%d" % i, crypto.FORWARD)), b"%d" % i)
        self.assertEqual(len(circuit.nonces), 20)

    def test_nonces_are_per_circuit(self):
        a = self.new_circuit()
        b = self.new_circuit()  # same key, other circuit
        layer = crypto.Layer(self.key).wrap(b"m", crypto.FORWARD)
        self.table.peel_forward(a, layer)
        self.assertEqual(self.table.peel_forward(b, layer), b"m")

    def test_undecryptable_layer_records_no_nonce(self):
        circuit = self.new_circuit()
        self.assertRaises(Exception, self.table.peel_forward, circuit, b"\x00" * 40)
        self.assertFalse(circuit.nonces)

    def test_nonce_budget(self):
        table = RelayTable(self.clock, max_nonces=3)
        circuit = table.create(PEER, cid(), self.key)
        layer = crypto.Layer(self.key)
        for _ in range(3):
            table.peel_forward(circuit, layer.wrap(b"m", crypto.FORWARD))
        e = self.assertRaises(Conflict, table.peel_forward, circuit, layer.wrap(b"m", crypto.FORWARD))
        self.assertIn("nonce budget", e.detail)
        self.assertEqual(len(circuit.nonces), 3)

    def test_max_circuits_is_rate_limited(self):
        table = RelayTable(self.clock, max_circuits=2)
        table.create(PEER, cid(), self.key)
        table.create(PEER, cid(), self.key)
        e = self.assertRaises(RateLimited, table.create, PEER, cid(), self.key)
        self.assertEqual(e.status, 429)
        self.assertEqual(len(table), 2)

    def test_remove(self):
        circuit = self.new_circuit()
        out_cid = cid()
        self.table.attach(circuit, NEXT, "127.0.0.12", out_cid, NODE)
        self.assertTrue(self.table.remove(circuit))
        self.assertEqual((len(self.table), len(self.table.by_out)), (0, 0))
        self.assertIsNone(self.table.forward(circuit.in_cid, PEER))
        self.assertFalse(self.table.remove(circuit))

    def test_attach_after_remove_is_conflict_and_leaves_nothing(self):
        circuit = self.new_circuit()
        self.table.remove(circuit)
        self.assertRaises(Conflict, self.table.attach, circuit, NEXT, "127.0.0.12", cid(), NODE)
        self.assertEqual(self.table.by_out, {})

    # --- idle expiry ---------------------------------------------------------------

    def test_circuit_kept_just_under_idle_timeout(self):
        circuit = self.new_circuit()
        self.clock.advance(599.9)
        self.assertEqual(self.table.expire(), [])
        self.assertIs(self.table.forward(circuit.in_cid, PEER), circuit)

    def test_circuit_kept_at_exactly_idle_timeout(self):
        self.new_circuit()
        self.clock.advance(600)
        self.table.expire()
        self.assertEqual(len(self.table), 1)

    def test_circuit_dropped_just_over_idle_timeout(self):
        circuit = self.new_circuit()
        out_cid = cid()
        self.table.attach(circuit, NEXT, "127.0.0.12", out_cid, NODE)
        self.clock.advance(600.1)
        self.assertEqual(self.table.expire(), [circuit])
        self.assertEqual((len(self.table), self.table.by_out), (0, {}))

    def test_touch_refreshes(self):
        circuit = self.new_circuit()
        self.clock.advance(500)
        self.table.touch(circuit)
        self.clock.advance(500)
        self.table.expire()
        self.assertEqual(len(self.table), 1)
        self.clock.advance(100.1)
        self.table.expire()
        self.assertEqual(len(self.table), 0)

    def test_peel_forward_refreshes(self):
        circuit = self.new_circuit()
        self.clock.advance(500)
        self.table.peel_forward(circuit, crypto.Layer(self.key).wrap(b"m", crypto.FORWARD))
        self.clock.advance(500)
        self.table.expire()
        self.assertEqual(len(self.table), 1)

    def test_extending_circuit_not_expired(self):
        circuit = self.new_circuit()
        circuit.extending = True
        self.clock.advance(700)
        self.table.expire()
        self.assertEqual(len(self.table), 1)

    def test_expire_only_idle_ones(self):
        old = self.new_circuit()
        self.clock.advance(300)
        young = self.new_circuit()
        self.clock.advance(300.5)
        self.assertEqual(self.table.expire(), [old])
        self.assertIs(self.table.forward(young.in_cid, PEER), young)


class BridgeTableTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.table = RelayTable(self.clock, idle_timeout=600, bridge_idle_timeout=600)
        self.sharer = self._exit_circuit()
        self.requester = self._exit_circuit()

    def _exit_circuit(self, table=None):
        table = self.table if table is None else table
        circuit = table.create(PEER, cid(), crypto.new_session_key())
        table.attach(circuit, TRACKER, "127.0.0.1", cid(), EXIT)
        return circuit

    def test_make_bridge(self):
        bridge_cid = cid()
        bridge = self.table.make_bridge(self.sharer.out_cid, "T1", bridge_cid, OTHER_EXIT, "127.0.0.14")
        self.assertTrue(bridge.outgoing)
        self.assertIs(self.table.outgoing_bridge(self.sharer, "T1"), bridge)
        self.assertIsNone(self.table.outgoing_bridge(self.sharer, "T2"))
        self.assertIsNone(self.table.outgoing_bridge(self.requester, "T1"))
        self.assertIsNone(self.table.outgoing_bridge(self.sharer, ["T1"]))
        self.assertIs(self.table.bridge_by_cid(bridge_cid), bridge)
        self.assertEqual(self.table.bridge_count, 1)

    def test_receive_bridge(self):
        bridge_cid = cid()
        bridge = self.table.receive_bridge(self.requester.out_cid, bridge_cid, OTHER_EXIT, "127.0.0.14")
        self.assertFalse(bridge.outgoing)
        self.assertIs(self.table.incoming_bridge(bridge_cid, "127.0.0.14"), bridge)
        self.assertIs(bridge.circuit, self.requester)
        self.assertIsNone(self.table.incoming_bridge(cid(), "127.0.0.14"))

    def test_incoming_bridge_from_wrong_exit_is_forbidden(self):
        bridge_cid = cid()
        self.table.receive_bridge(self.requester.out_cid, bridge_cid, OTHER_EXIT, "127.0.0.14")
        self.assertRaises(Forbidden, self.table.incoming_bridge, bridge_cid, "127.0.0.13")

    def test_bridge_needs_an_exit_circuit_out_cid(self):
        middle = self.table.create(PEER, cid(), crypto.new_session_key())
        self.table.attach(middle, NEXT, "127.0.0.12", cid(), NODE)
        for out_cid in (cid(), middle.out_cid, self.sharer.in_cid):
            with self.subTest(out_cid=out_cid):
                self.assertRaises(UnknownCircuit, self.table.make_bridge, out_cid, "T", cid(), OTHER_EXIT, "127.0.0.14")
                self.assertRaises(UnknownCircuit, self.table.receive_bridge, out_cid, cid(), OTHER_EXIT, "127.0.0.14")
        self.assertEqual(self.table.bridge_count, 0)

    def test_drop_bridge(self):
        out_b = self.table.make_bridge(self.sharer.out_cid, "T", cid(), OTHER_EXIT, "127.0.0.14")
        in_b = self.table.receive_bridge(self.requester.out_cid, cid(), OTHER_EXIT, "127.0.0.14")
        self.assertTrue(self.table.remove_bridge(out_b))
        self.assertTrue(self.table.remove_bridge(in_b))
        self.assertEqual(self.table.bridge_count, 0)
        self.assertIsNone(self.table.outgoing_bridge(self.sharer, "T"))
        self.assertFalse(self.table.remove_bridge(out_b))
        self.assertFalse(self.table.remove_bridge(in_b))

    def test_bridges_removed_with_their_circuit(self):
        self.table.make_bridge(self.sharer.out_cid, "T", cid(), OTHER_EXIT, "127.0.0.14")
        self.table.receive_bridge(self.sharer.out_cid, cid(), OTHER_EXIT, "127.0.0.14")
        kept = self.table.receive_bridge(self.requester.out_cid, cid(), OTHER_EXIT, "127.0.0.14")
        self.table.remove(self.sharer)
        self.assertEqual(self.table.bridge_count, 1)
        self.assertIs(self.table.bridge_by_cid(kept.bridge_cid), kept)

    def test_bridge_idle_expiry(self):
        table = RelayTable(self.clock, idle_timeout=10_000, bridge_idle_timeout=600)
        sharer = self._exit_circuit(table)
        bridge = table.make_bridge(sharer.out_cid, "T", cid(), OTHER_EXIT, "127.0.0.14")
        self.clock.advance(599)
        table.expire()
        self.assertEqual(table.bridge_count, 1)
        bridge.last_used = self.clock.seconds()  # traffic over the bridge
        self.clock.advance(600)
        table.expire()
        self.assertEqual(table.bridge_count, 1)
        self.clock.advance(0.5)
        table.expire()
        self.assertEqual(table.bridge_count, 0)
        self.assertIsNone(table.outgoing_bridge(sharer, "T"))
        self.assertEqual(len(table), 1)  # the circuit itself is not idle yet

    def test_max_bridges(self):
        table = RelayTable(self.clock, max_bridges=2)
        circuit = self._exit_circuit(table)
        table.make_bridge(circuit.out_cid, "T1", cid(), OTHER_EXIT, "127.0.0.14")
        table.receive_bridge(circuit.out_cid, cid(), OTHER_EXIT, "127.0.0.14")
        self.assertRaises(RateLimited, table.make_bridge, circuit.out_cid, "T2", cid(), OTHER_EXIT, "127.0.0.14")
        self.assertRaises(RateLimited, table.receive_bridge, circuit.out_cid, cid(), OTHER_EXIT, "127.0.0.14")
        self.assertEqual(table.bridge_count, 2)

    def test_duplicate_bridge_cid_is_conflict(self):
        bridge_cid = cid()
        self.table.make_bridge(self.sharer.out_cid, "T1", bridge_cid, OTHER_EXIT, "127.0.0.14")
        self.assertRaises(Conflict, self.table.make_bridge, self.requester.out_cid, "T2", bridge_cid,
                          OTHER_EXIT, "127.0.0.14")
        other = cid()
        self.table.receive_bridge(self.requester.out_cid, other, OTHER_EXIT, "127.0.0.14")
        self.assertRaises(Conflict, self.table.receive_bridge, self.sharer.out_cid, other, OTHER_EXIT, "127.0.0.14")
        self.assertEqual(self.table.bridge_count, 2)

    def test_bridge_cid_equal_to_a_circuit_id_is_conflict(self):
        for taken in (self.sharer.in_cid, self.requester.out_cid):
            with self.subTest(taken=taken):
                self.assertRaises(Conflict, self.table.make_bridge, self.sharer.out_cid, "T", taken,
                                  OTHER_EXIT, "127.0.0.14")
                self.assertRaises(Conflict, self.table.receive_bridge, self.requester.out_cid, taken,
                                  OTHER_EXIT, "127.0.0.14")
        self.assertEqual(self.table.bridge_count, 0)

    def test_same_transfer_twice_on_a_circuit_is_conflict(self):
        self.table.make_bridge(self.sharer.out_cid, "T", cid(), OTHER_EXIT, "127.0.0.14")
        self.assertRaises(Conflict, self.table.make_bridge, self.sharer.out_cid, "T", cid(), OTHER_EXIT, "127.0.0.14")
        self.assertEqual(self.table.bridge_count, 1)

    def test_both_ends_on_one_node_share_the_bridge_cid(self):
        # §7 "Both exits may be the same node": the tracker sends receive_bridge
        # and make_bridge with one bridge_CID to the same node.
        bridge_cid = cid()
        me = wire.Address("127.0.0.13", 5000)
        incoming = self.table.receive_bridge(self.requester.out_cid, bridge_cid, me, "127.0.0.13")
        outgoing = self.table.make_bridge(self.sharer.out_cid, "T", bridge_cid, me, "127.0.0.13")
        self.assertEqual(self.table.bridge_count, 2)
        self.assertIs(self.table.incoming_bridge(bridge_cid, "127.0.0.13"), incoming)
        self.assertIs(self.table.outgoing_bridge(self.sharer, "T"), outgoing)
