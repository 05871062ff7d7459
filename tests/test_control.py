"""control.py: signed tracker-to-node control messages (PROTOCOL.md §7)."""

import orjson
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.trial import unittest

from onion_twisted.protocol import control, crypto, wire
from onion_twisted.protocol.errors import BadRequest, Forbidden

TRACKER = ed25519.Ed25519PrivateKey.generate()
OTHER = ed25519.Ed25519PrivateKey.generate()
NOW = 1_700_000_000
CIRCUIT = "35ce8f75-6b57-4824-8597-dd756c75a9c5"
BRIDGE = "8f0d3c2a-1b7e-4c5d-9e6f-0a1b2c3d4e5f"


def make_bridge(**changes):
    payload = {"type": "make_bridge", "issued": NOW, "CID": CIRCUIT, "transfer": "t-1",
               "to": "127.0.0.14:5000", "bridge_CID": BRIDGE}
    payload.update(changes)
    return {k: v for k, v in payload.items() if v is not ...}


def verify(body, signature, now=NOW, key=TRACKER.public_key()):
    payload = orjson.loads(body)["payload"]
    return control.verify_control(body, signature, payload, key, now, 60.0, 5000)


class ControlTests(unittest.SynchronousTestCase):
    def test_sign_produces_a_control_cell(self):
        body, signature = control.sign_control(TRACKER, make_bridge())
        self.assertEqual(orjson.loads(body), {"CID": "control", "payload": make_bridge()})
        self.assertTrue(crypto.verify_body(TRACKER.public_key(), body, signature))

    def test_make_bridge_accepted(self):
        message = verify(*control.sign_control(TRACKER, make_bridge()))
        self.assertEqual(message, control.ControlMessage(
            "make_bridge", NOW, BRIDGE, CIRCUIT, "t-1", wire.Address("127.0.0.14", 5000)))

    def test_receive_bridge_accepted(self):
        payload = {"type": "receive_bridge", "issued": NOW, "CID": CIRCUIT, "bridge_CID": BRIDGE,
                   "from": "127.0.0.13"}
        message = verify(*control.sign_control(TRACKER, payload))
        self.assertEqual(message, control.ControlMessage(
            "receive_bridge", NOW, BRIDGE, CIRCUIT, None, wire.Address("127.0.0.13", 5000)))

    def test_drop_bridge_accepted(self):
        payload = {"type": "drop_bridge", "issued": NOW, "bridge_CID": BRIDGE}
        self.assertEqual(verify(*control.sign_control(TRACKER, payload)),
                         control.ControlMessage("drop_bridge", NOW, BRIDGE))

    def test_signature_as_bytes(self):
        body, signature = control.sign_control(TRACKER, make_bridge())
        self.assertEqual(verify(body, signature.encode("ascii")).type, "make_bridge")

    def test_tampered_body_is_forbidden(self):
        body, signature = control.sign_control(TRACKER, make_bridge())
        tampered = body.replace(b"127.0.0.14", b"127.0.0.66")
        e = self.assertRaises(Forbidden, verify, tampered, signature)
        self.assertEqual(e.status, 403)

    def test_re_serialised_body_is_forbidden(self):
        # The signature covers the exact bytes, not the JSON value.
        body, signature = control.sign_control(TRACKER, make_bridge())
        self.assertRaises(Forbidden, verify, orjson.dumps(orjson.loads(body), option=orjson.OPT_INDENT_2),
                          signature)

    def test_wrong_key_is_forbidden(self):
        self.assertRaises(Forbidden, verify, *control.sign_control(OTHER, make_bridge()))

    def test_missing_or_bad_signature_is_forbidden(self):
        body, _ = control.sign_control(TRACKER, make_bridge())
        for signature in (None, "", "!!", "AAAA"):
            with self.subTest(signature=signature):
                self.assertRaises(Forbidden, verify, body, signature)

    def test_unknown_tracker_key_is_forbidden(self):
        body, signature = control.sign_control(TRACKER, make_bridge())
        self.assertRaises(Forbidden, verify, body, signature, key=None)

    def test_issued_61_s_away_is_forbidden(self):
        for issued in (NOW - 61, NOW + 61):
            with self.subTest(issued=issued):
                e = self.assertRaises(Forbidden, verify, *control.sign_control(TRACKER, make_bridge(issued=issued)))
                self.assertIn("stale", e.detail)

    def test_issued_59_s_away_is_fine(self):
        for issued in (NOW - 59, NOW + 59, NOW - 59.5):
            with self.subTest(issued=issued):
                self.assertEqual(verify(*control.sign_control(TRACKER, make_bridge(issued=issued))).issued, issued)

    def test_node_clock_is_used(self):
        body, signature = control.sign_control(TRACKER, make_bridge())
        self.assertRaises(Forbidden, verify, body, signature, now=NOW + 3600)

    def assertBad(self, payload, detail_part):
        e = self.assertRaises(BadRequest, verify, *control.sign_control(TRACKER, payload))
        self.assertEqual(e.status, 400)
        self.assertIn(detail_part, e.detail)

    def test_missing_or_invalid_issued(self):
        for issued in (..., None, "1700000000", True, [NOW]):
            with self.subTest(issued=issued):
                self.assertBad(make_bridge(issued=issued), "issued")

    def test_unknown_type(self):
        for kind in (..., None, "open_proxy", "MAKE_BRIDGE", ["make_bridge"]):
            with self.subTest(kind=kind):
                self.assertBad(make_bridge(type=kind), "unknown type")

    def test_missing_or_invalid_bridge_cid(self):
        for value in (..., None, "control", BRIDGE.upper(), 5):
            with self.subTest(value=value):
                self.assertBad(make_bridge(bridge_CID=value), "bridge_CID")

    def test_missing_or_invalid_cid(self):
        for value in (..., None, "control", CIRCUIT.upper(), 5):
            with self.subTest(value=value):
                self.assertBad(make_bridge(CID=value), "CID")

    def test_missing_or_invalid_transfer(self):
        for value in (..., None, "", "x" * 129, 7):
            with self.subTest(value=value):
                self.assertBad(make_bridge(transfer=value), "transfer")

    def test_missing_or_invalid_to(self):
        for value in (..., None, "", "h:0", 5):
            with self.subTest(value=value):
                self.assertBad(make_bridge(to=value), "control.to")

    def test_receive_bridge_missing_from(self):
        payload = {"type": "receive_bridge", "issued": NOW, "CID": CIRCUIT, "bridge_CID": BRIDGE}
        self.assertBad(payload, "control.from")

    def test_payload_not_an_object(self):
        for payload in ("AAAA", [1], 5):
            with self.subTest(payload=payload):
                body = orjson.dumps({"CID": "control", "payload": payload})
                signature = crypto.sign_body(TRACKER, body)
                self.assertRaises(BadRequest, control.verify_control, body, signature, payload,
                                  TRACKER.public_key(), NOW, 60.0, 5000)
