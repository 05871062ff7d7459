"""Twisted's TLS transport with fewer trips through Python per megabyte (PROTOCOL.md §14).

A node relays cells of about 1.4 MiB. Twisted's ``BufferingTLSTransport``
hands pyOpenSSL 16 KiB at a time (one record), reads the send BIO 32 KiB at
a time, and passes every record it decrypts to HTTP on its own: per MiB
and per link end some 64 writes, 64 BIO reads and 64 HTTP parser calls,
each a few Python frames. Profiled in a real network (``make bench``), TLS
doubled the CPU per MiB of every hop. Here:

* a write hands OpenSSL up to ``WRITE_SIZE`` at once: with partial writes
  off on our contexts (``tls.py`` clears ``SSL_MODE_ENABLE_PARTIAL_WRITE``),
  one ``SSL_write`` makes every record of it into the memory BIO, which is
  then drained in reads of ``BIO_READ_SIZE``;
* what one TCP read decrypts to (up to 4 records) goes to HTTP as one piece.

The records on the wire are the same 16 KiB TLS 1.3 records: only the
number of calls changes. ``BulkTLSFactory`` is a ``TLSMemoryBIOFactory`` with
this transport; ``BulkTLSEndpoint`` wraps a client endpoint in it, as
``wrapClientTLS`` does with Twisted's own.
"""

from __future__ import annotations

from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.internet import defer
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

WRITE_SIZE = 256 * 1024          # application bytes per SSL_write
BIO_READ_SIZE = 256 * 1024 + 4096  # one write's records and their framing, read out at once
RECV_SIZE = 16 * 1024            # one TLS record's plaintext at most: SSL_read returns one record


class BulkTLSTransport(BufferingTLSTransport):
    """``BufferingTLSTransport`` with large writes and one delivery per TCP read (see the module)."""

    def _flushSendBIO(self):
        while True:
            try:
                data = self._tlsConnection.bio_read(BIO_READ_SIZE)
            except WantReadError:
                return  # the BIO is empty
            self.transport.write(data)
            if len(data) < BIO_READ_SIZE:
                return

    def _deliver(self, pieces: list) -> None:
        if pieces and not self._aborted:
            ProtocolWrapper.dataReceived(self, pieces[0] if len(pieces) == 1 else b"".join(pieces))

    def _flushReceiveBIO(self):
        # As Twisted's, but what one read decrypts to reaches the protocol as one
        # piece, and before any shutdown or error that followed it in the stream.
        pieces = []
        while not self._lostTLSConnection:
            try:
                pieces.append(self._tlsConnection.recv(RECV_SIZE))
            except WantReadError:
                break
            except ZeroReturnError:
                self._deliver(pieces)
                pieces = []
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except Error:
                self._deliver(pieces)
                pieces = []
                self._tlsShutdownFinished(Failure())
        self._deliver(pieces)
        self._flushSendBIO()

    def _write(self, data):
        if self._lostTLSConnection:
            return
        view = memoryview(data)
        sent = 0
        while sent < len(view):
            try:
                sent += self._tlsConnection.send(view[sent:sent + WRITE_SIZE])
            except WantReadError:
                self._bufferedWrite(bytes(view[sent:]))
                break
            except Error:
                # As Twisted's: the connection is lost, and the error reaches the protocol.
                self._tlsShutdownFinished(Failure())
                break
            else:
                self._flushSendBIO()


class BulkTLSFactory(TLSMemoryBIOFactory):
    protocol = BulkTLSTransport


@implementer(IStreamClientEndpoint)
class BulkTLSEndpoint:
    """``wrapClientTLS(creator, endpoint)`` with ``BulkTLSTransport``."""

    def __init__(self, creator, endpoint):
        self.creator = creator
        self.endpoint = endpoint

    def connect(self, factory) -> defer.Deferred:
        d = self.endpoint.connect(BulkTLSFactory(self.creator, True, factory))
        d.addCallback(lambda wrapper: wrapper.wrappedProtocol)
        return d
