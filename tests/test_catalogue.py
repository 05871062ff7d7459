"""The tracker's catalogue with no I/O (PROTOCOL.md §8); the messages' own checks
are in test_messages.

Circuits are (exit IP, CID); time is a ``task.Clock``; randomness a seeded
``random.Random``.
"""

from __future__ import annotations

import random

from twisted.internet import task
from twisted.trial import unittest

from onion_twisted.protocol import wire
from onion_twisted.protocol.messages import DEFAULT_CHUNK, FileRequest, MessageError, SharedFile, parse_files
from onion_twisted.tracker import catalogue as catalogue_module, transfers as transfers_module
from onion_twisted.tracker.catalogue import Catalogue

from .test_messages import ErrorCase
from tests.support.tracker_fakes import NOW, SHA_A, SHA_B

EXIT_1, EXIT_2, EXIT_3 = "127.0.0.11", "127.0.0.12", "127.0.0.13"
CID_1 = "11111111-1111-4111-8111-111111111111"
CID_2 = "22222222-2222-4222-8222-222222222222"
CID_3 = "33333333-3333-4333-8333-333333333333"
CID_4 = "44444444-4444-4444-8444-444444444444"
A = (EXIT_1, CID_1)
B = (EXIT_2, CID_2)
C = (EXIT_3, CID_3)
D = (EXIT_1, CID_4)


def make_catalogue(seed=7, **options):
    clock = task.Clock()
    clock.advance(NOW)
    return Catalogue(clock, rng=random.Random(seed), **options), clock


def join(catalogue, key, files):
    """Circuit ``key`` sends ``ls`` with ``files``."""
    circuit = catalogue.circuit(key, wire.Address(key[0], 5000))
    catalogue.announce(circuit, parse_files(files, catalogue.max_files))
    return circuit


def request(name, sha256=None, chunk_size=DEFAULT_CHUNK, chunks=None):
    return FileRequest(name, sha256, chunk_size, chunks)


def entry(catalogue, name, sha256):
    rows = [r for r in catalogue.listing() if r["name"] == name and r["sha256"] == sha256]
    return rows[0] if rows else None


class MergeTests(unittest.SynchronousTestCase):
    def test_same_name_different_content_two_entries(self):
        cat, _ = make_catalogue()
        join(cat, A, [{"name": "song.ogg", "size": 10, "sha256": SHA_A}])
        join(cat, B, [{"name": "song.ogg", "size": 20, "sha256": SHA_B}])
        self.assertEqual(cat.listing(), [
            {"name": "song.ogg", "size": 10, "sha256": SHA_A, "sources": 1},
            {"name": "song.ogg", "size": 20, "sha256": SHA_B, "sources": 1},
        ])

    def test_same_content_counts_sources(self):
        cat, _ = make_catalogue()
        join(cat, A, [{"name": "song.ogg", "size": 10, "sha256": SHA_A}])
        join(cat, B, [{"name": "song.ogg", "size": 10, "sha256": SHA_A}])
        join(cat, C, [{"name": "song.ogg", "size": 20, "sha256": SHA_B}])
        self.assertEqual(entry(cat, "song.ogg", SHA_A)["sources"], 2)
        self.assertEqual(entry(cat, "song.ogg", SHA_B)["sources"], 1)
        self.assertEqual(len(cat.entries), 2)

    def test_name_only_form_is_its_own_entry(self):
        cat, _ = make_catalogue()
        join(cat, A, ["song.ogg"])
        join(cat, B, ["song.ogg"])
        join(cat, C, [{"name": "song.ogg", "size": 5, "sha256": SHA_A}])
        self.assertEqual(cat.listing(), [
            {"name": "song.ogg", "size": None, "sha256": None, "sources": 2},
            {"name": "song.ogg", "size": 5, "sha256": SHA_A, "sources": 1},
        ])

    def test_ls_replaces_the_circuits_previous_list(self):
        cat, _ = make_catalogue()
        join(cat, B, ["kept"])
        circuit = join(cat, A, ["old", "kept", {"name": "v", "sha256": SHA_A}])
        join(cat, A, ["new", "kept", {"name": "v", "sha256": SHA_B}])
        self.assertEqual([(r["name"], r["sha256"], r["sources"]) for r in cat.listing()],
                         [("kept", None, 2), ("new", None, 1), ("v", SHA_B, 1)])
        self.assertNotIn("old", cat.names)
        self.assertEqual(cat.names["v"], {("v", SHA_B, None)})
        self.assertEqual({f.name for f in circuit.files}, {"new", "kept", "v"})

    def test_empty_ls_withdraws_everything(self):
        cat, _ = make_catalogue()
        circuit = join(cat, A, ["a", "b"])
        join(cat, A, [])
        self.assertEqual(cat.listing(), [])
        self.assertEqual((cat.entries, cat.names), ({}, {}))
        self.assertIn(A, cat.circuits)
        self.assertEqual(circuit.files, ())

    def test_forget_withdraws_the_circuits_files(self):
        cat, _ = make_catalogue()
        join(cat, A, ["a", {"name": "b", "sha256": SHA_A}])
        join(cat, B, ["a"])
        self.assertTrue(cat.forget(A))
        self.assertEqual(cat.listing(), [{"name": "a", "size": None, "sha256": None, "sources": 1}])
        self.assertNotIn(A, cat.circuits)
        self.assertNotIn("b", cat.names)
        self.assertFalse(cat.forget(A))

    def test_circuit_key_includes_the_exit_ip(self):
        cat, _ = make_catalogue()
        join(cat, (EXIT_1, CID_1), ["a"])
        join(cat, (EXIT_2, CID_1), ["a"])
        self.assertEqual(entry(cat, "a", None)["sources"], 2)
        cat.forget((EXIT_2, CID_1))
        self.assertEqual(entry(cat, "a", None)["sources"], 1)


