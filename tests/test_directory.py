"""directory.py: the tracker's signed node list, mirrored byte for byte (PROTOCOL.md §6)."""

import base64
import random
from types import SimpleNamespace

import orjson
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.trial import unittest

from onion_twisted.protocol import crypto, wire
from onion_twisted.protocol.directory import DepartureWatch, parse_signed_directory
from onion_twisted.protocol.errors import BadRequest, Forbidden

TRACKER = ed25519.Ed25519PrivateKey.generate()
NODE_KEYS = [rsa.generate_private_key(public_exponent=65537, key_size=1024) for _ in range(2)]


def entry(i, address=None, **changes):
    e = {"address": address or f"127.0.0.{11 + i}:5000", "public_key": crypto.public_key_pem(NODE_KEYS[i]),
         "fingerprint": crypto.fingerprint(NODE_KEYS[i])}
    e.update(changes)
    return e


def signed(obj, key=TRACKER, indent=False):
    body = orjson.dumps(obj, option=orjson.OPT_INDENT_2 if indent else 0)
    return body, crypto.sign_body(key, body)


class SignedDirectoryTests(unittest.SynchronousTestCase):
    def test_accepts_signed_body(self):
        body, signature = signed({"issued": 1_700_000_000, "nodes": [entry(0), entry(1, address="127.0.0.12")]})
        directory = parse_signed_directory(body, signature, TRACKER.public_key(), 5000)
        self.assertEqual(directory.issued, 1_700_000_000)
        self.assertEqual(set(directory.nodes), {wire.Address("127.0.0.11", 5000), wire.Address("127.0.0.12", 5000)})
        self.assertIn(wire.Address("127.0.0.12", 5000), directory)
        self.assertNotIn(wire.Address("127.0.0.13", 5000), directory)
        node = directory.nodes[wire.Address("127.0.0.11", 5000)]
        self.assertEqual(node.fingerprint, crypto.fingerprint(NODE_KEYS[0]))
        self.assertEqual(node.public_key_pem, crypto.public_key_pem(NODE_KEYS[0]))

    def test_keeps_body_and_signature_byte_for_byte(self):
        # Indented, with key order and spacing a re-encoder would change.
        body, signature = signed({"nodes": [entry(0)], "issued": 1_700_000_000.5}, indent=True)
        directory = parse_signed_directory(body, signature, TRACKER.public_key(), 5000)
        self.assertIs(directory.body, body)
        self.assertEqual(directory.signature, signature)
        self.assertTrue(crypto.verify_body(TRACKER.public_key(), directory.body, directory.signature))

    def test_signature_header_as_bytes_is_kept_as_text(self):
        body, signature = signed({"issued": 1, "nodes": []})
        directory = parse_signed_directory(body, signature.encode("ascii"), TRACKER.public_key(), 5000)
        self.assertEqual(directory.signature, signature)

    def test_entry_without_fingerprint_gets_it_computed(self):
        e = entry(0)
        del e["fingerprint"]
        body, signature = signed({"issued": 1, "nodes": [e]})
        directory = parse_signed_directory(body, signature, TRACKER.public_key(), 5000)
        self.assertEqual(directory.nodes[wire.Address("127.0.0.11", 5000)].fingerprint,
                         crypto.fingerprint(NODE_KEYS[0]))

    def test_forged_signature_is_forbidden(self):
        body, signature = signed({"issued": 1, "nodes": [entry(0)]}, key=ed25519.Ed25519PrivateKey.generate())
        e = self.assertRaises(Forbidden, parse_signed_directory, body, signature, TRACKER.public_key(), 5000)
        self.assertEqual(e.status, 403)

    def test_altered_body_is_forbidden(self):
        body, signature = signed({"issued": 1, "nodes": [entry(0)]})
        altered = body.replace(b"127.0.0.11", b"127.0.0.66")
        self.assertRaises(Forbidden, parse_signed_directory, altered, signature, TRACKER.public_key(), 5000)

    def test_missing_signature_is_forbidden(self):
        body, _ = signed({"issued": 1, "nodes": []})
        for signature in (None, "", "garbage!"):
            with self.subTest(signature=signature):
                self.assertRaises(Forbidden, parse_signed_directory, body, signature, TRACKER.public_key(), 5000)

    def test_mismatching_fingerprint_is_refused(self):
        body, signature = signed({"issued": 1, "nodes": [entry(0, fingerprint=crypto.fingerprint(NODE_KEYS[1]))]})
        e = self.assertRaises(BadRequest, parse_signed_directory, body, signature, TRACKER.public_key(), 5000)
        self.assertIn("fingerprint", e.detail)

    def test_malformed_signed_bodies_are_bad_requests(self):
        for obj in ({"nodes": []}, {"issued": "now", "nodes": []}, {"issued": 1}, {"issued": 1, "nodes": {}},
                    {"issued": 1, "nodes": ["127.0.0.11"]},
                    {"issued": 1, "nodes": [entry(0, address="not an address!")]},
                    {"issued": 1, "nodes": [entry(0, public_key="garbage")]}, [1]):
            with self.subTest(obj=obj):
                body, signature = signed(obj)
                self.assertRaises(BadRequest, parse_signed_directory, body, signature, TRACKER.public_key(), 5000)


