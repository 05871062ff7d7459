"""crypto.py: RSA-OAEP key transport, AES-GCM onion layers, Ed25519 signatures (PROTOCOL.md §2)."""

import base64
import hashlib

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from twisted.trial import unittest

from onion_twisted.protocol import crypto
from onion_twisted.protocol.errors import BadRequest

KEY_A = rsa.generate_private_key(public_exponent=65537, key_size=1024)
KEY_B = rsa.generate_private_key(public_exponent=65537, key_size=1024)
KEY_2048 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
TRACKER = ed25519.Ed25519PrivateKey.generate()


def spki_pem(public_key) -> str:
    return public_key.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")


class SessionKeyTransportTests(unittest.SynchronousTestCase):
    def test_seal_open_round_trip(self):
        key = crypto.new_session_key()
        sealed = crypto.seal_session_key(KEY_A.public_key(), key)
        self.assertEqual(len(sealed), 128)
        self.assertEqual(crypto.open_session_key(KEY_A, sealed), key)

    def test_seal_is_oaep_sha256_interoperable(self):
        # Sealed with the cryptography library's own OAEP/SHA-256/MGF1-SHA-256, no label.
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding
        oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
        key = b"k" * 16
        self.assertEqual(crypto.open_session_key(KEY_2048, KEY_2048.public_key().encrypt(key, oaep)), key)
        self.assertEqual(KEY_2048.decrypt(crypto.seal_session_key(KEY_2048.public_key(), key), oaep), key)

    def test_session_keys_are_random_16_bytes(self):
        a, b = crypto.new_session_key(), crypto.new_session_key()
        self.assertEqual((len(a), len(b)), (16, 16))
        self.assertNotEqual(a, b)

    def test_wrong_private_key_is_bad_request(self):
        sealed = crypto.seal_session_key(KEY_A.public_key(), crypto.new_session_key())
        e = self.assertRaises(BadRequest, crypto.open_session_key, KEY_B, sealed)
        self.assertEqual(e.status, 400)

    def test_sealed_key_of_wrong_length_is_bad_request(self):
        for size in (0, 15, 17, 32):
            with self.subTest(size=size):
                sealed = crypto.seal_session_key(KEY_A.public_key(), b"x" * size)
                e = self.assertRaises(BadRequest, crypto.open_session_key, KEY_A, sealed)
                self.assertIn("16 bytes", e.detail)

    def test_ciphertext_of_wrong_size_is_bad_request(self):
        sealed = crypto.seal_session_key(KEY_2048.public_key(), crypto.new_session_key())
        for junk in (b"", b"x", sealed, sealed[:-1], b"\x00" * 128):
            with self.subTest(n=len(junk)):
                self.assertRaises(BadRequest, crypto.open_session_key, KEY_A, junk)

    def test_tampered_ciphertext_is_bad_request(self):
        sealed = bytearray(crypto.seal_session_key(KEY_A.public_key(), crypto.new_session_key()))
        sealed[50] ^= 1
        self.assertRaises(BadRequest, crypto.open_session_key, KEY_A, bytes(sealed))


class LayerTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.layers = [crypto.Layer(crypto.new_session_key()) for _ in range(3)]

    def test_layer_format_is_nonce_ciphertext_tag(self):
        layer = self.layers[0].wrap(b"hello", crypto.FORWARD)
        self.assertEqual(len(layer), 12 + 5 + 16)
        nonce, plaintext = self.layers[0].peel(layer, crypto.FORWARD)
        self.assertEqual((nonce, plaintext), (layer[:12], b"hello"))

    def test_layer_is_aes_128_gcm_with_direction_aad(self):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        key = b"K" * 16
        layer = crypto.Layer(key).wrap(b"m", crypto.BACKWARD)
        self.assertEqual(AESGCM(key).decrypt(layer[:12], layer[12:], b"onion-http/1 backward"), b"m")
        self.assertEqual(crypto.FORWARD, b"onion-http/1 forward")

    def test_nonces_are_fresh(self):
        a = self.layers[0].wrap(b"same", crypto.FORWARD)
        b = self.layers[0].wrap(b"same", crypto.FORWARD)
        self.assertNotEqual(a[:12], b[:12])

    def test_session_key_of_wrong_length_refused(self):
        self.assertRaises(ValueError, crypto.Layer, b"x" * 15)
        self.assertRaises(ValueError, crypto.Layer, b"x" * 32)

    def _forward(self, hops):
        layers = self.layers[:hops]
        message = b'{"type":"list"}'
        onion = crypto.wrap_onion(layers, message)
        self.assertEqual(len(onion), len(message) + hops * 28)
        for i, layer in enumerate(layers):  # X, then Y, then Z each remove one layer
            _, onion = layer.peel(onion, crypto.FORWARD)
            if i < hops - 1:
                self.assertNotEqual(onion, message)
        self.assertEqual(onion, message)

    def _backward(self, hops):
        layers = self.layers[:hops]
        message = b'{"type":"request"}'
        onion = message
        for layer in reversed(layers):  # Z adds first, X last
            onion = layer.wrap(onion, crypto.BACKWARD)
        self.assertEqual(crypto.peel_onion(layers, onion), message)

    def test_forward_one_hop(self):
        self._forward(1)

    def test_forward_two_hops(self):
        self._forward(2)

    def test_forward_three_hops(self):
        self._forward(3)

    def test_backward_one_hop(self):
        self._backward(1)

    def test_backward_two_hops(self):
        self._backward(2)

    def test_backward_three_hops(self):
        self._backward(3)

    def test_peel_onion_in_wrong_order_fails(self):
        x, y = self.layers[:2]
        onion = x.wrap(y.wrap(b"m", crypto.BACKWARD), crypto.BACKWARD)
        self.assertRaises(BadRequest, crypto.peel_onion, [y, x], onion)

    def test_forward_layer_cannot_be_peeled_as_backward(self):
        layer = self.layers[0].wrap(b"m", crypto.FORWARD)
        self.assertRaises(BadRequest, self.layers[0].peel, layer, crypto.BACKWARD)

    def test_backward_layer_cannot_be_peeled_as_forward(self):
        layer = self.layers[0].wrap(b"m", crypto.BACKWARD)
        self.assertRaises(BadRequest, self.layers[0].peel, layer, crypto.FORWARD)

    def test_forward_onion_cannot_be_peeled_by_peer(self):
        onion = crypto.wrap_onion(self.layers, b"m")
        self.assertRaises(BadRequest, crypto.peel_onion, self.layers, onion)

    def test_wrong_key_is_bad_request(self):
        layer = self.layers[0].wrap(b"m", crypto.FORWARD)
        self.assertRaises(BadRequest, self.layers[1].peel, layer, crypto.FORWARD)

    def test_tampered_layer_is_bad_request(self):
        layer = self.layers[0].wrap(b"message", crypto.FORWARD)
        for i in (0, 11, 12, len(layer) - 1):  # nonce, ciphertext, tag
            tampered = bytearray(layer)
            tampered[i] ^= 0x80
            with self.subTest(i=i):
                e = self.assertRaises(BadRequest, self.layers[0].peel, bytes(tampered), crypto.FORWARD)
                self.assertEqual(e.status, 400)

    def test_truncated_or_extended_layer_is_bad_request(self):
        layer = self.layers[0].wrap(b"message", crypto.FORWARD)
        for bad in (layer[:-1], layer + b"\x00"):
            self.assertRaises(BadRequest, self.layers[0].peel, bad, crypto.FORWARD)

    def test_too_short_layer_is_bad_request(self):
        for n in (0, 1, 12, 27):
            with self.subTest(n=n):
                e = self.assertRaises(BadRequest, self.layers[0].peel, b"\x00" * n, crypto.FORWARD)
                self.assertIn("shorter", e.detail)

    def test_empty_plaintext_layer_is_28_bytes(self):
        layer = self.layers[0].wrap(b"", crypto.FORWARD)
        self.assertEqual(len(layer), 28)
        self.assertEqual(self.layers[0].peel(layer, crypto.FORWARD)[1], b"")