class ListingCacheTests(unittest.SynchronousTestCase):
    def test_small_catalogue_rebuilt_after_each_change(self):
        cat, _ = make_catalogue()
        join(cat, A, ["a"])
        first = cat.files_reply_json()
        self.assertIs(cat.files_reply_json(), first)  # unchanged: the same bytes, not rebuilt
        self.assertEqual(wire.loads(first), {"type": "files", "files": [
            {"name": "a", "size": None, "sha256": None, "sources": 1}]})
        join(cat, B, ["b"])
        self.assertEqual([r["name"] for r in wire.loads(cat.files_reply_json())["files"]], ["a", "b"])
        cat.forget(A)
        self.assertEqual([r["name"] for r in cat.listing()], ["b"])

    def test_large_catalogue_rebuilt_at_most_every_listing_refresh(self):
        cat, clock = make_catalogue(listing_refresh=1.0, max_files=3000)
        join(cat, A, [f"f{i:04}" for i in range(2001)])
        self.assertEqual(len(cat.listing()), 2001)
        join(cat, B, ["late"])
        self.assertNotIn("late", [r["name"] for r in cat.listing()])
        clock.advance(0.5)
        self.assertNotIn("late", [r["name"] for r in cat.listing()])
        clock.advance(0.5)
        self.assertIn("late", [r["name"] for r in cat.listing()])
        self.assertIn(b'"late"', cat.files_reply_json())

    def test_max_listing_keeps_the_entries_with_most_sources(self):
        cat, _ = make_catalogue(max_listing=2)
        join(cat, A, ["one", "two", "three"])
        join(cat, B, ["two", "three"])
        join(cat, C, ["three"])
        self.assertEqual([(r["name"], r["sources"]) for r in cat.listing()], [("three", 3), ("two", 2)])
        self.assertEqual(len(cat.entries), 3)


class ChooseSourceTests(ErrorCase, unittest.SynchronousTestCase):
    def test_never_the_requesters_own_circuit(self):
        cat, _ = make_catalogue()
        join(cat, A, ["a"])
        join(cat, B, ["a"])
        for _ in range(50):
            circuit, shared, _ = cat.choose_source(request("a"), A)
            self.assertEqual(circuit.key, B)
            self.assertEqual(shared, SharedFile("a", None, None))

    def test_no_source_when_only_the_requester_shares_it(self):
        cat, _ = make_catalogue()
        join(cat, A, ["a", {"name": "b", "sha256": SHA_A}])
        self.assertMessageError("no_source", cat.choose_source, request("a"), A)
        self.assertMessageError("no_source", cat.choose_source, request("b", SHA_A), A)
        self.assertEqual(cat.choose_source(request("a"), B)[0].key, A)

    def test_not_found(self):
        cat, _ = make_catalogue()
        join(cat, A, [{"name": "a", "sha256": SHA_A}])
        self.assertMessageError("not_found", cat.choose_source, request("missing"), B)
        self.assertMessageError("not_found", cat.choose_source, request("a", SHA_B), B)

    def test_without_sha256_the_entry_with_most_sources(self):
        cat, _ = make_catalogue()
        join(cat, A, [{"name": "a", "size": 1, "sha256": SHA_A}])
        join(cat, B, [{"name": "a", "size": 2, "sha256": SHA_B}])
        join(cat, C, [{"name": "a", "size": 2, "sha256": SHA_B}])
        requester = ("127.0.0.14", CID_4)
        for _ in range(30):
            circuit, shared, _ = cat.choose_source(request("a"), requester)
            self.assertEqual(shared.sha256, SHA_B)
            self.assertIn(circuit.key, (B, C))

    def test_most_sources_not_counting_the_requesters_own(self):
        cat, _ = make_catalogue()
        join(cat, A, [{"name": "a", "sha256": SHA_A}])
        join(cat, B, [{"name": "a", "sha256": SHA_B}])
        join(cat, C, [{"name": "a", "sha256": SHA_B}])
        join(cat, D, [{"name": "a", "sha256": SHA_A}])
        # SHA_A has two sources but one is the requester's own: one usable; SHA_B has two.
        for _ in range(30):
            _, shared, _ = cat.choose_source(request("a"), D)
            self.assertEqual(shared.sha256, SHA_B)

    def test_with_sha256_that_entry(self):
        cat, _ = make_catalogue()
        join(cat, A, [{"name": "a", "size": 1, "sha256": SHA_A}])
        join(cat, B, [{"name": "a", "size": 2, "sha256": SHA_B}])
        join(cat, C, [{"name": "a", "size": 2, "sha256": SHA_B}])
        for _ in range(30):
            circuit, shared, _ = cat.choose_source(request("a", SHA_A), D)
            self.assertEqual((circuit.key, shared), (A, SharedFile("a", 1, SHA_A)))

    def test_fewest_transfers_under_way_wins(self):
        cat, _ = make_catalogue()
        a = join(cat, A, ["f"])
        b = join(cat, B, ["f"])
        join(cat, C, ["f"])
        cat.start_transfer(a, "t1", 10)
        cat.start_transfer(b, "t2", 10)
        for _ in range(30):
            self.assertEqual(cat.choose_source(request("f"), D)[0].key, C)

    def test_ties_broken_at_random(self):
        cat, _ = make_catalogue(seed=12345)
        a = join(cat, A, ["f"])
        join(cat, B, ["f"])
        join(cat, C, ["f"])
        cat.start_transfer(a, "t1", 10)
        chosen = [cat.choose_source(request("f"), D)[0].key for _ in range(200)]
        self.assertEqual(set(chosen), {B, C})
        self.assertTrue(50 < chosen.count(B) < 150, chosen.count(B))

    def test_same_seed_same_draws(self):
        draws = []
        for _ in range(2):
            cat, _ = make_catalogue(seed=99)
            for key in (A, B, C):
                join(cat, key, ["f"])
            draws.append([cat.choose_source(request("f"), D)[0].key for _ in range(40)])
        self.assertEqual(draws[0], draws[1])
        self.assertEqual(set(draws[0]), {A, B, C})

    def test_transfer_estimate_ends(self):
        cat, clock = make_catalogue(idle_timeout=600.0)
        a = join(cat, A, ["f"])
        join(cat, B, ["f"])
        cat.start_transfer(a, "t1", 30 * 1024 * 1024)  # 60 s + 30 s at 1 MiB/s
        self.assertEqual(cat.transfers_under_way(), 1)
        clock.advance(89)
        self.assertEqual(cat.transfers_under_way(), 1)
        self.assertEqual({cat.choose_source(request("f"), D)[0].key for _ in range(20)}, {B})
        clock.advance(1)
        self.assertEqual(cat.transfers_under_way(), 0)

    def test_transfer_estimate_capped_at_idle_time(self):
        cat, clock = make_catalogue(idle_timeout=100.0)
        a = join(cat, A, ["f"])
        cat.start_transfer(a, "t1", 10 ** 12)
        clock.advance(99)
        self.assertEqual(cat.transfers_under_way(), 1)
        clock.advance(1)
        self.assertEqual(cat.transfers_under_way(), 0)

    def test_end_transfer(self):
        cat, _ = make_catalogue()
        a = join(cat, A, ["f"])
        cat.start_transfer(a, "t1", 1)
        cat.end_transfer(a, "t1")
        cat.end_transfer(a, "unknown")
        self.assertEqual(cat.transfers_under_way(), 0)


