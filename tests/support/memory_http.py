"""In-memory HTTP for tests: a real twisted.web Site, a chosen client IP, no sockets.

``treq.testing.RequestTraversalAgent`` always connects from 127.0.0.1 and
builds its own plain ``Site``. A member tells its neighbours apart by the
connection's source IP (PROTOCOL.md §1, §4), and the size limit lives in our
own ``QuietSite``/``BoundedRequest``, so this harness takes both:

    client = memory_client(site, client_ip="127.0.0.5")
    response = await client.post("http://127.0.0.11:5000/", data=body)
    body = await client.content(response)

Every request goes through a real ``twisted.web.client.Agent`` (HTTP/1.1
client protocol) and the site's real ``HTTPChannel`` and request factory,
joined by an ``iosim.FakeTransport`` pair whose server side reports
``client_ip`` as its peer. Each call of the client pumps the connections until
its Deferred fires, or until no byte moves any more (the server is waiting for
something the test controls, e.g. a held next-hop Deferred): then the test
fires what it holds, calls ``client.flush()`` and the Deferred fires.

Give the site ``reactor=MemoryReactorClock()`` (or a ``task.Clock``) so that
its idle timeouts never reach the global reactor.

Several agents may share one ``Pumps`` (``pumps=``): a node's outbound HTTP
client over a ``MemoryAgent`` to another in-memory site is then pumped by the
same flushes as the request that makes the node call out.
"""

from __future__ import annotations

import itertools

import treq
from treq.client import HTTPClient
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim
from twisted.web.client import Agent
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer
from zope.interface import implementer

from onion_twisted.net.http_client import BytesProducer

__all__ = ["MemoryAgent", "MemoryClient", "Pumps", "memory_client"]

MAX_ROUNDS = 10_000


class Pumps:
    """The live in-memory connections of one or more agents."""

    def __init__(self):
        self._pumps: list[iosim.IOPump] = []
        self._flushing = False

    def __len__(self) -> int:
        return len(self._pumps)

    def add(self, pump: iosim.IOPump) -> None:
        self._pumps.append(pump)

    def flush(self) -> bool:
        """Move bytes on every connection until none moves; True if any did.

        A flush from a callback that an outer flush is running (e.g. reading
        the body of a response as soon as its head arrives) does nothing: the
        outer flush goes on until every connection is quiet.
        """
        if self._flushing:
            return False
        self._flushing = True
        try:
            moved_any = False
            for _ in range(MAX_ROUNDS):
                moved = False
                for pump in list(self._pumps):
                    if pump.flush():
                        moved = True
                    if pump.clientIO.disconnected and pump.serverIO.disconnected:
                        self._pumps.remove(pump)
                if not moved:
                    return moved_any
                moved_any = True
            raise AssertionError("in-memory connections never went quiet")
        finally:
            self._flushing = False

    def until(self, d: defer.Deferred) -> defer.Deferred:
        """Flush until ``d`` has fired or nothing moves any more; return ``d``."""
        fired = []

        def seen(result):
            fired.append(True)
            return result

        d.addBoth(seen)
        for _ in range(MAX_ROUNDS):
            if fired or not self.flush():
                break
        return d


@implementer(IStreamClientEndpoint)
class _MemoryEndpoint:
    def __init__(self, agent: "MemoryAgent", server_address: IPv4Address):
        self._agent = agent
        self._server_address = server_address

    def connect(self, factory):
        return defer.maybeDeferred(self._agent._connect, factory, self._server_address)


@implementer(IAgent, IAgentEndpointFactory)
class MemoryAgent:
    """An IAgent whose connections reach ``site`` in memory, from ``client_ip``."""

    def __init__(self, site, client_ip: str = "127.0.0.1", *, pumps: Pumps | None = None):
        self.site = site
        self.client_ip = client_ip
        self.pumps = pumps if pumps is not None else Pumps()
        self.reactor = MemoryReactorClock()
        self.connections = 0
        self._ports = itertools.count(40000)
        self._agent = Agent.usingEndpointFactory(self.reactor, self)

    # IAgentEndpointFactory
    def endpointForURI(self, uri):
        if uri.scheme != b"http":
            raise SchemeNotSupported(f"in-memory agent speaks http only, not {uri.scheme!r}")
        host = uri.host.decode("ascii") if isinstance(uri.host, bytes) else uri.host
        return _MemoryEndpoint(self, IPv4Address("TCP", host.strip("[]"), uri.port))

    # IAgent
    def request(self, method, uri, headers=None, bodyProducer=None):
        return self._agent.request(method, uri, headers, bodyProducer)

    def _connect(self, factory, server_address: IPv4Address):
        client_address = IPv4Address("TCP", self.client_ip, next(self._ports))
        server_protocol = self.site.buildProtocol(client_address)
        server_transport = iosim.FakeTransport(server_protocol, isServer=True,
                                               hostAddress=server_address, peerAddress=client_address)
        client_protocol = factory.buildProtocol(server_address)
        client_transport = iosim.FakeTransport(client_protocol, isServer=False,
                                               hostAddress=client_address, peerAddress=server_address)
        self.pumps.add(iosim.connect(server_protocol, server_transport, client_protocol, client_transport,
                                     greet=False, clock=self.reactor))
        self.connections += 1
        return client_protocol


def _producer(data):
    """A body written in one go when the agent asks for it (``BytesProducer``).

    treq's default producer (``FileBodyProducer``) writes from the global
    cooperator, which nothing pumps here.
    """
    if IBodyProducer.providedBy(data):
        return data
    if isinstance(data, str):
        data = data.encode("utf-8")
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError("memory_client takes bytes, str or an IBodyProducer as data")
    return BytesProducer(bytes(data))


class MemoryClient:
    """A treq HTTPClient over a MemoryAgent whose calls pump until they fire."""

    def __init__(self, agent: MemoryAgent):
        self.agent = agent
        self.http = HTTPClient(agent, data_to_body_producer=_producer)

    @property
    def pumps(self) -> Pumps:
        return self.agent.pumps

    def flush(self) -> bool:
        return self.agent.pumps.flush()

    def until(self, d: defer.Deferred) -> defer.Deferred:
        return self.agent.pumps.until(d)

    def request(self, method: str, url: str, **kwargs) -> defer.Deferred:
        return self.until(self.http.request(method, url, **kwargs))

    def get(self, url: str, **kwargs) -> defer.Deferred:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs) -> defer.Deferred:
        return self.request("POST", url, **kwargs)

    def content(self, response) -> defer.Deferred:
        return self.until(treq.content(response))


def memory_client(site, client_ip: str = "127.0.0.1", *, pumps: Pumps | None = None) -> MemoryClient:
    """A treq client whose requests reach ``site`` in memory from ``client_ip``."""
    return MemoryClient(MemoryAgent(site, client_ip, pumps=pumps))
