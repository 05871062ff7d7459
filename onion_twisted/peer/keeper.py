"""The peer's circuit keeper (PROTOCOL.md §5, §6, §9): one connected circuit of one purpose.

The keeper builds a circuit through nodes picked from a fresh directory,
retrying through other nodes at once, then with a growing delay; every caller that needs the circuit while a
build runs shares that one build. When a message on the circuit fails
(502, 504, refused) the circuit is destroyed, its nodes are avoided a while
and another is built through other nodes.

The keeper's lifecycle is ``CircuitState`` (what the page shows): waiting
(no circuit: starting, or after a failure), building, connected. Only the
keeper moves it, and only along ``NEXT_STATES``. What the rest of the peer
does on those moves (announce, take the catalogue, end the downloads'
waits) it is told through the callbacks it is given.

Rotation (Tor's circuit dirtiness): with a ``lifetime``, a connected
circuit is replaced after ``lifetime`` seconds (randomised, at most the
setting): another is built through fresh nodes while the old one still
serves; once it is connected, new work goes to it and the old one *drains*:
it still carries what it carried (an upload, a transfer's chunks) and is
destroyed once ``in_use`` says nothing is left on it, or after
``MAX_DRAIN``. A keeper that ``retires_idle`` (download circuits) does not
replace an unused circuit: it closes it, and builds again when asked.
"""

from __future__ import annotations

import enum
import os
import random
from typing import Callable

from twisted.internet import defer, task
from twisted.logger import Logger

from onion_twisted.net.results import SharedResult
from onion_twisted.peer.circuit import Circuit
from onion_twisted.protocol import ntor, wire
from onion_twisted.protocol.directory import pick_apart
from onion_twisted.protocol.errors import BadRequest, ProtocolError, UnknownCircuit
from onion_twisted.protocol.messages import list_message

SUSPECT_AFTER_BUILD = 60.0   # seconds a node of a failed build is avoided
SUSPECT_AFTER_BREAK = 30.0   # seconds a node of a broken circuit is avoided
MAX_BACKOFF = 30.0           # seconds between build attempts, at most
QUICK_RETRIES = 2            # failed builds in a row retried at once, through other nodes
DIRECTORY_SOURCES = 4        # known nodes asked for the directory before the tracker
MAX_DRAIN = 3600.0           # seconds a replaced circuit may still carry what it carried
RETRY_ROTATION = 60.0        # seconds before a replacement that failed to build is tried again
IDLE_CLOSE = 300.0           # seconds an unused circuit of a keeper that retires_idle is kept


class CircuitState(enum.Enum):
    WAITING = "waiting"
    BUILDING = "building"
    CONNECTED = "connected"


WAITING, BUILDING, CONNECTED = CircuitState

NEXT_STATES = {
    WAITING: {BUILDING, CONNECTED},     # connected at once: a circuit built elsewhere (adopt)
    BUILDING: {CONNECTED, WAITING},
    # Building again from connected: the circuit became unusable without a failure
    # being seen (destroyed by hand); its replacement is built all the same.
    CONNECTED: {WAITING, BUILDING},
}


class IllegalCircuitTransition(Exception):
    """The keeper was asked to move where its lifecycle does not go (a bug)."""


