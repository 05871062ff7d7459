"""The sharer's side of PROTOCOL.md §8, in memory and on a temporary directory.

* ``HashCache`` / ``ShareDirectory``: what is announced, hashing only what
  changed (the hasher counts its calls), the cache surviving a restart.
  Hashing runs through a synchronous stand-in for ``deferToThread``.
* Seeding (issue 16): the downloads directory's finished files shared too,
  never ``.partial/``; and in a whole in-memory network, a peer that
  downloaded a file serves it to the next.
* ``ChunkProducer`` + ``WindowedChunkSender``: the test plays the circuit;
  each ``send`` returns a Deferred the test fires (the acknowledgement).
  Time is a ``task.Clock``; nothing sleeps.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import stat
import weakref
from pathlib import Path

from twisted.internet import defer, task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest

from onion_twisted.protocol import merkle
from onion_twisted.protocol.messages import MAX_CHUNK, MessageError
from onion_twisted.net.files import sha256_file
from onion_twisted.peer.hash_cache import HashCache
from onion_twisted.peer.sharing import ShareDirectory
from onion_twisted.peer.download_state import DONE
from onion_twisted.peer.upload_stream import ChunkProducer, WindowedChunkSender, open_regular
from tests.support.deferreds import inline
from tests.support.peer_network import ALICE_IP, BOB_IP

from .test_peer import PeerNetworkCase, UploadWatch, downloaded, finished, has_chunks


def sync_run(f, *args):
    """A synchronous stand-in for ``deferToThread``."""
    try:
        return defer.succeed(f(*args))
    except BaseException:
        return defer.fail(Failure())


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def root(data: bytes) -> str:
    return merkle.root_hex(merkle.leaf_hashes(data))


def entry(name: str, data: bytes) -> dict:
    """A file as an ``ls`` announces it (§8, with §13's root)."""
    return {"name": name, "size": len(data), "sha256": sha(data), "root": root(data)}


class CountingHasher:
    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, path):
        self.calls.append(os.path.basename(path))
        return merkle.hash_file(path)


class ShareTestBase(unittest.TestCase):
    def setUp(self):
        base = Path(self.mktemp()).absolute()
        self.share = base / "share"
        self.data = base / "data"
        self.share.mkdir(parents=True)
        self.outside = base / "outside.txt"
        self.outside.write_bytes(b"not shared")
        self.hasher = CountingHasher()

    def share_dir(self, **kwargs) -> ShareDirectory:
        kwargs.setdefault("hasher", self.hasher)
        kwargs.setdefault("run_in_thread", sync_run)
        return ShareDirectory(self.share, HashCache(self.data), **kwargs)

    def write(self, name: str, data: bytes) -> Path:
        path = self.share / name
        path.write_bytes(data)
        return path


# --- hashing and the cache ------------------------------------------------------------


class Sha256FileTests(unittest.SynchronousTestCase):
    def test_streams_in_blocks_and_matches_hashlib(self):
        path = Path(self.mktemp())
        data = os.urandom(1000) * 3 + b"tail"
        path.write_bytes(data)
        self.assertEqual(sha256_file(path, block=7), sha(data))
        self.assertEqual(sha256_file(path), sha(data))

    def test_empty_file(self):
        path = Path(self.mktemp())
        path.write_bytes(b"")
        self.assertEqual(sha256_file(path), sha(b""))


