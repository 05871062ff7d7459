"""The peer's circuit (peer/circuit.py) and its keeper (peer/keeper.py) in the in-memory network
of tests/support/peer_network.py: real nodes and a real tracker, one clock, no socket.

Carol (127.0.0.103) is no ``Peer``: her circuits are built by hand, one hop at
a time, or by a ``CircuitKeeper`` alone, so each step and each move of the
keeper's lifecycle is seen on its own.
"""

from __future__ import annotations

import os
import random

from twisted.internet import defer
from twisted.trial import unittest

from onion_twisted.net.directory_client import DirectoryClient
from onion_twisted.peer.circuit import Circuit
from onion_twisted.peer.keeper import (BUILDING, CONNECTED, WAITING, CircuitKeeper, CircuitState, QUICK_RETRIES,
                                       IllegalCircuitTransition)
from onion_twisted.protocol import cells, crypto
from onion_twisted.protocol.directory import NodeEntry
from onion_twisted.protocol.errors import Conflict, NextHopFailed, UnknownCircuit
from tests.support.deferreds import inline
from tests.support.in_memory import MemberOutbound

from tests.support.peer_network import NODE_ADDRESSES, NODE_IPS, NODE_KEYS, PORT, TRACKER, TRACKER_KEY_B64, Network

CAROL_IP = "127.0.0.103"
LS = {"type": "ls", "files": []}


def entries(indices=(0, 1, 2)) -> list[NodeEntry]:
    """Directory entries of the network's nodes, in the order given."""
    result = []
    for i in indices:
        public = NODE_KEYS[i].public_key()
        result.append(NodeEntry(NODE_ADDRESSES[i], crypto.public_key_pem(public), crypto.fingerprint(public)))
    return result


class CarolCase(unittest.TestCase):
    def setUp(self):
        self.net = Network(self.mktemp())
        self.outbound = MemberOutbound(self.net, CAROL_IP)

    def tearDown(self):
        self.net.pump()
        self.assertEqual(self.net.crashes, [], "a member crashed (answered 500)")

    def held_at(self, index: int, circuit: Circuit) -> bool:
        """Whether node ``index`` holds ``circuit`` (as the entry knows it by its CID)."""
        return circuit.cid in self.net.nodes[NODE_IPS[index]].table.by_in

    def posts_from_carol(self) -> list:
        return [p for p in self.net.posts if p.sender == CAROL_IP]


# --- the circuit ------------------------------------------------------------------------------------


class CircuitBuildTests(CarolCase):
    @inline
    async def test_it_is_built_one_hop_at_a_time_then_connected(self):
        net = self.net
        circuit = Circuit(self.outbound, entries(), TRACKER)
        self.assertEqual((circuit.built, circuit.connected), (0, False))
        await net.run(circuit.create())
        self.assertEqual(circuit.built, 1)
        self.assertTrue(self.held_at(0, circuit))
        await net.run(circuit.extend())
        self.assertEqual(circuit.built, 2)
        await net.run(circuit.extend())
        self.assertEqual((circuit.built, circuit.connected), (3, False))
        # Every cell went to the entry node: the others are reached only through it.
        self.assertEqual({p.address for p in self.posts_from_carol()}, {NODE_ADDRESSES[0]})
        reply = await net.run(circuit.connect(LS))
        self.assertEqual(reply["type"], "files")
        self.assertTrue(circuit.connected)
        self.assertEqual(len(net.tracker.catalogue.circuits), 1)
        self.assertEqual((await net.run(circuit.send({"type": "list"})))["type"], "files")

    @inline
    async def test_steps_out_of_order_are_refused_and_change_nothing(self):
        net = self.net
        circuit = Circuit(self.outbound, entries(), TRACKER)
        for step in (circuit.extend, lambda: circuit.connect(LS), lambda: circuit.send({"type": "list"})):
            with self.assertRaises(Conflict):
                await net.run(step())
        await net.run(circuit.create())
        with self.assertRaises(Conflict):
            await net.run(circuit.create())
        with self.assertRaises(Conflict):
            await net.run(circuit.connect(LS))   # two hops not built yet
        self.assertEqual(circuit.built, 1)
        await net.run(circuit.extend())
        await net.run(circuit.extend())
        with self.assertRaises(Conflict):
            await net.run(circuit.extend())      # every hop is built
        await net.run(circuit.connect(LS))
        with self.assertRaises(Conflict):
            await net.run(circuit.connect(LS))
        self.assertEqual((circuit.built, circuit.connected), (3, True))

    @inline
    async def test_a_second_step_while_one_is_under_way_is_refused(self):
        net = self.net
        circuit = Circuit(self.outbound, entries(), TRACKER)
        started = defer.ensureDeferred(circuit.create())  # sent; its answer is not delivered yet
        with self.assertRaises(Conflict) as caught:
            await defer.ensureDeferred(circuit.create())
        self.assertIn("another building step", caught.exception.detail)
        await net.run(started)
        self.assertEqual(circuit.built, 1)

    @inline
    async def test_a_failed_extend_leaves_the_hops_built_and_the_entry_closes_the_circuit(self):
        net = self.net
        circuit = Circuit(self.outbound, entries(), TRACKER)
        await net.run(circuit.create())
        net.down.add(NODE_IPS[1])
        with self.assertRaises(NextHopFailed):
            await net.run(circuit.extend())
        self.assertEqual((circuit.built, circuit.connected), (1, False))
        # The entry closed its part (an extend is not tried twice on one circuit):
        # the peer's circuit is of no more use, even with the next hop back.
        self.assertFalse(self.held_at(0, circuit))
        net.down.clear()
        with self.assertRaises(NextHopFailed):
            await net.run(circuit.extend())
        self.assertEqual(circuit.built, 1)

    def test_hops_are_distinct_nodes_and_the_cid_canonical(self):
        self.assertRaises(ValueError, Circuit, self.outbound, [], TRACKER)
        self.assertRaises(ValueError, Circuit, self.outbound, entries((0, 1, 0)), TRACKER)
        self.assertRaises(ValueError, Circuit, self.outbound, entries(), TRACKER, cid="not-a-uuid")
        circuit = Circuit(self.outbound, entries(), TRACKER)
        self.assertNotIn(circuit.cid, repr(circuit))
        self.assertNotIn(NODE_IPS[0], repr(circuit))


