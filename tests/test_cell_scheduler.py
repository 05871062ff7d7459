"""Small cells before bulk ones, never reordered within a circuit (net/cell_scheduler.py)."""

from __future__ import annotations

import uuid

from twisted.internet import defer
from twisted.trial import unittest

from onion_twisted.net.cell_scheduler import BULK_SIZE, CellScheduler, circuit_hint


def cell(cid: str, size: int = 100) -> bytes:
    head = b'{"CID":"' + cid.encode("ascii") + b'","payload":"'
    return head + b"A" * max(0, size - len(head) - 2) + b'"}'


class Turns:
    """The reactor's callLater(0) as it behaves: a call made during a turn runs in the next
    one (task.Clock.advance(0) would run it in the same)."""

    def __init__(self):
        self.calls: list = []

    def callLater(self, delay, f, *args):
        self.calls.append(lambda: f(*args))
        return object()

    def turn(self, n: int = 1):
        for _ in range(n):
            calls, self.calls = self.calls, []
            for call in calls:
                call()


class Handlers:
    """``start`` callables that record when they ran and fire when the test says."""

    def __init__(self, cost: float = 0.02):
        self.ran: list[str] = []
        self.cancelled: list[str] = []
        self.pending: dict[str, defer.Deferred] = {}
        self.elapsed = 0.0  # the scheduler's clock of handling time
        self.cost = cost    # what each handler takes of it: by default more than a turn's budget

    def now(self) -> float:
        return self.elapsed

    def start(self, name: str, fails: bool = False):
        def start():
            self.ran.append(name)
            self.elapsed += self.cost
            if fails:
                raise ValueError(name)
            d = self.pending[name] = defer.Deferred(lambda _d: self.cancelled.append(name))
            return d
        return start