class HashCacheTests(ShareTestBase):
    async def test_a_restart_does_not_hash_again(self):
        self.write("a.txt", b"alpha")
        self.write("b.bin", b"beta" * 1000)
        first = await self.share_dir().scan()
        self.assertEqual(sorted(self.hasher.calls), ["a.txt", "b.bin"])
        again = await self.share_dir().scan()  # a new HashCache read from data_dir
        self.assertEqual(sorted(self.hasher.calls), ["a.txt", "b.bin"])
        self.assertEqual(again, first)
        self.assertEqual(again, [entry("a.txt", b"alpha"),
                                 entry("b.bin", b"beta" * 1000)])

    async def test_the_cache_file_is_private_json_by_absolute_path(self):
        path = self.write("a.txt", b"alpha")
        await self.share_dir().scan()
        cache_file = self.data / "hashes.json"
        self.assertEqual(stat.S_IMODE(cache_file.stat().st_mode), 0o600)
        st = path.stat()
        self.assertEqual(json.loads(cache_file.read_bytes()),
                         {str(path): {"size": 5, "mtime_ns": st.st_mtime_ns, "sha256": sha(b"alpha"),
                                      "root": root(b"alpha")}})
        self.assertEqual(sorted(os.listdir(self.data)), ["hashes.json", "leaves"])  # no temporary file left
        row = self.data / "leaves" / root(b"alpha")
        self.assertEqual((row.read_bytes(), stat.S_IMODE(row.stat().st_mode)), (merkle.leaf_hashes(b"alpha"), 0o600))

    async def test_a_new_mtime_or_size_hashes_that_file_again(self):
        a = self.write("a.txt", b"alpha")
        self.write("b.txt", b"beta")
        shares = self.share_dir()
        await shares.scan()
        self.hasher.calls.clear()
        st = a.stat()
        os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        await shares.scan()
        self.assertEqual(self.hasher.calls, ["a.txt"])
        self.hasher.calls.clear()
        a.write_bytes(b"alpha and more")
        os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # same mtime, new size
        files = await shares.scan()
        self.assertEqual(self.hasher.calls, ["a.txt"])
        self.assertEqual(files[0], entry("a.txt", b"alpha and more"))
        self.hasher.calls.clear()
        await self.share_dir().scan()  # and the new hash was saved
        self.assertEqual(self.hasher.calls, [])

    async def test_entries_of_vanished_files_are_pruned(self):
        self.write("a.txt", b"alpha")
        gone = self.write("gone.txt", b"soon gone")
        await self.share_dir().scan()
        gone.unlink()
        await self.share_dir().scan()
        self.assertEqual(list(json.loads((self.data / "hashes.json").read_bytes())), [str(self.share / "a.txt")])

    def test_save_prunes_paths_that_do_not_exist(self):
        cache = HashCache(self.data)
        here = self.write("a.txt", b"a")
        cache.store(here, here.stat(), sha(b"a"), root(b"a"))
        cache.store(self.share / "never", here.stat(), sha(b"a"), root(b"a"))
        cache.save()
        self.assertEqual(list(HashCache(self.data).entries), [str(here)])

    def test_lookup_matches_size_and_mtime(self):
        cache = HashCache(self.data)
        path = self.write("a.txt", b"a")
        st = path.stat()
        self.assertIsNone(cache.lookup(path, st))
        cache.store(path, st, sha(b"a"), root(b"a"))
        self.assertEqual(cache.lookup(path, st), (sha(b"a"), root(b"a")))
        self.assertEqual(cache.lookup(str(path), st), (sha(b"a"), root(b"a")))
        path.write_bytes(b"ab")
        self.assertIsNone(cache.lookup(path, path.stat()))

    async def test_a_corrupt_cache_file_means_hashing_again(self):
        self.data.mkdir()
        (self.data / "hashes.json").write_bytes(b"{not json")
        self.write("a.txt", b"alpha")
        files = await self.share_dir().scan()
        self.assertEqual(self.hasher.calls, ["a.txt"])
        self.assertEqual(files[0]["sha256"], sha(b"alpha"))
        self.assertEqual(len(json.loads((self.data / "hashes.json").read_bytes())), 1)

    async def test_a_bad_entry_is_not_trusted(self):
        path = self.write("a.txt", b"alpha")
        st = path.stat()
        self.data.mkdir()
        (self.data / "hashes.json").write_text(json.dumps(
            {str(path): {"size": 5, "mtime_ns": st.st_mtime_ns, "sha256": "NOT A HASH"}}))
        files = await self.share_dir().scan()
        self.assertEqual(self.hasher.calls, ["a.txt"])
        self.assertEqual(files[0]["sha256"], sha(b"alpha"))


# --- the share directory --------------------------------------------------------------


