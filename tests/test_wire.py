"""wire.py: addresses, circuit ids, base64 and JSON objects (PROTOCOL.md §1, §3)."""

import uuid

from twisted.trial import unittest

from onion_twisted.protocol import wire
from onion_twisted.protocol.errors import BadRequest


class ParseAddressTests(unittest.SynchronousTestCase):
    def test_bare_ipv4_gets_network_port(self):
        self.assertEqual(wire.parse_address("127.0.0.11"), wire.Address("127.0.0.11", 5000))

    def test_bare_host_uses_given_default_port(self):
        self.assertEqual(wire.parse_address("10.0.0.1", default_port=6000), wire.Address("10.0.0.1", 6000))

    def test_ipv4_with_port(self):
        self.assertEqual(wire.parse_address("10.1.2.3:8080"), wire.Address("10.1.2.3", 8080))

    def test_bracketed_ipv6_with_port(self):
        self.assertEqual(wire.parse_address("[::1]:5001"), wire.Address("::1", 5001))

    def test_bracketed_ipv6_without_port(self):
        self.assertEqual(wire.parse_address("[2001:DB8::1]"), wire.Address("2001:db8::1", 5000))

    def test_ipv6_str_and_url_are_bracketed(self):
        address = wire.parse_address("[::1]:5001")
        self.assertEqual(str(address), "[::1]:5001")
        self.assertEqual(address.url("/nodes"), "http://[::1]:5001/nodes")

    def test_dns_name_is_lowercased_and_has_no_ip(self):
        address = wire.parse_address("Tracker.Example.ORG:5000")
        self.assertEqual(address, wire.Address("tracker.example.org", 5000))
        self.assertIsNone(address.ip)

    def test_single_label_dns_name(self):
        self.assertEqual(wire.parse_address("localhost"), wire.Address("localhost", 5000))

    def test_ip_property_of_literal(self):
        self.assertEqual(wire.parse_address("127.0.0.12").ip, "127.0.0.12")

    def assertRefused(self, text, **kw):
        e = self.assertRaises(BadRequest, wire.parse_address, text, **kw)
        self.assertEqual(e.status, 400)
        self.assertTrue(e.detail)
        return e

    def test_bad_ports(self):
        for text in ("h:0", "h:65536", "h:99999", "h:123456", "h:", "h:abc", "h:+1", "h:-1",
                     "h: 80", "h:80 ", "1.2.3.4:1e3", "[::1]:", "[::1]:70000"):
            with self.subTest(text=text):
                self.assertRefused(text)

    def test_non_ascii_digit_ports(self):
        # "²".isdigit() is True but int("²") raises ValueError; "٣" is a digit int() accepts.
        for text in ("1.2.3.4:²", "1.2.3.4:٣", "h:５０００"):
            with self.subTest(text=text):
                self.assertRefused(text)

    def test_field_name_in_detail(self):
        e = self.assertRefused("h:0", field="extend.to")
        self.assertIn("extend.to", e.detail)

    def test_junk(self):
        for text in ("", " ", "h:1:2", "::1", "::1:5000", "[::1", "[::1]5000", "[::1]:50:00",
                     "[127.0.0.1]:5000", "[nothex::1]", "-host", "host-", "ho st", "ho_st",
                     "a..b", ".a", "1.2.3", "256.1.1.1", "01.2.3.4", "1.2.3.4.5",
                     "exämple.org", "a" * 64 + ".org", "host/path", "http://host", "h" * 301,
                     "[fe80::1%eth0]:5000", "[::1%x y]"):
            with self.subTest(text=text):
                self.assertRefused(text)

    def test_not_a_string(self):
        for value in (None, 5000, ["127.0.0.1"], {"host": "x"}, b"127.0.0.1"):
            with self.subTest(value=value):
                self.assertRefused(value)

    def test_long_dns_name_within_limits(self):
        name = ".".join(["a" * 63] * 3)  # 191 characters
        self.assertEqual(wire.parse_address(name).host, name)


