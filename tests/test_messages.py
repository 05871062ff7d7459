"""The file messages of PROTOCOL.md §8 (protocol/messages.py), with no I/O.

For each message: what its builder writes (key order included, where the
bytes are compared or cached), that its parser reads it back, and what the
parser refuses. The fields they share (names, sha256, chunk bounds) first.
"""

from __future__ import annotations

from twisted.trial import unittest

from onion_twisted.protocol import bridged, messages, wire
from onion_twisted.protocol.messages import (DEFAULT_CHUNK, MAX_CHUNK, MAX_RANGES, MIN_CHUNK, FileRequest, MessageError,
                                            SharedFile, check_name, check_sha256, parse_files, parse_request)

from tests.support.tracker_fakes import SHA_A

TRANSFER = "5e0c1c5e-0000-4000-8000-000000000001"


class ErrorCase:
    def assertMessageError(self, error, f, *args):
        e = self.assertRaises(MessageError, f, *args)
        self.assertEqual(e.error, error)
        self.assertEqual(e.reply(), {"type": "error", "error": error, "detail": e.detail})
        return e


class NameTests(ErrorCase, unittest.SynchronousTestCase):
    def test_plain_names_accepted(self):
        for name in ("a.txt", "résumé.pdf", "..hidden", "a..b", ".profile", "x" * 255, "é" * 127):
            self.assertEqual(check_name(name), name)

    def test_path_separators_and_dots_refused(self):
        for name in ("a/b", "/etc", "dir/", "a\\b", ".", "..", "../x"):
            self.assertMessageError("bad_request", check_name, name)

    def test_nul_and_control_characters_refused(self):
        for name in ("a\x00b", "\x00", "a\nb", "tab\there", "\x1f"):
            self.assertMessageError("bad_request", check_name, name)

    def test_look_alike_and_invisible_characters_refused(self):
        for char in ("\x7f", "\x85", "\x9f", "\u202e", "\u202a", "\u2066", "\u2069", "\u200b", "\u200c",
                     "\u200d", "\u2060", "\ufeff", "\u200e", "\u200f", "\u061c"):
            e = self.assertMessageError("bad_request", check_name, f"invoice{char}gpj.exe")
            self.assertIn("invisible", e.detail)

    def test_names_are_normalised_to_nfc(self):
        decomposed = "re\u0301sume\u0301.pdf"  # e + combining acute
        self.assertEqual(check_name(decomposed), "r\u00e9sum\u00e9.pdf")
        self.assertEqual(check_name("r\u00e9sum\u00e9.pdf"), "r\u00e9sum\u00e9.pdf")
        # Both spellings announced by two circuits are one catalogue entry.
        files = parse_files([decomposed, "r\u00e9sum\u00e9.pdf"], 10)
        self.assertEqual([f.name for f in files], ["r\u00e9sum\u00e9.pdf"])

    def test_too_long_refused_in_bytes(self):
        self.assertMessageError("bad_request", check_name, "x" * 256)
        self.assertMessageError("bad_request", check_name, "é" * 128)  # 256 UTF-8 bytes

    def test_empty_or_not_a_string_refused(self):
        for name in ("", None, 3, ["a"], {"name": "a"}):
            self.assertMessageError("bad_request", check_name, name)

    def test_sha256_must_be_64_lowercase_hex(self):
        self.assertEqual(check_sha256(SHA_A), SHA_A)
        for bad in ("A" * 64, "a" * 63, "a" * 65, "g" * 64, "", None, 5, " " + "a" * 63):
            self.assertMessageError("bad_request", check_sha256, bad)


