"""How a download's transfer notices that its chunks stopped (issue 17): the probe of its
circuit after a second of silence, and the silence after which its source is given up,
measured in its own gaps between chunks. ``Transfer.wait_for_end`` on a ``task.Clock``."""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.trial import unittest

from onion_twisted.peer.transfer import (FIRST_SILENCE, MIN_SILENCE, PROBE_AFTER, RECHECK_GAPS, SILENT_GAPS, Transfer,
                                         chunks_behind)

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


class ReplacedSourceTests(unittest.SynchronousTestCase):
    """A source whose sharer announced the file on a new circuit (its old one lost a node;
    the tracker still lists both) is given up after RECHECK_GAPS of its gaps, not SILENT_GAPS."""

    GAP = 2.0  # seconds between chunks: RECHECK_GAPS of them are over MIN_SILENCE

    def setUp(self):
        self.clock = task.Clock()
        self.t = Transfer(None)
        self.probes: list[float] = []
        self.new_circuit = False
        self.waiting = defer.ensureDeferred(self.t.wait_for_end(
            self.clock, STALL, probe=lambda: self.probes.append(self.clock.seconds()),
            replaced=lambda: self.new_circuit))
        for _ in range(10):
            self.clock.advance(self.GAP)
            self.t.heard(self.clock.seconds())
        self.silence_began = self.clock.seconds()
        del self.probes[:]  # those of the gaps between the chunks

    def advance(self, seconds: float, step: float = 0.05) -> None:
        """Time passes in small steps, so a probe is recorded when it is due."""
        end = self.clock.seconds() + seconds
        while self.clock.seconds() + step < end:
            self.clock.advance(step)
        self.clock.advance(end - self.clock.seconds())

    def test_a_quiet_source_is_given_up_after_a_few_gaps_once_a_new_circuit_shares_the_file(self):
        self.new_circuit = True
        recheck = RECHECK_GAPS * self.GAP
        self.assertEqual(self.t.recheck_after(), recheck)
        self.clock.advance(recheck - 0.1)
        self.assertNoResult(self.waiting)
        self.clock.advance(0.2)
        self.assertEqual(self.successResultOf(self.waiting),
                         f"no chunk for {recheck:.0f} s, and a new circuit shares the file")
        self.assertTrue(self.t.source_failed)

    def test_without_a_new_circuit_the_source_keeps_its_whole_silence_and_is_probed_at_every_mark(self):
        limit = SILENT_GAPS * self.GAP
        self.advance(limit - 0.1)
        self.assertNoResult(self.waiting)
        recheck = RECHECK_GAPS * self.GAP
        marks = [PROBE_AFTER] + [k * recheck for k in range(1, SILENT_GAPS // RECHECK_GAPS)]
        self.assertEqual([round(p - self.silence_began, 1) for p in self.probes], marks)
        self.clock.advance(0.2)
        self.assertEqual(self.successResultOf(self.waiting), f"stalled: no chunk for {limit:.0f} s")

    def test_a_probe_reply_that_lists_a_new_circuit_ends_the_wait_at_once(self):
        recheck = RECHECK_GAPS * self.GAP
        self.advance(recheck + 1)  # probed at the mark; the catalogue had no new circuit then
        self.assertNoResult(self.waiting)
        self.assertEqual(len(self.probes), 2)
        self.new_circuit = True
        self.t.poke()  # the probe's reply came: the catalogue lists one more circuit
        self.assertTrue(self.successResultOf(self.waiting).startswith(f"no chunk for {recheck + 1:.0f} s"))
        self.assertEqual(self.clock.getDelayedCalls(), [], "a timer was left behind")

    def test_before_two_chunks_a_new_circuit_changes_nothing(self):
        first = Transfer([0, 1, 2])  # a block: FIRST_SILENCE until its second chunk
        first.heard(self.clock.seconds())
        self.assertIsNone(first.recheck_after())
        waiting = defer.ensureDeferred(first.wait_for_end(self.clock, STALL, replaced=lambda: True))
        self.clock.advance(FIRST_SILENCE - 0.5)
        self.assertNoResult(waiting)
        self.clock.advance(1)
        self.assertTrue(self.successResultOf(waiting).startswith("stalled"))


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


class _Keeper:
    def __init__(self):
        self.probes: list = []

    def probe(self, circuit, take_reply=None):
        self.probes.append((circuit, take_reply))


class _Downloader:
    def __init__(self):
        self.listed = 1
        self.catalogues: list = []

    def count_sources(self, name, sha256, root):
        return self.listed

    def take_catalogue(self, reply):
        self.catalogues.append(reply)


class _Download:
    name, sha256, root = "a.bin", None, None


class AttemptProbeTests(unittest.SynchronousTestCase):
    """How an attempt wires a transfer's probe and its look for a new circuit to the peer's
    keeper and catalogue (``Attempt._probe``, ``Attempt._replaced``)."""

    def setUp(self):
        from onion_twisted.peer.attempt import Attempt
        self.keeper, self.downloader = _Keeper(), _Downloader()
        self.downloader.circuits = self.keeper  # the peer's pool: probes go to the circuit's keeper
        self.attempt = Attempt(self.downloader, _Download(), self.keeper, circuit=None, sources=1)
        self.t = Transfer(None)
        self.t.circuit = object()

    def test_a_probe_goes_on_the_transfers_circuit_and_its_reply_is_the_catalogue(self):
        clock = task.Clock()
        self.t.heard(0.0)
        self.t.heard(1.0)
        waiting = defer.ensureDeferred(self.t.wait_for_end(clock, STALL))
        clock.advance(1.5)
        self.attempt._probe(self.t)
        ((circuit, take),) = self.keeper.probes
        self.assertIs(circuit, self.t.circuit)
        woken = self.t.wake
        take({"type": "files", "files": []})
        self.assertEqual(self.downloader.catalogues, [{"type": "files", "files": []}])
        self.assertTrue(woken.called, "the reply did not wake the transfer's wait")
        self.t.end("ok")
        self.successResultOf(waiting)

    def test_a_new_circuit_is_one_more_than_the_catalogue_listed_when_the_transfer_was_asked(self):
        self.assertFalse(self.attempt._replaced(self.t), "unknown at the ask: never replaced")
        self.t.listed = 1
        self.assertFalse(self.attempt._replaced(self.t))
        self.downloader.listed = 2
        self.assertTrue(self.attempt._replaced(self.t))
        self.downloader.listed = 0  # the catalogue lost the entry: nothing new
        self.assertFalse(self.attempt._replaced(self.t))
