"""The upload stream of PROTOCOL.md §8: a shared file's chunks, read and sent a window at a time.

* ``open_regular``: a read-only fd of a regular file, refusing links and FIFOs.
* ``ChunkProducer`` (an ``IPushProducer``) reads one chunk at a time with
  ``os.pread``; ``WindowedChunkSender`` is its consumer: it hands each chunk
  to ``send`` and pauses the producer while ``window`` chunks are
  unacknowledged. Only the chunks in flight are held in memory, so memory
  does not grow with the file's size.
* With an ``UploadRate`` (the upload cap), the producer takes each chunk's
  bytes from it before reading the chunk, and waits while it holds them
  back: a held-back chunk is neither read nor counted in the window, so
  its acknowledgement timeout starts only when it is sent.

Nothing here touches the network: ``send`` is whatever carries one
``file_chunk`` through the peer's circuit.
"""

from __future__ import annotations

import errno
import os
import stat as stat_module
from typing import Callable

from twisted.internet import defer
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from onion_twisted.protocol.messages import MAX_CHUNK, MessageError
from onion_twisted.protocol.chunks import wanted_indexes
from onion_twisted.protocol.congestion import DelayWindow

DEFAULT_WINDOW = 8
DEFAULT_ACK_TIMEOUT = 120.0


def open_regular(path) -> int:
    """A read-only fd of the regular file ``path`` (no symlink followed, never blocks on a FIFO).

    MessageError("refused") for anything else.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise MessageError("refused", "the name is a symbolic link") from None
        raise MessageError("refused", f"cannot open the file: {e.strerror}") from None
    try:
        if not stat_module.S_ISREG(os.fstat(fd).st_mode):
            raise MessageError("refused", "not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


@implementer(IPushProducer)
class ChunkProducer:
    """Reads the wanted chunks of an open file, one ``os.pread`` at a time.

    For each index of ``wanted_indexes(chunks, count)`` it calls
    ``consumer.write_chunk(index, data)`` while not paused; then
    ``consumer.producer_done()``. A read error or a file that shrank calls
    ``consumer.producer_failed(failure)``. The fd is closed when the
    producer finishes, fails or is stopped.

    ``rate`` (an ``upload_rate.UploadRate``, or None for no cap): each chunk's
    bytes are taken from it before the chunk is read; stopping the producer
    cancels a request still waiting there.
    """

    def __init__(self, fd: int, size: int, chunk_size: int, chunks=None, *, pread=os.pread, rate=None):
        if not 0 < chunk_size <= MAX_CHUNK:
            raise ValueError(f"chunk_size must be 1 .. {MAX_CHUNK}")
        if size < 0:
            raise ValueError("size must be >= 0")
        self.fd = fd
        self.size = size
        self.chunk_size = chunk_size
        self.count = (size + chunk_size - 1) // chunk_size
        self._indexes = wanted_indexes(chunks, self.count)
        self._pread = pread
        self.consumer = None
        self.paused = False
        self.stopped = False   # stopProducing, a failure, or finished: nothing more will come
        self.finished = False
        self.chunks_read = 0
        self._producing = False
        self._rate = rate
        self._next: int | None = None   # the index taken from the wanted ones and not read yet
        self._paid = False              # whether the rate let the bytes of _next go
        self._grant: defer.Deferred | None = None  # the rate's answer being waited for

    @classmethod
    def open(cls, path, chunk_size: int, chunks=None, **kwargs) -> "ChunkProducer":
        """Open ``path`` with ``open_regular``; the size is the file's at that moment."""
        fd = open_regular(path)
        try:
            return cls(fd, os.fstat(fd).st_size, chunk_size, chunks, **kwargs)
        except BaseException:
            os.close(fd)
            raise

    def beginProducing(self, consumer) -> None:
        if self.consumer is not None:
            raise RuntimeError("producer already started")
        self.consumer = consumer
        consumer.registerProducer(self, True)
        self._produce()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        if self.stopped:
            return
        self.paused = False
        self._produce()

    def stopProducing(self) -> None:
        self.stopped = True
        if self._grant is not None:
            grant, self._grant = self._grant, None
            grant.cancel()  # no waiter left behind in the upload rate's queue
        self._close()

    def _close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def _produce(self) -> None:
        # write_chunk may pause, or (an ack that fires at once) resume, from inside this loop.
        if self._producing or self.consumer is None:
            return
        self._producing = True
        try:
            while not self.paused and not self.stopped and self._grant is None:
                if self._next is None:
                    self._next, self._paid = next(self._indexes, None), False
                    if self._next is None:
                        self.stopped = self.finished = True
                        self._close()
                        self.consumer.producer_done()
                        return
                index = self._next
                offset = index * self.chunk_size
                length = min(self.chunk_size, self.size - offset)
                if self._rate is not None and not self._paid:
                    grant = self._rate.take(length)
                    if not grant.called:
                        self._grant = grant  # held back by the upload cap: _taken goes on
                        grant.addCallbacks(self._taken, lambda f: f.trap(CancelledError))
                        return
                    self._paid = True
                self._next = None
                try:
                    data = self._pread(self.fd, length, offset)
                    if len(data) != length:
                        raise OSError(errno.EIO, "the file shrank while being served")
                except OSError:
                    failure = Failure()
                    self.stopProducing()
                    self.consumer.producer_failed(failure)
                    return
                self.chunks_read += 1
                self.consumer.write_chunk(index, data)
                del data
        finally:
            self._producing = False

    def _taken(self, _) -> None:
        self._grant = None
        self._paid = True
        self._produce()


