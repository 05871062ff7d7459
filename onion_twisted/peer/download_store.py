"""The downloads directory and its ``.partial`` sub-directory (PROTOCOL.md §8):
where verified files are placed, and the records a restarted peer resumes from."""

from __future__ import annotations

import os
from pathlib import Path

from onion_twisted.protocol import wire
from onion_twisted.protocol.chunks import ChunkMap
from onion_twisted.net.files import fsync_dir, sha256_file, unique_destination
from onion_twisted.peer.downloads import Download


class DownloadStore:
    """The downloads directory and its ``.partial`` sub-directory."""

    def __init__(self, downloads_dir):
        self.downloads_dir = Path(downloads_dir)
        self.partial_dir = self.downloads_dir / ".partial"
        self.downloads_dir.mkdir(parents=True, exist_ok=True)

    def place(self, part: Path, name: str, digest: str) -> Path:
        """Move a verified file to ``NAME``, never over a different file (``NAME (1)`` …)."""
        target = self.downloads_dir / name
        if target.exists() and target.is_file() and sha256_file(target) == digest:
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
        root = record.get("root") if isinstance(record.get("root"), str) else None
        d = Download(self, record["file"], record.get("sha256"), record.get("chunk_size", chunk_size_default), root)
        d.chunks = ChunkMap.from_record(record)
        d.size = d.chunks.size
        d.verified = record.get("verified") is True  # an older record's chunks were not checked
        if isinstance(record.get("failed"), str):
            d.fail(record["failed"])
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