class ShareDirectoryTests(ShareTestBase):
    async def test_only_regular_files_directly_in_the_share_are_announced(self):
        self.write("b.txt", b"bee")
        self.write("a.txt", b"alpha")
        self.write(".hidden", b"dot")
        self.write("back\\slash", b"x")
        self.write("ctrl\x01", b"x")
        (self.share / "sub").mkdir()
        (self.share / "sub" / "deep.txt").write_bytes(b"deep")
        os.symlink(self.outside, self.share / "out-link")
        os.symlink(self.share / "a.txt", self.share / "in-link")
        os.symlink(self.share / "sub" / "deep.txt", self.share / "deep-link")
        os.symlink(self.share / "nowhere", self.share / "dangling")
        os.symlink(self.share / "sub", self.share / "dir-link")
        os.mkfifo(self.share / "fifo")
        shares = self.share_dir()
        files = await shares.scan()
        self.assertEqual(files, [entry("a.txt", b"alpha"),
                                 entry("b.txt", b"bee"),
                                 entry("in-link", b"alpha")])
        self.assertEqual(shares.announced, {"a.txt", "b.txt", "in-link"})
        self.assertEqual(sorted(self.hasher.calls), ["a.txt", "b.txt", "in-link"])
        self.assertEqual(shares.ls_message(), {"type": "ls", "files": files})
        self.assertEqual(shares.entry("b.txt"), entry("b.txt", b"bee"))
        self.assertIsNone(shares.entry("sub"))

    async def test_look_alike_names_are_not_shared_and_names_are_announced_in_nfc(self):
        self.write("invoice\u202egpj.exe", b"x")    # shows as "invoiceexe.jpg"
        self.write("zero\u200bwidth.txt", b"x")
        self.write("re\u0301sume\u0301.pdf", b"cv")  # decomposed on disk (as some systems write it)
        shares = self.share_dir()
        files = await shares.scan()
        self.assertEqual(files, [entry("r\u00e9sum\u00e9.pdf", b"cv")])
        # A request names the NFC form: the file on disk under its own spelling is served.
        self.assertEqual(shares.path_of("r\u00e9sum\u00e9.pdf"), (self.share / "re\u0301sume\u0301.pdf").resolve())
        self.assertEqual(shares.path_of("re\u0301sume\u0301.pdf"), (self.share / "re\u0301sume\u0301.pdf").resolve())

    async def test_two_names_with_one_nfc_form_are_shared_once(self):
        self.write("caf\u00e9", b"composed")
        self.write("cafe\u0301", b"decomposed")
        shares = self.share_dir()
        files = await shares.scan()
        self.assertEqual([f["name"] for f in files], ["caf\u00e9"])
        # The first in sorted order of the names on disk: "cafe\u0301" < "caf\u00e9".
        self.assertEqual(files[0]["sha256"], sha(b"decomposed"))

    async def test_a_file_that_cannot_be_hashed_is_logged_without_its_name_or_path(self):
        self.write("secret plans.txt", b"x")

        def refusing(path):
            raise PermissionError(13, "Permission denied", path)

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        files = await self.share_dir(hasher=refusing).scan()
        self.assertEqual(files, [])
        text = "\n".join(formatEvent(e) or "" for e in events)
        self.assertIn("Permission denied", text)
        self.assertNotIn("secret plans", text)
        self.assertNotIn(str(self.share), text)

    async def test_changed_tells_whether_the_list_differs(self):
        shares = self.share_dir()
        self.assertEqual(await shares.scan(), [])
        self.assertTrue(shares.changed)  # the first scan is always news
        await shares.scan()
        self.assertFalse(shares.changed)
        a = self.write("a.txt", b"alpha")
        await shares.scan()
        self.assertTrue(shares.changed)
        await shares.scan()
        self.assertFalse(shares.changed)
        a.write_bytes(b"other content")  # same name, new size and hash
        await shares.scan()
        self.assertTrue(shares.changed)
        (self.share / "sub").mkdir()  # not announced: no change
        await shares.scan()
        self.assertFalse(shares.changed)
        a.unlink()
        self.assertEqual(await shares.scan(), [])
        self.assertTrue(shares.changed)

    async def test_path_of_serves_only_announced_names(self):
        self.write("a.txt", b"alpha")
        shares = self.share_dir()
        self.assertRaises(MessageError, shares.path_of, "a.txt")  # nothing announced yet
        await shares.scan()
        self.assertEqual(shares.path_of("a.txt"), (self.share / "a.txt").resolve())
        self.write("late.txt", b"late")
        e = self.assertRaises(MessageError, shares.path_of, "late.txt")
        self.assertEqual(e.error, "refused")
        for name in ("../x", "a/b", "/etc/passwd", ".", ".."):
            self.assertEqual(self.assertRaises(MessageError, shares.path_of, name).error, "refused")

    async def test_a_file_that_changes_while_hashed_waits_for_the_next_scan(self):
        path = self.write("busy.log", b"line 1\n")
        self.write("calm.txt", b"calm")

        def growing_hasher(p):
            result = merkle.hash_file(p)
            if p.endswith("busy.log"):
                with open(p, "ab") as f:
                    f.write(b"line 2\n")
            return result

        shares = self.share_dir(hasher=growing_hasher)
        files = await shares.scan()
        self.assertEqual([f["name"] for f in files], ["calm.txt"])
        self.assertNotIn(str(path), HashCache(self.data).entries)
        files = await self.share_dir().scan()
        self.assertEqual(files[0], entry("busy.log", b"line 1\nline 2\n"))

    async def test_a_file_that_cannot_be_read_is_skipped(self):
        self.write("a.txt", b"alpha")
        self.write("b.txt", b"beta")

        def failing_hasher(p):
            if p.endswith("a.txt"):
                raise PermissionError(13, "Permission denied", p)
            return merkle.hash_file(p)

        files = await self.share_dir(hasher=failing_hasher).scan()
        self.assertEqual([f["name"] for f in files], ["b.txt"])

    async def test_a_missing_share_directory_shares_nothing(self):
        shares = ShareDirectory(self.share / "absent", HashCache(self.data), hasher=self.hasher,
                                run_in_thread=sync_run)
        self.assertEqual(await shares.scan(), [])
        self.assertEqual(shares.announced, frozenset())

    async def test_hashing_goes_through_run_in_thread(self):
        self.write("a.txt", b"alpha")
        ran = []

        def recording_run(f, *args):
            ran.append(getattr(f, "__name__", f))
            return sync_run(f, *args)

        await self.share_dir(run_in_thread=recording_run).scan()
        self.assertEqual(ran, ["_list", "_hash", "_save"])
        self.assertEqual(self.hasher.calls, ["a.txt"])

    async def test_a_scan_during_a_scan_shares_its_result(self):
        self.write("a.txt", b"alpha")
        held = []

        def held_run(f, *args):
            d = defer.Deferred()
            held.append((d, f, args))
            return d

        shares = self.share_dir(run_in_thread=held_run)
        first, second = shares.scan(), shares.scan()
        self.assertEqual(len(held), 1)  # only one listing started
        while held:
            d, f, args = held.pop(0)
            d.callback(f(*args))
        self.assertEqual(self.successResultOf(first), self.successResultOf(second))
        self.assertEqual(self.hasher.calls, ["a.txt"])

    async def test_with_real_threads(self):
        self.write("a.txt", b"alpha" * 10000)
        shares = ShareDirectory(self.share, HashCache(self.data))
        files = await shares.scan()
        self.assertEqual(files, [entry("a.txt", b"alpha" * 10000)])