class ExpiryTests(unittest.SynchronousTestCase):
    def test_silent_circuits_forgotten_after_idle_time(self):
        cat, clock = make_catalogue(idle_timeout=600.0)
        join(cat, A, ["a"])
        join(cat, B, ["b"])
        clock.advance(300)
        cat.circuit(B, wire.Address(EXIT_2, 5000))  # B speaks again
        clock.advance(300)
        self.assertEqual(cat.expire(), [])  # A silent exactly the idle time: kept
        clock.advance(1)
        self.assertEqual(cat.expire(), [A])
        self.assertEqual([r["name"] for r in cat.listing()], ["b"])
        clock.advance(300)
        self.assertEqual(cat.expire(), [B])
        self.assertEqual((cat.circuits, cat.entries, cat.listing()), ({}, {}, []))


class BoundsTests(ErrorCase, unittest.SynchronousTestCase):
    def test_max_circuits(self):
        cat, _ = make_catalogue(max_circuits=2)
        join(cat, A, ["a"])
        join(cat, B, ["b"])
        self.assertMessageError("busy", cat.circuit, C, wire.Address(EXIT_3, 5000))
        self.assertEqual(set(cat.circuits), {A, B})
        cat.circuit(A, wire.Address(EXIT_1, 5000))  # a known circuit is still served
        cat.forget(B)
        cat.circuit(C, wire.Address(EXIT_3, 5000))
        self.assertEqual(set(cat.circuits), {A, C})

    def test_max_entries_refuses_and_changes_nothing(self):
        cat, _ = make_catalogue(max_entries=3, max_entries_per_exit=3)
        circuit = join(cat, A, ["a", "b"])
        other = join(cat, B, ["c"])
        before = (dict(cat.entries), cat.listing(), circuit.files, other.files)
        self.assertMessageError("busy", join, cat, B, ["c", "d"])
        self.assertEqual((dict(cat.entries), cat.listing(), circuit.files, other.files), before)

    def test_max_entries_counts_only_new_entries(self):
        cat, _ = make_catalogue(max_entries=3, max_entries_per_exit=3)
        join(cat, A, ["a", "b"])
        join(cat, B, ["a", "b", "c"])  # a and b already listed: one new entry, three in all
        self.assertEqual(len(cat.entries), 3)
        self.assertEqual(entry(cat, "a", None)["sources"], 2)

    def test_full_catalogue_still_lets_a_circuit_replace_its_list(self):
        cat, _ = make_catalogue(max_entries=2, max_entries_per_exit=2)
        join(cat, A, ["a", "b"])
        join(cat, A, ["a", "c"])  # b, held by A alone, makes room for c
        self.assertEqual(set(cat.names), {"a", "c"})
        join(cat, B, ["a"])
        self.assertRaises(MessageError, join, cat, B, ["z"])  # a is still A's: no room


# --- §13: entries keyed by root, end-to-end choice, exclusions --------------------------------

ROOT = "d" * 64
OTHER_ROOT = "e" * 64
KEY = bytes(range(32))  # a requester's X25519 public key
E = ("127.0.0.15", "55555555-5555-4555-8555-555555555555")


def e2e_request(name, sha256=None, root=None, key=KEY, exclude=()):
    return FileRequest(name, sha256, DEFAULT_CHUNK, None, root, key, tuple(exclude))


def with_root(size=5, sha256=SHA_A, root=ROOT, name="a"):
    return {"name": name, "size": size, "sha256": sha256, "root": root}


def sealed(*keys):
    """``is_sealed`` for choose_source: these circuits reach the tracker sealed (§12)."""
    return lambda key: key in keys


