"""The tracker's catalogue (PROTOCOL.md §8), with no I/O.

The tracker knows a circuit only as (exit IP, CID): never a peer's address.
Each circuit's ``ls`` replaces its list of files; the catalogue has one
entry per distinct (name, sha256) counting the circuits that share it.
Time comes from an injected clock; randomness from an injected ``random.Random``.
"""

from __future__ import annotations

import random
import re
import unicodedata
from dataclasses import dataclass
from typing import NamedTuple

from onion_twisted.protocol import wire

_SHA256 = re.compile(r"[0-9a-f]{64}")
_SEPARATOR = re.compile(r"[/\\\x00]")
_CONTROL = re.compile(r"[\x00-\x1f]")
# Characters that make one name look like another, or look like nothing at all:
# DEL and the C1 controls; the bidi embeddings, overrides and isolates
# (U+202A-U+202E, U+2066-U+2069: "gpj.exe" shown as "exe.jpg") and the bidi
# marks (U+061C, U+200E, U+200F); the zero-width and invisible characters
# (U+200B-U+200D, U+2060-U+2064, U+FEFF).
_LOOKALIKE = re.compile("[\x7f-\x9f\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]")
MIN_CHUNK = 16 * 1024
MAX_CHUNK = 4 * 1024 * 1024
DEFAULT_CHUNK = 256 * 1024
MAX_RANGES = 65536
MAX_NAME_BYTES = 255
MAX_SIZE = 2 ** 53  # JSON-safe integers
MAX_TRANSFERS = 1024  # transfers counted as under way per source circuit (the estimate saturates)


class MessageError(Exception):
    """A message the tracker answers with ``{"type": "error", ...}``."""

    def __init__(self, error: str, detail: str):
        super().__init__(detail)
        self.error = error
        self.detail = detail

    def reply(self) -> dict:
        return {"type": "error", "error": self.error, "detail": self.detail}


class SharedFile(NamedTuple):
    # A tuple of atomic values: the garbage collector stops tracking it, which
    # matters with 100 000s of them (bench/tracker.py: full collections 4x shorter).
    name: str
    size: int | None
    sha256: str | None

    @property
    def key(self) -> tuple[str, str | None]:
        return (self.name, self.sha256)


def check_name(name) -> str:
    """A file name as §8 allows it, in NFC: one path component, nothing that climbs
    out, nothing invisible or direction-changing (docs/protocol.md, file names).

    Names are compared in Unicode normal form C, so "é" typed as one code point
    or as e + U+0301 is one name: the tracker, the sharer and the requester all
    use the form this returns.
    """
    if not isinstance(name, str) or not name:
        raise MessageError("bad_request", "file name is not a non-empty string")
    if _LOOKALIKE.search(name):
        raise MessageError("bad_request", "file name has invisible, control or direction-changing characters")
    try:
        name = unicodedata.normalize("NFC", name)
    except UnicodeError:
        raise MessageError("bad_request", "file name is not valid Unicode") from None
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise MessageError("bad_request", "file name is over 255 bytes")
    if name in (".", "..") or _SEPARATOR.search(name):
        raise MessageError("bad_request", "file name has a path separator or is . or ..")
    if _CONTROL.search(name):
        raise MessageError("bad_request", "file name has control characters")
    return name


def check_sha256(value) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise MessageError("bad_request", "sha256 is not 64 lowercase hex digits")
    return value


def parse_files(files, max_files: int) -> tuple[SharedFile, ...]:
    """The ``files`` of an ``ls``: names (seed form) or {name, size, sha256} objects."""
    if not isinstance(files, list):
        raise MessageError("bad_request", "ls: files is not a list")
    if len(files) > max_files:
        raise MessageError("too_many_files", f"ls: at most {max_files} files per circuit")
    parsed = {}
    for f in files:
        if isinstance(f, str):
            shared = SharedFile(check_name(f), None, None)
        elif isinstance(f, dict):
            size = f.get("size")
            if size is not None and (not isinstance(size, int) or isinstance(size, bool)
                                     or not 0 <= size <= MAX_SIZE):
                raise MessageError("bad_request", "ls: size is not a non-negative integer")
            sha = f.get("sha256")
            shared = SharedFile(check_name(f.get("name")), size, None if sha is None else check_sha256(sha))
        else:
            raise MessageError("bad_request", "ls: a file is neither a name nor an object")
        parsed[shared.key] = shared
    return tuple(parsed.values())


@dataclass(frozen=True, slots=True)
class FileRequest:
    file: str
    sha256: str | None
    chunk_size: int
    chunks: list | None


