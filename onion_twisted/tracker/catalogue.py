"""The tracker's catalogue (PROTOCOL.md §8), with no I/O.

The tracker knows a circuit only as (exit IP, CID): never a peer's address.
Each circuit's ``ls`` replaces its list of files; the catalogue has one
entry per distinct (name, sha256) counting the circuits that share it.
Time comes from an injected clock; randomness from an injected ``random.Random``.
"""

from __future__ import annotations

import random

from onion_twisted.protocol import cells, wire
from onion_twisted.protocol.messages import FileRequest, MessageError, SharedFile, files_message

MAX_TRANSFERS = 1024  # transfers counted as under way per source circuit (the estimate saturates)
MAX_TRANSFER_SOURCES = 65536  # transfer id -> its source, kept so a request can exclude a source (§13)


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
        self.entries: dict[tuple, dict] = {}  # (name, sha, root) -> {circuit key: SharedFile}
        self.names: dict[str, set] = {}  # name -> its (name, sha, root) entry keys
        # Which circuit served each recent transfer: a requester that got a bad chunk names
        # the transfer in ``exclude`` and never learns more of the source than that id.
        self.transfer_sources: dict[str, tuple] = {}
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
            self._listing_json = wire.dumps(files_message(listing))
        return self._listing_json

    def files_answer(self) -> bytes:
        """The whole 200 body ``{"payload": {"type": "files", ...}}``, cached with the listing."""
        reply = self.files_reply_json()
        if self._answer is None:
            self._answer = cells.encode_reply_object_bytes(reply)
        return self._answer

    def _build_listing(self) -> list[dict]:
        rows = []
        for (name, sha, root), sources in self.entries.items():
            size = next(iter(sources.values())).size
            row = {"name": name, "size": size, "sha256": sha, "sources": len(sources)}
            if root is not None:  # a /2 entry (§13); /1 rows stay as §8 has them
                row["root"] = root
            rows.append(row)
        if len(rows) > self.max_listing:
            rows.sort(key=lambda r: r["sources"], reverse=True)
            del rows[self.max_listing:]
        rows.sort(key=lambda r: (r["name"], r["sha256"] or "", r.get("root") or ""))
        return rows

    # --- source choice (§8) -------------------------------------------------------------

    def choose_source(self, request: FileRequest, requester_key, is_sealed=lambda key: False
                      ) -> tuple[TrackedCircuit, SharedFile, bool]:
        """The sharing circuit for a request, never the requester's own nor one it
        excluded, and whether the transfer is end-to-end (§13).

        The entries of the name that match the request's sha256 and root are
        candidates. A request with a key from a sealed circuit prefers an entry
        with a root and sealed sources, and such a source in it; otherwise
        the entry with the most sources wins. Among the sources, the one with
        the fewest transfers under way, ties broken at random.
        """
        candidates = [k for k in self.names.get(request.file, ())
                      if (request.sha256 is None or k[1] == request.sha256)
                      and (request.root is None or k[2] == request.root)]
        excluded = {self.transfer_sources[t] for t in request.exclude if t in self.transfer_sources}
        # End to end only between two sealed circuits: the requester's key must cross
        # no exit in the clear, on its way in or out.
        wants_e2e = request.key is not None and is_sealed(requester_key)
        best = None
        for key in candidates:
            sources = [k for k in self.entries.get(key, ()) if k != requester_key and k not in excluded]
            sealed = [k for k in sources if is_sealed(k)] if wants_e2e and key[2] is not None else []
            rank = (len(sealed) > 0, len(sealed) or len(sources))
            if sources and (best is None or rank > best[0]):
                best = (rank, key, sealed or sources, bool(sealed))
        if best is None:
            if any(k != requester_key for c in candidates for k in self.entries.get(c, ())):
                raise MessageError("no_source", "every other source of that file was excluded")
            if any(self.entries.get(k) for k in candidates):
                raise MessageError("no_source", "only the requester's own circuit shares that file")
            raise MessageError("not_found", "no circuit shares that file")
        _, key, sources, e2e = best
        now = self.clock.seconds()
        load = {k: self._under_way(self.circuits[k], now) for k in sources}
        least = min(load.values())
        chosen = self.rng.choice([k for k in sources if load[k] == least])
        return self.circuits[chosen], self.entries[key][chosen], e2e

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
        sources = self.transfer_sources
        if len(sources) >= MAX_TRANSFER_SOURCES:
            del sources[next(iter(sources))]  # the oldest: insertion order
        sources[transfer] = circuit.key

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