# --- seeding: the downloads directory shared too (issue 16) ------------------------------


class SeedingTests(ShareTestBase):
    """``seed_downloads``: the finished files of the downloads directory are shared."""

    def setUp(self):
        super().setUp()
        self.downloads = self.share.parent / "downloads"
        (self.downloads / ".partial").mkdir(parents=True)

    def seeding(self, **kwargs) -> ShareDirectory:
        return self.share_dir(downloads_dir=self.downloads, **kwargs)

    def download(self, name: str, data: bytes) -> Path:
        """A verified download as the store leaves it: renamed out of ``.partial/``."""
        part = self.downloads / ".partial" / (name + ".part")
        part.write_bytes(data)
        target = self.downloads / name
        os.replace(part, target)
        return target

    async def test_a_finished_download_is_announced_with_its_root_and_served(self):
        self.write("mine.txt", b"my own")
        got = self.download("got.bin", b"downloaded bytes" * 100)
        shares = self.seeding()
        files = await shares.scan()
        self.assertEqual(files, [entry("got.bin", b"downloaded bytes" * 100), entry("mine.txt", b"my own")])
        self.assertEqual(shares.ls_message(), {"type": "ls", "files": files})  # nothing else in the ls
        self.assertTrue(shares.seeded("got.bin"))
        self.assertFalse(shares.seeded("mine.txt"))
        self.assertEqual(shares.path_of("got.bin"), got.resolve())
        self.assertEqual(shares.path_of("mine.txt"), (self.share / "mine.txt").resolve())
        self.assertEqual(shares.leaves("got.bin"), merkle.leaf_hashes(b"downloaded bytes" * 100))

    async def test_a_download_that_completes_between_scans_is_announced_at_the_next(self):
        shares = self.seeding()
        partial = self.downloads / ".partial" / "late.bin.part"
        partial.write_bytes(b"half")
        self.assertEqual(await shares.scan(), [])
        self.assertEqual(await shares.scan(), [])
        self.assertFalse(shares.changed)
        self.download("late.bin", b"whole, verified")
        self.assertEqual(await shares.scan(), [entry("late.bin", b"whole, verified")])
        self.assertTrue(shares.changed)
        self.hasher.calls.clear()
        await shares.scan()
        self.assertEqual(self.hasher.calls, [])  # remembered by the hash cache like a shared file

    async def test_partial_hidden_and_escaping_files_of_the_downloads_are_never_seeded(self):
        (self.downloads / ".partial" / "big.bin.part").write_bytes(b"some chunks")
        (self.downloads / ".partial" / "big.bin.json").write_bytes(b"{}")
        (self.downloads / ".hidden").write_bytes(b"dot")
        (self.downloads / "sub").mkdir()
        (self.downloads / "sub" / "deep.bin").write_bytes(b"deep")
        os.symlink(self.downloads / ".partial" / "big.bin.part", self.downloads / "part-link")
        os.symlink(self.outside, self.downloads / "out-link")
        os.symlink(self.share / "x", self.downloads / "share-link")
        self.write("x", b"in the share")
        os.mkfifo(self.downloads / "fifo")
        shares = self.seeding()
        files = await shares.scan()
        self.assertEqual([f["name"] for f in files], ["x"])
        self.assertFalse(shares.seeded("x"))
        for name in (".partial", ".partial/big.bin.part", "big.bin.part", "big.bin", ".hidden", "sub",
                     "sub/deep.bin", "part-link", "out-link", "share-link", "fifo", "../outside.txt"):
            self.assertEqual(self.assertRaises(MessageError, shares.path_of, name).error, "refused", name)

    async def test_without_seeding_no_download_is_announced(self):
        self.download("got.bin", b"downloaded")
        self.write("mine.txt", b"my own")
        shares = self.share_dir()  # no downloads directory: seed_downloads = false
        self.assertEqual(await shares.scan(), [entry("mine.txt", b"my own")])
        self.assertEqual(self.assertRaises(MessageError, shares.path_of, "got.bin").error, "refused")
        # Turned on, then off again: announced, then no longer (and no longer served).
        shares.seed_from(self.downloads)
        self.assertEqual([f["name"] for f in await shares.scan()], ["got.bin", "mine.txt"])
        shares.seed_from(None)
        self.assertEqual(await shares.scan(), [entry("mine.txt", b"my own")])
        self.assertTrue(shares.changed)
        self.assertFalse(shares.seeded("got.bin"))
        self.assertEqual(self.assertRaises(MessageError, shares.path_of, "got.bin").error, "refused")

    async def test_a_name_in_both_directories_is_the_share_directorys_file(self):
        self.write("same.txt", b"the share's copy")
        self.download("same.txt", b"the download")
        shares = self.seeding()
        self.assertEqual(await shares.scan(), [entry("same.txt", b"the share's copy")])
        self.assertFalse(shares.seeded("same.txt"))
        self.assertEqual(shares.path_of("same.txt"), (self.share / "same.txt").resolve())
        (self.share / "same.txt").unlink()  # gone from the share: the download is shared instead
        self.assertEqual(await shares.scan(), [entry("same.txt", b"the download")])
        self.assertTrue(shares.seeded("same.txt"))
        self.assertEqual(shares.path_of("same.txt"), (self.downloads / "same.txt").resolve())

    async def test_a_seeded_name_that_no_longer_leads_to_a_regular_file_beside_it_is_refused(self):
        got = self.download("got.bin", b"downloaded")
        shares = self.seeding()
        await shares.scan()
        got.unlink()
        os.symlink(self.outside, got)  # now it climbs out of the downloads directory
        e = self.assertRaises(MessageError, shares.path_of, "got.bin")
        self.assertEqual((e.error, e.detail), ("refused", "the name resolves outside the share directory"))
        got.unlink()
        got.mkdir()
        self.assertEqual(self.assertRaises(MessageError, shares.path_of, "got.bin").detail, "not a regular file")

    async def test_the_cache_forgets_a_download_that_was_deleted(self):
        got = self.download("got.bin", b"downloaded")
        self.write("mine.txt", b"my own")
        shares = self.seeding()
        await shares.scan()
        self.assertIn(str(got), HashCache(self.data).entries)
        got.unlink()
        self.assertEqual(await shares.scan(), [entry("mine.txt", b"my own")])
        self.assertEqual(list(HashCache(self.data).entries), [str(self.share / "mine.txt")])
        self.assertEqual(os.listdir(self.data / "leaves"), [root(b"my own")])  # its leaf row went too