class ParseFilesTests(ErrorCase, unittest.SynchronousTestCase):
    def test_both_forms(self):
        files = parse_files(["a", {"name": "b", "size": 3, "sha256": SHA_A}, {"name": "c"}], 10)
        self.assertEqual(files, (SharedFile("a", None, None), SharedFile("b", 3, SHA_A),
                                 SharedFile("c", None, None)))

    def test_duplicates_collapse(self):
        files = parse_files(["a", "a", {"name": "a", "sha256": SHA_A}, {"name": "a", "size": 1, "sha256": SHA_A}], 10)
        self.assertEqual(len(files), 2)
        self.assertEqual({f.key for f in files}, {("a", None, None), ("a", SHA_A, None)})

    def test_bad_names_refused(self):
        for bad in ("a/b", "..", ".", "a\x00", "x" * 256, {"name": "../etc"}, {"name": "a/b", "sha256": SHA_A},
                    {"size": 3}):
            self.assertMessageError("bad_request", parse_files, ["ok", bad], 10)

    def test_bad_sha256_refused(self):
        self.assertMessageError("bad_request", parse_files, [{"name": "a", "sha256": "ABC"}], 10)
        self.assertMessageError("bad_request", parse_files, [{"name": "a", "sha256": "A" * 64}], 10)

    def test_bad_size_refused(self):
        for size in (-1, 1.5, True, "3", 2 ** 53 + 1, [1]):
            self.assertMessageError("bad_request", parse_files, [{"name": "a", "size": size}], 10)
        self.assertEqual(parse_files([{"name": "a", "size": 0}], 10)[0].size, 0)

    def test_too_many_files(self):
        self.assertEqual(len(parse_files([f"f{i}" for i in range(3)], 3)), 3)
        self.assertMessageError("too_many_files", parse_files, [f"f{i}" for i in range(4)], 3)

    def test_not_a_list_or_odd_elements(self):
        for files in (None, "a", {"a": 1}, 3):
            self.assertMessageError("bad_request", parse_files, files, 10)
        for element in (3, None, ["a"], True):
            self.assertMessageError("bad_request", parse_files, [element], 10)


class ParseRequestTests(ErrorCase, unittest.SynchronousTestCase):
    def test_defaults(self):
        self.assertEqual(parse_request({"file": "a"}), FileRequest("a", None, DEFAULT_CHUNK, None))
        self.assertEqual(parse_request({"file": "a", "chunk_size": None}).chunk_size, DEFAULT_CHUNK)

    def test_chunk_size_bounds(self):
        self.assertEqual(parse_request({"file": "a", "chunk_size": MIN_CHUNK}).chunk_size, 16 * 1024)
        self.assertEqual(parse_request({"file": "a", "chunk_size": MAX_CHUNK}).chunk_size, 4 * 1024 * 1024)
        for bad in (MIN_CHUNK - 1, MAX_CHUNK + 1, 0, -1, 65536.0, True, "65536"):
            self.assertMessageError("bad_request", parse_request, {"file": "a", "chunk_size": bad})

    def test_chunk_ranges(self):
        ok = parse_request({"file": "a", "sha256": SHA_A, "chunks": [[0, 1], [5, 9]]})
        self.assertEqual(ok, FileRequest("a", SHA_A, DEFAULT_CHUNK, [[0, 1], [5, 9]]))
        for bad in ([[1, 1]], [[2, 1]], [[-1, 3]], [[0, 1, 2]], [[0]], [0, 1], [["0", 1]], [[0, True]],
                    [[0, 1.5]], "0-1", {"0": 1}, [[0, 2 ** 53 + 1]]):
            self.assertMessageError("bad_request", parse_request, {"file": "a", "chunks": bad})

    def test_too_many_ranges(self):
        many = [[2 * i, 2 * i + 1] for i in range(MAX_RANGES + 1)]
        self.assertMessageError("bad_request", parse_request, {"file": "a", "chunks": many})

    def test_bad_file_or_sha256(self):
        for message in ({}, {"file": "a/b"}, {"file": ".."}, {"file": "a", "sha256": "x"},
                        {"file": "a", "sha256": SHA_A.upper()}):
            self.assertMessageError("bad_request", parse_request, message)



