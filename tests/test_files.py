"""net.files: the one atomic write, the one file hash, the one free destination name.

Files live in a fresh temporary directory per test. Failures are made by
patching the ``os`` calls ``atomic_write`` makes (trial restores them).
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from twisted.trial import unittest

from onion_twisted.net import files
from onion_twisted.net.files import atomic_write, sha256_file, unique_destination


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class AtomicWriteTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir(parents=True)
        self.path = self.dir / "state.json"

    def test_a_new_file_has_the_data_and_mode_0600_by_default(self):
        atomic_write(self.path, b"new")
        self.assertEqual(self.path.read_bytes(), b"new")
        self.assertEqual(mode_of(self.path), 0o600)
        self.assertEqual(os.listdir(self.dir), ["state.json"])  # no temporary file left

    def test_the_mode_asked_for_whatever_the_old_file_had(self):
        self.path.write_bytes(b"old")
        os.chmod(self.path, 0o666)
        atomic_write(self.path, b"new", mode=0o644)
        self.assertEqual(mode_of(self.path), 0o644)
        atomic_write(self.path, b"newer")
        self.assertEqual(mode_of(self.path), 0o600)
        self.assertEqual(self.path.read_bytes(), b"newer")

    def test_the_file_is_private_before_any_byte_is_written(self):
        # A key must never sit on disk readable by others, not even half written.
        modes = []
        real_write = os.write

        def recording_write(fd, data):
            modes.append(stat.S_IMODE(os.fstat(fd).st_mode))
            return real_write(fd, data)

        self.patch(files.os, "write", recording_write)
        atomic_write(self.path, b"secret key")
        self.assertTrue(modes)
        self.assertEqual(set(modes), {0o600})

    def test_a_short_write_is_continued(self):
        real_write = os.write
        self.patch(files.os, "write", lambda fd, data: real_write(fd, bytes(data[:3])))
        atomic_write(self.path, b"0123456789")
        self.assertEqual(self.path.read_bytes(), b"0123456789")

    def test_a_failed_write_leaves_the_old_file_and_no_temporary(self):
        self.path.write_bytes(b"old")

        def failing_fsync(fd):
            raise OSError(28, "No space left on device")

        self.patch(files.os, "fsync", failing_fsync)
        self.assertRaises(OSError, atomic_write, self.path, b"new")
        self.assertEqual(self.path.read_bytes(), b"old")
        self.assertEqual(os.listdir(self.dir), ["state.json"])

    def test_a_failed_rename_leaves_the_old_file_and_no_temporary(self):
        self.path.write_bytes(b"old")

        def failing_replace(src, dst):
            raise OSError(5, "I/O error")

        self.patch(files.os, "replace", failing_replace)
        self.assertRaises(OSError, atomic_write, self.path, b"new")
        self.assertEqual(self.path.read_bytes(), b"old")
        self.assertEqual(os.listdir(self.dir), ["state.json"])

    def test_no_old_file_and_a_failure_leaves_nothing(self):
        self.patch(files.os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError(5, "I/O error")))
        self.assertRaises(OSError, atomic_write, self.path, b"new")
        self.assertEqual(os.listdir(self.dir), [])

    def test_the_data_reaches_the_disk_before_the_name_and_the_name_after(self):
        events = []
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd):
            is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
            events.append("fsync dir" if is_dir else "fsync file")
            return real_fsync(fd)

        def replace(src, dst):
            events.append("replace")
            return real_replace(src, dst)

        self.patch(files.os, "fsync", fsync)
        self.patch(files.os, "replace", replace)
        atomic_write(self.path, b"new")
        self.assertEqual(events, ["fsync file", "replace", "fsync dir"])

    def test_a_path_given_as_a_string(self):
        atomic_write(str(self.path), b"new")
        self.assertEqual(self.path.read_bytes(), b"new")


class Sha256FileTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir(parents=True)

    def test_the_hash_whatever_the_block_size(self):
        data = os.urandom(100_003)
        path = self.dir / "f"
        path.write_bytes(data)
        expected = hashlib.sha256(data).hexdigest()
        for block in (7, 1000, 4096, 1 << 20):
            self.assertEqual(sha256_file(path, block=block), expected, block)
        self.assertEqual(sha256_file(str(path)), expected)

    def test_an_empty_file(self):
        path = self.dir / "empty"
        path.write_bytes(b"")
        self.assertEqual(sha256_file(path), hashlib.sha256(b"").hexdigest())

    def test_never_reads_more_than_a_block(self):
        path = self.dir / "f"
        path.write_bytes(b"x" * 10_000)
        sizes = []
        real_open = open

        class Recording:
            def __init__(self, f):
                self.f = f

            def read(self, n):
                sizes.append(n)
                return self.f.read(n)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

        # The module's own name ``open`` shadows the builtin for this test only.
        files.open = lambda p, *a, **k: Recording(real_open(p, *a, **k))
        self.addCleanup(delattr, files, "open")
        self.assertEqual(sha256_file(path, block=4096), hashlib.sha256(b"x" * 10_000).hexdigest())
        self.assertEqual(set(sizes), {4096})

    def test_a_missing_file_is_an_error(self):
        self.assertRaises(FileNotFoundError, sha256_file, self.dir / "missing")


class UniqueDestinationTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir(parents=True)

    def test_the_name_itself_when_free(self):
        self.assertEqual(unique_destination(self.dir, "a.txt"), self.dir / "a.txt")

    def test_numbers_before_the_extension(self):
        (self.dir / "a.txt").write_bytes(b"")
        self.assertEqual(unique_destination(self.dir, "a.txt"), self.dir / "a (1).txt")
        (self.dir / "a (1).txt").write_bytes(b"")
        self.assertEqual(unique_destination(self.dir, "a.txt"), self.dir / "a (2).txt")
        (self.dir / "x.tar.gz").write_bytes(b"")
        self.assertEqual(unique_destination(self.dir, "x.tar.gz"), self.dir / "x (1).tar.gz")

    def test_no_extension_and_a_dot_file(self):
        (self.dir / "NAME").write_bytes(b"")
        self.assertEqual(unique_destination(self.dir, "NAME"), self.dir / "NAME (1)")
        (self.dir / ".rc").write_bytes(b"")
        self.assertEqual(unique_destination(self.dir, ".rc"), self.dir / ".rc (1)")

    def test_a_directory_of_that_name_is_taken_too(self):
        (self.dir / "d").mkdir()
        self.assertEqual(unique_destination(self.dir, "d"), self.dir / "d (1)")