class PathChoiceTests(unittest.SynchronousTestCase):
    """pick_path: distinct IPs always, distinct /16 (IPv6 /32) networks when it can (§15).
    The addresses are documentation and benchmarking ranges, used here as data only."""

    def entries(self, hosts):
        from onion_twisted.protocol.directory import NodeEntry
        return [NodeEntry(wire.parse_address(h, 5000), "", str(i)) for i, h in enumerate(hosts)]

    def test_networks(self):
        from onion_twisted.protocol.directory import network_of
        cases = {"198.18.3.4": "198.18.0.0/16", "198.18.200.1": "198.18.0.0/16", "198.19.0.1": "198.19.0.0/16",
                 "[2001:db8:1::5]": "2001:db8::/32", "127.0.0.11": "ip 127.0.0.11", "127.0.1.11": "ip 127.0.1.11",
                 "Relay.Example": "name relay.example"}
        for host, network in cases.items():
            self.assertEqual(network_of(wire.parse_address(host, 5000)), network, host)

    def test_a_flooded_network_holds_at_most_one_hop(self):
        import random
        from onion_twisted.protocol.directory import network_of, pick_path
        flood = [f"198.18.{i // 250}.{i % 250 + 1}" for i in range(60)]  # one operator's /16
        entries = self.entries(flood + ["192.0.2.1", "203.0.113.1", "198.51.100.1"])
        rng = random.Random(7)
        flooded = 0
        for _ in range(300):
            path = pick_path(entries, 3, rng)
            networks = [network_of(e.address) for e in path]
            self.assertEqual(len(set(networks)), 3, networks)
            flooded += networks.count("198.18.0.0/16")
        self.assertGreater(flooded, 0)  # the flooder's nodes are still used, once per path at most

    def test_too_few_networks_still_distinct_ips(self):
        import random
        from onion_twisted.protocol.directory import pick_path
        entries = self.entries(["198.18.0.1", "198.18.0.2", "198.18.0.3", "198.18.0.4"])
        rng = random.Random(3)
        for _ in range(100):
            path = pick_path(entries, 3, rng)
            self.assertEqual(len({e.address.host for e in path}), 3)

    def test_one_host_never_holds_two_hops(self):
        import random
        from onion_twisted.protocol.directory import pick_path
        entries = self.entries(["192.0.2.1:5000", "192.0.2.1:5001", "192.0.2.1:5002", "203.0.113.1"])
        with self.assertRaises(ValueError):
            pick_path(entries, 3, random.Random(1))
        entries += self.entries(["198.51.100.1"])
        for _ in range(50):
            path = pick_path(entries, 3, random.Random(_))
            self.assertEqual(len({e.address.host for e in path}), 3)

    def test_loopback_members_of_one_machine_are_exempt(self):
        import random
        from onion_twisted.protocol.directory import pick_path
        entries = self.entries([f"127.0.0.{11 + i}" for i in range(6)])
        seen = set()
        for i in range(200):
            path = pick_path(entries, 3, random.Random(i))
            self.assertEqual(len({e.address.host for e in path}), 3)
            seen.update(e.address.host for e in path)
        self.assertEqual(len(seen), 6)  # every node is used: none is held back by its /16