class CircuitIdTests(unittest.SynchronousTestCase):
    def test_new_circuit_id_is_canonical_uuid4(self):
        cid = wire.new_circuit_id()
        self.assertTrue(wire.is_circuit_id(cid))
        self.assertEqual(str(uuid.UUID(cid)), cid)
        self.assertEqual(uuid.UUID(cid).version, 4)

    def test_canonical_lowercase_uuid4_accepted(self):
        self.assertTrue(wire.is_circuit_id("35ce8f75-6b57-4824-8597-dd756c75a9c5"))

    def test_uppercase_refused(self):
        self.assertFalse(wire.is_circuit_id("35CE8F75-6B57-4824-8597-DD756C75A9C5"))

    def test_other_versions_refused(self):
        self.assertFalse(wire.is_circuit_id(str(uuid.uuid1())))
        self.assertFalse(wire.is_circuit_id("35ce8f75-6b57-5824-8597-dd756c75a9c5"))

    def test_wrong_variant_refused(self):
        self.assertFalse(wire.is_circuit_id("35ce8f75-6b57-4824-c597-dd756c75a9c5"))

    def test_non_canonical_forms_refused(self):
        cid = "35ce8f75-6b57-4824-8597-dd756c75a9c5"
        for text in (cid.replace("-", ""), "{" + cid + "}", "urn:uuid:" + cid, " " + cid, cid + "\n",
                     cid[:-1], cid + "0", cid.replace("-", "_")):
            with self.subTest(text=text):
                self.assertFalse(wire.is_circuit_id(text))

    def test_control_word_is_not_a_circuit_id(self):
        self.assertFalse(wire.is_circuit_id(wire.CONTROL_CID))

    def test_non_strings_refused(self):
        for value in (None, 5, b"35ce8f75-6b57-4824-8597-dd756c75a9c5", uuid.uuid4()):
            with self.subTest(value=value):
                self.assertFalse(wire.is_circuit_id(value))


class Base64Tests(unittest.SynchronousTestCase):
    def test_round_trip(self):
        data = bytes(range(256)) * 3
        self.assertEqual(wire.b64decode(wire.b64encode(data)), data)

    def test_standard_alphabet_with_padding(self):
        self.assertEqual(wire.b64encode(b"\xfb\xff"), "+/8=")
        self.assertEqual(wire.b64decode("+/8="), b"\xfb\xff")

    def test_invalid_refused(self):
        for text in ("YWI", "-_8=", "YW Jj", "YWJj\n", "é", "YW=I", "====", "@@@@"):
            with self.subTest(text=text):
                e = self.assertRaises(BadRequest, wire.b64decode, text, "payload")
                self.assertIn("payload", e.detail)

    def test_not_a_string_refused(self):
        for value in (None, 12, bytearray(b"YWJj"), ["YWJj"], {"a": "YWJj"}):
            with self.subTest(value=value):
                self.assertRaises(BadRequest, wire.b64decode, value)

    def test_bytes_are_taken_as_decoded_already(self):
        # JSON never yields bytes: they come from loads_with_base64, decoded and checked.
        self.assertEqual(wire.b64decode(b"YWJj"), b"YWJj")

    def test_field_name_in_detail(self):
        e = self.assertRaises(BadRequest, wire.b64decode, "!", "extend.relay")
        self.assertIn("extend.relay", e.detail)


