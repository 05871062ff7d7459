"""Which connections HTTPOutbound's pool reuses (issue 12).

A neighbour on HTTP/1.0 (Python's ``http.server`` as it comes) answers
without ``Connection: close`` and closes the connection after its answer.
Twisted's client pooled such a connection all the same; the next cell went
out on it a moment before the close was seen and failed (502: the pool
never retries a cell). ``keeps_connection`` is the rule of RFC 9112 §9.3,
and the pool follows it.

``Neighbour`` is a raw server on 127.0.0.1 that answers every request with
a fixed head and ``{}``, counts its connections, and, when the head says
the connection ends, closes it a little after answering (as a server that
logs after its answer does), without reading anything more.
"""

from __future__ import annotations

from twisted.internet import defer, protocol, task
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from twisted.web import resource
from twisted.web.client import Response
from twisted.web.http_headers import Headers

from onion_twisted.protocol import wire
from onion_twisted.protocol.errors import NextHopAbandoned, NextHopTimeout
from onion_twisted.net.http_client import HTTPOutbound, keeps_connection
from onion_twisted.net.http_server import QuietSite
from tests.support.deferreds import current_reactor, inline

CLOSE_AFTER = 0.2  # seconds between a closing neighbour's answer and its close


class _Answering(protocol.Protocol):
    def connectionMade(self):
        self.factory.connections += 1
        self.buffer = b""
        self.closing = None  # the delayed close, once answered

    def dataReceived(self, data):
        if self.closing:
            return  # a closing server reads nothing more
        self.buffer += data
        head, sep, rest = self.buffer.partition(b"\r\n\r\n")
        if not sep:
            return
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        if len(rest) < length:
            return
        self.buffer = rest[length:]
        self.factory.requests += 1
        self.transport.write(self.factory.head + b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
        if self.factory.closes:
            self.closing = self.factory.reactor.callLater(CLOSE_AFTER, self.transport.loseConnection)

    def connectionLost(self, reason):
        if self.closing is not None and self.closing.active():
            self.closing.cancel()  # the client closed first


class Neighbour(protocol.Factory):
    protocol = _Answering

    def __init__(self, reactor, head: bytes, closes: bool):
        self.reactor, self.head, self.closes = reactor, head, closes
        self.connections = self.requests = 0


class KeepsConnectionTests(unittest.SynchronousTestCase):
    def check(self, version, headers):
        return keeps_connection((b"HTTP", *version), Headers({b"Connection": headers} if headers else {}))

    def test_http11_keeps_unless_close(self):
        self.assertTrue(self.check((1, 1), []))
        self.assertTrue(self.check((1, 1), [b"keep-alive"]))
        self.assertFalse(self.check((1, 1), [b"close"]))

    def test_http10_keeps_only_with_keep_alive(self):
        self.assertFalse(self.check((1, 0), []))
        self.assertTrue(self.check((1, 0), [b"keep-alive"]))
        self.assertTrue(self.check((1, 0), [b"Keep-Alive"]))
        self.assertFalse(self.check((1, 0), [b"keep-alive, close"]))

    def test_close_is_a_token_in_any_case_and_any_header(self):
        self.assertFalse(self.check((1, 1), [b"Close"]))
        self.assertFalse(self.check((1, 1), [b"upgrade, CLOSE"]))
        self.assertFalse(self.check((1, 1), [b"keep-alive", b"close"]))


class PoolTests(unittest.TestCase):
    timeout = 15

    async def exchange(self, head: bytes, closes: bool, count: int = 3) -> Neighbour:
        """``count`` POSTs one after the other to a neighbour answering ``head``; each must be a 200."""
        reactor = current_reactor()
        neighbour = Neighbour(reactor, head, closes)
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(neighbour)
        self.addCleanup(port.stopListening)
        outbound = HTTPOutbound(reactor, bind_ip="127.0.0.1", timeout=5)
        self.addCleanup(outbound.close)
        address = wire.Address("127.0.0.1", port.getHost().port)
        for _ in range(count):
            self.assertEqual(await outbound.post(address, b'{"CID":"x"}'), b"{}")
        self.assertEqual(neighbour.requests, count)
        return neighbour

    @inline
    async def test_http10_answers_are_never_pooled(self):
        neighbour = await self.exchange(b"HTTP/1.0 200 OK\r\n", closes=True)
        self.assertEqual(neighbour.connections, 3)

    @inline
    async def test_http11_close_in_any_case_is_never_pooled(self):
        neighbour = await self.exchange(b"HTTP/1.1 200 OK\r\nConnection: Close\r\n", closes=True)
        self.assertEqual(neighbour.connections, 3)

    @inline
    async def test_http11_connections_are_reused(self):
        neighbour = await self.exchange(b"HTTP/1.1 200 OK\r\n", closes=False)
        self.assertEqual(neighbour.connections, 1)

    @inline
    async def test_http10_keep_alive_connections_are_reused(self):
        neighbour = await self.exchange(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n", closes=False)
        self.assertEqual(neighbour.connections, 1)



class IdleTests(unittest.TestCase):
    def test_the_pool_closes_an_idle_connection_before_a_member_would(self):
        # A cell sent just as the neighbour closes an idle connection fails (no retries):
        # the pool's idle time must end first, with a margin for a busy reactor.
        reactor = current_reactor()
        outbound = HTTPOutbound(reactor, bind_ip="127.0.0.1")
        self.addCleanup(outbound.close)
        site = QuietSite(resource.Resource(), reactor=reactor)
        self.assertLessEqual(outbound.pool.cachedConnectionTimeout + 5, site.timeOut)


class _SilentAgent:
    """An agent whose requests are never answered (until cancelled)."""

    def __init__(self):
        self.requests = 0

    def request(self, method, uri, headers=None, bodyProducer=None):
        self.requests += 1
        return defer.Deferred()


class DeadlineTests(unittest.TestCase):
    """A timeout is the next hop's failure to answer; a cancellation by whoever
    awaited the answer is not (a node's previous hop went away): the node logs
    only the first."""

    def setUp(self):
        self.clock = task.Clock()
        self.outbound = HTTPOutbound(self.clock, bind_ip=None, timeout=30, agent=_SilentAgent())

    def test_the_deadline_is_a_timeout(self):
        d = self.outbound.post(wire.Address("127.0.0.9", 5000), b"{}")
        self.clock.advance(29)
        self.assertNoResult(d)
        self.clock.advance(1)
        failure = self.failureResultOf(d, NextHopTimeout)
        self.assertNotIsInstance(failure.value, NextHopAbandoned)
        self.assertEqual(failure.value.detail, "next hop did not answer in time")

    def test_a_cancelled_exchange_is_abandoned_and_handled_as_a_timeout(self):
        d = self.outbound.post(wire.Address("127.0.0.9", 5000), b"{}")
        self.clock.advance(3)
        d.cancel()
        failure = self.failureResultOf(d, NextHopAbandoned)
        self.assertIsInstance(failure.value, NextHopTimeout)  # every clean-up of a timeout runs
        self.assertEqual(self.clock.getDelayedCalls(), [])  # and its deadline is gone

    def test_an_answer_stops_the_deadline(self):
        answered = HTTPOutbound(self.clock, bind_ip=None, timeout=30, agent=_AnsweringAgent())
        d = answered.get(wire.Address("127.0.0.9", 5000), "/identity")
        self.assertEqual(self.successResultOf(d)[0], 200)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class _AnsweringAgent:
    def request(self, method, uri, headers=None, bodyProducer=None):
        response = Response((b"HTTP", 1, 1), 200, b"OK", Headers({}), StringTransport())
        response._bodyDataReceived(b"{}")
        response._bodyDataFinished()
        return defer.succeed(response)
