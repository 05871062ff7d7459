"""Outbound HTTP for every role: treq over one persistent connection pool,
every socket bound to the member's own IP (PROTOCOL.md §1), every exchange
guarded by a deadline and a size cap.

``post`` answers the body of a 200, or raises NextHopFailed (502: refused,
unreachable, non-200, too large) or NextHopTimeout (504). Details name no
address: they end up in answers and logs.
"""

from __future__ import annotations

import ipaddress

from http.cookiejar import DefaultCookiePolicy

import functools

from hyperlink import EncodedURL
from treq.client import HTTPClient
try:
    from treq.cookies import IndexableCookieJar
except ImportError:  # older treq
    from http.cookiejar import CookieJar as IndexableCookieJar
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.python.failure import Failure
from twisted.web.client import (Agent, RequestTransmissionFailed, ResponseFailed,
                                ResponseNeverReceived)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, UNKNOWN_LENGTH
from zope.interface import implementer

from onion_twisted.protocol import wire
from onion_twisted.protocol.errors import NextHopAbandoned, NextHopFailed, NextHopTimeout
from onion_twisted.protocol.interfaces import IOutbound
from onion_twisted.net.http_server import IDLE_TIMEOUT
from onion_twisted.net.tls import PinningPolicy, handshake_failure_detail
from onion_twisted.net.tls_transport import BulkTLSEndpoint
from onion_twisted.net.twisted_compat import ConnectionPool, PoolClientFactory, finished_response_head, treq_response

JSON_HEADERS = {b"Content-Type": [b"application/json"]}
# A pooled connection left idle is closed by this side, 10 s before a member's
# server would close it: a cell sent at the moment the neighbour closes an idle
# connection fails (the pool never retries a cell), so the client must always
# be the side that closes an idle connection.
POOL_IDLE_TIMEOUT = IDLE_TIMEOUT - 10


@implementer(IBodyProducer)
class BytesProducer:
    """A body already in memory, written in one go (no cooperator slices)."""

    def __init__(self, body: bytes):
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer):
        # Let go of the body once the transport has it: a pooled connection
        # keeps its last request (and so this producer) while it sits idle.
        body, self._body = self._body, b""
        consumer.write(body)
        return defer.succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


