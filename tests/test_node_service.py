"""The node's service tree and its onion key (PROTOCOL.md §10, §11): loaded or made at start,
kept on disk mode 0600, rotated when due (saved, then registered again), the old key
accepted for its grace; circuits through a node that left the directory closed (docs choice 70).
No socket: the service is built on a memory reactor and never started."""

from __future__ import annotations

import os
import stat
from types import SimpleNamespace

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from onion_twisted.net import config, keys
from onion_twisted.node.circuits import EXIT, NODE
from onion_twisted.node.service import NodeService
from onion_twisted.protocol import cells, crypto, ntor, wire
from onion_twisted.protocol.errors import BadRequest

NOW = 1_700_000_000
LIFETIME = 2 * 86400.0  # longer than the grace: one rotation in the test
GRACE = 86400.0


class RecordingDirectory:
    """Where the service registers: each POST /nodes body it would send, as a dict."""

    def __init__(self):
        self.registered = []
        self.current = SimpleNamespace(issued=0, node_ips=frozenset())  # the copy fetched: it lists no node

    async def register(self, own_address, public_key_pem, onion_key=None):
        self.registered.append({"address": str(own_address), "public_key": public_key_pem, "onion_key": onion_key})

    def fetch(self):
        return defer.succeed(None)


class NodeServiceOnionKeyTests(unittest.TestCase):
    def make(self, **changes):
        cfg = config.parse("node", overrides={"listen": "127.0.0.11", "tracker": "127.0.0.1:5000",
                                              "key_bits": 1024, "data_dir": self.data_dir})
        cfg.update({"onion_key_lifetime": LIFETIME, **changes})
        service = NodeService(cfg, reactor=self.reactor)
        service.directory = RecordingDirectory()
        return service

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.reactor.advance(NOW)
        self.data_dir = os.path.abspath(self.mktemp())

    def state_on_disk(self) -> bytes:
        return open(os.path.join(self.data_dir, keys.ONION_KEYS_FILE), "rb").read()

    def test_the_key_is_kept_0600_and_reused_after_a_restart(self):
        first = self.make()
        path = os.path.join(self.data_dir, keys.ONION_KEYS_FILE)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertIs(first.relay.onion_keys, first.onion_keys)
        again = self.make()
        self.assertEqual(again.onion_keys.current_public, first.onion_keys.current_public)

    def test_registration_sends_the_onion_key(self):
        service = self.make()
        self.successResultOf(service.register())
        [sent] = service.directory.registered
        self.assertEqual(sent["onion_key"], service.onion_keys.current_public)
        self.assertEqual(sent["public_key"], crypto.public_key_pem(service.key))

    def test_rotation_saves_registers_and_keeps_the_old_key_for_its_grace(self):
        service = self.make()
        relay, ring = service.relay, service.onion_keys
        old = ring.current_public
        self.assertIsNone(service.rotate_onion_key())  # not due: nothing happens
        self.assertEqual(service.directory.registered, [])
        self.reactor.advance(LIFETIME)
        self.successResultOf(service.rotate_onion_key())
        self.assertNotEqual(ring.current_public, old)
        self.assertEqual([r["onion_key"] for r in service.directory.registered], [ring.current_public])
        saved = self.state_on_disk()
        self.assertEqual(keys.load_or_create_onion_keys(self.data_dir, self.reactor, LIFETIME).current_public,
                         ring.current_public)
        # Within the grace a handshake made with the old key still gets a circuit.
        _, data = ntor.client_start(relay.member_id, old)
        answer = self.successResultOf(defer.ensureDeferred(
            relay.handle("127.0.0.101", cells.encode_cell(wire.new_circuit_id(), data))))
        self.assertEqual(len(wire.b64decode(cells.parse_reply(answer))), 64)
        # After it, the old key is refused, and is gone from the disk too.
        self.reactor.advance(GRACE + 1)
        service.rotate_onion_key()
        self.assertNotEqual(self.state_on_disk(), saved)
        self.assertIn(b'"previous": null', self.state_on_disk())
        _, data = ntor.client_start(relay.member_id, old)
        failure = self.failureResultOf(defer.ensureDeferred(
            relay.handle("127.0.0.101", cells.encode_cell(wire.new_circuit_id(), data))), BadRequest)
        self.assertIn("unknown onion key", failure.value.detail)

    def test_accept_v1_reaches_the_relay(self):
        self.assertTrue(self.make().relay.accept_v1)
        self.assertFalse(self.make(accept_v1=False).relay.accept_v1)

    def test_a_node_of_v1_only_has_no_onion_key_and_registers_without_one(self):
        service = self.make(speak_v2=False)
        self.assertIsNone(service.onion_keys)
        self.assertIsNone(service.relay.onion_keys)
        self.assertFalse(os.path.exists(os.path.join(self.data_dir, keys.ONION_KEYS_FILE)))
        self.successResultOf(service.register())
        self.assertEqual([r["onion_key"] for r in service.directory.registered], [None])