class ShaAndTransferIdTests(ErrorCase, unittest.SynchronousTestCase):
    def test_one_sha256_spelling(self):
        self.assertTrue(messages.is_sha256(SHA_A))
        self.assertIsNotNone(messages.SHA256_HEX.fullmatch(SHA_A))
        for bad in ("A" * 64, "a" * 63, "a" * 65, "g" * 64, None, b"a" * 64):
            self.assertFalse(messages.is_sha256(bad))

    def test_transfer_id_is_1_to_128_characters(self):
        for good in ("t", TRANSFER, "x" * 128):
            self.assertTrue(messages.is_transfer_id(good))
        for bad in ("", "x" * 129, None, 7, ["t"]):
            self.assertFalse(messages.is_transfer_id(bad))


class LsAndFilesMessageTests(unittest.SynchronousTestCase):
    def test_ls_round_trip(self):
        files = ["a", {"name": "b", "size": 3, "sha256": SHA_A}]
        message = messages.ls_message(files)
        self.assertEqual(wire.dumps(message), b'{"type":"ls","files":["a",{"name":"b","size":3,"sha256":"' +
                         SHA_A.encode() + b'"}]}')
        self.assertEqual(parse_files(wire.loads(wire.dumps(message))["files"], 10),
                         (SharedFile("a", None, None), SharedFile("b", 3, SHA_A)))

    def test_list(self):
        self.assertEqual(wire.dumps(messages.list_message()), b'{"type":"list"}')

    def test_files_round_trip(self):
        rows = [{"name": "a", "size": 3, "sha256": SHA_A, "sources": 2}]
        message = messages.files_message(rows)
        self.assertEqual(wire.dumps(message), b'{"type":"files","files":[{"name":"a","size":3,"sha256":"' +
                         SHA_A.encode() + b'","sources":2}]}')
        self.assertEqual(messages.parse_files_reply(wire.loads(wire.dumps(message))), rows)

    def test_files_reply_rows_that_are_not_objects_dropped(self):
        self.assertEqual(messages.parse_files_reply({"type": "files", "files": [3, "a", {"name": "b"}]}),
                         [{"name": "b"}])

    def test_not_a_files_reply(self):
        for message in (None, [], {"type": "error"}, {"type": "files"}, {"type": "files", "files": {}}):
            self.assertIsNone(messages.parse_files_reply(message))


class RequestMessageTests(ErrorCase, unittest.SynchronousTestCase):
    def test_requester_request_round_trip(self):
        message = messages.request_message("a", 65536, SHA_A, [[2, 5]])
        self.assertEqual(list(message), ["type", "file", "chunk_size", "sha256", "chunks"])
        self.assertEqual(parse_request(wire.loads(wire.dumps(message))), FileRequest("a", SHA_A, 65536, [[2, 5]]))

    def test_requester_request_without_the_optional_fields(self):
        self.assertEqual(messages.request_message("a", DEFAULT_CHUNK),
                         {"type": "request", "file": "a", "chunk_size": DEFAULT_CHUNK})
        self.assertEqual(parse_request(messages.request_message("a", DEFAULT_CHUNK)),
                         FileRequest("a", None, DEFAULT_CHUNK, None))

    def test_source_request_round_trip(self):
        ask = messages.source_request_message(FileRequest("a", None, 65536, [[0, 3]]), TRANSFER, SHA_A)
        self.assertEqual(wire.dumps(ask), b'{"type":"request","file":"a","transfer":"' + TRANSFER.encode() +
                         b'","chunk_size":65536,"sha256":"' + SHA_A.encode() + b'","chunks":[[0,3]]}')
        self.assertEqual(messages.parse_source_request(wire.loads(wire.dumps(ask))),
                         messages.SourceRequest("a", TRANSFER, 65536, SHA_A, [[0, 3]]))

    def test_source_request_without_chunks_or_sha256(self):
        ask = messages.source_request_message(FileRequest("a", None, DEFAULT_CHUNK, None), TRANSFER, None)
        self.assertNotIn("chunks", ask)
        self.assertEqual(messages.parse_source_request(ask),
                         messages.SourceRequest("a", TRANSFER, DEFAULT_CHUNK, None, None))

    def test_source_request_checked_as_the_tracker_checks_a_request(self):
        good = {"type": "request", "file": "a", "transfer": TRANSFER, "chunk_size": 65536}
        for change in ({"transfer": None}, {"transfer": ""}, {"transfer": "t" * 129}, {"transfer": 3},
                       {"file": "../a"}, {"file": None}, {"sha256": "ABC"},
                       {"chunk_size": MIN_CHUNK - 1}, {"chunk_size": MAX_CHUNK + 1}, {"chunk_size": True},
                       {"chunk_size": 65536.0}, {"chunks": [[1, 1]]}, {"chunks": [[0, True]]},
                       {"chunks": [[-1, 2]]}, {"chunks": "0-1"},
                       {"chunks": [[2 * i, 2 * i + 1] for i in range(MAX_RANGES + 1)]}):
            self.assertMessageError("bad_request", messages.parse_source_request, dict(good, **change))


