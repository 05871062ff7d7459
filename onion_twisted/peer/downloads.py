"""A peer's downloads on disk (PROTOCOL.md §8, §13): partial files, their records,
chunks checked and written, and the atomic move into the downloads directory.

``<downloads>/.partial/NAME.part`` holds the chunks at their offsets;
``NAME.json`` records size, chunk size, sha256, root, the chunks received
and whether each was checked against the root (``verified``), so a
restarted peer asks only for what it lacks. An end-to-end chunk (§13) is
written only after its tag and its leaves checked; a file appears under
its name only after its sha256 matched, by one rename. A download's state
moves only by the named transitions of ``download_state``; its transfers
(one per source) are ``transfer.Transfer``; the directory is
``download_store.DownloadStore``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from twisted.internet import defer, threads

from onion_twisted.protocol import e2e, merkle, wire
from onion_twisted.protocol.chunks import ChunkClaims, ChunkMap
from onion_twisted.peer.download_state import (DONE, FAILED, QUEUED, TRANSITIONS, BadChunk, DownloadState,
                                               IllegalTransition, SourceLied, SourceStats)
from onion_twisted.peer.transfer import Transfer
from onion_twisted.net.files import atomic_write, sha256_file

if TYPE_CHECKING:
    from onion_twisted.peer.download_store import DownloadStore

# A name may have 255 bytes, and the record's temporary file (atomic_write's
# ".NAME.json.XXXXXXXX.tmp") must fit in a file name too: the partial files of
# longer names are .partial/long/SHA256-OF-NAME.part, .json.
MAX_STEM = 255 - len("." + ".json" + ".XXXXXXXX.tmp")
MAX_SOURCES = 32  # sources (transfers) a download remembers for its page


class Download:
    """One file being fetched: its chunk map, its partial file, its state."""

    def __init__(self, store: "DownloadStore", name: str, sha256: str | None, chunk_size: int,
                 root: str | None = None):
        self.store = store
        self.name = name
        self.sha256 = sha256
        self.root = root
        self.chunk_size = chunk_size
        self.size: int | None = None
        self.chunks: ChunkMap | None = None
        self._state = QUEUED
        self.error: str | None = None
        self.attempts = 0
        self.transfers: list[Transfer] = []  # this attempt's, one per source asked
        self.claims: ChunkClaims | None = None  # which missing chunks each of them was asked for
        self.ended: dict[str, None] = {}       # ids of its transfers over (their late end is no orphan)
        self.final_path: Path | None = None
        self.bytes_this_run = 0
        self.unverified = False
        self._fd: int | None = None
        self._unsaved = 0
        self.samples: list[tuple[float, int]] = []  # (time, bytes) for the speed shown
        # §13: whether its transfers were end to end (None: none yet; False once one was not),
        # and the file's leaf row once a transfer_start's checked out.
        self.e2e: bool | None = None
        self.leaves: bytes | None = None
        self.verified = True               # every chunk on disk was checked against the root
        self.sources: dict[str, SourceStats] = {}
        self.excluded: list[str] = []      # transfers whose sources are not to be asked again

    # --- the lifecycle ------------------------------------------------------------------

    @property
    def state(self) -> DownloadState:
        return self._state

    def _check(self, transition: str) -> DownloadState:
        sources, to = TRANSITIONS[transition]
        if self._state not in sources:
            raise IllegalTransition(f"{transition}: a {self._state.value} download cannot become {to.value}")
        return to

    def _move(self, transition: str) -> None:
        self._state = self._check(transition)

    def start_request(self) -> None:
        """A new attempt asks the tracker: what the last one's transfers left is forgotten."""
        self._move("start_request")
        self.attempts += 1
        self.end_transfers("a new attempt began")
        self.transfers = []
        self.claims = None

    def fail(self, reason: str) -> None:
        """The download ends without its file: ``reason`` is shown to the user."""
        self._move("fail")
        self.error = reason

    def requeue(self) -> None:
        """This attempt ended; a later one tries again."""
        self._move("requeue")

    def restart(self) -> None:
        """A failed download queued again (the user's retry), keeping its chunks."""
        self._move("restart")
        self.attempts, self.error = 0, None

    def attempt_failed(self, why: str, fruitless: int, max_attempts: int) -> None:
        """An attempt ended short (the ``fruitless``-th in a row that brought nothing, or 0)."""
        self.error = f"attempt {fruitless} of {max_attempts}: {why}" if fruitless else f"going on after: {why}"

    # --- this attempt's transfers ------------------------------------------------------

    def new_transfer(self, claimed: list[int] | None) -> Transfer:
        """A request to one more source, for the chunk indexes ``claimed`` (None: all missing)."""
        t = Transfer(claimed)
        if claimed is not None:
            self.claims.take(claimed)
        self.transfers.append(t)
        return t

    def release(self, t: Transfer) -> None:
        """``t`` is over: what it claimed and did not bring is free for another source."""
        if t.transfer is not None:
            self.ended[t.transfer] = None
            if len(self.ended) > MAX_SOURCES:
                del self.ended[next(iter(self.ended))]
        if t in self.transfers:
            self.transfers.remove(t)
            if t.claimed is not None and self.claims is not None:
                self.claims.give_back(t.claimed)

    def end_transfers(self, outcome: str) -> None:
        for t in list(self.transfers):
            t.end(outcome)

    def find_transfer(self, transfer) -> Transfer | None:
        """This attempt's transfer a chunk or end of ``transfer`` belongs to."""
        return next((t for t in self.transfers if t.matches(transfer)), None)

    def claim(self, sources: int, endgame: bool, behind=None) -> list[int] | None:
        """Chunk indexes for one more source (``ChunkClaims.pick``), or None: nothing to ask for."""
        if self.chunks is None:
            return None
        if self.claims is None or self.claims.count != self.chunks.count:
            self.claims = ChunkClaims(self.chunks.count)
        return self.claims.pick(self.chunks, sources, endgame, behind)

    def taken_e2e(self, end_to_end: bool) -> None:
        """The tracker's reply for one transfer: was it end to end (§13)?"""
        self.e2e = end_to_end if self.e2e is None else (self.e2e and end_to_end)

    def source(self, transfer: str, end_to_end: bool = False) -> SourceStats:
        """What the source of ``transfer`` sent this download (kept for the last MAX_SOURCES)."""
        stats = self.sources.get(transfer)
        if stats is None:
            if len(self.sources) >= MAX_SOURCES:
                del self.sources[next(iter(self.sources))]
            stats = self.sources[transfer] = SourceStats(transfer, end_to_end)
        return stats

    def exclude(self, transfer: str) -> None:
        """The source of ``transfer`` is not asked again for this file (its transfer id,
        all this peer knows of it, goes in the next request's ``exclude``)."""
        self.source(transfer).excluded = True
        if transfer not in self.excluded:
            self.excluded.append(transfer)
            del self.excluded[:-64]  # messages.MAX_EXCLUDED: the newest count

    # --- paths ----------------------------------------------------------------------

    @property
    def _stem(self) -> str:
        encoded = self.name.encode("utf-8", "surrogatepass")
        if len(encoded) <= MAX_STEM:
            return self.name
        return "long/" + hashlib.sha256(encoded).hexdigest()

    @property
    def part_path(self) -> Path:
        return self.store.partial_dir / (self._stem + ".part")

    @property
    def record_path(self) -> Path:
        return self.store.partial_dir / (self._stem + ".json")

    @property
    def bytes(self) -> int:
        if self.state == DONE and self.size is not None:
            return self.size
        return self.chunks.bytes_received if self.chunks else 0

    def status(self, now: float) -> dict:
        return {"file": self.name, "state": self.state.value, "bytes": self.bytes, "size": self.size,
                "sha256": self.sha256, "error": self.error, "attempts": self.attempts,
                "speed": self.speed(now), "unverified": self.unverified,
                "path": self.final_path.name if self.final_path else None,
                "bytes_this_run": self.bytes_this_run,  # chunk bytes written since this process started
                "root": self.root, "e2e": self.e2e, "transfers": len(self.transfers),  # sources asked now
                "sources": [s.status() for s in self.sources.values()]}

    def speed(self, now: float) -> float:
        recent = [(t, n) for t, n in self.samples if now - t <= 5]
        self.samples = recent
        if len(recent) < 2:
            return 0.0
        span = max(now - recent[0][0], 1e-3)
        return sum(n for _, n in recent[1:]) / span

    # --- receiving ----------------------------------------------------------------------

    def expect(self, size: int | None, chunk_size: int, sha256: str | None, root: str | None = None) -> None:
        """What the tracker's ``transfer`` reply (or a first chunk) says of the file."""
        if sha256 and not self.sha256:
            self.sha256 = sha256
        if root is not None and root != self.root:
            if self.root is not None:
                self.discard_partial()  # another content than the partial file's
            self.root = root
        if size is None:
            return
        if self.chunks is not None and (self.chunks.size != size or self.chunks.chunk_size != chunk_size):
            # Another content or chunking than the partial file: start over.
            self.discard_partial()
        if self.chunks is None:
            self.size = size
            self.chunk_size = chunk_size
            self.chunks = ChunkMap(size, chunk_size)
            self.save_record()

    def write_chunk(self, message: dict, now: float, t: Transfer | None = None) -> bool:
        """Write one §8 ``file_chunk`` (of ``t``) at its offset; False if it was a duplicate."""
        self._check("receive")  # before anything is written
        index = message.get("chunk_idx")
        size = message.get("size")
        chunk_size = message.get("chunk_size")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (index, size, chunk_size)):
            raise BadChunk("chunk_idx, size and chunk_size must be integers")
        if chunk_size != self.chunk_size and self.chunks is not None:
            raise BadChunk("chunk_size differs from the transfer's")
        if size < 0 or chunk_size <= 0:
            raise BadChunk("bad size or chunk_size")
        if self.chunks is not None and size != self.chunks.size:
            raise BadChunk("size differs from the transfer's")  # dropped: it must not replace the map
        try:
            self.expect(size, chunk_size, None)
        except ValueError as e:
            raise BadChunk(str(e)) from None
        if not 0 <= index < self.chunks.count:
            raise BadChunk("chunk_idx out of range")
        try:
            data = wire.b64decode(message.get("data"), "data")
        except Exception:
            raise BadChunk("data is not base64") from None
        if len(data) != self.chunks.chunk_length(index):
            raise BadChunk("chunk has the wrong length")
        if t is not None:
            t.heard(now)  # a copy another source brought first still shows this one is alive
        if index in self.chunks:
            return False
        self.verified = False  # §8: checked only when the file is whole
        if t is not None:
            t.chunks += 1
            if isinstance(message.get("transfer"), str):
                self.source(message["transfer"]).took(len(data), now)
        return self._write(index, data, now)

    # --- §13: end to end -----------------------------------------------------------------

    def begin_e2e(self, t: Transfer, cipher: e2e.TransferCipher, leaves: bytes, chunk_size: int) -> None:
        """The sharer's leaf row, opened under ``t``'s key: checked against the root and
        size before any chunk is taken. SourceLied when it does not match."""
        self._check("receive")
        try:
            merkle.check_leaves(leaves, self.root, self.size)
        except merkle.LeafRowError as e:
            raise SourceLied(str(e)) from None
        if chunk_size != self.chunk_size or not merkle.is_e2e_chunk_size(chunk_size):
            raise SourceLied("the transfer's chunk size is not the one asked for")
        size = self.size
        if self.chunks is not None and self.chunks.have and not self.verified:
            self.discard_partial()  # chunks of an unchecked transfer: only checked ones are kept
        self.verified = True
        self.expect(size, chunk_size, None)
        self.leaves = leaves
        t.cipher, t.pending_start = cipher, None

    def write_sealed_chunk(self, t: Transfer, chunk, now: float) -> bool:
        """Open, check and write one §13 chunk (``bridged.SealedChunk``); False for a duplicate.

        BadChunk (counted ``refused``) for one whose tag does not check: it was
        altered or forged on the way. SourceLied (counted ``mismatched``) for one
        that authenticates but is not the file's bytes.
        """
        self._check("receive")
        stats = self.source(chunk.transfer, end_to_end=True)
        try:
            if chunk.chunk_size != self.chunk_size:
                raise e2e.ChunkRefused("the chunk's size is not the transfer's")
            data = t.cipher.open_chunk(chunk.chunk_idx, chunk.data)
        except e2e.ChunkRefused as e:
            stats.refused += 1
            t.refused += 1
            raise BadChunk(str(e)) from None
        t.heard(now)
        index = chunk.chunk_idx
        if (not 0 <= index < self.chunks.count or len(data) != self.chunks.chunk_length(index)
                or not merkle.chunk_matches(data, index, self.chunk_size, self.leaves)):
            stats.mismatched += 1
            raise SourceLied("a chunk does not match the file's root")
        if index in self.chunks:
            return False
        stats.took(len(data), now)
        t.chunks += 1
        return self._write(index, data, now)

    def _write(self, index: int, data: bytes, now: float) -> bool:
        os.pwrite(self._open(), data, index * self.chunk_size)
        self.chunks.mark(index)
        self.bytes_this_run += len(data)
        self.samples.append((now, len(data)))
        self._move("receive")
        self._unsaved += 1
        if self._unsaved >= 32:
            self.save_record()
        return True

    def _open(self) -> int:
        if self._fd is None:
            self.part_path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.part_path, os.O_RDWR | os.O_CREAT, 0o600)
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def save_record(self) -> None:
        """The chunks on disk, written after the data (fsync first) so a crash loses none."""
        if self.chunks is None:
            return
        if self._fd is not None:
            os.fsync(self._fd)
        record = dict(self.chunks.to_record(), file=self.name, sha256=self.sha256, root=self.root,
                      verified=self.verified)
        if self.state == FAILED:
            record["failed"] = self.error
        self.record_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.record_path, wire.dumps(record))
        self._unsaved = 0

    def discard_partial(self) -> None:
        self.close()
        for path in (self.part_path, self.record_path):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        self.chunks = None
        self.size = None
        self.verified = True

    # --- the end ---------------------------------------------------------------------------

    def finish(self, run_in_thread=threads.deferToThread) -> defer.Deferred:
        """Verify the sha256 off the reactor, then move the file into place.

        Fires with True when the file is in place, False when it did not match
        (the partial file is then deleted: nothing wrong is kept).
        """
        self._move("verify")
        self.save_record()
        self.close()
        if not self.part_path.exists():
            self.part_path.parent.mkdir(parents=True, exist_ok=True)
            self.part_path.touch(mode=0o600)
        d = run_in_thread(sha256_file, self.part_path)
        d.addCallback(self._verified)
        return d

    def _verified(self, digest: str) -> bool:
        if self.sha256 is not None and digest != self.sha256:
            self.discard_partial()
            self.requeue()
            return False
        if self.sha256 is None:
            self.sha256 = digest
            self.unverified = True  # announced by name only: nothing to check against
        self.final_path = self.store.place(self.part_path, self.name, digest)
        try:
            self.record_path.unlink()
        except FileNotFoundError:
            pass
        self._move("done")
        self.error = None
        return True

