"""The peer's announcer (PROTOCOL.md §8): what it shares, told to the tracker; what the tracker lists.

Every few seconds (``tick``) the share directory is scanned again; the files
are announced (``ls``) when they changed or every ``announce_interval``,
else the catalogue is refreshed (``list``) every ``refresh_interval``, which
also keeps the circuit alive. A tracker that restarted knows our circuit
only from a ``list`` and lists none of our files: we announce them again.
"""

from __future__ import annotations

from twisted.logger import Logger

from onion_twisted.peer.keeper import CircuitKeeper
from onion_twisted.peer.sharing import ShareDirectory
from onion_twisted.protocol.errors import ProtocolError
from onion_twisted.protocol.messages import list_message, parse_files_reply

NEVER = float("-inf")


class Announcer:
    log = Logger()

    def __init__(self, *, clock, keeper: CircuitKeeper, share: ShareDirectory,
                 refresh_interval: float = 30.0, announce_interval: float = 300.0):
        self.clock = clock
        self.keeper = keeper
        self.share = share
        self.refresh_interval = refresh_interval
        self.announce_interval = announce_interval
        self.catalogue: list[dict] = []
        self.shared: list[dict] = []  # the announced objects, each with "seeded": from the downloads?
        self._last_announce = NEVER
        self._last_list = NEVER
        self._listed: set = set()  # (name, sha256) of ours the tracker listed in reply to our last ls

    def ls_message(self) -> dict:
        return self.share.ls_message()

    async def rescan(self) -> bool:
        """Look at the share directory again; True if the shared set changed."""
        files = await self.share.scan()
        # Not in the ls: the tracker need not know which of our files we downloaded.
        self.shared = [dict(f, seeded=self.share.seeded(f["name"])) for f in files]
        return self.share.changed

    def connected(self, announcement: dict, reply) -> None:
        """A new circuit carried ``announcement`` (an ``ls``) and brought the tracker's ``reply``."""
        self._last_announce = self.clock.seconds()
        self.take_catalogue(reply)
        self._note_listed(announcement, reply)

    async def tick(self) -> None:
        """Every few seconds: announce when the shared set changed or every announce_interval,
        else refresh the catalogue every refresh_interval (which also keeps the circuit alive)."""
        circuit = self.keeper.circuit
        if self.keeper.stopped or circuit is None or not circuit.connected:
            return
        changed = await self.rescan()
        now = self.clock.seconds()
        try:
            if changed or now - self._last_announce >= self.announce_interval:
                self._last_announce = now
                announcement = self.ls_message()
                reply = await self.keeper.send(announcement)
                self.take_catalogue(reply)
                self._note_listed(announcement, reply)
            elif now - self._last_list >= self.refresh_interval:
                self._last_list = now
                reply = await self.keeper.send(list_message())
                self.take_catalogue(reply)
                if self._forgotten(reply):
                    # A restarted tracker knows our old circuit only from this list, with no
                    # files: announce them again at the next tick.
                    self.log.info("the tracker no longer lists files we announced; announcing again")
                    self._last_announce = NEVER
        except ProtocolError:
            pass  # the keeper already rebuilds

    def take_catalogue(self, reply) -> None:
        """The tracker's listing from a ``files`` reply; its refusal, said on the page."""
        listing = parse_files_reply(reply)
        if listing is not None:
            self.catalogue = listing
        elif isinstance(reply, dict) and reply.get("type") == "error":
            self.keeper.note(f"the tracker refused our announcement: {reply.get('detail') or reply.get('error')}")
            self.log.warn("the tracker refused a message: {why}", why=str(reply.get("error")))

    def _note_listed(self, announcement: dict, reply) -> None:
        """After an ls: which of the files it announced the tracker's reply lists (a
        capped listing may leave some out; only those listed are watched by ``_forgotten``)."""
        listed = _listed_keys(reply)
        ours = {(f.get("name"), f.get("sha256"), f.get("root")) for f in announcement.get("files", [])
                if isinstance(f, dict)}
        self._listed = ours & listed if listed is not None else set()

    def _forgotten(self, reply) -> bool:
        """Whether a ``files`` reply lacks a file of ours that the tracker listed after our last ls."""
        listed = _listed_keys(reply)
        return listed is not None and not self._listed <= listed


def _listed_keys(reply) -> set | None:
    """The (name, sha256, root) of each row of a ``files`` reply; None for any other reply."""
    listing = parse_files_reply(reply)
    if listing is None:
        return None
    return {(f.get("name"), f.get("sha256"), f.get("root")) for f in listing}
