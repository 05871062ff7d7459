"""The one module that reads Twisted's and treq's private names.

Each is behind one small function or class here, with why it is needed, so
that a Twisted or treq upgrade that moves one breaks here and nowhere else.
Checked against Twisted 26.10.0 and treq 26.7.0 (``pip show twisted treq``
in the project's .venv): twisted/web/_newclient.py, twisted/web/client.py,
twisted/web/http.py and treq/response.py of those versions.
"""

from __future__ import annotations

from treq.response import _Response
from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory


# --- the client side ------------------------------------------------------------------


def treq_response(response, cookiejar):
    """treq's response (``collect``, ``json`` …) around a Twisted ``IResponse``.

    Why: ``RelayHTTPClient`` sends through its Agent directly (treq's
    ``HTTPClient.request`` costs ~100 µs per cell) and wraps the answer as
    treq itself does, with its private ``_Response``; treq has no public
    constructor for it.
    """
    return _Response(response, cookiejar)


class PoolClientFactory(_HTTP11ClientFactory):
    """The factory of a pool's connections, asking ``returns_to_pool(protocol)``
    before a connection that finished a response goes back to the pool; when
    it answers False, the connection is closed instead.

    Why: HTTP11ClientProtocol hands its connection back to the pool (the
    pool's quiescent callback, given to ``_HTTP11ClientFactory`` by
    ``HTTPConnectionPool._newConnection``) after every response that does not
    say exactly "Connection: close"; it never looks at the response's
    version. Twisted offers no public hook at that moment.
    """

    noisy = False  # "Starting factory ..." lines would name the neighbour's endpoint

    def returns_to_pool(self, protocol) -> bool:
        return True

    def __init__(self, quiescentCallback, metadata):
        def back_to_pool(protocol):
            if self.returns_to_pool(protocol):
                quiescentCallback(protocol)
            else:
                protocol.transport.loseConnection()
        super().__init__(back_to_pool, metadata)


class ConnectionPool(HTTPConnectionPool):
    """An ``HTTPConnectionPool`` whose connections come from ``connection_factory``.

    Why: the pool builds its connections' factory from its private class
    attribute ``_factory``; there is no public way to give it another.
    """

    connection_factory: type[PoolClientFactory] = PoolClientFactory

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._factory = cls.connection_factory


def finished_response_head(protocol):
    """(version, the ``Connection`` headers) of the response ``protocol`` (an
    ``HTTP11ClientProtocol``) just finished reading, or None if they cannot be read.

    Why: the quiescent callback gets only the protocol; the response's
    version and ``Connection`` headers are on its private ``_parser``
    (``HTTPClientParser.response`` and ``.connHeaders``). The probing is
    defensive: a Twisted without them gives None (then a fresh connection
    is always the safe choice).
    """
    parser = getattr(protocol, "_parser", None)
    response = getattr(parser, "response", None)
    headers = getattr(parser, "connHeaders", None)
    if response is None or headers is None:
        return None
    return response.version, headers


# --- the server side ------------------------------------------------------------------


def request_disconnected(request) -> bool:
    """Whether the client of ``request`` (a ``twisted.web.http.Request``) went away.

    Why: writing to a request whose connection is lost raises; Twisted keeps
    that fact only in ``Request._disconnected`` (``notifyFinish`` tells it,
    but only to a Deferred asked for in advance).
    """
    return request._disconnected


def http_channel(protocol):
    """The ``HTTPChannel`` of what ``Site.buildProtocol`` returned.

    Why: ``Site.buildProtocol`` returns a ``_GenericHTTPChannelProtocol``
    (which could switch to HTTP/2) wrapping the channel in its private
    ``_channel``; an older Twisted returned the channel itself.
    """
    return getattr(protocol, "_channel", protocol)


def silence_channel(channel, logger) -> None:
    """Make ``channel`` log through ``logger`` (its own messages name client addresses).

    Why: ``HTTPChannel`` logs through its private ``_log`` and has no option
    to turn it off.
    """
    channel._log = logger


def handling_request(channel) -> bool:
    """Whether ``channel`` (an ``HTTPChannel``) has a whole request it is answering.

    Why: the request deadline must stop while a request is answered and start
    with the next one's first byte; ``HTTPChannel`` keeps that state only in
    its private ``_handlingRequest``.
    """
    return channel._handlingRequest
