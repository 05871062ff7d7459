"""``<data_dir>/hashes.json``: the SHA-256 and Merkle root of each shared file, kept
across restarts; ``<data_dir>/leaves/ROOT``: each root's leaf row (PROTOCOL.md §13).

Entries are keyed by absolute path and hold the size and mtime the file was
hashed with, so a restarted peer does not hash its files again. The leaf
rows (32 bytes per 256 KiB piece) live in files of their own, read only
when a transfer starts, so the cache stays small.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

from twisted.logger import Logger

from onion_twisted.protocol import merkle
from onion_twisted.protocol.messages import is_sha256
from onion_twisted.net.files import atomic_write

log = Logger(namespace="onion_twisted.peer.sharing")  # the namespace the log had before the split



def stamp_of(st) -> tuple[int, int]:
    """What says a file is unchanged since it was hashed: its size and mtime (ns)."""
    return (st.st_size, st.st_mtime_ns)


class HashCache:
    """``<data_dir>/hashes.json``: absolute path -> {"size", "mtime_ns", "sha256", "root"}.

    An entry counts only while the file's size and mtime (nanoseconds) are
    those it was hashed with, and only with a root (an entry of an earlier
    version, without one, is hashed again once). A missing or unreadable
    cache file is an empty cache (the files are hashed again), never an error.
    """

    FILE_NAME = "hashes.json"

    def __init__(self, data_dir):
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / self.FILE_NAME
        self.entries: dict[str, dict] = {}
        self.dirty = False
        self._load()

    @staticmethod
    def key(path) -> str:
        return os.path.abspath(os.fspath(path))

    def _load(self) -> None:
        try:
            with open(self.path, "rb") as f:
                raw = json.loads(f.read())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log.warn("hash cache {path} unreadable ({error}); files will be hashed again",
                     path=str(self.path), error=str(e))
            return
        if not isinstance(raw, dict):
            log.warn("hash cache {path} is not an object; ignored", path=str(self.path))
            return
        for path, entry in raw.items():
            if (isinstance(entry, dict)
                    and all(isinstance(entry.get(k), int) and not isinstance(entry.get(k), bool)
                            for k in ("size", "mtime_ns"))
                    and is_sha256(entry.get("sha256")) and is_sha256(entry.get("root"))):
                self.entries[path] = {"size": entry["size"], "mtime_ns": entry["mtime_ns"],
                                      "sha256": entry["sha256"], "root": entry["root"]}
            else:
                self.dirty = True  # rewrite without the bad entry

    def lookup(self, path, st) -> tuple[str, str] | None:
        """The cached (sha256, root) of ``path`` if ``st`` (an ``os.stat_result``) still matches."""
        entry = self.entries.get(self.key(path))
        if entry is None or (entry["size"], entry["mtime_ns"]) != stamp_of(st):
            return None
        return entry["sha256"], entry["root"]

    def store(self, path, st, sha256: str, root: str) -> None:
        entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256, "root": root}
        key = self.key(path)
        if self.entries.get(key) != entry:
            self.entries[key] = entry
            self.dirty = True

    def forget(self, path) -> None:
        if self.entries.pop(self.key(path), None) is not None:
            self.dirty = True

    def save(self) -> None:
        """Prune entries of files that no longer exist and write the cache atomically (0600)."""
        for path in [p for p in self.entries if not os.path.exists(p)]:
            del self.entries[path]
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        data = json.dumps(self.entries, sort_keys=True, separators=(",", ":")).encode("utf-8")
        atomic_write(self.path, data, mode=0o600)
        self.dirty = False


class LeafStore:
    """``<data_dir>/leaves/ROOT``: the leaf row of each shared root, mode 0600.

    A row is checked against its root and the file's size when it is read:
    a torn or foreign file reads as missing, and the file is hashed again.
    The roots known to be on disk and the last few rows read are remembered,
    so a scan does not stat every row again and a download asking one sharer
    for block after block does not read its row again each time.
    """

    DIR_NAME = "leaves"
    RECENT_ROWS = 8

    def __init__(self, data_dir):
        self.path = Path(data_dir) / self.DIR_NAME
        self._present: set[str] = set()
        self._recent: OrderedDict[tuple[str, int], bytes] = OrderedDict()

    def _file(self, root: str) -> Path:
        if not is_sha256(root):
            raise ValueError("a root is 64 lowercase hex digits")
        return self.path / root

    def has(self, root: str) -> bool:
        if root not in self._present and self._file(root).is_file():
            self._present.add(root)
        return root in self._present

    def save(self, root: str, leaves: bytes) -> None:
        target = self._file(root)
        if not target.exists():  # else the same root: the same row
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic_write(target, leaves, mode=0o600)
        self._present.add(root)

    def load(self, root: str, size: int) -> bytes | None:
        """The row of ``root`` for a file of ``size`` bytes, or None (missing or not that root's)."""
        leaves = self._recent.get((root, size))
        if leaves is None:
            try:
                leaves = self._file(root).read_bytes()
                merkle.check_leaves(leaves, root, size)
            except (OSError, ValueError):
                self._present.discard(root)
                return None
            self._recent[(root, size)] = leaves
            while len(self._recent) > self.RECENT_ROWS:
                self._recent.popitem(last=False)
        self._recent.move_to_end((root, size))
        return leaves

    def prune(self, keep) -> None:
        """Delete the rows of roots no longer shared."""
        try:
            names = os.listdir(self.path)
        except OSError:
            return
        for name in names:
            if name not in keep and is_sha256(name):
                self._present.discard(name)
                try:
                    os.unlink(self.path / name)
                except OSError:
                    pass
