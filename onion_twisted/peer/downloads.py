"""A peer's downloads on disk (PROTOCOL.md §8): partial files, their records,
verification and the atomic move into the downloads directory.

Layout: ``<downloads>/.partial/NAME.part`` holds the chunks written at their
offsets; ``NAME.json`` beside it records size, chunk size, sha256 and the
chunks received, so a restarted peer asks only for what it lacks. A file
appears under its name only after its sha256 matched, by one rename.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from twisted.internet import defer, threads

from onion_twisted.protocol import wire
from onion_twisted.protocol.chunks import ChunkMap, fsync_dir, unique_destination

# A name may have 255 bytes, and NAME.json.tmp must fit in a file name too: the
# partial files of longer names are .partial/long/SHA256-OF-NAME.part, .json.
MAX_STEM = 255 - len(".json.tmp")
SEEN_TRANSFERS = 16  # transfer ids remembered from chunks that came before the tracker's reply

QUEUED, REQUESTING, RECEIVING, VERIFYING, DONE, FAILED = (
    "queued", "requesting", "receiving", "verifying", "done", "failed")
ACTIVE = (QUEUED, REQUESTING, RECEIVING, VERIFYING)


class BadChunk(Exception):
    pass


def sha256_of(path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(block):
            digest.update(data)
    return digest.hexdigest()


class Download:
    """One file being fetched: its chunk map, its partial file, its state."""

    def __init__(self, store: "DownloadStore", name: str, sha256: str | None, chunk_size: int):
        self.store = store
        self.name = name
        self.sha256 = sha256
        self.chunk_size = chunk_size
        self.size: int | None = None
        self.chunks: ChunkMap | None = None
        self.state = QUEUED
        self.error: str | None = None
        self.attempts = 0
        self.transfer: str | None = None
        self.seen_transfers: set[str] = set()
        self.final_path: Path | None = None
        self.bytes_this_run = 0
        self.unverified = False
        self._fd: int | None = None
        self._unsaved = 0
        self.samples: list[tuple[float, int]] = []  # (time, bytes) for the speed shown
        self.outcome: str | None = None    # how the current attempt's transfer ended
        self.wake = None                   # Deferred the attempt waits on

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
        return {"file": self.name, "state": self.state, "bytes": self.bytes, "size": self.size,
                "sha256": self.sha256, "error": self.error, "attempts": self.attempts,
                "speed": self.speed(now), "unverified": self.unverified,
                "path": self.final_path.name if self.final_path else None,
                "bytes_this_run": self.bytes_this_run}  # chunk bytes written since this process started

    def speed(self, now: float) -> float:
        recent = [(t, n) for t, n in self.samples if now - t <= 5]
        self.samples = recent
        if len(recent) < 2:
            return 0.0
        span = max(now - recent[0][0], 1e-3)
        return sum(n for _, n in recent[1:]) / span

    # --- receiving ----------------------------------------------------------------------

    def expect(self, size: int | None, chunk_size: int, sha256: str | None) -> None:
        """What the tracker's ``transfer`` reply (or a first chunk) says of the file."""
        if sha256 and not self.sha256:
            self.sha256 = sha256
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

    def write_chunk(self, message: dict, now: float) -> bool:
        """Write one ``file_chunk`` at its offset; False if it was a duplicate."""
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
        if index in self.chunks:
            return False
        os.pwrite(self._open(), data, index * self.chunk_size)
        self.chunks.mark(index)
        self.bytes_this_run += len(data)
        self.samples.append((now, len(data)))
        self.state = RECEIVING
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
        record = dict(self.chunks.to_record(), file=self.name, sha256=self.sha256)
        if self.state == FAILED:
            record["failed"] = self.error
        self.record_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.record_path.with_name(self.record_path.name + ".tmp")
        tmp.write_bytes(wire.dumps(record))
        os.replace(tmp, self.record_path)
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

    # --- the end ---------------------------------------------------------------------------

    def finish(self, run_in_thread=threads.deferToThread) -> defer.Deferred:
        """Verify the sha256 off the reactor, then move the file into place.

        Fires with True when the file is in place, False when it did not match
        (the partial file is then deleted: nothing wrong is kept).
        """
        self.state = VERIFYING
        self.save_record()
        self.close()
        if not self.part_path.exists():
            self.part_path.parent.mkdir(parents=True, exist_ok=True)
            self.part_path.touch(mode=0o600)
        d = run_in_thread(sha256_of, self.part_path)
        d.addCallback(self._verified)
        return d

    def _verified(self, digest: str) -> bool:
        if self.sha256 is not None and digest != self.sha256:
            self.discard_partial()
            return False
        if self.sha256 is None:
            self.sha256 = digest
            self.unverified = True  # announced by name only: nothing to check against
        self.final_path = self.store.place(self.part_path, self.name, digest)
        try:
            self.record_path.unlink()
        except FileNotFoundError:
            pass
        self.state = DONE
        self.error = None
        return True


class DownloadStore:
    """The downloads directory and its ``.partial`` sub-directory."""

    def __init__(self, downloads_dir):
        self.downloads_dir = Path(downloads_dir)
        self.partial_dir = self.downloads_dir / ".partial"
        self.downloads_dir.mkdir(parents=True, exist_ok=True)

    def place(self, part: Path, name: str, digest: str) -> Path:
        """Move a verified file to ``NAME``, never over a different file (``NAME (1)`` …)."""
        target = self.downloads_dir / name
        if target.exists() and target.is_file() and sha256_of(target) == digest:
            part.unlink()
            return target
        target = unique_destination(self.downloads_dir, name)
        os.replace(part, target)
        fsync_dir(self.downloads_dir)
        return target

    def resumable(self) -> list[dict]:
        """The records of partial downloads left by an earlier run."""
        records = []
        if not self.partial_dir.is_dir():
            return records
        for path in sorted([*self.partial_dir.glob("*.json"), *self.partial_dir.glob("long/*.json")]):
            try:
                record = wire.loads_object(path.read_bytes(), "record")
                ChunkMap.from_record(record)
                if isinstance(record.get("file"), str):
                    records.append(record)
            except Exception:
                continue  # a torn or foreign record: the download starts over
        return records

    def restore(self, record: dict, chunk_size_default: int) -> Download:
        d = Download(self, record["file"], record.get("sha256"), record.get("chunk_size", chunk_size_default))
        d.chunks = ChunkMap.from_record(record)
        d.size = d.chunks.size
        if isinstance(record.get("failed"), str):
            d.state, d.error = FAILED, record["failed"]
        return d

    def file_path(self, name: str) -> Path | None:
        """A finished download by name (for ``GET /files/NAME``)."""
        if not name or "/" in name or name in (".", "..") or name.startswith(".partial"):
            return None
        path = self.downloads_dir / name
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        if real.parent != self.downloads_dir.resolve() or not real.is_file():
            return None
        return real
