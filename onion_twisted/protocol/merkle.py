"""The Merkle roots of PROTOCOL.md §13, with no I/O.

A file is cut into 256 KiB pieces (the last one shorter; an empty file is
one empty piece). Its *leaf row* is the SHA-256 of each piece; the row is
padded with zero hashes (32 zero bytes) to a power of two, and each parent
is SHA-256(left ‖ right) up to the *root*, which a /2 sharer announces
(64 lowercase hex digits, as a sha256). BitTorrent v2 builds its piece
layers the same way.

A requester gets the root through the sealed hop and the leaf row from the
sharer; ``check_leaves`` ties the row to the root and the file's size, and
``chunk_matches`` then checks each chunk (a whole number of pieces) before
it is written.
"""

from __future__ import annotations

import hashlib
import hmac

PIECE = 256 * 1024
HASH_SIZE = 32
ZERO_HASH = bytes(HASH_SIZE)
#: A chunk of an end-to-end transfer is 2^k pieces: 256 KiB, 512 KiB, 1, 2 or 4 MiB.
E2E_CHUNK_SIZES = tuple(PIECE << k for k in range(5))
#: The largest leaf row one ``transfer_start`` carries (4 MiB of hashes: a 32 GiB file).
MAX_LEAVES = 1 << 17


class LeafRowError(ValueError):
    """A leaf row that does not belong to the root and size it was checked against."""


def piece_count(size: int) -> int:
    """How many pieces (leaves) a file of ``size`` bytes has: at least one."""
    if size < 0:
        raise ValueError("size must be >= 0")
    return max(1, -(-size // PIECE))


def is_e2e_chunk_size(chunk_size) -> bool:
    return type(chunk_size) is int and chunk_size in E2E_CHUNK_SIZES


def e2e_chunk_size(wanted: int) -> int:
    """The largest chunk size of an end-to-end transfer not above ``wanted`` (at least 256 KiB)."""
    return max([s for s in E2E_CHUNK_SIZES if s <= wanted] or [PIECE])


def leaf_hashes(data) -> bytes:
    """The concatenated SHA-256 of each 256 KiB piece of ``data`` (one leaf for b"")."""
    view = memoryview(data)
    if not view.nbytes:
        return hashlib.sha256(b"").digest()
    return b"".join(hashlib.sha256(view[i:i + PIECE]).digest() for i in range(0, view.nbytes, PIECE))


def root_of(leaves: bytes) -> bytes:
    """The root of a leaf row (concatenated 32-byte hashes, at least one)."""
    if not leaves or len(leaves) % HASH_SIZE:
        raise LeafRowError("a leaf row is a non-empty run of 32-byte hashes")
    level = [leaves[i:i + HASH_SIZE] for i in range(0, len(leaves), HASH_SIZE)]
    width = 1
    while width < len(level):
        width *= 2
    level.extend([ZERO_HASH] * (width - len(level)))
    while len(level) > 1:
        level = [hashlib.sha256(level[i] + level[i + 1]).digest() for i in range(0, len(level), 2)]
    return level[0]


def root_hex(leaves: bytes) -> str:
    return root_of(leaves).hex()


def check_leaves(leaves: bytes, root_hex_digits: str, size: int) -> None:
    """LeafRowError unless ``leaves`` is the row of a ``size``-byte file with that root."""
    if len(leaves) != piece_count(size) * HASH_SIZE:
        raise LeafRowError("the leaf row's length does not fit the file's size")
    if not hmac.compare_digest(root_of(leaves), bytes.fromhex(root_hex_digits)):
        raise LeafRowError("the leaf row does not hash to the file's root")


def chunk_matches(data, index: int, chunk_size: int, leaves: bytes) -> bool:
    """True when ``data`` is all of chunk ``index`` and hashes to its leaves.

    ``chunk_size`` is a multiple of PIECE. A chunk has every piece it covers:
    a whole chunk, or the rest of the file for the last one. Fewer pieces
    (which would leave a hole taken as written), more (bytes written over
    the next chunk) or an index outside the file do not match.
    """
    per_chunk, count = chunk_size // PIECE, len(leaves) // HASH_SIZE
    if chunk_size <= 0 or chunk_size % PIECE or index < 0 or index * per_chunk >= count:
        return False
    first = index * per_chunk
    pieces = min(per_chunk, count - first)
    if piece_count(memoryview(data).nbytes) != pieces:
        return False
    return hmac.compare_digest(leaf_hashes(data), leaves[first * HASH_SIZE:(first + pieces) * HASH_SIZE])


class FileHasher:
    """The sha256 and the leaf row of a file, in one pass over its bytes.

    ``update`` takes the file's bytes in order, in blocks of any size; a
    whole piece is hashed without a copy.
    """

    def __init__(self):
        self.sha256 = hashlib.sha256()
        self._leaves: list[bytes] = []
        self._piece = hashlib.sha256()
        self._filled = 0

    def update(self, data) -> None:
        view = memoryview(data)
        self.sha256.update(view)
        while view.nbytes:
            take = min(PIECE - self._filled, view.nbytes)
            self._piece.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == PIECE:
                self._leaves.append(self._piece.digest())
                self._piece, self._filled = hashlib.sha256(), 0

    def finish(self) -> tuple[str, bytes]:
        """(sha256 hex, leaf row)."""
        if self._filled or not self._leaves:
            self._leaves.append(self._piece.digest())
        return self.sha256.hexdigest(), b"".join(self._leaves)


def hash_file(path, block: int = 1024 * 1024) -> tuple[str, bytes]:
    """(sha256 hex, leaf row) of the file at ``path``, read ``block`` bytes at a time."""
    hasher = FileHasher()
    with open(path, "rb", buffering=0) as f:
        while data := f.read(block):
            hasher.update(data)
    return hasher.finish()