def parse_request(message: dict) -> FileRequest:
    name = check_name(message.get("file"))
    sha = message.get("sha256")
    if sha is not None:
        check_sha256(sha)
    chunk_size = message.get("chunk_size", DEFAULT_CHUNK)
    if chunk_size is None:
        chunk_size = DEFAULT_CHUNK
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
        raise MessageError("bad_request", "chunk_size must be an integer from 16 KiB to 4 MiB")
    chunks = message.get("chunks")
    if chunks is not None:
        if not isinstance(chunks, list) or len(chunks) > MAX_RANGES:
            raise MessageError("bad_request", f"chunks must be a list of at most {MAX_RANGES} ranges")
        for r in chunks:
            if (not isinstance(r, list) or len(r) != 2
                    or not all(isinstance(x, int) and not isinstance(x, bool) for x in r)
                    or not 0 <= r[0] < r[1] <= MAX_SIZE):
                raise MessageError("bad_request", "chunks: each range is [first, end) with 0 <= first < end")
    return FileRequest(name, sha, chunk_size, chunks)


class TrackedCircuit:
    __slots__ = ("key", "exit", "files", "last_seen", "transfers")

    def __init__(self, key, exit_address: wire.Address, now: float):
        self.key = key                # (exit IP, CID): all the tracker knows of a peer
        self.exit = exit_address      # where control messages and backward cells go
        self.files: tuple[SharedFile, ...] = ()
        self.last_seen = now
        self.transfers: dict[str, float] = {}  # transfer id -> when it counts as finished