class TransferMessageTests(ErrorCase, unittest.SynchronousTestCase):
    def test_round_trip(self):
        message = messages.transfer_message(TRANSFER, "a", 10, SHA_A, 65536)
        self.assertEqual(list(message), ["type", "transfer", "file", "size", "sha256", "chunk_size"])
        self.assertEqual(messages.parse_transfer(wire.loads(wire.dumps(message))),
                         messages.Transfer(TRANSFER, "a", 10, SHA_A, 65536))

    def test_size_and_sha256_may_be_unknown(self):
        message = messages.transfer_message(TRANSFER, "a", None, None, DEFAULT_CHUNK)
        self.assertEqual(messages.parse_transfer(message), messages.Transfer(TRANSFER, "a", None, None, DEFAULT_CHUNK))

    def test_refusals(self):
        good = messages.transfer_message(TRANSFER, "a", 10, SHA_A, 65536)
        for change in ({"transfer": ""}, {"transfer": None}, {"file": "a/b"}, {"size": -1}, {"size": True},
                       {"size": 2 ** 53 + 1}, {"sha256": SHA_A.upper()}, {"chunk_size": 1}, {"chunk_size": "65536"}):
            self.assertMessageError("bad_request", messages.parse_transfer, dict(good, **change))


class FileChunkMessageTests(ErrorCase, unittest.SynchronousTestCase):
    def test_round_trip(self):
        body = bridged.file_chunk_message(TRANSFER, "a", 2, 16384, 40000, b"\x00\xffdata")
        self.assertEqual(body, b'{"type":"file_chunk","transfer":"' + TRANSFER.encode() +
                         b'","file":"a","chunk_idx":2,"chunk_size":16384,"size":40000,"data":"AP9kYXRh"}')
        self.assertEqual(bridged.parse_file_chunk(wire.loads(body)),
                         bridged.FileChunk(TRANSFER, "a", 2, 16384, 40000, b"\x00\xffdata"))

    def test_data_decoded_in_passing_is_taken_as_it_is(self):
        message = wire.loads(bridged.file_chunk_message(TRANSFER, "a", 0, 16384, 4, b"abcd"))
        message["data"] = b"abcd"
        self.assertEqual(bridged.parse_file_chunk(message).data, b"abcd")

    def test_refusals(self):
        good = wire.loads(bridged.file_chunk_message(TRANSFER, "a", 0, 16384, 4, b"abcd"))
        for change in ({"transfer": ""}, {"file": ".."}, {"chunk_idx": -1}, {"chunk_idx": "0"},
                       {"chunk_idx": True}, {"size": -1}, {"size": None}, {"chunk_size": 0},
                       {"chunk_size": None}, {"data": "not base64!"}, {"data": None}):
            self.assertMessageError("bad_request", bridged.parse_file_chunk, dict(good, **change))
        del good["chunk_size"]
        self.assertMessageError("bad_request", bridged.parse_file_chunk, good)


