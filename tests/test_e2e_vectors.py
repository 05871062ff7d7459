"""The end-to-end transfer vectors (docs/protocol.md section 17.13): the code gives the
published bytes, an independent computation from the page's formulas gives the same,
and the page shows them."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from twisted.trial import unittest

from onion_twisted.protocol import e2e, merkle
from tests.support.e2e_vectors import INPUTS, OUTPUTS, compute, content

ROOT = Path(__file__).resolve().parent.parent


def _raw(private) -> bytes:
    return private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# --- written from docs/protocol.md section 17.13 alone, with primitives only ---------------------

PIECE = 262144
LABEL = b"onion-http/2 transfer-x25519-aes256gcm-1"


def leaf_row(data: bytes) -> bytes:
    pieces = [data[i:i + PIECE] for i in range(0, len(data), PIECE)] or [b""]
    return b"".join(hashlib.sha256(p).digest() for p in pieces)


def merkle_root(row: bytes) -> bytes:
    level = [row[i:i + 32] for i in range(0, len(row), 32)]
    while len(level) & (len(level) - 1):
        level.append(bytes(32))
    while len(level) > 1:
        level = [hashlib.sha256(level[i] + level[i + 1]).digest() for i in range(0, len(level), 2)]
    return level[0]


def t_field(transfer: str) -> bytes:
    t = transfer.encode("utf-8")
    return len(t).to_bytes(2, "big") + t


class VectorTests(unittest.SynchronousTestCase):
    def test_the_code_gives_the_published_bytes(self):
        self.assertEqual(compute(INPUTS), OUTPUTS)

    def test_the_formulas_of_the_page_give_the_same_bytes(self):
        transfer, chunk_size = INPUTS["transfer"], INPUTS["chunk_size"]
        data = bytes(i % 251 for i in range(INPUTS["size"]))
        self.assertEqual(hashlib.sha256(data).hexdigest(), OUTPUTS["sha256"])

        # Merkle tree
        row = leaf_row(data)
        self.assertEqual(len(row), 4 * 32)
        self.assertEqual([row[i:i + 32].hex() for i in range(0, len(row), 32)],
                         [OUTPUTS[f"leaf_{i}"] for i in range(4)])
        self.assertEqual(merkle_root(row).hex(), OUTPUTS["root"])
        for size in INPUTS["root_sizes"]:
            with self.subTest(size=size):
                body = bytes(i % 251 for i in range(size))
                self.assertEqual(merkle_root(leaf_row(body)).hex(), OUTPUTS[f"root_of_{size}"])
        self.assertEqual(OUTPUTS["root_of_0"], hashlib.sha256(b"").hexdigest())
        self.assertEqual(OUTPUTS["root_of_262144"], OUTPUTS["leaf_0"])  # one leaf is its own root

        # the transfer key
        x, y = (x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(INPUTS[k])) for k in "xy")
        X, Y = _raw(x), _raw(y)
        self.assertEqual([X.hex(), Y.hex()], [OUTPUTS["X"], OUTPUTS["Y"]])
        self.assertEqual([base64.b64encode(X).decode(), base64.b64encode(Y).decode()],
                         [OUTPUTS["X_b64"], OUTPUTS["Y_b64"]])
        shared = x.exchange(x25519.X25519PublicKey.from_public_bytes(Y))
        self.assertEqual(shared, y.exchange(x25519.X25519PublicKey.from_public_bytes(X)))
        self.assertEqual(shared.hex(), OUTPUTS["shared_secret"])
        info = LABEL + b":key" + t_field(transfer) + X + Y
        K = HKDF(hashes.SHA256(), 32, salt=LABEL, info=info).derive(shared)
        self.assertEqual(K.hex(), OUTPUTS["K"])

        # the sealed leaf row and chunks
        aead = AESGCM(K)
        leaves_aad = LABEL + b":leaves" + t_field(transfer)
        self.assertEqual(leaves_aad.hex(), OUTPUTS["leaves_aad"])
        sealed_leaves = aead.encrypt(bytes(12), row, leaves_aad)
        self.assertEqual(sealed_leaves.hex(), OUTPUTS["sealed_leaves"])

        def nonce(i):
            return bytes(4) + (i + 1).to_bytes(8, "big")

        def aad(i):
            return LABEL + b":chunk" + t_field(transfer) + i.to_bytes(8, "big")
        self.assertEqual([nonce(0).hex(), aad(0).hex()], [OUTPUTS["chunk_0_nonce"], OUTPUTS["chunk_0_aad"]])
        self.assertEqual(nonce(3).hex(), OUTPUTS["chunk_3_nonce"])
        chunks = [data[i:i + chunk_size] for i in range(0, len(data), chunk_size)]
        sealed = [aead.encrypt(nonce(i), c, aad(i)) for i, c in enumerate(chunks)]
        self.assertEqual(len(sealed), 4)
        self.assertEqual([len(sealed[0]), sealed[0][:16].hex(), sealed[0][-16:].hex(),
                          hashlib.sha256(sealed[0]).hexdigest()],
                         [OUTPUTS["sealed_chunk_0_size"], OUTPUTS["sealed_chunk_0_head"],
                          OUTPUTS["sealed_chunk_0_tag"], OUTPUTS["sealed_chunk_0_sha256"]])
        self.assertEqual([len(sealed[3]), sealed[3][-16:].hex(), hashlib.sha256(sealed[3]).hexdigest()],
                         [OUTPUTS["sealed_chunk_3_size"], OUTPUTS["sealed_chunk_3_tag"],
                          OUTPUTS["sealed_chunk_3_sha256"]])

        # the messages, as the page spells them
        b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
        start = ('{"type":"transfer_start","transfer":"%s","chunk_size":%d,"key":"%s","leaves":"%s"}'
                 % (transfer, chunk_size, b64(Y), b64(sealed_leaves)))
        self.assertEqual(start, OUTPUTS["transfer_start"])
        chunk_3 = ('{"type":"file_chunk","transfer":"%s","chunk_idx":3,"chunk_size":%d,"data":"%s"}'
                   % (transfer, chunk_size, b64(sealed[3])))
        self.assertEqual(hashlib.sha256(chunk_3.encode()).hexdigest(), OUTPUTS["file_chunk_3_sha256"])
        request = ('{"type":"request","file":"vector.bin","chunk_size":%d,"sha256":"%s","root":"%s","key":"%s"}'
                   % (chunk_size, OUTPUTS["sha256"], OUTPUTS["root"], b64(X)))
        self.assertEqual(request, OUTPUTS["request"])

    def test_docs_show_every_vector(self):
        page = (ROOT / "docs" / "protocol.md").read_text()
        flat = page.replace("\n", "").replace(" ", "").replace("`", "")
        scalars = {k: v for k, v in INPUTS.items() if k != "root_sizes"}
        for name, value in (*scalars.items(), *OUTPUTS.items()):
            with self.subTest(name):
                self.assertIn(str(value), flat, f"docs/protocol.md does not show the vector {name}")


class SealingTests(unittest.SynchronousTestCase):
    """What the vectors' keys and file show of the checks section 17.13 describes."""

    def setUp(self):
        self.transfer = INPUTS["transfer"]
        self.x = x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(INPUTS["x"]))
        self.y = x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(INPUTS["y"]))
        self.Y, self.sharer = e2e.sharer_side(_raw(self.x), self.transfer, private=self.y)
        self.requester = e2e.requester_side(self.x, self.Y, self.transfer)
        self.data = content(INPUTS["size"])
        self.leaves = merkle.leaf_hashes(self.data)

    def test_a_chunk_opens_only_at_its_index_and_in_its_transfer(self):
        sealed = self.sharer.seal_chunk(1, self.data[PIECE:2 * PIECE])
        self.assertEqual(self.requester.open_chunk(1, sealed), self.data[PIECE:2 * PIECE])
        self.assertRaises(e2e.ChunkRefused, self.requester.open_chunk, 2, sealed)
        other = e2e.requester_side(self.x, self.Y, "another-transfer")
        self.assertRaises(e2e.ChunkRefused, other.open_chunk, 1, sealed)
        altered = bytearray(sealed)
        altered[0] ^= 1
        self.assertRaises(e2e.ChunkRefused, self.requester.open_chunk, 1, bytes(altered))

    def test_the_leaf_row_opens_only_in_its_transfer_and_checks_root_and_size(self):
        sealed = self.sharer.seal_leaves(self.leaves)
        other = e2e.requester_side(self.x, self.Y, "another-transfer")
        self.assertRaises(e2e.ChunkRefused, other.open_leaves, sealed)
        row = self.requester.open_leaves(sealed)
        merkle.check_leaves(row, OUTPUTS["root"], INPUTS["size"])
        self.assertRaises(merkle.LeafRowError, merkle.check_leaves, row, OUTPUTS["root"], INPUTS["size"] + PIECE)
        self.assertRaises(merkle.LeafRowError, merkle.check_leaves, row, OUTPUTS["root_of_0"], INPUTS["size"])

    def test_a_chunk_is_checked_against_its_own_leaves(self):
        self.assertTrue(merkle.chunk_matches(self.data[3 * PIECE:], 3, PIECE, self.leaves))
        self.assertFalse(merkle.chunk_matches(self.data[3 * PIECE:], 2, PIECE, self.leaves))
        self.assertTrue(merkle.chunk_matches(self.data[2 * PIECE:], 1, 2 * PIECE, self.leaves))
        self.assertFalse(merkle.chunk_matches(b"\1" + self.data[1:PIECE], 0, PIECE, self.leaves))

    def test_an_all_zero_shared_secret_is_refused(self):
        self.assertRaises(e2e.TransferKeyError, e2e.sharer_side, bytes(32), self.transfer)
