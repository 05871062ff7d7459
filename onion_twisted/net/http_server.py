"""The HTTP server side shared by every role.

* ``BoundedRequest`` keeps bodies in memory (twisted.web would spool bodies
  over 100 kB to a temporary file) and refuses a body over ``max_body`` with
  413 as soon as its length is announced, or as soon as a chunked body
  passes the limit, without reading it whole.
* ``QuietSite`` writes no access log and silences the channel's own
  messages, which carry client addresses (safe logging).
* ``AllowList``: who may see a member's own views (the peer's page and API,
  ``ui_allow``; a node's or the tracker's page and metrics, ``metrics_allow``).
* ``DeadlineChannel``: a request (line, headers, body) must arrive whole
  within ``request_timeout`` seconds of its first byte, or the connection is
  closed. The idle timeout starts again with every byte, so on its own it
  lets a client that sends a byte now and then keep a connection forever.
"""

from __future__ import annotations

import io
import ipaddress
from urllib.parse import unquote_to_bytes

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import http, resource, server

from onion_twisted.protocol import wire
from onion_twisted.protocol.errors import ProtocolError, TooLarge
from onion_twisted.net.twisted_compat import handling_request, http_channel, request_disconnected, silence_channel

_SILENT = Logger(observer=lambda event: None)
DEFAULT_MAX_BODY = 8 * 1024 * 1024
IDLE_TIMEOUT = 60.0  # seconds a member keeps an idle client connection open


class _ReadOnlyEmpty(io.BytesIO):
    """An empty body shared by every request: cannot be written nor closed."""

    def write(self, data):
        raise OSError("read-only")

    def close(self):
        pass


# What a handler leaves in request.content once it took the body out.
EMPTY_CONTENT = _ReadOnlyEmpty()


