"""The peer's uploader (PROTOCOL.md §8, §13): serving the tracker's requests, the sharer's side.

A ``request`` that reaches the peer on its circuit names a shared file, a
chunk size and maybe the chunk ranges wanted; the chunks go back on the same
circuit (the tracker bridges them to the requester), a window of them
unacknowledged at a time, then ``transfer_end``. At most ``max_uploads``
run at once; a request past them is answered ``transfer_end`` "busy".
All uploads draw from one ``UploadRate`` (``max_upload_rate``): each chunk,
and each ``transfer_start``, waits for its bytes there before it is sent.

A request with the requester's ``key`` is end to end (§13): the sharer
makes its own ephemeral key, sends ``transfer_start`` (its key and the leaf
row sealed under the transfer key) and waits for it to be taken, then seals
every chunk; the exits see a transfer id, an index and ciphertext.
"""

from __future__ import annotations

import os
from typing import Callable

from twisted.internet import defer
from twisted.logger import Logger

from onion_twisted.peer.circuit import Circuit
from onion_twisted.peer.safe_log import log_unexpected
from onion_twisted.peer.sharing import ShareDirectory
from onion_twisted.peer.upload_rate import UploadRate
from onion_twisted.peer.upload_stream import ChunkProducer, WindowedChunkSender
from onion_twisted.protocol import e2e, merkle
from onion_twisted.protocol.errors import ProtocolError
from onion_twisted.protocol.bridged import (file_chunk_message, sealed_chunk_message, transfer_end_message,
                                           transfer_start_message)
from onion_twisted.protocol.messages import MessageError, is_transfer_id, parse_source_request


class TransferRefused(Exception):
    """The far end answered a chunk with an error: the bridge is gone."""