class RootEntryTests(unittest.SynchronousTestCase):
    def test_same_name_and_sha256_with_and_without_root_are_two_entries(self):
        cat, _ = make_catalogue()
        join(cat, A, [with_root()])
        join(cat, B, [{"name": "a", "size": 5, "sha256": SHA_A}])
        join(cat, C, [with_root(root=OTHER_ROOT)])
        self.assertEqual(set(cat.entries), {("a", SHA_A, ROOT), ("a", SHA_A, None), ("a", SHA_A, OTHER_ROOT)})
        self.assertEqual(cat.names["a"], set(cat.entries))

    def test_rows_carry_root_only_when_the_entry_has_one(self):
        cat, _ = make_catalogue()
        join(cat, A, [with_root()])
        join(cat, B, [with_root(), {"name": "a", "size": 5, "sha256": SHA_A}, "b"])
        self.assertEqual(cat.listing(), [
            {"name": "a", "size": 5, "sha256": SHA_A, "sources": 1},
            {"name": "a", "size": 5, "sha256": SHA_A, "sources": 2, "root": ROOT},
            {"name": "b", "size": None, "sha256": None, "sources": 1},
        ])
        self.assertNotIn(b'"root":null', cat.files_reply_json())  # a /1 row is unchanged

    def test_withdrawing_the_last_source_of_a_root_entry_drops_it(self):
        cat, _ = make_catalogue()
        join(cat, A, [with_root(), {"name": "a", "size": 5, "sha256": SHA_A}])
        join(cat, A, [{"name": "a", "size": 5, "sha256": SHA_A}])
        self.assertEqual(set(cat.entries), {("a", SHA_A, None)})


class E2EChooseSourceTests(ErrorCase, unittest.SynchronousTestCase):
    def test_a_request_with_root_takes_only_that_entry(self):
        cat, _ = make_catalogue()
        join(cat, A, [with_root()])
        join(cat, B, [with_root(root=OTHER_ROOT)])
        join(cat, C, [with_root(root=OTHER_ROOT)])  # the entry with most sources: not the one asked for
        for _ in range(20):
            circuit, shared, _ = cat.choose_source(e2e_request("a", root=ROOT, key=None), D)
            self.assertEqual((circuit.key, shared.root), (A, ROOT))
        self.assertMessageError("not_found", cat.choose_source, e2e_request("a", root="f" * 64), D)
        self.assertMessageError("not_found", cat.choose_source, e2e_request("a", SHA_B, root=ROOT), D)

    def test_a_key_prefers_a_root_entry_with_sealed_sources(self):
        cat, _ = make_catalogue()
        join(cat, A, [with_root()])                                # root, sealed
        join(cat, B, [with_root()])                                # root, unsealed
        no_root = (C, E, ("127.0.0.16", CID_1))                    # no root, sealed, more of them
        for key in no_root:
            join(cat, key, [{"name": "a", "size": 5, "sha256": SHA_A}])
        for _ in range(20):
            circuit, shared, e2e = cat.choose_source(e2e_request("a"), D, is_sealed=sealed(A, D, *no_root))
            self.assertEqual((circuit.key, shared.root, e2e), (A, ROOT, True))  # never B: it is not sealed
        # Without a key the entry with the most sources wins, as in §8, and nothing is end to end.
        circuit, shared, e2e = cat.choose_source(e2e_request("a", key=None), D, is_sealed=sealed(A, D, *no_root))
        self.assertEqual((circuit.key in no_root, shared.root, e2e), (True, None, False))
        # Nor from an unsealed requester: its key crossed its exit in the clear.
        circuit, shared, e2e = cat.choose_source(e2e_request("a"), D, is_sealed=sealed(A, *no_root))
        self.assertEqual((circuit.key in no_root, shared.root, e2e), (True, None, False))

    def test_a_key_whose_only_source_is_unsealed_is_not_end_to_end(self):
        cat, _ = make_catalogue()
        join(cat, A, [with_root()])
        circuit, shared, e2e = cat.choose_source(e2e_request("a"), D, is_sealed=sealed(D))
        self.assertEqual((circuit.key, shared.root, e2e), (A, ROOT, False))
        # A sealed source of an entry without a root is not end to end either: no leaves to check.
        join(cat, A, [{"name": "a", "size": 5, "sha256": SHA_A}])
        self.assertEqual(cat.choose_source(e2e_request("a"), D, is_sealed=sealed(A, D))[2], False)

    def test_exclude_skips_the_source_of_a_transfer(self):
        cat, _ = make_catalogue()
        a, b = join(cat, A, [with_root()]), join(cat, B, [with_root()])
        join(cat, C, [with_root()])
        cat.start_transfer(a, "t-a", 5)
        cat.start_transfer(b, "t-b", 5)
        self.assertEqual(cat.transfer_sources, {"t-a": A, "t-b": B})
        cat.end_transfer(a, "t-a")
        cat.end_transfer(b, "t-b")  # all idle again: only the exclusion keeps a source out, the id is remembered
        chosen = {cat.choose_source(e2e_request("a", exclude=["t-a"]), D)[0].key for _ in range(40)}
        self.assertEqual(chosen, {B, C})
        for _ in range(20):
            self.assertEqual(cat.choose_source(e2e_request("a", exclude=["t-a", "t-b", "unknown"]), D)[0].key, C)

    def test_all_other_sources_excluded_is_no_source(self):
        cat, _ = make_catalogue()
        a, b = join(cat, A, [with_root()]), join(cat, B, [with_root()])
        join(cat, D, [with_root()])  # the requester's own copy does not count
        cat.start_transfer(a, "t-a", 5)
        cat.start_transfer(b, "t-b", 5)
        e = self.assertMessageError("no_source", cat.choose_source, e2e_request("a", exclude=["t-a", "t-b"]), D)
        self.assertEqual(e.detail, "every other source of that file was excluded")
        self.assertEqual(cat.choose_source(e2e_request("a", exclude=["t-a"]), D)[0].key, B)

    def test_transfer_sources_are_bounded_oldest_first(self):
        self.patch(transfers_module, "MAX_TRANSFER_SOURCES", 3)
        cat, _ = make_catalogue()
        a = join(cat, A, ["f"])
        for i in range(5):
            cat.start_transfer(a, f"t{i}", 1)
        self.assertEqual(list(cat.transfer_sources), ["t2", "t3", "t4"])
        # t0 is forgotten: it excludes nothing; t4 still excludes A, the only source.
        self.assertEqual(cat.choose_source(e2e_request("f", key=None, exclude=["t0"]), D)[0].key, A)
        self.assertMessageError("no_source", cat.choose_source, e2e_request("f", key=None, exclude=["t4"]), D)


