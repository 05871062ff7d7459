"""One attempt of a download (PROTOCOL.md §8, §13): its sources, each a transfer.

An attempt asks the tracker for the missing chunks through the circuit.
When the catalogue lists more than one circuit sharing the file, it asks
up to ``max_sources`` of them at once: each *slot* claims a block of the
chunks nobody asked for yet (smaller as fewer are left, so a fast source
comes back for more sooner and brings more), asks the tracker for it
naming the transfers already under way (``avoid``: another source, if
there is one), and when the block is in, claims the next. When no chunk is
left unclaimed, an idle slot asks another source for what a slower one is
still bringing, if that one would bring it later than a new request would
(endgame): the first copy counts, the other is dropped. A source that
stops (killed, stalled, excluded for lying) leaves its block to the
others. With one source, one transfer asks for everything, as before
swarming.

The attempt ends when every slot has ended; whether the download is then
whole, verified or asked again is the downloader's call (``Downloader``).
"""

from __future__ import annotations

from twisted.internet import defer

from onion_twisted.peer.downloads import Download
from onion_twisted.peer.transfer import Transfer, chunks_behind
from onion_twisted.protocol import checks, e2e, merkle
from onion_twisted.protocol.chunks import ENDGAME_CHUNKS, index_ranges
from onion_twisted.protocol.errors import ProtocolError
from onion_twisted.protocol.messages import MAX_EXCLUDED, is_sha256, request_message

# Errors of a request that mean "nobody (else) to ask", not a broken circuit.
NOBODY = ("not_found", "no_source")
# How a transfer ends whose source circuit the tracker's check found gone (docs choice 64).
SOURCE_GONE = "its source's circuit is gone (the tracker's check)"
# Transfers in a row one slot may see end without a chunk before it gives up its place.
MAX_FRUITLESS = 3
# An endgame slot with no chunk worth a copy looks again after what a request of its own
# takes (the time a chunk owed becomes worth one), within these bounds in seconds.
MIN_ENDGAME_LOOK, ENDGAME_LOOK = 0.1, 1.0


class SlotResult:
    """How one slot ended: why, and whether that alone means the file cannot be had now."""

    __slots__ = ("why", "fatal", "progress", "ask_again", "away", "spare_failed")

    def __init__(self, why: str, fatal: bool = False, progress: int = 0, ask_again: bool = False,
                 away: bool = False, spare_failed: bool = False):
        self.why, self.fatal, self.progress = why, fatal, progress
        self.ask_again = ask_again  # the source or the circuit failed, another may not: the slot asks again
        self.away = away  # nobody shares it now, but someone did: its sharer may be between circuits
        # The circuit the slot had just moved to (a spare, in_hand) failed its request: it had
        # lost a node unseen. Neither the source's fault nor the slot's: not counted as fruitless.
        self.spare_failed = spare_failed


