"""Slow and greedy clients (issue 7).

In memory (``QuietSite`` on a ``MemoryReactorClock``): a request must arrive
whole within ``request_timeout`` of its first byte, however often its bytes
come (the idle timeout starts again with each one); the time a member takes
to answer does not count; every POST route of every role refuses a body
announced over ``max_body`` (413) before reading any of it.

Real processes (``twistd onionnode`` X, Y, Z and the stand-in tracker, as in
test_node_processes; X with ``--request-timeout 2`` and started with a soft
limit of 1 024 open files, which it raises itself): a client sending its
headers or its body a byte at a time is cut off by X, no sooner than 2 s
after its first byte and long before its last, with nothing written to it;
1 100 idle connections do not stop X from serving a circuit; a huge
``Content-Length`` is answered 413 while the whole body is still unsent.
No check there is timed: ``CUT_OFF_BOUND`` only bounds the wait for a cut
that should come, so that a member that never cuts fails the test.
"""

from __future__ import annotations

import os
import re
import resource

import orjson
from twisted.internet import defer, protocol
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from onion_twisted.peer.circuit import Circuit
from onion_twisted.net.http_server import QuietSite
from tests.support.deferreds import current_reactor as _reactor, inline
from tests.support.fuzz import LoggedErrors, exchange, http_request, parse_response
from tests.support.peer_side import PeerSide
from tests.support.processes import PORT, ProcessesMixin, poll_until

REQUEST = b"POST / HTTP/1.1\r\nHost: 127.0.0.11:5000\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


# --- in memory ------------------------------------------------------------------------------