class CircuitKeeper:
    log = Logger()

    def __init__(self, *, clock, outbound, directory, tracker: wire.Address, data_dir, bootstrap=(),
                 hops: int = 3, rng: random.Random | None = None, first_message: Callable[[], dict],
                 on_connected: Callable[[dict, object], None], on_broken: Callable[[Circuit, str], None],
                 purpose: str = "announcing", lifetime: float = 0.0, retires_idle: bool = False,
                 avoid_ends: Callable[[], list[set]] = lambda: [set()],
                 on_rotated: Callable[[Circuit], None] = lambda old: None,
                 in_use: Callable[[Circuit], bool] = lambda circuit: False):
        """``first_message()`` is the ``ls`` a new circuit carries to the tracker;
        ``on_connected(that message, the tracker's reply)`` runs once a circuit is
        connected, ``on_broken(circuit, why)`` once one of ours (connected or
        draining) broke. ``lifetime`` (0: never) and ``on_rotated(old circuit)``:
        rotation, see above; ``in_use(circuit)``: whether something still runs on
        it. ``avoid_ends()``: hosts our entry and exit should not be (the peer's
        circuits of other purposes), as sets in order of preference (``pick_apart``)."""
        self.clock = clock
        self.outbound = outbound
        self.directory = directory
        self.tracker = tracker
        self.data_dir = data_dir
        self.bootstrap = [wire.parse_address(a, tracker.port, field="bootstrap") for a in bootstrap]
        self.hops = hops
        self.rng = rng or random.SystemRandom()
        self.first_message = first_message
        self.on_connected = on_connected
        self.on_broken = on_broken
        self.purpose = purpose
        self.lifetime = lifetime
        self.retires_idle = retires_idle
        self.avoid_ends = avoid_ends
        self.on_rotated = on_rotated
        self.in_use = in_use

        self.circuit: Circuit | None = None
        self.draining: dict[Circuit, float] = {}  # replaced circuits still carrying work -> since
        self.building: list[list] = []  # the node paths of builds under way: their ends are taken too
        self.rotations = 0
        self.users = 0  # downloads that took this keeper (CircuitPool.for_download)
        self._rotation = None  # the call that replaces the connected circuit
        self._replacing = False
        self._last_used = clock.seconds()
        self._state = WAITING
        self.detail = "starting"
        self.since = clock.seconds()
        self.stopped = False
        self._build = SharedResult(lambda: defer.ensureDeferred(self._build_until_connected()))
        self._suspect: dict[wire.Address, float] = {}  # nodes that failed lately -> until
        self._probing: set[Circuit] = set()  # circuits a probe is under way on

    # --- the lifecycle ---------------------------------------------------------------------

    @property
    def state(self) -> CircuitState:
        return self._state

    def _move(self, to: CircuitState, detail: str) -> None:
        if to not in NEXT_STATES[self._state]:
            raise IllegalCircuitTransition(f"a {self._state.value} circuit keeper cannot become {to.value}")
        self._state = to
        self.detail = detail

    def note(self, detail: str) -> None:
        """Say something of the circuit on the page without changing its state."""
        self.detail = detail

    def adopt(self, circuit: Circuit) -> None:
        """A circuit connected elsewhere (tests and tools build one by hand) becomes ours."""
        self._move(CONNECTED, "connected")
        self.circuit, self.since = circuit, self.clock.seconds()
        self._schedule_rotation()

    @property
    def directory_path(self) -> str:
        return os.path.join(self.data_dir, "directory.json")

    def load_directory(self) -> None:
        self.directory.load(self.directory_path)

    async def stop(self) -> None:
        """No more building; the circuit is destroyed (its destroy may fail: nobody waits)."""
        self.stopped = True
        self._cancel_rotation()
        circuits, self.circuit = self.circuits(), None
        self.draining.clear()
        for circuit in circuits:
            try:
                await circuit.destroy()
            except ProtocolError:
                pass

    # --- building ---------------------------------------------------------------------------

    def ready(self) -> defer.Deferred:
        """The connected circuit, building one (with retries) if there is none."""
        if self.circuit is not None and self.circuit.connected:
            return defer.succeed(self.circuit)
        return self._build.get()

    async def _build_until_connected(self) -> Circuit:
        failures = 0
        while not self.stopped:
            self._move(BUILDING, self.detail)
            try:
                circuit, announcement, reply = await self._build_one()
            except (ProtocolError, ValueError) as e:
                detail = getattr(e, "detail", str(e))
                failures += 1
                # Its nodes are suspect now: the next build goes through others at once (a dead node
                # stays listed until its heartbeats are missed); only repeated failures wait.
                delay = 0.0 if failures <= QUICK_RETRIES else min(2.0 ** (failures - QUICK_RETRIES - 1), MAX_BACKOFF)
                self._move(WAITING, f"circuit failed ({detail}); retrying in {delay:.0f} s")
                self.log.warn("circuit build failed: {why}; retrying in {delay} s", why=detail, delay=delay)
                await task.deferLater(self.clock, delay, lambda: None)
                continue
            self.circuit = circuit
            self._move(CONNECTED, "connected")
            self.since = self._last_used = self.clock.seconds()
            self._schedule_rotation()
            self.on_connected(announcement, reply)
            self.log.info("circuit connected through {n} nodes", n=len(circuit.hops))
            return circuit
        raise UnknownCircuit("the peer is stopping")

    async def _build_one(self):
        """One circuit through fresh nodes, carrying ``first_message()``: (circuit, that
        message, the tracker's reply); a failure makes its nodes suspect and raises."""
        nodes, circuit = [], None
        try:
            nodes, tracker_onion_key = await self._pick_nodes()
            self.building.append(nodes)  # in the same turn as the pick: any later pick sees it
            self.detail = f"building a circuit through {len(nodes)} nodes" if self.circuit is None else self.detail
            circuit = Circuit(self.outbound, nodes, self.tracker, tracker_onion_key=tracker_onion_key,
                              tracker_id=await self._tracker_id() if tracker_onion_key else None)
            announcement = self.first_message()
            reply = await circuit.build(announcement)
        except (ProtocolError, ValueError):
            for node in nodes:
                self._suspect[node.address] = self.clock.seconds() + SUSPECT_AFTER_BUILD
            if circuit is not None and circuit.built:
                self.destroy_quietly(circuit)
            raise
        finally:
            self.building = [path for path in self.building if path is not nodes]
        return circuit, announcement, reply

    async def _pick_nodes(self):
        directory = await self._fresh_directory()
        now = self.clock.seconds()
        failed_lately = {address for address, until in self._suspect.items() if until > now}
        try:
            return (pick_apart(directory.nodes.values(), self.hops, self.rng, failed_lately, self.avoid_ends()),
                    directory.tracker_onion_key)
        except ValueError as e:
            raise BadRequest(str(e)) from None

    async def _tracker_id(self) -> bytes | None:
        """The tracker's ID for the sealed hop (§12): from the Ed25519 key the directory
        client pinned, the key the directory's signature was checked with."""
        key = await self.directory.tracker_key()
        return ntor.member_id(key) if key is not None else None

    async def _fresh_directory(self):
        """The directory from a node's mirror when any node is known; the tracker only at first (§6)."""
        known = list(self.directory.current.nodes) if self.directory.current else []
        sources = self.rng.sample(known, len(known)) + [a for a in self.bootstrap if a not in known]
        for source in sources[:DIRECTORY_SOURCES]:
            try:
                directory = await self.directory.fetch_from(source)
                self.directory.save(self.directory_path)
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
        self.directory.save(self.directory_path)
        return directory

    # --- using and losing the circuit -------------------------------------------------------

    async def send(self, message: dict) -> dict | None:
        """A message to the tracker through the circuit; a failure breaks the circuit."""
        return await self.send_on(await self.ready(), message)

    async def send_on(self, circuit: Circuit, message: dict) -> dict | None:
        """A message to the tracker through ``circuit`` (ours: connected or draining);
        a failure breaks it."""
        try:
            return await circuit.send(message)
        except ProtocolError as e:
            self.broken(circuit, e.detail)
            raise

    def probe(self, circuit: Circuit, take_reply=None) -> None:
        """A ``list`` on ``circuit`` (one at a time) when what should come back on it does not:
        a dead node answers nothing, its neighbour's error (502) comes back at once, and the
        failure breaks the circuit. ``take_reply``: what to do with the tracker's ``files``."""
        if not self.owns(circuit) or circuit in self._probing:
            return
        self._probing.add(circuit)
        d = defer.ensureDeferred(self.send_on(circuit, list_message()))
        d.addCallbacks(take_reply or (lambda _: None), lambda f: f.trap(ProtocolError))
        d.addBoth(lambda _: self._probing.discard(circuit))

    def circuits(self) -> list[Circuit]:
        """Every circuit of this keeper: the connected one, then those draining."""
        return ([self.circuit] if self.circuit is not None else []) + list(self.draining)

    def owns(self, circuit: Circuit) -> bool:
        return circuit is self.circuit or circuit in self.draining

    def broken(self, circuit: Circuit, why: str) -> None:
        """A message on ``circuit`` failed: drop it, tell the peer, build another (for
        a draining one, nothing is built: it was replaced already)."""
        if circuit in self.draining:
            del self.draining[circuit]
        elif self.circuit is circuit:
            if not self.stopped:
                self.log.warn("circuit broken ({why}); building another", why=why)
            self.circuit = None
            self._move(WAITING, f"circuit broken ({why}); rebuilding")
        else:
            return
        for hop in circuit.hops:
            self._suspect[hop.address] = self.clock.seconds() + SUSPECT_AFTER_BREAK
        self.destroy_quietly(circuit)
        self.on_broken(circuit, why)
        if self.circuit is None and not self.stopped:
            self.ready().addErrback(lambda f: None)

    # --- rotation ---------------------------------------------------------------------------

    def _cancel_rotation(self) -> None:
        if self._rotation is not None and self._rotation.active():
            self._rotation.cancel()
        self._rotation = None

    def _schedule_rotation(self, delay: float | None = None) -> None:
        self._cancel_rotation()
        if self.lifetime > 0 and not self.stopped:
            # Randomised, as Tor's: circuits built together are not all replaced together.
            delay = delay if delay is not None else self.lifetime * self.rng.uniform(0.75, 1.0)
            self._rotation = self.clock.callLater(delay, self._rotate)

    def _rotate(self) -> None:
        self._rotation = None
        old = self.circuit
        if self.stopped or old is None or self._replacing:
            return
        if self.retires_idle and not self.in_use(old) and not self.users:
            self._close_idle(old, "replaced at its lifetime; built again when a download needs it")
            return
        self._replacing = True
        defer.ensureDeferred(self._replace(old)).addBoth(lambda _: setattr(self, "_replacing", False))

    async def _replace(self, old: Circuit) -> None:
        try:
            circuit, announcement, reply = await self._build_one()
        except (ProtocolError, ValueError) as e:
            self.log.warn("a replacement circuit failed: {why}; the old one serves on",
                          why=getattr(e, "detail", str(e)))
            if self.circuit is old:
                self._schedule_rotation(RETRY_ROTATION)
            return
        if self.stopped or self.circuit is not old:
            self.destroy_quietly(circuit)  # stopped, or the old one broke and another is built
            return
        now = self.clock.seconds()
        self.circuit, self.since, self._last_used = circuit, now, now
        self.draining[old] = now
        self.rotations += 1
        self.detail = "connected"
        self.log.info("circuit replaced after its lifetime ({n} draining)", n=len(self.draining))
        self._schedule_rotation()
        self.on_connected(announcement, reply)
        self.on_rotated(old)
        self.sweep()

    def sweep(self) -> None:
        """Destroy the draining circuits nothing runs on any more (or drained too long);
        close the connected one when it went unused too long and the keeper retires_idle."""
        now = self.clock.seconds()
        for circuit, since in list(self.draining.items()):
            if not self.in_use(circuit) or now - since > MAX_DRAIN:
                del self.draining[circuit]
                self.destroy_quietly(circuit)
        circuit = self.circuit
        if circuit is None or not self.retires_idle:
            return
        if self.users or self.in_use(circuit):
            self._last_used = now
        elif now - self._last_used > IDLE_CLOSE:
            self._close_idle(circuit, "closed after going unused; built again when a download needs it")

    def _close_idle(self, circuit: Circuit, detail: str) -> None:
        self._cancel_rotation()
        self.circuit = None
        self._move(WAITING, detail)
        self.destroy_quietly(circuit)

    @staticmethod
    def destroy_quietly(circuit: Circuit) -> None:
        defer.ensureDeferred(circuit.destroy()).addErrback(lambda f: None)

    def status(self, now: float) -> dict:
        """The circuit as the page and the API show it."""
        circuit = self.circuit
        return {
            "state": self._state.value,
            "detail": self.detail,
            "nodes": [{"address": str(h.address), "fingerprint": h.fingerprint,
                       "protocol": "onion-http/2" if h.speaks_v2 else "onion-http/1"} for h in circuit.hops]
            if circuit else [],
            "age": int(now - self.since) if circuit else None,
            "purpose": self.purpose,
            "rotations": self.rotations,
            "draining": len(self.draining),
            # onion-http/2 when every hop speaks it; sealed: the tracker's messages in a layer of their own.
            **(circuit.info() if circuit else {"protocol": None, "sealed": False}),
        }
