"""The peer's downloader (PROTOCOL.md §8, §13): what its user asks for, fetched and verified.

A download is a series of attempts (at most ``max_attempts``, a growing
pause between them). An attempt asks the tracker, through the circuit, for
the chunks still missing; the sharer's chunks and its ``transfer_end`` come
back on the circuit (``on_chunk``, ``on_transfer_end``). The attempt ends
with the transfer, after ``stall_timeout`` seconds without a chunk, or when
the circuit breaks; a complete file is then verified and moved into place.
A download's state is its own (``downloads.Download``): this module only
asks it to move.

End to end (§13): on a sealed circuit a request carries a fresh X25519 key
and the file's root (from the catalogue). The sharer's ``transfer_start``
may come before the tracker's reply: each download waiting for its
transfer tries its own key on the sealed leaf row, and only the right one
opens it. A chunk that does not authenticate is dropped and counted, and the
circuit it came on is replaced after the transfer (the tamperer may be on
it); a chunk or leaf row that authenticates but does not match the root
ends the transfer, and its source is named in the next request's
``exclude``.
"""

from __future__ import annotations

from twisted.internet import defer, task, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from onion_twisted.peer.download_state import ACTIVE, DONE, FAILED, IN_TRANSFER, BadChunk, SourceLied
from onion_twisted.peer.download_store import DownloadStore
from onion_twisted.peer.downloads import Download
from onion_twisted.peer.safe_log import log_unexpected
from onion_twisted.peer.attempt import Attempt
from onion_twisted.peer.transfer import Transfer
from onion_twisted.protocol import e2e
from onion_twisted.protocol.errors import Conflict, ProtocolError, RateLimited, safe_os_error
from onion_twisted.protocol.bridged import is_sealed_chunk, parse_sealed_chunk, parse_transfer_start
from onion_twisted.protocol.messages import DEFAULT_CHUNK, MessageError, check_name, check_sha256

MAX_DOWNLOADS = 256     # downloads listed at once; the oldest finished or failed make room
MAX_ORPHAN_ENDS = 1000  # transfer_end messages kept for a reply still under way
ORPHAN_END_TTL = 120.0  # seconds one is kept
MAX_PAUSE = 30          # seconds between attempts, at most
#: Seconds without a new chunk for which a download someone shared (part of it on disk, or
#: listed) waits for a sharer between circuits, asking every AWAY_PAUSE s (a not_found costs the
#: tracker a lookup), before its attempts count to ``max_attempts`` (docs 17.10, choice 65).
AWAY_GRACE, AWAY_PAUSE = 120.0, 1.0