class Catalogue:
    def __init__(self, clock, *, idle_timeout: float = 600.0, max_circuits: int = 100_000,
                 max_files: int = 10_000, max_entries: int = 1_000_000, max_listing: int = 10_000,
                 listing_refresh: float = 1.0, rng: random.Random | None = None):
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.max_circuits = max_circuits
        self.max_files = max_files
        self.max_entries = max_entries
        self.max_listing = max_listing
        self.listing_refresh = listing_refresh
        self.rng = rng or random.SystemRandom()
        self.circuits: dict[tuple[str, str], TrackedCircuit] = {}
        self.entries: dict[tuple[str, str | None], dict] = {}  # (name, sha) -> {circuit key: SharedFile}
        self.names: dict[str, set] = {}  # name -> its (name, sha) entry keys
        self._listing: list | None = None
        self._listing_json: bytes | None = None
        self._answer: bytes | None = None
        self._listing_at = float("-inf")
        self._dirty = True

    # --- circuits -----------------------------------------------------------------

    def circuit(self, key, exit_address: wire.Address) -> TrackedCircuit:
        """The circuit known by ``key``, made on its first message, and marked seen."""
        circuit = self.circuits.get(key)
        now = self.clock.seconds()
        if circuit is None:
            if len(self.circuits) >= self.max_circuits:
                raise MessageError("busy", "the tracker is at its circuit limit")
            circuit = self.circuits[key] = TrackedCircuit(key, exit_address, now)
        circuit.last_seen = now
        return circuit

    def announce(self, circuit: TrackedCircuit, files: tuple[SharedFile, ...]) -> None:
        """Replace the circuit's list (``ls``)."""
        old_keys = {f.key for f in circuit.files}
        new_keys = {f.key for f in files}
        # Entries this ls adds, less those only this circuit held and it no longer shares.
        added = sum(1 for k in new_keys - old_keys if k not in self.entries)
        freed = sum(1 for k in old_keys - new_keys if self.entries.get(k, {}).keys() == {circuit.key})
        if added and len(self.entries) + added - freed > self.max_entries:
            raise MessageError("busy", "the tracker's catalogue is full")
        self._withdraw(circuit)
        circuit.files = files
        for f in files:
            sources = self.entries.get(f.key)
            if sources is None:
                sources = self.entries[f.key] = {}
                self.names.setdefault(f.name, set()).add(f.key)
            sources[circuit.key] = f
        self._dirty = True

    def forget(self, key) -> bool:
        circuit = self.circuits.pop(key, None)
        if circuit is None:
            return False
        self._withdraw(circuit)
        return True

    def _withdraw(self, circuit: TrackedCircuit) -> None:
        for f in circuit.files:
            sources = self.entries.get(f.key)
            if sources is not None:
                sources.pop(circuit.key, None)
                if not sources:
                    del self.entries[f.key]
                    keys = self.names[f.name]
                    keys.discard(f.key)
                    if not keys:
                        del self.names[f.name]
        if circuit.files:
            self._dirty = True
        circuit.files = ()

    def expire(self) -> list:
        now = self.clock.seconds()
        silent = [k for k, c in self.circuits.items() if now - c.last_seen > self.idle_timeout]
        for key in silent:
            self.forget(key)
        return silent

    # --- the files reply ----------------------------------------------------------------

    def listing(self) -> list[dict]:
        """The ``files`` of a reply: cached, rebuilt when the catalogue changed.

        A large catalogue is rebuilt at most every ``listing_refresh`` seconds
        so a stream of ``ls`` messages costs each one no full rebuild; past
        ``max_listing`` entries the ones with the most sources are kept.
        """
        now = self.clock.seconds()
        if self._listing is None or (self._dirty and (len(self.entries) <= 2000
                                                      or now - self._listing_at >= self.listing_refresh)):
            self.refresh_listing()
        return self._listing

    def refresh_listing(self) -> None:
        """Rebuild the reply now (the tracker's timer calls it every ``listing_refresh``
        seconds when the catalogue changed, so large rebuilds stay off the message path)."""
        self._listing = self._build_listing()
        self._listing_json = self._answer = None
        self._listing_at = self.clock.seconds()
        self._dirty = False

    @property
    def dirty(self) -> bool:
        return self._dirty

    def files_reply_json(self) -> bytes:
        """``{"type": "files", ...}`` serialised once per listing, not once per reply."""
        listing = self.listing()
        if self._listing_json is None:
            self._listing_json = wire.dumps({"type": "files", "files": listing})
        return self._listing_json

    def files_answer(self) -> bytes:
        """The whole 200 body ``{"payload": {"type": "files", ...}}``, cached with the listing."""
        reply = self.files_reply_json()
        if self._answer is None:
            self._answer = b'{"payload":' + reply + b"}"
        return self._answer

    def _build_listing(self) -> list[dict]:
        rows = []
        for (name, sha), sources in self.entries.items():
            size = next(iter(sources.values())).size
            rows.append({"name": name, "size": size, "sha256": sha, "sources": len(sources)})
        if len(rows) > self.max_listing:
            rows.sort(key=lambda r: r["sources"], reverse=True)
            del rows[self.max_listing:]
        rows.sort(key=lambda r: (r["name"], r["sha256"] or ""))
        return rows

    # --- source choice (§8) -------------------------------------------------------------

    def choose_source(self, request: FileRequest, requester_key) -> tuple[TrackedCircuit, SharedFile]:
        """The sharing circuit for a request: never the requester's own.

        Without a sha256 the entry of that name with the most other sources
        wins; among its sources, the one with the fewest transfers under way,
        ties broken at random.
        """
        if request.sha256 is not None:
            candidates = [(request.file, request.sha256)]
        else:
            candidates = list(self.names.get(request.file, ()))
        best = None
        for key in candidates:
            sources = [k for k in self.entries.get(key, ()) if k != requester_key]
            if sources and (best is None or len(sources) > len(best[1])):
                best = (key, sources)
        if best is None:
            if any(self.entries.get(k) for k in candidates):
                raise MessageError("no_source", "only the requester's own circuit shares that file")
            raise MessageError("not_found", "no circuit shares that file")
        key, sources = best
        now = self.clock.seconds()
        load = {k: self._under_way(self.circuits[k], now) for k in sources}
        least = min(load.values())
        chosen = self.rng.choice([k for k in sources if load[k] == least])
        return self.circuits[chosen], self.entries[key][chosen]

    # --- transfers under way ------------------------------------------------------------

    def start_transfer(self, circuit: TrackedCircuit, transfer: str, size: int | None) -> None:
        # The tracker never sees transfer_end (it crosses the bridge), so a
        # transfer counts as under way for an estimate of its duration: its
        # size at 1 MiB/s plus a minute, and at most the bridges' idle time.
        estimate = 60.0 + (size or 0) / (1024 * 1024)
        now = self.clock.seconds()
        transfers = circuit.transfers
        if len(transfers) >= MAX_TRANSFERS and self._under_way(circuit, now) >= MAX_TRANSFERS:
            del transfers[min(transfers, key=transfers.__getitem__)]  # the one that ends first
        transfers[transfer] = now + min(estimate, self.idle_timeout)

    def end_transfer(self, circuit: TrackedCircuit, transfer: str) -> None:
        circuit.transfers.pop(transfer, None)

    def _under_way(self, circuit: TrackedCircuit, now: float) -> int:
        if circuit.transfers:
            for t in [t for t, until in circuit.transfers.items() if until <= now]:
                del circuit.transfers[t]
        return len(circuit.transfers)

    def transfers_under_way(self) -> int:
        now = self.clock.seconds()
        return sum(self._under_way(c, now) for c in self.circuits.values() if c.transfers)
