"""Transfer bookkeeping for peers (PROTOCOL.md §8), with no network I/O.

* ``ChunkMap``: which chunks of a download are on disk, the ranges still
  wanted (the ``chunks`` of a resumed ``request``), serialised beside the
  partial file so a restarted peer asks only for what it lacks.
"""

from __future__ import annotations

#: Most chunks one download may have. The map costs a byte a chunk, and the size comes
#: from the sharer (its ``ls``, its chunks): 2^22 chunks is a 4 MiB map, a file of
#: 1 TiB at the default 256 KiB chunk (64 GiB at 16 KiB, 16 TiB at 4 MiB).
MAX_CHUNKS = 1 << 22


class ChunkMap:
    """The received chunks of one file of ``size`` bytes in ``chunk_size`` chunks."""

    def __init__(self, size: int, chunk_size: int, received: bytes | None = None):
        if size < 0 or chunk_size <= 0:
            raise ValueError("size must be >= 0 and chunk_size > 0")
        self.size = size
        self.chunk_size = chunk_size
        self.count = (size + chunk_size - 1) // chunk_size
        if self.count > MAX_CHUNKS:
            raise ValueError(f"a file of more than {MAX_CHUNKS} chunks")
        self.bits = bytearray(received) if received is not None else bytearray(self.count)
        if len(self.bits) != self.count:
            raise ValueError("record does not match the file's chunk count")
        self.have = len(self.bits) - self.bits.count(0)

    def chunk_length(self, index: int) -> int:
        if not 0 <= index < self.count:
            raise IndexError(index)
        return min(self.chunk_size, self.size - index * self.chunk_size)

    def mark(self, index: int) -> bool:
        """Record chunk ``index``; False if it was already there."""
        if not 0 <= index < self.count:
            raise IndexError(index)  # a negative index would otherwise mark a chunk from the end
        if self.bits[index]:
            return False
        self.bits[index] = 1
        self.have += 1
        return True

    def __contains__(self, index: int) -> bool:
        return 0 <= index < self.count and bool(self.bits[index])

    @property
    def complete(self) -> bool:
        return self.have == self.count

    @property
    def bytes_received(self) -> int:
        if self.complete:
            return self.size
        last = self.count - 1
        full = self.have - (1 if self.count and self.bits[last] else 0)
        return full * self.chunk_size + (self.chunk_length(last) if self.count and self.bits[last] else 0)

    def missing_ranges(self) -> list[list[int]]:
        """Half-open ranges [a, b) of chunk indexes not received yet."""
        ranges, start = [], None
        for i, b in enumerate(self.bits):
            if not b and start is None:
                start = i
            elif b and start is not None:
                ranges.append([start, i])
                start = None
        if start is not None:
            ranges.append([start, self.count])
        return ranges

    # --- the record beside the partial file --------------------------------------------

    def to_record(self) -> dict:
        return {"size": self.size, "chunk_size": self.chunk_size, "received": ranges_of(self.bits)}

    @classmethod
    def from_record(cls, record: dict) -> "ChunkMap":
        """The map a record describes; ValueError for any malformed record."""
        def integer(value) -> int:
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError("record field is not an integer")
            return value

        if not isinstance(record, dict):
            raise ValueError("record is not an object")
        try:
            size, chunk_size, received = record["size"], record["chunk_size"], record["received"]
        except KeyError as e:
            raise ValueError(f"record lacks {e}") from None
        chunk_map = cls(integer(size), integer(chunk_size))
        if not isinstance(received, list):
            raise ValueError("record received is not a list")
        for r in received:
            if not isinstance(r, list) or len(r) != 2:
                raise ValueError("record range is not [first, end)")
            a, b = integer(r[0]), integer(r[1])
            if not 0 <= a < b <= chunk_map.count:
                raise ValueError("record range out of bounds")
            for i in range(a, b):
                chunk_map.mark(i)
        return chunk_map


def ranges_of(bits) -> list[list[int]]:
    """Half-open ranges of the set entries of ``bits``."""
    ranges, start = [], None
    for i, b in enumerate(bits):
        if b and start is None:
            start = i
        elif not b and start is not None:
            ranges.append([start, i])
            start = None
    if start is not None:
        ranges.append([start, len(bits)])
    return ranges