class CellSchedulerTests(unittest.TestCase):
    def setUp(self):
        self.clock = Turns()
        self.handlers = Handlers()
        self.scheduler = CellScheduler(self.clock, now=self.handlers.now)
        self.a, self.b = str(uuid.uuid4()), str(uuid.uuid4())

    def submit(self, name: str, cid: str, size: int = 100, **kwargs) -> defer.Deferred:
        return self.scheduler.submit(cell(cid, size), self.handlers.start(name, **kwargs))

    def test_the_circuit_is_read_from_the_cells_first_bytes(self):
        self.assertEqual(circuit_hint(cell(self.a)), self.a.encode("ascii"))
        self.assertIsNone(circuit_hint(b'{"payload":"x","CID":"' + self.a.encode() + b'"}'))
        self.assertIsNone(circuit_hint(b'{"CID":"control","payload":{}}'))

    def test_a_small_cell_runs_at_once_and_its_answer_comes_back(self):
        d = self.submit("create", self.a)
        self.assertEqual(self.handlers.ran, ["create"])
        self.handlers.pending["create"].callback(b"created")
        self.assertEqual(self.successResultOf(d), b"created")

    def test_bulk_cells_run_one_per_turn_in_order(self):
        results = [self.submit(f"chunk{i}", self.a, BULK_SIZE) for i in range(3)]
        self.assertEqual(self.handlers.ran, [])
        self.clock.turn()
        self.assertEqual(self.handlers.ran, ["chunk0"])
        self.clock.turn(2)
        self.assertEqual(self.handlers.ran, ["chunk0", "chunk1", "chunk2"])
        self.handlers.pending["chunk1"].callback(b"ok")
        self.assertEqual(self.successResultOf(results[1]), b"ok")
        self.assertNoResult(results[0])
        self.assertEqual(len(self.scheduler), 0)

    def test_cheap_bulk_cells_share_a_turn_up_to_its_budget(self):
        self.handlers.cost = 0.004  # 10 ms a turn: three of them, the third past it
        for i in range(5):
            self.submit(f"chunk{i}", self.a, BULK_SIZE)
        self.clock.turn()
        self.assertEqual(self.handlers.ran, ["chunk0", "chunk1", "chunk2"])
        self.clock.turn()
        self.assertEqual(len(self.handlers.ran), 5)

    def test_a_small_cell_of_another_circuit_goes_before_queued_bulk(self):
        self.submit("chunk0", self.a, BULK_SIZE)
        self.submit("chunk1", self.a, BULK_SIZE)
        self.submit("create", self.b)
        self.assertEqual(self.handlers.ran, ["create"])
        self.assertEqual(self.scheduler.small_first, 1)
        self.clock.turn()
        self.assertEqual(self.handlers.ran, ["create", "chunk0"])

    def test_a_small_cell_of_a_circuit_with_bulk_queued_waits_behind_it(self):
        self.submit("chunk0", self.a, BULK_SIZE)
        self.submit("transfer_end", self.a)
        self.submit("probe", self.b)
        self.assertEqual(self.handlers.ran, ["probe"])
        self.clock.turn(2)
        self.assertEqual(self.handlers.ran, ["probe", "chunk0", "transfer_end"])
        self.submit("next", self.a)  # nothing queued for it any more: at once
        self.assertEqual(self.handlers.ran[-1], "next")

    def test_a_small_cell_whose_circuit_cannot_be_read_waits_behind_the_queue(self):
        self.submit("chunk0", self.a, BULK_SIZE)
        d = self.scheduler.submit(b'{"payload":"x","CID":"' + self.b.encode() + b'"}',
                                  self.handlers.start("odd"))
        self.assertEqual(self.handlers.ran, [])
        self.clock.turn(2)
        self.assertEqual(self.handlers.ran, ["chunk0", "odd"])
        self.assertNoResult(d)

    def test_a_cancelled_queued_cell_never_runs(self):
        first = self.submit("chunk0", self.a, BULK_SIZE)
        second = self.submit("chunk1", self.a, BULK_SIZE)
        first.cancel()
        self.failureResultOf(first, defer.CancelledError)
        self.clock.turn()
        self.assertEqual(self.handlers.ran, ["chunk1"])
        self.assertNoResult(second)

    def test_cancelling_a_running_cell_cancels_its_handler(self):
        d = self.submit("chunk0", self.a, BULK_SIZE)
        self.clock.turn()
        d.cancel()
        self.assertEqual(self.handlers.cancelled, ["chunk0"])
        self.failureResultOf(d, defer.CancelledError)

    def test_a_failure_reaches_the_caller_and_the_queue_goes_on(self):
        failed = self.submit("bad", self.a, BULK_SIZE, fails=True)
        self.submit("chunk1", self.a, BULK_SIZE)
        self.clock.turn()
        self.failureResultOf(failed, ValueError)
        self.clock.turn()
        self.assertEqual(self.handlers.ran, ["bad", "chunk1"])

    def test_a_queued_cell_lets_go_of_its_handler_once_run(self):
        d = self.submit("chunk0", self.a, BULK_SIZE)
        self.clock.turn()
        self.handlers.pending["chunk0"].errback(RuntimeError("next hop"))
        self.failureResultOf(d, RuntimeError)
        self.assertEqual(len(self.scheduler), 0)
        self.assertEqual(self.scheduler._queued_circuits, {})

    def test_the_queue_counts_its_bytes_and_remembers_the_most(self):
        self.submit("chunk0", self.a, BULK_SIZE)
        cancelled = self.submit("chunk1", self.b, BULK_SIZE + 10)
        self.submit("create", str(uuid.uuid4()))  # run at once: never queued bytes
        self.assertEqual(self.scheduler.queued_bytes, 2 * BULK_SIZE + 10)
        cancelled.cancel()  # its body is let go at once
        self.failureResultOf(cancelled, defer.CancelledError)
        self.assertEqual(self.scheduler.queued_bytes, BULK_SIZE)
        self.clock.turn()
        self.assertEqual(self.scheduler.queued_bytes, 0)
        self.assertEqual(self.scheduler.peak_queued_bytes, 2 * BULK_SIZE + 10)
