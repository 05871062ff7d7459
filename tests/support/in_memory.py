"""Shared pieces of the in-memory networks the tests build (no sockets, one ``task.Clock``)."""

from __future__ import annotations

from twisted.internet import defer


class MemberOutbound:
    """The outbound HTTP of one member of an in-memory network: every request leaves from ``ip``.

    ``network.post(sender_ip, address, body, headers, path)`` and
    ``network.get(sender_ip, address, path)`` carry the request.
    """

    def __init__(self, network, ip: str):
        self.network = network
        self.ip = ip

    def post(self, address, body, headers=None, path="/") -> defer.Deferred:
        return self.network.post(self.ip, address, body, headers, path)

    def get(self, address, path) -> defer.Deferred:
        return self.network.get(self.ip, address, path)