class TransferEndMessageTests(ErrorCase, unittest.SynchronousTestCase):
    def test_ok_round_trip(self):
        message = bridged.transfer_end_message(TRANSFER)
        self.assertEqual(wire.dumps(message), b'{"type":"transfer_end","transfer":"' + TRANSFER.encode() +
                         b'","status":"ok"}')
        self.assertEqual(bridged.parse_transfer_end(message), bridged.TransferEnd(TRANSFER, True, None))

    def test_error_round_trip(self):
        message = bridged.transfer_end_message(TRANSFER, "no such file")
        self.assertEqual(list(message), ["type", "transfer", "status", "detail"])
        self.assertEqual(bridged.parse_transfer_end(wire.loads(wire.dumps(message))),
                         bridged.TransferEnd(TRANSFER, False, "no such file"))

    def test_refusals(self):
        good = bridged.transfer_end_message(TRANSFER)
        for change in ({"transfer": None}, {"status": "done"}, {"status": None}, {"detail": 3}):
            self.assertMessageError("bad_request", bridged.parse_transfer_end, dict(good, **change))


class ErrorMessageTests(ErrorCase, unittest.SynchronousTestCase):
    def test_round_trip(self):
        message = messages.error_message("not_found", "no circuit shares that file")
        self.assertEqual(wire.dumps(message),
                         b'{"type":"error","error":"not_found","detail":"no circuit shares that file"}')
        self.assertEqual(messages.parse_error(message), messages.ErrorReply("not_found", "no circuit shares that file"))

    def test_message_error_replies_with_it(self):
        self.assertEqual(MessageError("busy", "later").reply(), messages.error_message("busy", "later"))

    def test_refusals(self):
        for message in ({"type": "error"}, {"type": "error", "error": ""}, {"type": "error", "error": 3},
                        {"type": "error", "error": "busy", "detail": ["x"]}):
            self.assertMessageError("bad_request", messages.parse_error, message)


# --- §13: roots, keys, exclusions, and the end-to-end messages over the bridge ---------------

ROOT = "d" * 64
KEY = bytes(range(32))  # a requester's X25519 public key, as bytes
E2E_CHUNK = 262144


class LsRootTests(ErrorCase, unittest.SynchronousTestCase):
    def test_a_root_is_part_of_the_entry_key(self):
        files = parse_files([{"name": "a", "size": 5, "sha256": SHA_A, "root": ROOT},
                             {"name": "a", "size": 5, "sha256": SHA_A}], 10)
        self.assertEqual(files, (SharedFile("a", 5, SHA_A, ROOT), SharedFile("a", 5, SHA_A)))
        self.assertEqual({f.key for f in files}, {("a", SHA_A, ROOT), ("a", SHA_A, None)})

    def test_ls_round_trip_with_a_root(self):
        message = messages.ls_message([{"name": "a", "size": 5, "sha256": SHA_A, "root": ROOT}])
        self.assertEqual(parse_files(wire.loads(wire.dumps(message))["files"], 10),
                         (SharedFile("a", 5, SHA_A, ROOT),))

    def test_a_root_needs_a_size_and_the_sha256_spelling(self):
        for bad in ({"name": "a", "root": ROOT}, {"name": "a", "size": None, "root": ROOT},
                    {"name": "a", "size": 5, "root": ROOT.upper()}, {"name": "a", "size": 5, "root": ROOT[:63]},
                    {"name": "a", "size": 5, "root": 5}, {"name": "a", "size": 5, "root": ROOT + "d"}):
            self.assertMessageError("bad_request", parse_files, [bad], 10)


