"""A peer's circuits by purpose, and their rotation (issue 16), in memory.

The in-memory network (four real nodes, the real tracker, real peers) with
``max_circuits = 3``: one announcing circuit, download circuits beside it.

* A download goes over a download circuit, never over the announcing one;
  that circuit announced nothing (an empty ``ls``), and its entry and exit
  are not the announcing circuit's.
* With a short ``circuit_lifetime``, every circuit is replaced during a long
  transfer and the transfer completes in its first attempt: the old
  circuits drain (the upload and the transfer on them run to their end),
  then are destroyed at the nodes; the tracker lists the sharer's file
  under its current circuit only.
* A replacement that cannot be built leaves the old circuit serving, and is
  tried again later.
* An unused download circuit is closed, and built again when a download
  needs one.
* While a download runs, a spare download circuit is kept (however long
  the download takes), and a download whose circuit loses a node goes on
  over it without waiting for its own circuit's rebuild.

Time is the network's ``task.Clock``; the peers' ``tick`` runs on it as the
service's timer would.
"""

from __future__ import annotations

import os

from twisted.internet import defer, task
from twisted.trial import unittest

from types import SimpleNamespace

from onion_twisted.peer.circuit_pool import _ends_apart_from
from onion_twisted.peer.download_state import DONE
from onion_twisted.peer.keeper import CONNECTED, IDLE_CLOSE, RETRY_ROTATION, WAITING
from onion_twisted.protocol.directory import pick_path
from tests.support.deferreds import inline
from tests.support.peer_network import ALICE_IP, BOB_IP, NODE_IPS, Network

LIFETIME = 20.0


def ends(circuit) -> set:
    return {circuit.hops[0].address.host, circuit.hops[-1].address.host}


class PoolCase(unittest.TestCase):
    options = dict(max_circuits=3, circuit_lifetime=0)

    def setUp(self):
        self.net = Network(self.mktemp(), peer_options=self.options)
        self.ticks = []

    def tearDown(self):
        for loop in self.ticks:
            loop.stop()
        self.net.run(self.net.stop())
        self.assertEqual(self.net.crashes, [], "a member crashed (answered 500)")

    async def start(self, name: str, data: bytes, ticks: bool = True):
        net = self.net
        net.write_share(BOB_IP, name, data)
        await net.start()
        for peer in net.peers.values() if ticks else ():
            loop = task.LoopingCall(peer.tick)
            loop.clock = net.clock
            loop.start(5.0, now=False)
            self.ticks.append(loop)
        alice = net.alice
        alice.announcer.take_catalogue(await net.run(alice.send({"type": "list"})))
        self.assertTrue(any(r.get("name") == name for r in alice.catalogue))

    def tracker_key(self, circuit):
        """(exit IP, CID) under which the tracker knows ``circuit``, followed through the nodes."""
        return self.net.tracker_key_of_circuit(circuit)

    def held_anywhere(self, circuit) -> bool:
        return any(circuit.cid in self.net.nodes[ip].table.by_in for ip in NODE_IPS)

    def listing_circuits(self, name: str) -> set:
        """The circuits (as the tracker knows them) whose ls lists ``name``."""
        return {key for key, c in self.net.tracker.catalogue.circuits.items() if any(f.name == name for f in c.files)}


