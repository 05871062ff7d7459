"""net.twisted_compat against the installed Twisted and treq: each private name still means what it did.

A failure here after an upgrade says which adapter to mend. Everything runs
over in-memory transports; nothing listens.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web import http, resource, server
from twisted.web.client import Request
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from onion_twisted.net import twisted_compat
from onion_twisted.net.http_client import QuietConnectionPool, _QuietClientFactory


class RecordingFactory(twisted_compat.PoolClientFactory):
    keep = True

    def returns_to_pool(self, protocol) -> bool:
        self.head = twisted_compat.finished_response_head(protocol)
        return self.keep


class ClientSideTests(unittest.SynchronousTestCase):
    def exchange(self, factory_class, answer: bytes):
        """One GET answered with ``answer``: (factory, transport, protocols handed back to the pool)."""
        pooled = []
        factory = factory_class(pooled.append, "test")
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 80))
        transport = StringTransport()
        protocol.makeConnection(transport)
        d = protocol.request(Request(b"GET", b"/", Headers({b"Host": [b"example"]}), None, persistent=True))
        protocol.dataReceived(answer)
        response = self.successResultOf(d)
        response.deliverBody(_Swallow())
        return factory, transport, pooled, response

    def test_the_head_of_the_finished_response_and_the_pool_callback(self):
        factory, transport, pooled, _ = self.exchange(
            RecordingFactory, b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n{}")
        version, headers = factory.head
        self.assertEqual(tuple(version), (b"HTTP", 1, 0))
        self.assertEqual(headers.getRawHeaders(b"connection"), [b"keep-alive"])
        self.assertEqual(len(pooled), 1)
        self.assertFalse(transport.disconnecting)

    def test_a_connection_refused_by_returns_to_pool_is_closed(self):
        class Refusing(RecordingFactory):
            keep = False

        _, transport, pooled, _ = self.exchange(Refusing, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        self.assertEqual(pooled, [])
        self.assertTrue(transport.disconnecting)

    def test_the_projects_factory_pools_only_a_connection_that_stays_open(self):
        _, transport, pooled, _ = self.exchange(_QuietClientFactory, b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        self.assertEqual((pooled, transport.disconnecting), ([], True))
        _, transport, pooled, _ = self.exchange(_QuietClientFactory, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        self.assertEqual((len(pooled), transport.disconnecting), (1, False))

    def test_no_head_without_a_parser(self):
        self.assertIsNone(twisted_compat.finished_response_head(object()))

    def test_the_pool_builds_its_connections_with_the_factory_given(self):
        self.assertIs(QuietConnectionPool._factory, _QuietClientFactory)
        self.assertFalse(_QuietClientFactory.noisy)

    def test_treq_response_wraps_a_twisted_response(self):
        _, _, _, response = self.exchange(RecordingFactory, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        wrapped = twisted_compat.treq_response(response, None)
        self.assertTrue(IResponse.providedBy(wrapped))
        self.assertEqual((wrapped.code, wrapped.length), (200, 2))
        self.assertTrue(callable(wrapped.collect))


class _Swallow:
    def makeConnection(self, transport):
        pass

    def dataReceived(self, data):
        pass

    def connectionLost(self, reason):
        pass


class ServerSideTests(unittest.SynchronousTestCase):
    def test_the_channel_of_a_sites_protocol(self):
        site = server.Site(resource.Resource())
        channel = twisted_compat.http_channel(site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1)))
        self.assertIsInstance(channel, http.HTTPChannel)
        plain = http.HTTPChannel()
        self.assertIs(twisted_compat.http_channel(plain), plain)

    def test_silence_channel_replaces_the_channels_logger(self):
        channel = http.HTTPChannel()
        marker = object()
        twisted_compat.silence_channel(channel, marker)
        self.assertIs(channel._log, marker)
        self.assertIsNot(http.HTTPChannel._log, marker)

    def test_handling_request_is_true_from_a_whole_request_to_its_answer(self):
        site = server.Site(_Holding())
        channel = twisted_compat.http_channel(site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1)))
        channel.makeConnection(StringTransport())
        # Its idle timeout is a call on the global reactor: left behind, the next test
        # that checks the reactor (any trial TestCase) would fail as unclean.
        self.addCleanup(channel.setTimeout, None)
        self.assertFalse(twisted_compat.handling_request(channel))
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(twisted_compat.handling_request(channel))
        site.resource.held.pop().finish()
        self.assertFalse(twisted_compat.handling_request(channel))

    def test_request_disconnected_once_the_client_went_away(self):
        channel = http.HTTPChannel()
        channel.makeConnection(StringTransport())
        self.addCleanup(channel.setTimeout, None)  # as above: no timer left on the reactor
        request = http.Request(channel)
        self.assertFalse(twisted_compat.request_disconnected(request))
        request.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(twisted_compat.request_disconnected(request))


class _Holding(resource.Resource):
    """Answers nothing until the test finishes the request."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.held = []

    def render(self, request):
        self.held.append(request)
        return server.NOT_DONE_YET


