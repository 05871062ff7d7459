"""The peer's circuits, isolated by purpose (issue 16): one to announce, a few for downloads.

The *announcing* circuit carries the peer's ``ls`` and the tracker's
requests to serve (uploads go back on it). Downloads go over other
circuits, up to ``max_circuits - 1`` of them, shared by the downloads (each
download takes the least used; a second circuit is built before a busy one
is shared), built when a download first needs one and closed when unused.
The announcing circuit and a download circuit do not share an entry or an
exit when the directory has nodes enough: an entry that sees both, or an
exit that sees both, cannot tie the peer's downloads to what it shares.
A download circuit's first message is an empty ``ls``: the tracker lists
the peer's files once, under the announcing circuit only.

While a download runs, one download circuit more than the downloads use
is built ahead and kept (Tor's preemptive circuits): when a download's
circuit breaks, its next request goes over a circuit already connected
(``in_hand``) instead of waiting for the rebuild, which under load takes
seconds. The broken keeper rebuilds, and is the next spare.

Each circuit is replaced after ``circuit_lifetime`` (see ``keeper``): new
work goes to the new one; the old one drains (its uploads and transfers
run to their end) and is then destroyed. When the announcing circuit is
replaced, the old one says an empty ``ls`` at once: the tracker stops
offering it, and counts the files once.

With ``max_circuits = 1`` everything shares one circuit, as before issue 16.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet import defer
from twisted.logger import Logger

from onion_twisted.peer.circuit import Circuit
from onion_twisted.peer.keeper import CONNECTED, WAITING, CircuitKeeper
from onion_twisted.protocol.messages import ls_message

MAX_CIRCUITS = 8  # the most a peer keeps at once, whatever its setting


class CircuitPool:
    log = Logger()

    def __init__(self, *, max_circuits: int = 1, circuit_lifetime: float = 0.0,
                 first_message: Callable[[], dict], on_connected: Callable[[dict, object], None],
                 on_download_circuit: Callable[[dict, object], None] = lambda message, reply: None,
                 on_broken: Callable[[Circuit, str], None], in_use: Callable[[Circuit], bool],
                 **keeper_options):
        """``keeper_options``: what every ``CircuitKeeper`` is built with (clock, outbound,
        directory, tracker, data_dir, bootstrap, hops, rng). ``on_download_circuit``: the
        tracker's reply to a download circuit's empty ``ls`` (its catalogue)."""
        count = max(1, min(max_circuits, MAX_CIRCUITS))
        self.moves = 0  # downloads moved to another circuit while theirs was rebuilt (in_hand)
        self.announcing = CircuitKeeper(
            first_message=first_message, on_connected=on_connected, on_broken=on_broken,
            purpose="announcing", lifetime=circuit_lifetime, avoid_ends=self._download_ends,
            on_rotated=self._withdraw, in_use=in_use, **keeper_options)
        self.for_downloads = [CircuitKeeper(
            first_message=lambda: ls_message([]), on_connected=on_download_circuit, on_broken=on_broken,
            purpose="download", lifetime=circuit_lifetime, retires_idle=True,
            avoid_ends=self._announcing_ends, in_use=lambda circuit: in_use(circuit) or self._kept(circuit),
            **keeper_options) for _ in range(count - 1)]

    @property
    def keepers(self) -> list[CircuitKeeper]:
        return [self.announcing] + self.for_downloads

    # --- which circuit --------------------------------------------------------------------

    def for_download(self) -> CircuitKeeper:
        """The keeper a download's next attempt uses (``release`` it after): the least used
        download circuit, an unbuilt one before a busy one is shared; the announcing one
        when the peer keeps a single circuit."""
        if not self.for_downloads:
            keeper = self.announcing
        else:
            keeper = min(self.for_downloads, key=lambda k: (k.users, k.state is not CONNECTED))
        keeper.users += 1
        self._warm_spare()
        return keeper

    def in_hand(self, keeper: CircuitKeeper) -> CircuitKeeper:
        """The keeper a download that took ``keeper`` sends its next request on: ``keeper``
        while it is connected; else a download circuit connected now, the least used (the
        download moves to it), rather than a wait for ``keeper``'s rebuild."""
        if keeper.state is CONNECTED or keeper not in self.for_downloads:
            return keeper
        connected = [k for k in self.for_downloads if k.state is CONNECTED]
        if not connected:
            return keeper
        other = min(connected, key=lambda k: k.users)
        self.release(keeper)
        other.users += 1
        self.moves += 1
        self.log.info("a download moved to a connected circuit while its own is rebuilt ({n} so far)", n=self.moves)
        return other

    @property
    def downloading(self) -> bool:
        return any(k.users for k in self.for_downloads)

    def _warm_spare(self) -> None:
        """While a download runs, a download circuit nobody uses is built (or being built),
        when the peer keeps one more than the downloads use."""
        if not self.downloading or any(k.users == 0 and k.state is not WAITING for k in self.for_downloads):
            return
        spare = next((k for k in self.for_downloads if k.users == 0 and not k.stopped), None)
        if spare is not None:
            spare.ready().addErrback(lambda f: None)  # failures retry inside; stop() ends it

    def _kept(self, circuit: Circuit) -> bool:
        """Whether a download keeper's ``circuit`` counts as used beyond what runs on it: a
        connected one does while a download runs (a spare is not closed for going unused, and
        is replaced at its lifetime); a draining one does not."""
        return self.downloading and any(circuit is k.circuit for k in self.for_downloads)

    @staticmethod
    def release(keeper: CircuitKeeper) -> None:
        keeper.users = max(0, keeper.users - 1)

    def find(self, cid: str) -> Circuit | None:
        """The peer's circuit (connected or draining, any purpose) with that CID."""
        for keeper in self.keepers:
            for circuit in keeper.circuits():
                if circuit.cid == cid:
                    return circuit
        return None

    def owner(self, circuit: Circuit) -> CircuitKeeper | None:
        return next((k for k in self.keepers if k.owns(circuit)), None)

    def broken(self, circuit: Circuit, why: str) -> None:
        """A message on ``circuit`` failed: its keeper drops it (and builds another)."""
        keeper = self.owner(circuit)
        if keeper is not None:
            keeper.broken(circuit, why)

    def probe(self, circuit: Circuit, take_reply=None) -> None:
        """Whether ``circuit`` still reaches the tracker (``CircuitKeeper.probe``)."""
        keeper = self.owner(circuit)
        if keeper is not None:
            keeper.probe(circuit, take_reply)

    # --- isolation --------------------------------------------------------------------------

    def _announcing_ends(self) -> list[set]:
        return _ends_apart_from([self.announcing])

    def _download_ends(self) -> list[set]:
        return _ends_apart_from(self.for_downloads)

    # --- rotation -----------------------------------------------------------------------------

    def _withdraw(self, old: Circuit) -> None:
        """The replaced announcing circuit lists nothing any more: requests go to the new one."""
        defer.ensureDeferred(self.announcing.send_on(old, ls_message([]))).addErrback(lambda f: None)

    def sweep(self) -> None:
        for keeper in self.keepers:
            keeper.sweep()
        self._warm_spare()

    # --- lifecycle ------------------------------------------------------------------------------

    async def stop(self) -> None:
        for keeper in self.keepers:
            await keeper.stop()

    def status(self, now: float) -> list[dict]:
        """Every circuit the peer keeps now, by purpose."""
        return [k.status(now) for k in self.keepers if k.circuit is not None or k is self.announcing]


def _ends_apart_from(keepers) -> list[set]:
    """What a circuit of another purpose keeps its entry and exit apart from (``pick_apart``):
    the ends of every circuit of ``keepers``, connected, draining or being built (two keepers
    rotate at once: each must see the other's new path); else, when the directory has too few
    nodes for that, those of their connected and new circuits only (the draining ones go soon)."""
    current = [k.circuit.hops for k in keepers if k.circuit is not None] + [p for k in keepers for p in k.building]
    every = current + [c.hops for k in keepers for c in k.draining]
    return [_ends(every), _ends(current)]


def _ends(paths) -> set:
    """The hosts of the entries and exits of ``paths`` (a circuit's hops or a picked path)."""
    return {host for path in paths if path for host in (path[0].address.host, path[-1].address.host)}
