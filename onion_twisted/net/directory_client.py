"""Fetching, verifying and mirroring the tracker's signed directory (§6).

Used by nodes (and peers): the tracker key comes from the configuration, or
on first contact from the tracker's ``/identity`` (trust on first use, logged
as a warning). ``knows`` refetches at most once per ``refetch_interval`` so a
stream of unknown extend targets cannot make a node hammer the tracker.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from onion_twisted.protocol import crypto, wire
from onion_twisted.protocol.directory import SignedDirectory, parse_signed_directory
from onion_twisted.protocol.errors import NextHopFailed, ProtocolError
from onion_twisted.protocol.interfaces import IDirectorySource
from onion_twisted.protocol.wire import SIGNATURE_HEADER
from onion_twisted.net.files import atomic_write
from onion_twisted.net.tls import spki_fingerprint
from onion_twisted.net.results import SharedResult


@implementer(IDirectorySource)
class DirectoryClient:
    log = Logger()

    def __init__(self, clock, outbound, tracker: wire.Address, *, tracker_key: str | None = None,
                 default_port: int = wire.DEFAULT_PORT, refetch_interval: float = 2.0, pin_path=None):
        self.clock = clock
        self.outbound = outbound
        self.tracker = tracker
        self.default_port = default_port
        self.refetch_interval = refetch_interval
        self._tracker_key = crypto.load_tracker_public_b64(tracker_key) if tracker_key else None
        # Trust on first use, like ssh: the key learned on first contact is
        # kept in ``pin_path`` and used from then on, across restarts.
        self.pin_path = Path(pin_path) if pin_path else None
        if self._tracker_key is None and self.pin_path is not None and self.pin_path.exists():
            self._tracker_key = crypto.load_tracker_public_b64(self.pin_path.read_text().strip())
        self.current: SignedDirectory | None = None
        self._tracker_pin = None
        self._last_fetch = None
        self._fetching = SharedResult(lambda: defer.ensureDeferred(self._fetch()))

    async def tracker_key(self):
        if self._tracker_key is None:
            try:
                status, _, body = await self.outbound.get(self.tracker, "/identity")
                identity = wire.loads_object(body, "identity")
                if status != 200 or identity.get("role") != "tracker":
                    raise NextHopFailed("tracker identity unavailable")
                self._tracker_key = crypto.load_tracker_public_b64(identity.get("public_key"))
            except (ProtocolError, ValueError) as e:
                self.log.warn("cannot learn the tracker's key: {why}", why=str(e))
                return None
            learned = crypto.tracker_public_b64(self._tracker_key)
            self.log.warn("no tracker_key configured: trusting the key the tracker showed on first "
                          "contact ({key}); set tracker_key to pin it", key=learned)
            if self.pin_path is not None:
                self.pin_path.write_text(learned + "\n")

        return self._tracker_key

    def pin_for(self, address: wire.Address) -> str | None:
        """The TLS pin of ``address`` (PROTOCOL.md §14): a listed node's ``fingerprint``,
        the tracker's key's SPKI hash once that key is known, else None (not pinned)."""
        if self.current is not None:
            entry = self.current.nodes.get(address)
            if entry is not None:
                return entry.fingerprint
        if address == self.tracker and self._tracker_key is not None:
            if self._tracker_pin is None:
                self._tracker_pin = spki_fingerprint(self._tracker_key)
            return self._tracker_pin
        return None

    def fetch(self) -> defer.Deferred:
        """Fetch and verify the directory; concurrent callers share one request."""
        return self._fetching.get()

    async def _fetch(self) -> SignedDirectory:
        return await self.fetch_from(self.tracker)

    async def fetch_from(self, source: wire.Address) -> SignedDirectory:
        """The directory from ``source``: the tracker, or a node's mirror (same bytes, same signature)."""
        key = await self.tracker_key()
        if key is None:
            raise NextHopFailed("tracker key unknown")
        status, headers, body = await self.outbound.get(source, "/nodes")
        if status != 200:
            raise NextHopFailed(f"directory source answered {status}")
        signature = (headers.getRawHeaders(SIGNATURE_HEADER) or [None])[0]
        directory = parse_signed_directory(body, signature, key, self.default_port, known=self.current)
        if self.current is None or directory.issued >= self.current.issued:
            self.current = directory
        return self.current

    def save(self, path) -> None:
        """Keep the verified directory on disk: a restarted peer asks a node, not the tracker."""
        if self.current is None:
            return
        # Signed public data: readable by others, as a plain write left it.
        atomic_write(path, wire.dumps({"body": wire.b64encode(self.current.body),
                                       "signature": self.current.signature}), mode=0o644)

    def load(self, path) -> bool:
        """Reload a directory saved earlier, checking its signature again."""
        try:
            saved = wire.loads_object(Path(path).read_bytes(), "saved directory")
            key = self._tracker_key
            if key is None:
                return False
            self.current = parse_signed_directory(wire.b64decode(saved.get("body"), "body"),
                                                  saved.get("signature"), key, self.default_port)
            return True
        except (OSError, ProtocolError, ValueError):
            return False

    async def knows(self, address: wire.Address) -> bool:
        if self.current is not None and address in self.current:
            return True
        # The on-demand fetches alone are rate-limited: a periodic fetch just
        # before does not stop the one fetch owed to an unknown target (§6).
        now = self.clock.seconds()
        recently = self._last_fetch is not None and now - self._last_fetch < self.refetch_interval
        if not recently or self._fetching.running:
            self._last_fetch = now
            try:
                await self.fetch()
            except Exception as e:
                self.log.warn("directory fetch failed: {why}", why=_reason(e))
        return self.current is not None and address in self.current

    async def register(self, own_address: wire.Address, public_key_pem: str, onion_key: bytes | None = None) -> None:
        """POST /nodes (§6); a /2 node adds its current onion key (§10), sent again after a rotation."""
        body = {"address": str(own_address), "public_key": public_key_pem}
        if onion_key is not None:
            body["onion_key"] = wire.b64encode(onion_key)
        body = wire.dumps(body)
        await self.outbound.post(self.tracker, body, path="/nodes")


def _reason(e) -> str:
    return getattr(e, "detail", None) or type(e).__name__
