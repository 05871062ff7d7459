"""TLS between real members (PROTOCOL.md §14), as ``twistd`` processes.

Every test gets its own ``127.R1.R2.x`` addresses: the real tracker at .1,
four nodes at .11 to .14, alice at .101 and bob at .102, all at port 5000
with ``tls`` on (the shipped default); the test's own client at .200
speaks TLS without pinning.

* An observer of the tracker's link: a TCP proxy in this process at the
  tracker's IP, port 5001, relays bytes to the tracker at 5000, binding each
  onward socket to the connecting member's own IP (so the tracker still sees
  the node's IP, and a node's circuits still see answers come from the
  tracker's IP). Every node and peer is given the proxy as its tracker, so
  registrations, directory fetches and every exit's messages to the tracker
  (in /1, plaintext JSON at the exit, file names included) cross it. During
  a real transfer of bob's file to alice, the captured bytes hold no
  ``"CID"``, none of the members' JSON keys and not the file's name: only
  TLS records. (Needles are five bytes or more: a two-byte one such as
  ``{"`` turns up by chance in a few hundred kilobytes of ciphertext.)
* A member presenting another key at a pinned address: a node whose tracker
  address answers TLS with a key that is not the pinned tracker key refuses
  the handshake and never sends it a request.

Nothing waits by sleeping: every wait polls with a deadline on the reactor clock.
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.internet import defer
from twisted.protocols import portforward
from twisted.trial import unittest
from twisted.web import resource

from onion_twisted.net import tls
from onion_twisted.net.http_client import HTTPOutbound
from onion_twisted.net.http_server import QuietSite
from onion_twisted.protocol import crypto, wire
from tests.support.deferreds import current_reactor as _reactor
from tests.support.processes import PORT, PeerApiMixin, ProcessesMixin, poll_until, sha256_file

TRACKER_HOST, NODE_HOSTS, ALICE_HOST, BOB_HOST, IMPOSTOR_HOST, ADMIN_HOST = 1, (11, 12, 13, 14), 101, 102, 50, 200
ALL_HOSTS = (TRACKER_HOST, *NODE_HOSTS, ALICE_HOST, BOB_HOST, IMPOSTOR_HOST, ADMIN_HOST)
PROXY_PORT = PORT + 1
NAME = "secret-plans-of-bob.bin"
FILE_SIZE = 2 << 20
HOP_TIMEOUT = 5


# --- the observer ---------------------------------------------------------------------------

class _CapturingClient(portforward.ProxyClient):
    noisy = False

    def dataReceived(self, data):
        self.factory.server.factory.captured.append(data)
        super().dataReceived(data)


class _CapturingClientFactory(portforward.ProxyClientFactory):
    noisy = False
    protocol = _CapturingClient


class _BoundProxyServer(portforward.ProxyServer):
    """Relays a connection to the target, its onward socket bound to the client's own IP."""

    noisy = False
    clientProtocolFactory = _CapturingClientFactory

    def connectionMade(self):
        self.transport.pauseProducing()  # nothing is read until the onward side is there
        client = self.clientProtocolFactory()
        client.setServer(self)
        self.factory.first_bytes.append(None)
        self._index = len(self.factory.first_bytes) - 1
        _reactor().connectTCP(self.factory.host, self.factory.port, client,
                              bindAddress=(self.transport.getPeer().host, 0))

    def dataReceived(self, data):
        if self.factory.first_bytes[self._index] is None:
            self.factory.first_bytes[self._index] = data[:3]
        self.factory.captured.append(data)
        super().dataReceived(data)


class CapturingProxy(portforward.ProxyFactory):
    noisy = False
    protocol = _BoundProxyServer

    def __init__(self, host: str, port: int):
        super().__init__(host, port)
        self.captured: list[bytes] = []
        self.first_bytes: list[bytes | None] = []  # the first bytes each client sent

    def data(self) -> bytes:
        return b"".join(self.captured)


