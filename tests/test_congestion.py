"""An upload's delay-based window (protocol/congestion.py) and the sender that follows it."""

from __future__ import annotations

from pathlib import Path

from twisted.internet import task
from twisted.trial import unittest

from onion_twisted.protocol.congestion import DelayWindow
from onion_twisted.peer.upload_stream import ChunkProducer, WindowedChunkSender

from .test_sharing import FakeCircuit


def one_round(window: DelayWindow, rtt: float) -> int:
    """A whole window of acknowledgements, each after ``rtt``; the window after them."""
    for _ in range(window.window):
        window.acknowledged(rtt)
    return window.window


def vegas(max_window: int = 8, **kwargs) -> DelayWindow:
    """A window with alpha 1 and beta 2, whatever the defaults: the arithmetic below is theirs."""
    return DelayWindow(max_window, alpha=1.0, beta=2.0, **kwargs)


class DelayWindowTests(unittest.SynchronousTestCase):
    def test_it_starts_at_2_within_its_bounds(self):
        self.assertEqual(vegas(8).window, 2)
        self.assertEqual(vegas(8, start=5).window, 5)
        self.assertEqual(vegas(3, start=5).window, 3)
        self.assertEqual(vegas(1).window, 1)
        self.assertRaises(ValueError, DelayWindow, 0)

    def test_an_idle_path_grows_it_to_the_most(self):
        window = vegas(8)
        sizes = [one_round(window, 0.1) for _ in range(8)]
        self.assertEqual(sizes, [3, 4, 5, 6, 7, 8, 8, 8])

    def test_a_queueing_path_shrinks_it_to_two_and_no_lower(self):
        window = vegas(8)
        for _ in range(4):  # the least round trip: 0.1 s
            one_round(window, 0.1)
        self.assertEqual(window.window, 6)
        sizes = [one_round(window, 1.0) for _ in range(6)]  # 90 % of each round trip is queue
        self.assertEqual(sizes, [5, 4, 3, 2, 2, 2])
        self.assertEqual((window.smallest, window.largest), (2, 6))

    def test_it_holds_between_alpha_and_beta(self):
        window = vegas(8)
        for _ in range(3):
            one_round(window, 0.1)
        # At 5 in flight, a round trip of 0.15 s means 1.7 chunks waiting: between 1 and 2.
        self.assertEqual([one_round(window, 0.15) for _ in range(3)], [5, 5, 5])

    def test_the_least_round_trip_of_a_round_counts(self):
        window = vegas(8)
        for _ in range(3):
            one_round(window, 0.1)
        for rtt in (5.0, 5.0, 5.0, 0.1, 5.0):  # one fast acknowledgement: no queue
            window.acknowledged(rtt)
        self.assertEqual(window.window, 6)

    def test_it_recovers_once_the_queue_drains(self):
        window = vegas(8)
        for _ in range(4):
            one_round(window, 0.1)
        for _ in range(4):
            one_round(window, 1.0)
        self.assertEqual(window.window, 2)
        self.assertEqual([one_round(window, 0.1) for _ in range(3)], [3, 4, 5])

    def test_the_defaults_keep_two_to_three_chunks_queued(self):
        window = DelayWindow(8)
        self.assertEqual((window.alpha, window.beta, window.window), (2.0, 3.0, 2))
        for _ in range(8):
            one_round(window, 0.1)
        self.assertEqual(window.window, 8)
        self.assertEqual(one_round(window, 0.1 / (1 - 2.5 / 8)), 8)  # 2.5 queued: held
        self.assertEqual(one_round(window, 1.0), 7)
        for _ in range(10):
            one_round(window, 10.0)
        self.assertEqual(window.window, 3)  # 2.97 queued at 3: no lower

    def test_a_negative_round_trip_changes_nothing(self):
        window = vegas(8)
        self.assertEqual(window.acknowledged(-1.0), 2)
        self.assertIsNone(window.base_rtt)


class AdaptiveSenderTests(unittest.TestCase):
    CHUNK = 16

    def setUp(self):
        self.clock = task.Clock()
        self.circuit = FakeCircuit()
        path = Path(self.mktemp())
        path.write_bytes(b"v" * (self.CHUNK * 200))
        self.producer = ChunkProducer.open(path, self.CHUNK)
        self.sender = WindowedChunkSender(self.circuit.send, window=8, clock=self.clock, adaptive=True)
        self.done = self.sender.start(self.producer)

    def ack_oldest_after(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.circuit.ack(min(self.circuit.pending))

    def test_it_starts_with_two_in_flight(self):
        self.assertEqual(len(self.circuit.pending), 2)
        self.assertTrue(self.producer.paused)

    def test_slow_acknowledgements_leave_fewer_chunks_in_flight(self):
        for _ in range(8):  # the first rounds: 0.1 s each, the least seen
            self.clock.advance(0.1)
            for index in sorted(self.circuit.pending):
                self.circuit.ack(index)
        self.assertEqual(self.sender.window, 8)
        for _ in range(40):  # then the path queues: 2 s per acknowledgement
            self.ack_oldest_after(2.0)
        # 3: with the defaults (alpha 2, beta 3) a window of 3 cannot show more than 3 queued.
        self.assertEqual(self.sender.window, 3)
        self.assertEqual(len(self.circuit.pending), 3)
        self.assertTrue(self.producer.paused)

    def test_a_shrinking_window_never_fails_the_upload(self):
        # The window shrinks below the chunks already in flight: the producer waits
        # until fewer are, and is never refused for writing past the window.
        self.clock.advance(0.1)
        for index in sorted(self.circuit.pending):
            self.circuit.ack(index)
        for _ in range(60):
            self.ack_oldest_after(3.0)
        self.assertNoResult(self.done)
        self.assertLessEqual(len(self.circuit.pending), self.sender.window)
        while self.circuit.pending:
            self.ack_oldest_after(3.0)
        self.assertEqual(self.successResultOf(self.done), 200)

    def test_without_adaptive_the_window_is_fixed(self):
        sender = WindowedChunkSender(FakeCircuit().send, window=8, clock=self.clock)
        self.assertIsNone(sender.control)
        self.assertEqual(sender.window, 8)
