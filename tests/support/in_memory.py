"""Shared pieces of the in-memory networks the tests build (no sockets, one ``task.Clock``)."""

from __future__ import annotations

from twisted.internet import defer

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