# --- issue 16: avoid, fair ranking, load by exit, quotas and eviction --------------------------

EXIT_4, EXIT_5 = "127.0.0.14", "127.0.0.15"
REQUESTER = ("127.0.0.99", "99999999-9999-4999-8999-999999999999")


def circuit_on(exit_ip, n):
    return (exit_ip, f"{n:08x}-0000-4000-8000-000000000000")


def swarm_request(name, sha256=None, exclude=(), avoid=(), key=None):
    return FileRequest(name, sha256, DEFAULT_CHUNK, None, None, key, tuple(exclude), tuple(avoid))


def held_alone(catalogue):
    """exit IP -> entries all of whose sources come through it, counted from scratch."""
    counts = {}
    for sources in catalogue.entries.values():
        exits = {k[0] for k in sources}
        if len(exits) == 1:
            exit_ip = exits.pop()
            counts[exit_ip] = counts.get(exit_ip, 0) + 1
    return counts


def check_bookkeeping(test, catalogue):
    """The incremental counts of the quotas agree with the catalogue they summarise."""
    test.assertEqual(catalogue.exit_entries, held_alone(catalogue))
    several = {key: {} for key, sources in catalogue.entries.items() if len({k[0] for k in sources}) > 1}
    for key in several:
        for k in catalogue.entries[key]:
            several[key][k[0]] = several[key].get(k[0], 0) + 1
    test.assertEqual(catalogue.entry_exits, several)
    with_files = {}
    for key, circuit in catalogue.circuits.items():
        if circuit.files:
            with_files.setdefault(key[0], set()).add(key)
    test.assertEqual({ip: set(order) for ip, order in catalogue.exit_circuits.items()}, with_files)
    for key, circuit in catalogue.circuits.items():
        for f in circuit.files:
            test.assertIs(catalogue.entries[f.key][key], f)
    test.assertEqual(sum(len(v) for v in catalogue.entries.values()),
                     sum(len(c.files) for c in catalogue.circuits.values()))


class AvoidTests(ErrorCase, unittest.SynchronousTestCase):
    def setUp(self):
        self.cat, _ = make_catalogue()
        self.a, self.b = join(self.cat, A, ["f"]), join(self.cat, B, ["f"])
        join(self.cat, C, ["f"])
        join(self.cat, REQUESTER, ["f"])  # the requester's own copy counts for nothing
        self.cat.start_transfer(self.a, "t-a", 5)
        self.cat.start_transfer(self.b, "t-b", 5)
        self.cat.end_transfer(self.a, "t-a")
        self.cat.end_transfer(self.b, "t-b")  # idle again: only avoid keeps them out

    def test_an_avoided_source_is_not_chosen(self):
        chosen = {self.cat.choose_source(swarm_request("f", avoid=["t-a"]), REQUESTER)[0].key for _ in range(40)}
        self.assertEqual(chosen, {B, C})
        for _ in range(20):
            self.assertEqual(self.cat.choose_source(swarm_request("f", avoid=["t-a", "t-b", "t-?"]), REQUESTER)[0].key,
                             C)

    def test_every_other_source_avoided_is_no_source_with_its_own_detail(self):
        self.cat.start_transfer(self.cat.circuits[C], "t-c", 5)
        e = self.assertMessageError("no_source", self.cat.choose_source,
                                    swarm_request("f", avoid=["t-a", "t-b", "t-c"]), REQUESTER)
        self.assertEqual(e.detail, "every other source of that file is already serving this download")
        # Excluded and avoided together: the download has every source not excluded.
        e = self.assertMessageError("no_source", self.cat.choose_source,
                                    swarm_request("f", exclude=["t-a"], avoid=["t-b", "t-c"]), REQUESTER)
        self.assertEqual(e.detail, "every other source of that file is already serving this download")
        # All excluded, whatever is avoided as well: nothing left to ask, the excluded detail.
        e = self.assertMessageError("no_source", self.cat.choose_source,
                                    swarm_request("f", exclude=["t-a", "t-b", "t-c"], avoid=["t-a"]), REQUESTER)
        self.assertEqual(e.detail, "every other source of that file was excluded")

    def test_avoid_spans_the_entries_of_a_name(self):
        # The avoided circuit is avoided in every entry: another entry's source is chosen.
        join(self.cat, B, ["f", {"name": "f", "size": 3, "sha256": SHA_A}])
        for _ in range(10):
            circuit, shared, _ = self.cat.choose_source(swarm_request("f", SHA_A, avoid=["t-c"]), REQUESTER)
            self.assertEqual((circuit.key, shared.sha256), (B, SHA_A))
        self.assertMessageError("no_source", self.cat.choose_source, swarm_request("f", SHA_A, avoid=["t-b"]),
                                REQUESTER)