class Attempt:
    """One attempt of ``download`` with at most ``sources`` slots, over the circuits of
    ``keeper`` (``circuit``: its connected one when the attempt starts). Each request
    goes on the keeper's circuit of the moment: once it is replaced, the next block's
    request goes on the new one, and the old one drains. When it broke, the attempt
    moves to another download circuit connected then (``CircuitPool.in_hand``):
    ``keeper`` is the one it holds at the end."""

    def __init__(self, downloader, download: Download, keeper, circuit, sources: int):
        self.downloader = downloader
        self.d = download
        self.keeper = keeper
        self.circuit = circuit
        self.sources = max(1, sources)
        self.refused_on: dict = {}  # circuit -> chunks that came on it and did not authenticate
        self._answered: defer.Deferred | None = None  # the newest slot's first answer from the tracker
        self._idle_slots: list[defer.Deferred] = []  # endgame slots waiting to look again (_idle)

    async def run(self) -> list[SlotResult]:
        d = self.d
        if self.circuit.sealed:
            # End to end (§13): whole pieces; the reply's chunk_size is the one asked, e2e or not.
            d.chunk_size = merkle.e2e_chunk_size(d.chunk_size)
        if d.chunks is None and d.size is not None and self.sources > 1:
            d.expect(d.size, d.chunk_size, None)  # the catalogue's size: blocks can be claimed now
        slots = [self._start_slot(first=True)]
        if d.chunks is not None:
            # One slot after the other, each once the one before has its transfer: its
            # request then names it in ``avoid``, and the tracker picks another source.
            for _ in range(self.sources - 1):
                await self._answered
                if self.downloader.stopped or d.chunks.complete or all(s.called for s in slots):
                    break
                slots.append(self._start_slot())
        try:
            return list(await defer.gatherResults(slots, consumeErrors=True))
        except defer.FirstError as e:
            d.end_transfers("the download stopped")  # the other slots end too
            e.subFailure.raiseException()

    def _start_slot(self, first: bool = False) -> defer.Deferred:
        answered = self._answered = defer.Deferred()
        slot = defer.ensureDeferred(self._slot(first))
        slot.addBoth(lambda result: (answered.called or answered.callback(None), result)[1])
        return slot

    def _tracker_answered(self) -> None:
        if self._answered is not None and not self._answered.called:
            self._answered.callback(None)

    async def _slot(self, first: bool = False) -> SlotResult:
        d, progress, result, fruitless = self.d, 0, SlotResult("nothing left to ask for"), 0
        fresh = None  # seconds a request of this slot takes for an endgame's chunks, once known
        while not self.downloader.stopped:
            if d.chunks is not None and d.chunks.complete:
                return SlotResult("ok", progress=progress)
            claimed = None
            if d.chunks is not None and (self.sources > 1 or d.chunks.have):
                claimed = d.claim(self.sources, endgame=self.sources > 1, behind=self._behind(fresh))
                if claimed is None:
                    return SlotResult(result.why, progress=progress)
                if not claimed:
                    await self._idle(fresh)
                    continue
            t = d.new_transfer(claimed)
            try:
                result = await self._transfer(t, ask_first=first and progress == 0)
            finally:
                d.release(t)
                if t.refused:
                    self.refused_on[t.circuit] = self.refused_on.get(t.circuit, 0) + t.refused
                self._wake_idle()
            progress += t.chunks
            fruitless = 0 if t.chunks else fruitless + (0 if result.spare_failed else 1)
            fresh = t.fresh_estimate(ENDGAME_CHUNKS) if t.chunks else fresh
            if result.ask_again and fruitless < MAX_FRUITLESS:
                # That source failed (lied, went silent, stopped; the tracker picks another), or
                # the circuit did (the keeper builds the next): ask again for what is missing,
                # from the chunk reached, in the same attempt.
                continue
            if result.why != "ok" or claimed is None or not t.chunks:
                # Nobody else to ask, the circuit failed, or it asked for everything: the slot
                # ends, and what it claimed goes to the others.
                result.progress = progress
                return result
        return SlotResult("the peer stopped", progress=progress)

    async def _idle(self, fresh: float | None) -> None:
        """An endgame slot with nothing worth a copy yet: until another slot's transfer
        ends (the file may be whole, or chunks free again) or about ``fresh`` seconds pass."""
        seconds = ENDGAME_LOOK if fresh is None else min(ENDGAME_LOOK, max(MIN_ENDGAME_LOOK, fresh))
        waiting = defer.Deferred()
        self._idle_slots.append(waiting)
        timer = self.downloader.clock.callLater(seconds, self._wake_idle)
        try:
            await waiting
        finally:
            if timer.active():
                timer.cancel()

    def _wake_idle(self) -> None:
        idle, self._idle_slots = self._idle_slots, []
        for waiting in idle:
            waiting.callback(None)

    def _behind(self, fresh: float | None):
        """For the endgame: the chunks worth a copy (``chunks_behind``), or None (any) while
        this slot does not know yet how long one of its requests takes."""
        if fresh is None:
            return None
        d, clock = self.d, self.downloader.clock
        return lambda: chunks_behind(d.transfers, d.chunks.bits, clock.seconds(), fresh)

    async def _transfer(self, t: Transfer, ask_first: bool) -> SlotResult:
        """Ask the tracker for ``t``'s chunks and wait for the transfer to end."""
        downloader, d = self.downloader, self.d
        # A circuit that broke is being rebuilt: the request goes on a spare already connected.
        keeper = downloader.circuits.in_hand(self.keeper)
        moved, self.keeper = keeper is not self.keeper, keeper
        try:
            t.circuit = await keeper.ready()
            request = self._request(t)
            t.asked_at = downloader.clock.seconds()
            t.listed = downloader.count_sources(d.name, d.sha256, d.root)
            reply = await keeper.send_on(t.circuit, request)
        except ProtocolError as e:
            self._tracker_answered()
            return SlotResult(f"circuit failed: {e.detail}", ask_again=True, spare_failed=moved)
        if isinstance(reply, dict) and reply.get("type") == "transfer" and isinstance(reply.get("transfer"), str):
            t.transfer = reply["transfer"]
        # Only now: the next slot's ``avoid`` names this transfer (its start runs inside this call).
        self._tracker_answered()
        if not isinstance(reply, dict):
            return SlotResult("the tracker gave no answer")
        if reply.get("type") == "error":
            if reply.get("error") == "source_failed":
                return SlotResult(str(reply.get("detail")), ask_again=True)  # the tracker forgot it
            return self._refused(reply, request, ask_first)
        if t.transfer is None:
            return SlotResult("the tracker's answer is not a transfer")
        size, sha = reply.get("size"), reply.get("sha256")
        root = reply.get("root") if is_sha256(reply.get("root")) else None
        chunk_size = reply.get("chunk_size", d.chunk_size)
        t.e2e = reply.get("e2e") is True and t.private is not None and root is not None
        d.taken_e2e(t.e2e)
        if not t.e2e:
            t.private = t.pending_start = None  # §8's transfer: no transfer_start will come
        if isinstance(size, int) and isinstance(chunk_size, int):
            try:
                d.expect(size, chunk_size, sha if isinstance(sha, str) else None, root)
            except ValueError as e:  # more chunks than a download may have (chunks.MAX_CHUNKS)
                return SlotResult(f"this peer does not download that file: {e}", fatal=True)
        elif isinstance(sha, str):
            d.expect(None, d.chunk_size, sha)  # no size: only the sha256 is learnt
        if t.pending_start is not None:
            downloader.check_start(d, t, *t.pending_start)
        downloader.take_orphan_end(d, t)
        if d.chunks is not None and d.chunks.complete:
            t.end("ok")  # nothing was missing (or a zero-byte file)
        outcome = await t.wait_for_end(downloader.clock, downloader.stall_timeout,
                                       probe=lambda: self._probe(t), replaced=lambda: self._replaced(t),
                                       check=lambda: self._check(t))
        # A circuit that broke: the next one may bring the rest. A source that lied, went
        # silent or stopped serving: another may serve the block, or the same, when it had
        # brought some (a sharer that refused a request for everything it would refuse again:
        # the attempt ends, and the next comes after a pause). A source whose circuit is gone
        # refused nothing: its sharer is between circuits (choice 65), and the tracker forgot
        # that circuit, so the request goes to another (or finds none, and the download waits).
        gone = outcome == SOURCE_GONE
        again = t.circuit_failed or gone or (t.source_failed and (t.claimed is not None or t.chunks > 0))
        if t.source_failed and outcome != "ok":
            # No name: what an operator needs is how often sources go quiet, and after how long.
            downloader.log.info("a download's source was given up ({why}); {next}", why=outcome,
                                next="asking again" if again else "this attempt ends")
        return SlotResult(outcome, ask_again=outcome != "ok" and again, away=gone)

    def _probe(self, t: Transfer) -> None:
        """A ``list`` on the circuit ``t``'s chunks come back on (``CircuitKeeper.probe``):
        its reply is the catalogue, which may now list its sharer's new circuit."""
        def take(reply) -> None:
            self.downloader.take_catalogue(reply)
            t.poke()
        self.downloader.circuits.probe(t.circuit, take)  # its keeper's: the attempt may have moved on

    def _check(self, t: Transfer) -> None:
        """Ask the tracker whether ``t``'s source circuit still reaches its sharer (one check
        at a time): ``gone`` gives the source up now. Only on a sealed circuit, whose tracker
        speaks this project's /2 (docs 17.10, choice 64); a tracker that does not know the
        message answers ``bad_request``, and is not asked again."""
        downloader = self.downloader
        keeper = downloader.circuits.owner(t.circuit)
        if (not downloader.source_checks or t.checking or t.transfer is None or t.outcome is not None
                or not t.circuit.sealed or keeper is None):
            return
        t.checking = True

        def take(reply) -> None:
            state = checks.checked_state(reply, t.transfer)
            if state == checks.GONE:
                t.end(SOURCE_GONE, source_failed=True)
            elif state == checks.REACHABLE:
                t.reached_at = downloader.clock.seconds()
            elif state is None and isinstance(reply, dict) and reply.get("error") == "bad_request":
                downloader.source_checks = False

        d = defer.ensureDeferred(keeper.send_on(t.circuit, checks.check_message(t.transfer)))
        d.addCallbacks(take, lambda f: f.trap(ProtocolError))  # a broken circuit: the keeper's to handle
        d.addBoth(lambda _: setattr(t, "checking", False))

    def _replaced(self, t: Transfer) -> bool:
        """Whether the catalogue lists more circuits sharing the file than when ``t`` was asked."""
        d = self.d
        return t.listed is not None and self.downloader.count_sources(d.name, d.sha256, d.root) > t.listed

    def _request(self, t: Transfer) -> dict:
        """``t``'s ``request``: on a sealed circuit with a fresh key (§13), in whole pieces,
        naming the root when known, the chunks it claimed, and the transfers under way."""
        d = self.d
        chunk_size, key = d.chunk_size, None
        if t.circuit.sealed:
            t.private = e2e.new_private()
            key = e2e.public_bytes(t.private)
        ranges = None
        if t.claimed is not None:
            ranges = index_ranges(t.claimed)
        elif d.chunks is not None and d.chunks.have and d.chunks.chunk_size == chunk_size:
            ranges = d.chunks.missing_ranges()
        avoid = [o.transfer for o in d.transfers if o is not t and o.transfer][-MAX_EXCLUDED:]
        return request_message(d.name, chunk_size, d.sha256, ranges, root=d.root, key=key, exclude=d.excluded,
                               avoid=avoid)

    def _refused(self, reply: dict, request: dict, ask_first: bool) -> SlotResult:
        """The tracker answered a request with an error: why the slot ends, and whether
        that means the file cannot be had now (nothing on disk, nobody to ask)."""
        d = self.d
        why = str(reply.get("detail") or reply.get("error"))
        if reply.get("error") not in NOBODY:
            return SlotResult(why)
        if not ask_first or "avoid" in request:
            return SlotResult(why)  # another slot's source is the only one: not an end
        if reply.get("error") == "no_source" and d.excluded:
            # Every source left sent data that does not match the file: another may come.
            return SlotResult("every source of this file sent data that does not match it; waiting for another")
        why = "nobody shares this file" if reply.get("error") == "not_found" else "only this peer shares this file"
        # Part of the file on disk means someone shared it, and so does a catalogue that listed
        # it (the root it gave, or a source still listed): its sharer may be between circuits (a
        # node of its circuit died, or it restarted). Then it is asked again later.
        listed = reply.get("error") == "not_found" and (
            d.root is not None or self.downloader.count_sources(d.name, d.sha256, d.root))
        away = bool(d.chunks is not None and d.chunks.have) or bool(listed)
        return SlotResult(why, fatal=not away, away=away)
