"""cells.py: the POST / cell, the EXTEND message and the 200 answers (PROTOCOL.md §3, §4, §5);
and the defaults every role shares beside them in wire.py and identity.py."""

import orjson
from twisted.internet import defer
from twisted.trial import unittest

from onion_twisted import PROTOCOL
from onion_twisted.protocol import cells, wire
from onion_twisted.protocol.errors import BadRequest, NextHopFailed
from onion_twisted.protocol.identity import identity_json

CID = "35ce8f75-6b57-4824-8597-dd756c75a9c5"


def body(**fields) -> bytes:
    return orjson.dumps(fields)


class ParseCellTests(unittest.SynchronousTestCase):
    def assertBad(self, data: bytes, detail_part: str):
        e = self.assertRaises(BadRequest, cells.parse_cell, data)
        self.assertEqual(e.status, 400)
        self.assertEqual(e.body()["error"], "bad_request")
        self.assertIn(detail_part, e.detail)
        return e

    def test_base64_payload(self):
        cell = cells.parse_cell(body(CID=CID, payload="AAEC"))
        self.assertEqual((cell.cid, cell.payload, cell.destroy, cell.is_control), (CID, "AAEC", False, False))
        self.assertEqual(cells.payload_bytes(cell), b"\x00\x01\x02")

    def test_object_payload(self):
        cell = cells.parse_cell(body(CID=CID, payload={"type": "ls", "files": []}))
        self.assertEqual(cells.payload_object(cell), {"type": "ls", "files": []})

    def test_control(self):
        cell = cells.parse_cell(body(CID="control", payload={"type": "drop_bridge"}))
        self.assertTrue(cell.is_control)

    def test_destroy(self):
        cell = cells.parse_cell(body(CID=CID, destroy=True))
        self.assertEqual((cell.cid, cell.payload, cell.destroy), (CID, None, True))

    def test_destroy_false_is_a_normal_cell(self):
        self.assertFalse(cells.parse_cell(body(CID=CID, destroy=False, payload="")).destroy)

    def test_unknown_fields_ignored(self):
        self.assertEqual(cells.parse_cell(body(CID=CID, payload="", extra=[1])).payload, "")

    def test_not_json(self):
        for data in (b"", b"not json", b'{"CID":', b"\xff\xfe"):
            with self.subTest(data=data):
                self.assertBad(data, "JSON")

    def test_not_an_object(self):
        for data in (b"[]", b'"CID"', b"42", b"null"):
            with self.subTest(data=data):
                self.assertBad(data, "not a JSON object")

    def test_missing_cid(self):
        self.assertBad(body(payload="AAAA"), "missing field CID")
        self.assertBad(body(CID=None, payload="AAAA"), "missing field CID")

    def test_cid_wrong_type(self):
        for cid in (5, [CID], {"CID": CID}, True):
            with self.subTest(cid=cid):
                self.assertBad(body(CID=cid, payload="AAAA"), "CID is not a string")

    def test_cid_not_canonical(self):
        for cid in (CID.upper(), CID.replace("-", ""), "{" + CID + "}", CID + " ", "",
                    "35ce8f75-6b57-1824-8597-dd756c75a9c5",  # version 1
                    "35ce8f75-6b57-4824-0597-dd756c75a9c5",  # wrong variant
                    "Control", "CONTROL", "control "):
            with self.subTest(cid=cid):
                self.assertBad(body(CID=cid, payload="AAAA"), "UUIDv4")

    def test_destroy_not_bool(self):
        for destroy in (1, 0, "true", None, [], {}):
            with self.subTest(destroy=destroy):
                self.assertBad(body(CID=CID, destroy=destroy), "destroy")

    def test_destroy_with_payload(self):
        # /2's layered destroy (§14) carries one base64 layer; nothing else.
        cell = cells.parse_cell(body(CID=CID, destroy=True, payload="AAAA"))
        self.assertEqual((cell.destroy, cells.payload_bytes(cell)), (True, b"\0\0\0"))
        self.assertBad(body(CID=CID, destroy=True, payload={}), "no payload")
        self.assertBad(body(CID=CID, destroy=True, payload=[1]), "no payload")

    def test_destroy_on_control(self):
        self.assertBad(body(CID="control", destroy=True), "control")

    def test_missing_payload(self):
        self.assertBad(body(CID=CID), "missing field payload")
        self.assertBad(body(CID=CID, payload=None), "missing field payload")
        self.assertBad(body(CID="control"), "missing field payload")

    def test_payload_wrong_type(self):
        for payload in (5, 1.5, True, False, ["AAAA"]):
            with self.subTest(payload=payload):
                self.assertBad(body(CID=CID, payload=payload), "payload is neither")

    def test_payload_bytes_wants_base64_string(self):
        self.assertRaises(BadRequest, cells.payload_bytes, cells.parse_cell(body(CID=CID, payload={})))
        e = self.assertRaises(BadRequest, cells.payload_bytes, cells.parse_cell(body(CID=CID, payload="A")))
        self.assertIn("base64", e.detail)

    def test_payload_object_wants_object(self):
        self.assertRaises(BadRequest, cells.payload_object, cells.parse_cell(body(CID=CID, payload="AAAA")))


