"""One running result shared by many callers (a scan, a circuit build, a fetch).

The first caller starts the work; later callers, while it runs, wait for the
same outcome. Each caller gets its own Deferred, so one caller's callbacks
(or its cancellation) never change what the others receive.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet import defer
from twisted.python.failure import Failure


class SharedResult:
    def __init__(self, start: Callable[..., defer.Deferred]):
        self._start = start
        self._waiters: list[defer.Deferred] | None = None

    @property
    def running(self) -> bool:
        return self._waiters is not None

    def get(self, *args, **kwargs) -> defer.Deferred:
        """A Deferred of the running work's result, starting the work if none runs.

        ``args`` and ``kwargs`` go to ``start`` when this call starts the work;
        a call that joins running work gets its result and its own are unused.
        """
        waiter = defer.Deferred()
        if self._waiters is not None:
            self._waiters.append(waiter)
            return waiter
        self._waiters = [waiter]
        d = defer.maybeDeferred(self._start, *args, **kwargs)
        d.addBoth(self._finished)
        return waiter

    def _finished(self, result) -> None:
        waiters, self._waiters = self._waiters, None
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)
        if isinstance(result, Failure) and not waiters:
            return result
        return None
