"""The Merkle roots of PROTOCOL.md §13 (protocol/merkle.py), with no I/O but one temporary file.

Each expected root is written out here from bare hashlib, following the
rule and not the module: 256 KiB pieces (an empty file is one empty
piece), leaf = SHA-256(piece), the leaf row padded with 32 zero bytes to
a power of two, parent = SHA-256(left ‖ right).
"""

from __future__ import annotations

import hashlib

from twisted.trial import unittest

from onion_twisted.protocol import merkle
from onion_twisted.protocol.merkle import PIECE, ZERO_HASH, LeafRowError

MiB = 1024 * 1024


def H(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def pieces_of(count: int, last: int = PIECE) -> list[bytes]:
    """``count`` pieces, each with its own content (so a swap shows), the last ``last`` bytes long."""
    pieces = [bytes([i + 1]) * PIECE for i in range(count)]
    pieces[-1] = pieces[-1][:last]
    return pieces


def leaves_of(pieces) -> bytes:
    return b"".join(H(p) for p in pieces)


class RootTests(unittest.SynchronousTestCase):
    def assertRoot(self, data: bytes, expected: bytes, leaf_count: int):
        leaves = merkle.leaf_hashes(data)
        self.assertEqual(len(leaves), 32 * leaf_count)
        self.assertEqual(merkle.piece_count(len(data)), leaf_count)
        self.assertEqual(merkle.root_of(leaves), expected)
        self.assertEqual(merkle.root_hex(leaves), expected.hex())

    def test_empty_file_is_one_empty_piece(self):
        self.assertRoot(b"", H(b""), 1)

    def test_one_byte_is_its_own_leaf(self):
        self.assertRoot(b"x", H(b"x"), 1)

    def test_one_whole_piece_is_its_own_leaf(self):
        data = b"p" * PIECE
        self.assertRoot(data, H(data), 1)

    def test_one_piece_and_one_byte_are_two_leaves(self):
        data = b"p" * PIECE + b"q"
        self.assertRoot(data, H(H(data[:PIECE]) + H(b"q")), 2)

    def test_three_pieces_pad_with_one_zero_hash(self):
        p = pieces_of(3, last=100)
        self.assertRoot(b"".join(p), H(H(H(p[0]) + H(p[1])) + H(H(p[2]) + ZERO_HASH)), 3)

    def test_five_pieces_pad_with_zero_leaves_to_eight(self):
        p = pieces_of(5)
        h = [H(x) for x in p] + [bytes(32)] * 3  # the zero hashes are leaves: their parent is H(0 ‖ 0), not 0
        level1 = [H(h[0] + h[1]), H(h[2] + h[3]), H(h[4] + h[5]), H(h[6] + h[7])]
        self.assertRoot(b"".join(p), H(H(level1[0] + level1[1]) + H(level1[2] + level1[3])), 5)

    def test_root_of_refuses_a_row_that_is_not_whole_hashes(self):
        for row in (b"", b"x" * 31, b"x" * 33):
            self.assertRaises(LeafRowError, merkle.root_of, row)

    def test_piece_count_refuses_a_negative_size(self):
        self.assertRaises(ValueError, merkle.piece_count, -1)


class FileHasherTests(unittest.SynchronousTestCase):
    DATA = b"".join(pieces_of(4, last=12345))

    def test_blocks_straddling_pieces_give_the_same_row_and_sha256(self):
        DATA = self.DATA
        for block in (4097, PIECE - 1, PIECE, PIECE + 1, 3 * PIECE + 7, len(DATA)):
            hasher = merkle.FileHasher()
            for i in range(0, len(DATA), block):
                hasher.update(DATA[i:i + block])
                hasher.update(b"")  # an empty read changes nothing
            self.assertEqual(hasher.finish(), (hashlib.sha256(DATA).hexdigest(), merkle.leaf_hashes(DATA)), block)

    def test_empty_and_exact_piece_files(self):
        for data in (b"", b"z" * PIECE, b"z" * 2 * PIECE):
            hasher = merkle.FileHasher()
            hasher.update(data)
            self.assertEqual(hasher.finish(), (hashlib.sha256(data).hexdigest(), merkle.leaf_hashes(data)))
        self.assertEqual(len(merkle.leaf_hashes(b"z" * 2 * PIECE)), 64)  # no empty third leaf

    def test_hash_file_reads_in_blocks(self):
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(self.DATA)
        self.assertEqual(merkle.hash_file(path, block=100_000),
                         (hashlib.sha256(self.DATA).hexdigest(), merkle.leaf_hashes(self.DATA)))


class CheckLeavesTests(unittest.SynchronousTestCase):
    PIECES = pieces_of(3, last=10)
    SIZE = 2 * PIECE + 10
    LEAVES = leaves_of(PIECES)
    ROOT = merkle.root_hex(LEAVES)

    def test_the_right_row_passes(self):
        merkle.check_leaves(self.LEAVES, self.ROOT, self.SIZE)
        merkle.check_leaves(H(b""), H(b"").hex(), 0)

    def test_wrong_length_refused_even_with_the_right_root(self):
        padded = self.LEAVES + ZERO_HASH  # the padding written out: same root, one leaf too many
        self.assertEqual(merkle.root_hex(padded), self.ROOT)
        for leaves, size in ((padded, self.SIZE), (self.LEAVES, 2 * PIECE), (self.LEAVES, 3 * PIECE + 1),
                             (self.LEAVES[:-1], self.SIZE)):
            self.assertRaises(LeafRowError, merkle.check_leaves, leaves, self.ROOT, size)

    def test_wrong_root_refused(self):
        other = merkle.root_hex(leaves_of(pieces_of(3, last=11)))
        self.assertRaises(LeafRowError, merkle.check_leaves, self.LEAVES, other, self.SIZE)

    def test_swapped_leaves_refused(self):
        swapped = self.LEAVES[32:64] + self.LEAVES[:32] + self.LEAVES[64:]
        self.assertRaises(LeafRowError, merkle.check_leaves, swapped, self.ROOT, self.SIZE)


class ChunkMatchesTests(unittest.SynchronousTestCase):
    """A 2.5 MiB file (10 pieces) in 1 MiB chunks: chunks 0 and 1 are 4 pieces, chunk 2 is 2."""

    DATA = b"".join(pieces_of(10))
    LEAVES = merkle.leaf_hashes(DATA)

    def chunk(self, index, chunk_size=MiB):
        return self.DATA[index * chunk_size:(index + 1) * chunk_size]

    def test_whole_chunks_and_the_short_last_one_match(self):
        for index in (0, 1, 2):
            self.assertTrue(merkle.chunk_matches(self.chunk(index), index, MiB, self.LEAVES), index)
        self.assertEqual(len(self.chunk(2)), 2 * PIECE)

    def test_a_short_last_piece_matches_only_whole(self):
        data = self.DATA[:-5]
        leaves = merkle.leaf_hashes(data)
        self.assertTrue(merkle.chunk_matches(data[2 * MiB:], 2, MiB, leaves))
        self.assertFalse(merkle.chunk_matches(data[2 * MiB:-1], 2, MiB, leaves))

    def test_a_flipped_byte_does_not_match(self):
        for index, at in ((0, 0), (1, MiB - 1), (2, 300_000)):
            chunk = bytearray(self.chunk(index))
            chunk[at] ^= 1
            self.assertFalse(merkle.chunk_matches(bytes(chunk), index, MiB, self.LEAVES), index)

    def test_a_chunk_at_another_index_does_not_match(self):
        self.assertFalse(merkle.chunk_matches(self.chunk(0), 1, MiB, self.LEAVES))
        self.assertFalse(merkle.chunk_matches(self.chunk(0), 3, MiB, self.LEAVES))  # past the file
        # Negative indexes must not reach the row from its end: piece 8 is leaf -2 in 256 KiB chunks.
        self.assertFalse(merkle.chunk_matches(self.chunk(8, PIECE), -2, PIECE, self.LEAVES))

    def test_fewer_or_more_pieces_than_the_chunk_has_do_not_match(self):
        # Half of chunk 0 is its first two pieces, rightly hashed: taken, it would leave a hole.
        self.assertFalse(merkle.chunk_matches(self.chunk(0)[:2 * PIECE], 0, MiB, self.LEAVES))
        # Chunks 0 and 1 sent as chunk 0: the second half would be written over chunk 1.
        self.assertFalse(merkle.chunk_matches(self.DATA[:2 * MiB], 0, MiB, self.LEAVES))
        self.assertFalse(merkle.chunk_matches(self.chunk(2)[:PIECE], 2, MiB, self.LEAVES))

    def test_the_empty_file_is_one_empty_chunk(self):
        self.assertTrue(merkle.chunk_matches(b"", 0, PIECE, H(b"")))
        self.assertFalse(merkle.chunk_matches(b"", 1, PIECE, H(b"")))


class ChunkSizeTests(unittest.SynchronousTestCase):
    def test_e2e_chunk_sizes_are_256_kib_times_a_power_of_two(self):
        self.assertEqual(merkle.E2E_CHUNK_SIZES, (PIECE, 2 * PIECE, MiB, 2 * MiB, 4 * MiB))
        for size in merkle.E2E_CHUNK_SIZES:
            self.assertTrue(merkle.is_e2e_chunk_size(size), size)
        for size in (16384, PIECE - 1, 3 * PIECE, 8 * MiB, True, float(PIECE), str(PIECE), None):
            self.assertFalse(merkle.is_e2e_chunk_size(size), repr(size))

    def test_e2e_chunk_size_is_the_largest_not_above_the_wanted(self):
        for wanted, size in ((16384, PIECE), (PIECE, PIECE), (3 * PIECE, 2 * PIECE), (MiB - 1, 2 * PIECE),
                             (MiB, MiB), (4 * MiB, 4 * MiB), (10**9, 4 * MiB)):
            self.assertEqual(merkle.e2e_chunk_size(wanted), size, wanted)
