"""The sharer's side of PROTOCOL.md §8: what a peer announces.

``ShareDirectory``: the regular files directly in ``share_dir`` as the
``{"name", "size", "sha256", "root"}`` objects of an ``ls`` (the root: §13's
Merkle root); hashing (sha256 and leaf row in one pass) runs off the reactor
thread, remembered across restarts by ``HashCache`` and ``LeafStore``; ``changed``
tells whether the list differs from the last scan (the peer announces again
only then, and every 5 minutes). How a shared file is served is
``upload_stream``.

Seeding (``seed_downloads``): with a downloads directory set, its finished
files are shared too, by the same rules (directly in it, regular, not
hidden, so never ``.partial/``; a link only to a file beside it). A
download appears there only once verified (one rename out of
``.partial/``), so the next scan (every ``rescan_interval``) announces it.
A name in both directories is the share directory's file.
"""

from __future__ import annotations

import os
import stat as stat_module
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

from twisted.internet import defer
from twisted.logger import Logger

from onion_twisted.protocol import merkle
from onion_twisted.protocol.messages import MessageError, check_name, ls_message
from onion_twisted.protocol.errors import safe_os_error
from onion_twisted.net.results import SharedResult
from onion_twisted.peer.hash_cache import HashCache, LeafStore, stamp_of

log = Logger()


def _in_thread(f, *args):
    from twisted.internet import threads
    return threads.deferToThread(f, *args)


class ShareDirectory:
    """The regular files directly in ``share_dir`` (and, seeding, in ``downloads_dir``),
    as an ``ls`` announces them.

    ``hasher(path) -> (sha256 hex, leaf row)`` defaults to ``merkle.hash_file``; ``run_in_thread(f,
    *args) -> Deferred`` (default ``threads.deferToThread``) runs the listing,
    the hashing and the cache's save off the reactor thread.
    """

    def __init__(self, share_dir, cache: HashCache, hasher: Callable | None = None,
                 run_in_thread: Callable | None = None, downloads_dir=None):
        self.share_dir = Path(share_dir)
        self.downloads_dir: Path | None = None  # whose files are seeded; None: not seeding
        self.seed_from(downloads_dir)
        self.cache = cache
        self.leaf_store = LeafStore(cache.data_dir)
        self.hasher = hasher or merkle.hash_file
        self.run_in_thread = run_in_thread or _in_thread
        self.files: list[dict] | None = None  # the last scan's objects, sorted by name
        self.changed = False
        self._by_name: dict[str, dict] = {}
        self._disk_names: dict[str, str] = {}  # announced (NFC) name -> its name in share_dir
        self._seeded: dict[str, str] = {}  # the same for the names seeded from downloads_dir
        self._seeded_from: Path | None = None  # the downloads_dir of the last scan
        self._stamps: dict[str, tuple[int, int]] = {}  # announced name -> (size, mtime) it was hashed at
        self._saved_roots: set[str] | None = None  # the roots whose rows the last save kept
        self._scans = SharedResult(lambda run: defer.ensureDeferred(self._scan(run)))

    def seed_from(self, downloads_dir) -> None:
        """Share the finished downloads in ``downloads_dir`` too (None: stop), from the next scan."""
        self.downloads_dir = Path(downloads_dir) if downloads_dir is not None else None

    # -- what was announced ----------------------------------------------------------

    @property
    def announced(self) -> frozenset:
        """The names of the last scan."""
        return frozenset(self._by_name)

    def entry(self, name: str) -> dict | None:
        """The announced ``{"name", "size", "sha256", "root"}`` of ``name``, or None."""
        return self._by_name.get(name)

    def seeded(self, name: str) -> bool:
        """Whether the announced ``name`` is a file of the downloads directory (seeding)."""
        return name in self._seeded

    def unchanged(self, name: str, st) -> bool:
        """Whether the file open for ``name`` (its ``st``) is still the one announced:
        serving changed bytes under the old root would get this peer excluded."""
        return self._stamps.get(name) == stamp_of(st)

    def leaves(self, name: str) -> bytes | None:
        """The leaf row of the announced ``name`` (§13), or None if it is not on disk."""
        entry = self._by_name.get(name)
        if entry is None:
            return None
        return self.leaf_store.load(entry["root"], entry["size"])

    def ls_message(self) -> dict:
        return ls_message([dict(f) for f in (self.files or [])])

    def path_of(self, name) -> Path:
        """The path to serve for a requested name, or MessageError("refused") (§8).

        A seeded name is resolved in the downloads directory by the same rules.
        """
        try:
            seeded = check_name(name) in self._seeded
        except MessageError:
            seeded = False  # resolve_shared refuses it, saying why
        if seeded:
            return resolve_shared(self._seeded_from, name, self._seeded)
        return resolve_shared(self.share_dir, name, self._disk_names)

    # -- scanning --------------------------------------------------------------------

    def scan(self, run_in_thread: Callable | None = None) -> defer.Deferred:
        """List and hash; fires with the sorted announced objects and sets ``changed``.

        A scan asked for while one is running gets that scan's result.
        """
        # Each caller gets its own copy of the objects, free to change it.
        d = self._scans.get(run_in_thread or self.run_in_thread)
        return d.addCallback(lambda files: [dict(f) for f in files])

    def _list(self, downloads_dir: Path | None) -> list[tuple[str, str, os.stat_result, bool]]:
        """(name, path, stat, seeded) of each file that may be shared: those of the share
        directory, then those of ``downloads_dir`` of other names (runs in a thread)."""
        found = [(name, path, st, False) for name, path, st in _list_directory(self.share_dir, "share")]
        if downloads_dir is not None:
            names = {name for name, _, _, _ in found}
            found += [(name, path, st, True) for name, path, st in _list_directory(downloads_dir, "downloads")
                      if name not in names]
        return found

    def _hash(self, path, st):
        """(sha256, root) of ``path``, its leaf row saved; None if it changed while being
        hashed (runs in a thread)."""
        sha, leaves = self.hasher(path)
        after = os.stat(path)
        if stamp_of(after) != stamp_of(st):
            return None
        root = merkle.root_hex(leaves)
        self.leaf_store.save(root, leaves)
        return sha, root

    def _save(self, roots) -> None:
        """The cache and the leaf rows of what is shared now (runs in a thread)."""
        if self.cache.dirty:
            self.cache.save()
        self.leaf_store.prune(roots)

    async def _scan(self, run) -> list[dict]:
        downloads_dir = self.downloads_dir
        candidates = await run(self._list, downloads_dir)
        files, seen, stamps = [], set(), {}
        for name, path, st, _ in candidates:
            seen.add(self.cache.key(path))
            hashed = self.cache.lookup(path, st)
            if hashed is not None and not self.leaf_store.has(hashed[1]):
                hashed = None  # its leaf row went missing: hashed again to serve it end to end
            if hashed is None:
                try:
                    hashed = await run(self._hash, path, st)
                except OSError as e:
                    # Safe logging: no file name, and no OSError text (it holds the path).
                    log.warn("a shared file could not be hashed ({error}); it is left out",
                             error=safe_os_error(e))
                    continue
                if hashed is None:
                    log.info("a shared file changed while being hashed; it is hashed at the next scan")
                    continue
                self.cache.store(path, st, *hashed)
            sha, root = hashed
            files.append({"name": name, "size": st.st_size, "sha256": sha, "root": root})
            stamps[name] = stamp_of(st)
        files.sort(key=lambda f: f["name"])
        scanned = {os.path.abspath(d.resolve()) for d in (self.share_dir, downloads_dir) if d is not None}
        for path in [p for p in self.cache.entries if os.path.dirname(p) in scanned and p not in seen]:
            self.cache.forget(path)
        roots = {f["root"] for f in files}
        if self.cache.dirty or roots != self._saved_roots:  # else nothing on disk would change
            try:
                await run(self._save, roots)
                self._saved_roots = roots
            except OSError as e:
                log.warn("cannot save the hash cache: {error}", error=safe_os_error(e))
        self.changed = files != self.files
        self.files = files
        self._by_name = {f["name"]: f for f in files}
        self._disk_names = {name: os.path.basename(path) for name, path, _, seeded in candidates if not seeded}
        self._seeded = {name: os.path.basename(path) for name, path, _, seeded in candidates if seeded}
        self._seeded_from = downloads_dir
        self._stamps = stamps
        return files


