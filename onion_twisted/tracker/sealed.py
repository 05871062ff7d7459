"""The tracker as the sealed last hop of a circuit (PROTOCOL.md §12, §14), with no I/O.

A peer whose exit speaks onion-http/2 ends its circuit with an ntor
handshake to the tracker, through the exit: from then on every message
between the peer and the tracker travels inside one more layer (padded),
which the exit relays but cannot read. The tracker keeps, per circuit
(exit IP, CID), only that hop's keys: never a peer's address.

A circuit's keys are made by its handshake and dropped with the circuit
(destroy, the catalogue's expiry); a handshake whose circuit never sends a
first message is dropped after the catalogue's idle time.
"""

from __future__ import annotations

from onion_twisted.protocol import cells, ntor, onion2, wire
from onion_twisted.protocol.errors import BadRequest, RateLimited
from onion_twisted.protocol.onion2 import HopKeys


class SealedCircuits:
    """(exit IP, CID) -> the tracker hop's ``HopKeys``, bounded in count."""

    def __init__(self, clock, onion_keys, own_id: bytes, *, max_circuits: int = 100_000,
                 idle_timeout: float = 600.0):
        self.clock = clock
        self.onion_keys = onion_keys  # protocol.onion_keys.OnionKeyRing
        self.own_id = own_id
        self.max_circuits = max_circuits
        self.idle_timeout = idle_timeout
        self.hops: dict[tuple[str, str], HopKeys] = {}
        # Handshaken circuits with no catalogue entry yet: when, so they expire on their own.
        self.unopened: dict[tuple[str, str], float] = {}

    def __len__(self) -> int:
        return len(self.hops)

    def __contains__(self, key) -> bool:
        return key in self.hops

    def get(self, key) -> HopKeys | None:
        return self.hops.get(key)

    def handshake(self, key, data: bytes) -> bytes:
        """Answer a circuit's ntor handshake (``Y ‖ AUTH``) and keep its keys.

        BadRequest for a handshake to another member or with an unknown
        onion key (nothing kept); RateLimited when the table is full.
        """
        if self.onion_keys is None:
            raise BadRequest("this tracker speaks onion-http/1: no sealed circuits")
        if len(self.hops) >= self.max_circuits:
            raise RateLimited("the tracker is at its sealed circuit limit")
        hop, reply = ntor.server_reply(self.own_id, self.onion_keys.private_for, data)
        self.hops[key] = hop
        self.unopened[key] = self.clock.seconds()
        return reply

    def opened(self, key) -> None:
        """The circuit has a catalogue entry now: it expires with it."""
        self.unopened.pop(key, None)

    def forget(self, key) -> bool:
        self.unopened.pop(key, None)
        return self.hops.pop(key, None) is not None

    def expire(self, live) -> list:
        """Drop the keys of circuits the catalogue no longer has (``live``: its keys),
        and of handshakes never followed by a message within the idle time."""
        now = self.clock.seconds()
        gone = []
        for key in self.hops:
            if key in live:
                continue
            since = self.unopened.get(key)
            if since is None or now - since > self.idle_timeout:
                gone.append(key)
        for key in gone:
            self.forget(key)
        return gone


def open_message(hop: HopKeys, layer: bytes) -> bytes:
    """The padded message inside one forward tracker layer, unpadded.

    Conflict (409) for a replayed or too old counter, BadRequest (400) for a
    layer that does not authenticate or a bad padding; a layer refused
    changes no key state.
    """
    return onion2.unpad(hop.open_forward(layer))


def open_object(hop: HopKeys, layer: bytes) -> dict:
    return wire.loads_object(open_message(hop, layer), "sealed message")


def seal_answer(hop: HopKeys, message: bytes) -> bytes:
    """The 200 answer ``{"payload": b64(layer)}`` holding one padded message."""
    return cells.encode_reply_layer(hop.seal_backward(onion2.pad_message(message)))


def seal_cell(hop: HopKeys, cid: str, message: bytes) -> bytes:
    """A message the tracker starts (its ``request`` to a sharer), sealed: ``{"CID", "payload"}``."""
    return cells.encode_cell(cid, hop.seal_backward(onion2.pad_message(message)))


def parse_tracker_cell(body: bytes) -> cells.Cell:
    """``cells.parse_cell``, which also takes a layered destroy (§14):
    ``{"CID", "destroy": true, "payload": b64}``, its payload as bytes."""
    try:
        return cells.parse_cell(body)
    except BadRequest:
        layered = _layered_destroy(body)
        if layered is None:
            raise
        return layered


def _layered_destroy(body: bytes) -> cells.Cell | None:
    try:
        obj = wire.loads_object(body, "cell")
    except BadRequest:
        return None
    if obj.get("destroy") is not True or obj.get("payload") is None:
        return None
    bare = cells.parse_cell(wire.dumps({k: v for k, v in obj.items() if k != "payload"}))
    return cells.Cell(bare.cid, wire.b64decode(obj["payload"], "destroy payload"), True)
