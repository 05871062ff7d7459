"""Token buckets per source IP, for new circuits (PROTOCOL.md §3, 429)."""

from __future__ import annotations


class RateLimiter:
    """``rate`` tokens a second up to ``burst``, one bucket per key.

    The table is bounded: when it holds ``max_keys`` buckets, the full ones
    (keys idle long enough to have refilled) are forgotten first; if none is
    full the newcomer is refused rather than growing the table.
    """

    def __init__(self, clock, rate: float, burst: int, max_keys: int = 65536):
        self.clock = clock
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, key: str) -> bool:
        now = self.clock.seconds()
        tokens, at = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            return False
        if key not in self._buckets and len(self._buckets) >= self.max_keys:
            self.prune()
            if len(self._buckets) >= self.max_keys:
                return False
        self._buckets[key] = (tokens - 1, now)
        return True

    def prune(self) -> None:
        now = self.clock.seconds()
        full = [k for k, (t, at) in self._buckets.items() if t + (now - at) * self.rate >= self.burst]
        for k in full:
            del self._buckets[k]
