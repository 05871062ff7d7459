"""How a download's transfer notices that its chunks stopped (issue 17): the probe of its
circuit after a second of silence, and the silence after which its source is given up,
measured in its own gaps between chunks. ``Transfer.wait_for_end`` on a ``task.Clock``."""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.trial import unittest

from onion_twisted.peer.transfer import FIRST_SILENCE, MIN_SILENCE, PROBE_AFTER, SILENT_GAPS, Transfer, chunks_behind

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


def _transfer(claimed, asked_at, chunk_times=()):
    t = Transfer(list(claimed))
    t.asked_at = asked_at
    for at in chunk_times:
        t.heard(at)
    return t


class EndgameEstimateTests(unittest.SynchronousTestCase):
    """Which chunks an endgame copy is worth asking for (docs 17.10, choice 62): those their own
    source would bring later than a fresh request of the asking slot would."""

    def test_a_fresh_request_is_estimated_from_the_slots_last_transfer(self):
        t = _transfer(range(4), asked_at=10.0, chunk_times=(10.5, 10.7, 10.9, 11.1))
        self.assertAlmostEqual(t.fresh_estimate(2), 0.5 + 0.2)
        self.assertAlmostEqual(t.fresh_estimate(1), 0.5)
        one = _transfer(range(4), asked_at=10.0, chunk_times=(10.5,))
        self.assertAlmostEqual(one.fresh_estimate(2), 1.0)  # no gap yet: its first wait stands for it
        self.assertIsNone(_transfer(range(4), asked_at=10.0).fresh_estimate(2))
        self.assertIsNone(Transfer([1]).fresh_estimate(2))

    def test_a_source_as_fast_as_a_fresh_request_gets_no_copies(self):
        have = bytearray(10)
        for i in range(8):
            have[i] = 1
        steady = _transfer(range(5, 10), asked_at=0.0, chunk_times=(1.0, 1.2, 1.4))  # owes 8, 9
        self.assertEqual(chunks_behind([steady], have, now=1.5, fresh=0.7), set())

    def test_the_chunks_a_slow_source_owes_past_a_fresh_request_are_behind(self):
        have = bytearray(20)
        slow = _transfer(range(10, 20), asked_at=0.0, chunk_times=(1.0, 3.0, 5.0))  # gap 2 s
        for i in (10, 11, 12):
            have[i] = 1
        # It owes 13..19: 13 in 2 s, 14 in 4 s, ...; a fresh request brings chunks in 3 s.
        self.assertEqual(chunks_behind([slow], have, now=5.0, fresh=3.0), set(range(14, 20)))

    def test_a_source_gone_quiet_is_not_counted_on(self):
        have = bytearray(4)
        quiet = _transfer(range(4), asked_at=0.0, chunk_times=(1.0, 1.1))
        have[0] = have[1] = 1
        self.assertEqual(chunks_behind([quiet], have, now=1.2, fresh=1.0), set())
        self.assertEqual(chunks_behind([quiet], have, now=3.0, fresh=1.0), {2, 3})  # silent 1.9 s: a gap that long

    def test_a_transfer_without_two_chunks_is_behind_once_it_waited_longer_than_a_fresh_one(self):
        have = bytearray(4)
        starting = _transfer([2, 3], asked_at=0.0)
        self.assertEqual(chunks_behind([starting], have, now=0.5, fresh=1.0), set())
        self.assertEqual(chunks_behind([starting], have, now=1.5, fresh=1.0), {2, 3})

    def test_transfers_over_or_asked_for_everything_are_left_out(self):
        have = bytearray(4)
        over = _transfer([0, 1], asked_at=0.0)
        over.end("ok")
        everything = Transfer(None)
        everything.asked_at = 0.0
        self.assertEqual(chunks_behind([over, everything], have, now=100.0, fresh=1.0), set())
