"""Onion layers of onion-http/2 (PROTOCOL.md §11, §12, §14), with no I/O.

* A layer is ``counter(8) ‖ AES-128-GCM(key, nonce, plaintext, AAD)``; the
  nonce is the direction's 12-byte base XOR the counter (as TLS 1.3 does),
  so a nonce is never sent and never repeats under one key.
* A receiver keeps a sliding window of 1 024 counters per direction (as
  IPsec and WireGuard do): a counter seen before, or older than the window,
  is a replay (409). The state is a few words whatever the traffic, where
  /1 kept every nonce seen.
* Padding hides a message's length in a few classes; the exit frame tells an
  exit whether its plaintext is an object for it or the tracker's sealed layer.
"""

from __future__ import annotations

import math

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from onion_twisted.protocol.errors import BadRequest, Conflict

FORWARD = b"onion-http/2 forward"
BACKWARD = b"onion-http/2 backward"
COUNTER_SIZE = 8
TAG_SIZE = 16
OVERHEAD = COUNTER_SIZE + TAG_SIZE
WINDOW = 1024
MAX_COUNTER = (1 << 64) - 2  # 2^64-1 is never sent

FRAME_OBJECT = 0x01  # pad(JSON object): for the exit itself, or from the tracker / a bridge
FRAME_SEALED = 0x02  # one layer of the tracker hop, which the exit cannot open
DESTROY = b'{"type":"destroy"}'

_SMALL_CLASS = 1024
_LARGE_STEP = 65536
_CHUNK_FIELDS_ROOM = 2048


def _nonce(base: bytes, counter: int) -> bytes:
    return (int.from_bytes(base, "big") ^ counter).to_bytes(12, "big")


class ReplayWindow:
    """The counters of one direction: the highest seen and a bitmap of the 1 024 below it."""

    __slots__ = ("highest", "bits")

    def __init__(self):
        self.highest = -1
        self.bits = 0  # bit i set: counter highest - i was seen

    def check(self, counter: int) -> None:
        """Conflict if ``counter`` was seen or is older than the window; changes nothing."""
        if counter > self.highest:
            return
        offset = self.highest - counter
        if offset >= WINDOW:
            raise Conflict("layer counter too old (outside the replay window)")
        if self.bits >> offset & 1:
            raise Conflict("replayed layer counter")

    def mark(self, counter: int) -> None:
        if counter > self.highest:
            shift = counter - self.highest
            self.bits = ((self.bits << shift) | 1) & ((1 << WINDOW) - 1) if shift < WINDOW else 1
            self.highest = counter
        else:
            self.bits |= 1 << (self.highest - counter)


class HopKeys:
    """One hop's keys after the handshake: a key, a nonce base, a counter and a window per direction.

    The peer seals forward and opens backward; the hop (a node, or the
    tracker as the sealed last hop) opens forward and seals backward. An
    open that fails (no authentication, replay) changes no state. Keys are
    kept as bytes: an ``AESGCM`` object would hold ~2.4 KiB of OpenSSL state
    for every idle circuit (see crypto.Layer).
    """

    __slots__ = ("_kf", "_kb", "_nf", "_nb", "_sent_f", "_sent_b", "_seen_f", "_seen_b")

    def __init__(self, forward_key: bytes, backward_key: bytes, forward_base: bytes, backward_base: bytes):
        if len(forward_key) != 16 or len(backward_key) != 16 or len(forward_base) != 12 or len(backward_base) != 12:
            raise ValueError("keys are 16 bytes, nonce bases 12")
        self._kf, self._kb, self._nf, self._nb = forward_key, backward_key, forward_base, backward_base
        self._sent_f = self._sent_b = 0
        self._seen_f = self._seen_b = None  # windows made on first use: an idle hop holds none

    # forward: towards the tracker
    def seal_forward(self, plaintext: bytes) -> bytes:
        counter = self._sent_f
        self._sent_f = _next(counter)
        return _seal(self._kf, self._nf, counter, plaintext, FORWARD)

    def open_forward(self, layer: bytes) -> bytes:
        if self._seen_f is None:
            self._seen_f = ReplayWindow()
        return _open(self._kf, self._nf, self._seen_f, layer, FORWARD)

    # backward: towards the peer
    def seal_backward(self, plaintext: bytes) -> bytes:
        counter = self._sent_b
        self._sent_b = _next(counter)
        return _seal(self._kb, self._nb, counter, plaintext, BACKWARD)

    def open_backward(self, layer: bytes) -> bytes:
        if self._seen_b is None:
            self._seen_b = ReplayWindow()
        return _open(self._kb, self._nb, self._seen_b, layer, BACKWARD)


