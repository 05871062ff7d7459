"""Transfer bookkeeping with no network I/O (PROTOCOL.md §8).

ChunkMap and its record (resume), wanted_indexes (the ``chunks`` of a
request) and resolve_shared (the sharer's name check; the unique
destination is tested in test_files). Files live in a fresh temporary directory per test.
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.trial import unittest

from onion_twisted.protocol.messages import MessageError
from onion_twisted.protocol.chunks import (MIN_BLOCK_CHUNKS, ChunkClaims, ChunkMap, index_ranges, ranges_of,
                                           wanted_indexes)
from onion_twisted.peer.sharing import resolve_shared


class ChunkMapTests(unittest.SynchronousTestCase):
    def test_count_and_chunk_lengths(self):
        m = ChunkMap(10, 4)
        self.assertEqual(m.count, 3)
        self.assertEqual([m.chunk_length(i) for i in range(3)], [4, 4, 2])
        self.assertEqual(ChunkMap(8, 4).count, 2)
        self.assertEqual(ChunkMap(8, 4).chunk_length(1), 4)
        self.assertEqual(ChunkMap(1, 4).count, 1)
        self.assertRaises(IndexError, m.chunk_length, 3)
        self.assertRaises(IndexError, m.chunk_length, -1)

    def test_empty_file_is_complete_from_the_start(self):
        m = ChunkMap(0, 4)
        self.assertEqual(m.count, 0)
        self.assertTrue(m.complete)
        self.assertEqual(m.missing_ranges(), [])
        self.assertEqual(m.bytes_received, 0)

    def test_bad_sizes(self):
        self.assertRaises(ValueError, ChunkMap, -1, 4)
        self.assertRaises(ValueError, ChunkMap, 10, 0)
        self.assertRaises(ValueError, ChunkMap, 10, 4, b"\x00")

    def test_mark_and_duplicates(self):
        m = ChunkMap(10, 4)
        self.assertTrue(m.mark(1))
        self.assertFalse(m.mark(1))
        self.assertEqual(m.have, 1)
        self.assertIn(1, m)
        self.assertNotIn(0, m)
        self.assertNotIn(7, m)
        self.assertNotIn(-1, m)
        self.assertFalse(m.complete)
        m.mark(0)
        m.mark(2)
        self.assertTrue(m.complete)

    def test_mark_out_of_range_is_refused(self):
        m = ChunkMap(10, 4)
        self.assertRaises(IndexError, m.mark, 3)
        self.assertRaises(IndexError, m.mark, -1)
        self.assertEqual(m.have, 0)
        self.assertNotIn(2, m)

    def test_missing_ranges(self):
        m = ChunkMap(100, 10)
        self.assertEqual(m.missing_ranges(), [[0, 10]])
        for i in (0, 1, 4, 9):
            m.mark(i)
        self.assertEqual(m.missing_ranges(), [[2, 4], [5, 9]])
        for i in (2, 3, 5, 6, 7, 8):
            m.mark(i)
        self.assertEqual(m.missing_ranges(), [])

    def test_bytes_received(self):
        m = ChunkMap(10, 4)
        self.assertEqual(m.bytes_received, 0)
        m.mark(2)  # the short last chunk
        self.assertEqual(m.bytes_received, 2)
        m.mark(0)
        self.assertEqual(m.bytes_received, 6)
        m.mark(1)
        self.assertEqual(m.bytes_received, 10)
        other = ChunkMap(10, 4)
        other.mark(1)
        self.assertEqual(other.bytes_received, 4)

    def test_record_round_trip(self):
        m = ChunkMap(1000, 64)
        for i in (0, 1, 2, 7, 15):
            m.mark(i)
        record = m.to_record()
        self.assertEqual(record, {"size": 1000, "chunk_size": 64, "received": [[0, 3], [7, 8], [15, 16]]})
        again = ChunkMap.from_record(record)
        self.assertEqual(again.bits, m.bits)
        self.assertEqual(again.have, 5)
        self.assertEqual(again.missing_ranges(), m.missing_ranges())
        self.assertEqual(again.bytes_received, m.bytes_received)

    def test_bad_records(self):
        good = {"size": 100, "chunk_size": 10, "received": [[0, 2]]}
        self.assertEqual(ChunkMap.from_record(good).have, 2)
        bad = [
            [],
            {"chunk_size": 10, "received": []},
            {"size": 100, "received": []},
            {"size": 100, "chunk_size": 10},
            {"size": -1, "chunk_size": 10, "received": []},
            {"size": 100, "chunk_size": 0, "received": []},
            {"size": "100", "chunk_size": 10, "received": []},
            {"size": 100, "chunk_size": True, "received": []},
            {"size": 100, "chunk_size": 10, "received": {}},
            {"size": 100, "chunk_size": 10, "received": [[0, 11]]},
            {"size": 100, "chunk_size": 10, "received": [[-1, 2]]},
            {"size": 100, "chunk_size": 10, "received": [[3, 3]]},
            {"size": 100, "chunk_size": 10, "received": [[5, 2]]},
            {"size": 100, "chunk_size": 10, "received": [[1]]},
            {"size": 100, "chunk_size": 10, "received": [[0, 1, 2]]},
            {"size": 100, "chunk_size": 10, "received": [["0", 1]]},
            {"size": 100, "chunk_size": 10, "received": [[0.0, 1]]},
            {"size": 100, "chunk_size": 10, "received": [5]},
        ]
        for record in bad:
            with self.subTest(record=record):
                self.assertRaises(ValueError, ChunkMap.from_record, record)

    def test_ranges_of(self):
        self.assertEqual(ranges_of(b""), [])
        self.assertEqual(ranges_of(b"\x01\x01\x00\x01"), [[0, 2], [3, 4]])
        self.assertEqual(ranges_of([0, 0]), [])


class WantedIndexesTests(unittest.SynchronousTestCase):
    def test_all_chunks_without_ranges(self):
        self.assertEqual(list(wanted_indexes(None, 4)), [0, 1, 2, 3])
        self.assertEqual(list(wanted_indexes(None, 0)), [])

    def test_ranges_in_order(self):
        self.assertEqual(list(wanted_indexes([[1, 3], [5, 6]], 10)), [1, 2, 5])

    def test_unsorted_and_overlapping_ranges_yield_each_index_once_in_order(self):
        self.assertEqual(list(wanted_indexes([[6, 9], [0, 2], [1, 4], [2, 3], [7, 8]], 10)),
                         [0, 1, 2, 3, 6, 7, 8])

    def test_ranges_past_the_end_are_clipped(self):
        self.assertEqual(list(wanted_indexes([[2, 100], [50, 60]], 4)), [2, 3])
        self.assertEqual(list(wanted_indexes([[0, 1]], 0)), [])

    def test_empty_range_list_wants_nothing(self):
        self.assertEqual(list(wanted_indexes([], 5)), [])


class ChunkClaimsTests(unittest.SynchronousTestCase):
    """Which missing chunks each source of a download is asked for (swarming)."""

    def setUp(self):
        self.map = ChunkMap(40 * 1024, 1024)  # 40 chunks
        self.claims = ChunkClaims(self.map.count)

    def test_one_source_gets_every_missing_chunk(self):
        for i in (0, 1, 5):
            self.map.mark(i)
        self.assertEqual(self.claims.pick(self.map, 1, endgame=False), [i for i in range(40) if i not in (0, 1, 5)])

    def test_several_sources_get_blocks_that_shrink_and_never_overlap(self):
        taken = []
        while (block := self.claims.pick(self.map, 2, endgame=False)) is not None:
            self.assertTrue(set(block).isdisjoint(taken), block)
            self.claims.take(block)
            taken += block
        self.assertEqual(sorted(taken), list(range(40)))
        sizes = [len(b) for b in _blocks(ChunkClaims(200), ChunkMap(200 * 1024, 1024), 2)]
        self.assertEqual(sizes[0], 50)               # a quarter of what is left, with two sources
        self.assertEqual(sizes, sorted(sizes, reverse=True))
        self.assertEqual(sum(sizes), 200)
        left = 200
        for n in sizes:  # a transfer costs two chunks: no small block while each source can have 16
            self.assertEqual(n, -(-left // 2) if left < 2 * MIN_BLOCK_CHUNKS else max(n, MIN_BLOCK_CHUNKS), sizes)
            left -= n

    def test_endgame_asks_for_a_few_chunks_one_source_is_bringing(self):
        self.claims.take(range(40))
        for i in range(37):
            self.map.mark(i)
        self.assertIsNone(self.claims.pick(self.map, 2, endgame=False))
        self.assertEqual(self.claims.pick(self.map, 2, endgame=True), [38, 39])  # the last first
        self.claims.take([38, 39])
        self.assertEqual(self.claims.pick(self.map, 2, endgame=True), [37])  # never a third copy
        self.claims.take([37])
        self.assertIsNone(self.claims.pick(self.map, 2, endgame=True))

    def test_the_endgame_copies_only_chunks_said_to_be_behind(self):
        self.claims.take(range(40))
        for i in range(36):
            self.map.mark(i)
        asked = []
        self.assertEqual(self.claims.pick(self.map, 2, endgame=True, behind=lambda: asked.append(1) or {36, 38}),
                         [36, 38])  # 39 and 37 are coming soon enough from their source
        # Chunks owed, none behind: nothing now, and not None (the slot looks again later).
        self.assertEqual(self.claims.pick(self.map, 2, endgame=True, behind=set), [])
        self.assertEqual(len(asked), 1)
        self.claims.take(range(36, 40))
        self.assertIsNone(self.claims.pick(self.map, 2, endgame=True, behind=set))  # every one asked twice
        self.assertEqual(self.claims.pick(self.map, 2, endgame=False, behind=lambda: self.fail("not the endgame")),
                         None)

    def test_given_back_chunks_are_free_again(self):
        block = self.claims.pick(self.map, 4, endgame=False)
        self.claims.take(block)
        self.claims.give_back(block)
        self.assertEqual(self.claims.pick(self.map, 4, endgame=False), block)
        self.claims.give_back([10 ** 6])  # an index of a map since replaced: ignored

    def test_index_ranges(self):
        self.assertEqual(index_ranges([]), [])
        self.assertEqual(index_ranges([0, 1, 2, 5, 7, 8]), [[0, 3], [5, 6], [7, 9]])


def _blocks(claims: ChunkClaims, chunk_map: ChunkMap, sources: int):
    while (block := claims.pick(chunk_map, sources, endgame=False)) is not None:
        claims.take(block)
        yield block


class ResolveSharedTests(unittest.SynchronousTestCase):
    def setUp(self):
        base = Path(self.mktemp()).absolute()
        self.share = base / "share"
        self.share.mkdir(parents=True)
        self.outside = base / "secret"
        self.outside.write_bytes(b"secret")
        (self.share / "a.txt").write_bytes(b"hello")
        (self.share / "sub").mkdir()
        (self.share / "sub" / "b").write_bytes(b"b")
        os.symlink(self.outside, self.share / "out-link")
        os.symlink(self.share / "a.txt", self.share / "in-link")
        os.symlink("sub/b", self.share / "sub-link")
        os.mkfifo(self.share / "fifo")
        self.announced = {"a.txt", "sub", "out-link", "in-link", "sub-link", "fifo", "gone",
                          "../x", "a/b", "/etc/passwd", ".", "..", "../secret"}

    def assertRefused(self, name, announced=None):
        e = self.assertRaises(MessageError, resolve_shared, self.share,
                              name, self.announced if announced is None else announced)
        self.assertEqual(e.error, "refused")
        return e

    def test_a_regular_announced_file_resolves(self):
        self.assertEqual(resolve_shared(self.share, "a.txt", self.announced), (self.share / "a.txt").resolve())

    def test_names_that_climb_or_have_separators_are_refused(self):
        for name in ("../x", "a/b", "/etc/passwd", ".", "..", "../secret", "..\\x", "a\x00", "", None, 3):
            with self.subTest(name=name):
                self.assertRefused(name)

    def test_a_symlink_out_of_the_share_is_refused(self):
        e = self.assertRefused("out-link")
        self.assertIn("outside", e.detail)

    def test_a_directory_is_refused(self):
        e = self.assertRefused("sub")
        self.assertIn("not a regular file", e.detail)

    def test_a_fifo_is_refused(self):
        e = self.assertRefused("fifo")
        self.assertIn("not a regular file", e.detail)

    def test_a_name_never_announced_is_refused(self):
        e = self.assertRefused("a.txt", announced={"other"})
        self.assertIn("does not share", e.detail)

    def test_an_announced_name_that_is_gone_is_refused(self):
        e = self.assertRefused("gone")
        self.assertIn("no such file", e.detail)

    def test_a_symlink_to_a_file_in_the_share_is_served_as_its_target(self):
        self.assertEqual(resolve_shared(self.share, "in-link", self.announced), (self.share / "a.txt").resolve())

    def test_a_symlink_into_a_subdirectory_is_refused(self):
        e = self.assertRefused("sub-link")
        self.assertIn("outside", e.detail)
