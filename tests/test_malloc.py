"""glibc's allocator settings and the heap trimmer (net/malloc.py)."""

from __future__ import annotations

from twisted.internet import task
from twisted.trial import unittest

from onion_twisted.net.config import parse
from onion_twisted.net.malloc import TRIM_INTERVAL, TRIM_SLACK, HeapTrimmer, _MallInfo2, _glibc
from onion_twisted.net.member_service import MemberService


class FakeLibc:
    """mallinfo2 and malloc_trim of a heap holding ``free`` free bytes."""

    def __init__(self, free: int):
        self.free = free
        self.trimmed: list[int] = []

        def mallinfo2():  # plain functions: the trimmer sets their ctypes types, as on libc's
            return _MallInfo2(fordblks=self.free)

        def malloc_trim(pad):
            self.trimmed.append(pad)
            return 1
        self.mallinfo2, self.malloc_trim = mallinfo2, malloc_trim


class HeapTrimmerTests(unittest.TestCase):
    def test_a_heap_with_little_free_is_left_alone(self):
        libc = FakeLibc(TRIM_SLACK)
        trimmer = HeapTrimmer(libc=libc)
        self.assertFalse(trimmer())
        self.assertEqual((libc.trimmed, trimmer.trims), ([], 0))

    def test_a_heap_with_more_free_gives_its_pages_back(self):
        libc = FakeLibc(TRIM_SLACK + 1)
        trimmer = HeapTrimmer(libc=libc)
        self.assertTrue(trimmer())
        self.assertEqual((libc.trimmed, trimmer.trims), ([0], 1))

    def test_without_glibc_it_does_nothing(self):
        trimmer = HeapTrimmer(libc=object())
        self.assertIsNone(trimmer.free_bytes())
        self.assertFalse(trimmer())

    def test_the_real_heap_answers(self):
        if getattr(_glibc(), "mallinfo2", None) is None:
            raise unittest.SkipTest("no glibc 2.33 here")
        free = HeapTrimmer().free_bytes()
        self.assertIsInstance(free, int)
        self.assertGreaterEqual(free, 0)

    def test_every_member_trims_its_heap_on_a_timer(self):
        clock = task.Clock()
        cfg = parse("node", overrides={"data_dir": self.mktemp(), "listen": "127.0.0.1"})
        member = MemberService(cfg, reactor=clock)
        libc = FakeLibc(TRIM_SLACK * 2)
        member.heap.__init__(libc=libc)  # the same trimmer, which the timer calls, on the fake heap
        member.startService()
        self.addCleanup(member.stopService)
        self.assertEqual(len(libc.trimmed), 1)  # at start, then every TRIM_INTERVAL
        clock.advance(TRIM_INTERVAL)
        self.assertEqual(len(libc.trimmed), 2)
