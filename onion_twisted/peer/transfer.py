"""One source's transfer for a download (PROTOCOL.md §8, §13), the requester's side.

A download asks the tracker for its missing chunks once per source: each
ask is a ``Transfer``, with the chunk indexes it claimed, its own
ephemeral key (§13) and, once the sharer's ``transfer_start`` opened, its
cipher. The tracker's reply names its transfer id; chunks may come before
it (``saw``). It ends once (``end``): its ``transfer_end``, a stall, a lie,
the download whole, or the circuit gone. Nothing here does I/O.
"""

from __future__ import annotations

from twisted.internet import defer

from onion_twisted.protocol import e2e

SEEN_TRANSFERS = 16  # transfer ids remembered from chunks that came before the tracker's reply


class Transfer:
    """One request to the tracker and the transfer it brings; see the module's text."""

    __slots__ = ("claimed", "transfer", "seen", "private", "cipher", "pending_start", "e2e", "outcome", "wake",
                 "refused", "chunks", "last_chunk_at", "source_failed", "circuit")

    def __init__(self, claimed: list[int] | None):
        self.claimed = claimed             # chunk indexes asked of this source; None: all that are missing
        self.transfer: str | None = None   # its id, once the tracker's reply (or a transfer_start) names it
        self.seen: set[str] = set()        # ids of chunks that came before the reply: one may be ours
        self.private = None                # §13: this request's X25519 key
        self.cipher: e2e.TransferCipher | None = None  # §13: once its transfer_start checked out
        self.pending_start: tuple | None = None  # (cipher, leaves, chunk size) waiting for the root or size
        self.e2e: bool | None = None       # whether the tracker made it end to end (None: no reply yet)
        self.outcome: str | None = None    # how it ended ("ok" or why not); None while under way
        self.wake: defer.Deferred | None = None
        self.refused = 0                   # its chunks that did not authenticate
        self.chunks = 0                    # its chunks written
        self.last_chunk_at: float | None = None
        self.source_failed = False         # it ended by its source's doing: lied, went silent, stopped
        self.circuit = None                # the peer's circuit its request went on (its chunks come back on it)

    def matches(self, transfer) -> bool:
        """Whether a chunk or end of ``transfer`` is this one's: its id, or before the reply one it saw."""
        return transfer == self.transfer or (self.transfer is None and transfer in self.seen)

    def saw(self, transfer: str) -> None:
        """A chunk came before the tracker's reply: its transfer may be this one (bounded)."""
        if len(self.seen) < SEEN_TRANSFERS:
            self.seen.add(transfer)

    def end(self, outcome: str, source_failed: bool = False) -> None:
        """The transfer is over; the first outcome counts. ``source_failed``: by its source's
        doing, so another source may be asked for what it did not bring."""
        if self.outcome is None:
            self.outcome = outcome
            self.source_failed = source_failed
            if self.wake is not None and not self.wake.called:
                self.wake.callback(None)

    async def wait_for_end(self, clock, stall_timeout: float) -> str:
        """Until ``end``, or ``stall_timeout`` seconds after its last chunk (or its start)."""
        started = clock.seconds()
        while self.outcome is None:
            since = self.last_chunk_at if self.last_chunk_at is not None else started
            left = stall_timeout - (clock.seconds() - since)
            if left <= 0:
                self.end(f"stalled: no chunk for {stall_timeout:.0f} s", source_failed=True)
                break
            wake = self.wake = defer.Deferred()
            timer = clock.callLater(left, lambda: wake.called or wake.callback(None))
            await wake
            if timer.active():
                timer.cancel()
        return self.outcome