class RsaPublicKeyTests(unittest.SynchronousTestCase):
    def test_fingerprint_is_sha256_of_der_spki(self):
        der = KEY_A.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
        expected = hashlib.sha256(der).hexdigest()
        self.assertEqual(crypto.fingerprint(KEY_A.public_key()), expected)
        self.assertEqual(crypto.fingerprint(KEY_A), expected)  # private key: its public half
        self.assertRegex(expected, r"^[0-9a-f]{64}$")
        self.assertNotEqual(crypto.fingerprint(KEY_B), expected)

    def test_pem_round_trip(self):
        pem = crypto.public_key_pem(KEY_A)
        self.assertTrue(pem.startswith("-----BEGIN PUBLIC KEY-----"))
        loaded = crypto.load_public_key_pem(pem)
        self.assertEqual(crypto.fingerprint(loaded), crypto.fingerprint(KEY_A))

    def test_private_key_pem_round_trip(self):
        loaded = crypto.load_private_key_pem(crypto.private_key_pem(KEY_A))
        self.assertEqual(loaded.private_numbers(), KEY_A.private_numbers())

    def test_load_private_key_refuses_non_rsa(self):
        pem = TRACKER.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        self.assertRaises(ValueError, crypto.load_private_key_pem, pem)

    def test_generate_refuses_small_keys(self):
        self.assertRaises(ValueError, crypto.generate_node_key, 512)

    def test_refuses_non_rsa(self):
        for key in (TRACKER.public_key(), ec.generate_private_key(ec.SECP256R1()).public_key(),
                    dsa.generate_private_key(1024).public_key()):
            with self.subTest(key=type(key).__name__):
                e = self.assertRaises(BadRequest, crypto.load_public_key_pem, spki_pem(key))
                self.assertIn("RSA", e.detail)

    def test_refuses_small_rsa(self):
        small = rsa.RSAPublicNumbers(65537, (1 << 511) | 1).public_key()
        e = self.assertRaises(BadRequest, crypto.load_public_key_pem, spki_pem(small))
        self.assertIn("1024", e.detail)

    def test_refuses_other_exponent(self):
        odd = rsa.RSAPublicNumbers(3, KEY_A.public_key().public_numbers().n).public_key()
        self.assertRaises(BadRequest, crypto.load_public_key_pem, spki_pem(odd))

    def test_refuses_garbage(self):
        for text in ("", "garbage", "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
                     spki_pem(KEY_A.public_key())[:100], "é" * 10, "x" * 30000):
            with self.subTest(text=text[:30]):
                self.assertRaises(BadRequest, crypto.load_public_key_pem, text)

    def test_refuses_unknown_algorithm(self):
        # A well-formed SubjectPublicKeyInfo with an algorithm OID nobody knows
        # (1.3.101.121): the library raises UnsupportedAlgorithm, not ValueError.
        der = TRACKER.public_key().public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
        der = der.replace(bytes.fromhex("06032b6570"), bytes.fromhex("06032b6579"))
        pem = "-----BEGIN PUBLIC KEY-----\n" + base64.b64encode(der).decode() + "\n-----END PUBLIC KEY-----\n"
        self.assertRaises(BadRequest, crypto.load_public_key_pem, pem)

    def test_refuses_non_strings(self):
        for value in (None, b"-----BEGIN PUBLIC KEY-----", 5, ["pem"]):
            with self.subTest(value=value):
                self.assertRaises(BadRequest, crypto.load_public_key_pem, value)


class Ed25519Tests(unittest.SynchronousTestCase):
    body = b'{"issued":1700000000,"nodes":[]}'

    def test_sign_verify(self):
        signature = crypto.sign_body(TRACKER, self.body)
        self.assertEqual(len(base64.b64decode(signature)), 64)
        self.assertTrue(crypto.verify_body(TRACKER.public_key(), self.body, signature))

    def test_signature_as_bytes_header(self):
        signature = crypto.sign_body(TRACKER, self.body).encode("ascii")
        self.assertTrue(crypto.verify_body(TRACKER.public_key(), self.body, signature))

    def test_tampered_body_fails(self):
        signature = crypto.sign_body(TRACKER, self.body)
        self.assertFalse(crypto.verify_body(TRACKER.public_key(), self.body + b" ", signature))
        self.assertFalse(crypto.verify_body(TRACKER.public_key(), self.body.replace(b"17", b"18"), signature))

    def test_other_key_fails(self):
        signature = crypto.sign_body(ed25519.Ed25519PrivateKey.generate(), self.body)
        self.assertFalse(crypto.verify_body(TRACKER.public_key(), self.body, signature))

    def test_bad_signatures_fail(self):
        good = crypto.sign_body(TRACKER, self.body)
        for signature in (None, "", b"", "not base64!", good[:-4], good + "AAAA", "é", b"\xff\xfe",
                          base64.b64encode(b"\x00" * 64).decode()):
            with self.subTest(signature=signature):
                self.assertFalse(crypto.verify_body(TRACKER.public_key(), self.body, signature))

    def test_public_key_base64_round_trip(self):
        text = crypto.tracker_public_b64(TRACKER)
        self.assertEqual(len(base64.b64decode(text)), 32)
        self.assertEqual(crypto.tracker_public_b64(crypto.load_tracker_public_b64(text)), text)

    def test_load_public_key_refuses_junk(self):
        for text in ("", "!!!!", base64.b64encode(b"x" * 31).decode(), base64.b64encode(b"x" * 33).decode()):
            with self.subTest(text=text):
                self.assertRaises(ValueError, crypto.load_tracker_public_b64, text)


class SignatureSpellingTests(unittest.TestCase):
    def test_only_the_canonical_base64_of_a_signature_verifies(self):
        key = ed25519.Ed25519PrivateKey.generate()
        body = b'{"CID":"control"}'
        signature = crypto.sign_body(key, body)
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
        base = alphabet.index(signature[-3]) & ~0x0F
        spellings = {signature[:-3] + alphabet[base | low] + "==" for low in range(16)}
        self.assertEqual(len(spellings), 16)
        for spelling in spellings:
            self.assertEqual(base64.b64decode(spelling), base64.b64decode(signature))
            self.assertEqual(crypto.verify_body(key.public_key(), body, spelling), spelling == signature, spelling)
            self.assertEqual(crypto.verify_body(key.public_key(), body, spelling.encode()), spelling == signature)
