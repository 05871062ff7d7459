"""The peer's onion-http/2 circuits (PROTOCOL.md §10 - §14) over real NodeRelays and the real Tracker in memory.

tests/support/peer_network_v2.py: nodes with onion keys, and the tracker's
sealed hop (``SealedFront``) before the real tracker. Carol (127.0.0.103)
builds circuits by hand; alice and bob are whole peers.
"""

from __future__ import annotations

import base64
import os
import random

from twisted.trial import unittest

from onion_twisted.net.directory_client import DirectoryClient
from onion_twisted.peer import hops
from onion_twisted.peer.circuit import Circuit
from onion_twisted.peer.download_state import DONE
from onion_twisted.peer.keeper import CONNECTED, CircuitKeeper
from onion_twisted.protocol import merkle, cells, crypto, onion2, wire
from onion_twisted.protocol.directory import NodeEntry
from onion_twisted.protocol.errors import BadRequest, Conflict, NextHopFailed
from tests.support.deferreds import inline
from tests.support.in_memory import MemberOutbound
from tests.support.peer_network import (ALICE_IP, BOB_IP, NODE_ADDRESSES, NODE_IPS, NODE_KEYS, PORT, TRACKER,
                                        TRACKER_IP, TRACKER_KEY_B64)
from tests.support.peer_network_v2 import TRACKER_ID, V2Network

CAROL_IP = "127.0.0.103"
LS = {"type": "ls", "files": []}


class TamperingOutbound(MemberOutbound):
    """Carol's outbound; ``tamper(reply) -> reply`` rewrites the answer to her next POST."""

    tamper = None

    def answer(self, sent):
        d = super().answer(sent)
        tamper, self.tamper = self.tamper, None
        return d.addCallback(tamper) if tamper else d


class V2Case(unittest.TestCase):
    v2_nodes = (0, 1, 2, 3)
    sealed = True

    def setUp(self):
        self.net = V2Network(self.mktemp(), v2_nodes=self.v2_nodes, sealed=self.sealed)
        self.outbound = TamperingOutbound(self.net, CAROL_IP)

    def tearDown(self):
        for peer in list(self.net.peers.values()):
            if not peer._stopped:
                self.net.run(peer.stop())
        self.net.pump()
        self.assertEqual(self.net.crashes, [], "a member crashed (answered 500)")

    def entries(self, indices=(0, 1, 2)) -> list[NodeEntry]:
        result = []
        for i in indices:
            public = NODE_KEYS[i].public_key()
            ring = self.net.onion_rings.get(NODE_IPS[i])
            result.append(NodeEntry(NODE_ADDRESSES[i], crypto.public_key_pem(public), crypto.fingerprint(public),
                                    ring.current_public if ring else None))
        return result

    def circuit(self, indices=(0, 1, 2), **options) -> Circuit:
        if self.net.front is not None:
            options.setdefault("tracker_onion_key", self.net.front.ring.current_public)
            options.setdefault("tracker_id", TRACKER_ID)
        return Circuit(self.outbound, self.entries(indices), TRACKER, **options)

    def to_tracker(self) -> list:
        """Every POST an exit made to the tracker."""
        return [p for p in self.net.posts if p.address == TRACKER and p.sender in NODE_IPS and p.path == "/"]

    def held_at(self, index: int, cid: str) -> bool:
        return cid in self.net.nodes[NODE_IPS[index]].table.by_in


