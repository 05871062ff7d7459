"""Shared pieces of the in-memory networks the tests build (no sockets, one ``task.Clock``).

``InMemoryWorld`` is what both worlds (``relay_network.Network`` and
``peer_network.Network``) have in common: the clock, started at a fixed
time, and real ``NodeRelay`` members whose outbound HTTP is a
``MemberOutbound`` of the world. How a POST is delivered is each world's own
(``post`` and ``get``): see tests/support/__init__.py for which to use.
"""

from __future__ import annotations

from twisted.internet import defer, task

from onion_twisted.net.ratelimit import RateLimiter
from onion_twisted.node.circuits import RelayTable
from onion_twisted.node.relay import NodeRelay
from tests.support.fakes import FakeOutbound, Sent


class MemberOutbound(FakeOutbound):
    """The outbound HTTP of one member of an in-memory network: every request leaves from ``ip``.

    ``network.post(sender_ip, address, body, headers, path)`` and
    ``network.get(sender_ip, address, path)`` carry the request; the network
    keeps its own record of what crossed it, so this one keeps none.
    """

    def __init__(self, network, ip: str):
        super().__init__(record=False)
        self.network = network
        self.ip = ip

    def answer(self, sent: Sent) -> defer.Deferred:
        return self.network.post(self.ip, sent.address, sent.body, sent.headers, sent.path)

    def get(self, address, path) -> defer.Deferred:
        return self.network.get(self.ip, address, path)


class InMemoryWorld:
    """One clock at ``now``, and relays that reach the other members through this world."""

    def __init__(self, now: float):
        self.clock = task.Clock()
        self.clock.advance(now)

    def new_relay(self, key, address, tracker, directory, *, rate: float, burst: int) -> NodeRelay:
        """A real ``NodeRelay`` at ``address`` whose POSTs and GETs go through ``post`` and ``get``."""
        return NodeRelay(clock=self.clock, private_key=key, own_address=address, tracker=tracker,
                         table=RelayTable(self.clock), outbound=MemberOutbound(self, address.ip),
                         directory=directory, limiter=RateLimiter(self.clock, rate=rate, burst=burst))

    def post(self, sender_ip: str, address, body: bytes, headers=None, path="/") -> defer.Deferred:
        raise NotImplementedError

    def get(self, sender_ip: str, address, path: str) -> defer.Deferred:
        raise NotImplementedError
