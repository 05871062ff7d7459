"""The sharer's side of PROTOCOL.md §8: what a peer announces and how it serves it.

* ``HashCache``: the SHA-256 of each shared file, kept in
  ``<data_dir>/hashes.json`` by absolute path, size and mtime, so a restarted
  peer does not hash its files again.
* ``ShareDirectory``: the regular files directly in ``share_dir`` as the
  ``{"name", "size", "sha256"}`` objects of an ``ls``; hashing runs off the
  reactor thread; ``changed`` tells whether the list differs from the last
  scan (the peer announces again only then, and every 5 minutes).
* ``ChunkProducer`` (an ``IPushProducer``) reads one chunk at a time with
  ``os.pread``; ``WindowedChunkSender`` is its consumer: it hands each chunk
  to ``send`` and pauses the producer while ``window`` chunks are
  unacknowledged. Only the chunks in flight are held in memory, so memory
  does not grow with the file's size.

Nothing here touches the network: ``send`` is whatever carries one
``file_chunk`` through the peer's circuit.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat as stat_module
import tempfile
from pathlib import Path
from typing import Callable

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from onion_twisted.protocol.messages import MAX_CHUNK, MessageError, check_name
from onion_twisted.protocol.errors import safe_os_error
from onion_twisted.protocol.chunks import resolve_shared, wanted_indexes

log = Logger()

_SHA256 = re.compile(r"[0-9a-f]{64}")
DEFAULT_WINDOW = 8
DEFAULT_ACK_TIMEOUT = 120.0


# --- hashing --------------------------------------------------------------------------


def sha256_file(path, block: int = 1 << 20) -> str:
    """The hex SHA-256 of a file, read ``block`` bytes at a time (never whole)."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while True:
            data = f.read(block)
            if not data:
                return digest.hexdigest()
            digest.update(data)


def _stamp(st) -> tuple[int, int]:
    return (st.st_size, st.st_mtime_ns)


