"""TLS on the links (PROTOCOL.md §14): certificates from the members' keys,
TLS 1.3 only, and the client's pin, against a real TLS server in this process
on a loopback address."""

from __future__ import annotations

import os
import socket
import ssl as stdlib_ssl
import stat

from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import defer, protocol, task, threads
from twisted.test import iosim
from twisted.trial import unittest
from twisted.web import resource

from onion_twisted.net import tls
from onion_twisted.net.http_client import HTTPOutbound
from onion_twisted.net.http_server import QuietSite
from onion_twisted.net import tls_transport
from onion_twisted.net.tls_transport import WRITE_SIZE, BulkTLSFactory
from onion_twisted.protocol import crypto, wire
from onion_twisted.protocol.errors import NextHopFailed
from tests.support.deferreds import current_reactor
from tests.support.processes import allocate_prefix

RSA_KEY = crypto.generate_node_key(1024)


class Hello(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        return b'{"hello": "tls"}'

    def render_POST(self, request):
        return request.content.read()


class CertificateTests(unittest.SynchronousTestCase):
    def test_spki_fingerprint_is_the_directory_fingerprint_for_rsa(self):
        self.assertEqual(tls.spki_fingerprint(RSA_KEY), crypto.fingerprint(RSA_KEY))
        self.assertEqual(tls.spki_fingerprint(RSA_KEY.public_key()), crypto.fingerprint(RSA_KEY))

    def test_the_certificate_carries_the_members_own_key(self):
        for key in (RSA_KEY, crypto.generate_tracker_key(), ec.generate_private_key(ec.SECP256R1())):
            certificate = tls.self_signed_certificate(key)
            self.assertEqual(tls.spki_fingerprint(certificate.public_key()), tls.spki_fingerprint(key))
            tls.server_options(key).getContext()  # pyOpenSSL takes key and certificate together

    def test_both_sides_free_empty_record_buffers_and_write_whole(self):
        from OpenSSL import SSL
        for context in (tls.server_options(RSA_KEY).getContext(), tls.client_context()):
            mode = context.set_mode(0)  # SSL_CTX_set_mode answers the mode it has (0 adds nothing)
            self.assertTrue(mode & SSL.MODE_RELEASE_BUFFERS)
            self.assertFalse(mode & tls._PARTIAL_WRITE)

    def test_the_peers_key_is_made_once_with_mode_0600(self):
        data_dir = self.mktemp()
        first = tls.load_or_create_peer_key(data_dir)
        path = os.path.join(data_dir, tls.PEER_KEY_FILE)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        os.chmod(path, 0o644)
        second = tls.load_or_create_peer_key(data_dir)
        self.assertEqual(tls.spki_fingerprint(first), tls.spki_fingerprint(second))
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertIsInstance(first.curve, ec.SECP256R1)


class PinningTests(unittest.TestCase):
    timeout = 30

    def setUp(self):
        self.reactor = current_reactor()
        prefix = allocate_prefix((1, 2), 0)
        self.server_ip, client_ip = f"{prefix}.1", f"{prefix}.2"
        site = QuietSite(Hello(), reactor=self.reactor)
        # As members listen: net.tls_transport's transport under Twisted's TLS factory.
        self.port = self.reactor.listenTCP(0, BulkTLSFactory(tls.server_options(RSA_KEY), False, site),
                                           interface=self.server_ip)
        self.addCleanup(self.port.stopListening)
        self.address = wire.Address(self.server_ip, self.port.getHost().port)
        self.outbound = HTTPOutbound(self.reactor, bind_ip=client_ip, timeout=10, tls=True)
        self.addCleanup(self.outbound.close)

    async def _get(self):
        status, _, body = await self.outbound.get(self.address, "/")
        return status, body

    def test_the_right_pin_connects(self):
        async def go():
            asked = []
            self.outbound.pin_for = lambda address: asked.append(address) or crypto.fingerprint(RSA_KEY)
            self.assertEqual(await self._get(), (200, b'{"hello": "tls"}'))
            self.assertEqual(asked, [self.address])
            self.assertEqual(await self.outbound.post(self.address, b'{"a": 1}'), b'{"a": 1}')
        return defer.ensureDeferred(go())

    def test_large_bodies_cross_whole_both_ways_and_with_twisteds_own_tls(self):
        # Several 256 KiB writes per body, not a whole number of records: every byte
        # arrives, in order, on one connection after another; and the same against a
        # server with Twisted's own TLS transport (the records on the wire are the same).
        plain_twisted = self.reactor.listenSSL(0, QuietSite(Hello(), reactor=self.reactor),
                                               tls.server_options(RSA_KEY), interface=self.server_ip)
        self.addCleanup(plain_twisted.stopListening)
        twisted_address = wire.Address(self.server_ip, plain_twisted.getHost().port)

        async def go():
            for size in (1, 16 * 1024 + 1, 3 * WRITE_SIZE + 12345):
                body = os.urandom(size)
                for address in (self.address, twisted_address):
                    self.assertEqual(await self.outbound.post(address, body), body, (size, address))
        return defer.ensureDeferred(go())

    def test_no_pin_connects_without_checking_the_key(self):
        return defer.ensureDeferred(self._get()).addCallback(self.assertEqual, (200, b'{"hello": "tls"}'))

    def test_a_wrong_pin_fails_the_handshake(self):
        async def go():
            other = crypto.generate_node_key(1024)
            self.outbound.pin_for = lambda address: crypto.fingerprint(other)
            with self.assertRaises(NextHopFailed) as caught:
                await self.outbound.post(self.address, b"{}")
            self.assertEqual(caught.exception.detail, tls.PIN_MISMATCH)
            self.assertEqual(caught.exception.status, 502)
            # Another address has no pin: this outbound still connects there.
            self.outbound.pin_for = lambda address: None
            self.assertEqual((await self._get())[0], 200)
        return defer.ensureDeferred(go())

    def test_plain_http_to_a_tls_port_fails(self):
        async def go():
            plain = HTTPOutbound(self.reactor, bind_ip=None, timeout=5)
            self.addCleanup(plain.close)
            with self.assertRaises(NextHopFailed):
                await plain.post(self.address, b"{}")
        return defer.ensureDeferred(go())

    def _handshake(self, version):
        """A stdlib TLS client limited to ``version`` (blocking: run in a thread); the version agreed."""
        context = stdlib_ssl.SSLContext(stdlib_ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = stdlib_ssl.CERT_NONE
        context.minimum_version = stdlib_ssl.TLSVersion.TLSv1_2
        context.maximum_version = version
        with socket.create_connection(tuple(self.address), timeout=5) as raw:
            with context.wrap_socket(raw) as wrapped:
                return wrapped.version()

    def test_only_tls_1_3_is_served(self):
        async def go():
            agreed = await threads.deferToThread(self._handshake, stdlib_ssl.TLSVersion.TLSv1_3)
            self.assertEqual(agreed, "TLSv1.3")
            with self.assertRaises(stdlib_ssl.SSLError):
                await threads.deferToThread(self._handshake, stdlib_ssl.TLSVersion.TLSv1_2)
        return defer.ensureDeferred(go())

    def test_the_client_refuses_a_tls_1_2_server(self):
        async def go():
            from OpenSSL import SSL
            options = tls.server_options(RSA_KEY)
            options.getContext().set_min_proto_version(SSL.TLS1_2_VERSION)
            options.getContext().set_max_proto_version(SSL.TLS1_2_VERSION)
            old = self.reactor.listenSSL(0, QuietSite(Hello(), reactor=self.reactor), options,
                                         interface=self.server_ip)
            self.addCleanup(old.stopListening)
            with self.assertRaises(NextHopFailed) as caught:
                await self.outbound.get(wire.Address(self.server_ip, old.getHost().port), "/")
            self.assertEqual(caught.exception.detail, "next hop failed the TLS handshake")
        return defer.ensureDeferred(go())


class Collect(protocol.Protocol):
    def connectionMade(self):
        self.received = bytearray()

    def dataReceived(self, data):
        self.received += data


class QuietLinkTests(unittest.SynchronousTestCase):
    """A link that carried a cell gets new, empty memory BIOs once quiet (docs choice 68),
    over an in-memory connection with a fake clock (``twisted.test.iosim``)."""

    def setUp(self):
        self.clock = task.Clock()
        server = BulkTLSFactory(tls.server_options(RSA_KEY), False, protocol.Factory.forProtocol(Collect),
                                self.clock).buildProtocol(None)
        client = BulkTLSFactory(tls.PinningPolicy().creatorForNetloc(b"127.0.0.1", 5000), True,
                                protocol.Factory.forProtocol(Collect), self.clock).buildProtocol(None)
        self.server, self.client = server, client
        self.pump = iosim.connect(server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client),
                                  greet=False, clock=self.clock)
        self._exchange(b"hello", b"hi")  # the handshake, and the server's tickets read

    def _exchange(self, up: bytes, down: bytes) -> None:
        """``up`` from client to server and ``down`` back, checked byte for byte."""
        before = len(self.server.wrappedProtocol.received), len(self.client.wrappedProtocol.received)
        self.client.write(up)
        self.server.write(down)
        for _ in range(3):
            self.clock.advance(0)  # Twisted's aggregation of small writes
            self.pump.flush()
        self.assertEqual(bytes(self.server.wrappedProtocol.received[before[0]:]), up)
        self.assertEqual(bytes(self.client.wrappedProtocol.received[before[1]:]), down)

    def _quiet(self, periods: float) -> None:
        """A little over ``periods`` times ``BIO_RELEASE_IDLE`` without a byte, in steps
        (``Clock.advance`` runs every call due by its end as if called at the end)."""
        steps = round(periods * 10) + 1
        self.clock.pump([tls_transport.BIO_RELEASE_IDLE / 10] * steps)

    def _bios(self, end):
        return end._tlsConnection._into_ssl, end._tlsConnection._from_ssl

    def test_a_quiet_link_gets_new_bios_and_carries_on_both_ways(self):
        up, down = os.urandom(3 * WRITE_SIZE + 12345), os.urandom(WRITE_SIZE + 1)
        self._exchange(up, down)
        before = {end: self._bios(end) for end in (self.server, self.client)}
        self._quiet(1)  # bytes moved after the large write: not yet
        self.assertEqual((self.server.bios_renewed, self.client.bios_renewed), (0, 0))
        self._quiet(1)
        for end in (self.server, self.client):
            self.assertEqual(end.bios_renewed, 1)
            new = self._bios(end)
            self.assertNotEqual(new[0], before[end][0])
            self.assertNotEqual(new[1], before[end][1])
        self._exchange(down, up)
        self._exchange(up, down)
        self.assertEqual(self.clock.getDelayedCalls()[0].getTime(),
                         self.clock.seconds() + tls_transport.BIO_RELEASE_IDLE)

    def test_a_link_still_moving_bytes_keeps_its_bios(self):
        self._exchange(os.urandom(WRITE_SIZE), b"k")
        before = self._bios(self.server)
        for _ in range(5):
            self._quiet(0.6)
            self._exchange(b"small", b"k")  # a cell's reply, a probe: the link is not quiet
        self.assertEqual((self.server.bios_renewed, self._bios(self.server)), (0, before))
        self._quiet(2)
        self.assertEqual(self.server.bios_renewed, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_small_cells_alone_never_renew(self):
        for _ in range(3):
            self._exchange(b"x" * 1000, b"y" * 1000)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_bios_holding_bytes_are_kept(self):
        from OpenSSL.SSL import WantReadError
        self._exchange(os.urandom(WRITE_SIZE), b"k")
        connection = self.client._tlsConnection
        self.server.write(b"unread")
        self.clock.advance(0)
        connection.bio_write(b"".join(self.server.transport.stream))  # the record, not yet read
        del self.server.transport.stream[:]
        before = self._bios(self.client)
        self.assertFalse(tls_transport.renew_memory_bios(connection))
        self.assertEqual(self._bios(self.client), before)
        self.assertEqual(connection.recv(100), b"unread")
        with self.assertRaises(WantReadError):
            connection.recv(100)
        self.assertTrue(tls_transport.renew_memory_bios(connection))
        self._exchange(b"after", b"renewal")

    def test_a_lost_connection_leaves_no_timer(self):
        self._exchange(os.urandom(WRITE_SIZE), b"k")
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)  # a check at each end
        self.client.loseConnection()
        self.pump.flush()
        self.clock.advance(0)
        self.pump.flush()
        self.assertEqual(self.clock.getDelayedCalls(), [])
