"""An attempt's endgame slot with nothing worth a copy yet (docs 17.10, choice 62):
it waits, looks again when another slot's transfer ends or after a while, and
ends at once when the file is whole. ``Attempt._slot`` over a scripted download
and a ``task.Clock``; the transfers are real ``Transfer`` records."""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.trial import unittest

from onion_twisted.peer.attempt import ENDGAME_LOOK, Attempt, SlotResult
from tests.support.attempts import TransferLedger


class _Chunks:
    def __init__(self):
        self.complete = False
        self.have = 1
        self.bits = bytearray(8)


class _Download(TransferLedger):
    """What a slot asks of its download: claims come from ``answers``, one per call."""

    def __init__(self, answers):
        super().__init__()
        self.chunks = _Chunks()
        self.answers = list(answers)
        self.claims: list = []

    def claim(self, sources, endgame, behind=None):
        self.claims.append(behind)
        return self.answers.pop(0) if self.answers else None


class _Downloader:
    def __init__(self, clock):
        self.clock = clock
        self.stopped = False


class IdleSlotTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        # The busy slot's block first; then, for the slot out of chunks, "owed, none behind".
        self.d = _Download([[0, 1], []])
        self.attempt = Attempt(_Downloader(self.clock), self.d, keeper=None, circuit=None, sources=2)
        self.ends: dict[int, defer.Deferred] = {}

        async def transfer(t, ask_first):
            t.asked_at, t.chunks = self.clock.seconds(), 2
            t.heard(self.clock.seconds())
            self.ends[id(t)] = defer.Deferred()
            return await self.ends[id(t)]
        self.attempt._transfer = transfer
        self.busy = defer.ensureDeferred(self.attempt._slot())
        self.idle = defer.ensureDeferred(self.attempt._slot())

    def finish_busy(self, result: SlotResult) -> None:
        (end,) = self.ends.values()
        end.callback(result)

    def test_an_idle_slot_ends_as_soon_as_the_file_is_whole(self):
        self.assertNoResult(self.idle)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # its look again
        self.d.chunks.complete = True
        self.finish_busy(SlotResult("ok"))  # its transfer ends: the idle slot looks at once
        self.assertEqual(self.successResultOf(self.idle).why, "ok")
        self.assertEqual(self.successResultOf(self.busy).why, "ok")
        self.assertEqual(self.clock.getDelayedCalls(), [], "a timer was left behind")
        self.assertEqual(self.clock.seconds(), 0)

    def test_an_idle_slot_looks_again_after_a_while(self):
        self.assertEqual(len(self.d.claims), 2)
        self.clock.advance(ENDGAME_LOOK)
        self.assertEqual(len(self.d.claims), 3, "the idle slot did not look again")
        self.assertEqual(self.successResultOf(self.idle).why, "nothing left to ask for")  # claim said None
        self.assertNoResult(self.busy)
        self.finish_busy(SlotResult("ok"))
        self.successResultOf(self.busy)

    def test_a_slot_passes_the_endgame_filter_once_it_knows_its_own_pace(self):
        # Its first claim knew nothing of its own pace (None: any copy); the next passes a filter
        # (what the filter keeps: tests.test_transfer_watch.EndgameEstimateTests).
        self.finish_busy(SlotResult("ok"))
        self.assertIsNone(self.d.claims[0])
        self.assertTrue(callable(self.d.claims[-1]))