class _Counting(resource.Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.requests = 0

    def render(self, request):
        self.requests += 1
        return b"{}"


# --- the tests --------------------------------------------------------------------------------

class TLSProcessesTests(ProcessesMixin, PeerApiMixin, unittest.TestCase):
    timeout = 120
    hosts, admin_host = ALL_HOSTS, ADMIN_HOST
    tls = True

    async def start_members(self):
        self.base = Path(self.mktemp()).resolve()
        self.tracker = self.start_tracker(self.ip(TRACKER_HOST), PORT, self.base / "tracker",
                                          heartbeat=1, hop_timeout=HOP_TIMEOUT)
        self.tracker_key = (await self.wait_identity(self.tracker, self.admin))["public_key"]

    def start_proxy(self) -> tuple[CapturingProxy, wire.Address]:
        proxy = CapturingProxy(self.tracker.address.host, PORT)
        port = _reactor().listenTCP(PROXY_PORT, proxy, interface=self.tracker.address.host)
        self.addCleanup(port.stopListening)
        return proxy, wire.Address(self.tracker.address.host, PROXY_PORT)

    async def test_an_observer_of_the_trackers_link_sees_only_tls(self):
        proxy, via_proxy = self.start_proxy()
        nodes = [self.start_node(self.ip(host), PORT, via_proxy, self.tracker_key, self.base / f"node{i}",
                                 key_bits=1024, hop_timeout=HOP_TIMEOUT, register_interval=1)
                 for i, host in enumerate(NODE_HOSTS)]
        await self.wait_listed(nodes)

        share = self.base / "bob" / "share"
        share.mkdir(parents=True)
        (share / NAME).write_bytes(os.urandom(FILE_SIZE))
        sha = sha256_file(share / NAME)
        options = dict(hop_timeout=HOP_TIMEOUT, rescan_interval=1, refresh_interval=1, stall_timeout=10)
        bob = self.start_peer("bob", self.ip(BOB_HOST), PORT, via_proxy, self.tracker_key, self.base / "bob",
                              **options)
        alice = self.start_peer("alice", self.ip(ALICE_HOST), PORT, via_proxy, self.tracker_key,
                                self.base / "alice", **options)

        async def listed():
            for peer in (alice, bob):
                if not peer.running:
                    raise self.failureException(f"{peer.name} exited:\n{peer.tail()}")
            status = await self.api_status(alice.address, "alice")
            return any(f.get("name") == NAME for f in status["catalogue"])

        await poll_until(listed, timeout=45, what="bob's file in alice's catalogue", interval=0.1)
        await self.api_download(alice.address, "alice", NAME, sha)

        async def done():
            found = [d for d in (await self.api_status(alice.address, "alice"))["downloads"] if d["file"] == NAME]
            if found and found[0]["state"] == "failed":
                raise AssertionError(f"the download failed: {found[0]['error']}\n{alice.tail()}\n{bob.tail()}")
            return found and found[0]["state"] == "done"

        await poll_until(done, timeout=60, what="alice's download", interval=0.1)
        self.assertEqual(sha256_file(self.base / "alice" / "downloads" / NAME), sha)

        captured = proxy.data()
        # What crossed: registrations, directories, every exit's tracker messages.
        self.assertGreater(len(captured), 20_000)
        self.assertTrue(proxy.first_bytes)
        for first in proxy.first_bytes:
            self.assertEqual(first[:2] if first else first, b"\x16\x03", "a connection that did not start with TLS")
        for needle in (b'"CID"', b'"payload"', b'"public_key"', b'"address"', NAME.encode(), b"files",
                       b"HTTP/1.1", b"POST /"):
            self.assertNotIn(needle, captured)

        # Alice's page is also plain HTTP at her ui_listen (her IP, port 8080).
        plain = HTTPOutbound(_reactor(), bind_ip=self.ip(ADMIN_HOST), timeout=5)
        self.addCleanup(plain.close)
        status, _, body = await plain.get(wire.Address(alice.address.host, 8080), "/api/status")
        self.assertEqual(status, 200)
        self.assertIn(NAME.encode(), body)

    async def test_a_member_showing_another_key_at_a_pinned_address_is_refused(self):
        impostor_key = crypto.generate_tracker_key()  # the tracker's kind of key, not the tracker's key
        counting = _Counting()
        impostor = wire.Address(self.ip(IMPOSTOR_HOST), PORT)
        port = _reactor().listenSSL(PORT, QuietSite(counting, reactor=_reactor()), tls.server_options(impostor_key),
                                    interface=impostor.host)
        self.addCleanup(port.stopListening)
        # Without a pin the impostor's TLS is fine: it does answer over TLS 1.3.
        probe = HTTPOutbound(_reactor(), bind_ip=self.ip(ADMIN_HOST), timeout=5, tls=True)
        self.addCleanup(probe.close)
        self.assertEqual((await probe.get(impostor, "/identity"))[0], 200)
        self.assertEqual(counting.requests, 1)

        node = self.start_node(self.ip(NODE_HOSTS[0]), PORT, impostor, self.tracker_key, self.base / "node0",
                               key_bits=1024, hop_timeout=HOP_TIMEOUT, register_interval=1)
        await self.wait_identity(node, self.admin)
        await poll_until(lambda: defer.succeed(tls.PIN_MISMATCH in node.log_text()), timeout=30,
                         what="the node to refuse the impostor's key")
        self.assertIn(f"registration at the tracker failed: {tls.PIN_MISMATCH}", node.log_text())
        self.assertEqual(counting.requests, 1, "the node sent a request to the impostor")