class Answerer(Resource):
    """Answers ``{}`` at once, or holds each request (``hold``) until the test releases it."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.hold = False
        self.held = []
        self.seen = 0

    def render(self, request):
        self.seen += 1
        if self.hold:
            self.held.append(request)
            return NOT_DONE_YET
        return b"{}"


class Connection:
    def __init__(self, site, clock):
        self.clock = clock
        address = IPv4Address("TCP", "127.0.0.66", 40000)
        self.protocol = site.buildProtocol(address)
        self.transport = StringTransport(peerAddress=address, hostAddress=IPv4Address("TCP", "127.0.0.11", PORT))
        self.protocol.makeConnection(self.transport)

    @property
    def open(self) -> bool:
        return not (self.transport.disconnecting or self.transport.disconnected)

    def drip(self, data: bytes, interval: float) -> int:
        """Send ``data`` a byte every ``interval`` seconds while the member keeps the connection; bytes sent."""
        for i in range(len(data)):
            if not self.open:
                return i
            self.protocol.dataReceived(data[i:i + 1])
            self.clock.advance(interval)
        return len(data)

    def close(self):
        self.protocol.connectionLost(Failure(ConnectionDone()))


class RequestDeadlineTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.clock = MemoryReactorClock()
        self.answerer = Answerer()
        self.site = QuietSite(self.answerer, reactor=self.clock, timeout=60, request_timeout=10)

    def connect(self) -> Connection:
        connection = Connection(self.site, self.clock)
        self.addCleanup(connection.close)
        return connection

    def test_headers_a_byte_every_half_second_are_cut_off_after_request_timeout(self):
        c = self.connect()
        started = self.clock.seconds()
        sent = c.drip(REQUEST, 0.5)  # each byte well inside the 60 s idle timeout
        self.assertFalse(c.open)
        self.assertTrue(c.transport.disconnected)  # aborted: nothing is written to such a client
        self.assertEqual(sent, 20)  # 10 s at two bytes a second, then cut
        self.assertEqual(self.clock.seconds() - started, 10)
        self.assertEqual((c.transport.value(), self.answerer.seen), (b"", 0))

    def test_a_body_a_byte_every_second_is_cut_off_too(self):
        c = self.connect()
        head = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n"
        c.protocol.dataReceived(head)
        sent = c.drip(b"x" * 100, 1.0)
        self.assertFalse(c.open)
        self.assertEqual(sent, 10)
        self.assertEqual(self.answerer.seen, 0)

    def test_a_request_whole_in_time_is_answered(self):
        c = self.connect()
        self.assertEqual(c.drip(REQUEST, 9.0 / len(REQUEST)), len(REQUEST))
        self.assertTrue(c.open)
        self.assertEqual(parse_response(c.transport.value()).status, 200)

    def test_the_time_spent_answering_does_not_count_and_each_request_has_its_own_deadline(self):
        self.answerer.hold = True
        c = self.connect()
        c.protocol.dataReceived(REQUEST)
        self.clock.advance(120)  # the member waits for its next hop: neither timeout runs
        self.assertTrue(c.open)
        request = self.answerer.held.pop()
        request.write(b"{}")
        request.finish()
        self.assertEqual(parse_response(c.transport.value()).status, 200)
        self.answerer.hold = False
        c.transport.clear()
        self.clock.advance(50)  # idle on a kept-alive connection, under the idle timeout
        self.assertTrue(c.open)
        self.assertEqual(c.drip(REQUEST, 9.0 / len(REQUEST)), len(REQUEST))  # its own 10 s
        self.assertEqual(parse_response(c.transport.value()).status, 200)

    def test_a_connection_that_sends_nothing_goes_after_the_idle_timeout(self):
        c = self.connect()
        self.clock.advance(59)
        self.assertTrue(c.open)
        self.clock.advance(1)
        self.assertFalse(c.open)

    def test_the_timers_go_with_the_connection(self):
        c = self.connect()
        c.protocol.dataReceived(REQUEST[:10])
        c.close()
        self.assertEqual([call for call in self.clock.getDelayedCalls() if call.active()], [])


class TooLargeOnEveryRouteTests(unittest.TestCase):
    """A body announced over max_body is refused on every POST route of every role, before any byte of it."""

    def check(self, site, server, client_ip, path, state):
        for framing in ("length", "chunked"):
            before = state()
            if framing == "length":
                raw = http_request(b"POST", path, None, [(b"Content-Type", b"application/json"),
                                                         (b"Content-Length", b"%d" % 10 ** 12)])
            else:  # no length announced: refused as soon as the body passes the limit
                raw = http_request(b"POST", path, b"[" * 65537, [(b"Content-Type", b"application/json")], chunked=True)
            with LoggedErrors() as errors:
                response = exchange(site, client_ip, raw, server=server)
            self.assertEqual(errors.events, [], errors.text())
            self.assertEqual(response.status, 413, (path, framing, response))
            self.assertEqual(orjson.loads(response.body)["error"], "too_large")
            self.assertTrue(response.closed, "the connection is closed: the rest is never read")
            self.assertEqual(state(), before)

    def test_node(self):
        from tests.test_fuzz_node import NodeWorld, SERVER

        world = NodeWorld()
        self.check(world.site, SERVER, "127.0.0.101", b"/", lambda: (world.state(), world.relay.metrics.cells.copy()))

    def test_tracker(self):
        from tests.test_fuzz_tracker import NODE_IPS, SERVER, TrackerWorld

        world = TrackerWorld()
        for path in (b"/", b"/nodes"):
            self.check(world.site, SERVER, NODE_IPS[0], path,
                       lambda: (world.state(), world.tracker.metrics.messages.copy(), len(world.h.outbound.gets)))

    def test_peer(self):
        import shutil
        import tempfile

        from tests.test_fuzz_peer import ENTRY_IP, SERVER, USER_IP, PeerWorld

        root = tempfile.mkdtemp(prefix="slow-peer-")
        self.addCleanup(shutil.rmtree, root, True)
        world = PeerWorld(os.path.join(root, "w"))
        self.addCleanup(world.close)
        self.check(world.site, SERVER, ENTRY_IP, b"/", world.state)
        self.check(world.site, SERVER, USER_IP, b"/api/downloads", world.state)


# --- real processes --------------------------------------------------------------------------

TRACKER_HOST, NODE_HOSTS, PEER_HOST, STRANGER_HOST, ADMIN_HOST = 1, (11, 12, 13), 101, 66, 200
REQUEST_TIMEOUT = 2.0
CUT_OFF_BOUND = 30.0     # the test stops waiting for X to close (a poll bound, not a promise of speed)
IDLE_CONNECTIONS = 1100  # past the 1 024 descriptors X starts with: it must raise its limit
LS = {"type": "ls", "files": []}


class _Client(protocol.Protocol):
    """Writes ``prefix`` at once, then ``data`` a byte every ``interval`` seconds (all at once
    if 0); keeps what it reads. It never closes the connection itself but in ``give_up``."""

    def __init__(self, data: bytes = b"", interval: float = 0.0, prefix: bytes = b""):
        self.prefix = prefix
        self.data = data
        self.interval = interval
        self.sent = 0
        self.received = b""
        self.lost = defer.Deferred()
        self.timer = None
        self.gave_up = False

    def give_up(self):
        self.gave_up = True
        self.transport.abortConnection()

    def connectionMade(self):
        reactor = _reactor()
        self.started = reactor.seconds()  # its first byte is written now
        if self.prefix:
            self.transport.write(self.prefix)
        if self.interval:
            self._drip()
        elif self.data:
            self.transport.write(self.data)
            self.sent = len(self.data)

    def _drip(self):
        if self.sent < len(self.data):
            self.transport.write(self.data[self.sent:self.sent + 1])
            self.sent += 1
            self.timer = _reactor().callLater(self.interval, self._drip)

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.closed_at = _reactor().seconds()
        self.lost.callback(None)


class SlowClientProcessTests(ProcessesMixin, unittest.TestCase):
    timeout = 120
    hosts = (TRACKER_HOST, *NODE_HOSTS, PEER_HOST, STRANGER_HOST, ADMIN_HOST)
    admin_host = ADMIN_HOST

    async def start_members(self):
        reactor = _reactor()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard < IDLE_CONNECTIONS + 500:
            raise unittest.SkipTest(f"the hard limit of open files ({hard}) is too low for this test")
        if soft != resource.RLIM_INFINITY and soft < IDLE_CONNECTIONS + 500:  # the test's own client sockets
            resource.setrlimit(resource.RLIMIT_NOFILE, (IDLE_CONNECTIONS + 500, hard))
            self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        base = self.mktemp()
        self.stranger_ip = self.ip(STRANGER_HOST)
        self.peer = PeerSide("peer", self.ip(PEER_HOST), reactor)
        self.addCleanup(self.peer.close)
        self.tracker = self.start_fake_tracker(self.ip(TRACKER_HOST), PORT, f"{base}/tracker")
        self.tracker_key = (await self.wait_identity(self.tracker, self.admin))["public_key"]
        # X starts with a soft limit of 1 024 open files, as on many machines; the node raises it.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 1024), hard))
        try:
            x = self.start_node(self.ip(NODE_HOSTS[0]), PORT, self.tracker.address, self.tracker_key, f"{base}/node0",
                                key_bits=1024, hop_timeout=3, register_interval=1, max_body=65536,
                                request_timeout=REQUEST_TIMEOUT)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        others = [self.start_node(self.ip(host), PORT, self.tracker.address, self.tracker_key, f"{base}/node{i + 1}",
                                  key_bits=1024, hop_timeout=3, register_interval=1)
                  for i, host in enumerate(NODE_HOSTS[1:])]
        self.nodes = [x, *others]
        self.x = x
        directory = await self.wait_listed(self.nodes)
        self.entries = [directory.nodes[n.address] for n in self.nodes]

    async def connect(self, client: _Client) -> _Client:
        endpoint = TCP4ClientEndpoint(_reactor(), self.x.ip, PORT, timeout=10, bindAddress=(self.stranger_ip, 0))
        await endpoint.connect(protocol.Factory.forProtocol(lambda: client))
        return client

    async def serves_a_circuit(self):
        circuit = self.peer.add(Circuit(self.peer.outbound, self.entries, self.tracker.address))
        self.assertEqual((await circuit.build(LS))["type"], "files")
        hello = {"type": "hello"}
        self.assertEqual(await circuit.send(hello), {"type": "echo", "got": hello})

    def assertNoTraceback(self):
        log = self.x.log_text()
        self.assertNotIn("Traceback", log)
        self.assertNotIn("Unhandled", log)

    async def cut_off(self, client: _Client) -> float:
        """Until X closes ``client``'s connection (``CUT_OFF_BOUND`` at most, then the client gives
        up and the test fails); seconds from its first byte to the close."""
        timer = _reactor().callLater(CUT_OFF_BOUND, client.give_up)
        try:
            await client.lost
        finally:
            if timer.active():
                timer.cancel()
        self.assertFalse(client.gave_up, f"X did not close the connection within {CUT_OFF_BOUND} s")
        return client.closed_at - client.started

    @inline
    async def test_headers_a_byte_at_a_time_are_cut_off(self):
        head = (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
                + b"X-Pad: y\r\n" * 20)
        client = await self.connect(_Client(head + b"\r\n{}", interval=0.05))
        took = await self.cut_off(client)
        # Cut by the request deadline: not before it (X's timer starts at a byte written after
        # ``started``), and before the headers were whole (their last byte would come only
        # after 13 s, and each byte restarts the 60 s idle timeout: nothing else cuts here).
        self.assertGreaterEqual(took, REQUEST_TIMEOUT, "cut off before request_timeout")
        self.assertLess(client.sent, len(head), "the headers were not cut off")
        self.assertEqual(client.received, b"")
        await self.serves_a_circuit()
        self.assertNoTraceback()

    @inline
    async def test_a_body_a_byte_at_a_time_is_cut_off(self):
        body = b'{"CID": "' + b"0" * 400 + b'"}'
        head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        client = await self.connect(_Client(body, interval=0.05, prefix=head))
        took = await self.cut_off(client)
        self.assertGreaterEqual(took, REQUEST_TIMEOUT, "cut off before request_timeout")
        self.assertLess(client.sent, len(body), "the body was not cut off")  # whole only after 20 s
        self.assertEqual(client.received, b"")
        self.assertNoTraceback()

    @inline
    async def test_idle_connections_past_the_start_limit_do_not_stop_a_circuit(self):
        pid = self.x.proc.pid
        limits = open(f"/proc/{pid}/limits").read()
        soft = int(re.search(r"Max open files\s+(\d+)", limits).group(1))
        self.assertGreater(soft, IDLE_CONNECTIONS + 100, "the node did not raise its limit of open files")
        clients = []
        for _ in range(0, IDLE_CONNECTIONS, 100):
            clients += await defer.gatherResults([defer.ensureDeferred(self.connect(_Client())) for _ in range(100)])
        self.addCleanup(lambda: [c.transport.abortConnection() for c in clients if c.transport.connected])

        async def accepted():
            return len(os.listdir(f"/proc/{pid}/fd")) >= IDLE_CONNECTIONS

        await poll_until(accepted, timeout=30, what=f"X to accept {IDLE_CONNECTIONS} connections")
        await self.serves_a_circuit()
        self.assertTrue(all(c.transport.connected for c in clients), "idle connections under the idle timeout")
        self.assertNoTraceback()

    @inline
    async def test_a_huge_announced_body_is_refused_before_it_is_sent(self):
        head = (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                % 10 ** 12)
        client = await self.connect(_Client(prefix=head))  # then sends nothing more, and keeps the connection
        await self.cut_off(client)
        # Not a byte of the body was sent: a 413 (rather than the request deadline's silent
        # cut-off) shows X answered from the announced length alone, without waiting for it.
        response = parse_response(client.received)
        self.assertIsNotNone(response, f"X closed without answering: {client.received[:200]!r}")
        self.assertEqual(response.status, 413)
        self.assertEqual(orjson.loads(response.body)["error"], "too_large")
        await self.serves_a_circuit()
        self.assertNoTraceback()
