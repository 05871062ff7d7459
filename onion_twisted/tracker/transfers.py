"""The transfers the tracker estimates to be under way (docs/protocol.md 11.4), with no I/O.

The tracker never sees ``transfer_end`` (it crosses the bridge), so a
transfer counts as under way from its ``transfer`` reply for an estimate of
its duration. The estimate is kept per source circuit (``TrackedCircuit.
transfers``) and per exit IP, so the choice of a source spreads load over
exits, not only over circuits (docs/protocol.md 17.10, choice 39).
Transfer ids are also remembered with their source circuit, for the
``exclude`` and ``avoid`` of later requests (17.10, choices 27, 37).
"""

from __future__ import annotations

import heapq

MAX_TRANSFERS = 1024  # transfers counted as under way per source circuit (the estimate saturates)
MAX_TRANSFER_SOURCES = 65536  # transfer id -> its source, kept so a request can exclude or avoid a source (§13)


class Transfers:
    def __init__(self, clock, idle_timeout: float):
        self.clock = clock
        self.idle_timeout = idle_timeout
        # Which circuit served each recent transfer: a requester names the transfer in
        # ``exclude`` or ``avoid`` and never learns more of the source than that id.
        self.sources: dict[str, tuple] = {}
        # Every transfer under way, by its end: one heap for all exits, so counting an
        # exit's transfers costs what has ended since, not what is under way.
        self._ending: list[tuple[float, str]] = []
        self._under_way: dict[str, tuple[str, float]] = {}  # transfer id -> (exit IP, end)
        self._per_exit: dict[str, int] = {}

    def start(self, circuit, transfer: str, size: int | None) -> None:
        # The estimate: the size at 1 MiB/s plus a minute, at most the bridges' idle time.
        estimate = 60.0 + (size or 0) / (1024 * 1024)
        now = self.clock.seconds()
        transfers = circuit.transfers
        if len(transfers) >= MAX_TRANSFERS and self.of_circuit(circuit) >= MAX_TRANSFERS:
            self.end(circuit, min(transfers, key=transfers.__getitem__))  # the one that ends first
        until = now + min(estimate, self.idle_timeout)
        transfers[transfer] = until
        self._drop(transfer)  # an id seen before (never from the tracker's own uuid4s) counts once
        self._under_way[transfer] = (circuit.key[0], until)
        self._per_exit[circuit.key[0]] = self._per_exit.get(circuit.key[0], 0) + 1
        heapq.heappush(self._ending, (until, transfer))
        sources = self.sources
        if len(sources) >= MAX_TRANSFER_SOURCES:
            del sources[next(iter(sources))]  # the oldest: insertion order
        sources[transfer] = circuit.key

    def end(self, circuit, transfer: str) -> None:
        if circuit.transfers.pop(transfer, None) is not None:
            self._drop(transfer)

    def forget(self, circuit) -> None:
        """A circuit forgotten: its bridges go with it, so its transfers load its exit no more."""
        for transfer in circuit.transfers:
            self._drop(transfer)
        circuit.transfers.clear()

    def of_circuit(self, circuit) -> int:
        if circuit.transfers:
            now = self.clock.seconds()
            for t in [t for t, until in circuit.transfers.items() if until <= now]:
                del circuit.transfers[t]
        return len(circuit.transfers)

    def of_exit(self, exit_ip: str) -> int:
        self._expire()
        return self._per_exit.get(exit_ip, 0)

    def total(self) -> int:
        self._expire()
        return len(self._under_way)

    def source_keys(self, transfer_ids) -> set:
        """The source circuits of these transfers; an id the tracker does not know names none."""
        return {self.sources[t] for t in transfer_ids if t in self.sources}

    def _drop(self, transfer: str) -> None:
        # Its heap entry stays until its end comes round (or a compaction): _expire skips it.
        gone = self._under_way.pop(transfer, None)
        if gone is not None:
            left = self._per_exit[gone[0]] - 1
            if left:
                self._per_exit[gone[0]] = left
            else:
                del self._per_exit[gone[0]]
            if len(self._ending) > 2 * len(self._under_way) + 1024:
                self._ending = [(until, t) for t, (_, until) in self._under_way.items()]
                heapq.heapify(self._ending)

    def _expire(self) -> None:
        now = self.clock.seconds()
        while self._ending and self._ending[0][0] <= now:  # self's: _drop may compact the heap
            until, transfer = heapq.heappop(self._ending)
            live = self._under_way.get(transfer)
            if live is not None and live[1] == until:
                self._drop(transfer)