class JsonTests(unittest.SynchronousTestCase):
    def test_object_accepted(self):
        self.assertEqual(wire.loads_object(b'{"a": [1, "b"], "c": null}'), {"a": [1, "b"], "c": None})

    def test_dumps_is_compact_utf8(self):
        self.assertEqual(wire.dumps({"type": "created"}), b'{"type":"created"}')
        self.assertEqual(wire.dumps({"n": "é"}), '{"n":"é"}'.encode("utf-8"))

    def test_non_objects_refused(self):
        for body in (b"[]", b'"x"', b"1", b"null", b"true"):
            with self.subTest(body=body):
                e = self.assertRaises(BadRequest, wire.loads_object, body, "reply")
                self.assertIn("reply", e.detail)

    def test_malformed_refused(self):
        for body in (b"", b"{", b'{"a":1}x', b"{'a':1}", b'{"a":NaN}', b'{"a":1,}', b"\x00"):
            with self.subTest(body=body):
                self.assertRaises(BadRequest, wire.loads_object, body)

    def test_invalid_utf8_refused(self):
        for body in (b'{"a":"\xff"}', b'{"a":"\xed\xa0\x80"}', b'{"\xc3":1}'):
            with self.subTest(body=body):
                e = self.assertRaises(BadRequest, wire.loads_object, body)
                self.assertEqual(e.status, 400)

    def test_lone_surrogate_escape_refused(self):
        self.assertRaises(BadRequest, wire.loads_object, b'{"a":"\\ud800"}')

    def test_deep_nesting_refused(self):
        # The outer object is one level: MAX_DEPTH levels of arrays make MAX_DEPTH + 1.
        for depth in (wire.MAX_DEPTH, 300, 2000, 100_000):
            body = b'{"a":' + b"[" * depth + b"]" * depth + b"}"
            with self.subTest(depth=depth):
                self.assertRaises(BadRequest, wire.loads_object, body)

    def test_deep_nesting_of_objects_refused(self):
        depth = wire.MAX_DEPTH + 1
        body = b'{"a":' * depth + b"1" + b"}" * depth
        self.assertRaises(BadRequest, wire.loads_object, body)

    def test_nesting_at_limit_accepted_and_re_encodable(self):
        depth = wire.MAX_DEPTH - 1  # plus the outer object: exactly MAX_DEPTH levels
        body = b'{"a":' + b"[" * depth + b"]" * depth + b"}"
        obj = wire.loads_object(body)
        # Whatever loads accepts, dumps can encode again, even inside a cell.
        self.assertEqual(wire.dumps({"CID": "x", "payload": obj}), b'{"CID":"x","payload":' + body + b"}")

    def test_many_brackets_inside_strings_accepted(self):
        obj = wire.loads_object(wire.dumps({"s": "[" * 5000 + "{" * 5000}))
        self.assertEqual(len(obj["s"]), 10000)

    def test_wide_flat_structure_accepted(self):
        body = b'{"a":[' + b",".join([b"[]"] * 5000) + b"]}"
        self.assertEqual(len(wire.loads_object(body)["a"]), 5000)

    def test_int_beyond_double_range_refused(self):
        self.assertRaises(BadRequest, wire.loads_object, b'{"a":' + b"9" * 400 + b"}")
        self.assertRaises(BadRequest, wire.loads_object, b'{"a":-' + b"9" * 5000 + b"}")
        self.assertRaises(BadRequest, wire.loads_object, b'{"a":1e400}')

    def test_int_beyond_64_bits_is_never_a_bignum(self):
        # orjson turns it into a float: a field check for int refuses it, and
        # no arbitrary-precision arithmetic is done on hostile input.
        value = wire.loads_object(b'{"a":' + b"9" * 30 + b"}")["a"]
        self.assertNotIsInstance(value, int)


class WithBase64Tests(unittest.SynchronousTestCase):
    """``with_base64`` splices base64 into JSON: the same document orjson writes."""

    def test_same_document_as_orjson(self):
        data = bytes(range(256)) * 3
        for obj in ({}, {"CID": "control"}, {"type": "file_chunk", "chunk_idx": 3, "file": "a \"b\" \\ c"}):
            spliced = wire.with_base64(obj, "data", data)
            self.assertEqual(wire.loads(spliced), dict(obj, data=wire.b64encode(data)))

    def test_empty_data(self):
        self.assertEqual(wire.loads(wire.with_base64({"a": 1}, "payload", b"")), {"a": 1, "payload": ""})