class EncodeTests(unittest.SynchronousTestCase):
    def test_encode_cell_bytes_round_trip(self):
        data = bytes(range(256))
        encoded = cells.encode_cell(CID, data)
        self.assertEqual(orjson.loads(encoded), {"CID": CID, "payload": wire.b64encode(data)})
        cell = cells.parse_cell(encoded)
        self.assertEqual((cell.cid, cells.payload_bytes(cell), cell.destroy), (CID, data, False))

    def test_encode_cell_bytearray_and_memoryview(self):
        for data in (bytearray(b"abc"), memoryview(b"abc")):
            with self.subTest(kind=type(data).__name__):
                self.assertEqual(cells.payload_bytes(cells.parse_cell(cells.encode_cell(CID, data))), b"abc")

    def test_encode_cell_object_round_trip(self):
        message = {"type": "file_chunk", "transfer": "t", "chunk_idx": 3, "data": "AAAA"}
        cell = cells.parse_cell(cells.encode_cell(CID, message))
        self.assertEqual(cells.payload_object(cell), message)

    def test_encode_cell_base64_string_passes_through(self):
        self.assertEqual(cells.parse_cell(cells.encode_cell(CID, "AAAA")).payload, "AAAA")

    def test_encode_destroy_round_trip(self):
        encoded = cells.encode_destroy(CID)
        self.assertEqual(orjson.loads(encoded), {"CID": CID, "destroy": True})
        cell = cells.parse_cell(encoded)
        self.assertEqual((cell.cid, cell.payload, cell.destroy), (CID, None, True))

    def test_created_constant(self):
        self.assertEqual(orjson.loads(cells.CREATED), {"type": "created"})

    def test_object_cell_is_spliced_and_parses_back_with_its_bytes(self):
        obj = b'{"type":"request","file":"a"}'
        encoded = cells.encode_object_cell(CID, obj)
        self.assertEqual(encoded, b'{"CID":"' + CID.encode() + b'","payload":' + obj + b"}")
        cell = cells.parse_cell(encoded)
        self.assertEqual((cell.payload, cell.raw_object), ({"type": "request", "file": "a"}, obj))


class ReplyEncodeTests(unittest.SynchronousTestCase):
    """Every 200 answer of a node and of the tracker, read back by parse_reply."""

    def test_empty(self):
        self.assertEqual(cells.EMPTY, b"{}")
        self.assertIsNone(cells.parse_reply(cells.EMPTY))

    def test_layer_reply(self):
        encoded = cells.encode_reply_layer(b"\x00layer")
        self.assertEqual(encoded, b'{"payload":"AGxheWVy"}')
        self.assertEqual(wire.b64decode(cells.parse_reply(encoded)), b"\x00layer")

    def test_object_reply(self):
        encoded = cells.encode_reply_object({"type": "files", "files": []})
        self.assertEqual(encoded, b'{"payload":{"type":"files","files":[]}}')
        self.assertEqual(cells.parse_reply(encoded), {"type": "files", "files": []})
        self.assertEqual(cells.encode_reply_object_bytes(b'{"type":"list"}'), b'{"payload":{"type":"list"}}')