class SealedCircuitTests(V2Case):
    @inline
    async def test_built_with_ntor_sealed_then_ls_and_list_inside_the_trackers_layer(self):
        net = self.net
        circuit = self.circuit()
        reply = await net.run(circuit.build(LS))
        self.assertEqual(reply["type"], "files")
        self.assertEqual(circuit.info(), {"protocol": "onion-http/2", "sealed": True})
        self.assertTrue(all(hops.is_v2(layer) for layer in circuit.layers))
        self.assertEqual((await net.run(circuit.send({"type": "list"})))["type"], "files")
        self.assertEqual([m["type"] for _, _, m in net.front.opened], ["ls", "list"])
        self.assertEqual(len(net.tracker.catalogue.circuits), 1)
        # The exit delivered the handshake and two sealed layers: base64 strings, never an object.
        payloads = [cells.parse_cell(p.body).payload for p in self.to_tracker()]
        self.assertEqual(len(payloads), 3)
        self.assertTrue(all(isinstance(p, (str, bytes)) for p in payloads))
        # Padded to one class: the ls and the list are cells of one size.
        ls, listing = [p for p in net.posts if p.sender == CAROL_IP][-2:]
        self.assertEqual(len(ls.body), len(listing.body))

    @inline
    async def test_a_replayed_tracker_reply_is_refused(self):
        net = self.net
        circuit = self.circuit()
        await net.run(circuit.build(LS))
        old = net.front.answers[-1]
        net.front.replay.append(old)  # a lying exit gives the old answer again, in fresh node layers
        with self.assertRaises(NextHopFailed) as caught:
            await net.run(circuit.send({"type": "list"}))
        self.assertIn("replay", caught.exception.detail)

    @inline
    async def test_a_backward_cell_seen_twice_is_refused(self):
        circuit = self.circuit()
        await self.net.run(circuit.build(LS))
        exit_keys = self.relay_keys(circuit)
        payload = self.backward(exit_keys, hops.padded(b'{"type":"file_chunk","transfer":"t"}',
                                                        kind=onion2.FRAME_OBJECT))
        self.assertEqual(circuit.open_backward(payload)["type"], "file_chunk")
        self.assertRaises(Conflict, circuit.open_backward, payload)

    @inline
    async def test_an_exit_cannot_speak_for_the_tracker_outside_its_layer(self):
        circuit = self.circuit()
        await self.net.run(circuit.build(LS))
        forged = hops.padded(b'{"type":"request","file":"secret.txt","transfer":"t"}', kind=onion2.FRAME_OBJECT)
        self.assertRaises(BadRequest, circuit.open_backward, self.backward(self.relay_keys(circuit), forged))

    @inline
    async def test_a_bridged_message_goes_outside_the_sealed_layer_and_its_answer_comes_back(self):
        net = self.net
        circuit = self.circuit()
        await net.run(circuit.build(LS))
        end = {"type": "transfer_end", "transfer": "no-such-transfer", "status": "ok"}
        told = len(net.tracker_messages)
        reply = await net.run(circuit.send(end, bridged=True, chunk_size=16384))
        # No bridge: the exit answers as the tracker would (an object outside the sealed
        # layer would be refused there), and the tracker hears nothing of it.
        self.assertEqual((reply["type"], reply["error"]), ("error", "no_bridge"))
        self.assertEqual(len(net.tracker_messages), told)
        self.assertEqual([m["type"] for _, _, m in net.front.opened], ["ls"])
        # Padded to the class of a 16 KiB chunk, as every chunk of the transfer.
        last = [p for p in net.posts if p.sender == CAROL_IP][-1]
        self.assertGreater(len(last.body), onion2.chunk_class(16384))

    def relay_keys(self, circuit):
        """The nodes' HopKeys of ``circuit``, entry first (followed through their tables)."""
        keys, ip, cid = [], circuit.entry.ip, circuit.cid
        for _ in circuit.hops:
            record = self.net.nodes[ip].table.by_in[cid]
            keys.append(record.layer)
            if record.out_cid is not None:
                ip, cid = record.out_addr.ip, record.out_cid
        return keys

    @staticmethod
    def backward(keys, data: bytes) -> str:
        for k in reversed(keys):
            data = k.seal_backward(data)
        return wire.b64encode(data)

    @inline
    async def test_a_layered_destroy_tears_down_every_hop_and_the_sealed_hop(self):
        net = self.net
        circuit = self.circuit()
        await net.run(circuit.build(LS))
        key = next(iter(net.front.sessions))
        await net.run(circuit.destroy())
        [post] = [p for p in net.posts if p.sender == CAROL_IP][-1:]
        obj = wire.loads_object(post.body)
        self.assertEqual((obj["destroy"], isinstance(obj.get("payload"), str)), (True, True))
        net.pump()
        self.assertFalse(any(self.held_at(i, circuit.cid) for i in range(4)))
        self.assertNotIn(key, net.front.sessions)
        self.assertEqual(len(net.tracker.catalogue.circuits), 0)

    @inline
    async def test_a_bad_auth_from_a_hop_fails_the_step_and_the_hop_is_not_used(self):
        circuit = self.circuit()

        def flip_auth(reply):
            payload = bytearray(wire.b64decode(cells.parse_reply(reply)))
            payload[-1] ^= 1  # the last byte of AUTH
            return cells.encode_reply_layer(bytes(payload))

        self.outbound.tamper = flip_auth
        with self.assertRaises(NextHopFailed) as caught:
            await self.net.run(circuit.create())
        self.assertIn("AUTH", caught.exception.detail)
        self.assertEqual((circuit.built, circuit.layers), (0, []))
        with self.assertRaises(Conflict):
            await self.net.run(circuit.extend())

    @inline
    async def test_a_hop_listed_with_an_onion_key_it_does_not_have_fails_the_extend(self):
        entries = self.entries()
        entries[1] = NodeEntry(entries[1].address, entries[1].public_key_pem, entries[1].fingerprint, os.urandom(32))
        circuit = Circuit(self.outbound, entries, TRACKER)
        await self.net.run(circuit.create())
        with self.assertRaises(NextHopFailed):
            await self.net.run(circuit.extend())
        self.assertEqual(circuit.built, 1)


