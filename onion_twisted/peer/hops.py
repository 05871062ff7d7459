"""The peer's crypto per hop of a circuit (PROTOCOL.md §2, §11, §12, §14), with no I/O.

A circuit mixes two kinds of hop: a /1 hop's layer is a ``crypto.Layer``
(an RSA-sealed session key, random nonces, the nonces seen kept in a set),
a /2 hop's an ``onion2.HopKeys`` (ntor, counted layers with a replay
window); the tracker as the sealed last hop is a /2 hop too.

The frame helpers write and read the exit frame of §12 with at most one
copy of a chunk's bytes: a 4 MiB chunk is padded and framed in one buffer,
and read back with a single slice.
"""

from __future__ import annotations

from onion_twisted.protocol import cells, crypto, ntor, onion2
from onion_twisted.protocol.errors import BadRequest, Conflict

V1 = "onion-http/1"
V2 = "onion-http/2"


def start_handshake(entry, *, member: bytes | None = None, onion_key: bytes | None = None):
    """(pending, what CREATE or the EXTEND's ``relay`` carries) for a node's entry:
    ntor when it has an onion key (§10, §11), else an RSA-sealed session key (§2).
    With ``member`` and ``onion_key`` (no entry): ntor with the tracker (§12)."""
    if entry is None:
        return ntor.client_start(member, onion_key)
    if entry.speaks_v2:
        return ntor.client_start(bytes.fromhex(entry.fingerprint), entry.onion_key)
    session_key = crypto.new_session_key()
    sealed = crypto.seal_session_key(crypto.load_public_key_pem(entry.public_key_pem), session_key)
    return crypto.Layer(session_key), sealed


def finish_handshake(pending, data: bytes):
    """The hop's layer from its answer, checked before the hop is used: ``Y ‖ AUTH``
    for /2 (BadRequest if AUTH does not check), its backward layer over ``created`` for /1."""
    if isinstance(pending, ntor.ClientHandshake):
        return pending.finish(data)
    _, plaintext = pending.peel(data, crypto.BACKWARD)
    if plaintext != cells.CREATED:
        raise BadRequest("answered something other than created")
    return pending


def is_v2(layer) -> bool:
    return isinstance(layer, onion2.HopKeys)


def wrap(layers, plaintext: bytes) -> bytes:
    """E_X(E_Y(E_Z(m))) for hops [X, Y, Z]."""
    for layer in reversed(layers):
        plaintext = layer.seal_forward(plaintext) if is_v2(layer) else layer.wrap(plaintext, crypto.FORWARD)
    return plaintext


def peel(layers, nonces, data: bytes, max_nonces: int) -> bytes:
    """Remove the backward layers of ``layers`` in order (§4.3, §11).

    A /1 hop's nonces are remembered only once every layer opened and none
    was a replay, so a refused cell leaves the sets as they were. A /2 layer
    is counted in its window as it opens (``HopKeys``): only that hop could
    have made it, and its counter is spent either way.
    """
    seen = []
    for layer, known in zip(layers, nonces):
        if is_v2(layer):
            data = layer.open_backward(data)
            continue
        nonce, data = layer.peel(data, crypto.BACKWARD)
        if nonce in known:
            raise Conflict("replayed backward layer")
        if len(known) >= max_nonces:
            raise Conflict("circuit used up its nonce budget; build a new circuit")
        seen.append((known, nonce))
    for known, nonce in seen:
        known.add(nonce)
    return data


# --- padding and the exit frame (§12, §14) ---------------------------------------------------------

def padded(body: bytes, *, chunk_size: int | None = None, kind: int | None = None) -> bytearray:
    """``onion2.pad_message(body)``, preceded by the frame kind if given, built in one buffer."""
    size = onion2.padded_size(len(body))
    if chunk_size is not None:
        size = max(size, onion2.chunk_class(chunk_size))
    head = 0 if kind is None else 1
    buffer = bytearray(head + size)  # zeros: the padding is already there
    if kind is not None:
        buffer[0] = kind
    buffer[head:head + 4] = len(body).to_bytes(4, "big")
    buffer[head + 4:head + 4 + len(body)] = body
    return buffer


def read_padded(data: bytes, start: int = 0) -> bytes:
    """``onion2.unpad(data[start:])`` without copying the padding: one slice of the body."""
    if len(data) - start < 4:
        raise BadRequest("padded message is shorter than its length field")
    length = int.from_bytes(data[start:start + 4], "big")
    end = start + 4 + length
    if end > len(data):
        raise BadRequest("padded message's length exceeds its size")
    if data.count(0, end) != len(data) - end:
        raise BadRequest("padding bytes are not zero")
    return data[start + 4:end]


def read_frame(data: bytes) -> tuple[int, bytes]:
    """(kind, body) of an exit frame; an OBJECT's body comes unpadded, a SEALED one as it is."""
    if not data:
        raise BadRequest("empty exit frame")
    kind = data[0]
    if kind == onion2.FRAME_OBJECT:
        return kind, read_padded(data, 1)
    if kind == onion2.FRAME_SEALED:
        return kind, data[1:]
    raise BadRequest("unknown exit frame kind")
