"""What a peer does (PROTOCOL.md §5, §6, §8, §9): keep a circuit, announce
its files, serve the tracker's requests, download what its user asks for.

``Peer`` is the facade of four parts, each with its own module:

* ``circuit_pool.CircuitPool``: the peer's circuits by purpose, one to announce
  and a few for downloads, each a ``keeper.CircuitKeeper`` (built with retries,
  rebuilt through other nodes when a message on it fails, replaced after
  ``circuit_lifetime``);
* ``announcer.Announcer``: the ``ls`` of the shared files, the periodic
  announce and refresh, the tracker's catalogue;
* ``uploader.Uploader``: the tracker's requests served, the sharer's side;
* ``downloader.Downloader``: the user's downloads, attempt after attempt.

The peer talks to the network only through the injected ``outbound`` and to
the disk through ``ShareDirectory`` and ``DownloadStore``; time is the
injected clock. When the circuit breaks, a new one is built, the files are
announced again (its first message is an ``ls``) and the downloads resume.
"""

from __future__ import annotations

import random

from twisted.internet import defer, threads

from onion_twisted.peer.announcer import Announcer
from onion_twisted.peer.circuit import Circuit
from onion_twisted.peer.circuit_pool import CircuitPool
from onion_twisted.peer.downloader import Downloader
from onion_twisted.peer.downloads import Download
from onion_twisted.peer.download_store import DownloadStore
from onion_twisted.peer.keeper import BUILDING, CONNECTED, WAITING, CircuitState
from onion_twisted.peer.sharing import ShareDirectory
from onion_twisted.peer.upload_rate import UploadRate
from onion_twisted.peer.uploader import Uploader
from onion_twisted.protocol import cells, wire
from onion_twisted.protocol.errors import Forbidden, UnknownCircuit
from onion_twisted.protocol.messages import DEFAULT_CHUNK, is_sha256

__all__ = ["Peer", "CircuitState", "BUILDING", "CONNECTED", "WAITING"]