class MixedPathTests(V2Case):
    v2_nodes = (0, 2, 3)  # node 1 is /1

    @inline
    async def test_a_v1_middle_among_v2_hops_carries_the_sealed_hop(self):
        net = self.net
        circuit = self.circuit((0, 1, 2))
        self.assertEqual((await net.run(circuit.build(LS)))["type"], "files")
        self.assertEqual([hops.is_v2(layer) for layer in circuit.layers], [True, False, True])
        self.assertEqual(circuit.info(), {"protocol": "onion-http/1", "sealed": True})
        self.assertEqual((await net.run(circuit.send({"type": "list"})))["type"], "files")
        # Not every hop is /2: the bare /1 destroy (a /1 node refuses a payload).
        await net.run(circuit.destroy())
        self.assertNotIn(b"payload", [p for p in net.posts if p.sender == CAROL_IP][-1].body)
        net.pump()
        self.assertFalse(any(self.held_at(i, circuit.cid) for i in range(4)))

    @inline
    async def test_a_v1_exit_gets_v1_plaintext_and_no_sealed_hop(self):
        net = self.net
        circuit = self.circuit((0, 2, 1))
        self.assertEqual((await net.run(circuit.build(LS)))["type"], "files")
        self.assertFalse(circuit.sealed)
        self.assertEqual([m["type"] for _, _, m in net.tracker_messages], ["ls"])


class UnsealedTrackerTests(V2Case):
    sealed = False  # a /1 tracker: no onion key in the directory

    @inline
    async def test_a_v2_exit_carries_objects_in_object_frames(self):
        net = self.net
        circuit = Circuit(self.outbound, self.entries(), TRACKER)
        self.assertEqual((await net.run(circuit.build(LS)))["type"], "files")
        self.assertEqual(circuit.info(), {"protocol": "onion-http/2", "sealed": False})
        self.assertEqual((await net.run(circuit.send({"type": "list"})))["type"], "files")
        self.assertEqual([m["type"] for _, _, m in net.tracker_messages], ["ls", "list"])
        await net.run(circuit.destroy())  # layered, with an OBJECT frame: the exit sends the tracker a bare one
        net.pump()
        self.assertEqual(len(net.tracker.catalogue.circuits), 0)


# --- whole peers ----------------------------------------------------------------------------------