# --- serving: the producer and the window -----------------------------------------------


class FakeCircuit:
    """``send`` of one chunk; the test acknowledges (fires) each Deferred."""

    def __init__(self):
        self.pending: dict[int, defer.Deferred] = {}
        self.received: dict[int, bytes] = {}
        self.order: list[int] = []
        self.cancelled: list[int] = []

    def send(self, index, data):
        def cancel(_d):
            self.cancelled.append(index)

        d = defer.Deferred(cancel)
        self.pending[index] = d
        self.received[index] = bytes(data)
        self.order.append(index)
        return d

    def ack(self, index):
        self.pending.pop(index).callback({})

    def refuse(self, index, exc):
        self.pending.pop(index).errback(exc)

    def ack_all(self, sender, check=lambda: None):
        while self.pending:
            self.ack(min(self.pending))
            check()


class CountingPread:
    def __init__(self, fail_at=None, short_at=None):
        self.reads: list[int] = []
        self.fail_at = fail_at
        self.short_at = short_at

    def __call__(self, fd, length, offset):
        self.reads.append(offset)
        if self.fail_at is not None and len(self.reads) == self.fail_at:
            raise OSError(5, "Input/output error")
        data = os.pread(fd, length, offset)
        if self.short_at is not None and len(self.reads) == self.short_at:
            return data[:-1]
        return data


