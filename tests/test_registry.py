"""The tracker's node directory with no I/O (PROTOCOL.md §6)."""

from __future__ import annotations

from twisted.internet import task
from twisted.trial import unittest

from onion_twisted.protocol import crypto, wire
from onion_twisted.protocol.directory import parse_signed_directory
from onion_twisted.protocol.errors import Forbidden
from onion_twisted.tracker.registry import NodeRegistry

from tests.support.tracker_fakes import NODE_ADDRESSES, NODE_KEYS, NOW, OTHER_TRACKER_KEY, PORT, TRACKER_KEY, pem


def make_registry(heartbeat=30.0, **options):
    clock = task.Clock()
    clock.advance(NOW)
    return NodeRegistry(clock, TRACKER_KEY, heartbeat=heartbeat, **options), clock


def add(registry, i):
    key = NODE_KEYS[i]
    return registry.register(NODE_ADDRESSES[i], pem(key), crypto.fingerprint(key))


def listed(registry):
    body, signature = registry.signed()
    directory = parse_signed_directory(body, signature, TRACKER_KEY.public_key(), PORT)
    return directory


class SignedDirectoryTests(unittest.SynchronousTestCase):
    def test_signature_verifies_and_lists_the_nodes(self):
        registry, _ = make_registry()
        add(registry, 1)
        add(registry, 0)
        directory = listed(registry)
        self.assertEqual(directory.issued, NOW)
        self.assertEqual(list(directory.nodes), [NODE_ADDRESSES[0], NODE_ADDRESSES[1]])
        for i in (0, 1):
            entry = directory.nodes[NODE_ADDRESSES[i]]
            self.assertEqual(entry.fingerprint, crypto.fingerprint(NODE_KEYS[i]))
            self.assertEqual(entry.public_key_pem, pem(NODE_KEYS[i]))
        self.assertEqual(directory.node_ips, frozenset({NODE_ADDRESSES[0].ip, NODE_ADDRESSES[1].ip}))

    def test_signature_is_over_the_exact_body(self):
        registry, _ = make_registry()
        add(registry, 0)
        body, signature = registry.signed()
        self.assertRaises(Forbidden, parse_signed_directory, body.replace(b"127.0.0.11", b"127.0.0.19"),
                          signature, TRACKER_KEY.public_key(), PORT)
        self.assertRaises(Forbidden, parse_signed_directory, body, signature,
                          OTHER_TRACKER_KEY.public_key(), PORT)

    def test_same_bytes_until_a_change(self):
        registry, clock = make_registry()
        add(registry, 0)
        first = registry.signed()
        clock.advance(10)
        add(registry, 0)  # a heartbeat changes nothing listed
        self.assertIs(registry.signed(), first)
        add(registry, 1)
        second = registry.signed()
        self.assertNotEqual(second[0], first[0])
        self.assertEqual(len(listed(registry).nodes), 2)

    def test_issued_refreshed_every_heartbeat(self):
        registry, clock = make_registry(heartbeat=30)
        add(registry, 0)
        registry.signed()
        clock.advance(29)
        self.assertEqual(listed(registry).issued, NOW)
        clock.advance(1)
        self.assertEqual(listed(registry).issued, NOW + 30)

    def test_empty_directory_is_signed_too(self):
        registry, _ = make_registry()
        self.assertEqual(listed(registry).nodes, {})


class HeartbeatTests(unittest.SynchronousTestCase):
    def test_nodes_unseen_three_heartbeats_dropped(self):
        registry, clock = make_registry(heartbeat=30)
        add(registry, 0)
        add(registry, 1)
        self.assertEqual(len(listed(registry).nodes), 2)
        for _ in range(4):
            clock.advance(30)
            add(registry, 1)  # node 1 keeps its heartbeat; node 0 is silent
        self.assertEqual(registry.expire(), [NODE_ADDRESSES[0]])
        self.assertEqual(list(listed(registry).nodes), [NODE_ADDRESSES[1]])
        self.assertFalse(registry.is_node_ip(NODE_ADDRESSES[0].ip))
        self.assertTrue(registry.is_node_ip(NODE_ADDRESSES[1].ip))

    def test_exactly_three_heartbeats_is_still_listed(self):
        registry, clock = make_registry(heartbeat=30)
        add(registry, 0)
        clock.advance(90)
        self.assertEqual(registry.expire(), [])
        self.assertIn(NODE_ADDRESSES[0], listed(registry).nodes)
        clock.advance(0.5)
        self.assertEqual(registry.expire(), [NODE_ADDRESSES[0]])
        self.assertEqual(listed(registry).nodes, {})
        self.assertEqual(len(registry), 0)

    def test_already_verified_only_for_the_same_key(self):
        registry, _ = make_registry()
        add(registry, 0)
        self.assertTrue(registry.already_verified(NODE_ADDRESSES[0], crypto.fingerprint(NODE_KEYS[0])))
        self.assertFalse(registry.already_verified(NODE_ADDRESSES[0], crypto.fingerprint(NODE_KEYS[1])))
        self.assertFalse(registry.already_verified(NODE_ADDRESSES[1], crypto.fingerprint(NODE_KEYS[1])))

    def test_new_key_replaces_the_old_one(self):
        registry, _ = make_registry()
        add(registry, 0)
        key = NODE_KEYS[1]
        self.assertTrue(registry.register(NODE_ADDRESSES[0], pem(key), crypto.fingerprint(key)))
        self.assertEqual(listed(registry).nodes[NODE_ADDRESSES[0]].fingerprint, crypto.fingerprint(key))

    def test_max_nodes(self):
        registry, _ = make_registry(max_nodes=2)
        self.assertTrue(add(registry, 0))
        self.assertTrue(add(registry, 1))
        self.assertFalse(add(registry, 2))
        self.assertTrue(add(registry, 0))  # a listed node's heartbeat is still taken
        self.assertEqual(set(listed(registry).nodes), {NODE_ADDRESSES[0], NODE_ADDRESSES[1]})

    def test_node_ips_of_a_dns_named_node(self):
        registry, _ = make_registry()
        key = NODE_KEYS[0]
        registry.register(wire.Address("relay-a.test", PORT), pem(key), crypto.fingerprint(key), "127.0.0.21")
        add(registry, 1)
        self.assertEqual(registry.node_ips(), frozenset({"127.0.0.21", NODE_ADDRESSES[1].ip}))
        self.assertTrue(registry.is_node_ip("127.0.0.21"))
        self.assertEqual(set(listed(registry).nodes), {wire.Address("relay-a.test", PORT), NODE_ADDRESSES[1]})