class E2ERequestTests(ErrorCase, unittest.SynchronousTestCase):
    def test_round_trip_with_root_key_and_exclude(self):
        message = messages.request_message("a", E2E_CHUNK, SHA_A, [[0, 2]], root=ROOT, key=KEY, exclude=["t1", "t2"])
        self.assertEqual(list(message), ["type", "file", "chunk_size", "sha256", "root", "chunks", "key", "exclude"])
        self.assertEqual(message["key"], wire.b64encode(KEY))
        self.assertEqual(parse_request(wire.loads(wire.dumps(message))),
                         FileRequest("a", SHA_A, E2E_CHUNK, [[0, 2]], ROOT, KEY, ("t1", "t2")))

    def test_without_them_a_section_8_request(self):
        message = messages.request_message("a", 65536)
        self.assertEqual(list(message), ["type", "file", "chunk_size"])
        self.assertEqual(parse_request(message), FileRequest("a", None, 65536, None, None, None, ()))

    def test_key_is_base64_of_32_bytes(self):
        for bad in (wire.b64encode(KEY[:31]), wire.b64encode(KEY + b"\x00"), "not base64!", "", 32, ["k"]):
            self.assertMessageError("bad_request", parse_request, {"file": "a", "chunk_size": E2E_CHUNK, "key": bad})

    def test_with_a_key_chunk_size_is_256_kib_times_a_power_of_two(self):
        for size in (E2E_CHUNK, 2 * E2E_CHUNK, 4 * E2E_CHUNK, 8 * E2E_CHUNK, MAX_CHUNK):
            self.assertEqual(parse_request(messages.request_message("a", size, key=KEY)).key, KEY)
        for size in (MIN_CHUNK, 65536, 3 * E2E_CHUNK, E2E_CHUNK + 1):
            self.assertEqual(parse_request(messages.request_message("a", size)).chunk_size, size)  # fine without
            self.assertMessageError("bad_request", parse_request, messages.request_message("a", size, key=KEY))
        # The default chunk size is one piece: a key alone is enough.
        self.assertEqual(parse_request({"file": "a", "key": wire.b64encode(KEY)}).chunk_size, DEFAULT_CHUNK)

    def test_exclude_is_at_most_64_transfer_ids(self):
        most = [f"t{i}" for i in range(messages.MAX_EXCLUDED)]
        self.assertEqual(parse_request({"file": "a", "exclude": most}).exclude, tuple(most))
        self.assertEqual(parse_request({"file": "a", "exclude": []}).exclude, ())
        for bad in (most + ["t64"], "t1", {"t1": 1}, [""], [3], [None], ["x" * 129]):
            self.assertMessageError("bad_request", parse_request, {"file": "a", "exclude": bad})

    def test_avoid_round_trip_after_exclude(self):
        message = messages.request_message("a", E2E_CHUNK, root=ROOT, key=KEY, exclude=["t1"], avoid=["t2", "t3"])
        self.assertEqual(list(message), ["type", "file", "chunk_size", "root", "key", "exclude", "avoid"])
        self.assertEqual(wire.dumps({k: message[k] for k in ("exclude", "avoid")}),
                         b'{"exclude":["t1"],"avoid":["t2","t3"]}')
        parsed = parse_request(wire.loads(wire.dumps(message)))
        self.assertEqual((parsed.exclude, parsed.avoid), (("t1",), ("t2", "t3")))
        self.assertNotIn("avoid", messages.request_message("a", E2E_CHUNK, avoid=()))  # none: no field
        self.assertEqual(parse_request({"file": "a", "avoid": None}).avoid, ())

    def test_avoid_is_at_most_64_transfer_ids(self):
        most = [f"t{i}" for i in range(messages.MAX_AVOIDED)]
        self.assertEqual(parse_request({"file": "a", "avoid": most}).avoid, tuple(most))
        self.assertEqual(parse_request({"file": "a", "avoid": []}).avoid, ())
        for bad in (most + ["t64"], "t1", {"t1": 1}, [""], [3], [None], ["x" * 129], 5):
            e = self.assertMessageError("bad_request", parse_request, {"file": "a", "avoid": bad})
            self.assertEqual(e.detail, "avoid must be a list of at most 64 transfer ids")

    def test_the_sharer_is_not_told_what_the_requester_avoids(self):
        request = parse_request({"file": "a", "avoid": ["t1"], "exclude": ["t2"]})
        ask = messages.source_request_message(request, TRANSFER, SHA_A)
        self.assertEqual(list(ask), ["type", "file", "transfer", "chunk_size", "sha256"])

    def test_root_spelling(self):
        self.assertEqual(parse_request({"file": "a", "root": ROOT}).root, ROOT)
        for bad in (ROOT.upper(), ROOT[:-1], 7, ""):
            self.assertMessageError("bad_request", parse_request, {"file": "a", "root": bad})


