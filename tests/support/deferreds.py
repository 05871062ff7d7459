"""Deferred plumbing shared by the tests: async test methods and the running reactor."""

from __future__ import annotations

import functools

from twisted.internet import defer


def current_reactor():
    """The global reactor, imported only when asked for (trial has installed it by then)."""
    from twisted.internet import reactor
    return reactor


def inline(method):
    """Run an ``async def`` test method as a Deferred trial waits for."""
    @functools.wraps(method)
    def wrapper(self, *args):
        return defer.ensureDeferred(method(self, *args))
    return wrapper
