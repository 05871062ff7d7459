"""How a download's transfer notices that its chunks stopped (issue 17): the probe of its
circuit after a second of silence, and the silence after which its source is given up,
measured in its own gaps between chunks. ``Transfer.wait_for_end`` on a ``task.Clock``."""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.trial import unittest

from onion_twisted.peer.transfer import FIRST_SILENCE, MIN_SILENCE, PROBE_AFTER, SILENT_GAPS, Transfer

STALL = 60.0


class WatchTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.t = Transfer(None)
        self.probes = []
        self.waiting = defer.ensureDeferred(self.t.wait_for_end(self.clock, STALL,
                                                                probe=lambda: self.probes.append(self.clock.seconds())))

    def chunks(self, count: int, gap: float) -> None:
        for _ in range(count):
            self.clock.advance(gap)
            self.t.heard(self.clock.seconds())

    def test_a_silent_circuit_is_probed_after_a_second_and_once_per_silence(self):
        self.clock.advance(PROBE_AFTER - 0.01)
        self.assertEqual(self.probes, [])
        self.clock.advance(0.02)
        self.assertEqual(len(self.probes), 1)
        self.clock.advance(10)
        self.assertEqual(len(self.probes), 1, "probed again within one silence")
        self.chunks(1, 0.1)  # a chunk ends the silence; the next one is probed again
        self.clock.advance(PROBE_AFTER + 0.5)
        self.assertEqual(len(self.probes), 2)
        self.assertNoResult(self.waiting)

    def test_a_sharer_that_never_answers_is_given_up_after_the_first_silence(self):
        self.clock.advance(FIRST_SILENCE - 0.5)
        self.assertNoResult(self.waiting)
        self.clock.advance(1)
        self.assertEqual(self.successResultOf(self.waiting), f"stalled: no chunk for {FIRST_SILENCE:.0f} s")
        self.assertTrue(self.t.source_failed)

    def test_a_block_whose_sharer_answered_has_the_first_silence_too(self):
        block = Transfer([0, 1, 2])
        block.cipher = object()  # its transfer_start opened
        self.assertEqual(block.silence_limit(STALL), FIRST_SILENCE)

    def test_once_the_sharer_of_everything_answered_its_first_chunks_have_half_the_stall_timeout(self):
        self.t.cipher = object()  # its transfer_start opened
        self.clock.advance(STALL / 2 - 1)
        self.assertNoResult(self.waiting)
        self.clock.advance(2)
        self.assertTrue(self.successResultOf(self.waiting).startswith("stalled"))
        self.assertTrue(self.t.source_failed)

    def test_after_chunks_a_silence_of_many_gaps_gives_the_source_up(self):
        gap = 0.5
        self.chunks(10, gap)
        limit = max(MIN_SILENCE, SILENT_GAPS * gap)
        self.assertEqual(self.t.silence_limit(STALL), limit)
        self.clock.advance(limit - 0.2)
        self.assertNoResult(self.waiting)
        self.clock.advance(0.4)
        self.assertEqual(self.successResultOf(self.waiting), f"stalled: no chunk for {limit:.0f} s")
        self.assertTrue(self.t.source_failed)

    def test_fast_chunks_still_get_the_minimum_silence_and_slow_ones_at_most_the_stall_timeout(self):
        self.chunks(5, 0.01)
        self.assertEqual(self.t.silence_limit(STALL), MIN_SILENCE)
        slow = Transfer(None)
        slow.heard(0.0)
        slow.heard(30.0)
        self.assertEqual(slow.silence_limit(STALL), STALL)

    def test_an_end_wakes_the_wait_at_once(self):
        self.chunks(3, 0.2)
        self.t.end("circuit broken (test)", circuit_failed=True)
        self.assertEqual(self.successResultOf(self.waiting), "circuit broken (test)")
        self.assertEqual((self.t.circuit_failed, self.t.source_failed), (True, False))