class Downloader:
    log = Logger()

    def __init__(self, *, clock, circuits, store: DownloadStore, chunk_size: int = DEFAULT_CHUNK,
                 max_attempts: int = 5, stall_timeout: float = 60.0, run_in_thread=threads.deferToThread,
                 unsafe_logging: bool = False, find_root=lambda name, sha256: None,
                 count_sources=lambda name, sha256, root: 0, max_sources: int = 4,
                 take_catalogue=lambda reply: None):
        """``find_root(name, sha256) -> (root, size) | None``: the file's Merkle root as the
        catalogue lists it, asked for in the request so the sharer's leaf row is checked
        the moment it arrives. ``count_sources(name, sha256, root)``: how many circuits the
        catalogue says share it; up to ``max_sources`` of them are asked at once.
        ``take_catalogue(reply)``: the tracker's ``files`` reply to a probe of a download's
        circuit, for the catalogue that ``count_sources`` reads.
        ``circuits``: the peer's ``CircuitPool``; each attempt takes a download circuit of it."""
        self.clock = clock
        self.find_root = find_root
        self.count_sources = count_sources
        self.take_catalogue = take_catalogue
        self.max_sources = max_sources
        self.circuits = circuits
        self.store = store
        self.chunk_size = chunk_size
        self.max_attempts = max_attempts
        self.stall_timeout = stall_timeout
        self.run_in_thread = run_in_thread
        self.unsafe_logging = unsafe_logging
        self.downloads: dict[str, Download] = {}
        self.orphan_ends: dict[str, tuple[float, dict]] = {}  # transfer_end that beat the reply
        self.stopped = False
        self.source_checks = True  # False once the tracker answered a check bad_request (attempt.py)

    # --- the lifecycle ---------------------------------------------------------------------

    def restore(self) -> None:
        """The downloads an earlier run left unfinished, listed again."""
        for record in self.store.resumable():
            d = self.store.restore(record, self.chunk_size)
            self.downloads[d.name] = d

    def resume(self) -> None:
        """Run every listed download that did not fail."""
        for d in list(self.downloads.values()):
            if d.state != FAILED:
                self._run(d)

    def stop(self) -> None:
        self.stopped = True
        for d in self.downloads.values():
            if d.state in ACTIVE:
                d.save_record()
                # Wake the attempt waiting for its transfer_end now: left to its stall
                # timer it would write its record again later, over a newer run's.
                d.end_transfers("the peer stopped")
            d.close()

    def circuit_broken(self, circuit, why: str) -> None:
        # The transfers that came back on that circuit are over. Their slots ask again,
        # on the next circuit, for what is missing (not after stall_timeout).
        for t in self._transfers_on(circuit):
            t.end(f"circuit broken ({why})", circuit_failed=True)

    def busy_on(self, circuit) -> bool:
        """Whether a transfer still comes back on ``circuit`` (a replaced one drains until not)."""
        return any(True for _ in self._transfers_on(circuit))

    def _transfers_on(self, circuit):
        for d in self.downloads.values():
            if d.state in IN_TRANSFER:
                yield from (t for t in d.transfers if t.circuit is circuit and t.outcome is None)

    # --- what the user asks ----------------------------------------------------------------

    def download(self, name, sha256=None) -> Download:
        """Start (or return the running) download of ``name``; ValueError for bad input,
        RateLimited when MAX_DOWNLOADS are listed and none of them has finished or failed."""
        try:
            name = check_name(name)  # NFC, as the tracker and the sharers name it
            if sha256 is not None:
                check_sha256(sha256)
        except MessageError as e:
            raise ValueError(e.detail) from None
        current = self.downloads.get(name)
        if current is not None and current.state in ACTIVE:
            return current
        if current is not None and current.state == DONE and current.final_path is not None \
                and current.final_path.exists() and sha256 in (None, current.sha256):
            return current  # already here and verified: no second transfer
        d = Download(self.store, name, sha256, self.chunk_size)
        if current is not None and current.state == FAILED and current.chunks is not None \
                and (sha256 is None or sha256 == current.sha256):
            d = current  # keep what the failed attempts already wrote
            d.restart()
        if current is None and len(self.downloads) >= MAX_DOWNLOADS:
            over = [n for n, old in self.downloads.items() if old.state not in ACTIVE]
            if not over:
                raise RateLimited(f"{MAX_DOWNLOADS} downloads are under way; wait for one to end")
            del self.downloads[over[0]]  # the oldest that ended (its file or record stays on disk)
        self.downloads[name] = d
        self._run(d)
        return d

    def retry(self, name: str) -> Download:
        """Start a failed download again (the page's Retry), keeping the chunks it has.

        LookupError when no download of ``name`` is listed; Conflict unless it failed.
        """
        d = self.downloads.get(name)
        if d is None:
            raise LookupError(name)
        if d.state != FAILED:
            raise Conflict(f"the download is {d.state.value}: only a failed one is retried")
        d = self.download(name, d.sha256)
        d.save_record()  # no longer marked failed: a restart now resumes it
        return d

    def dismiss(self, name: str) -> None:
        """Take a failed or finished download off the list (the page's Dismiss).

        A failed one's partial data goes too (else a restart would list it
        again); a finished file stays in ``downloads``. LookupError when none
        is listed; Conflict while it is under way.
        """
        d = self.downloads.get(name)
        if d is None:
            raise LookupError(name)
        if d.state in ACTIVE:
            raise Conflict(f"the download is {d.state.value}: only a failed or finished one is dismissed")
        del self.downloads[name]
        if d.state == FAILED:
            d.discard_partial()

    def status(self, now: float) -> list[dict]:
        return [d.status(now) for d in self.downloads.values()]

    # --- attempts ----------------------------------------------------------------------------

    def _run(self, d: Download) -> None:
        defer.ensureDeferred(self._download(d)).addErrback(self._crashed, d)

    def _crashed(self, failure: Failure, d: Download) -> None:
        log_unexpected(self.log, "a download stopped unexpectedly", failure, self.unsafe_logging)
        d.fail(f"stopped unexpectedly: {safe_os_error(failure.value)}")
        d.close()

    async def _download(self, d: Download) -> None:
        # Only attempts that brought nothing count towards max_attempts, and only they make
        # the next wait: one that ended short with new chunks (its circuit or its sources went
        # away, as under churn) is followed by the next at once, from the chunk it reached.
        why, fruitless, gained_at = None, 0, self.clock.seconds()
        while fruitless < self.max_attempts and not self.stopped:
            held = d.chunks.have if d.chunks is not None else 0
            why, away = await self._attempt(d)
            if d.state in (DONE, FAILED):
                return
            gained = d.chunks is not None and d.chunks.have > held
            if gained:
                gained_at = self.clock.seconds()
            fruitless = 0 if gained else fruitless + 1
            pause = min(2 ** (fruitless - 1), MAX_PAUSE)
            if away and self.clock.seconds() - gained_at < AWAY_GRACE:
                # Its only sharer lost its circuit and has not announced on a new one yet (under
                # churn its builds may fail for tens of seconds): as a BitTorrent client waits
                # for peers, the download waits, asking often, and the attempt does not count yet.
                fruitless, pause = min(fruitless, self.max_attempts - 1), AWAY_PAUSE
            d.attempt_failed(why, fruitless, self.max_attempts)
            if not gained:
                await task.deferLater(self.clock, pause, lambda: None)
        if not self.stopped:
            d.fail(f"gave up after {fruitless} attempts: {why}")
            d.save_record()  # marked failed: a restart shows it, and does not try again by itself
            d.close()

    async def _attempt(self, d: Download) -> tuple[str, bool]:
        """One attempt (``attempt.Attempt``): why it ended, and whether nobody shared the
        file then though someone did (``SlotResult.away``). Whether the download is over,
        its state says."""
        d.start_request()
        keeper, attempt = self.circuits.for_download(), None
        try:
            try:
                circuit = await keeper.ready()
            except ProtocolError as e:
                d.requeue()
                return f"no circuit: {e.detail}", False
            self._look_up(d)
            attempt = Attempt(self, d, keeper, circuit, self._sources(d))
            results = await attempt.run()
        finally:
            self.circuits.release(keeper if attempt is None else attempt.keeper)  # it may have moved
        for tampered, count in attempt.refused_on.items():
            # Chunks that did not authenticate were altered or forged on the way: the
            # tamperer may be on that circuit, so the next attempt goes over another.
            self.circuits.broken(tampered, f"{count} chunks did not authenticate")
        if self.stopped:
            return results[0].why, False  # stop() saved the record: a stopped peer writes nothing more
        if d.chunks is not None and d.chunks.complete:
            if await d.finish(self.run_in_thread):
                return "done", False
            return "the file's sha256 did not match; partial data discarded", False  # finish queued it again
        first = results[0]
        if first.fatal and not any(r.progress for r in results):
            d.fail(first.why)
            d.save_record()  # a record left by an earlier run stays failed across restarts
            return first.why, False
        d.save_record()
        why = next((r.why for r in results if r.why != "ok"), "the transfer ended with chunks missing")
        return why, any(r.away for r in results)

    def _look_up(self, d: Download) -> None:
        """The file's root and size from the catalogue, when the download does not know them."""
        if d.root is not None:
            return
        found = self.find_root(d.name, d.sha256)
        if found is None:
            return
        if d.chunks is None:
            d.root, d.size = found
        elif found[1] == d.chunks.size:
            d.root = found[0]

    def _sources(self, d: Download) -> int:
        """How many sources to ask at once: what the catalogue lists, at most ``max_sources``."""
        listed = self.count_sources(d.name, d.sha256, d.root)
        if d.size is None or not listed:
            return 1
        return max(1, min(self.max_sources, listed))

    # --- chunks, transfer_start and transfer_end arriving on the circuit ---------------------

    def on_chunk(self, message: dict) -> None:
        if is_sealed_chunk(message):
            self._on_sealed_chunk(message)
            return
        name = message.get("file")
        d = self.downloads.get(name) if isinstance(name, str) else None
        transfer = message.get("transfer")
        if d is None or d.state not in IN_TRANSFER or not isinstance(transfer, str):
            return  # nobody asked: dropped (§8)
        t = d.find_transfer(transfer)
        if t is None:
            # Chunks may overtake the tracker's reply: a transfer still waiting for its
            # reply may be this one (an earlier attempt's chunk is not taken).
            t = next((t for t in d.transfers if t.transfer is None), None)
            if t is None:
                return
            t.saw(transfer)
        if t.e2e:
            return  # that transfer is end to end: a chunk naming the file is not its
        self._write(d, t, lambda: d.write_chunk(message, self.clock.seconds(), t))

    def _write(self, d: Download, t: Transfer, write) -> None:
        """``write()`` one chunk of ``t`` (§8 or §13) into ``d``, and take what follows."""
        try:
            write()
        except BadChunk as e:
            self.log.warn("a chunk was refused: {why}", why=str(e))
        except SourceLied as e:
            self._exclude(d, t, str(e))
        except OSError as e:
            # The disk, not the sharer (full, read-only, gone): this attempt ends, and
            # a later one resumes from what was written. Safe logging: no path.
            self.log.error("a download could not write its chunk: {why}", why=safe_os_error(e))
            d.end_transfers(f"cannot write the download: {safe_os_error(e)}")
        if d.chunks is not None and d.chunks.complete:
            d.end_transfers("ok")  # every chunk is in: the transfers still under way (endgame copies) are over

    def on_transfer_start(self, message: dict) -> None:
        """The sharer's key and sealed leaf row (§13): for the transfer whose key opens it."""
        try:
            start = parse_transfer_start(message)
        except MessageError:
            return
        for d in self.downloads.values():
            if d.state not in IN_TRANSFER:
                continue
            for t in d.transfers:
                if t.private is None or t.cipher is not None or t.transfer not in (None, start.transfer):
                    continue
                try:
                    cipher = e2e.requester_side(t.private, start.key, start.transfer)
                    leaves = cipher.open_leaves(start.leaves)
                except (e2e.ChunkRefused, e2e.TransferKeyError):
                    continue  # not this transfer (or forged)
                t.transfer = start.transfer  # only the holder of t's key could have sealed it
                self.check_start(d, t, cipher, leaves, start.chunk_size)
                return

    def check_start(self, d: Download, t: Transfer, cipher, leaves: bytes, chunk_size: int) -> None:
        """``t``'s leaf row, opened: checked now, or once the reply names the root and size."""
        if d.root is None or d.size is None:
            t.pending_start = (cipher, leaves, chunk_size)
            return
        try:
            d.begin_e2e(t, cipher, leaves, chunk_size)
        except SourceLied as e:
            self._exclude(d, t, str(e))
        except ValueError as e:  # more chunks than a download may have
            t.end(f"this peer does not download that file: {e}")

    def _on_sealed_chunk(self, message: dict) -> None:
        try:
            chunk = parse_sealed_chunk(message)
        except MessageError:
            return
        for d in self.downloads.values():
            if d.state not in IN_TRANSFER:
                continue
            t = next((t for t in d.transfers if t.cipher is not None and t.transfer == chunk.transfer), None)
            if t is not None:
                break
        else:
            return  # nobody's, or a transfer whose leaf row is not checked yet: dropped
        self._write(d, t, lambda: d.write_sealed_chunk(t, chunk, self.clock.seconds()))

    def _exclude(self, d: Download, t: Transfer, why: str) -> None:
        self.log.warn("a source sent data that does not match the file's root; it is not asked again")
        d.exclude(t.transfer)
        t.cipher = None  # the rest of its chunks are dropped unread
        t.end(f"{why}: its source is excluded", source_failed=True)

    def on_transfer_end(self, message: dict) -> None:
        transfer = message.get("transfer")
        if not isinstance(transfer, str):
            return
        for d in self.downloads.values():
            # Only a transfer of this attempt: an earlier attempt's end must not end this one.
            t = d.find_transfer(transfer) if d.state in IN_TRANSFER else None
            if t is not None:
                _end(t, message)
                return
            if transfer in d.ended:
                return  # a transfer already over (the file was whole first): nothing to keep
        now = self.clock.seconds()
        for old in [old for old, (at, _) in self.orphan_ends.items() if now - at > ORPHAN_END_TTL]:
            del self.orphan_ends[old]
        if len(self.orphan_ends) < MAX_ORPHAN_ENDS:
            self.orphan_ends[transfer] = (now, message)

    def take_orphan_end(self, d: Download, t: Transfer) -> None:
        """A ``transfer_end`` that beat the tracker's reply naming ``t``."""
        orphan = self.orphan_ends.pop(t.transfer, None)
        if orphan is not None:
            _end(t, orphan[1])


def _end(t: Transfer, message: dict) -> None:
    if message.get("status") == "ok":
        t.end("ok")
    else:
        t.end(f"the sharer stopped: {message.get('detail') or 'error'}", source_failed=True)
