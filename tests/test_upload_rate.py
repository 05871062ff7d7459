"""The upload cap (``max_upload_rate``, issue 16): one token bucket over all uploads of a peer.

* ``UploadRate`` alone, on a ``task.Clock``: uploaders play "take the next
  chunk as soon as the last one was let through"; the bytes let through
  over ten seconds of clock are the cap times ten within one chunk, two
  uploaders get half each, a cap of 0 never waits, a cancelled request
  leaves no waiter and spends nothing.
* ``ChunkProducer`` with a rate: a chunk is read only once its bytes were
  let through; stopping the upload cancels its request.
* A whole in-memory network (tests/support/peer_network.py): a capped
  sharer's upload takes the time the cap says, and its page says how much it
  sent.

Nothing sleeps: time is the clock of each test.
"""

from __future__ import annotations

import os

from twisted.internet import defer, task
from twisted.trial import unittest

from onion_twisted.peer.upload_rate import UploadRate
from onion_twisted.peer.upload_stream import ChunkProducer, WindowedChunkSender
from tests.support.deferreds import inline
from tests.support.peer_network import ALICE_IP, BOB_IP, CHUNK

from .test_peer import PeerNetworkCase, UploadWatch, downloaded, finished

KiB = 1024


class Uploader:
    """Takes ``chunk`` bytes from ``rate`` again each time the last take was let through."""

    def __init__(self, rate: UploadRate, chunk: int, clock: task.Clock):
        self.rate = rate
        self.chunk = chunk
        self.clock = clock
        self.sent = 0
        self.times: list[float] = []   # when each chunk was let through
        self.pending: defer.Deferred | None = None
        self.stopped = False
        self._next()

    def _next(self) -> None:
        if self.stopped:
            return
        self.pending = self.rate.take(self.chunk)
        self.pending.addCallbacks(self._through, lambda f: f.trap(defer.CancelledError))

    def _through(self, _) -> None:
        self.sent += self.chunk
        self.times.append(self.clock.seconds())
        self._next()

    def stop(self) -> None:
        self.stopped = True
        self.pending.cancel()


def run_clock(clock: task.Clock, seconds: float, step: float = 0.01) -> None:
    for _ in range(round(seconds / step)):
        clock.advance(step)


class UploadRateTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()

    def test_the_long_run_rate_is_the_cap_within_one_chunk(self):
        cap, chunk = 100_000, 16 * KiB
        rate = UploadRate(self.clock, cap, burst=chunk)
        uploader = Uploader(rate, chunk, self.clock)
        run_clock(self.clock, 10)
        self.assertLessEqual(abs(uploader.sent - cap * 10), chunk, uploader.sent)
        self.assertEqual(rate.bytes_sent, uploader.sent)
        # Steady, not in bursts: after the first (saved-up) chunk, one every chunk/cap seconds.
        gaps = [b - a for a, b in zip(uploader.times[1:], uploader.times[2:])]
        self.assertTrue(all(abs(g - chunk / cap) <= 0.011 for g in gaps), gaps)

    def test_a_chunk_larger_than_the_burst_still_goes_and_its_debt_is_carried(self):
        cap, burst, chunk = 10_000, 1_000, 5_000
        rate = UploadRate(self.clock, cap, burst=burst)
        uploader = Uploader(rate, chunk, self.clock)
        self.assertEqual(uploader.sent, chunk)  # the bucket was full: the big chunk went at once
        run_clock(self.clock, 10)
        self.assertLessEqual(abs(uploader.sent - cap * 10), chunk, uploader.sent)
        # The debt is paid off before the next chunk goes: never more than the cap.
        self.assertLessEqual(uploader.sent, cap * 10 + burst)

    def test_two_uploads_share_the_cap_evenly(self):
        cap, chunk = 64 * KiB, 16 * KiB
        rate = UploadRate(self.clock, cap, burst=chunk)
        first, second = Uploader(rate, chunk, self.clock), Uploader(rate, chunk, self.clock)
        for seconds in (10, 20, 30):
            run_clock(self.clock, 10)
            self.assertLessEqual(abs(first.sent + second.sent - cap * seconds), chunk)
            # Turn by turn; the first also had the saved-up burst. The gap never grows.
            self.assertLessEqual(abs(first.sent - second.sent), chunk + rate.burst, (first.sent, second.sent))
            self.assertEqual(rate.waiting, 2)  # each has one chunk queued, no more

    def test_requests_go_in_the_order_they_came(self):
        rate = UploadRate(self.clock, 1000, burst=1000)
        order = []
        rate.take(1000)  # the saved-up burst is spent
        rate.take(800).addCallback(lambda _: order.append("big"))
        rate.take(10).addCallback(lambda _: order.append("small"))  # could go sooner, waits its turn
        self.clock.advance(0.5)
        self.assertEqual(order, [])
        self.clock.advance(0.31)
        self.assertEqual(order, ["big", "small"])

    def test_a_cap_of_zero_never_waits(self):
        rate = UploadRate(self.clock, 0, burst=16 * KiB)
        for _ in range(100):
            d = rate.take(4 * 1024 * KiB)
            self.assertIsNone(self.successResultOf(d))
        self.assertEqual(rate.bytes_sent, 100 * 4 * 1024 * KiB)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(rate.status(), {"cap": 0, "burst": 16 * KiB, "bytes_sent": 100 * 4 * 1024 * KiB,
                                         "waiting": 0})

    def test_a_cancelled_request_leaves_no_waiter_and_spends_nothing(self):
        rate = UploadRate(self.clock, 1000, burst=1000)
        rate.take(1000)
        waiting = rate.take(1000)
        self.assertEqual(rate.waiting, 1)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        waiting.cancel()
        self.failureResultOf(waiting, defer.CancelledError)
        self.assertEqual(rate.waiting, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])  # no timer left for nobody
        self.assertEqual(rate.bytes_sent, 1000)
        self.clock.advance(1)
        # The cancelled request spent nothing: a full second's tokens are there.
        self.successResultOf(rate.take(1000))

    def test_cancelling_the_first_request_lets_the_next_go_on_time(self):
        rate = UploadRate(self.clock, 1000, burst=1000)
        rate.take(1000)
        first, second = rate.take(1000), rate.take(500)
        self.clock.advance(0.2)
        first.cancel()
        self.failureResultOf(first, defer.CancelledError)
        self.assertNoResult(second)
        self.clock.advance(0.29)
        self.assertNoResult(second)
        self.clock.advance(0.01)  # 0.5 s from the start: the second's 500 bytes
        self.successResultOf(second)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_stopped_uploader_among_others_leaves_them_the_whole_cap(self):
        cap, chunk = 32 * KiB, 8 * KiB
        rate = UploadRate(self.clock, cap, burst=chunk)
        first, second = Uploader(rate, chunk, self.clock), Uploader(rate, chunk, self.clock)
        run_clock(self.clock, 2)
        first.stop()
        self.assertEqual(rate.waiting, 1)
        before = second.sent
        run_clock(self.clock, 4)
        self.assertLessEqual(abs(second.sent - before - cap * 4), chunk)

    def test_bad_values_are_refused(self):
        self.assertRaises(ValueError, UploadRate, self.clock, -1)
        self.assertRaises(ValueError, UploadRate, self.clock, 10, burst=0)
        self.assertRaises(ValueError, UploadRate(self.clock, 10).take, -5)


# --- the producer of an upload, capped ------------------------------------------------------


class CappedProducerTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.path = self.mktemp()
        self.data = os.urandom(10 * 1000)
        with open(self.path, "wb") as f:
            f.write(self.data)
        self.reads: list[int] = []

    def producer(self, rate) -> ChunkProducer:
        def pread(fd, length, offset):
            self.reads.append(offset // 1000)
            return os.pread(fd, length, offset)
        return ChunkProducer.open(self.path, 1000, rate=rate, pread=pread)

    def test_a_chunk_is_read_and_sent_only_when_the_cap_lets_it(self):
        rate = UploadRate(self.clock, 1000, burst=1000)
        sent = []
        sender = WindowedChunkSender(lambda i, data: sent.append((i, data)), window=8, clock=self.clock)
        done = sender.start(self.producer(rate))
        self.assertEqual([i for i, _ in sent], [0])  # the saved-up burst
        self.assertEqual(self.reads, [0])  # the second is not read while it waits
        self.clock.advance(1)
        self.assertEqual([i for i, _ in sent], [0, 1])
        for _ in range(8):
            self.clock.advance(1)
        self.assertEqual(self.successResultOf(done), 10)
        self.assertEqual(b"".join(data for _, data in sent), self.data)
        self.assertEqual(self.clock.seconds(), 9)

    def test_a_stopped_upload_cancels_its_waiting_request(self):
        rate = UploadRate(self.clock, 1000, burst=1000)
        sender = WindowedChunkSender(lambda i, data: None, window=8, clock=self.clock, ack_timeout=None)
        producer = self.producer(rate)
        done = sender.start(producer)
        self.assertEqual(rate.waiting, 1)
        sender.cancel()
        self.failureResultOf(done, defer.CancelledError)
        self.assertTrue(producer.stopped)
        self.assertIsNone(producer.fd)
        self.assertEqual(rate.waiting, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(rate.bytes_sent, 1000)

    def test_a_paused_producer_does_not_take_twice(self):
        rate = UploadRate(self.clock, 1000, burst=1000)
        acks: list[defer.Deferred] = []

        def send(i, data):
            acks.append(defer.Deferred())
            return acks[-1]

        sender = WindowedChunkSender(send, window=1, clock=self.clock, ack_timeout=None)
        done = sender.start(self.producer(rate))
        self.assertEqual(len(acks), 1)  # window full: the producer is paused
        self.clock.advance(5)
        self.assertEqual(rate.bytes_sent, 1000)  # a paused producer asks for nothing
        for _ in range(10):
            acks[-1].callback(None)
            self.clock.advance(1)
        self.assertEqual(self.successResultOf(done), 10)
        self.assertEqual(rate.bytes_sent, len(self.data))
        self.assertEqual(self.reads, list(range(10)))


# --- a capped sharer in a whole network --------------------------------------------------------


class CappedSharerTests(PeerNetworkCase):
    def setUp(self):
        super().setUp()
        self.bob = self.net.make_peer(BOB_IP, "bob", max_upload_rate=CHUNK)  # a chunk a second

    @inline
    async def test_a_capped_sharer_sends_no_faster_than_its_cap(self):
        net = self.net
        data = await self.bob_shares_and_start("capped.bin", 8 * CHUNK)
        watch = UploadWatch(self.bob)
        start = net.clock.seconds()
        d = self.alice.download("capped.bin")
        net.pump(until=finished(d))
        took = net.clock.seconds() - start
        self.assertEqual(downloaded(net, "capped.bin"), data)
        self.assertEqual(watch.bytes_sent(), len(data))
        # The first chunk goes at once (the burst), each of the 7 others a second later.
        self.assertGreaterEqual(took, 7)
        self.assertLess(took, 7 + 5, "the cap held the upload back more than it says")
        status = self.bob.status()["upload_rate"]
        self.assertEqual(status["cap"], CHUNK)
        self.assertGreaterEqual(status["bytes_sent"], len(data))  # the chunks and any transfer_start
        self.assertEqual(status["waiting"], 0)
        self.assertEqual(self.alice.status()["upload_rate"]["cap"], 0)
        self.assertEqual(self.alice.status()["upload_rate"]["bytes_sent"], 0)

    @inline
    async def test_an_uncapped_sharer_does_not_wait(self):
        net = self.net
        alice = net.make_peer(ALICE_IP, "alice")  # the default: no cap
        net.write_share(ALICE_IP, "free.bin", os.urandom(8 * CHUNK))
        await net.start()
        start = net.clock.seconds()
        d = self.bob.download("free.bin")
        net.pump(until=finished(d))
        self.assertLess(net.clock.seconds() - start, 2)
        self.assertGreaterEqual(alice.status()["upload_rate"]["bytes_sent"], 8 * CHUNK)
