"""What crosses a bridge (PROTOCOL.md §8, §13), with no I/O: the sharer's messages
to the requester, which the two exits pass on by their ``transfer``.

* §8: ``file_chunk`` naming the file, with its bytes, and ``transfer_end``;
* §13: ``transfer_start`` (the sharer's ephemeral key and the sealed leaf
  row), the sealed ``file_chunk`` (a transfer, an index and ciphertext, no
  file name: ``is_sealed_chunk`` tells the two apart) and ``transfer_end``
  with the chunk size it is padded to.

Each with its verifying parser and its builder, as in ``messages``.
"""

from __future__ import annotations

from dataclasses import dataclass

from onion_twisted.protocol import wire
from onion_twisted.protocol.merkle import is_e2e_chunk_size
# The field checks are §8's, shared with the tracker's messages.
from onion_twisted.protocol.messages import (FILE_CHUNK, MAX_SIZE, TRANSFER_END, TRANSFER_START, MessageError,
                                            _chunk_size, _is_integer, _is_size, _transfer_id, check_name)


# --- file_chunk, transfer_end: the sharer's, over the bridge ---------------------------------

@dataclass(frozen=True, slots=True)
class FileChunk:
    transfer: str
    file: str
    chunk_idx: int
    chunk_size: int
    size: int
    data: bytes


def parse_file_chunk(message: dict) -> FileChunk:
    """A chunk's fields; whether it fits the download (its length, its index) is the requester's check."""
    transfer = _transfer_id(message)
    name = check_name(message.get("file"))
    index, size = message.get("chunk_idx"), message.get("size")
    if not _is_integer(index) or not 0 <= index:
        raise MessageError("bad_request", "file_chunk: chunk_idx is not a non-negative integer")
    if not _is_size(size):
        raise MessageError("bad_request", "file_chunk: size is not a non-negative integer")
    if message.get("chunk_size") is None:  # no default here: the chunk was cut at its own size
        raise MessageError("bad_request", "file_chunk: missing field chunk_size")
    chunk_size = _chunk_size(message)
    try:
        data = wire.b64decode(message.get("data"), "data")  # bytes already when decoded in passing
    except Exception:
        raise MessageError("bad_request", "file_chunk: data is not base64") from None
    return FileChunk(transfer, name, index, chunk_size, size, data)


def file_chunk_message(transfer: str, file: str, chunk_idx: int, chunk_size: int, size: int, data: bytes) -> bytes:
    """The JSON of a ``file_chunk``, its base64 spliced in (``wire.with_base64``)."""
    return wire.with_base64({"type": FILE_CHUNK, "transfer": transfer, "file": file, "chunk_idx": chunk_idx,
                             "chunk_size": chunk_size, "size": size}, "data", data)


@dataclass(frozen=True, slots=True)
class TransferEnd:
    transfer: str
    ok: bool
    detail: str | None = None


def parse_transfer_end(message: dict) -> TransferEnd:
    transfer = _transfer_id(message)
    status = message.get("status")
    if status not in ("ok", "error"):
        raise MessageError("bad_request", "transfer_end: status is neither ok nor error")
    detail = message.get("detail")
    if detail is not None and not isinstance(detail, str):
        raise MessageError("bad_request", "transfer_end: detail is not a string")
    return TransferEnd(transfer, status == "ok", detail)


def transfer_end_message(transfer: str, error: str | None = None, chunk_size: int | None = None) -> dict:
    """``status`` ``ok``, or ``error`` with ``error`` as its detail. ``chunk_size`` (§13,
    /2 sharers): the requester's exit pads the end to the chunks' class, as the sharer did."""
    message = {"type": TRANSFER_END, "transfer": transfer}
    if chunk_size is not None:
        message["chunk_size"] = chunk_size
    if error is None:
        message["status"] = "ok"
    else:
        message["status"], message["detail"] = "error", error
    return message


# --- §13: end-to-end transfers over the bridge -------------------------------------------------

@dataclass(frozen=True, slots=True)
class TransferStart:
    transfer: str
    chunk_size: int
    key: bytes      # the sharer's ephemeral X25519 public key
    leaves: bytes   # the leaf row, sealed under the transfer key


def parse_transfer_start(message: dict) -> TransferStart:
    transfer = _transfer_id(message)
    chunk_size = message.get("chunk_size")
    if not is_e2e_chunk_size(chunk_size):
        raise MessageError("bad_request", "transfer_start: chunk_size is not 256 KiB times a power of two")
    try:
        key = wire.b64decode(message.get("key"), "key")
        leaves = wire.b64decode(message.get("leaves"), "leaves")
    except Exception:
        raise MessageError("bad_request", "transfer_start: key or leaves is not base64") from None
    if len(key) != 32:
        raise MessageError("bad_request", "transfer_start: key is not 32 bytes")
    return TransferStart(transfer, chunk_size, key, leaves)


def transfer_start_message(transfer: str, chunk_size: int, key: bytes, sealed_leaves: bytes) -> bytes:
    return wire.with_base64({"type": TRANSFER_START, "transfer": transfer, "chunk_size": chunk_size,
                             "key": wire.b64encode(key)}, "leaves", sealed_leaves)


@dataclass(frozen=True, slots=True)
class SealedChunk:
    transfer: str
    chunk_idx: int
    chunk_size: int
    data: bytes  # AES-GCM ciphertext and tag


def is_sealed_chunk(message: dict) -> bool:
    """A §13 chunk names no file: that is how it differs from §8's."""
    return "file" not in message


def parse_sealed_chunk(message: dict) -> SealedChunk:
    transfer = _transfer_id(message)
    index, chunk_size = message.get("chunk_idx"), message.get("chunk_size")
    if not _is_integer(index) or not 0 <= index < MAX_SIZE:
        raise MessageError("bad_request", "file_chunk: chunk_idx is not a non-negative integer")
    if not is_e2e_chunk_size(chunk_size):
        raise MessageError("bad_request", "file_chunk: chunk_size is not 256 KiB times a power of two")
    try:
        data = wire.b64decode(message.get("data"), "data")
    except Exception:
        raise MessageError("bad_request", "file_chunk: data is not base64") from None
    return SealedChunk(transfer, index, chunk_size, data)


def sealed_chunk_message(transfer: str, chunk_idx: int, chunk_size: int, sealed: bytes) -> bytes:
    """A §13 ``file_chunk``: transfer, index and the chunk's class, nothing of the file."""
    return wire.with_base64({"type": FILE_CHUNK, "transfer": transfer, "chunk_idx": chunk_idx,
                             "chunk_size": chunk_size}, "data", sealed)
