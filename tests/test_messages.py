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
