"""Files on disk, written once here: atomic writes, hashing, safe destinations.

Every state file of a member (keys, hash cache, download records, the saved
directory) is written with ``atomic_write``: a crash leaves the old file or
the new one, never half of either, and the data reaches the disk before the
name does (fsync of the file, then of the directory).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

HASH_BLOCK = 1 << 20


def atomic_write(path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically and durably; the file gets ``mode``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def fsync_dir(path) -> None:
    """Make a rename or a new name in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path, block: int = HASH_BLOCK) -> str:
    """The hex SHA-256 of a file, read ``block`` bytes at a time (never whole)."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while data := f.read(block):
            digest.update(data)
    return digest.hexdigest()


def unique_destination(directory: Path, name: str) -> Path:
    """``NAME``, or ``NAME (1)``, ``NAME (2)`` … the first that does not exist."""
    candidate = directory / name
    stem, dot, ext = name.partition(".") if not name.startswith(".") else (name, "", "")
    n = 1
    while candidate.exists():
        candidate = directory / (f"{stem} ({n}){dot}{ext}")
        n += 1
    return candidate