class E2ESourceRequestTests(ErrorCase, unittest.SynchronousTestCase):
    REQUEST = FileRequest("a", None, E2E_CHUNK, [[1, 4]], None, KEY, ("t0",))

    def test_end_to_end_round_trip_carries_the_key_and_root(self):
        ask = messages.source_request_message(self.REQUEST, TRANSFER, SHA_A, ROOT, e2e=True)
        self.assertEqual(list(ask), ["type", "file", "transfer", "chunk_size", "sha256", "root", "chunks", "key"])
        self.assertNotIn("exclude", ask)  # whom the requester excluded is none of the sharer's business
        self.assertEqual(messages.parse_source_request(wire.loads(wire.dumps(ask))),
                         messages.SourceRequest("a", TRANSFER, E2E_CHUNK, SHA_A, [[1, 4]], ROOT, KEY))

    def test_not_end_to_end_the_key_stays_at_the_tracker(self):
        ask = messages.source_request_message(self.REQUEST, TRANSFER, SHA_A, ROOT, e2e=False)
        self.assertNotIn("key", ask)
        self.assertEqual(messages.parse_source_request(ask).root, ROOT)
        self.assertIsNone(messages.parse_source_request(ask).key)

    def test_a_key_without_a_root_is_refused(self):
        ask = messages.source_request_message(self.REQUEST, TRANSFER, SHA_A, ROOT, e2e=True)
        del ask["root"]
        self.assertMessageError("bad_request", messages.parse_source_request, ask)
        for change in ({"chunk_size": 65536}, {"key": wire.b64encode(KEY[:31])}, {"root": ROOT.upper()}):
            good = messages.source_request_message(self.REQUEST, TRANSFER, SHA_A, ROOT, e2e=True)
            self.assertMessageError("bad_request", messages.parse_source_request, dict(good, **change))


class E2ETransferTests(ErrorCase, unittest.SynchronousTestCase):
    def test_end_to_end_round_trip(self):
        message = messages.transfer_message(TRANSFER, "a", 10, SHA_A, E2E_CHUNK, ROOT, True)
        self.assertEqual(list(message), ["type", "transfer", "file", "size", "sha256", "chunk_size", "root", "e2e"])
        self.assertIs(message["e2e"], True)
        self.assertEqual(messages.parse_transfer(wire.loads(wire.dumps(message))),
                         messages.Transfer(TRANSFER, "a", 10, SHA_A, E2E_CHUNK, ROOT, True))

    def test_not_end_to_end_has_no_e2e_field(self):
        message = messages.transfer_message(TRANSFER, "a", 10, SHA_A, E2E_CHUNK, ROOT, False)
        self.assertNotIn("e2e", message)  # as a /1 tracker answers
        self.assertEqual(messages.parse_transfer(message).e2e, False)
        self.assertEqual(messages.parse_transfer(message).root, ROOT)
        self.assertNotIn("root", messages.transfer_message(TRANSFER, "a", 10, SHA_A, E2E_CHUNK))

    def test_refusals(self):
        good = messages.transfer_message(TRANSFER, "a", 10, SHA_A, E2E_CHUNK, ROOT, True)
        for change in ({"e2e": 1}, {"e2e": "true"}, {"e2e": None}, {"root": None}, {"size": None},
                       {"root": ROOT.upper()}):
            self.assertMessageError("bad_request", messages.parse_transfer, dict(good, **change))
        without_root = dict(good)
        del without_root["root"]
        self.assertMessageError("bad_request", messages.parse_transfer, without_root)


