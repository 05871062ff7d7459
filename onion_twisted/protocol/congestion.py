"""How many chunks of one upload may be unacknowledged: a delay-based window.

An upload keeps up to ``max_window`` chunks in flight, each acknowledged
once the requester's side has it. A fixed window is right while the path
is idle, and wrong once it is loaded: the chunks beyond what the path
carries in one round trip only wait in the nodes' queues, where they cost
each busy node a MiB of memory apiece and make every other cell through
it (a CREATE, a probe) wait behind them. This is TCP Vegas, as Tor's
congestion control uses it (proposal 324): once per window of
acknowledgements, the chunks queued on the path are estimated from the
round trip against the least one seen,

    queued = window × (1 − base_rtt / rtt)

and the window grows by one while fewer than ``alpha`` chunks queue,
shrinks by one while more than ``beta`` do, and holds in between. ``rtt``
is the least round trip of that window of acknowledgements (one slow
chunk is noise, not a queue).

It starts at ``start`` (at most ``max_window``) and never goes below
``min_window``: a store-and-forward path keeps every hop busy only with a
chunk behind the one it forwards. With the defaults (alpha 2, beta 3) a
window of 3 cannot show more than 3 queued, so it stays at 3 or more once
grown. Alpha 1 and beta 2 cost a lone download ~6 % of its speed on an
idle network and saved ~10 MiB at the busiest node under load (README,
"At scale, under churn").
Pure bookkeeping: times are passed in.
"""

from __future__ import annotations

ALPHA, BETA = 2.0, 3.0
MIN_WINDOW, START_WINDOW = 2, 2


class DelayWindow:
    def __init__(self, max_window: int, *, min_window: int = MIN_WINDOW, start: int = START_WINDOW,
                 alpha: float = ALPHA, beta: float = BETA):
        if max_window < 1:
            raise ValueError("window must be at least 1")
        self.max_window = max_window
        self.min_window = min(min_window, max_window)
        self.window = max(self.min_window, min(start, max_window))
        self.alpha, self.beta = alpha, beta
        self.base_rtt: float | None = None
        self._round_rtt: float | None = None
        self._round_acks = 0
        self.smallest = self.largest = self.window  # the range it moved in (for a look in tests or a debugger)

    def acknowledged(self, rtt: float) -> int:
        """One chunk's round trip (seconds from send to acknowledgement); the window now."""
        if rtt < 0:
            return self.window
        self.base_rtt = rtt if self.base_rtt is None else min(self.base_rtt, rtt)
        self._round_rtt = rtt if self._round_rtt is None else min(self._round_rtt, rtt)
        self._round_acks += 1
        if self._round_acks >= self.window:
            self._adjust(self._round_rtt)
            self._round_rtt, self._round_acks = None, 0
        return self.window

    def queued(self, rtt: float) -> float:
        """Chunks this upload keeps waiting on its path, judged from a round trip of ``rtt``."""
        if not self.base_rtt or rtt <= 0:
            return 0.0
        return self.window * (1.0 - self.base_rtt / rtt)

    def _adjust(self, rtt: float) -> None:
        queued = self.queued(rtt)
        if queued < self.alpha:
            self.window = min(self.max_window, self.window + 1)
        elif queued > self.beta:
            self.window = max(self.min_window, self.window - 1)
        self.smallest = min(self.smallest, self.window)
        self.largest = max(self.largest, self.window)