class Peer:
    def __init__(self, *, clock, outbound, directory, tracker: wire.Address, share: ShareDirectory,
                 store: DownloadStore, data_dir, bootstrap=(), hops: int = 3, window: int = 8,
                 window_by_delay: bool = True,
                 chunk_size: int = DEFAULT_CHUNK, max_attempts: int = 5, stall_timeout: float = 60.0,
                 refresh_interval: float = 30.0, announce_interval: float = 300.0,
                 rng: random.Random | None = None, run_in_thread=threads.deferToThread,
                 unsafe_logging: bool = False, max_uploads: int = 16, max_sources: int = 4,
                 max_upload_rate: int = 0, seed_downloads: bool = True, max_circuits: int = 3,
                 circuit_lifetime: float = 900.0):
        self.clock = clock
        self.outbound = outbound
        self.share = share
        self.data_dir = data_dir
        # The circuits tell the others of themselves through these callbacks; they are
        # the only wires between the parts besides the circuits themselves.
        self.circuits = CircuitPool(clock=clock, outbound=outbound, directory=directory, tracker=tracker,
                                    data_dir=data_dir, bootstrap=bootstrap, hops=hops, rng=rng,
                                    max_circuits=max_circuits, circuit_lifetime=circuit_lifetime,
                                    first_message=self._first_message, on_connected=self._connected,
                                    on_download_circuit=self._download_circuit, on_broken=self._broken,
                                    in_use=self._in_use)
        self.keeper = self.circuits.announcing
        self.announcer = Announcer(clock=clock, keeper=self.keeper, share=share,
                                   refresh_interval=refresh_interval, announce_interval=announce_interval)
        self.uploader = Uploader(clock=clock, circuits=self.circuits, share=share, window=window,
                                 window_by_delay=window_by_delay,
                                 stall_timeout=stall_timeout, max_uploads=max_uploads,
                                 take_reply=self.announcer.take_catalogue, unsafe_logging=unsafe_logging,
                                 upload_rate=UploadRate(clock, max_upload_rate, burst=chunk_size))
        share.seed_from(store.downloads_dir if seed_downloads else None)
        self.downloader = Downloader(clock=clock, circuits=self.circuits, store=store, chunk_size=chunk_size,
                                     max_attempts=max_attempts, stall_timeout=stall_timeout,
                                     run_in_thread=run_in_thread, unsafe_logging=unsafe_logging,
                                     find_root=self._find_root, count_sources=self._count_sources,
                                     max_sources=max_sources, take_catalogue=self.announcer.take_catalogue)

    def _find_root(self, name: str, sha256: str | None) -> tuple[str, int] | None:
        """(root, size) of ``name`` in the catalogue: the entry with a root and the most
        sources (with ``sha256``, only that content), or None."""
        rows = [r for r in self.announcer.catalogue
                if r.get("name") == name and is_sha256(r.get("root")) and type(r.get("size")) is int
                and r["size"] >= 0 and (sha256 is None or r.get("sha256") == sha256)]
        if not rows:
            return None
        best = max(rows, key=_sources_of)
        return best["root"], best["size"]

    def _count_sources(self, name: str, sha256: str | None, root: str | None) -> int:
        """How many circuits the catalogue says share ``name`` (that content, when given)."""
        rows = [r for r in self.announcer.catalogue if r.get("name") == name
                and (sha256 is None or r.get("sha256") == sha256) and (root is None or r.get("root") == root)]
        return max((_sources_of(r) for r in rows), default=0)

    def _first_message(self) -> dict:
        return self.announcer.ls_message()

    def _connected(self, announcement: dict, reply) -> None:
        self.announcer.connected(announcement, reply)

    def _download_circuit(self, announcement: dict, reply) -> None:
        self.announcer.take_catalogue(reply)  # the reply to its empty ls: the catalogue

    def _broken(self, circuit: Circuit, why: str) -> None:
        self.downloader.circuit_broken(circuit, why)

    def _in_use(self, circuit: Circuit) -> bool:
        """Whether an upload or a download's transfer still runs on ``circuit``."""
        return self.uploader.busy_on(circuit) or self.downloader.busy_on(circuit)

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self.keeper.load_directory()
        self.downloader.restore()
        await self.announcer.rescan()
        self.downloader.resume()
        self.keeper.ready()

    async def stop(self) -> None:
        self.downloader.stop()
        await self.circuits.stop()

    @property
    def _stopped(self) -> bool:
        return self.keeper.stopped

    # --- the circuit -------------------------------------------------------------------------

    def circuit_ready(self) -> defer.Deferred:
        """The connected circuit, building one (with retries) if there is none."""
        return self.keeper.ready()

    def circuit_broken(self, circuit: Circuit, why: str) -> None:
        """A message on ``circuit`` failed: drop it, build another, announce, resume."""
        self.circuits.broken(circuit, why)

    async def send(self, message: dict) -> dict | None:
        """A message to the tracker through the circuit; a failure breaks the circuit."""
        return await self.keeper.send(message)

    @property
    def circuit(self) -> Circuit | None:
        return self.keeper.circuit

    @property
    def circuit_state(self) -> CircuitState:
        return self.keeper.state

    @property
    def directory(self):
        return self.keeper.directory

    # --- announcing ----------------------------------------------------------------------------

    async def rescan(self) -> bool:
        """Look at the share directory again; True if the shared set changed."""
        return await self.announcer.rescan()

    async def tick(self) -> None:
        """Every few seconds: announce or refresh (see ``Announcer.tick``); destroy the
        replaced circuits nothing runs on any more."""
        self.circuits.sweep()
        await self.announcer.tick()

    @property
    def catalogue(self) -> list[dict]:
        return self.announcer.catalogue

    @property
    def shared(self) -> list[dict]:
        return self.announcer.shared

    @property
    def refresh_interval(self) -> float:
        return self.announcer.refresh_interval

    @property
    def announce_interval(self) -> float:
        return self.announcer.announce_interval

    # --- cells arriving at POST / ------------------------------------------------------------

    async def receive_cell(self, source_ip: str, body: bytes) -> bytes:
        cell = cells.parse_cell(body)
        circuit = self.circuits.find(cell.cid)
        if circuit is None:
            raise UnknownCircuit("no circuit of this peer has that CID")
        if source_ip != circuit.entry.ip:
            raise Forbidden("not this circuit's entry node")
        if cell.destroy:
            self.circuits.broken(circuit, "destroyed by the network")
            return cells.EMPTY
        message = circuit.open_backward(cell.payload)
        kind = message.get("type")
        if kind == "request":
            self.uploader.serve(circuit, message)
        elif kind == "file_chunk":
            self.downloader.on_chunk(message)
        elif kind == "transfer_start":
            self.downloader.on_transfer_start(message)
        elif kind == "transfer_end":
            self.downloader.on_transfer_end(message)
        # Anything else is answered {} too: for the tracker's ``check`` of this circuit
        # (docs 17.10, choice 64), reaching this peer is the whole answer.
        return cells.EMPTY

    # --- serving the tracker's requests ----------------------------------------------------------

    def serve(self, circuit: Circuit, message: dict) -> None:
        self.uploader.serve(circuit, message)

    @property
    def uploads(self) -> dict:
        return self.uploader.uploads

    # --- downloading -------------------------------------------------------------------------------

    def download(self, name, sha256=None) -> Download:
        """Start (or return the running) download of ``name`` (see ``Downloader.download``)."""
        return self.downloader.download(name, sha256)

    def retry(self, name: str) -> Download:
        """Start a failed download again (the page's Retry), keeping the chunks it has."""
        return self.downloader.retry(name)

    def dismiss(self, name: str) -> None:
        """Take a failed or finished download off the list (the page's Dismiss)."""
        self.downloader.dismiss(name)

    @property
    def downloads(self) -> dict[str, Download]:
        return self.downloader.downloads

    @property
    def store(self) -> DownloadStore:
        return self.downloader.store

    @property
    def stall_timeout(self) -> float:
        return self.downloader.stall_timeout

    @property
    def _orphan_ends(self) -> dict:
        """The transfer_end messages kept for a reply still under way (tests look at the bound)."""
        return self.downloader.orphan_ends

    # --- what the page and the API show -------------------------------------------------------

    def status(self) -> dict:
        now = self.clock.seconds()
        return {
            "circuit": self.keeper.status(now),
            "circuits": self.circuits.status(now),
            "shared": self.announcer.shared,
            "catalogue": self.announcer.catalogue,
            "downloads": self.downloader.status(now),
            "upload_rate": self.uploader.upload_rate.status(),
        }


def _sources_of(row: dict) -> int:
    sources = row.get("sources")
    return sources if type(sources) is int and sources > 0 else 0
