"""The onion-http/2 test vectors: the code gives the published bytes, an independent
computation from the formulas of docs/protocol.md gives the same, and the page shows them."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from twisted.trial import unittest

from tests.support.v2_vectors import compute

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = json.loads((ROOT / "tests" / "vectors" / "onion-http-2.json").read_text())
INPUTS, OUTPUTS = PUBLISHED["inputs"], PUBLISHED["outputs"]


def _raw(private) -> bytes:
    return private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class VectorTests(unittest.SynchronousTestCase):
    def test_the_code_gives_the_published_bytes(self):
        self.assertEqual(compute(INPUTS), OUTPUTS)

    def test_the_formulas_of_the_page_give_the_same_bytes(self):
        # Written from docs/protocol.md's text alone, with primitives only.
        protoid = b"onion-http/2 ntor-x25519-sha256-1"
        member = bytes.fromhex(INPUTS["ID"])
        b, x, y = (x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(INPUTS[k])) for k in "bxy")
        B, X, Y = _raw(b), _raw(x), _raw(y)
        self.assertEqual(bytes.fromhex(OUTPUTS["handshake"]), b"\x02" + member + B + X)
        secret_input = (y.exchange(x25519.X25519PublicKey.from_public_bytes(X))
                        + b.exchange(x25519.X25519PublicKey.from_public_bytes(X)) + member + B + X + Y + protoid)

        def h(message, tweak):
            return hmac.new(tweak, message, hashlib.sha256).digest()
        seed = h(secret_input, protoid + b":key_extract")
        verify = h(secret_input, protoid + b":verify")
        auth = h(verify + member + B + Y + X + protoid + b"Server", protoid + b":mac")
        self.assertEqual(bytes.fromhex(OUTPUTS["reply"]), Y + auth)
        material = HKDFExpand(hashes.SHA256(), 56, protoid + b":key_expand").derive(seed)
        kf, kb, nf, nb = material[:16], material[16:32], material[32:44], material[44:]
        self.assertEqual([kf.hex(), kb.hex(), nf.hex(), nb.hex()],
                         [OUTPUTS["Kf"], OUTPUTS["Kb"], OUTPUTS["Nf"], OUTPUTS["Nb"]])

        message = INPUTS["message"].encode()
        padded = len(message).to_bytes(4, "big") + message + bytes(1024 - 4 - len(message))
        self.assertEqual(padded[:24].hex(), OUTPUTS["padded_message_head"])

        def layer(key, base, counter, plaintext, aad):
            nonce = (int.from_bytes(base, "big") ^ counter).to_bytes(12, "big")
            return counter.to_bytes(8, "big") + AESGCM(key).encrypt(nonce, plaintext, aad)
        forward_0 = layer(kf, nf, 0, padded, b"onion-http/2 forward")
        self.assertEqual(hashlib.sha256(forward_0).hexdigest(), OUTPUTS["forward_layer_0_sha256"])
        self.assertEqual(layer(kf, nf, 1, message, b"onion-http/2 forward").hex(), OUTPUTS["forward_layer_1"])
        self.assertEqual(layer(kb, nb, 0, message, b"onion-http/2 backward").hex(), OUTPUTS["backward_layer_0"])

    def test_docs_show_every_vector(self):
        page = (ROOT / "docs" / "protocol.md").read_text()
        for name, value in (*INPUTS.items(), *OUTPUTS.items()):
            with self.subTest(name):
                self.assertIn(str(value), page.replace("\n", "").replace(" ", "").replace("`", ""),
                              f"docs/protocol.md does not show the vector {name}")