class DownloadCircuitTests(PoolCase):
    @inline
    async def test_a_download_goes_over_its_own_circuit_apart_from_the_announcing_one(self):
        data = os.urandom(40 * 16384 + 5)
        await self.start("apart.bin", data)
        alice = self.net.alice
        announcing = alice.keeper.circuit
        d = alice.download("apart.bin")
        self.net.pump(until=lambda: d.state is DONE or d.error is not None)
        self.assertEqual(d.state, DONE, d.error)
        with open(os.path.join(self.net.downloads_dir(ALICE_IP), "apart.bin"), "rb") as f:
            self.assertTrue(f.read() == data)

        download = [k.circuit for k in alice.circuits.for_downloads if k.circuit is not None]
        used = [c for c in download if self.net.messages_on(self.tracker_key(c), "request")]
        self.assertEqual(len(used), 1)  # one download: one circuit carried it (the other is the spare)
        self.assertEqual(self.net.messages_on(self.tracker_key(announcing), "request"), [])
        for circuit in download:
            key = self.tracker_key(circuit)
            self.assertEqual([m["files"] for m in self.net.messages_on(key, "ls")], [[]])  # announced nothing
            self.assertEqual(ends(announcing) & ends(circuit), set())

    @inline
    async def test_circuits_built_at_once_keep_their_ends_apart(self):
        # Two keepers building in the same turns (rotations due together): each pick must see the
        # path the other picked, not only its connected circuits (there are none here).
        await self.start("at-once.bin", os.urandom(16384), ticks=False)
        pool = self.net.alice.circuits
        announcing, download = pool.announcing, pool.for_downloads[0]
        for round_ in range(6):  # paths are drawn at random: apart by chance one time in six
            for keeper in (announcing, download):
                if keeper.circuit is not None:
                    keeper._close_idle(keeper.circuit, "closed by the test")
            built = [keeper.ready() for keeper in (announcing, download)]
            self.net.pump(until=lambda: all(b.called for b in built))
            first, second = (self.successResultOf(b) for b in built)
            self.assertEqual(ends(first) & ends(second), set(), f"round {round_}")
            self.assertEqual((announcing.building, download.building), ([], []))

    def test_the_ends_are_drawn_apart_when_the_directory_allows(self):
        import random
        nodes = list(self.net.alice.directory.current.nodes.values()) if self.net.alice.directory.current else []
        if not nodes:
            self.net.run(self.net.alice.keeper._fresh_directory())
            nodes = list(self.net.alice.directory.current.nodes.values())
        avoid = {NODE_IPS[0], NODE_IPS[1]}
        for seed in range(50):
            path = pick_path(nodes, 3, random.Random(seed), avoid)
            self.assertEqual({path[0].address.host, path[-1].address.host} & avoid, set())
            self.assertEqual(len({e.address.host for e in path}), 3)
        # Too few nodes for both ends apart: a circuit all the same.
        path = pick_path(nodes, 3, random.Random(1), set(NODE_IPS[:3]))
        self.assertEqual(len({e.address.host for e in path}), 3)

    @inline
    async def test_an_unused_download_circuit_is_closed_and_built_again_when_needed(self):
        await self.start("twice.bin", os.urandom(8 * 16384))
        alice = self.net.alice
        d = alice.download("twice.bin")
        self.net.pump(until=lambda: d.state is DONE)
        keeper = next(k for k in alice.circuits.for_downloads if k.circuit is not None)
        used = keeper.circuit
        self.net.pump(until=lambda: keeper.circuit is None, max_steps=int(4 * IDLE_CLOSE))
        self.assertIs(keeper.state, WAITING)
        self.net.pump(until=lambda: not self.held_anywhere(used))  # destroyed at the nodes
        alice.dismiss("twice.bin")
        os.remove(os.path.join(self.net.downloads_dir(ALICE_IP), "twice.bin"))
        d = alice.download("twice.bin")
        self.net.pump(until=lambda: d.state is DONE or d.error is not None)
        self.assertEqual(d.state, DONE, d.error)
        self.assertTrue(any(k.circuit is not None and k.circuit is not used for k in alice.circuits.for_downloads))


def _path(*hosts):
    return [SimpleNamespace(address=SimpleNamespace(host=h)) for h in hosts]


class _Circuit:  # hashable, as a keeper's draining circuits are its dict's keys
    def __init__(self, *hosts):
        self.hops = _path(*hosts)


