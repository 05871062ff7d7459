"""End-to-end transfer keys and sealing of PROTOCOL.md §13 (protocol/e2e.py), with no I/O.

The key schedule and the nonce/AAD layout are also written out here from
the design (notes: e2e-design.md) with bare ``cryptography`` primitives, so
a change to the wire format fails here and not only between two peers.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from twisted.trial import unittest

from onion_twisted.protocol import e2e
from onion_twisted.protocol.e2e import LABEL, ChunkRefused, TransferKeyError

T = "5e0c1c5e-0000-4000-8000-000000000001"
OTHER_T = "5e0c1c5e-0000-4000-8000-000000000002"
LEAVES = bytes(range(96))  # three leaves
CHUNK = b"chunk data " * 1000

# Curve25519 points of small order (u-coordinates, little-endian): X25519 with any of them
# gives the all-zero shared secret (cr.yp.to/ecdh.html#validate).
SMALL_ORDER = (
    bytes(32),                                   # 0
    (1).to_bytes(32, "little"),                  # 1
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),  # order 8
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),  # order 8
)


class Exchange:
    """One transfer's two sides: the requester's x, X and the sharer's y, Y, K and ciphers."""

    def __init__(self, transfer=T):
        self.x = e2e.new_private()
        self.X = e2e.public_bytes(self.x)
        self.y = e2e.new_private()
        self.Y, self.sharer = e2e.sharer_side(self.X, transfer, private=self.y)
        self.requester = e2e.requester_side(self.x, self.Y, transfer)
        self.key = e2e.transfer_key(self.x, self.Y, transfer, self.X, self.Y)


class KeyTests(unittest.SynchronousTestCase):
    def test_both_sides_derive_the_same_key(self):
        ex = Exchange()
        self.assertEqual(e2e.transfer_key(ex.y, ex.X, T, ex.X, ex.Y), ex.key)
        self.assertEqual(len(ex.key), 32)
        self.assertEqual(ex.requester.open_leaves(ex.sharer.seal_leaves(LEAVES)), LEAVES)
        self.assertEqual(ex.requester.open_chunk(5, ex.sharer.seal_chunk(5, CHUNK)), CHUNK)

    def test_the_key_is_the_hkdf_of_the_design(self):
        ex = Exchange()
        t = T.encode()
        info = LABEL + b":key" + len(t).to_bytes(2, "big") + t + ex.X + ex.Y
        shared = ex.x.exchange(X25519PublicKey.from_public_bytes(ex.Y))
        self.assertEqual(HKDF(hashes.SHA256(), 32, salt=LABEL, info=info).derive(shared), ex.key)

    def test_nonces_and_aad_are_those_of_the_design(self):
        ex, t = Exchange(), T.encode()
        field = len(t).to_bytes(2, "big") + t
        aead = AESGCM(ex.key)
        self.assertEqual(aead.decrypt(bytes(12), ex.sharer.seal_leaves(LEAVES), LABEL + b":leaves" + field), LEAVES)
        sealed = ex.sharer.seal_chunk(7, CHUNK)
        self.assertEqual(aead.decrypt(bytes(4) + (8).to_bytes(8, "big"), sealed,
                                      LABEL + b":chunk" + field + (7).to_bytes(8, "big")), CHUNK)
        self.assertEqual(len(sealed), len(CHUNK) + e2e.TAG_SIZE)

    def test_keys_differ_by_transfer_and_by_ephemeral_key(self):
        ex = Exchange()
        self.assertNotEqual(e2e.transfer_key(ex.x, ex.Y, OTHER_T, ex.X, ex.Y), ex.key)
        # A fresh sharer key for the same requester key and transfer: another K.
        again_y, _ = e2e.sharer_side(ex.X, T)
        self.assertNotEqual(e2e.transfer_key(ex.x, again_y, T, ex.X, again_y), ex.key)
        # A fresh requester key (a new attempt) against the same sharer key: another K.
        x2 = e2e.new_private()
        X2 = e2e.public_bytes(x2)
        self.assertNotEqual(e2e.transfer_key(x2, ex.Y, T, X2, ex.Y), ex.key)
        self.assertNotEqual(Exchange().key, ex.key)

    def test_the_public_keys_alone_do_not_give_the_key(self):
        """An exit on the bridge sees Y (and, were it leaked, X) but holds neither x nor y:
        any key it can make is not K, and nothing it seals opens at the requester."""
        ex = Exchange()
        z = e2e.new_private()  # the attacker's own key: all it can exchange with
        for other in (ex.X, ex.Y):
            guess = e2e.transfer_key(z, other, T, ex.X, ex.Y)
            self.assertNotEqual(guess, ex.key)
            forged = e2e.TransferCipher(guess, T).seal_chunk(0, b"forged")
            self.assertRaises(ChunkRefused, ex.requester.open_chunk, 0, forged)
        _, attacker = e2e.sharer_side(ex.X, T, private=z)  # a sharer key of its own, the requester's X
        self.assertRaises(ChunkRefused, ex.requester.open_leaves, attacker.seal_leaves(LEAVES))

    def test_small_order_public_keys_refused(self):
        x = e2e.new_private()
        X = e2e.public_bytes(x)
        for point in SMALL_ORDER:
            self.assertRaises(TransferKeyError, e2e.transfer_key, x, point, T, X, point)
            self.assertRaises(TransferKeyError, e2e.sharer_side, point, T)
            self.assertRaises(TransferKeyError, e2e.requester_side, x, point, T)

    def test_public_keys_of_the_wrong_length_refused(self):
        x = e2e.new_private()
        X = e2e.public_bytes(x)
        for bad in (X[:31], X + b"\x00", b""):
            self.assertRaises(TransferKeyError, e2e.transfer_key, x, bad, T, X, X)
            self.assertRaises(TransferKeyError, e2e.sharer_side, bad, T)
            self.assertRaises(TransferKeyError, e2e.requester_side, x, bad, T)
        good = e2e.public_bytes(e2e.new_private())
        self.assertRaises(TransferKeyError, e2e.transfer_key, x, good, T, X[:31], good)  # in the info too


class SealingTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.ex = Exchange()
        self.sealed = self.ex.sharer.seal_chunk(3, CHUNK)

    def test_a_chunk_opens_at_its_own_index_only(self):
        self.assertEqual(self.ex.requester.open_chunk(3, self.sealed), CHUNK)
        for index in (0, 2, 4, 2**32 + 3):
            self.assertRaises(ChunkRefused, self.ex.requester.open_chunk, index, self.sealed)
        for index in (-1, 1 << 63):
            self.assertRaises(ChunkRefused, self.ex.requester.open_chunk, index, self.sealed)

    def test_a_chunk_opens_in_its_own_transfer_only(self):
        # Same key, another transfer id: the AAD differs.
        self.assertRaises(ChunkRefused, e2e.TransferCipher(self.ex.key, OTHER_T).open_chunk, 3, self.sealed)

    def test_a_flipped_bit_or_a_truncated_chunk_is_refused(self):
        for at in (0, len(CHUNK) // 2, len(self.sealed) - 1):  # in the data and in the tag
            flipped = bytearray(self.sealed)
            flipped[at] ^= 0x01
            self.assertRaises(ChunkRefused, self.ex.requester.open_chunk, 3, bytes(flipped))
        for cut in (self.sealed[:-1], self.sealed[:-e2e.TAG_SIZE], self.sealed[:10], b""):
            self.assertRaises(ChunkRefused, self.ex.requester.open_chunk, 3, cut)

    def test_the_leaf_row_opens_in_its_own_transfer_only(self):
        sealed = self.ex.sharer.seal_leaves(LEAVES)
        self.assertEqual(self.ex.requester.open_leaves(sealed), LEAVES)
        self.assertRaises(ChunkRefused, e2e.TransferCipher(self.ex.key, OTHER_T).open_leaves, sealed)
        flipped = bytearray(sealed)
        flipped[0] ^= 0x80
        for bad in (bytes(flipped), sealed[:-1], b""):
            self.assertRaises(ChunkRefused, self.ex.requester.open_leaves, bad)

    def test_a_chunk_is_not_a_leaf_row_nor_the_other_way(self):
        leaves = self.ex.sharer.seal_leaves(LEAVES)
        self.assertRaises(ChunkRefused, self.ex.requester.open_leaves, self.ex.sharer.seal_chunk(0, LEAVES))
        # Index -1 would take the leaf row's all-zero nonce: refused before the AAD is even tried.
        for index in (0, -1):
            self.assertRaises(ChunkRefused, self.ex.requester.open_chunk, index, leaves)