class CircuitDestroyTests(CarolCase):
    async def built(self) -> Circuit:
        circuit = Circuit(self.outbound, entries(), TRACKER)
        await self.net.run(circuit.build(LS))
        return circuit

    @inline
    async def test_destroy_goes_to_the_entry_and_the_circuit_is_unusable_after(self):
        net = self.net
        circuit = await self.built()
        before = len(self.posts_from_carol())
        await net.run(circuit.destroy())
        [post] = self.posts_from_carol()[before:]
        self.assertEqual(post.address, NODE_ADDRESSES[0])
        self.assertTrue(cells.parse_cell(post.body).destroy)
        self.assertEqual((circuit.destroyed, circuit.connected, circuit.built), (True, False, 0))
        net.pump()
        self.assertFalse(any(self.held_at(i, circuit) for i in range(len(NODE_IPS))))
        with self.assertRaises(Conflict):
            await net.run(circuit.send({"type": "list"}))
        await net.run(circuit.destroy())          # a second destroy sends nothing
        self.assertEqual(len(self.posts_from_carol()), before + 1)

    @inline
    async def test_a_circuit_destroyed_while_a_message_is_under_way_refuses_its_reply(self):
        net = self.net
        circuit = await self.built()
        sending = defer.ensureDeferred(circuit.send({"type": "list"}))
        await net.run(circuit.destroy())
        with self.assertRaises(Conflict):
            await net.run(sending)


# --- the keeper ---------------------------------------------------------------------------------------


class KeeperCase(CarolCase):
    def setUp(self):
        super().setUp()
        self.connected: list[tuple[dict, object]] = []
        self.broken: list[str] = []
        directory = DirectoryClient(self.net.clock, self.outbound, TRACKER, tracker_key=TRACKER_KEY_B64,
                                    default_port=PORT)
        self.keeper = CircuitKeeper(clock=self.net.clock, outbound=self.outbound, directory=directory,
                                    tracker=TRACKER, data_dir=self.mktemp(), rng=random.Random(3),
                                    first_message=lambda: dict(LS),
                                    on_connected=lambda message, reply: self.connected.append((message, reply)),
                                    on_broken=lambda circuit, why: self.broken.append(why))
        os.makedirs(self.keeper.data_dir)

    def tearDown(self):
        self.net.run(self.keeper.stop())
        super().tearDown()

    async def connect(self):
        circuit = await self.net.run(self.keeper.ready())
        self.assertIs(self.keeper.state, CONNECTED)
        return circuit


