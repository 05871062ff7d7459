"""The tracker's catalogue (PROTOCOL.md §8), with no I/O.

The tracker knows a circuit only as (exit IP, CID): never a peer's address.
Each circuit's ``ls`` replaces its list of files; the catalogue has one
entry per distinct (name, sha256, root) counting the circuits that share it.
Quotas (docs/protocol.md 17.10, choices 40-42): ``max_files`` per circuit,
``max_entries_per_exit`` entries held alone by the circuits through one exit,
and ``max_entries`` in all, where an exit below its fair share evicts from the
exit holding the most.
Time comes from an injected clock; randomness from an injected ``random.Random``.
"""

from __future__ import annotations

import heapq
import random

from onion_twisted.protocol import cells, wire
from onion_twisted.protocol.messages import FileRequest, MessageError, SharedFile, files_message
from onion_twisted.tracker import sources as source_choice
from onion_twisted.tracker.transfers import Transfers

# Files an ls may look through for entries to evict when the catalogue is full: the
# cost of one announcement stays bounded whatever the catalogue holds.
MAX_EVICTION_SCAN = 65536


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
                 max_files: int = 10_000, max_entries: int = 1_000_000, max_entries_per_exit: int | None = None,
                 max_listing: int = 10_000, listing_refresh: float = 1.0, rng: random.Random | None = None):
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.max_circuits = max_circuits
        self.max_files = max_files
        self.max_entries = max_entries
        # Unset (or 0): a quarter of the catalogue, so that it takes four exits to fill it.
        self.max_entries_per_exit = max_entries_per_exit or max(1, max_entries // 4)
        self.max_listing = max_listing
        self.listing_refresh = listing_refresh
        self.rng = rng or random.SystemRandom()
        self.circuits: dict[tuple[str, str], TrackedCircuit] = {}
        self.entries: dict[tuple, dict] = {}  # (name, sha, root) -> {circuit key: SharedFile}
        self.names: dict[str, set] = {}  # name -> its (name, sha, root) entry keys
        # What each exit holds alone: the entries all of whose sources come through it
        # (the quota and the fair share count these). An entry with sources through
        # several exits has its count of sources per exit here; one through a single
        # exit needs none, since any of its sources names that exit.
        self.exit_entries: dict[str, int] = {}
        self.entry_exits: dict[tuple, dict[str, int]] = {}
        # The circuits with files through each exit, the one that announced least recently first.
        self.exit_circuits: dict[str, dict[tuple, None]] = {}
        self.evicted = 0  # entries evicted since start, to make room for an exit below its share
        self.transfers = Transfers(clock, idle_timeout)
        self.transfer_sources = self.transfers.sources
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
        """Replace the circuit's list (``ls``); a refusal changes nothing (choices 40, 41)."""
        old_keys = {f.key for f in circuit.files}
        new_keys = {f.key for f in files}
        # Entries this ls adds, less those only this circuit held and it no longer shares:
        # both are entries its exit holds alone, before and after.
        added = sum(1 for k in new_keys - old_keys if k not in self.entries)
        freed = sum(1 for k in old_keys - new_keys if len(self.entries[k]) == 1)
        evictions = {}
        if added:
            exit_ip = circuit.key[0]
            held = self.exit_entries.get(exit_ip, 0) + added - freed
            if held > self.max_entries_per_exit:
                raise MessageError("busy", "the circuits through this exit hold as many catalogue entries "
                                           "as one exit may")
            over = len(self.entries) + added - freed - self.max_entries
            if over > 0:
                evictions = self._plan_eviction(exit_ip, held, over, new_keys)
        self._withdraw(circuit)
        circuit.files = files
        for f in files:
            self._add_source(f, circuit.key)
        order = self.exit_circuits.setdefault(circuit.key[0], {})
        order.pop(circuit.key, None)
        if files:
            order[circuit.key] = None  # the most recent announcement goes last
        elif not order:
            del self.exit_circuits[circuit.key[0]]
        for key, dropped in evictions.items():
            self._evict(self.circuits[key], dropped)
        self._dirty = True

    def _plan_eviction(self, exit_ip: str, held: int, over: int, keep: set) -> dict:
        """Which files of which circuits to drop so that ``over`` entries go, or MessageError.

        An exit that would hold at most its fair share (``max_entries`` over the
        exits holding entries alone, this one counted) takes room one entry at
        a time from the exit holding the most, as long as that one holds more
        than the share: an entry it holds through its circuit that announced
        least recently, held by that circuit alone, and not in this ls. The plan
        is made whole before anything changes, so a refusal changes nothing.
        """
        share = self.max_entries // (len(self.exit_entries) + (exit_ip not in self.exit_entries))
        if held > share:
            raise MessageError("busy", "the tracker's catalogue is full, and the circuits through this exit "
                                       "hold their fair share of it")
        richest = [(-n, ip) for ip, n in self.exit_entries.items() if ip != exit_ip and n > share]
        heapq.heapify(richest)
        files = {}  # exit IP -> where its scan for files to drop has got to
        plan: dict[tuple, list] = {}
        scanned = 0
        while over > 0:
            if not richest:
                raise MessageError("busy", "the tracker's catalogue is full, and no exit holds more than "
                                           "its fair share of it")
            minus_n, ip = richest[0]
            for key, f in files.setdefault(ip, self._files_through(ip)):
                scanned += 1
                if scanned > MAX_EVICTION_SCAN:
                    raise MessageError("busy", "the tracker's catalogue is full")
                if f.key not in keep and len(self.entries[f.key]) == 1:  # its circuit's alone
                    plan.setdefault(key, []).append(f)
                    over -= 1
                    if -minus_n - 1 > share:
                        heapq.heapreplace(richest, (minus_n + 1, ip))
                    else:
                        heapq.heappop(richest)
                    break
            else:
                heapq.heappop(richest)  # nothing more of it can go
        return plan

    def _files_through(self, exit_ip: str):
        """(circuit key, file) of the exit's circuits, the one that announced least recently first."""
        for key in self.exit_circuits.get(exit_ip, ()):
            for f in self.circuits[key].files:
                yield key, f

    def _evict(self, circuit: TrackedCircuit, dropped: list) -> None:
        for f in dropped:
            self._remove_source(f, circuit.key)
        gone = set(dropped)
        circuit.files = tuple(f for f in circuit.files if f not in gone)
        self.evicted += len(dropped)
        if not circuit.files:
            self._unorder(circuit)

    def forget(self, key) -> bool:
        circuit = self.circuits.pop(key, None)
        if circuit is None:
            return False
        self._withdraw(circuit)
        self._unorder(circuit)
        self.transfers.forget(circuit)
        return True

    def _unorder(self, circuit: TrackedCircuit) -> None:
        order = self.exit_circuits.get(circuit.key[0])
        if order is not None:
            order.pop(circuit.key, None)
            if not order:
                del self.exit_circuits[circuit.key[0]]

    def _withdraw(self, circuit: TrackedCircuit) -> None:
        for f in circuit.files:
            self._remove_source(f, circuit.key)
        if circuit.files:
            self._dirty = True
        circuit.files = ()

    def _add_source(self, f: SharedFile, key) -> None:
        exit_ip = key[0]
        sources = self.entries.get(f.key)
        if sources is None:
            sources = self.entries[f.key] = {}
            self.names.setdefault(f.name, set()).add(f.key)
            self.exit_entries[exit_ip] = self.exit_entries.get(exit_ip, 0) + 1
        elif f.key in self.entry_exits:
            counts = self.entry_exits[f.key]
            counts[exit_ip] = counts.get(exit_ip, 0) + 1
        else:
            alone = next(iter(sources))[0]
            if alone != exit_ip:  # a second exit: no longer held by one exit alone
                self.entry_exits[f.key] = {alone: len(sources), exit_ip: 1}
                self._count_alone(alone, -1)
        sources[key] = f

    def _remove_source(self, f: SharedFile, key) -> None:
        sources = self.entries.get(f.key)
        if sources is None or sources.pop(key, None) is None:
            return
        counts = self.entry_exits.get(f.key)
        if counts is not None:
            left = counts[key[0]] - 1
            if left:
                counts[key[0]] = left
            else:
                del counts[key[0]]
                if len(counts) == 1:  # one exit left: it holds the entry alone now
                    del self.entry_exits[f.key]
                    self._count_alone(next(iter(counts)), 1)
        elif not sources:
            del self.entries[f.key]
            self._count_alone(key[0], -1)
            keys = self.names[f.name]
            keys.discard(f.key)
            if not keys:
                del self.names[f.name]

    def _count_alone(self, exit_ip: str, change: int) -> None:
        n = self.exit_entries.get(exit_ip, 0) + change
        if n:
            self.exit_entries[exit_ip] = n
        else:
            del self.exit_entries[exit_ip]

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

    # --- source choice (§8, §13; tracker/sources.py) --------------------------------------

    def choose_source(self, request: FileRequest, requester_key, is_sealed=lambda key: False
                      ) -> tuple[TrackedCircuit, SharedFile, bool]:
        """The sharing circuit for a request, never the requester's own nor one it
        excluded or avoids, and whether the transfer is end-to-end (§13)."""
        key, usable, e2e = source_choice.choose_source(self, request, requester_key, is_sealed)
        chosen = source_choice.least_loaded(self, usable)
        return self.circuits[chosen], self.entries[key][chosen], e2e

    # --- transfers under way (tracker/transfers.py) ------------------------------------------

    def start_transfer(self, circuit: TrackedCircuit, transfer: str, size: int | None) -> None:
        self.transfers.start(circuit, transfer, size)

    def end_transfer(self, circuit: TrackedCircuit, transfer: str) -> None:
        self.transfers.end(circuit, transfer)

    def transfers_under_way(self) -> int:
        return self.transfers.total()
