"""An attempt that moves to a spare circuit (docs 17.10, choice 66): a request that
fails on the circuit it had just moved to (a spare that lost a node unseen) is not
the source's failure, and does not use up the slot's patience (``MAX_FRUITLESS``).
``Attempt._transfer`` and ``Attempt._slot`` over scripted keepers, pool and download."""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.trial import unittest

from onion_twisted.peer.attempt import MAX_FRUITLESS, Attempt, SlotResult
from onion_twisted.peer.transfer import Transfer
from onion_twisted.protocol.errors import NextHopFailed
from tests.support.attempts import TransferLedger


class _Circuit:
    sealed = False


class _Keeper:
    def __init__(self, name: str):
        self.name = name
        self.circuit = _Circuit()

    def ready(self):
        return defer.succeed(self.circuit)

    def send_on(self, circuit, message):
        return defer.fail(NextHopFailed("next hop answered 502 next_hop_failed"))


class _Pool:
    """``in_hand`` answers ``to`` (the keeper a download moves to, or its own)."""

    def __init__(self, to=None):
        self.to = to

    def in_hand(self, keeper):
        return self.to or keeper


class _Download(TransferLedger):
    name, sha256, root, chunk_size, chunks, excluded = "a.bin", None, None, 16384, None, ()


class _Downloader:
    def __init__(self, pool):
        self.clock = task.Clock()
        self.stopped = False
        self.circuits = pool

    def count_sources(self, name, sha256, root):
        return 1


class MovedRequestTests(unittest.SynchronousTestCase):
    def transfer(self, pool, own):
        attempt = Attempt(_Downloader(pool), _Download(), own, circuit=own.circuit, sources=1)
        result = self.successResultOf(defer.ensureDeferred(attempt._transfer(Transfer(None), ask_first=True)))
        return attempt, result

    def test_a_failed_request_on_the_circuit_just_moved_to_is_the_spares_failure(self):
        own, spare = _Keeper("own"), _Keeper("spare")
        attempt, result = self.transfer(_Pool(to=spare), own)
        self.assertIs(attempt.keeper, spare)
        self.assertTrue(result.ask_again)
        self.assertTrue(result.spare_failed)

    def test_a_failed_request_on_its_own_circuit_is_not(self):
        own = _Keeper("own")
        attempt, result = self.transfer(_Pool(), own)
        self.assertIs(attempt.keeper, own)
        self.assertTrue(result.ask_again)
        self.assertFalse(result.spare_failed)


class FruitlessTests(unittest.SynchronousTestCase):
    """``_slot`` with scripted transfers: each returns the next result, bringing no chunk
    until the last, which brings some."""

    def slot(self, results):
        attempt = Attempt(_Downloader(_Pool()), _Download(), None, circuit=None, sources=1)
        script, transfers = list(results), []

        async def transfer(t, ask_first):
            transfers.append(t)
            result = script.pop(0)
            t.chunks = 4 if result.why == "ok" else 0
            return result
        attempt._transfer = transfer
        return self.successResultOf(defer.ensureDeferred(attempt._slot(first=True))), transfers

    def test_failures_on_spares_moved_to_do_not_end_the_slot(self):
        failed = [SlotResult("circuit failed: 502", ask_again=True, spare_failed=True)] * (MAX_FRUITLESS + 1)
        result, transfers = self.slot(failed + [SlotResult("ok")])
        self.assertEqual(result.why, "ok")
        self.assertEqual(len(transfers), MAX_FRUITLESS + 2)

    def test_other_fruitless_transfers_end_it_after_max_fruitless(self):
        failed = [SlotResult("circuit failed: 502", ask_again=True)] * (MAX_FRUITLESS + 1)
        result, transfers = self.slot(failed + [SlotResult("ok")])
        self.assertEqual(result.why, "circuit failed: 502")
        self.assertEqual(len(transfers), MAX_FRUITLESS)