class EndsApartFromTests(unittest.SynchronousTestCase):
    def test_every_circuit_first_then_the_connected_and_new_ones_only(self):
        keeper = SimpleNamespace(circuit=_Circuit("a", "m", "b"), building=[_path("c", "m", "d")],
                                 draining={_Circuit("e", "m", "f"): 0.0})
        idle = SimpleNamespace(circuit=None, building=[], draining={})
        self.assertEqual(_ends_apart_from([keeper, idle]), [set("abcdef"), set("abcd")])
        self.assertEqual(_ends_apart_from([idle]), [set(), set()])


class RotationTests(PoolCase):
    options = dict(max_circuits=3, circuit_lifetime=LIFETIME, max_upload_rate=16384)

    @inline
    async def test_circuits_are_replaced_during_a_long_transfer_and_it_completes(self):
        net = self.net
        data = os.urandom(64 * 16384)  # four seconds a chunk at most: a minute at 16 KiB/s
        await self.start("long.bin", data)
        alice, bob = net.alice, net.bob
        before = {p: list(p.circuits.keepers[0].circuits()) for p in (alice, bob)}
        d = alice.download("long.bin")
        shared_ends, listed_twice, drained = [], [], set()

        def watch():
            # While bob's replaced circuit drains (its upload runs on), the tracker no longer
            # lists his file under it (a moment after the rotation: its empty ls on the way).
            for old, since in bob.keeper.draining.items():
                drained.add(old)
                if net.clock.seconds() - since > 2 and self.tracker_key(old) in self.listing_circuits("long.bin"):
                    listed_twice.append(net.clock.seconds())
            # At every step: the announcing circuit and the download circuits keep their ends apart.
            for k in alice.circuits.for_downloads:
                for c in k.circuits():
                    for a in alice.keeper.circuits():
                        if ends(a) & ends(c):
                            shared_ends.append((ends(a), ends(c)))
            return d.state is DONE or d.error is not None

        net.pump(until=watch, max_steps=2000)
        self.assertEqual(d.state, DONE, d.error)
        self.assertEqual(d.attempts, 1)  # no restart: the transfer ran on its old circuits to its end
        with open(os.path.join(net.downloads_dir(ALICE_IP), "long.bin"), "rb") as f:
            self.assertTrue(f.read() == data)
        self.assertGreaterEqual(bob.keeper.rotations, 2)
        self.assertGreaterEqual(alice.keeper.rotations, 2)
        self.assertGreaterEqual(max(k.rotations for k in alice.circuits.for_downloads), 1)
        self.assertEqual(shared_ends, [])
        self.assertTrue(drained)
        self.assertEqual(listed_twice, [])

        # Drained and gone: nothing runs on the replaced circuits, the nodes forgot them.
        net.pump(until=lambda: not any(k.draining for p in (alice, bob) for k in p.circuits.keepers))
        net.pump()  # the destroy cells delivered
        for peer, old in before.items():
            for circuit in old:
                self.assertIsNot(circuit, peer.keeper.circuit)
                self.assertFalse(self.held_anywhere(circuit))
        # The tracker lists bob's file once: the replaced circuit withdrew its ls.
        # The tracker lists the file under bob's current circuit and alice's (she seeds
        # what she downloaded), once each: the replaced circuits withdrew their ls.
        self.assertEqual(self.listing_circuits("long.bin"),
                         {self.tracker_key(bob.keeper.circuit), self.tracker_key(alice.keeper.circuit)})

    @inline
    async def test_a_replacement_that_fails_leaves_the_old_circuit_serving(self):
        net = self.net
        await self.start("small.bin", b"x" * 100, ticks=False)  # nothing else uses the circuit
        alice = net.alice
        old = alice.keeper.circuit
        net.down.update(NODE_IPS)  # no node answers: no replacement can be built
        net.pump(until=lambda: alice.keeper._replacing, max_steps=int(LIFETIME * 4))
        net.pump(until=lambda: not alice.keeper._replacing)
        net.down.clear()
        self.assertIs(alice.keeper.circuit, old)
        self.assertIs(alice.keeper.state, CONNECTED)
        self.assertEqual(alice.keeper.rotations, 0)
        reply = await net.run(alice.send({"type": "list"}))  # the old circuit still serves
        self.assertEqual(reply.get("type"), "files")
        self.assertIs(alice.keeper.circuit, old)
        net.pump(until=lambda: alice.keeper.rotations == 1, max_steps=int(RETRY_ROTATION * 3))
        self.assertIsNot(alice.keeper.circuit, old)


