"""One source's transfer for a download (PROTOCOL.md §8, §13), the requester's side.

A download asks the tracker for its missing chunks once per source: each
ask is a ``Transfer``, with the chunk indexes it claimed, its own
ephemeral key (§13) and, once the sharer's ``transfer_start`` opened, its
cipher. The tracker's reply names its transfer id; chunks may come before
it (``saw``). It ends once (``end``): its ``transfer_end``, a stall, a lie,
the download whole, or the circuit gone. ``chunks_behind`` tells the
endgame which chunks the transfers under way are slow to bring. Nothing
here does I/O.
"""

from __future__ import annotations

from twisted.internet import defer

from onion_twisted.protocol import e2e

SEEN_TRANSFERS = 16  # transfer ids remembered from chunks that came before the tracker's reply
#: Seconds without a chunk before the circuit it comes back on is probed: a node that died
#: answers nothing, so the probe's error (its neighbour's 502) is how the requester learns.
PROBE_AFTER = 1.0
#: Once chunks came, a transfer silent for this many of its mean gaps between chunks (at least
#: MIN_SILENCE seconds, at most stall_timeout) while its circuit answers has lost its source's
#: side (the sharer's circuit broke, or its exit): the block is asked of another source.
SILENT_GAPS = 20
MIN_SILENCE = 5.0
#: A source silent for this many of its mean gaps (MIN_SILENCE s at least) while the catalogue
#: lists more circuits sharing the file than when it was asked is given up then, not after
#: SILENT_GAPS: its sharer most likely lost its circuit and announced the file on a new one
#: (a sharer rebuilds at once, and its ls is the new circuit's first message), which the
#: tracker does not know the old one is gone for. The circuit is probed again at each such
#: mark of a silence: the probe's reply is the catalogue.
RECHECK_GAPS = 4
#: After this many seconds of a silence (or two of the transfer's mean gaps, when longer), and
#: then at every doubling of it, the tracker is asked whether the transfer's source circuit
#: still reaches its sharer (a ``check``, docs 17.10 choice 64): a source whose circuit lost a
#: node is given up at the first ``gone``, whatever the silence's limit. ``reachable`` keeps it
#: (a live source may be slow), and the catalogue's hint (RECHECK_GAPS) is not taken in that
#: silence: the check knows better. Doubling: under load 1 MiB chunks come seconds apart, and
#: a check every few seconds of every silence cost the network more CPU than it saved.
CHECK_AFTER = 3.0
#: Before the sharer answered at all (its transfer_start, or a chunk), at most this: a sharer
#: whose circuit broke between the tracker's request and its first chunk never answers, and
#: a live one answers within a few round trips, even under load (its start is not held by
#: its upload cap for more than its own few kilobytes).
FIRST_SILENCE = 20.0