CHUNK = 16


class WindowTests(unittest.TestCase):
    def setUp(self):
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir()
        self.clock = task.Clock()
        self.circuit = FakeCircuit()

    def file(self, data: bytes, name="f.bin") -> Path:
        path = self.dir / name
        path.write_bytes(data)
        return path

    def start(self, data, chunks=None, window=3, pread=None, send=None, **kwargs):
        self.pread = pread or CountingPread()
        self.producer = ChunkProducer.open(self.file(data), CHUNK, chunks, pread=self.pread)
        self.fd = self.producer.fd
        self.sender = WindowedChunkSender(send or self.circuit.send, window=window, clock=self.clock, **kwargs)
        return self.sender.start(self.producer)

    def assertClosed(self):
        self.assertIsNone(self.producer.fd)
        self.assertRaises(OSError, os.fstat, self.fd)

    def test_never_more_than_the_window_in_flight_and_resumes_on_ack(self):
        data = bytes(range(256)) * 2 + b"tail"  # 33 chunks, the last one 4 bytes
        done = self.start(data, window=3)
        self.assertEqual(sorted(self.circuit.pending), [0, 1, 2])
        self.assertTrue(self.producer.paused)
        self.assertEqual(len(self.pread.reads), 3)  # reading stops with the window full
        self.clock.advance(10)
        self.assertEqual(len(self.pread.reads), 3)
        self.circuit.ack(1)  # out of order
        self.assertEqual(sorted(self.circuit.pending), [0, 2, 3])

        def check():
            self.assertLessEqual(len(self.circuit.pending), 3)
            self.assertLessEqual(len(self.pread.reads), self.sender.acknowledged + 3)

        self.circuit.ack_all(self.sender, check)
        self.assertEqual(self.successResultOf(done), 33)
        self.assertEqual(self.sender.max_in_flight, 3)
        self.assertEqual(self.circuit.order, list(range(33)))
        self.assertEqual(b"".join(self.circuit.received[i] for i in range(33)), data)
        self.assertEqual(self.circuit.received[32], b"tail")
        self.assertClosed()

    def test_done_waits_for_the_last_acknowledgement(self):
        done = self.start(b"x" * (CHUNK * 2), window=8)
        self.assertEqual(sorted(self.circuit.pending), [0, 1])
        self.assertTrue(self.producer.finished)
        self.assertNoResult(done)
        self.circuit.ack(0)
        self.assertNoResult(done)
        self.circuit.ack(1)
        self.assertEqual(self.successResultOf(done), 2)

    def test_resume_ranges_send_only_the_wanted_chunks(self):
        data = os.urandom(CHUNK * 9 + 5)  # 10 chunks
        done = self.start(data, chunks=[[7, 100], [2, 4], [3, 5]], window=2)
        self.circuit.ack_all(self.sender)
        self.assertEqual(self.successResultOf(done), 6)
        self.assertEqual(self.circuit.order, [2, 3, 4, 7, 8, 9])
        for i in self.circuit.order:
            self.assertEqual(self.circuit.received[i], data[i * CHUNK:(i + 1) * CHUNK])
        self.assertEqual(sorted(self.pread.reads), [i * CHUNK for i in (2, 3, 4, 7, 8, 9)])

    def test_a_zero_length_file_sends_nothing_and_completes(self):
        done = self.start(b"")
        self.assertEqual(self.successResultOf(done), 0)
        self.assertEqual(self.circuit.order, [])
        self.assertEqual(self.pread.reads, [])
        self.assertClosed()

    def test_the_first_failure_stops_reading_and_fails_done(self):
        done = self.start(os.urandom(CHUNK * 20), window=4)
        self.circuit.ack(0)
        self.assertEqual(sorted(self.circuit.pending), [1, 2, 3, 4])
        self.circuit.refuse(2, RuntimeError("next_hop_failed"))
        self.assertEqual(str(self.failureResultOf(done, RuntimeError).value), "next_hop_failed")
        self.assertEqual(len(self.pread.reads), 5)
        self.assertClosed()
        self.circuit.ack(1)  # late acknowledgements and failures change nothing
        self.circuit.refuse(3, RuntimeError("late"))
        self.circuit.ack(4)
        self.assertEqual(len(self.pread.reads), 5)
        self.assertEqual(self.circuit.order, [0, 1, 2, 3, 4])
        self.assertEqual(self.circuit.cancelled, [])

    def test_a_send_that_raises_fails_done(self):
        def send(index, data):
            raise ValueError("cannot encrypt")

        done = self.start(os.urandom(CHUNK * 5), send=send)
        self.failureResultOf(done, ValueError)
        self.assertEqual(len(self.pread.reads), 1)
        self.assertClosed()

    def test_a_read_error_fails_done(self):
        done = self.start(os.urandom(CHUNK * 5), pread=CountingPread(fail_at=3), window=8)
        self.failureResultOf(done, OSError)
        self.assertEqual(sorted(self.circuit.pending), [0, 1])
        self.assertClosed()
        self.circuit.ack(0)
        self.assertEqual(len(self.pread.reads), 3)

    def test_a_file_that_shrank_fails_done(self):
        done = self.start(os.urandom(CHUNK * 5), pread=CountingPread(short_at=2), window=8)
        self.assertIn("shrank", str(self.failureResultOf(done, OSError).value))
        self.assertEqual(self.circuit.order, [0])

    def test_acknowledgements_that_fire_at_once(self):
        data = os.urandom(CHUNK * 3000)
        sent = []

        def send(index, chunk):
            sent.append(index)
            return defer.succeed({})

        done = self.start(data, send=send, window=8)
        self.assertEqual(self.successResultOf(done), 3000)
        self.assertEqual(sent, list(range(3000)))
        self.assertEqual(self.sender.max_in_flight, 1)

    def test_an_unacknowledged_chunk_times_out(self):
        done = self.start(os.urandom(CHUNK * 10), window=2, ack_timeout=30.0)
        self.clock.advance(20)
        self.circuit.ack(0)  # chunk 2 leaves at t=20
        self.clock.advance(10)  # t=30: chunk 1 was sent at t=0
        self.failureResultOf(done, defer.TimeoutError)
        self.assertEqual(self.circuit.cancelled, [1, 2])
        self.assertClosed()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_acknowledged_chunks_leave_no_timer(self):
        done = self.start(os.urandom(CHUNK * 4), window=2, ack_timeout=30.0)
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)
        self.circuit.ack_all(self.sender)
        self.assertEqual(self.successResultOf(done), 4)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(100)

    def test_cancelling_done_stops_everything(self):
        done = self.start(os.urandom(CHUNK * 10), window=3)
        done.cancel()
        self.failureResultOf(done, defer.CancelledError)
        self.assertEqual(sorted(self.circuit.cancelled), [0, 1, 2])
        self.assertClosed()
        self.assertEqual(len(self.pread.reads), 3)

    def test_only_chunks_in_flight_are_held(self):
        class Chunk:
            """Stands for the bytes of a chunk; only its length matters to the producer."""

            def __init__(self, length):
                self.length = length

            def __len__(self):
                return self.length

        refs = []

        def pread(fd, length, offset):
            chunk = Chunk(length)
            refs.append(weakref.ref(chunk))
            return chunk

        def send(index, chunk):  # the circuit keeps no data either
            return self.circuit.send(index, b"")

        def alive():
            gc.collect()
            return sum(1 for r in refs if r() is not None)

        done = self.start(b"z" * (CHUNK * 50), window=4, pread=pread, send=send)
        self.assertEqual(len(refs), 4)
        self.assertLessEqual(alive(), 4)
        self.circuit.ack_all(self.sender, lambda: self.assertLessEqual(alive(), 4))
        self.assertEqual(self.successResultOf(done), 50)
        self.assertEqual(alive(), 0)
        self.assertEqual(len(refs), 50)

    def test_window_and_chunk_size_are_checked(self):
        self.assertRaises(ValueError, WindowedChunkSender, self.circuit.send, window=0, clock=self.clock)
        path = self.file(b"abc")
        self.assertRaises(ValueError, ChunkProducer.open, path, 0)
        self.assertRaises(ValueError, ChunkProducer.open, path, MAX_CHUNK + 1)

    def test_the_default_window_is_8(self):
        sender = WindowedChunkSender(self.circuit.send, clock=self.clock)
        self.assertEqual(sender.window, 8)
        sender.start(ChunkProducer.open(self.file(b"q" * (CHUNK * 20)), CHUNK))
        self.assertEqual(sorted(self.circuit.pending), list(range(8)))


class OpenRegularTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir()
        (self.dir / "f").write_bytes(b"data")

    def test_a_regular_file_opens(self):
        fd = open_regular(self.dir / "f")
        try:
            self.assertEqual(os.pread(fd, 10, 0), b"data")
        finally:
            os.close(fd)

    def test_a_fifo_is_refused_without_blocking(self):
        os.mkfifo(self.dir / "fifo")
        self.assertEqual(self.assertRaises(MessageError, open_regular, self.dir / "fifo").error, "refused")

    def test_a_directory_or_a_symlink_is_refused(self):
        os.symlink(self.dir / "f", self.dir / "link")
        (self.dir / "d").mkdir()
        for name in ("link", "d", "absent"):
            self.assertEqual(self.assertRaises(MessageError, open_regular, self.dir / name).error, "refused")


# --- seeding in a whole network (tests/support/peer_network.py) ---------------------------------

CAROL_IP = "127.0.0.103"
E2E_CHUNK = 256 * 1024


class SeedingPeerTests(PeerNetworkCase):
    """Alice downloads bob's file and shares it on; carol gets it from her."""

    async def alice_downloads_bobs_song(self) -> bytes:
        net = self.net
        data = os.urandom(3 * E2E_CHUNK + 100)  # chunks of 256 KiB: end to end (§17.13)
        net.write_share(BOB_IP, "song.ogg", data)
        await net.start()
        d = self.alice.download("song.ogg")
        net.pump(until=has_chunks(d, 1))
        await net.run(self.alice.rescan())  # mid-download: its .partial files are not shared
        self.assertEqual(self.alice.shared, [])
        self.assertEqual(sorted(os.listdir(os.path.join(net.downloads_dir(ALICE_IP), ".partial"))),
                         ["song.ogg.json", "song.ogg.part"])
        net.pump(until=finished(d))
        self.assertEqual(downloaded(net, "song.ogg"), data)
        await net.run(self.alice.tick())  # the peer's rescan_interval: a look, an ls if it changed
        return data

    @inline
    async def test_a_verified_download_is_announced_and_served_to_the_next_peer(self):
        net = self.net
        carol = net.make_peer(CAROL_IP, "carol")
        data = await self.alice_downloads_bobs_song()
        [bobs] = [f for f in self.bob.shared if f["name"] == "song.ogg"]
        [ls] = net.messages_on(net.tracker_key_of(self.alice), "ls")[-1:]
        self.assertEqual(ls["files"], [{"name": "song.ogg", "size": len(data), "sha256": sha(data),
                                        "root": bobs["root"]}])
        self.assertEqual(self.alice.status()["shared"], [dict(ls["files"][0], seeded=True)])
        self.assertEqual(bobs["seeded"], False)
        [row] = [r for r in net.tracker.catalogue.listing() if r["name"] == "song.ogg"]
        self.assertEqual(row["sources"], 2)
        # Bob stops sharing it: carol's download can only come from alice's downloads folder.
        os.unlink(net.share_path(BOB_IP, "song.ogg"))
        await net.run(self.bob.tick())
        watch = UploadWatch(self.alice)
        d = carol.download("song.ogg")
        net.pump(until=lambda: finished(d)() and watch.ends)  # the file is whole before alice's end arrives
        self.assertEqual(d.state, DONE, d.error)
        with open(os.path.join(net.downloads_dir(CAROL_IP), "song.ogg"), "rb") as f:
            self.assertTrue(f.read() == data, "carol's copy differs from bob's file")
        self.assertGreater(len(watch.chunks) + len(watch.ends), 0, "alice served nothing")
        self.assertEqual([e.get("status") for e in watch.ends], ["ok"])

    @inline
    async def test_with_seed_downloads_false_a_download_is_not_announced(self):
        net = self.net
        self.alice = net.make_peer(ALICE_IP, "alice", seed_downloads=False)
        await self.alice_downloads_bobs_song()
        self.assertEqual(self.alice.shared, [])
        self.assertEqual(self.alice.status()["shared"], [])
        self.assertTrue(all(ls["files"] == [] for ls in net.messages_on(net.tracker_key_of(self.alice), "ls")))
        [row] = [r for r in net.tracker.catalogue.listing() if r["name"] == "song.ogg"]
        self.assertEqual(row["sources"], 1)