class BoundEndpointFactory:
    """Endpoints whose sockets are bound to one source IP; for https URLs, TLS
    over them with ``tls_policy`` (a ``PinningPolicy``)."""

    def __init__(self, reactor, bind_ip: str | None, connect_timeout: float, tls_policy=None):
        self.reactor = reactor
        self.bind = (bind_ip, 0) if bind_ip and bind_ip not in ("0.0.0.0", "::") else None
        self.connect_timeout = connect_timeout
        self.tls_policy = tls_policy
        self._endpoints: dict = {}

    def endpointForURI(self, uri):
        # Asked for every request, pooled or not: one endpoint per neighbour, kept.
        key = (uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            if len(self._endpoints) >= 4096:
                self._endpoints.clear()
            endpoint = self._endpoints[key] = self._new_endpoint(uri)
        return endpoint

    def _new_endpoint(self, uri):
        host = uri.host.decode("ascii") if isinstance(uri.host, bytes) else uri.host
        host = host.strip("[]")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            endpoint = HostnameEndpoint(self.reactor, host, uri.port, timeout=self.connect_timeout,
                                        bindAddress=self.bind)
        else:
            cls = TCP6ClientEndpoint if ip.version == 6 else TCP4ClientEndpoint
            endpoint = cls(self.reactor, host, uri.port, timeout=self.connect_timeout, bindAddress=self.bind)
        if uri.scheme == b"https":
            if self.tls_policy is None:
                raise ValueError("an https URL for an outbound without TLS")
            endpoint = BulkTLSEndpoint(self.tls_policy.creatorForNetloc(host, uri.port), endpoint, self.reactor)
        return endpoint


@functools.lru_cache(maxsize=1024)
def _request_uri(url: str) -> bytes:
    """The bytes an Agent wants for ``url``, as treq computes them (hyperlink,
    IDNA): computed once per neighbour instead of once per cell."""
    return EncodedURL.from_text(url).to_uri().to_text().encode("ascii")


class RelayHTTPClient(HTTPClient):
    """treq's HTTPClient without the per-request layers a relay must not have.

    ``HTTPClient.request`` re-parses the URL (hyperlink + IDNA), merges
    cookie jars and wraps the Agent in cookie, redirect and gzip-decoding
    agents on every call: about 100 µs per request in process, a sixth of a
    node's CPU per small cell (bench/relay.py). A relay wants none of them:
    it never follows a redirect (a neighbour answering 303 must not make it
    fetch an address of the neighbour's choosing), never keeps or sends a
    cookie, and never inflates a gzip body. So ``request`` sends straight
    through the bound Agent and wraps the answer in treq's response.
    """

    def __init__(self, agent, cookiejar):
        super().__init__(agent, cookiejar=cookiejar)
        # Our own references: treq keeps its own in private attributes.
        self.agent = agent
        self.cookiejar = cookiejar

    def request(self, method, url, *, headers=None, data=None, unbuffered=False,
                allow_redirects=False, **unsupported):
        if unsupported or allow_redirects or not unbuffered:
            raise TypeError("RelayHTTPClient sends unbuffered requests only, without redirects, "
                            f"cookies, params or auth (got {sorted(unsupported)})")
        d = self.agent.request(method.encode("ascii"), _request_uri(url), headers, data)
        return d.addCallback(treq_response, self.cookiejar)


def keeps_connection(version: tuple, connection_headers: Headers) -> bool:
    """Whether a response leaves its connection open for the next request (RFC 9112 §9.3).

    ``version`` is ``(b"HTTP", major, minor)``; ``connection_headers`` holds the
    response's ``Connection`` header(s). ``close`` among the tokens ends the
    connection; otherwise HTTP/1.1 and later persist, and HTTP/1.0 only with
    ``keep-alive``. Tokens are case-insensitive and may share one header.
    """
    tokens = {token.strip().lower() for value in connection_headers.getRawHeaders(b"connection", ())
              for token in value.split(b",")}
    if b"close" in tokens:
        return False
    return tuple(version[1:3]) >= (1, 1) or b"keep-alive" in tokens


# Why only a response that keeps its connection goes back to the pool:
# HTTP11ClientProtocol hands its connection back after every response that does
# not say exactly "Connection: close"; it never looks at the response's version
# (net.twisted_compat.PoolClientFactory). An HTTP/1.0 server (Python's
# http.server as it comes, a simple Flask-style peer) answers without
# "Connection: close" and closes the connection right after. Pooled anyway, that
# connection took the next cell a moment before its close was seen, and with
# retries off (a cell must not be delivered twice) the cell failed: 502 "next
# hop closed the connection", and a transfer to such a peer stopped after a few
# chunks. Only a response that keeps its connection (``keeps_connection``) goes
# back to the pool now; any other closes its own.

class _QuietClientFactory(PoolClientFactory):
    def returns_to_pool(self, protocol) -> bool:
        """``keeps_connection`` of the response ``protocol`` just finished reading."""
        head = finished_response_head(protocol)
        if head is None:
            return False  # not the Twisted this was checked against: a fresh connection is always safe
        return keeps_connection(*head)


class QuietConnectionPool(ConnectionPool):
    connection_factory = _QuietClientFactory


class CappedBody:
    def __init__(self, limit: int):
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0

    def __call__(self, data: bytes):
        self.size += len(data)
        if self.size > self.limit:
            raise NextHopFailed("next hop's answer is over the size limit")
        self.parts.append(data)

    def value(self) -> bytes:
        return b"".join(self.parts)


@implementer(IOutbound)
class HTTPOutbound:
    """Posts and gets to members; with ``tls``, https and TLS 1.3 (PROTOCOL.md §14).

    ``pin_for(address) -> hex | None`` (settable, default: none known) gives
    the SPKI SHA-256 a TLS server at ``address`` must present; it is asked
    for each new connection.
    """

    def __init__(self, reactor, *, bind_ip: str | None, timeout: float = 30.0,
                 max_response: int = 16 * 1024 * 1024, max_per_host: int = 64, agent=None, tls: bool = False):
        self.reactor = reactor
        self.timeout = timeout
        self.max_response = max_response
        self.tls = tls
        self.scheme = "https" if tls else "http"
        self.pin_for = None
        if agent is None:
            self.pool = QuietConnectionPool(reactor, persistent=True)
            self.pool.maxPersistentPerHost = max_per_host
            self.pool.cachedConnectionTimeout = POOL_IDLE_TIMEOUT
            self.pool.retryAutomatically = False  # a cell must not be delivered twice
            policy = PinningPolicy(self._pin) if tls else None
            agent = Agent.usingEndpointFactory(reactor, BoundEndpointFactory(reactor, bind_ip, timeout, policy),
                                               pool=self.pool)
        else:
            self.pool = None
        # Neighbours' cookies are never kept nor sent back (the jar accepts none, and
        # RelayHTTPClient has no cookie layer).
        self.http = RelayHTTPClient(agent, cookiejar=IndexableCookieJar(policy=DefaultCookiePolicy(allowed_domains=[])))

    def _pin(self, address: wire.Address) -> str | None:
        return self.pin_for(address) if self.pin_for is not None else None

    def url(self, address: wire.Address, path: str = "/") -> str:
        return f"{self.scheme}://{address}{path}"

    def post(self, address: wire.Address, body: bytes, headers: dict | None = None,
             path: str = "/") -> defer.Deferred:
        return self._guarded(self._exchange(b"POST", self.url(address, path), body, headers))

    def get(self, address: wire.Address, path: str) -> defer.Deferred:
        """(status, headers, body) of a GET: any status, same deadline and cap."""
        return self._guarded(self._exchange(b"GET", self.url(address, path), None, None, any_status=True))

    def _guarded(self, coroutine) -> defer.Deferred:
        d = defer.ensureDeferred(coroutine)
        # A cancellation by the deadline is the next hop's timeout; any other, by whoever
        # awaited the answer, is NextHopAbandoned (_map_failure).
        d.addTimeout(self.timeout, self.reactor, onTimeoutCancel=_deadline_passed)
        d.addErrback(_map_failure)
        return d

    async def _exchange(self, method: bytes, url: str, body, headers, any_status: bool = False):
        h = Headers(JSON_HEADERS)
        for name, value in (headers or {}).items():
            h.setRawHeaders(name, [value])
        producer = BytesProducer(body) if body is not None else None
        del body  # the producer drops it once written: not held while the answer is awaited
        response = await self.http.request(method.decode("ascii"), url, data=producer,
                                           headers=h, unbuffered=True, allow_redirects=False)
        del producer
        collector = CappedBody(self.max_response)
        declared = response.length
        if declared is not UNKNOWN_LENGTH and declared > self.max_response:
            response.deliverBody(_Discard())
            raise NextHopFailed("next hop's answer is over the size limit")
        await response.collect(collector)
        data = collector.value()
        if any_status:
            return response.code, response.headers, data
        if response.code != 200:
            error = NextHopFailed(f"next hop answered {response.code} {_error_name(data)}".rstrip())
            error.answered = response.code  # callers may tell 403 from 502 without parsing text
            raise error
        return data

    def close(self) -> defer.Deferred:
        if self.pool is None:
            return defer.succeed(None)
        return self.pool.closeCachedConnections()


def _error_name(body: bytes) -> str:
    try:
        obj = wire.loads(body)
        error = obj.get("error") if isinstance(obj, dict) else None
        return error if isinstance(error, str) and error.isidentifier() else ""
    except Exception:
        return ""


def _deadline_passed(result, _timeout):
    if isinstance(result, Failure) and _cancelled(result):
        raise NextHopTimeout("next hop did not answer in time")
    return result


def _map_failure(failure):
    if failure.check(NextHopFailed, NextHopTimeout):
        return failure
    if _cancelled(failure):
        raise NextHopAbandoned("the answer was no longer awaited")
    from OpenSSL import SSL
    from twisted.internet import error as net_error

    tls_error = failure if failure.check(SSL.Error) else next(
        (r for r in getattr(failure.value, "reasons", None) or () if r.check(SSL.Error)), None)
    if tls_error is not None:
        raise NextHopFailed(handshake_failure_detail(tls_error.value))
    if failure.check(net_error.ConnectionRefusedError):
        raise NextHopFailed("next hop refused the connection")
    if failure.check(net_error.TimeoutError, net_error.TCPTimedOutError):
        raise NextHopTimeout("next hop did not accept the connection in time")
    if failure.check(net_error.ConnectError, net_error.DNSLookupError):
        raise NextHopFailed("next hop is unreachable")
    if failure.check(ResponseNeverReceived, ResponseFailed,
                     RequestTransmissionFailed, net_error.ConnectionLost, net_error.ConnectionDone):
        raise NextHopFailed("next hop closed the connection")
    raise NextHopFailed(f"next hop failed: {failure.type.__name__}")


def _cancelled(failure) -> bool:
    """Whether ``failure`` is a cancellation: plain, or a request's failure that wraps one."""
    if failure.check(defer.CancelledError):
        return True
    inner = getattr(failure.value, "reasons", None)
    return bool(inner) and any(r.check(defer.CancelledError) for r in inner)


class _Discard:
    def makeConnection(self, transport):
        transport.stopProducing()

    def dataReceived(self, data):
        pass

    def connectionLost(self, reason):
        pass