class TransferStartTests(ErrorCase, unittest.SynchronousTestCase):
    def message(self, **changes) -> dict:
        return dict(wire.loads(bridged.transfer_start_message(TRANSFER, E2E_CHUNK, KEY, b"sealed leaves")), **changes)

    def test_round_trip(self):
        body = bridged.transfer_start_message(TRANSFER, E2E_CHUNK, KEY, b"sealed leaves")
        self.assertEqual(list(wire.loads(body)), ["type", "transfer", "chunk_size", "key", "leaves"])
        self.assertEqual(bridged.parse_transfer_start(wire.loads(body)),
                         bridged.TransferStart(TRANSFER, E2E_CHUNK, KEY, b"sealed leaves"))

    def test_refusals(self):
        for change in ({"transfer": ""}, {"transfer": None}, {"chunk_size": 65536}, {"chunk_size": 3 * E2E_CHUNK},
                       {"chunk_size": float(E2E_CHUNK)}, {"chunk_size": True}, {"chunk_size": None},
                       {"key": wire.b64encode(KEY[:31])}, {"key": "not base64!"}, {"key": None},
                       {"leaves": "not base64!"}, {"leaves": None}):
            self.assertMessageError("bad_request", bridged.parse_transfer_start, self.message(**change))

    def test_transfer_start_crosses_bridges(self):
        self.assertEqual(set(messages.CHUNK_TYPES), {"file_chunk", "transfer_start", "transfer_end"})


class SealedChunkTests(ErrorCase, unittest.SynchronousTestCase):
    def test_round_trip_names_no_file(self):
        body = bridged.sealed_chunk_message(TRANSFER, 3, E2E_CHUNK, b"\x00ciphertext")
        message = wire.loads(body)
        self.assertEqual(list(message), ["type", "transfer", "chunk_idx", "chunk_size", "data"])
        self.assertTrue(bridged.is_sealed_chunk(message))
        self.assertEqual(bridged.parse_sealed_chunk(message),
                         bridged.SealedChunk(TRANSFER, 3, E2E_CHUNK, b"\x00ciphertext"))

    def test_a_section_8_chunk_is_not_sealed(self):
        self.assertFalse(bridged.is_sealed_chunk(wire.loads(bridged.file_chunk_message(TRANSFER, "a", 0, 16384,
                                                                                          4, b"abcd"))))

    def test_refusals(self):
        good = wire.loads(bridged.sealed_chunk_message(TRANSFER, 0, E2E_CHUNK, b"x"))
        for change in ({"transfer": None}, {"chunk_idx": -1}, {"chunk_idx": True}, {"chunk_idx": "0"},
                       {"chunk_idx": 2 ** 53}, {"chunk_size": 16384}, {"chunk_size": float(E2E_CHUNK)},
                       {"chunk_size": None}, {"data": "not base64!"}, {"data": None}):
            self.assertMessageError("bad_request", bridged.parse_sealed_chunk, dict(good, **change))


class TransferEndChunkSizeTests(ErrorCase, unittest.SynchronousTestCase):
    def test_chunk_size_rides_along_for_the_padding(self):
        ok = bridged.transfer_end_message(TRANSFER, chunk_size=E2E_CHUNK)
        self.assertEqual(list(ok), ["type", "transfer", "chunk_size", "status"])
        self.assertEqual(bridged.parse_transfer_end(ok), bridged.TransferEnd(TRANSFER, True, None))
        failed = bridged.transfer_end_message(TRANSFER, "gone", chunk_size=E2E_CHUNK)
        self.assertEqual(failed, {"type": "transfer_end", "transfer": TRANSFER, "chunk_size": E2E_CHUNK,
                                  "status": "error", "detail": "gone"})
        self.assertEqual(bridged.parse_transfer_end(failed), bridged.TransferEnd(TRANSFER, False, "gone"))