class Transfer:
    """One request to the tracker and the transfer it brings; see the module's text."""

    __slots__ = ("claimed", "transfer", "seen", "private", "cipher", "pending_start", "e2e", "outcome", "wake",
                 "refused", "chunks", "heard_count", "first_chunk_at", "last_chunk_at", "source_failed",
                 "circuit_failed", "circuit", "asked_at", "listed", "checking", "reached_at")

    def __init__(self, claimed: list[int] | None):
        self.claimed = claimed             # chunk indexes asked of this source; None: all that are missing
        self.transfer: str | None = None   # its id, once the tracker's reply (or a transfer_start) names it
        self.seen: set[str] = set()        # ids of chunks that came before the reply: one may be ours
        self.private = None                # §13: this request's X25519 key
        self.cipher: e2e.TransferCipher | None = None  # §13: once its transfer_start checked out
        self.pending_start: tuple | None = None  # (cipher, leaves, chunk size) waiting for the root or size
        self.e2e: bool | None = None       # whether the tracker made it end to end (None: no reply yet)
        self.outcome: str | None = None    # how it ended ("ok" or why not); None while under way
        self.wake: defer.Deferred | None = None
        self.refused = 0                   # its chunks that did not authenticate
        self.chunks = 0                    # its chunks written
        self.heard_count = 0               # its chunks that came, copies another source brought first too
        self.first_chunk_at: float | None = None
        self.last_chunk_at: float | None = None
        self.source_failed = False         # it ended by its source's doing: lied, went silent, stopped
        self.circuit_failed = False        # it ended because the peer's circuit broke: ask again on the next
        self.circuit = None                # the peer's circuit its request went on (its chunks come back on it)
        self.asked_at: float | None = None  # when its request went to the tracker
        self.listed: int | None = None     # circuits the catalogue listed sharing the file when it was asked
        self.checking = False              # a check of its source is under way (one at a time)
        self.reached_at: float | None = None  # when a check last answered that its source is reachable

    def matches(self, transfer) -> bool:
        """Whether a chunk or end of ``transfer`` is this one's: its id, or before the reply one it saw."""
        return transfer == self.transfer or (self.transfer is None and transfer in self.seen)

    def saw(self, transfer: str) -> None:
        """A chunk came before the tracker's reply: its transfer may be this one (bounded)."""
        if len(self.seen) < SEEN_TRANSFERS:
            self.seen.add(transfer)

    @property
    def answered(self) -> bool:
        """Whether its sharer answered: a chunk came, or its transfer_start opened (§13)."""
        return self.heard_count > 0 or self.cipher is not None or self.pending_start is not None

    def heard(self, now: float) -> None:
        """One of its chunks came (authenticated, when end to end)."""
        self.heard_count += 1
        if self.first_chunk_at is None:
            self.first_chunk_at = now
        self.last_chunk_at = now
        self.poke()  # the wait re-arms its probe and silence timers from now

    def poke(self) -> None:
        """Wake the wait to look again (a chunk came, or the catalogue changed)."""
        if self.wake is not None and not self.wake.called:
            self.wake.callback(None)

    def mean_gap(self) -> float | None:
        """Seconds between its chunks on average; None before two came."""
        if self.heard_count < 2:
            return None
        return (self.last_chunk_at - self.first_chunk_at) / (self.heard_count - 1)

    def fresh_estimate(self, chunks: int) -> float | None:
        """Seconds a request like this one would take to bring ``chunks`` chunks, from how
        this one went: its wait for the first chunk, then its mean gap (None before a chunk)."""
        if self.asked_at is None or self.first_chunk_at is None:
            return None
        start = max(0.0, self.first_chunk_at - self.asked_at)
        gap = self.mean_gap()
        return start + (chunks - 1) * (gap if gap is not None else start)

    def end(self, outcome: str, source_failed: bool = False, circuit_failed: bool = False) -> None:
        """The transfer is over; the first outcome counts. ``source_failed``: by its source's
        doing, so another source may be asked for what it did not bring; ``circuit_failed``:
        the peer's circuit broke, so the same may be asked again on another."""
        if self.outcome is None:
            self.outcome = outcome
            self.source_failed = source_failed
            self.circuit_failed = circuit_failed
            if self.wake is not None and not self.wake.called:
                self.wake.callback(None)

    def silence_limit(self, stall_timeout: float) -> float:
        """Seconds without a chunk after which the source is given up: until two chunks came,
        FIRST_SILENCE (or, for a transfer of everything whose sharer answered, half
        ``stall_timeout``: a capped sharer's first chunk may be slow), then SILENT_GAPS of its mean gap
        (MIN_SILENCE at least); never more than ``stall_timeout``."""
        if self.heard_count < 2:
            # A block of several sources' download goes to another source: FIRST_SILENCE. A
            # sole source asked for everything that answered gets half the stall timeout for
            # its first chunks: its upload cap may be low (under churn, its circuit may be gone).
            patient = self.answered and self.claimed is None
            return stall_timeout / 2 if patient else min(stall_timeout, FIRST_SILENCE)
        gap = self.mean_gap()
        return min(stall_timeout, max(MIN_SILENCE, SILENT_GAPS * gap))

    def check_after(self) -> float:
        """Seconds of silence before its first check (CHECK_AFTER, or two mean gaps)."""
        gap = self.mean_gap()
        return CHECK_AFTER if gap is None else max(CHECK_AFTER, 2 * gap)

    def recheck_after(self) -> float | None:
        """Seconds of silence between looks for a replaced source (RECHECK_GAPS of its mean
        gap, MIN_SILENCE at least); None before two chunks came."""
        gap = self.mean_gap()
        return None if gap is None else max(MIN_SILENCE, RECHECK_GAPS * gap)

    async def wait_for_end(self, clock, stall_timeout: float, probe=None, replaced=None, check=None) -> str:
        """Until ``end``, or ``silence_limit`` seconds after its last chunk (or its start).
        ``probe()`` is called once PROBE_AFTER seconds pass without a chunk, and then at
        every ``recheck_after`` of the same silence: it checks the circuit (a broken one
        ends this transfer through the downloader, at once), and its reply refreshes the
        catalogue (``poke`` then wakes this wait). ``replaced()``: whether the catalogue
        lists more circuits sharing the file than ``listed``; from ``recheck_after`` of
        silence on, that gives the source up."""
        started, silence, probes = clock.seconds(), None, 0
        while self.outcome is None:
            since = self.last_chunk_at if self.last_chunk_at is not None else started
            if since != silence:
                silence, probes, checks = since, 0, 0  # a new silence: its probes start again
            quiet = clock.seconds() - since
            limit = self.silence_limit(stall_timeout)
            if quiet >= limit:
                self.end(f"stalled: no chunk for {limit:.0f} s", source_failed=True)
                break
            recheck = self.recheck_after()
            # A check that reached the source in this silence knows better than the catalogue.
            reached = self.reached_at is not None and self.reached_at >= since
            if replaced is not None and recheck is not None and quiet >= recheck and not reached and replaced():
                self.end(f"no chunk for {quiet:.0f} s, and a new circuit shares the file", source_failed=True)
                break
            # When the next probe of this silence is due: after PROBE_AFTER, then every recheck.
            due = PROBE_AFTER if probes == 0 else None if recheck is None else probes * recheck
            if probe is not None and due is not None and quiet >= due:
                probes += 1
                probe()
                continue
            check_due = self.check_after() * 2 ** checks
            if check is not None and quiet >= check_due:
                checks += 1
                check()
                continue
            left = limit - quiet
            if probe is not None and due is not None:
                left = min(left, due - quiet)
            if check is not None:
                left = min(left, check_due - quiet)
            wake = self.wake = defer.Deferred()
            timer = clock.callLater(left, lambda: wake.called or wake.callback(None))
            await wake
            if timer.active():
                timer.cancel()
        return self.outcome


def chunks_behind(transfers, have, now: float, fresh: float) -> set[int]:
    """The chunks ``transfers`` are bringing that a fresh request, ``fresh`` seconds away,
    would likely bring sooner: what an endgame copy is worth asking for (docs 17.10, choice 62).

    ``have[i]`` is nonzero for a chunk received. A source sends its block in order, so the
    k-th chunk it still owes is expected k gaps from now, a gap being its mean gap between
    chunks, or its silence so far when longer (a source gone quiet is not counted on). A
    transfer with fewer than two chunks has no gap yet: all it owes is behind once it has
    waited longer than ``fresh``.
    """
    behind: set[int] = set()
    for t in transfers:
        if t.outcome is not None or t.claimed is None:
            continue
        owed = [i for i in t.claimed if not have[i]]
        last = t.last_chunk_at if t.last_chunk_at is not None else t.asked_at
        since = now - last if last is not None else 0.0
        gap = t.mean_gap()
        if gap is None:
            if since > fresh:
                behind.update(owed)
            continue
        gap = max(gap, since)
        if gap > 0:  # the k-th owed (from 0) is due in (k + 1) gaps: late from k = fresh // gap on
            behind.update(owed[int(fresh // gap):])
    return behind