class KeeperLifecycleTests(KeeperCase):
    @inline
    async def test_waiting_then_building_then_connected(self):
        keeper = self.keeper
        self.assertEqual((keeper.state, keeper.detail, keeper.circuit), (WAITING, "starting", None))
        self.assertEqual(keeper.status(self.net.clock.seconds())["state"], "waiting")
        ready = keeper.ready()
        self.assertIs(keeper.state, BUILDING)
        circuit = await self.net.run(ready)
        self.assertIs(circuit, keeper.circuit)
        self.assertEqual((circuit.built, circuit.connected), (3, True))
        self.assertEqual((keeper.state, keeper.detail), (CONNECTED, "connected"))
        status = keeper.status(self.net.clock.seconds())
        self.assertEqual((status["state"], status["age"], len(status["nodes"])), ("connected", 0, 3))
        [(message, reply)] = self.connected
        self.assertEqual((message, reply["type"]), (LS, "files"))
        self.assertIs(await self.net.run(keeper.ready()), circuit)  # no second build
        self.assertEqual(len(self.connected), 1)

    @inline
    async def test_callers_during_a_build_share_it(self):
        keeper = self.keeper
        waiters = [keeper.ready() for _ in range(3)]
        self.assertEqual(len({id(w) for w in waiters}), 3)  # each caller its own Deferred
        circuits = [await self.net.run(w) for w in waiters]
        self.assertTrue(all(c is circuits[0] for c in circuits))
        self.assertEqual(len(self.connected), 1)
        creates = [p for p in self.posts_from_carol() if p.address in NODE_ADDRESSES and p.status == 200]
        self.assertEqual(len({cells.parse_cell(p.body).cid for p in creates}), 1)

    @inline
    async def test_failed_builds_are_retried_at_once_then_after_a_wait(self):
        net, keeper = self.net, self.keeper
        net.down.update(NODE_IPS)
        started = net.clock.seconds()
        ready = keeper.ready()
        net.pump(until=lambda: keeper.state is WAITING and "retrying in 1 s" in keeper.detail)
        self.assertIn("circuit failed", keeper.detail)
        # The first failures were retried at once (the pump moves its clock half a second at a
        # time when nothing else is due; waits of 1 and 2 s would make 3), each through an entry
        # not tried before.
        self.assertLessEqual(net.clock.seconds() - started, 1.0)
        entries = [p.address for p in self.posts_from_carol() if p.address in NODE_ADDRESSES]
        self.assertEqual(len(entries), QUICK_RETRIES + 1)
        self.assertEqual(len(set(entries)), len(entries), entries)
        self.assertIsNone(keeper.circuit)
        net.down.clear()
        circuit = await net.run(ready)
        self.assertIs(keeper.state, CONNECTED)
        self.assertTrue(circuit.connected)
        self.assertEqual(len(self.connected), 1)

    @inline
    async def test_a_broken_circuit_is_destroyed_told_and_replaced(self):
        net, keeper = self.net, self.keeper
        old = await self.connect()
        keeper.broken(old, "test: it went away")
        self.assertIsNone(keeper.circuit)
        self.assertIs(keeper.state, BUILDING)  # waiting for a moment: the next build starts at once
        self.assertEqual(keeper.detail, "circuit broken (test: it went away); rebuilding")
        self.assertEqual(self.broken, ["test: it went away"])
        self.assertTrue(old.destroyed)
        net.pump(until=lambda: keeper.state is CONNECTED)
        self.assertIsNot(keeper.circuit, old)
        self.assertEqual(len(self.connected), 2)  # the new circuit carried its own ls
        keeper.broken(old, "late news of the old one")  # not the keeper's circuit: nothing happens
        self.assertIs(keeper.state, CONNECTED)
        self.assertEqual(len(self.broken), 1)

    @inline
    async def test_a_failed_message_breaks_the_circuit(self):
        net, keeper = self.net, self.keeper
        old = await self.connect()
        net.down.add(old.entry.ip)
        with self.assertRaises(NextHopFailed):
            await net.run(keeper.send({"type": "list"}))
        self.assertIsNot(keeper.circuit, old)
        self.assertEqual(len(self.broken), 1)
        self.assertIn(keeper.state, (WAITING, BUILDING))

    @inline
    async def test_illegal_moves_are_refused(self):
        keeper = self.keeper
        circuit = await self.connect()
        self.assertRaises(IllegalCircuitTransition, keeper.adopt, Circuit(self.outbound, entries(), TRACKER))
        self.assertIs(keeper.circuit, circuit)
        self.assertIs(keeper.state, CONNECTED)
        self.assertEqual(set(CircuitState), {WAITING, BUILDING, CONNECTED})
        self.assertEqual([s.value for s in CircuitState], ["waiting", "building", "connected"])

    @inline
    async def test_a_stopped_keeper_destroys_its_circuit_and_builds_no_more(self):
        net, keeper = self.net, self.keeper
        circuit = await self.connect()
        await net.run(keeper.stop())
        self.assertTrue(keeper.stopped)
        self.assertIsNone(keeper.circuit)
        self.assertTrue(circuit.destroyed)
        with self.assertRaises(UnknownCircuit):
            await net.run(keeper.ready())
        self.assertEqual(len(self.connected), 1)
