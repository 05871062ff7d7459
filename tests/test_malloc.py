"""glibc's allocator settings and the heap trimmer (net/malloc.py)."""

from __future__ import annotations

from twisted.internet import task
from twisted.trial import unittest

from onion_twisted.net.config import parse
from onion_twisted.net.malloc import (CAP_INTERVAL, RSS_CEILING, TRIM_INTERVAL, TRIM_SLACK, HeapTrimmer, _MallInfo2,
                                      _glibc, resident_bytes)
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

    def test_above_the_ceiling_the_free_pages_go_back_at_once(self):
        libc = FakeLibc(0)  # whatever glibc counts as free: the resident size decides
        trimmer = HeapTrimmer(libc=libc, resident=lambda: RSS_CEILING + 1)
        self.assertTrue(trimmer.cap())
        self.assertEqual((libc.trimmed, trimmer.trims, trimmer.cap_trims), ([0], 1, 1))

    def test_at_or_under_the_ceiling_nothing_is_trimmed(self):
        libc = FakeLibc(TRIM_SLACK * 4)
        trimmer = HeapTrimmer(libc=libc, resident=lambda: RSS_CEILING)
        self.assertFalse(trimmer.cap())
        self.assertEqual((libc.trimmed, trimmer.cap_trims), ([], 0))

    def test_without_a_resident_size_the_ceiling_is_not_checked(self):
        libc = FakeLibc(TRIM_SLACK * 4)
        trimmer = HeapTrimmer(libc=libc, resident=lambda: None)
        self.assertFalse(trimmer.cap())
        self.assertFalse(HeapTrimmer(libc=object(), resident=lambda: RSS_CEILING * 2).cap())
        self.assertEqual(libc.trimmed, [])

    def test_the_real_resident_size_is_read(self):
        resident = resident_bytes()
        if resident is None:
            raise unittest.SkipTest("no /proc/self/statm here")
        self.assertGreater(resident, 1024 * 1024)  # an interpreter with Twisted loaded
        self.assertLess(resident, 1 << 40)

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
        # The same trimmer, which the timers call, on a fake heap under the ceiling.
        member.heap.__init__(libc=libc, resident=lambda: RSS_CEILING)
        member.startService()
        self.addCleanup(member.stopService)
        self.assertEqual(len(libc.trimmed), 1)  # at start, then every TRIM_INTERVAL
        clock.advance(TRIM_INTERVAL)
        self.assertEqual(len(libc.trimmed), 2)

    def test_every_member_checks_its_resident_size_on_a_shorter_timer(self):
        clock = task.Clock()
        cfg = parse("node", overrides={"data_dir": self.mktemp(), "listen": "127.0.0.1"})
        member = MemberService(cfg, reactor=clock)
        libc = FakeLibc(0)  # the slack rule never trims: only the ceiling does
        member.heap.__init__(libc=libc, resident=lambda: RSS_CEILING + 1)
        member.startService()
        self.addCleanup(member.stopService)
        self.assertLess(CAP_INTERVAL, TRIM_INTERVAL)
        self.assertEqual(member.heap.cap_trims, 1)  # at start
        clock.advance(CAP_INTERVAL)
        self.assertEqual(member.heap.cap_trims, 2)
        clock.advance(CAP_INTERVAL)
        self.assertEqual((member.heap.cap_trims, len(libc.trimmed)), (3, 3))
