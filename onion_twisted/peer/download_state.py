"""A download's lifecycle (PROTOCOL.md §8): its states and the named moves between them.

Only ``downloads.Download`` changes its state, through the transitions
listed here; anything else is ``IllegalTransition`` (a bug in the caller).
``SourceStats`` is what one source (one transfer) sent a download, as the
page shows it; ``BadChunk`` and ``SourceLied`` are the two ways a chunk is
refused (§13: altered on the way, or the sharer's own bytes not the file).
"""

from __future__ import annotations

import enum


class DownloadState(str, enum.Enum):
    """Where a download is; the values are what the API and the page show."""
    QUEUED = "queued"
    REQUESTING = "requesting"
    RECEIVING = "receiving"
    VERIFYING = "verifying"
    DONE = "done"
    FAILED = "failed"


QUEUED, REQUESTING, RECEIVING, VERIFYING, DONE, FAILED = DownloadState
ACTIVE = (QUEUED, REQUESTING, RECEIVING, VERIFYING)
IN_TRANSFER = (REQUESTING, RECEIVING)  # an attempt waits for its transfer's chunks and end

# Each named transition: the states it may start from, and the state it leads to.
# A chunk may be written to a queued download (a store filled directly, as tests
# and tools do); nothing leaves "done".
TRANSITIONS = {
    "start_request": ({QUEUED, REQUESTING, RECEIVING}, REQUESTING),
    "receive": ({QUEUED, REQUESTING, RECEIVING}, RECEIVING),
    "verify": ({REQUESTING, RECEIVING}, VERIFYING),
    "done": ({VERIFYING}, DONE),
    "requeue": ({REQUESTING, RECEIVING, VERIFYING}, QUEUED),
    "restart": ({FAILED}, QUEUED),
    "fail": ({QUEUED, REQUESTING, RECEIVING, VERIFYING, FAILED}, FAILED),
}


class IllegalTransition(Exception):
    """A download was asked to move where its lifecycle does not go (a bug in the caller)."""


class BadChunk(Exception):
    pass


class SourceLied(Exception):
    """A chunk or leaf row that came under the transfer key (so from the sharer) and does
    not match the file's root: the sharer's bytes are not the file announced."""


class SourceStats:
    """What one source (one transfer) sent a download: shown on the page."""

    __slots__ = ("transfer", "e2e", "chunks", "bytes", "refused", "mismatched", "excluded", "first_at", "last_at")

    def __init__(self, transfer: str, e2e_on: bool):
        self.transfer = transfer
        self.e2e = e2e_on
        self.chunks = 0       # chunks taken from it
        self.bytes = 0
        self.refused = 0      # chunks that did not authenticate: altered or forged on the way
        self.mismatched = 0   # authenticated, yet not the file's bytes: the sharer's own
        self.excluded = False  # not to be asked again for this file
        self.first_at: float | None = None
        self.last_at: float | None = None

    def took(self, length: int, now: float) -> None:
        self.chunks += 1
        self.bytes += length
        if self.first_at is None:
            self.first_at = now
        self.last_at = now

    @property
    def rate(self) -> float:
        """Bytes per second from its first chunk to its last (0 with fewer than two)."""
        if self.first_at is None or self.last_at is None or self.last_at <= self.first_at:
            return 0.0
        return self.bytes / (self.last_at - self.first_at)

    def status(self) -> dict:
        return {"transfer": self.transfer, "e2e": self.e2e, "chunks": self.chunks, "bytes": self.bytes,
                "rate": round(self.rate), "refused": self.refused, "mismatched": self.mismatched,
                "excluded": self.excluded}
