"""What a peer does (PROTOCOL.md §5, §6, §8, §9): keep a circuit, announce
its files, serve the tracker's requests, download what its user asks for.

``Peer`` talks to the network only through the injected ``outbound`` and
to the disk through ``ShareDirectory`` and ``DownloadStore``; time is the
injected clock. One circuit at a time: when a message on it fails (502, 504,
refused), the circuit is destroyed, a new one is built through other nodes,
the files are announced again and the downloads resume.
"""

from __future__ import annotations

import os
import random

from twisted.internet import defer, task, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from onion_twisted.protocol import cells, wire
from onion_twisted.protocol.messages import DEFAULT_CHUNK, MAX_CHUNK, MIN_CHUNK, MessageError, check_name, check_sha256
from onion_twisted.peer.circuit import Circuit
from onion_twisted.protocol.directory import pick_path
from onion_twisted.peer.downloads import (ACTIVE, DONE, FAILED, QUEUED, RECEIVING, REQUESTING, SEEN_TRANSFERS, BadChunk, Download,
                        DownloadStore)
from onion_twisted.protocol.errors import BadRequest, Conflict, Forbidden, ProtocolError, RateLimited, UnknownCircuit, safe_os_error
from onion_twisted.peer.sharing import ChunkProducer, ShareDirectory, WindowedChunkSender

EMPTY = b"{}"
BUILDING, CONNECTED, WAITING = "building", "connected", "waiting"
MAX_DOWNLOADS = 256  # downloads listed at once; the oldest finished or failed make room


class TransferRefused(Exception):
    """The far end answered a chunk with an error: the bridge is gone."""