class WindowedChunkSender:
    """The consumer of a ``ChunkProducer``: at most ``window`` chunks unacknowledged.

    With ``adaptive`` (the uploader's way), ``window`` is the most: how many
    may be in flight is a ``DelayWindow`` of it, moved by the round trips of
    the acknowledgements (fewer while the path queues, docs 17.10 choice 57).

    ``send(index, data) -> Deferred`` carries one chunk (it fires when the far
    end has it). ``done`` fires with the number of chunks sent once the
    producer is done and every chunk was acknowledged, or fails with the
    first failure (a send, a read, or ``defer.TimeoutError`` when a chunk is
    not acknowledged within ``ack_timeout`` seconds of ``clock``). Cancelling
    ``done`` stops the transfer. The sender keeps no chunk data: only the
    Deferreds of the sends in flight.
    """

    def __init__(self, send: Callable, window: int = DEFAULT_WINDOW, clock=None,
                 ack_timeout: float | None = DEFAULT_ACK_TIMEOUT, adaptive: bool = False):
        if window < 1:
            raise ValueError("window must be at least 1")
        if clock is None:
            from twisted.internet import reactor as clock
        self.send = send
        self.max_window = window
        self.control = DelayWindow(window) if adaptive else None
        self._sent_at: dict[int, float] = {}
        self.clock = clock
        self.ack_timeout = ack_timeout
        self.producer = None
        self.in_flight: dict[int, defer.Deferred] = {}
        self._timers: dict[int, object] = {}
        self.acknowledged = 0
        self.max_in_flight = 0
        self.finished = False
        self._producer_done = False
        self._paused_by_us = False
        self.done = defer.Deferred(canceller=self._cancelled)

    @property
    def window(self) -> int:
        """Chunks that may be unacknowledged now."""
        return self.control.window if self.control is not None else self.max_window

    def start(self, producer: ChunkProducer) -> defer.Deferred:
        """Begin the transfer; returns ``done``."""
        producer.beginProducing(self)
        return self.done

    # -- IConsumer-ish -----------------------------------------------------------------

    def registerProducer(self, producer, streaming: bool) -> None:
        if not streaming:
            raise ValueError("WindowedChunkSender needs a push (streaming) producer")
        if self.producer is not None:
            raise RuntimeError("a producer is already registered")
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write_chunk(self, index: int, data: bytes) -> None:
        if self.finished:
            return
        if len(self.in_flight) >= self.window:
            self._fail(Failure(RuntimeError("the producer wrote past the window")))
            return
        self._sent_at[index] = self.clock.seconds()
        d = defer.maybeDeferred(self.send, index, data)
        del data
        self.in_flight[index] = d
        self.max_in_flight = max(self.max_in_flight, len(self.in_flight))
        if self.ack_timeout is not None:
            self._timers[index] = self.clock.callLater(self.ack_timeout, self._timed_out, index)
        self._pause_or_resume()
        d.addCallbacks(self._acked, self._send_failed, callbackArgs=(index,), errbackArgs=(index,))

    def producer_done(self) -> None:
        self._producer_done = True
        self._maybe_finish()

    def producer_failed(self, failure: Failure) -> None:
        self._fail(failure)

    # -- acknowledgements ----------------------------------------------------------------

    def _pause_or_resume(self) -> None:
        if self.producer is None:
            return
        full = len(self.in_flight) >= self.window
        if full and not self._paused_by_us:
            self._paused_by_us = True
            self.producer.pauseProducing()
        elif not full and self._paused_by_us:
            self._paused_by_us = False
            self.producer.resumeProducing()

    def _settle(self, index: int) -> float | None:
        """Chunk ``index`` is no longer in flight: when it was sent, or None if it was not."""
        timer = self._timers.pop(index, None)
        if timer is not None and timer.active():
            timer.cancel()
        self.in_flight.pop(index, None)
        return self._sent_at.pop(index, None)

    def _acked(self, _result, index: int) -> None:
        sent_at = self._settle(index)
        if sent_at is None or self.finished:
            return None
        self.acknowledged += 1
        if self.control is not None:
            self.control.acknowledged(self.clock.seconds() - sent_at)
        if self._producer_done:
            self._maybe_finish()
        else:
            self._pause_or_resume()
        return None

    def _send_failed(self, failure: Failure, index: int) -> None:
        self._settle(index)
        if not self.finished:
            self._fail(failure)
        return None  # consumed: later failures of a finished transfer are not "unhandled"

    def _timed_out(self, index: int) -> None:
        self._timers.pop(index, None)
        if index in self.in_flight and not self.finished:
            self._fail(Failure(defer.TimeoutError(f"chunk {index} not acknowledged "
                                                  f"within {self.ack_timeout} s")), cancel_sends=True)

    # -- the end -------------------------------------------------------------------------

    def _maybe_finish(self) -> None:
        if self.finished or not self._producer_done or self.in_flight:
            return
        self._end()
        self.done.callback(self.acknowledged)

    def _end(self, cancel_sends: bool = False) -> None:
        self.finished = True
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        self._sent_at.clear()
        if self.producer is not None:
            producer, self.producer = self.producer, None
            producer.stopProducing()
        if cancel_sends:
            for d in list(self.in_flight.values()):
                d.cancel()

    def _fail(self, failure: Failure, cancel_sends: bool = False) -> None:
        if self.finished:
            return
        self._end(cancel_sends)
        self.done.errback(failure)

    def _cancelled(self, _d) -> None:
        # done.cancel(): stop reading, cancel the sends; the Deferred fails with CancelledError.
        if not self.finished:
            self._end(cancel_sends=True)

    def cancel(self) -> None:
        self.done.cancel()
