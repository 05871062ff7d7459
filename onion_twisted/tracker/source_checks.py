"""Source checks at the tracker (docs/protocol.md 17.10, choice 64): one probe at a time.

Each check a requester asks for costs the tracker a message down the source
circuit, through three nodes. Checks of one source circuit share the probe
under way, and a probe's result answers the checks of the next ``fresh``
seconds too: however many transfers (or requesters) ask, a source circuit
carries at most one probe per ``fresh`` seconds. Nothing here does I/O: the
probe is passed in.
"""

from __future__ import annotations

from twisted.internet import defer

#: Results remembered at most (the oldest go first); a probe under way is one each.
MAX_RECENT = 4096


class SourceChecks:
    def __init__(self, clock, fresh: float = 1.0):
        self.clock = clock
        self.fresh = fresh
        self._waiting: dict[object, list[defer.Deferred]] = {}  # circuit key -> checks awaiting its probe
        self._recent: dict[object, tuple[float, str]] = {}      # circuit key -> (when, state)

    def __len__(self) -> int:
        """Source circuits being probed now."""
        return len(self._waiting)

    def check(self, key, probe) -> defer.Deferred:
        """The state of source circuit ``key``: a recent probe's, the one under way's, or
        that of ``probe()`` (a coroutine function giving a state), started now."""
        now = self.clock.seconds()
        recent = self._recent.get(key)
        if recent is not None and now - recent[0] < self.fresh:
            return defer.succeed(recent[1])
        mine = defer.Deferred()
        waiting = self._waiting.get(key)
        if waiting is not None:
            waiting.append(mine)
            return mine
        self._waiting[key] = [mine]
        running = defer.ensureDeferred(probe())
        running.addBoth(lambda result: self._done(key, result))
        return mine

    def _done(self, key, result) -> None:
        waiting = self._waiting.pop(key, [])
        if not isinstance(result, str):  # the probe failed: every check waiting fails with it
            for d in waiting:
                d.errback(result)
            return
        recent = self._recent
        recent.pop(key, None)
        if len(recent) >= MAX_RECENT:
            del recent[next(iter(recent))]  # the oldest: insertion order
        recent[key] = (self.clock.seconds(), result)
        for d in waiting:
            d.callback(result)
