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
* what one TCP read decrypts to (up to 4 records) goes to HTTP as one piece;
* a link that carried a cell and then went quiet gets new memory BIOs.
  OpenSSL's memory BIO never gives back the buffer it grew to: a
  256 KiB write leaves about 340 KiB with the sending end, a 64 KiB read
  about 100 KiB with the receiving one, for as long as the connection
  lives. A node keeps some hundred connections, most of them idle at any
  moment, so after ``BIO_RELEASE_IDLE`` seconds without a byte either way
  (a busy link never pays for growing them again) both BIOs, empty, are
  swapped for new ones and OpenSSL frees the old (``bench/tls_memory.py``).

The records on the wire are the same 16 KiB TLS 1.3 records: only the
number of calls changes. ``BulkTLSFactory`` is a ``TLSMemoryBIOFactory`` with
this transport; ``BulkTLSEndpoint`` wraps a client endpoint in it, as
``wrapClientTLS`` does with Twisted's own.
"""

from __future__ import annotations

from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib
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
BIO_RELEASE_SIZE = 32 * 1024     # a write or read larger than this grew a BIO worth freeing
BIO_RELEASE_IDLE = 2.0           # seconds without a byte either way before the BIOs are renewed


def renew_memory_bios(connection) -> bool:
    """Give a pyOpenSSL ``Connection`` made on memory BIOs two new, empty ones, if its own
    hold no bytes; OpenSSL frees the old ones (``SSL_set_bio`` takes both new references).
    False when a BIO holds bytes: nothing changes."""
    if _lib.BIO_get_mem_data(connection._into_ssl, _ffi.NULL) or _lib.BIO_get_mem_data(
            connection._from_ssl, _ffi.NULL):
        return False
    new_into, new_out = _lib.BIO_new(_lib.BIO_s_mem()), _lib.BIO_new(_lib.BIO_s_mem())
    if new_into == _ffi.NULL or new_out == _ffi.NULL:
        for bio in (new_into, new_out):
            if bio != _ffi.NULL:
                _lib.BIO_free(bio)
        return False
    _lib.SSL_set_bio(connection._ssl, new_into, new_out)
    connection._into_ssl, connection._from_ssl = new_into, new_out
    return True


class BulkTLSTransport(BufferingTLSTransport):
    """``BufferingTLSTransport`` with large writes, one delivery per TCP read, and memory BIOs
    renewed once the link is quiet (see the module)."""

    _bio_check = None   # the pending look at whether the link went quiet
    _bio_traffic = False  # a byte moved since that look was scheduled
    bios_renewed = 0

    def _note_traffic(self, size: int) -> None:
        if self._bio_check is not None:
            self._bio_traffic = True
        elif size > BIO_RELEASE_SIZE:
            self._bio_check = self.factory._clock.callLater(BIO_RELEASE_IDLE, self._renew_bios_if_quiet)

    def _renew_bios_if_quiet(self) -> None:
        self._bio_check = None
        if self._lostTLSConnection or not self._handshakeDone or not hasattr(self._tlsConnection, "_from_ssl"):
            return  # closing, still shaking hands, or a pyOpenSSL that keeps its BIOs otherwise
        if self._bio_traffic or not renew_memory_bios(self._tlsConnection):
            self._bio_traffic = False
            self._bio_check = self.factory._clock.callLater(BIO_RELEASE_IDLE, self._renew_bios_if_quiet)
            return
        self.bios_renewed += 1

    def dataReceived(self, data):
        self._note_traffic(len(data))
        super().dataReceived(data)

    def connectionLost(self, reason):
        if self._bio_check is not None:
            self._bio_check.cancel()
            self._bio_check = None
        super().connectionLost(reason)

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
        self._note_traffic(len(data))
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
    """``wrapClientTLS(creator, endpoint)`` with ``BulkTLSTransport``; ``clock`` times the
    renewal of quiet links' BIOs (the global reactor by default, as Twisted's factory)."""

    def __init__(self, creator, endpoint, clock=None):
        self.creator = creator
        self.endpoint = endpoint
        self.clock = clock

    def connect(self, factory) -> defer.Deferred:
        d = self.endpoint.connect(BulkTLSFactory(self.creator, True, factory, self.clock))
        d.addCallback(lambda wrapper: wrapper.wrappedProtocol)
        return d