class BoundedRequest(server.Request):
    """A request whose body is kept in memory, never spooled to a file, and
    refused (413) past ``max_body``. The pieces read from the socket are
    joined once, when the body is complete: a growing BytesIO would copy
    it again and again and keep an over-allocated buffer."""

    max_body = DEFAULT_MAX_BODY
    _too_large = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pieces = []
        self._received = 0

    def gotLength(self, length):
        if length is not None and length > self.max_body:
            self._refuse_too_large()
            return
        self._pieces = []
        self._received = 0
        self.content = EMPTY_CONTENT

    def handleContentChunk(self, data):
        if self._too_large:
            return
        self._received += len(data)
        if self._received > self.max_body:
            self._refuse_too_large()
            return
        self._pieces.append(data)

    def requestReceived(self, command, path, version):
        if self._too_large:
            return
        pieces, self._pieces = self._pieces, []
        # BytesIO shares the bytes it starts from: getvalue() gives them back uncopied.
        self.content = io.BytesIO(pieces[0] if len(pieces) == 1 else b"".join(pieces))
        del pieces
        super().requestReceived(command, path, version)

    def process(self):
        # Klein decodes the path and the Host name as UTF-8, and werkzeug then
        # encodes the name as IDNA; when either cannot (a path of %ff, a Host
        # of "." or "a..b"), the client got a 500 page and the log a
        # traceback: any client could fill the log with them. Such a request
        # is a plain 400 here, and nothing is logged.
        try:
            unquote_to_bytes(self.path).decode("utf-8")
            self.getRequestHostname().decode("utf-8").lower().partition(":")[0].encode("idna")
        except UnicodeError:
            self.setResponseCode(400)
            self.setHeader(b"Content-Type", b"application/json")
            self.write(b'{"error":"bad_request","detail":"the path or the Host header is not a valid name"}')
            self.finish()
            return
        super().process()

    def _refuse_too_large(self):
        """Answer 413 and close: the rest of the body is never read."""
        self._too_large = True
        self._pieces = []
        self.content = EMPTY_CONTENT
        body = wire.dumps(TooLarge(f"body over this member's limit of {self.max_body} bytes").body())
        head = (b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\n"
                b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
        transport = self.channel.transport
        transport.write(head + body)
        transport.loseConnection()


class DeadlineChannel(http.HTTPChannel):
    """An HTTP/1.1 channel that closes a connection whose request is not whole
    ``request_timeout`` seconds after its first byte (a slow or stalled client).

    Time spent answering (waiting for the next hop) does not count: the clock
    stops once the request is whole, and starts with the next request's first byte.
    """

    request_timeout = 60.0
    _deadline = None

    def dataReceived(self, data):
        if self._deadline is None and not handling_request(self):
            self._deadline = self.callLater(self.request_timeout, self._too_slow)
        super().dataReceived(data)

    def allContentReceived(self):
        self._stop_deadline()
        super().allContentReceived()

    def connectionLost(self, reason):
        self._stop_deadline()
        super().connectionLost(reason)

    def _stop_deadline(self):
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _too_slow(self):
        self._deadline = None
        # No answer (no status of the contract fits, and a slow sender may not read either).
        self.transport.abortConnection()


class QuietSite(server.Site):
    noisy = False
    protocol = DeadlineChannel  # plain HTTP/1.1: no TLS here, so no HTTP/2 to negotiate

    def __init__(self, resource, *, max_body: int = DEFAULT_MAX_BODY, reactor=None, timeout: float = IDLE_TIMEOUT,
                 request_timeout: float = 60):
        # No form parsing: bodies are JSON, and parsing an 8 MiB urlencoded
        # body into request.args stalled the reactor for a second.
        super().__init__(resource, reactor=reactor, timeout=timeout, parsePOSTFormSubmission=False)
        self.requestFactory = type("Request", (BoundedRequest,), {"max_body": max_body})
        self.request_timeout = request_timeout

    def log(self, request):
        pass  # no access log: it would record client addresses

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        channel = http_channel(protocol)
        silence_channel(channel, _SILENT)
        channel.request_timeout = self.request_timeout
        return protocol


class CellRoute(resource.Resource):
    """A site's root: ``POST /`` straight to ``post_cell``, every other request to ``other``.

    A cell is the one request a member answers thousands of times a second;
    Klein's routing (werkzeug's URL map, built per request, with IDNA of the
    Host) cost about 6 % of a node's CPU per small cell, for a route that is
    always the same. ``post_cell(request)`` is the Klein handler itself (it
    answers through ``respond``, so statuses and errors are the same either
    way); as under Klein, a client that goes away cancels the answer.
    """

    isLeaf = True

    def __init__(self, other, post_cell):
        super().__init__()
        self.other = other
        self.post_cell = post_cell

    def render(self, request):
        if request.method != b"POST" or request.path != b"/":
            return self.other.render(request)
        d = self.post_cell(request)
        request.notifyFinish().addErrback(lambda _: d.cancel())
        d.addCallbacks(_write_and_finish, _unexpected, callbackArgs=(request,), errbackArgs=(request,))
        return server.NOT_DONE_YET


def _write_and_finish(body: bytes, request) -> None:
    if not request_disconnected(request) and not request.finished:
        request.write(body)
        request.finish()


def _unexpected(failure, request) -> None:
    if failure.check(defer.CancelledError):
        return  # the client went away
    _log.failure("internal error while answering a cell", failure)
    if not request_disconnected(request) and not request.finished:
        request.write(write_json(request, 500, INTERNAL_ERROR))
        request.finish()


INTERNAL_ERROR = b'{"error":"internal","detail":"internal error"}'  # never a traceback


def write_json(request, status: int, body: bytes) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    return body


def write_error(request, error: ProtocolError) -> bytes:
    return write_json(request, error.status, wire.dumps(error.body()))


_log = Logger(namespace="onion_twisted.http")


def respond(request, coroutine) -> defer.Deferred:
    """Run a handler coroutine: its bytes as a 200 JSON answer, a ProtocolError
    as its status, anything else as a logged 500 in JSON (never a traceback page)."""
    d = defer.ensureDeferred(coroutine)

    def failed(failure):
        if failure.check(ProtocolError):
            return write_error(request, failure.value)
        if failure.check(defer.CancelledError):
            return failure  # the client went away (its answer was cancelled): nothing to write or log
        _log.failure("internal error while answering a request", failure)
        return write_json(request, 500, INTERNAL_ERROR)

    d.addCallbacks(lambda answer: write_json(request, 200, answer), failed)
    return d


# --- who may see a member's own views ---------------------------------------------------

def parse_allow(entries, key: str = "ui_allow") -> list:
    """An allow-list key as networks: a bare address is a /32 or /128; ValueError for a bad entry."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(str(entry).strip(), strict=False))
        except ValueError:
            raise ValueError(f"{key}: {entry!r} is not an IP address or network") from None
    return networks


def ip_allowed(host, networks) -> bool:
    try:
        ip = ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return False  # not an IP client (a UNIX socket, say): never an allowed one
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in networks)


class AllowList:
    """The client addresses allowed to see a view; others get 403 ``forbidden``."""

    def __init__(self, entries, key: str):
        self.key = key
        self.networks = parse_allow(entries, key)

    def refusal(self, request) -> bytes | None:
        """None when the client may see the view, else the 403 answer (written)."""
        if ip_allowed(request.getClientAddress().host, self.networks):
            return None
        request.setHeader(b"Cache-Control", b"no-store")
        return write_json(request, 403, wire.dumps({
            "error": "forbidden", "detail": f"this address may not see this view ({self.key})"}))
