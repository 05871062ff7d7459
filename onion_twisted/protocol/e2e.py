"""End-to-end transfer keys and chunk encryption (PROTOCOL.md §13), with no I/O.

The requester puts a fresh X25519 public key ``X`` in its sealed
``request``; the tracker hands it to the sharer inside the sharer's sealed
request; the sharer answers over the bridge with its own fresh ``Y``. Both
derive the transfer key::

    K = HKDF-SHA256(ikm = X25519(x, Y) = X25519(y, X), salt = LABEL,
                    info = LABEL ‖ ":key" ‖ u16 len(T) ‖ T ‖ X ‖ Y, 32 bytes)

and the sharer seals the leaf row and every chunk with AES-256-GCM under K:
the leaf row with the all-zero nonce and AAD ``LABEL ‖ ":leaves" ‖ u16
len(T) ‖ T``; chunk ``I`` with nonce ``0^4 ‖ u64(I + 1)`` and AAD ``LABEL ‖
":chunk" ‖ u16 len(T) ‖ T ‖ u64(I)``, so a chunk cannot be moved to another
place or transfer.
Neither exit sees ``X`` (it crosses the tracker's layer both times), so
neither can derive K: an exit that rewrites a chunk or injects its own is
refused by the tag. Ephemeral keys are injectable for test vectors.
"""

from __future__ import annotations

import hmac

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from onion_twisted.protocol.ntor import raw_public

LABEL = b"onion-http/2 transfer-x25519-aes256gcm-1"
KEY_SIZE = 32
TAG_SIZE = 16
_ZERO = bytes(32)
_LEAVES_NONCE = bytes(12)


class TransferKeyError(ValueError):
    """A transfer key that cannot be made: a public key that is not 32 bytes, or a
    small-order point (all-zero shared secret)."""


class ChunkRefused(ValueError):
    """A sealed chunk or leaf row whose tag does not check: forged, altered or misplaced."""


def new_private() -> x25519.X25519PrivateKey:
    return x25519.X25519PrivateKey.generate()


def public_bytes(private: x25519.X25519PrivateKey) -> bytes:
    return raw_public(private)


def _transfer_field(transfer: str) -> bytes:
    t = transfer.encode("utf-8")
    if len(t) > 0xFFFF:
        raise TransferKeyError("transfer id too long")
    return len(t).to_bytes(2, "big") + t


def transfer_key(private: x25519.X25519PrivateKey, other_public: bytes, transfer: str,
                 requester_public: bytes, sharer_public: bytes) -> bytes:
    """K for ``transfer`` from one side's private key and the other side's public key."""
    if len(other_public) != 32 or len(requester_public) != 32 or len(sharer_public) != 32:
        raise TransferKeyError("an X25519 public key is 32 bytes")
    try:
        shared = private.exchange(x25519.X25519PublicKey.from_public_bytes(bytes(other_public)))
    except ValueError:
        raise TransferKeyError("the key gives an all-zero shared secret") from None
    if hmac.compare_digest(shared, _ZERO):
        raise TransferKeyError("the key gives an all-zero shared secret")
    info = LABEL + b":key" + _transfer_field(transfer) + bytes(requester_public) + bytes(sharer_public)
    return HKDF(hashes.SHA256(), KEY_SIZE, salt=LABEL, info=info).derive(shared)


def chunk_nonce(index: int) -> bytes:
    return bytes(4) + (index + 1).to_bytes(8, "big")


def chunk_aad(transfer: str, index: int) -> bytes:
    return LABEL + b":chunk" + _transfer_field(transfer) + index.to_bytes(8, "big")


def leaves_aad(transfer: str) -> bytes:
    return LABEL + b":leaves" + _transfer_field(transfer)


class TransferCipher:
    """AES-256-GCM under one transfer's key, for its leaf row and its chunks."""

    __slots__ = ("transfer", "_aead", "_prefix")

    def __init__(self, key: bytes, transfer: str):
        self.transfer = transfer
        self._aead = AESGCM(key)
        self._prefix = LABEL + b":chunk" + _transfer_field(transfer)

    def seal_leaves(self, leaves: bytes) -> bytes:
        return self._aead.encrypt(_LEAVES_NONCE, leaves, leaves_aad(self.transfer))

    def open_leaves(self, sealed: bytes) -> bytes:
        try:
            return self._aead.decrypt(_LEAVES_NONCE, sealed, leaves_aad(self.transfer))
        except InvalidTag:
            raise ChunkRefused("the leaf row does not authenticate") from None

    def seal_chunk(self, index: int, data) -> bytes:
        return self._aead.encrypt(chunk_nonce(index), data, self._prefix + index.to_bytes(8, "big"))

    def open_chunk(self, index: int, sealed) -> bytes:
        if not 0 <= index < (1 << 63):
            raise ChunkRefused("chunk index out of range")
        try:
            return self._aead.decrypt(chunk_nonce(index), sealed, self._prefix + index.to_bytes(8, "big"))
        except InvalidTag:
            raise ChunkRefused("the chunk does not authenticate") from None


def sharer_side(requester_public: bytes, transfer: str, *, private=None) -> tuple[bytes, TransferCipher]:
    """The sharer's half: (its public key Y to send, the transfer's cipher)."""
    private = private or new_private()
    y = public_bytes(private)
    return y, TransferCipher(transfer_key(private, requester_public, transfer, requester_public, y), transfer)


def requester_side(private: x25519.X25519PrivateKey, sharer_public: bytes, transfer: str) -> TransferCipher:
    """The requester's half, once the sharer's Y arrived over the bridge."""
    x = public_bytes(private)
    return TransferCipher(transfer_key(private, sharer_public, transfer, x, sharer_public), transfer)
