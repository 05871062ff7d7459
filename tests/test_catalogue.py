"""The tracker's catalogue with no I/O (PROTOCOL.md §8).

Circuits are (exit IP, CID); time is a ``task.Clock``; randomness a seeded
``random.Random``.
"""

from __future__ import annotations

import random

from twisted.internet import task
from twisted.trial import unittest

from onion_twisted.protocol import wire
from onion_twisted.tracker.catalogue import (DEFAULT_CHUNK, MAX_CHUNK, MIN_CHUNK, MAX_RANGES, Catalogue, FileRequest,
                                     MessageError, SharedFile, check_name, check_sha256, parse_files,
                                     parse_request)

from .tracker_fakes import NOW, SHA_A, SHA_B, SHA_C

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


class ErrorCase:
    def assertMessageError(self, error, f, *args):
        e = self.assertRaises(MessageError, f, *args)
        self.assertEqual(e.error, error)
        self.assertEqual(e.reply(), {"type": "error", "error": error, "detail": e.detail})
        return e


class NameTests(ErrorCase, unittest.SynchronousTestCase):
    def test_plain_names_accepted(self):
        for name in ("a.txt", "résumé.pdf", "..hidden", "a..b", ".profile", "x" * 255, "é" * 127):
            self.assertEqual(check_name(name), name)

    def test_path_separators_and_dots_refused(self):
        for name in ("a/b", "/etc", "dir/", "a\\b", ".", "..", "../x"):
            self.assertMessageError("bad_request", check_name, name)

    def test_nul_and_control_characters_refused(self):
        for name in ("a\x00b", "\x00", "a\nb", "tab\there", "\x1f"):
            self.assertMessageError("bad_request", check_name, name)

    def test_look_alike_and_invisible_characters_refused(self):
        for char in ("\x7f", "\x85", "\x9f", "\u202e", "\u202a", "\u2066", "\u2069", "\u200b", "\u200c",
                     "\u200d", "\u2060", "\ufeff", "\u200e", "\u200f", "\u061c"):
            e = self.assertMessageError("bad_request", check_name, f"invoice{char}gpj.exe")
            self.assertIn("invisible", e.detail)

    def test_names_are_normalised_to_nfc(self):
        decomposed = "re\u0301sume\u0301.pdf"  # e + combining acute
        self.assertEqual(check_name(decomposed), "r\u00e9sum\u00e9.pdf")
        self.assertEqual(check_name("r\u00e9sum\u00e9.pdf"), "r\u00e9sum\u00e9.pdf")
        # Both spellings announced by two circuits are one catalogue entry.
        files = parse_files([decomposed, "r\u00e9sum\u00e9.pdf"], 10)
        self.assertEqual([f.name for f in files], ["r\u00e9sum\u00e9.pdf"])

    def test_too_long_refused_in_bytes(self):
        self.assertMessageError("bad_request", check_name, "x" * 256)
        self.assertMessageError("bad_request", check_name, "é" * 128)  # 256 UTF-8 bytes

    def test_empty_or_not_a_string_refused(self):
        for name in ("", None, 3, ["a"], {"name": "a"}):
            self.assertMessageError("bad_request", check_name, name)

    def test_sha256_must_be_64_lowercase_hex(self):
        self.assertEqual(check_sha256(SHA_A), SHA_A)
        for bad in ("A" * 64, "a" * 63, "a" * 65, "g" * 64, "", None, 5, " " + "a" * 63):
            self.assertMessageError("bad_request", check_sha256, bad)


class ParseFilesTests(ErrorCase, unittest.SynchronousTestCase):
    def test_both_forms(self):
        files = parse_files(["a", {"name": "b", "size": 3, "sha256": SHA_A}, {"name": "c"}], 10)
        self.assertEqual(files, (SharedFile("a", None, None), SharedFile("b", 3, SHA_A),
                                 SharedFile("c", None, None)))

    def test_duplicates_collapse(self):
        files = parse_files(["a", "a", {"name": "a", "sha256": SHA_A}, {"name": "a", "size": 1, "sha256": SHA_A}], 10)
        self.assertEqual(len(files), 2)
        self.assertEqual({f.key for f in files}, {("a", None), ("a", SHA_A)})

    def test_bad_names_refused(self):
        for bad in ("a/b", "..", ".", "a\x00", "x" * 256, {"name": "../etc"}, {"name": "a/b", "sha256": SHA_A},
                    {"size": 3}):
            self.assertMessageError("bad_request", parse_files, ["ok", bad], 10)

    def test_bad_sha256_refused(self):
        self.assertMessageError("bad_request", parse_files, [{"name": "a", "sha256": "ABC"}], 10)
        self.assertMessageError("bad_request", parse_files, [{"name": "a", "sha256": "A" * 64}], 10)

    def test_bad_size_refused(self):
        for size in (-1, 1.5, True, "3", 2 ** 53 + 1, [1]):
            self.assertMessageError("bad_request", parse_files, [{"name": "a", "size": size}], 10)
        self.assertEqual(parse_files([{"name": "a", "size": 0}], 10)[0].size, 0)

    def test_too_many_files(self):
        self.assertEqual(len(parse_files([f"f{i}" for i in range(3)], 3)), 3)
        self.assertMessageError("too_many_files", parse_files, [f"f{i}" for i in range(4)], 3)

    def test_not_a_list_or_odd_elements(self):
        for files in (None, "a", {"a": 1}, 3):
            self.assertMessageError("bad_request", parse_files, files, 10)
        for element in (3, None, ["a"], True):
            self.assertMessageError("bad_request", parse_files, [element], 10)