def wanted_indexes(chunks, count: int):
    """The chunk indexes a ``request`` asks for, in order (all when ``chunks`` is None)."""
    if chunks is None:
        yield from range(count)
        return
    seen_end = 0
    for a, b in sorted(chunks):
        for i in range(max(a, seen_end), min(b, count)):
            yield i
        seen_end = max(seen_end, b)


def index_ranges(indexes) -> list[list[int]]:
    """Half-open ranges [a, b) covering the sorted chunk ``indexes`` (a ``request``'s ``chunks``)."""
    ranges: list[list[int]] = []
    for i in indexes:
        if ranges and ranges[-1][1] == i:
            ranges[-1][1] = i + 1
        else:
            ranges.append([i, i + 1])
    return ranges


#: The most one source of several is asked for at once (swarming).
MAX_BLOCK_BYTES = 32 << 20
#: Chunks one endgame request asks of a second source.
ENDGAME_CHUNKS = 2
#: The fewest chunks one source of several is asked for (unless fewer are left): every
#: transfer costs a request, two controls for its bridge, a transfer_start and a transfer_end.
MIN_BLOCK_CHUNKS = 16


class ChunkClaims:
    """Which missing chunks of a download each of its sources was asked for (swarming).

    ``counts[i]``: how many transfers under way asked for chunk ``i``.
    """

    def __init__(self, count: int):
        self.count = count
        self.counts = bytearray(count)

    def take(self, indexes) -> None:
        for i in indexes:
            self.counts[i] += 1

    def give_back(self, indexes) -> None:
        for i in indexes:
            if i < self.count and self.counts[i]:  # claims of a map replaced since are not here
                self.counts[i] -= 1

    def pick(self, chunk_map: ChunkMap, sources: int, endgame: bool, behind=None) -> list[int] | None:
        """Chunk indexes for one more source, or None when there is nothing to ask for.

        With one source, every missing chunk at once. With more, a block of the
        missing chunks nobody asked for yet, smaller as fewer are left (a fast
        source comes back for more sooner, so it brings more), never under
        MIN_BLOCK_CHUNKS while each source can have as many, then the tail
        shared evenly; at the end
        (``endgame``), missing chunks one other source is already bringing: the
        first copy counts. ``behind``, if given, is called then for the only chunks worth
        a copy (those their source would bring later than a fresh request would); an
        empty list says that chunks are owed, none of them behind yet: look again later.
        """
        # Whole-map passes at C speed (a map may have 2^22 chunks, and a download many
        # blocks): a zero byte of ``taken`` is a chunk neither received nor asked for.
        taken = _either(chunk_map.bits, self.counts)
        free_count = taken.count(0)
        if not free_count and endgame:
            # A few at a time: a slow source's copy may still come first, and each one asked
            # twice crosses the network twice. The last of a block first: a source sends its
            # block in order, so those are the furthest from coming.
            once = _either(chunk_map.bits, self.counts.translate(_NOT_ONE))  # zero: asked once, missing
            if once.find(0) < 0:
                return None  # every missing chunk is asked twice already
            picked, end = [], self.count
            worth = behind() if behind is not None else None
            while len(picked) < ENDGAME_CHUNKS and (end := once.rfind(0, 0, end)) >= 0:
                if worth is None or end in worth:
                    picked.append(end)
            return sorted(picked)
        if not free_count:
            return None
        if sources <= 1:
            block = free_count
        elif free_count < sources * MIN_BLOCK_CHUNKS:
            block = -(-free_count // sources)  # the tail, shared evenly
        else:
            block = max(MIN_BLOCK_CHUNKS,
                        min(free_count // (2 * sources), MAX_BLOCK_BYTES // chunk_map.chunk_size))
        free, i = [], -1
        while len(free) < block and (i := taken.find(0, i + 1)) >= 0:
            free.append(i)
        return free


_NOT_ONE = bytes(0 if n == 1 else 1 for n in range(256))  # counts.translate: zero where asked once


def _either(a, b) -> bytes:
    """Byte by byte, zero where both ``a`` and ``b`` are zero (equal lengths)."""
    n = len(a)
    return (int.from_bytes(a, "big") | int.from_bytes(b, "big")).to_bytes(n, "big")