class FairRankingTests(unittest.SynchronousTestCase):
    def test_many_circuits_through_one_exit_do_not_win_a_name(self):
        cat, _ = make_catalogue()
        for n in range(10):  # one sharer, ten circuits, one exit
            join(cat, circuit_on(EXIT_1, n), [{"name": "f", "size": 1, "sha256": SHA_A}])
        join(cat, B, [{"name": "f", "size": 2, "sha256": SHA_B}])  # two sharers through two exits
        join(cat, C, [{"name": "f", "size": 2, "sha256": SHA_B}])
        self.assertEqual(entry(cat, "f", SHA_A)["sources"], 10)  # the listing still counts circuits
        for _ in range(30):
            circuit, shared, _ = cat.choose_source(swarm_request("f"), REQUESTER)
            self.assertEqual(shared.sha256, SHA_B)
            self.assertIn(circuit.key, (B, C))
        # With its sha256 the many-circuit entry is still there to be asked for.
        self.assertEqual(cat.choose_source(swarm_request("f", SHA_A), REQUESTER)[1].sha256, SHA_A)

    def test_then_the_most_circuits(self):
        cat, _ = make_catalogue()
        join(cat, A, [{"name": "f", "sha256": SHA_A}])
        join(cat, B, [{"name": "f", "sha256": SHA_A}])
        join(cat, circuit_on(EXIT_1, 7), [{"name": "f", "sha256": SHA_B}])
        join(cat, circuit_on(EXIT_2, 7), [{"name": "f", "sha256": SHA_B}])
        join(cat, circuit_on(EXIT_2, 8), [{"name": "f", "sha256": SHA_B}])  # two exits, three circuits
        for _ in range(20):
            self.assertEqual(cat.choose_source(swarm_request("f"), REQUESTER)[1].sha256, SHA_B)

    def test_exits_counted_among_usable_sources_only(self):
        cat, _ = make_catalogue()
        join(cat, A, [{"name": "f", "sha256": SHA_A}])
        join(cat, (EXIT_2, CID_4), [{"name": "f", "sha256": SHA_A}])  # the requester's own circuit
        join(cat, B, [{"name": "f", "sha256": SHA_B}])
        join(cat, C, [{"name": "f", "sha256": SHA_B}])
        for _ in range(20):
            self.assertEqual(cat.choose_source(swarm_request("f"), (EXIT_2, CID_4))[1].sha256, SHA_B)
        b = cat.circuits[B]
        cat.start_transfer(b, "t-b", 1)  # avoided below: SHA_B is down to one exit and one circuit, as SHA_A
        chosen = {cat.choose_source(swarm_request("f", avoid=["t-b"]), (EXIT_2, CID_4))[1].sha256 for _ in range(60)}
        self.assertEqual(chosen, {SHA_A, SHA_B})  # one exit and one circuit each: ties go at random

    def test_a_sealed_root_entry_still_ranks_first_with_a_key(self):
        cat, _ = make_catalogue()
        join(cat, A, [with_root(name="f")])  # one sealed source through one exit
        for n, exit_ip in enumerate((EXIT_2, EXIT_3, EXIT_4)):
            join(cat, circuit_on(exit_ip, n), [{"name": "f", "size": 5, "sha256": SHA_A}])
        for _ in range(10):
            circuit, shared, e2e = cat.choose_source(swarm_request("f", key=KEY), D, is_sealed=sealed(A, D))
            self.assertEqual((circuit.key, shared.root, e2e), (A, ROOT, True))
        self.assertIsNone(cat.choose_source(swarm_request("f"), D, is_sealed=sealed(A, D))[1].root)

    def test_entry_ties_drawn_the_same_from_the_same_seed(self):
        draws = []
        for _ in range(2):
            cat, _ = make_catalogue(seed=5)
            join(cat, A, [{"name": "f", "sha256": SHA_A}])
            join(cat, B, [{"name": "f", "sha256": SHA_B}])
            draws.append([cat.choose_source(swarm_request("f"), REQUESTER)[1].sha256 for _ in range(40)])
        self.assertEqual(draws[0], draws[1])
        self.assertEqual(set(draws[0]), {SHA_A, SHA_B})


class LoadByExitTests(unittest.SynchronousTestCase):
    def test_a_busy_exit_is_passed_over_for_an_idle_one(self):
        cat, _ = make_catalogue()
        a = join(cat, A, ["f"])
        join(cat, D, ["f"])          # through EXIT_1 as A: no transfer of its own, but its exit has one
        join(cat, B, ["f"])
        cat.start_transfer(a, "t-a", 1)
        for _ in range(30):
            self.assertEqual(cat.choose_source(request("f"), REQUESTER)[0].key, B)
        self.assertEqual((cat.transfers.of_exit(EXIT_1), cat.transfers.of_exit(EXIT_2)), (1, 0))

    def test_on_one_exit_the_circuit_with_fewer_transfers(self):
        cat, _ = make_catalogue()
        a, d = join(cat, A, ["f"]), join(cat, D, ["f"])
        cat.start_transfer(a, "t1", 1)
        cat.start_transfer(a, "t2", 1)
        cat.start_transfer(d, "t3", 1)
        for _ in range(20):
            self.assertEqual(cat.choose_source(request("f"), REQUESTER)[0].key, D)

    def test_an_exits_load_ends_with_the_estimate_an_end_or_the_circuit(self):
        cat, clock = make_catalogue()
        a, d, b = join(cat, A, ["f"]), join(cat, D, ["f"]), join(cat, B, ["f"])
        cat.start_transfer(a, "t1", 0)                   # 60 s
        cat.start_transfer(d, "t2", 30 * 1024 * 1024)    # 90 s
        cat.start_transfer(d, "t3", 0)
        cat.start_transfer(b, "t4", 0)
        self.assertEqual((cat.transfers.of_exit(EXIT_1), cat.transfers_under_way()), (3, 4))
        cat.end_transfer(d, "t3")
        cat.end_transfer(d, "t3")  # twice: counted off once
        self.assertEqual(cat.transfers.of_exit(EXIT_1), 2)
        clock.advance(60)
        self.assertEqual((cat.transfers.of_exit(EXIT_1), cat.transfers.of_exit(EXIT_2)), (1, 0))
        cat.forget(D)
        self.assertEqual((cat.transfers.of_exit(EXIT_1), cat.transfers_under_way()), (0, 0))
        self.assertEqual(cat.transfers._under_way, {})

    def test_the_heap_of_ends_is_compacted(self):
        cat, _ = make_catalogue()
        a = join(cat, A, ["f"])
        for i in range(3000):
            cat.start_transfer(a, f"t{i}", 0)
            cat.end_transfer(a, f"t{i}")
        self.assertLessEqual(len(cat.transfers._ending), 1024 + 1)
        self.assertEqual(cat.transfers.of_exit(EXIT_1), 0)