class SpareCircuitTests(PoolCase):
    options = dict(max_circuits=3, circuit_lifetime=0, max_upload_rate=4096)

    def download_keepers(self):
        pool = self.net.alice.circuits
        used = next(k for k in pool.for_downloads if k.users)
        spare = next(k for k in pool.for_downloads if k is not used)
        return used, spare

    @inline
    async def test_a_spare_download_circuit_is_kept_while_a_download_runs(self):
        net = self.net
        data = os.urandom(96 * 16384)  # 4 KiB/s: over six minutes, longer than IDLE_CLOSE
        await self.start("spare.bin", data)
        alice = net.alice
        d = alice.download("spare.bin")
        net.pump(until=lambda: all(k.state is CONNECTED for k in alice.circuits.for_downloads))
        used, spare = self.download_keepers()
        kept = spare.circuit
        self.assertEqual(net.messages_on(self.tracker_key(kept), "request"), [])
        net.pump(until=lambda: d.state is DONE or d.error is not None, max_steps=int(4 * 96 * 4))
        self.assertEqual(d.state, DONE, d.error)
        self.assertGreater(net.clock.seconds() - spare.since, IDLE_CLOSE)
        self.assertIs(spare.circuit, kept)  # not closed for going unused while the download ran
        self.assertEqual(net.messages_on(self.tracker_key(kept), "request"), [])
        # Once no download runs, unused circuits are closed as before.
        net.pump(until=lambda: all(k.circuit is None for k in alice.circuits.for_downloads),
                 max_steps=int(4 * IDLE_CLOSE))
        self.assertFalse(alice.circuits.downloading)

    @inline
    async def test_a_download_whose_circuit_loses_a_node_goes_on_over_the_spare(self):
        net = self.net
        data = os.urandom(40 * 16384)
        await self.start("failover.bin", data)
        alice = net.alice
        d = alice.download("failover.bin")
        net.pump(until=lambda: all(k.state is CONNECTED for k in alice.circuits.for_downloads)
                 and d.chunks is not None and d.chunks.have >= 4)
        used, spare = self.download_keepers()
        for _ in range(20):  # a node of the download's circuit that the spare does not go through
            victims = {h.address.host for h in used.circuit.hops} - {h.address.host for h in spare.circuit.hops}
            if victims:
                break
            spare._close_idle(spare.circuit, "closed by the test")
            net.pump(until=lambda: spare.state is CONNECTED)
        self.assertTrue(victims)
        in_hand, broken = spare.circuit, used.circuit
        used._build_one = lambda: defer.Deferred()  # its rebuild never ends (as under load, for seconds)
        net.down.add(sorted(victims)[0])
        net.pump(until=lambda: d.state is DONE or d.error is not None, max_steps=2000)
        self.assertEqual(d.state, DONE, d.error)
        self.assertEqual(d.attempts, 1)
        with open(os.path.join(net.downloads_dir(ALICE_IP), "failover.bin"), "rb") as f:
            self.assertTrue(f.read() == data)
        self.assertIsNot(used.circuit, broken)
        self.assertIsNone(used.circuit)  # still "rebuilding": the download did not wait for it
        self.assertIs(spare.circuit, in_hand)
        self.assertTrue(net.messages_on(self.tracker_key(in_hand), "request"))
        self.assertEqual((used.users, spare.users), (0, 0))  # the attempt released the one it moved to
        self.assertEqual(alice.circuits.moves, 1)