class HashCache:
    """``<data_dir>/hashes.json``: absolute path -> {"size", "mtime_ns", "sha256"}.

    An entry counts only while the file's size and mtime (nanoseconds) are
    those it was hashed with. A missing or unreadable cache file is an empty
    cache (the files are hashed again), never an error.
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
                    and isinstance(entry.get("sha256"), str) and _SHA256.fullmatch(entry["sha256"])):
                self.entries[path] = {"size": entry["size"], "mtime_ns": entry["mtime_ns"],
                                      "sha256": entry["sha256"]}
            else:
                self.dirty = True  # rewrite without the bad entry

    def lookup(self, path, st) -> str | None:
        """The cached SHA-256 of ``path`` if ``st`` (an ``os.stat_result``) still matches."""
        entry = self.entries.get(self.key(path))
        if entry is None or (entry["size"], entry["mtime_ns"]) != _stamp(st):
            return None
        return entry["sha256"]

    def store(self, path, st, sha256: str) -> None:
        entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}
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
        fd, tmp = tempfile.mkstemp(dir=self.data_dir, prefix=".hashes.", suffix=".tmp")
        try:
            try:
                os.fchmod(fd, 0o600)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        self.dirty = False


# --- the share directory --------------------------------------------------------------


def _in_thread(f, *args):
    from twisted.internet import threads
    return threads.deferToThread(f, *args)


class ShareDirectory:
    """The regular files directly in ``share_dir``, as an ``ls`` announces them.

    ``hasher(path) -> hex`` defaults to ``sha256_file``; ``run_in_thread(f,
    *args) -> Deferred`` (default ``threads.deferToThread``) runs the listing,
    the hashing and the cache's save off the reactor thread.
    """

    def __init__(self, share_dir, cache: HashCache, hasher: Callable | None = None,
                 run_in_thread: Callable | None = None):
        self.share_dir = Path(share_dir)
        self.cache = cache
        self.hasher = hasher or sha256_file
        self.run_in_thread = run_in_thread or _in_thread
        self.files: list[dict] | None = None  # the last scan's objects, sorted by name
        self.changed = False
        self._by_name: dict[str, dict] = {}
        self._disk_names: dict[str, str] = {}  # announced (NFC) name -> its name in share_dir
        self._scanning: defer.Deferred | None = None
        self._waiting: list[defer.Deferred] = []

    # -- what was announced ----------------------------------------------------------

    @property
    def announced(self) -> frozenset:
        """The names of the last scan."""
        return frozenset(self._by_name)

    def entry(self, name: str) -> dict | None:
        """The announced ``{"name", "size", "sha256"}`` of ``name``, or None."""
        return self._by_name.get(name)

    def ls_message(self) -> dict:
        return {"type": "ls", "files": [dict(f) for f in (self.files or [])]}

    def path_of(self, name) -> Path:
        """The path to serve for a requested name, or MessageError("refused") (§8)."""
        return resolve_shared(self.share_dir, name, self._disk_names)

    # -- scanning --------------------------------------------------------------------

    def scan(self, run_in_thread: Callable | None = None) -> defer.Deferred:
        """List and hash; fires with the sorted announced objects and sets ``changed``.

        A scan asked for while one is running gets that scan's result.
        """
        if self._scanning is not None:
            d = defer.Deferred()
            self._waiting.append(d)
            return d
        run = run_in_thread or self.run_in_thread
        scanning = self._scanning = defer.Deferred()

        def finished(result):
            self._scanning = None
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                if isinstance(result, Failure):
                    d.errback(result)
                else:
                    d.callback([dict(f) for f in result])
            return result

        defer.ensureDeferred(self._scan(run)).addBoth(finished).chainDeferred(scanning)
        return scanning

    def _list(self) -> list[tuple[str, str, os.stat_result]]:
        """(name, path, stat) of each file that may be shared (runs in a thread)."""
        root = self.share_dir.resolve()
        found, announced = [], set()
        try:
            entries = list(os.scandir(root))
        except OSError as e:
            log.warn("share directory {dir} unreadable: {error}", dir=str(root), error=str(e))
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

    def _hash(self, path, st):
        """The hash of ``path``, or None if it changed while being hashed (runs in a thread)."""
        sha = self.hasher(path)
        after = os.stat(path)
        if _stamp(after) != _stamp(st):
            return None
        return sha

    async def _scan(self, run) -> list[dict]:
        candidates = await run(self._list)
        files, seen = [], set()
        for name, path, st in candidates:
            seen.add(self.cache.key(path))
            sha = self.cache.lookup(path, st)
            if sha is None:
                try:
                    sha = await run(self._hash, path, st)
                except OSError as e:
                    # Safe logging: no file name, and no OSError text (it holds the path).
                    log.warn("a shared file could not be hashed ({error}); it is left out",
                             error=safe_os_error(e))
                    continue
                if sha is None:
                    log.info("a shared file changed while being hashed; it is hashed at the next scan")
                    continue
                self.cache.store(path, st, sha)
            files.append({"name": name, "size": st.st_size, "sha256": sha})
        files.sort(key=lambda f: f["name"])
        root = os.path.abspath(self.share_dir.resolve())
        for path in [p for p in self.cache.entries if os.path.dirname(p) == root and p not in seen]:
            self.cache.forget(path)
        if self.cache.dirty:
            try:
                await run(self.cache.save)
            except OSError as e:
                log.warn("cannot save the hash cache: {error}", error=str(e))
        self.changed = files != self.files
        self.files = files
        self._by_name = {f["name"]: f for f in files}
        self._disk_names = {name: os.path.basename(path) for name, path, _ in candidates}
        return [dict(f) for f in files]


# --- serving a request ----------------------------------------------------------------


def open_regular(path) -> int:
    """A read-only fd of the regular file ``path`` (no symlink followed, never blocks on a FIFO).

    MessageError("refused") for anything else.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise MessageError("refused", "the name is a symbolic link") from None
        raise MessageError("refused", f"cannot open the file: {e.strerror}") from None
    try:
        if not stat_module.S_ISREG(os.fstat(fd).st_mode):
            raise MessageError("refused", "not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


@implementer(IPushProducer)
class ChunkProducer:
    """Reads the wanted chunks of an open file, one ``os.pread`` at a time.

    For each index of ``wanted_indexes(chunks, count)`` it calls
    ``consumer.write_chunk(index, data)`` while not paused; then
    ``consumer.producer_done()``. A read error or a file that shrank calls
    ``consumer.producer_failed(failure)``. The fd is closed when the
    producer finishes, fails or is stopped.
    """

    def __init__(self, fd: int, size: int, chunk_size: int, chunks=None, *, pread=os.pread):
        if not 0 < chunk_size <= MAX_CHUNK:
            raise ValueError(f"chunk_size must be 1 .. {MAX_CHUNK}")
        if size < 0:
            raise ValueError("size must be >= 0")
        self.fd = fd
        self.size = size
        self.chunk_size = chunk_size
        self.count = (size + chunk_size - 1) // chunk_size
        self._indexes = wanted_indexes(chunks, self.count)
        self._pread = pread
        self.consumer = None
        self.paused = False
        self.stopped = False   # stopProducing, a failure, or finished: nothing more will come
        self.finished = False
        self.chunks_read = 0
        self._producing = False

    @classmethod
    def open(cls, path, chunk_size: int, chunks=None, **kwargs) -> "ChunkProducer":
        """Open ``path`` with ``open_regular``; the size is the file's at that moment."""
        fd = open_regular(path)
        try:
            return cls(fd, os.fstat(fd).st_size, chunk_size, chunks, **kwargs)
        except BaseException:
            os.close(fd)
            raise

    def beginProducing(self, consumer) -> None:
        if self.consumer is not None:
            raise RuntimeError("producer already started")
        self.consumer = consumer
        consumer.registerProducer(self, True)
        self._produce()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        if self.stopped:
            return
        self.paused = False
        self._produce()

    def stopProducing(self) -> None:
        self.stopped = True
        self._close()

    def _close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def _produce(self) -> None:
        # write_chunk may pause, or (an ack that fires at once) resume, from inside this loop.
        if self._producing or self.consumer is None:
            return
        self._producing = True
        try:
            while not self.paused and not self.stopped:
                index = next(self._indexes, None)
                if index is None:
                    self.stopped = self.finished = True
                    self._close()
                    self.consumer.producer_done()
                    return
                offset = index * self.chunk_size
                length = min(self.chunk_size, self.size - offset)
                try:
                    data = self._pread(self.fd, length, offset)
                    if len(data) != length:
                        raise OSError(errno.EIO, "the file shrank while being served")
                except OSError:
                    failure = Failure()
                    self.stopProducing()
                    self.consumer.producer_failed(failure)
                    return
                self.chunks_read += 1
                self.consumer.write_chunk(index, data)
                del data
        finally:
            self._producing = False


class WindowedChunkSender:
    """The consumer of a ``ChunkProducer``: at most ``window`` chunks unacknowledged.

    ``send(index, data) -> Deferred`` carries one chunk (it fires when the far
    end has it). ``done`` fires with the number of chunks sent once the
    producer is done and every chunk was acknowledged, or fails with the
    first failure (a send, a read, or ``defer.TimeoutError`` when a chunk is
    not acknowledged within ``ack_timeout`` seconds of ``clock``). Cancelling
    ``done`` stops the transfer. The sender keeps no chunk data: only the
    Deferreds of the sends in flight.
    """

    def __init__(self, send: Callable, window: int = DEFAULT_WINDOW, clock=None,
                 ack_timeout: float | None = DEFAULT_ACK_TIMEOUT):
        if window < 1:
            raise ValueError("window must be at least 1")
        if clock is None:
            from twisted.internet import reactor as clock
        self.send = send
        self.window = window
        self.clock = clock
        self.ack_timeout = ack_timeout
        self.producer = None
        self.in_flight: dict[int, defer.Deferred] = {}
        self._timers: dict[int, object] = {}
        self.acknowledged = 0
        self.max_in_flight = 0
        self.finished = False
        self._producer_done = False
        self._paused_by_us = False
        self.done = defer.Deferred(canceller=self._cancelled)

    def start(self, producer: ChunkProducer) -> defer.Deferred:
        """Begin the transfer; returns ``done``."""
        producer.beginProducing(self)
        return self.done

    # -- IConsumer-ish -----------------------------------------------------------------

    def registerProducer(self, producer, streaming: bool) -> None:
        if not streaming:
            raise ValueError("WindowedChunkSender needs a push (streaming) producer")
        if self.producer is not None:
            raise RuntimeError("a producer is already registered")
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write_chunk(self, index: int, data: bytes) -> None:
        if self.finished:
            return
        if len(self.in_flight) >= self.window:
            self._fail(Failure(RuntimeError("the producer wrote past the window")))
            return
        d = defer.maybeDeferred(self.send, index, data)
        del data
        self.in_flight[index] = d
        self.max_in_flight = max(self.max_in_flight, len(self.in_flight))
        if self.ack_timeout is not None:
            self._timers[index] = self.clock.callLater(self.ack_timeout, self._timed_out, index)
        if len(self.in_flight) >= self.window and self.producer is not None:
            self._paused_by_us = True
            self.producer.pauseProducing()
        d.addCallbacks(self._acked, self._send_failed, callbackArgs=(index,), errbackArgs=(index,))

    def producer_done(self) -> None:
        self._producer_done = True
        self._maybe_finish()

    def producer_failed(self, failure: Failure) -> None:
        self._fail(failure)

    # -- acknowledgements ----------------------------------------------------------------

    def _settle(self, index: int) -> bool:
        timer = self._timers.pop(index, None)
        if timer is not None and timer.active():
            timer.cancel()
        return self.in_flight.pop(index, None) is not None

    def _acked(self, _result, index: int) -> None:
        if not self._settle(index) or self.finished:
            return None
        self.acknowledged += 1
        if self._producer_done:
            self._maybe_finish()
        elif self._paused_by_us and len(self.in_flight) < self.window and self.producer is not None:
            self._paused_by_us = False
            self.producer.resumeProducing()
        return None

    def _send_failed(self, failure: Failure, index: int) -> None:
        self._settle(index)
        if not self.finished:
            self._fail(failure)
        return None  # consumed: later failures of a finished transfer are not "unhandled"

    def _timed_out(self, index: int) -> None:
        self._timers.pop(index, None)
        if index in self.in_flight and not self.finished:
            self._fail(Failure(defer.TimeoutError(f"chunk {index} not acknowledged "
                                                  f"within {self.ack_timeout} s")), cancel_sends=True)

    # -- the end -------------------------------------------------------------------------

    def _maybe_finish(self) -> None:
        if self.finished or not self._producer_done or self.in_flight:
            return
        self._end()
        self.done.callback(self.acknowledged)

    def _end(self, cancel_sends: bool = False) -> None:
        self.finished = True
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        if self.producer is not None:
            producer, self.producer = self.producer, None
            producer.stopProducing()
        if cancel_sends:
            for d in list(self.in_flight.values()):
                d.cancel()

    def _fail(self, failure: Failure, cancel_sends: bool = False) -> None:
        if self.finished:
            return
        self._end(cancel_sends)
        self.done.errback(failure)

    def _cancelled(self, _d) -> None:
        # done.cancel(): stop reading, cancel the sends; the Deferred fails with CancelledError.
        if not self.finished:
            self._end(cancel_sends=True)

    def cancel(self) -> None:
        self.done.cancel()