def _next(counter: int) -> int:
    if counter >= MAX_COUNTER:
        raise Conflict("circuit used up its layer counters; build a new circuit")
    return counter + 1


def _seal(key: bytes, base: bytes, counter: int, plaintext: bytes, aad: bytes) -> bytes:
    head = counter.to_bytes(COUNTER_SIZE, "big")
    return head + AESGCM(key).encrypt(_nonce(base, counter), plaintext, aad)


def _open(key: bytes, base: bytes, window: ReplayWindow, layer: bytes, aad: bytes) -> bytes:
    if len(layer) < OVERHEAD:
        raise BadRequest("layer is shorter than counter and tag")
    counter = int.from_bytes(layer[:COUNTER_SIZE], "big")
    window.check(counter)  # cheap refusal first; marked only once the layer authenticates
    try:
        plaintext = AESGCM(key).decrypt(_nonce(base, counter), memoryview(layer)[COUNTER_SIZE:], aad)
    except InvalidTag:
        raise BadRequest("layer does not decrypt with the circuit's key") from None
    window.mark(counter)
    return plaintext


# --- padding (§14) ---------------------------------------------------------------------------

def padded_size(length: int) -> int:
    """The class of a body of ``length`` bytes (+4 for its length): 1 KiB·2^k up to
    64 KiB, then whole multiples of 64 KiB."""
    need = length + 4
    if need <= _LARGE_STEP:
        size = _SMALL_CLASS
        while size < need:
            size *= 2
        return size
    return -(-need // _LARGE_STEP) * _LARGE_STEP


def chunk_class(chunk_size: int) -> int:
    """The padded size of every ``file_chunk`` message of a transfer with this chunk size."""
    return padded_size(4 * math.ceil(chunk_size / 3) + _CHUNK_FIELDS_ROOM)


def pad(body: bytes, size: int) -> bytes:
    """``u32 len ‖ body ‖ zeros`` of exactly ``size`` bytes."""
    if len(body) + 4 > size:
        raise ValueError("body does not fit its padding class")
    return len(body).to_bytes(4, "big") + body + bytes(size - 4 - len(body))


def pad_message(body: bytes, *, chunk_size: int | None = None) -> bytes:
    """Pad a message to its class; a file chunk to its transfer's chunk class."""
    size = padded_size(len(body))
    if chunk_size is not None:
        size = max(size, chunk_class(chunk_size))
    return pad(body, size)


def unpad(data: bytes) -> bytes:
    if len(data) < 4:
        raise BadRequest("padded message is shorter than its length field")
    length = int.from_bytes(data[:4], "big")
    if length > len(data) - 4:
        raise BadRequest("padded message's length exceeds its size")
    tail = memoryview(data)[4 + length:]
    if tail.nbytes and any(tail.tobytes()):
        raise BadRequest("padding bytes are not zero")
    return bytes(memoryview(data)[4:4 + length])


# --- the exit frame (§12) ------------------------------------------------------------------

def frame(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + body


def parse_frame(data: bytes) -> tuple[int, bytes]:
    """(kind, body) of an exit frame; BadRequest for an empty one or an unknown kind."""
    if not data:
        raise BadRequest("empty exit frame")
    kind = data[0]
    if kind not in (FRAME_OBJECT, FRAME_SEALED):
        raise BadRequest("unknown exit frame kind")
    return kind, bytes(memoryview(data)[1:])