class ExitQuotaTests(ErrorCase, unittest.SynchronousTestCase):
    def test_default_is_a_quarter_of_the_catalogue(self):
        self.assertEqual(make_catalogue(max_entries=1000)[0].max_entries_per_exit, 250)
        self.assertEqual(make_catalogue(max_entries=3)[0].max_entries_per_exit, 1)
        self.assertEqual(make_catalogue(max_entries=1000, max_entries_per_exit=7)[0].max_entries_per_exit, 7)

    def test_an_ls_past_the_exits_quota_is_refused_and_changes_nothing(self):
        cat, _ = make_catalogue(max_entries_per_exit=3)
        first = join(cat, A, ["a", "b"])
        join(cat, B, ["z"])
        before = (dict(cat.entries), dict(cat.exit_entries), first.files, set(cat.circuits))
        e = self.assertMessageError("busy", join, cat, D, ["c", "d"])  # another circuit, the same exit
        self.assertEqual(e.detail, "the circuits through this exit hold as many catalogue entries as one exit may")
        self.assertMessageError("busy", join, cat, A, ["a", "b", "c", "d"])
        self.assertEqual((dict(cat.entries), dict(cat.exit_entries), first.files), before[:3])
        join(cat, D, ["c"])  # up to the quota
        join(cat, A, ["a", "d"])  # b, held by A alone, makes room for d
        self.assertEqual(cat.exit_entries, {EXIT_1: 3, EXIT_2: 1})
        check_bookkeeping(self, cat)

    def test_entries_shared_through_another_exit_do_not_count(self):
        cat, _ = make_catalogue(max_entries_per_exit=2)
        join(cat, B, ["p", "q", "r"][:2])
        join(cat, C, ["r"])
        join(cat, A, ["p", "q", "r", "own1", "own2"])  # three shared, two its own
        self.assertEqual(cat.exit_entries, {EXIT_1: 2})
        self.assertMessageError("busy", join, cat, D, ["own3"])
        check_bookkeeping(self, cat)

    def test_an_exit_left_holding_entries_alone_is_not_cut_but_adds_nothing_more(self):
        cat, _ = make_catalogue(max_entries_per_exit=2)
        join(cat, A, ["a", "b", "c"][:2])
        join(cat, B, ["c", "d"])
        join(cat, A, ["a", "b", "c"])  # c is shared with B: still two alone
        cat.forget(B)                  # c is A's alone now: three, over the quota, and kept
        self.assertEqual(cat.exit_entries, {EXIT_1: 3})
        join(cat, A, ["a", "b"])        # adds nothing: accepted
        join(cat, A, ["a", "b", "c"][:2])
        self.assertMessageError("busy", join, cat, D, ["x"])
        check_bookkeeping(self, cat)


def fill(catalogue, key, prefix, n):
    return join(catalogue, key, [f"{prefix}{i}" for i in range(n)])