def _list_directory(directory: Path, what: str) -> list[tuple[str, str, os.stat_result]]:
    """(announced name, path, stat) of each file directly in ``directory`` that may be
    shared: regular, not hidden, a name that can be announced, a link only to a file
    beside it (runs in a thread)."""
    root = directory.resolve()
    found, announced = [], set()
    try:
        entries = list(os.scandir(root))
    except OSError as e:
        log.warn("{what} directory {dir} unreadable: {error}", what=what, dir=str(root), error=str(e))
        return []
    for entry in sorted(entries, key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        try:
            entry.name.encode("utf-8")  # undecodable names cannot travel in JSON
            name = check_name(entry.name)  # the name announced: NFC
        except (MessageError, UnicodeEncodeError):
            continue
        path = os.path.join(root, entry.name)
        try:
            if entry.is_symlink():
                real = Path(path).resolve(strict=True)
                if real.parent != root:
                    continue  # a link that leads out of the share directory
                st = os.stat(real)
            else:
                st = entry.stat(follow_symlinks=False)
        except (OSError, RuntimeError):
            continue
        if not stat_module.S_ISREG(st.st_mode):
            continue
        if name in announced:
            continue  # two names on disk with one NFC form: the first (in sorted order) is shared
        announced.add(name)
        found.append((name, path, st))
    return found


def resolve_shared(share_dir, name, announced) -> Path:
    """The path of a file the peer may serve, or MessageError("refused").

    ``announced``: the announced names, or a mapping of each to its name on disk.

    §8: a name with a path separator or ``..``, a name not announced, a
    directory, a symlink leading out of ``share_dir``, anything not a regular
    file is refused.
    """
    try:
        name = check_name(name)
    except MessageError as e:
        raise MessageError("refused", e.detail) from None
    if name not in announced:
        raise MessageError("refused", "this peer does not share that name")
    root = Path(share_dir).resolve()
    # ``announced`` maps an announced (NFC) name to its name on disk where the two differ.
    path = root / (announced[name] if isinstance(announced, Mapping) else name)
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise MessageError("refused", "no such file") from None
    if real.parent != root:
        raise MessageError("refused", "the name resolves outside the share directory")
    if not real.is_file():
        raise MessageError("refused", "not a regular file")
    return real