class ScriptedDirectory(RecordingDirectory):
    """Each fetch makes the next of ``copies`` current (a copy: when it was issued, then the
    hosts it lists), or fails (None)."""

    def __init__(self, copies):
        super().__init__()
        self.copies = list(copies)
        self.current = None

    def fetch(self):
        copy = self.copies.pop(0)
        if copy is None:
            return defer.fail(ConnectionRefusedError("tracker down"))
        issued, *hosts = copy
        self.current = SimpleNamespace(issued=issued, node_ips=frozenset(f"127.0.0.{h}" for h in hosts))
        return defer.succeed(self.current)


class RecordingOutbound:
    def __init__(self):
        self.posted = []  # (address, body)

    def post(self, address, body, headers=None, path="/"):
        self.posted.append((address, body))
        return defer.succeed(b"{}")


PEER_IP, TRACKER = "127.0.0.101", wire.Address("127.0.0.1", 5000)


class NeighbourLeftTests(unittest.TestCase):
    """This node is .11; its neighbours .12, .13 and .14 are nodes, .101 a peer."""

    def setUp(self):
        reactor = MemoryReactorClock()
        reactor.advance(NOW)
        cfg = config.parse("node", overrides={"listen": "127.0.0.11", "tracker": "127.0.0.1:5000",
                                              "key_bits": 1024, "data_dir": os.path.abspath(self.mktemp())})
        self.service = NodeService(cfg, reactor=reactor)
        self.outbound = self.service.relay.outbound = RecordingOutbound()
        table = self.service.table

        def circuit(in_ip, out_ip, kind):
            made = table.create(in_ip, wire.new_circuit_id(), os.urandom(16))
            address = TRACKER if kind == EXIT else wire.Address(out_ip, 5000)
            table.attach(made, address, out_ip, wire.new_circuit_id(), kind)
            return made

        self.middle = circuit("127.0.0.12", "127.0.0.13", NODE)   # entry .12 is the one to leave
        self.entry = circuit(PEER_IP, "127.0.0.12", NODE)         # its middle is .12
        self.exit = circuit("127.0.0.14", TRACKER.ip, EXIT)
        self.bystander = circuit(PEER_IP, "127.0.0.13", NODE)
        # .12 exits a transfer bridged into the exit circuit here.
        self.bridge = table.receive_bridge(self.exit.out_cid, wire.new_circuit_id(), wire.Address("127.0.0.12", 5000),
                                           "127.0.0.12")

    def fetch(self, *copies):
        self.service.directory = ScriptedDirectory(copies)
        for _ in copies:
            self.successResultOf(self.service.fetch_directory())

    def destroys(self):
        return {(address.ip, cells.parse_cell(body).cid) for address, body in self.outbound.posted
                if cells.parse_cell(body).destroy}

    def test_the_circuits_through_a_departed_node_are_closed_and_destroyed_towards_the_living(self):
        # register_interval is 30 s (the default): .12, missing since 101, has been that long at 131.
        self.fetch((100, 12, 13, 14), (101, 13, 14), None, (130, 13, 14), (131, 13, 14))

        self.assertEqual(set(self.service.table.by_in.values()), {self.exit, self.bystander})
        self.assertIsNone(self.service.table.bridge_by_cid(self.bridge.bridge_cid))
        # The middle's destroy goes on to the exit .13, the entry's back to the peer; none to .12.
        self.assertEqual(self.destroys(), {("127.0.0.13", self.middle.out_cid), (PEER_IP, self.entry.in_cid)})
        self.assertEqual(self.service.relay.metrics.neighbour_left_total, 2)
        self.assertIn(b"onion_node_neighbour_left_total 2", self.service.relay.metrics.prometheus(2, 0).encode())

    def test_a_node_missing_for_less_than_the_register_interval_closes_nothing(self):
        self.fetch((100, 12, 13, 14), (101, 13, 14), (129, 13, 14), (130, 12, 13, 14), (140, 13, 14))
        self.assertEqual(len(self.service.table), 4)
        self.assertEqual(self.outbound.posted, [])