class EvictionTests(ErrorCase, unittest.SynchronousTestCase):
    def test_an_exit_below_its_share_evicts_from_the_exit_holding_the_most(self):
        cat, clock = make_catalogue(max_entries=10, max_entries_per_exit=10)
        old = fill(cat, A, "old", 4)              # EXIT_1's circuit that announced least recently
        clock.advance(1)
        fill(cat, D, "new", 4)                    # EXIT_1 holds 8
        join(cat, B, ["b0", "b1"])                # EXIT_2 holds 2: full
        join(cat, C, ["c0", "c1", "c2"])          # EXIT_3 would hold 3 of a share of 10 // 3
        self.assertEqual(len(cat.entries), 10)
        self.assertEqual(cat.exit_entries, {EXIT_1: 5, EXIT_2: 2, EXIT_3: 3})
        self.assertEqual([f.name for f in old.files], ["old3"])  # its first three went
        self.assertEqual(cat.evicted, 3)
        self.assertNotIn("old0", cat.names)
        self.assertEqual(len(cat.circuits[D].files), 4)
        check_bookkeeping(self, cat)

    def test_the_richest_exit_gives_up_no_more_than_its_excess(self):
        cat, _ = make_catalogue(max_entries=12, max_entries_per_exit=12)
        fill(cat, A, "a", 8)
        fill(cat, B, "b", 4)
        fill(cat, C, "c", 2)           # share 12 // 3 = 4: EXIT_1 gives up two, down to 6
        self.assertEqual(cat.exit_entries, {EXIT_1: 6, EXIT_2: 4, EXIT_3: 2})
        fill(cat, (EXIT_4, CID_1), "d", 3)   # share 3: EXIT_1 gives up three more, EXIT_2 none
        self.assertEqual(cat.exit_entries, {EXIT_1: 3, EXIT_2: 4, EXIT_3: 2, EXIT_4: 3})
        fill(cat, (EXIT_5, CID_1), "e", 2)   # share 2: one at a time from the richest (ties: lowest IP)
        self.assertEqual(cat.exit_entries, {EXIT_1: 2, EXIT_2: 3, EXIT_3: 2, EXIT_4: 3, EXIT_5: 2})
        check_bookkeeping(self, cat)

    def test_only_entries_held_by_one_circuit_alone_go(self):
        cat, _ = make_catalogue(max_entries=5, max_entries_per_exit=5)
        join(cat, A, ["shared", "twice", "alone0", "alone1"])
        join(cat, D, ["twice"])              # one exit, two circuits: not evicted with one of them
        join(cat, B, ["shared", "b0"])       # full: shared (two exits), twice, alone0, alone1, b0
        join(cat, C, ["c0"])                 # EXIT_3 evicts one of EXIT_1's three (share 5 // 3)
        self.assertEqual(sorted(f.name for f in cat.circuits[A].files), ["alone1", "shared", "twice"])
        check_bookkeeping(self, cat)

    def test_an_entry_the_ls_announces_is_not_evicted_to_make_room(self):
        cat, _ = make_catalogue(max_entries=3, max_entries_per_exit=3)
        join(cat, A, ["a0", "a1", "a2"])
        join(cat, B, ["a0", "new"])  # a0, first of A's, is in B's ls: a1 goes, not a0
        self.assertEqual(sorted(cat.names), ["a0", "a2", "new"])
        self.assertEqual(cat.entries[("a0", None, None)].keys(), {A, B})
        check_bookkeeping(self, cat)

    def test_an_exit_over_its_share_is_refused_and_nothing_changes(self):
        cat, _ = make_catalogue(max_entries=6, max_entries_per_exit=6)
        fill(cat, A, "a", 3)
        fill(cat, B, "b", 3)
        before = ({k: dict(v) for k, v in cat.entries.items()}, dict(cat.exit_entries), cat.circuits[A].files)
        e = self.assertMessageError("busy", fill, cat, D, "more", 1)
        self.assertEqual(e.detail, "the tracker's catalogue is full, and the circuits through this exit hold "
                                   "their fair share of it")
        e = self.assertMessageError("busy", fill, cat, C, "c", 4)  # 4 > 6 // 3
        self.assertEqual(({k: dict(v) for k, v in cat.entries.items()}, dict(cat.exit_entries),
                          cat.circuits[A].files), before)
        self.assertNotIn(C, {k for k, c in cat.circuits.items() if c.files})
        self.assertEqual(cat.evicted, 0)

    def test_no_exit_over_its_share_is_a_refusal(self):
        cat, _ = make_catalogue(max_entries=4, max_entries_per_exit=4)
        for key in (A, B):
            join(cat, key, ["s0", "s1", "s2"])  # shared by two exits: nobody's alone
        join(cat, A, ["s0", "s1", "s2", "a"])
        e = self.assertMessageError("busy", join, cat, C, ["c"])
        self.assertEqual(e.detail, "the tracker's catalogue is full, and no exit holds more than its fair share of it")
        check_bookkeeping(self, cat)

    def test_the_search_for_room_is_bounded(self):
        self.patch(catalogue_module, "MAX_EVICTION_SCAN", 3)
        cat, _ = make_catalogue(max_entries=8, max_entries_per_exit=8)
        join(cat, B, ["s0", "s1", "s2"])
        join(cat, A, ["s0", "s1", "s2", "a0", "a1", "a2", "a3", "a4"])  # its own five after three shared
        e = self.assertMessageError("busy", join, cat, C, ["c0"])    # share 4: one of A's five would go
        self.assertEqual(e.detail, "the tracker's catalogue is full")
        self.assertIn("a0", cat.names)
        self.patch(catalogue_module, "MAX_EVICTION_SCAN", 4)
        join(cat, C, ["c0"])
        self.assertNotIn("a0", cat.names)

    def test_an_evicted_circuit_announces_again_only_within_its_share(self):
        cat, _ = make_catalogue(max_entries=4, max_entries_per_exit=4)
        fill(cat, A, "a", 4)
        fill(cat, B, "b", 2)
        self.assertEqual(cat.exit_entries, {EXIT_1: 2, EXIT_2: 2})
        e = self.assertMessageError("busy", fill, cat, A, "a", 4)
        self.assertIn("fair share", e.detail)
        fill(cat, A, "a", 2)
        check_bookkeeping(self, cat)


class BookkeepingTests(unittest.SynchronousTestCase):
    def test_random_announcements_and_departures_keep_the_counts_right(self):
        rng = random.Random(16)
        cat, clock = make_catalogue(max_entries=40, max_entries_per_exit=15, max_files=12)
        keys = [circuit_on(ip, n) for ip in (EXIT_1, EXIT_2, EXIT_3, EXIT_4) for n in range(4)]
        names = [f"n{i}" for i in range(60)]
        outcomes = set()
        for _ in range(1500):
            key = rng.choice(keys)
            clock.advance(1)
            if rng.random() < 0.1:
                cat.forget(key)
                outcomes.add("forgot")
            else:
                files = rng.sample(names, rng.randint(0, 12))
                evicted = cat.evicted
                try:
                    join(cat, key, files)
                    outcomes.add("evicted" if cat.evicted > evicted else "joined")
                except MessageError as e:
                    outcomes.add(e.detail)
            check_bookkeeping(self, cat)
            self.assertLessEqual(len(cat.entries), 40)
        self.assertGreaterEqual(len(outcomes), 5, outcomes)  # every path was taken


class CatalogueNeverWalked(dict):
    """``Catalogue.entries`` that fails a test which walks the whole catalogue."""

    def __iter__(self):
        raise AssertionError("the whole catalogue was walked")

    keys = values = items = __iter__


class AnnounceCostTests(ErrorCase, unittest.SynchronousTestCase):
    def test_announcing_forgetting_and_evicting_never_walk_the_catalogue(self):
        cat, _ = make_catalogue(max_entries=6, max_entries_per_exit=6)
        cat.entries = CatalogueNeverWalked()
        fill(cat, A, "a", 5)
        join(cat, B, ["a0", "b0"])
        join(cat, C, ["c0", "c1"])               # full: a1 and a2 go (a0 has two sources)
        cat.forget(B)                            # b0 goes; a0 is A's alone now
        join(cat, (EXIT_4, CID_4), ["d0", "d1"])  # full again: a0 goes
        self.assertMessageError("busy", join, cat, D, ["a1"])
        cat.choose_source(request("c0"), A)
        self.assertEqual(cat.evicted, 3)
        self.assertEqual([f.name for f in cat.circuits[A].files], ["a3", "a4"])
