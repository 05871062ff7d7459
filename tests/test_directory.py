"""directory.py: the tracker's signed node list, mirrored byte for byte (PROTOCOL.md §6)."""

import orjson
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.trial import unittest

from onion_twisted import crypto, wire
from onion_twisted.directory import parse_signed_directory
from onion_twisted.errors import BadRequest, Forbidden

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