class PeerTransferTests(V2Case):
    @inline
    async def test_two_v2_peers_transfer_a_file_and_the_tracker_link_names_no_file(self):
        net = self.net
        data = os.urandom(100 * 1024 + 7)  # a last chunk shorter than the others
        net.write_share(BOB_IP, "secret-name.bin", data)
        await net.start()
        for peer in (net.alice, net.bob):
            status = peer.status()["circuit"]
            self.assertEqual((status["state"], status["protocol"], status["sealed"]), ("connected", "onion-http/2", True))
        d = net.alice.download("secret-name.bin")
        # Until the file is whole and bob's upload is over (its transfer_end crossed the bridge too).
        net.pump(until=lambda: (d.state is DONE or d.error is not None) and not net.bob.uploads)
        self.assertEqual(d.state, DONE, d.error)
        with open(os.path.join(net.downloads_dir(ALICE_IP), "secret-name.bin"), "rb") as f:
            self.assertTrue(f.read() == data)
        # The tracker read the request inside its layer; the exits carried only base64 to it.
        self.assertIn("request", [m["type"] for _, _, m in net.front.opened])
        for post in self.to_tracker():
            self.assertNotIn(b"secret-name", post.body)
            self.assertIsInstance(cells.parse_cell(post.body).payload, (str, bytes, type(None)))
        # The tracker's request to bob went sealed to his exit.
        to_exits = [p for p in net.posts if p.sender == TRACKER_IP and p.address.ip in NODE_IPS]
        self.assertTrue(to_exits)
        self.assertTrue(all(b"secret-name" not in p.body for p in to_exits))
        # End to end (§13): the bridge between the exits carried the sharer's key, the sealed
        # leaf row and sealed chunks, naming no file and holding none of its bytes.
        status = d.status(net.clock.seconds())
        self.assertEqual((status["e2e"], status["root"]), (True, merkle.root_hex(merkle.leaf_hashes(data))))
        self.assertEqual([(s["e2e"], s["refused"], s["mismatched"]) for s in status["sources"]], [(True, 0, 0)])
        bridge = [p for p in net.posts if p.sender in NODE_IPS and p.address.ip in NODE_IPS
                  and isinstance(cells.parse_cell(p.body).payload, dict)]
        self.assertEqual({cells.parse_cell(p.body).payload["type"] for p in bridge},
                         {"transfer_start", "file_chunk", "transfer_end"})
        for post in net.posts:
            self.assertNotIn(b"secret-name", post.body)
            for at in range(0, len(data) - 48, 4096):
                piece = data[at:at + 48]
                self.assertNotIn(piece, post.body)
                self.assertNotIn(base64.b64encode(piece)[8:56], post.body)


class UnsealedPeerTransferTests(V2Case):
    sealed = False

    @inline
    async def test_two_v2_peers_transfer_a_file_through_a_v1_tracker(self):
        net = self.net
        data = os.urandom(50 * 1024)
        net.write_share(BOB_IP, "plain.bin", data)
        await net.start()
        self.assertEqual(net.alice.status()["circuit"]["sealed"], False)
        d = net.alice.download("plain.bin")
        net.pump(until=lambda: d.state is DONE or d.error is not None)
        self.assertEqual(d.state, DONE, d.error)


class KeeperTests(V2Case):
    @inline
    async def test_the_keeper_builds_a_sealed_circuit_from_the_directory(self):
        directory = DirectoryClient(self.net.clock, self.outbound, TRACKER, tracker_key=TRACKER_KEY_B64,
                                    default_port=PORT)
        data_dir = self.mktemp()
        os.makedirs(data_dir)
        keeper = CircuitKeeper(clock=self.net.clock, outbound=self.outbound, directory=directory, tracker=TRACKER,
                               data_dir=data_dir, rng=random.Random(3), first_message=lambda: dict(LS),
                               on_connected=lambda message, reply: None, on_broken=lambda why: None)
        circuit = await self.net.run(keeper.ready())
        self.assertIs(keeper.state, CONNECTED)
        self.assertTrue(circuit.sealed)
        status = keeper.status(self.net.clock.seconds())
        self.assertEqual((status["protocol"], status["sealed"]), ("onion-http/2", True))
        self.assertEqual({n["protocol"] for n in status["nodes"]}, {"onion-http/2"})
        await self.net.run(keeper.stop())