class SharedDefaultsTests(unittest.SynchronousTestCase):
    def test_literal_ip_resolves_only_ip_literals(self):
        ip = self.successResultOf(defer.ensureDeferred(wire.literal_ip(wire.Address("::1", 5000))))
        self.assertEqual(ip, "::1")
        self.failureResultOf(defer.ensureDeferred(wire.literal_ip(wire.Address("relay.test", 5000))),
                             NextHopFailed)

    def test_signature_header_is_read_as_bytes(self):
        self.assertEqual(wire.SIGNATURE_HEADER, b"X-Onion-Signature")

    def test_identity_json(self):
        self.assertEqual(identity_json("peer", "127.0.0.1:5000"),
                         b'{"role":"peer","address":"127.0.0.1:5000","public_key":null,"fingerprint":null,'
                         b'"protocol":"onion-http/2","protocols":["onion-http/1","onion-http/2"]}')
        self.assertEqual(PROTOCOL, "onion-http/2")
        self.assertEqual(orjson.loads(identity_json("node", "a:1", "PEM", "f"))["public_key"], "PEM")
        only_v2 = orjson.loads(identity_json("node", "a:1", "PEM", "f", protocols=("onion-http/2",),
                                             onion_key=bytes(range(32))))
        self.assertEqual(only_v2["protocols"], ["onion-http/2"])
        self.assertEqual(only_v2["onion_key"], "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")


class ParseExtendTests(unittest.SynchronousTestCase):
    def test_extend_to_node(self):
        extend = cells.parse_extend(body(to="127.0.0.12:5000", relay="AAAA"), 5000)
        self.assertEqual(extend.to, wire.Address("127.0.0.12", 5000))
        self.assertEqual(extend.relay, "AAAA")
        self.assertFalse(extend.to_tracker)

    def test_extend_to_tracker_with_default_port(self):
        extend = cells.parse_extend(body(to="127.0.0.1", relay={"type": "ls", "files": []}), 6000)
        self.assertEqual(extend.to, wire.Address("127.0.0.1", 6000))
        self.assertTrue(extend.to_tracker)

    def assertBad(self, data: bytes, detail_part: str):
        e = self.assertRaises(BadRequest, cells.parse_extend, data, 5000)
        self.assertIn(detail_part, e.detail)

    def test_not_json(self):
        self.assertBad(b"\x00\x01garbage", "JSON")

    def test_not_object(self):
        self.assertBad(b'["127.0.0.12", "AAAA"]', "extend is not a JSON object")

    def test_missing_to(self):
        self.assertBad(body(relay="AAAA"), "missing field to")

    def test_missing_relay(self):
        self.assertBad(body(to="127.0.0.12"), "missing field relay")

    def test_bad_address(self):
        for to in (None, 5, "", "127.0.0.12:0", "[::1", "a b"):
            with self.subTest(to=to):
                self.assertBad(body(to=to, relay="AAAA"), "extend.to")

    def test_relay_bad_base64(self):
        self.assertBad(body(to="127.0.0.12", relay="not base64!"), "extend.relay")

    def test_relay_wrong_type(self):
        for relay in (None, 5, ["AAAA"], True):
            with self.subTest(relay=relay):
                self.assertBad(body(to="127.0.0.12", relay=relay), "relay is neither")


class ParseReplyTests(unittest.SynchronousTestCase):
    def test_empty(self):
        self.assertIsNone(cells.parse_reply(b"{}"))

    def test_base64_and_object(self):
        self.assertEqual(cells.parse_reply(b'{"payload":"AAAA"}'), "AAAA")
        self.assertEqual(cells.parse_reply(b'{"payload":{"type":"files"}}'), {"type": "files"})

    def test_malformed(self):
        for data in (b"", b"[]", b'{"payload":5}', b'{"payload":["x"]}'):
            with self.subTest(data=data):
                self.assertRaises(BadRequest, cells.parse_reply, data)


class RawObjectTests(unittest.SynchronousTestCase):
    """An object payload is relayed as the bytes it came in, when the body is exactly a cell."""

    cid = "35ce8f75-6b57-4824-8597-dd756c75a9c5"

    def test_spliced_cell_keeps_the_object_bytes(self):
        body = b'{"CID":"' + self.cid.encode() + b'","payload":{"type":"file_chunk", "data":"AAAA"}}'
        cell = cells.parse_cell(body)
        self.assertEqual(cell.object_bytes(), b'{"type":"file_chunk", "data":"AAAA"}')

    def test_other_layouts_are_serialised_again(self):
        for body in (
            b'{"payload":{"type":"list"},"CID":"' + self.cid.encode() + b'"}',
            b'{"CID":"' + self.cid.encode() + b'","payload":{"type":"list"},"extra":1}',
            b'{"CID": "' + self.cid.encode() + b'", "payload": {"type": "list"}}',
        ):
            cell = cells.parse_cell(body)
            self.assertIsNone(cell.raw_object)
            self.assertEqual(wire.loads(cell.object_bytes()), {"type": "list"})