class UsableNodesTests(unittest.SynchronousTestCase):
    """usable_nodes: nodes that failed lately are left out, unless keeping them out would put a
    circuit's ends on the peer's other circuits' ends, or leave too few for a path."""

    def setUp(self):
        from onion_twisted.protocol.directory import NodeEntry
        self.nodes = [NodeEntry(wire.parse_address(f"127.0.0.{11 + i}", 5000), "", str(i)) for i in range(6)]
        self.hosts = [n.address.host for n in self.nodes]

    def usable(self, failed, avoid=()):
        from onion_twisted.protocol.directory import usable_nodes
        got = usable_nodes(self.nodes, 3, {self.nodes[i].address for i in failed}, {self.hosts[i] for i in avoid})
        return sorted(self.nodes.index(n) for n in got)

    def test_nodes_that_failed_lately_are_left_out_while_others_make_a_path(self):
        self.assertEqual(self.usable(failed=[0, 1]), [2, 3, 4, 5])
        self.assertEqual(self.usable(failed=[0, 1], avoid=[2, 3]), [2, 3, 4, 5])  # 4 and 5 make the ends

    def test_ends_apart_come_before_a_recent_failure(self):
        # Left with 3, 4, 5 (all ends of other circuits but 5), the failed 0 and 1 are tried
        # again; the failed 2, an end of another circuit, is not.
        self.assertEqual(self.usable(failed=[0, 1, 2], avoid=[2, 3, 4]), [0, 1, 3, 4, 5])

    def test_everyone_when_too_few_are_left(self):
        self.assertEqual(self.usable(failed=[0, 1, 2, 3, 4]), [0, 1, 2, 3, 4, 5])


class PickApartTests(unittest.SynchronousTestCase):
    """pick_apart: a path's ends apart from the first set of hosts (in order of preference) the
    directory allows; ends_apart: whether it allows one."""

    def setUp(self):
        from onion_twisted.protocol.directory import NodeEntry
        self.nodes = [NodeEntry(wire.parse_address(f"127.0.0.{11 + i}", 5000), "", str(i)) for i in range(6)]
        self.hosts = [n.address.host for n in self.nodes]

    def ends(self, tiers, seed):
        from onion_twisted.protocol.directory import pick_apart
        path = pick_apart(self.nodes, 3, random.Random(seed), (), [{self.hosts[i] for i in t} for t in tiers])
        self.assertEqual(len({n.address.host for n in path}), 3)
        return {self.hosts.index(path[0].address.host), self.hosts.index(path[-1].address.host)}

    def test_the_first_set_the_directory_allows_is_kept_apart_from(self):
        for seed in range(30):
            self.assertEqual(self.ends([[0, 1, 2, 3], [0]], seed), {4, 5})

    def test_a_set_too_large_gives_way_to_the_next(self):
        for seed in range(30):
            self.assertEqual(self.ends([[0, 1, 2, 3, 4], [0, 1]], seed) & {0, 1}, set())

    def test_ends_apart_needs_two_hosts_outside_the_set(self):
        from onion_twisted.protocol.directory import ends_apart
        self.assertTrue(ends_apart(self.nodes, 3, set(self.hosts[:4])))
        self.assertFalse(ends_apart(self.nodes, 3, set(self.hosts[:5])))
        self.assertFalse(ends_apart(self.nodes[:2], 3))  # too few for a path at all