class Peer:
    log = Logger()

    def __init__(self, *, clock, outbound, directory, tracker: wire.Address, share: ShareDirectory,
                 store: DownloadStore, data_dir, bootstrap=(), hops: int = 3, window: int = 8,
                 chunk_size: int = DEFAULT_CHUNK, max_attempts: int = 5, stall_timeout: float = 60.0,
                 refresh_interval: float = 30.0, announce_interval: float = 300.0,
                 rng: random.Random | None = None, run_in_thread=threads.deferToThread,
                 unsafe_logging: bool = False, max_uploads: int = 16):
        self.clock = clock
        self.outbound = outbound
        self.directory = directory
        self.tracker = tracker
        self.share = share
        self.store = store
        self.data_dir = data_dir
        self.bootstrap = [wire.parse_address(a, tracker.port, field="bootstrap") for a in bootstrap]
        self.hops = hops
        self.window = window
        self.chunk_size = chunk_size
        self.max_attempts = max_attempts
        self.stall_timeout = stall_timeout
        self.refresh_interval = refresh_interval
        self.announce_interval = announce_interval
        self.rng = rng or random.SystemRandom()
        self.run_in_thread = run_in_thread
        self.unsafe_logging = unsafe_logging
        self.max_uploads = max_uploads  # uploads served at once; more get transfer_end "busy"

        self.circuit: Circuit | None = None
        self.circuit_state = WAITING
        self.circuit_detail = "starting"
        self.circuit_since = clock.seconds()
        self.catalogue: list[dict] = []
        self.shared: list[dict] = []
        self.downloads: dict[str, Download] = {}
        self.uploads: dict[str, object] = {}
        self._orphan_ends: dict[str, tuple[float, dict]] = {}  # transfer_end that beat the reply
        self._building: defer.Deferred | None = None
        self._last_announce = float("-inf")
        self._listed: set = set()  # (name, sha256) of ours the tracker listed in reply to our last ls
        self._backoff = 1.0
        self._stopped = False
        self._suspect: dict[wire.Address, float] = {}  # nodes that failed lately -> until
        self._probing: set[Circuit] = set()

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self.directory.load(self._directory_path)
        for record in self.store.resumable():
            d = self.store.restore(record, self.chunk_size)
            self.downloads[d.name] = d
        await self.rescan()
        for d in list(self.downloads.values()):
            if d.state != FAILED:
                self._run(d)
        self.circuit_ready()

    async def stop(self) -> None:
        self._stopped = True
        for d in self.downloads.values():
            if d.state in ACTIVE:
                d.save_record()
                # Wake the attempt waiting for its transfer_end now: left to its stall
                # timer it would write its record again later, over a newer run's.
                self._finish_wait(d, "the peer stopped")
            d.close()
        circuit, self.circuit = self.circuit, None
        if circuit is not None:
            try:
                await circuit.destroy()
            except ProtocolError:
                pass

    @property
    def _directory_path(self):
        return os.path.join(self.data_dir, "directory.json")

    # --- the circuit -----------------------------------------------------------------------

    def circuit_ready(self) -> defer.Deferred:
        """The connected circuit, building one (with retries) if there is none."""
        if self.circuit is not None and self.circuit.connected:
            return defer.succeed(self.circuit)
        if self._building is None:
            self._building = defer.ensureDeferred(self._build_until_connected())
            self._building.addBoth(self._built)
        # Each caller gets its own Deferred; the shared one keeps its result.
        waiter = defer.Deferred()
        self._building.addBoth(_pass_to(waiter))
        return waiter

    def _built(self, result):
        self._building = None
        return result

    async def _build_until_connected(self) -> Circuit:
        while not self._stopped:
            self.circuit_state = BUILDING
            nodes, circuit = [], None
            try:
                nodes = await self._pick_nodes()
                self.circuit_detail = f"building a circuit through {len(nodes)} nodes"
                circuit = Circuit(self.outbound, nodes, self.tracker)
                announcement = self._ls_message()
                reply = await circuit.build(announcement)
            except (ProtocolError, ValueError) as e:
                detail = getattr(e, "detail", str(e))
                for node in nodes:
                    self._suspect[node.address] = self.clock.seconds() + 60
                if circuit is not None and circuit.built:
                    self._destroy_quietly(circuit)
                delay = self._backoff
                self._backoff = min(self._backoff * 2, 30.0)
                self.circuit_state = WAITING
                self.circuit_detail = f"circuit failed ({detail}); retrying in {delay:.0f} s"
                self.log.warn("circuit build failed: {why}; retrying in {delay} s", why=detail, delay=delay)
                await task.deferLater(self.clock, delay, lambda: None)
                continue
            self._backoff = 1.0
            self.circuit = circuit
            self.circuit_state = CONNECTED
            self.circuit_detail = "connected"
            self.circuit_since = self.clock.seconds()
            self._last_announce = self.clock.seconds()
            self._take_catalogue(reply)
            self._note_listed(announcement, reply)
            self.log.info("circuit connected through {n} nodes", n=len(circuit.hops))
            return circuit
        raise UnknownCircuit("the peer is stopping")

    async def _pick_nodes(self):
        directory = await self._fresh_directory()
        now = self.clock.seconds()
        candidates = [n for n in directory.nodes.values() if self._suspect.get(n.address, 0) <= now]
        if len({n.address.host for n in candidates}) < self.hops:
            candidates = list(directory.nodes.values())  # everyone failed lately: try anyway
        try:
            return pick_path(candidates, self.hops, self.rng)
        except ValueError as e:
            raise BadRequest(str(e)) from None

    async def _fresh_directory(self):
        """The directory from a node's mirror when any node is known; the tracker only at first (§6)."""
        known = list(self.directory.current.nodes) if self.directory.current else []
        sources = self.rng.sample(known, len(known)) + [a for a in self.bootstrap if a not in known]
        for source in sources[:4]:
            try:
                directory = await self.directory.fetch_from(source)
                self.directory.save(self._directory_path)
                return directory
            except ProtocolError:
                continue
        # No known node answers (or none is known yet): the tracker, once.
        if sources:
            self.log.warn("no known node serves the directory; asking the tracker")
        try:
            directory = await self.directory.fetch_from(self.tracker)
        except ProtocolError:
            if self.directory.current is None:
                raise
            return self.directory.current
        self.directory.save(self._directory_path)
        return directory

    def circuit_broken(self, circuit: Circuit, why: str) -> None:
        """A message on ``circuit`` failed: drop it, build another, announce, resume."""
        if self.circuit is not circuit:
            return
        if not self._stopped:
            self.log.warn("circuit broken ({why}); building another", why=why)
        for hop in circuit.hops:
            self._suspect[hop.address] = self.clock.seconds() + 30
        self.circuit = None
        self.circuit_state = WAITING
        self.circuit_detail = f"circuit broken ({why}); rebuilding"
        self._destroy_quietly(circuit)
        # Our transfers came back on that circuit: they are over. Their attempts end now
        # and ask again, on the next circuit, for what is missing (not after stall_timeout).
        for d in self.downloads.values():
            if d.state in (REQUESTING, RECEIVING):
                self._finish_wait(d, f"circuit broken ({why})")
        if not self._stopped:
            self.circuit_ready().addErrback(lambda f: None)

    def _destroy_quietly(self, circuit: Circuit) -> None:
        defer.ensureDeferred(circuit.destroy()).addErrback(lambda f: None)

    async def send(self, message: dict) -> dict | None:
        """A message to the tracker through the circuit; a failure breaks the circuit."""
        circuit = await self.circuit_ready()
        try:
            return await circuit.send(message)
        except ProtocolError as e:
            self.circuit_broken(circuit, e.detail)
            raise

    # --- announcing ------------------------------------------------------------------------

    def _ls_message(self) -> dict:
        return self.share.ls_message()

    async def rescan(self) -> bool:
        """Look at the share directory again; True if the shared set changed."""
        self.shared = await self.share.scan()
        return self.share.changed

    async def tick(self) -> None:
        """Every few seconds: announce when the shared set changed or every announce_interval,
        else refresh the catalogue every refresh_interval (which also keeps the circuit alive)."""
        if self._stopped or self.circuit is None or not self.circuit.connected:
            return
        changed = await self.rescan()
        now = self.clock.seconds()
        try:
            if changed or now - self._last_announce >= self.announce_interval:
                self._last_announce = now
                announcement = self._ls_message()
                reply = await self.send(announcement)
                self._take_catalogue(reply)
                self._note_listed(announcement, reply)
            elif now - getattr(self, "_last_list", float("-inf")) >= self.refresh_interval:
                self._last_list = now
                reply = await self.send({"type": "list"})
                self._take_catalogue(reply)
                if self._forgotten(reply):
                    # A restarted tracker knows our old circuit only from this list, with no
                    # files: announce them again at the next tick.
                    self.log.info("the tracker no longer lists files we announced; announcing again")
                    self._last_announce = float("-inf")
        except ProtocolError:
            pass  # circuit_broken already rebuilds

    def _note_listed(self, announcement: dict, reply) -> None:
        """After an ls: which of the files it announced the tracker's reply lists (a
        capped listing may leave some out; only those listed are watched by ``_forgotten``)."""
        listed = _listed_keys(reply)
        ours = {(f.get("name"), f.get("sha256")) for f in announcement.get("files", []) if isinstance(f, dict)}
        self._listed = ours & listed if listed is not None else set()

    def _forgotten(self, reply) -> bool:
        """Whether a ``files`` reply lacks a file of ours that the tracker listed after our last ls."""
        listed = _listed_keys(reply)
        return listed is not None and not self._listed <= listed

    def _take_catalogue(self, reply) -> None:
        if isinstance(reply, dict) and reply.get("type") == "files" and isinstance(reply.get("files"), list):
            self.catalogue = [f for f in reply["files"] if isinstance(f, dict)]
        elif isinstance(reply, dict) and reply.get("type") == "error":
            self.circuit_detail = f"the tracker refused our announcement: {reply.get('detail') or reply.get('error')}"
            self.log.warn("the tracker refused a message: {why}", why=str(reply.get("error")))

    # --- cells arriving at POST / ------------------------------------------------------------

    async def receive_cell(self, source_ip: str, body: bytes) -> bytes:
        cell = cells.parse_cell(body)
        circuit = self.circuit
        if circuit is None or cell.cid != circuit.cid:
            raise UnknownCircuit("no circuit of this peer has that CID")
        if source_ip != circuit.entry.ip:
            raise Forbidden("not this circuit's entry node")
        if cell.destroy:
            self.circuit_broken(circuit, "destroyed by the network")
            return EMPTY
        message = circuit.open_backward(cell.payload)
        kind = message.get("type")
        if kind == "request":
            self.serve(circuit, message)
        elif kind == "file_chunk":
            self._on_chunk(message)
        elif kind == "transfer_end":
            self._on_transfer_end(message)
        return EMPTY

    # --- serving the tracker's requests (the sharer's side) ------------------------------------

    def serve(self, circuit: Circuit, message: dict) -> None:
        transfer = message.get("transfer")
        if not isinstance(transfer, str) or not 0 < len(transfer) <= 128 or transfer in self.uploads:
            return
        if len(self.uploads) >= self.max_uploads:
            busy = {"type": "transfer_end", "transfer": transfer, "status": "error",
                    "detail": "the sharer is busy; ask again later"}
            defer.ensureDeferred(self._send_on(circuit, busy)).addErrback(lambda f: None)
            return
        d = defer.ensureDeferred(self._upload(circuit, transfer, message))
        self.uploads[transfer] = d
        d.addErrback(lambda f: f.trap(ProtocolError, TransferRefused))  # the circuit is rebuilt already
        d.addErrback(lambda f: self._log_unexpected("an upload failed", f))
        d.addBoth(lambda _: self.uploads.pop(transfer, None))

    async def _upload(self, circuit: Circuit, transfer: str, message: dict) -> None:
        name = message.get("file")
        try:
            chunk_size = message.get("chunk_size", DEFAULT_CHUNK)
            if not isinstance(chunk_size, int) or not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
                raise MessageError("refused", "chunk_size out of bounds")
            chunks = message.get("chunks")
            if chunks is not None and (not isinstance(chunks, list) or not all(
                    isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) for x in r) for r in chunks)):
                raise MessageError("refused", "chunks is not a list of ranges")
            path = self.share.path_of(name)
            wanted = message.get("sha256")
            ours = (self.share.entry(name) or {}).get("sha256")
            if wanted is not None and wanted != ours:
                raise MessageError("refused", "this peer's copy has another content")
            producer = ChunkProducer.open(path, chunk_size, chunks)
        except (MessageError, OSError, ValueError) as e:
            detail = getattr(e, "detail", "cannot open the file")
            await self._send_on(circuit, {"type": "transfer_end", "transfer": transfer, "status": "error",
                                          "detail": detail})
            return
        size = producer.size

        def send_chunk(index: int, data: bytes):
            message = wire.with_base64({"type": "file_chunk", "transfer": transfer, "file": name,
                                        "chunk_idx": index, "chunk_size": chunk_size, "size": size}, "data", data)
            return defer.ensureDeferred(self._send_on(circuit, message, refusable=True))

        sender = WindowedChunkSender(send_chunk, window=self.window, clock=self.clock,
                                     ack_timeout=self.stall_timeout * 2)
        done = sender.start(producer)
        try:
            await done
        except TransferRefused as e:
            self.log.info("an upload stopped: {why}", why=str(e))
            return
        except (ProtocolError, defer.TimeoutError, OSError):
            return  # the circuit broke or the file went away; the requester asks again for what it lacks
        await self._send_on(circuit, {"type": "transfer_end", "transfer": transfer, "status": "ok"})

    async def _send_on(self, circuit: Circuit, message: dict | bytes, refusable: bool = False):
        sending = circuit.send(message)
        del message  # a chunk: not held while its acknowledgement is awaited
        try:
            reply = await sending
        except ProtocolError as e:
            if refusable:
                # A chunk also fails when the requester's side of the bridge
                # is gone: probe our own circuit before rebuilding it.
                self._probe(circuit, e.detail)
            else:
                self.circuit_broken(circuit, e.detail)
            raise
        if refusable and isinstance(reply, dict) and reply.get("type") == "error":
            raise TransferRefused(str(reply.get("detail") or reply.get("error")))
        return reply

    def _probe(self, circuit: Circuit, why: str) -> None:
        if self.circuit is not circuit or circuit in self._probing:
            return
        self._probing.add(circuit)

        async def probe():
            try:
                self._take_catalogue(await circuit.send({"type": "list"}))
            except ProtocolError as e:
                self.circuit_broken(circuit, f"{why}; then {e.detail}")
            finally:
                self._probing.discard(circuit)
        defer.ensureDeferred(probe())

    # --- downloading -----------------------------------------------------------------------------

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
            d.attempts, d.error, d.state = 0, None, QUEUED
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
            raise Conflict(f"the download is {d.state}: only a failed one is retried")
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
            raise Conflict(f"the download is {d.state}: only a failed or finished one is dismissed")
        del self.downloads[name]
        if d.state == FAILED:
            d.discard_partial()

    def _run(self, d: Download) -> None:
        defer.ensureDeferred(self._download(d)).addErrback(self._download_crashed, d)

    def _download_crashed(self, failure: Failure, d: Download) -> None:
        self._log_unexpected("a download stopped unexpectedly", failure)
        d.state, d.error = FAILED, f"stopped unexpectedly: {safe_os_error(failure.value)}"
        d.close()

    def _log_unexpected(self, what: str, failure: Failure) -> None:
        # Safe logging: an OSError's text names its path (downloads/.partial/NAME.part,
        # share/NAME), so only its reason is logged; the traceback with the debug switch.
        if self.unsafe_logging:
            self.log.failure(what, failure)
        else:
            self.log.error("{what}: {why}", what=what, why=safe_os_error(failure.value))

    async def _download(self, d: Download) -> None:
        last_error = None
        while d.attempts < self.max_attempts and not self._stopped:
            d.attempts += 1
            outcome = await self._attempt(d)
            if outcome == DONE or d.state == FAILED:
                return
            last_error = outcome
            d.error = f"attempt {d.attempts} of {self.max_attempts}: {outcome}"
            await task.deferLater(self.clock, min(2 ** (d.attempts - 1), 30), lambda: None)
        if not self._stopped:
            d.state = FAILED
            d.error = f"gave up after {d.attempts} attempts: {last_error}"
            d.save_record()  # marked failed: a restart shows it, and does not try again by itself
            d.close()

    async def _attempt(self, d: Download) -> str:
        d.state = REQUESTING
        d.transfer = None
        d.seen_transfers.clear()
        d.outcome = None
        request = {"type": "request", "file": d.name, "chunk_size": d.chunk_size}
        if d.sha256:
            request["sha256"] = d.sha256
        if d.chunks is not None and d.chunks.have:
            request["chunks"] = d.chunks.missing_ranges()
        try:
            reply = await self.send(request)
        except ProtocolError as e:
            d.state = QUEUED
            return f"circuit failed: {e.detail}"
        if not isinstance(reply, dict):
            return "the tracker gave no answer"
        if reply.get("type") == "error":
            if reply.get("error") in ("not_found", "no_source"):
                why = ("nobody shares this file" if reply.get("error") == "not_found"
                       else "only this peer shares this file")
                if d.chunks is not None and d.chunks.have:
                    # Part of the file is on disk, so someone shared it: its sharer may be
                    # rebuilding its circuit (our own restart breaks it). Try again later.
                    d.state = QUEUED
                    return why
                d.state = FAILED
                d.error = why
                d.save_record()  # a record left by an earlier run stays failed across restarts
                return FAILED
            return str(reply.get("detail") or reply.get("error"))
        if reply.get("type") != "transfer" or not isinstance(reply.get("transfer"), str):
            return "the tracker's answer is not a transfer"
        d.transfer = reply["transfer"]
        size, sha = reply.get("size"), reply.get("sha256")
        chunk_size = reply.get("chunk_size", d.chunk_size)
        if isinstance(size, int) and isinstance(chunk_size, int):
            try:
                d.expect(size, chunk_size, sha if isinstance(sha, str) else None)
            except ValueError as e:  # more chunks than a download may have (transfers.MAX_CHUNKS)
                d.state, d.error = FAILED, f"this peer does not download that file: {e}"
                return FAILED
        elif isinstance(sha, str) and not d.sha256:
            d.sha256 = sha
        orphan = self._orphan_ends.pop(d.transfer, None)
        if orphan is not None:
            self._end(d, orphan[1])
        if d.chunks is not None and d.chunks.complete:
            self._finish_wait(d, "ok")  # nothing was missing (or a zero-byte file)
        outcome = await self._wait_for_end(d)
        if self._stopped:
            return outcome  # stop() saved the record: a stopped peer writes nothing more
        if outcome != "ok":
            d.save_record()
            return outcome
        if d.chunks is None or not d.chunks.complete:
            d.save_record()
            return "the transfer ended with chunks missing"
        if await d.finish(self.run_in_thread):
            return DONE
        d.state = QUEUED
        return "the file's sha256 did not match; partial data discarded"

    async def _wait_for_end(self, d: Download) -> str:
        """Until ``transfer_end``, or ``stall_timeout`` seconds without a new chunk."""
        while d.outcome is None:
            had = d.chunks.have if d.chunks else 0
            wake = d.wake = defer.Deferred()
            timer = self.clock.callLater(self.stall_timeout, lambda: wake.called or wake.callback(None))
            await wake
            if timer.active():
                timer.cancel()
            if d.outcome is None and (d.chunks.have if d.chunks else 0) == had:
                d.outcome = f"stalled: no chunk for {self.stall_timeout:.0f} s"
        return d.outcome

    def _find(self, message: dict) -> Download | None:
        d = self.downloads.get(message.get("file")) if isinstance(message.get("file"), str) else None
        if d is None or d.state not in (REQUESTING, RECEIVING):
            return None
        transfer = message.get("transfer")
        if d.transfer is not None and transfer != d.transfer:
            return None  # a chunk of an earlier transfer of the same file
        return d

    def _on_chunk(self, message: dict) -> None:
        d = self._find(message)
        if d is None:
            return  # nobody asked: dropped (§8)
        if d.transfer is None and isinstance(message.get("transfer"), str):
            if len(d.seen_transfers) < SEEN_TRANSFERS:
                d.seen_transfers.add(message["transfer"])  # chunks may overtake the tracker's reply
        try:
            d.write_chunk(message, self.clock.seconds())
        except BadChunk as e:
            self.log.warn("a chunk was refused: {why}", why=str(e))
        except OSError as e:
            # The disk, not the sharer (full, read-only, gone): this attempt ends, and
            # a later one resumes from what was written. Safe logging: no path.
            self.log.error("a download could not write its chunk: {why}", why=safe_os_error(e))
            self._finish_wait(d, f"cannot write the download: {safe_os_error(e)}")

    def _on_transfer_end(self, message: dict) -> None:
        transfer = message.get("transfer")
        if not isinstance(transfer, str):
            return
        for d in self.downloads.values():
            # Before the tracker's reply, any transfer whose chunks came for this file; after it,
            # only the transfer it named (an earlier attempt's end must not end this one).
            if d.state in (REQUESTING, RECEIVING) and (d.transfer == transfer or (
                    d.transfer is None and transfer in d.seen_transfers)):
                self._end(d, message)
                return
        now = self.clock.seconds()
        for t in [t for t, (at, _) in self._orphan_ends.items() if now - at > 120]:
            del self._orphan_ends[t]
        if len(self._orphan_ends) < 1000:
            self._orphan_ends[transfer] = (now, message)

    def _end(self, d: Download, message: dict) -> None:
        if message.get("status") == "ok":
            self._finish_wait(d, "ok")
        else:
            self._finish_wait(d, f"the sharer stopped: {message.get('detail') or 'error'}")

    @staticmethod
    def _finish_wait(d: Download, outcome: str) -> None:
        if d.outcome is None:
            d.outcome = outcome
            if d.wake is not None and not d.wake.called:
                d.wake.callback(None)

    # --- what the page and the API show -------------------------------------------------------

    def status(self) -> dict:
        now = self.clock.seconds()
        circuit = self.circuit
        return {
            "circuit": {
                "state": self.circuit_state,
                "detail": self.circuit_detail,
                "nodes": [{"address": str(h.address), "fingerprint": h.fingerprint} for h in circuit.hops]
                if circuit else [],
                "age": int(now - self.circuit_since) if circuit else None,
            },
            "shared": self.shared,
            "catalogue": self.catalogue,
            "downloads": [d.status(now) for d in self.downloads.values()],
        }


def _listed_keys(reply) -> set | None:
    """The (name, sha256) pairs of a ``files`` reply; None for any other reply."""
    if not (isinstance(reply, dict) and reply.get("type") == "files" and isinstance(reply.get("files"), list)):
        return None
    return {(f.get("name"), f.get("sha256")) for f in reply["files"] if isinstance(f, dict)}


def _pass_to(waiter: defer.Deferred):
    """A callback that fires ``waiter`` with a result and passes the result on."""
    def passing(result):
        if isinstance(result, Failure):
            waiter.errback(result)
        else:
            waiter.callback(result)
        return result
    return passing