class ParseRequestTests(ErrorCase, unittest.SynchronousTestCase):
    def test_defaults(self):
        self.assertEqual(parse_request({"file": "a"}), FileRequest("a", None, DEFAULT_CHUNK, None))
        self.assertEqual(parse_request({"file": "a", "chunk_size": None}).chunk_size, DEFAULT_CHUNK)

    def test_chunk_size_bounds(self):
        self.assertEqual(parse_request({"file": "a", "chunk_size": MIN_CHUNK}).chunk_size, 16 * 1024)
        self.assertEqual(parse_request({"file": "a", "chunk_size": MAX_CHUNK}).chunk_size, 4 * 1024 * 1024)
        for bad in (MIN_CHUNK - 1, MAX_CHUNK + 1, 0, -1, 65536.0, True, "65536"):
            self.assertMessageError("bad_request", parse_request, {"file": "a", "chunk_size": bad})

    def test_chunk_ranges(self):
        ok = parse_request({"file": "a", "sha256": SHA_A, "chunks": [[0, 1], [5, 9]]})
        self.assertEqual(ok, FileRequest("a", SHA_A, DEFAULT_CHUNK, [[0, 1], [5, 9]]))
        for bad in ([[1, 1]], [[2, 1]], [[-1, 3]], [[0, 1, 2]], [[0]], [0, 1], [["0", 1]], [[0, True]],
                    [[0, 1.5]], "0-1", {"0": 1}, [[0, 2 ** 53 + 1]]):
            self.assertMessageError("bad_request", parse_request, {"file": "a", "chunks": bad})

    def test_too_many_ranges(self):
        many = [[2 * i, 2 * i + 1] for i in range(MAX_RANGES + 1)]
        self.assertMessageError("bad_request", parse_request, {"file": "a", "chunks": many})

    def test_bad_file_or_sha256(self):
        for message in ({}, {"file": "a/b"}, {"file": ".."}, {"file": "a", "sha256": "x"},
                        {"file": "a", "sha256": SHA_A.upper()}):
            self.assertMessageError("bad_request", parse_request, message)


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
        self.assertEqual(cat.names["v"], {("v", SHA_B)})
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
            circuit, shared = cat.choose_source(request("a"), A)
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
            circuit, shared = cat.choose_source(request("a"), requester)
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
            _, shared = cat.choose_source(request("a"), D)
            self.assertEqual(shared.sha256, SHA_B)

    def test_with_sha256_that_entry(self):
        cat, _ = make_catalogue()
        join(cat, A, [{"name": "a", "size": 1, "sha256": SHA_A}])
        join(cat, B, [{"name": "a", "size": 2, "sha256": SHA_B}])
        join(cat, C, [{"name": "a", "size": 2, "sha256": SHA_B}])
        for _ in range(30):
            circuit, shared = cat.choose_source(request("a", SHA_A), D)
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
        cat, _ = make_catalogue(max_entries=3)
        circuit = join(cat, A, ["a", "b"])
        other = join(cat, B, ["c"])
        before = (dict(cat.entries), cat.listing(), circuit.files, other.files)
        self.assertMessageError("busy", join, cat, B, ["c", "d"])
        self.assertEqual((dict(cat.entries), cat.listing(), circuit.files, other.files), before)

    def test_max_entries_counts_only_new_entries(self):
        cat, _ = make_catalogue(max_entries=3)
        join(cat, A, ["a", "b"])
        join(cat, B, ["a", "b", "c"])  # a and b already listed: one new entry, three in all
        self.assertEqual(len(cat.entries), 3)
        self.assertEqual(entry(cat, "a", None)["sources"], 2)

    def test_full_catalogue_still_lets_a_circuit_replace_its_list(self):
        cat, _ = make_catalogue(max_entries=2)
        join(cat, A, ["a", "b"])
        join(cat, A, ["a", "c"])  # b, held by A alone, makes room for c
        self.assertEqual(set(cat.names), {"a", "c"})
        join(cat, B, ["a"])
        self.assertRaises(MessageError, join, cat, B, ["z"])  # a is still A's: no room
