"""The upload cap (``max_upload_rate``): one token bucket over all uploads of a peer.

Every upload asks ``UploadRate.take(n)`` before it reads and sends ``n``
bytes of a file (a chunk, or the leaf row of a ``transfer_start``); the
Deferred fires when they may go. The bucket holds at most ``burst`` bytes
(about one chunk), so a peer idle for a while sends one chunk at once, not
a minute's worth. Requests wait in one FIFO queue: each upload has one
chunk waiting at a time (its producer is paused meanwhile), so uploads
take turns and share the cap evenly. A request larger than the burst
still goes once the bucket is full, and the bucket goes into debt by the
difference: over any stretch of time the bytes let through are the cap
times the time, within one chunk. A cap of 0 lets everything through at
once.

No I/O here: time is the injected ``clock`` (``seconds`` and
``callLater``), so tests drive it with ``task.Clock``.
"""

from __future__ import annotations

from collections import deque

from twisted.internet import defer

# A timer that fires at the computed moment may find the tokens short by a rounding error.
_ROUNDING = 1e-6


class UploadRate:
    """``cap`` bytes a second (0: no cap), at most ``burst`` bytes saved up."""

    def __init__(self, clock, cap: int, burst: int = 1 << 20):
        if cap < 0:
            raise ValueError("the upload cap is 0 (none) or a number of bytes a second")
        if burst < 1:
            raise ValueError("the burst must be at least one byte")
        self.clock = clock
        self.cap = cap
        self.burst = burst
        self.bytes_sent = 0            # bytes let through since the start
        self._tokens = float(burst)    # negative while a chunk larger than the burst is paid off
        self._at = clock.seconds()
        self._waiting: deque[tuple[int, defer.Deferred]] = deque()
        self._timer = None

    @property
    def waiting(self) -> int:
        """Requests queued for tokens now (one per upload that is held back)."""
        return len(self._waiting)

    def status(self) -> dict:
        return {"cap": self.cap, "burst": self.burst, "bytes_sent": self.bytes_sent, "waiting": self.waiting}

    def take(self, n: int) -> defer.Deferred:
        """A Deferred that fires (with None) when ``n`` more bytes may be sent.

        Already fired when they may go now. Cancelling it takes the request out
        of the queue: a stopped upload leaves no waiter and spends no tokens.
        """
        if n < 0:
            raise ValueError("a negative number of bytes")
        if self.cap == 0:
            self.bytes_sent += n
            return defer.succeed(None)
        self._refill()
        if not self._waiting and self._enough_for(n):
            self._spend(n)
            return defer.succeed(None)
        d = defer.Deferred(canceller=self._cancel)
        self._waiting.append((n, d))
        if len(self._waiting) == 1:
            self._schedule()
        return d

    # -- the bucket --------------------------------------------------------------------

    def _needed(self, n: int) -> int:
        # A request over the burst could never be saved up for: a full bucket lets it go.
        return min(n, self.burst)

    def _enough_for(self, n: int) -> bool:
        return self._tokens + _ROUNDING >= self._needed(n)

    def _refill(self) -> None:
        now = self.clock.seconds()
        if now > self._at:
            # A timer fires a little late: what it earned meanwhile belongs to the requests
            # waiting (an exact timer would have spent their tokens then), so while some
            # wait, up to a second burst is kept; an idle bucket keeps one burst.
            limit = self.burst * (2 if self._waiting else 1)
            self._tokens = min(float(limit), self._tokens + (now - self._at) * self.cap)
            self._at = now

    def _spend(self, n: int) -> None:
        self._tokens -= n
        self.bytes_sent += n

    def _schedule(self) -> None:
        """A timer for the moment the first request in the queue can go (none if it is empty)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if not self._waiting:
            return
        n, _ = self._waiting[0]
        delay = max(0.0, (self._needed(n) - self._tokens) / self.cap)
        self._timer = self.clock.callLater(delay, self._serve)

    def _serve(self) -> None:
        self._timer = None
        self._refill()
        while self._waiting and self._enough_for(self._waiting[0][0]):
            n, d = self._waiting.popleft()
            self._spend(n)
            d.callback(None)  # may take() again: it queues behind those waiting
        self._schedule()

    def _cancel(self, d: defer.Deferred) -> None:
        first = bool(self._waiting) and self._waiting[0][1] is d
        self._waiting = deque(w for w in self._waiting if w[1] is not d)
        if first:
            self._refill()
            self._schedule()