class Uploader:
    log = Logger()

    def __init__(self, *, clock, circuits, share: ShareDirectory, window: int = 8, window_by_delay: bool = True,
                 stall_timeout: float = 60.0, max_uploads: int = 16,
                 take_reply: Callable[[object], None] = lambda reply: None, unsafe_logging: bool = False,
                 upload_rate: UploadRate | None = None):
        """``take_reply`` gets the tracker's reply to the ``list`` that probes a circuit;
        ``upload_rate``: the cap all uploads share (default: none, bytes only counted);
        ``circuits``: the peer's ``CircuitPool`` (a failed circuit is given back to it)."""
        self.clock = clock
        self.circuits = circuits
        self.share = share
        self.window = window
        self.window_by_delay = window_by_delay  # fewer in flight while the path queues (congestion.py)
        self.stall_timeout = stall_timeout
        self.max_uploads = max_uploads  # uploads served at once; more get transfer_end "busy"
        self.take_reply = take_reply
        self.unsafe_logging = unsafe_logging
        self.upload_rate = upload_rate if upload_rate is not None else UploadRate(clock, 0)
        self.uploads: dict[str, defer.Deferred] = {}
        self._circuit_of: dict[str, Circuit] = {}  # transfer -> the circuit its chunks go back on

    def serve(self, circuit: Circuit, message: dict) -> None:
        transfer = message.get("transfer")
        if not is_transfer_id(transfer) or transfer in self.uploads:
            return  # nothing to answer to, or already under way
        if len(self.uploads) >= self.max_uploads:
            busy = transfer_end_message(transfer, "the sharer is busy; ask again later")
            defer.ensureDeferred(self.send_on(circuit, busy)).addErrback(lambda f: None)
            return
        d = defer.ensureDeferred(self._upload(circuit, transfer, message))
        self.uploads[transfer] = d
        self._circuit_of[transfer] = circuit
        d.addErrback(lambda f: f.trap(ProtocolError, TransferRefused))  # the circuit is rebuilt already
        d.addErrback(lambda f: log_unexpected(self.log, "an upload failed", f, self.unsafe_logging))
        d.addBoth(lambda _: (self.uploads.pop(transfer, None), self._circuit_of.pop(transfer, None)))

    def busy_on(self, circuit: Circuit) -> bool:
        """Whether an upload still sends on ``circuit`` (a replaced circuit drains until not)."""
        return any(c is circuit for c in self._circuit_of.values())

    async def _upload(self, circuit: Circuit, transfer: str, message: dict) -> None:
        try:
            # Checked as strictly as the tracker checks the requester's request.
            request = parse_source_request(message)
            name, chunk_size = request.file, request.chunk_size
            path = self.share.path_of(name)
            ours = self.share.entry(name) or {}
            if request.sha256 is not None and request.sha256 != ours.get("sha256"):
                raise MessageError("refused", "this peer's copy has another content")
            if request.root is not None and request.root != ours.get("root"):
                raise MessageError("refused", "this peer's copy has another content")
            producer = ChunkProducer.open(path, chunk_size, request.chunks, rate=self.upload_rate)
            cipher = None
            try:
                if request.key is not None:
                    cipher, start = self._start_e2e(request, transfer, producer)
            except BaseException:
                producer.stopProducing()
                raise
        except (MessageError, OSError, ValueError) as e:
            detail = getattr(e, "detail", "cannot open the file")
            await self.send_on(circuit, transfer_end_message(transfer, detail))
            return
        size = producer.size

        if cipher is None:
            def send_chunk(index: int, data: bytes):
                message = file_chunk_message(transfer, name, index, chunk_size, size, data)
                return defer.ensureDeferred(self.send_on(circuit, message, refusable=True, chunk_size=chunk_size))
        else:
            def send_chunk(index: int, data: bytes):
                message = sealed_chunk_message(transfer, index, chunk_size, cipher.seal_chunk(index, data))
                return defer.ensureDeferred(self.send_on(circuit, message, refusable=True, chunk_size=chunk_size))

        sender = WindowedChunkSender(send_chunk, window=self.window, clock=self.clock,
                                     ack_timeout=self.stall_timeout * 2, adaptive=self.window_by_delay)
        try:
            if cipher is not None:
                # The requester checks the leaf row before it takes any chunk: it goes first.
                await self.upload_rate.take(len(start))
                # Padded by its length, as a message (§14), not to the chunks' class: a
                # transfer's start and end hide nothing the flow of its chunks shows, and
                # a chunk's worth of padding each cost 2.8 MiB per transfer (docs, 17.4).
                await self.send_on(circuit, start, refusable=True)
            await sender.start(producer)
        except TransferRefused as e:
            producer.stopProducing()
            self.log.info("an upload stopped: {why}", why=str(e))
            return
        except (ProtocolError, defer.TimeoutError, OSError):
            producer.stopProducing()
            return  # the circuit broke or the file went away; the requester asks again for what it lacks
        except BaseException:
            producer.stopProducing()  # cancelled: the file closed, no waiter left at the upload rate
            raise
        await self.send_on(circuit, transfer_end_message(transfer))

    def _start_e2e(self, request, transfer: str, producer: ChunkProducer):
        """The transfer's cipher and its ``transfer_start`` (§13); MessageError when this
        peer cannot serve the file end to end as announced."""
        name = request.file
        if not self.share.unchanged(name, os.fstat(producer.fd)):
            raise MessageError("refused", "the file changed since it was announced")
        leaves = self.share.leaves(name)
        if leaves is None:
            raise MessageError("refused", "the file's leaf row is not ready")
        if len(leaves) // merkle.HASH_SIZE > merkle.MAX_LEAVES:
            raise MessageError("refused", "the file is too large for an end-to-end transfer")
        try:
            key, cipher = e2e.sharer_side(request.key, transfer)
        except e2e.TransferKeyError as e:
            raise MessageError("refused", str(e)) from None
        start = transfer_start_message(transfer, request.chunk_size, key, cipher.seal_leaves(leaves))
        return cipher, start

    async def send_on(self, circuit: Circuit, message: dict | bytes, refusable: bool = False,
                      chunk_size: int | None = None):
        """``message`` (for the bridge) on the circuit the request came on; a ``file_chunk``
        padded on a /2 exit to the class of ``chunk_size``, anything else by its length. A failed
        chunk (``refusable``) may mean only the requester's side is gone: the circuit is
        probed before it is given up; a refused one raises TransferRefused."""
        sending = circuit.send(message, bridged=True, chunk_size=chunk_size)
        del message  # a chunk: not held while its acknowledgement is awaited
        try:
            reply = await sending
        except ProtocolError as e:
            if refusable:
                self.circuits.probe(circuit, self.take_reply)
            else:
                self.circuits.broken(circuit, e.detail)
            raise
        if refusable and isinstance(reply, dict) and reply.get("type") == "error":
            raise TransferRefused(str(reply.get("detail") or reply.get("error")))
        return reply