class KnownCopyTests(unittest.SynchronousTestCase):
    """An entry listed with the same fields as in an earlier copy is taken as parsed there."""

    def parse(self, entries, issued, known=None):
        return parse_signed_directory(*signed({"issued": issued, "nodes": entries}), TRACKER.public_key(), 5000,
                                      known=known)

    def test_unchanged_entries_are_reused_and_a_changed_one_parsed_again(self):
        first = self.parse([entry(0), entry(1, onion_key=base64.b64encode(b"j" * 32).decode())], 100)
        onion_key = base64.b64encode(b"k" * 32).decode()
        again = self.parse([entry(0), entry(1, onion_key=onion_key)], 105, known=first)
        x, y = wire.Address("127.0.0.11", 5000), wire.Address("127.0.0.12", 5000)
        self.assertIs(again.nodes[x], first.nodes[x])
        self.assertIsNot(again.nodes[y], first.nodes[y])
        self.assertEqual(again.nodes[y].onion_key, b"k" * 32)
        self.assertEqual((again.issued, again.node_ips), (105, frozenset({"127.0.0.11", "127.0.0.12"})))

    def test_an_entry_changed_to_a_wrong_fingerprint_is_refused_although_known(self):
        first = self.parse([entry(0)], 100)
        with self.assertRaises(BadRequest):
            self.parse([entry(0, fingerprint=crypto.fingerprint(NODE_KEYS[1]))], 105, known=first)

    def test_entries_whose_fields_are_not_strings_are_refused_although_known(self):
        first = self.parse([entry(0)], 100)
        with self.assertRaises(BadRequest):
            self.parse([entry(0, address=["127.0.0.11"])], 105, known=first)

    def test_a_copy_with_a_bad_signature_is_refused_although_its_entries_are_known(self):
        first = self.parse([entry(0)], 100)
        body, _ = signed({"issued": 105, "nodes": [entry(0)]})
        _, other = signed({"issued": 106, "nodes": [entry(0)]})
        with self.assertRaises(Forbidden):
            parse_signed_directory(body, other, TRACKER.public_key(), 5000, known=first)


def listing(issued, *hosts):
    """A directory copy as the watch reads it: when the tracker issued it, the IPs of its nodes."""
    return SimpleNamespace(issued=issued, node_ips=frozenset(f"127.0.0.{h}" for h in hosts))


class DepartureWatchTests(unittest.SynchronousTestCase):
    def test_a_node_missing_for_the_grace_has_departed_once(self):
        watch = DepartureWatch(grace=5)
        self.assertEqual(watch.update(listing(100, 11, 12, 13)), frozenset())
        self.assertEqual(watch.update(listing(101, 11, 13)), frozenset())  # maybe a restarted tracker
        self.assertEqual(watch.update(listing(105, 11, 13)), frozenset())
        self.assertEqual(watch.update(listing(106, 11, 13)), {"127.0.0.12"})
        self.assertEqual(watch.update(listing(120, 11, 13)), frozenset())  # told once

    def test_the_same_copy_twice_is_no_time_missing(self):
        watch = DepartureWatch(grace=5)
        watch.update(listing(100, 11, 12))
        for _ in range(3):
            self.assertEqual(watch.update(listing(101, 11)), frozenset())

    def test_a_node_back_within_the_grace_has_not_departed(self):
        watch = DepartureWatch(grace=5)
        watch.update(listing(100, 11, 12))
        watch.update(listing(101, 11))
        watch.update(listing(104, 11, 12))
        self.assertEqual(watch.update(listing(107, 11)), frozenset())  # missing again since 107, not 101
        self.assertEqual(watch.update(listing(112, 11)), {"127.0.0.12"})

    def test_only_nodes_once_listed_can_depart_and_what_is_watched_stays_bounded(self):
        watch = DepartureWatch(grace=0)
        self.assertEqual(watch.update(listing(100)), frozenset())
        for host in range(20, 40):
            self.assertLessEqual(len(watch.update(listing(host, host))), 1)
        self.assertEqual(watch.update(listing(50, 11)), {"127.0.0.39"})
        self.assertEqual(watch._missing_since, {})

    def test_nodes_missing_together_depart_together(self):
        watch = DepartureWatch(grace=5)
        watch.update(listing(100, 11, 12))
        watch.update(listing(101))
        self.assertEqual(watch.update(listing(106)), {"127.0.0.11", "127.0.0.12"})
