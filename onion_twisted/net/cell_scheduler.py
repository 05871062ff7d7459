"""Small cells before bulk ones: a node's answer to "a CREATE waits behind chunks".

Every cell a member receives is one ``POST /``, handled the moment its body
is in. Under load a node's event loop finds several 1 MiB chunks complete
in one turn, and handling each (a layer of AES, a new cell, TLS to the next
hop) costs milliseconds of a core it shares with many processes; a CREATE,
an EXTEND or a probe that completed in the same turn waited behind all of
them, at every hop of a build. Tor keeps a queue per circuit and serves the
quiet ones first (EWMA); this is the same idea at the size of this network.

``CellScheduler.submit(body, start)`` runs ``start()`` (the handler; it
returns a Deferred or a coroutine) at once for a small cell, and queues a
bulk one (``bulk_size`` bytes or more): queued cells run in order on the
reactor's next turn (``clock.callLater(0)``), for at most ``turn_budget``
seconds of handling per turn (the handling up to a chunk's send is
synchronous: AES, a new cell, TLS), so a small cell read in between goes
first. Measured with ``bench/scale.py`` (README, "At scale, under
churn"): one bulk cell per turn halved the builds' median under load, but
the queue outgrew what the nodes drained and their peak memory rose by a
fifth; 2 ms per turn brought neither; 10 ms keeps the memory where it was
and cut the builds' p95 under churn by about half. A small cell of a circuit that has a bulk cell
queued waits behind it: cells of one circuit are never reordered (a
``transfer_end`` must not pass the chunks before it). The circuit is read
from the body's first bytes when it is a cell as every member writes one
(``{"CID":"…"``); a small cell whose circuit cannot be read that way waits
behind whatever is queued. Cancelling the returned Deferred (the client
went away) drops a queued cell unstarted, or cancels a running one.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from typing import Callable

from twisted.internet import defer

BULK_SIZE = 64 * 1024
TURN_BUDGET = 0.01
_PREFIX = b'{"CID":"'
_CID_END = len(_PREFIX) + 36  # a canonical UUIDv4


def circuit_hint(body: bytes) -> bytes | None:
    """The circuit id of a cell written as members write one, or None."""
    if body.startswith(_PREFIX) and body[_CID_END:_CID_END + 1] == b'"':
        return body[len(_PREFIX):_CID_END]
    return None


class _Queued:
    """A queued cell: ``start`` until it runs or is cancelled (then None), ``running`` once it runs."""

    __slots__ = ("circuit", "size", "start", "result", "running")

    def __init__(self, circuit, size, start, canceller):
        self.circuit = circuit
        self.size = size
        self.start = start
        self.result = defer.Deferred(canceller=lambda _d: canceller(self))
        self.running: defer.Deferred | None = None


class CellScheduler:
    def __init__(self, clock, bulk_size: int = BULK_SIZE, turn_budget: float = TURN_BUDGET,
                 now: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.bulk_size = bulk_size
        self.turn_budget = turn_budget
        self.now = now
        self._queue: deque[_Queued] = deque()
        self._queued_circuits: Counter = Counter()
        self._turn = None
        self.small_first = 0  # small cells that went ahead of queued bulk ones (the tests read it)
        # What /metrics tells of the queue: whether a node's memory is held here.
        self.queued_bytes = 0
        self.peak_queued_bytes = 0

    def __len__(self) -> int:
        return len(self._queue)

    def submit(self, body: bytes, start: Callable[[], object]) -> defer.Deferred:
        circuit = circuit_hint(body)
        if len(body) < self.bulk_size and not self._must_wait(circuit):
            if self._queue:
                self.small_first += 1
            return defer.ensureDeferred(start())
        entry = _Queued(circuit, len(body), start, self._cancel)
        self._queue.append(entry)
        self.queued_bytes += entry.size
        self.peak_queued_bytes = max(self.peak_queued_bytes, self.queued_bytes)
        self._queued_circuits[circuit] += 1
        self._next_turn()
        return entry.result

    def _must_wait(self, circuit) -> bool:
        if not self._queue:
            return False
        return circuit is None or self._queued_circuits[circuit] > 0

    def _next_turn(self) -> None:
        if self._turn is None and self._queue:
            self._turn = self.clock.callLater(0, self._run_turn)

    def _run_turn(self) -> None:
        self._turn = None
        began = self.now()
        while self._queue and self.now() - began < self.turn_budget:
            entry = self._queue.popleft()
            self._forget(entry)
            if entry.start is not None:  # not cancelled while it waited
                self._run(entry)
        self._next_turn()

    def _run(self, entry: _Queued) -> None:
        start, entry.start = entry.start, None
        try:
            entry.running = defer.ensureDeferred(start())
        except Exception:  # noqa: BLE001 - a handler that raised at once: its caller hears it
            entry.result.errback()
            return
        entry.running.addCallbacks(self._settle, self._settle_failure, callbackArgs=(entry,), errbackArgs=(entry,))

    def _forget(self, entry: _Queued) -> None:
        self.queued_bytes -= entry.size
        circuit = entry.circuit
        self._queued_circuits[circuit] -= 1
        if self._queued_circuits[circuit] <= 0:
            del self._queued_circuits[circuit]

    @staticmethod
    def _settle(result, entry: _Queued) -> None:
        if not entry.result.called:
            entry.result.callback(result)

    @staticmethod
    def _settle_failure(failure, entry: _Queued) -> None:
        if not entry.result.called:
            entry.result.errback(failure)

    def _cancel(self, entry: _Queued) -> None:
        if entry.running is not None:
            entry.running.cancel()
        else:
            entry.start = None  # skipped when its turn comes; its body is let go now
            self.queued_bytes -= entry.size
            entry.size = 0