class LoadsWithBase64Tests(unittest.SynchronousTestCase):
    """The shortcut for long base64 strings answers exactly what a full parse answers."""

    DATA = bytes(range(256)) * 8                     # 2 KiB: over LONG_STRING once encoded
    TEXT = __import__("base64").b64encode(DATA).decode("ascii")

    def full(self, body: bytes):
        """What the plain parse says: (object with the value decoded, None) or (None, error detail)."""
        try:
            obj = wire.loads_object(body)
        except BadRequest as e:
            return None, e.detail
        return obj, None

    def same_as_full_parse(self, body: bytes, path=("payload",)):
        expected, error = self.full(body)
        try:
            obj, decoded = wire.loads_with_base64(body, (path,))
        except BadRequest as e:
            self.assertEqual(e.detail, error)
            return None
        self.assertIsNone(error)
        if decoded:
            holder, full_holder = obj, expected
            for step in path[:-1]:
                holder, full_holder = holder[step], full_holder[step]
            self.assertIsInstance(holder[path[-1]], bytes)
            self.assertEqual(holder[path[-1]], wire.b64decode(full_holder[path[-1]]))
            holder[path[-1]] = full_holder[path[-1]]
        self.assertEqual(obj, expected)
        return decoded

    def test_canonical_cell_takes_the_shortcut(self):
        body = wire.with_base64({"CID": "c"}, "payload", self.DATA)
        obj, decoded = wire.loads_with_base64(body, (("payload",),))
        self.assertTrue(decoded)
        self.assertEqual(obj, {"CID": "c", "payload": self.DATA})

    def test_other_formatting_takes_it_too(self):
        body = ('{ "payload" :\n "%s" , "CID": "c"}' % self.TEXT).encode()
        self.assertTrue(self.same_as_full_parse(body))

    def test_nested_path(self):
        body = ('{"CID":"c","payload":{"type":"file_chunk","data":"%s"}}' % self.TEXT).encode()
        self.assertTrue(self.same_as_full_parse(body, ("payload", "data")))

    def test_short_strings_are_parsed_whole(self):
        self.assertFalse(self.same_as_full_parse(b'{"CID":"c","payload":"YWJj"}'))

    def test_cases_where_only_a_full_parse_is_right(self):
        t = self.TEXT
        cases = {
            "escaped slash in the value": '{"payload":"%s\\/%s"}' % (t, t),
            "escaped quote in the value": '{"payload":"%s\\"x"}' % t,
            "the key escaped, another one nested": '{"x":{"payload":"%s"},"\\u0070ayload":""}' % t,
            "a duplicate key": '{"payload":"%s","payload":"YWJj"}' % t,
            "the key as a nested key only": '{"x":{"payload":"%s"}}' % t,
            "not base64": '{"payload":"%s@@"}' % t,
            "the value is an object": '{"payload":{"data":"%s"}}' % t,
            "malformed after the value": '{"payload":"%s",}' % t,
            "trailing garbage": '{"payload":"%s"} x' % t,
            "not an object": '["payload","%s"]' % t,
            "escape in another field": '{"payload":"%s","x":"\\u00e9"}' % t,
            "the marker inside another string": '{"a":"\\"payload\\":\\"%s\\""}' % t,
        }
        for name, text in cases.items():
            with self.subTest(name):
                decoded = self.same_as_full_parse(text.encode())
                self.assertFalse(decoded, name)

    def test_deep_nesting_outside_the_value_refused(self):
        body = ('{"payload":"%s","x":%s1%s}' % (self.TEXT, "[" * 200, "]" * 200)).encode()
        self.assertRaises(BadRequest, wire.loads_with_base64, body, (("payload",),))

    def test_random_mutations_agree_with_the_full_parse(self):
        import random

        rng = random.Random(7)
        base = wire.with_base64({"CID": "c", "destroy": False}, "payload", self.DATA)
        alphabet = b'"\\{}[],: \n\tA=/+x\x00\xff'
        for _ in range(3000):
            body = bytearray(base)
            for _ in range(rng.randint(1, 3)):
                body[rng.randrange(len(body))] = rng.choice(alphabet)
            self.same_as_full_parse(bytes(body))
