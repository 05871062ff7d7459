"""A node's relay table (PROTOCOL.md §4, §7, §9), with no I/O.

Each circuit is ``<InIP, InCID, SessKey, OutAddr, OutCID, OutKind>`` plus its
last-used time, its forward nonce set and its bridges, indexed by InCID and
by OutCID. An onion-http/2 circuit (§11) keeps ``HopKeys`` where /1 keeps a
``Layer``: its replay window replaces the nonce set. Time comes from an injected clock (``IReactorTime``), so idle
expiry is tested with ``task.Clock``.
"""

from __future__ import annotations

from onion_twisted.protocol.crypto import BACKWARD, FORWARD, Layer
from onion_twisted.protocol.onion2 import HopKeys
from onion_twisted.protocol.errors import Conflict, Forbidden, RateLimited, UnknownCircuit
from onion_twisted.protocol.wire import Address

NODE = "node"
EXIT = "exit"


class RelayCircuit:
    """The node's record of one circuit through it (the peer's own is peer.circuit.Circuit)."""

    __slots__ = (
        "in_ip", "in_cid", "layer", "out_addr", "out_ip", "out_cid", "out_kind",
        "last_used", "nonces", "extending", "bridges_out", "sealed",
    )

    def __init__(self, in_ip: str, in_cid: str, layer: Layer | HopKeys, now: float):
        self.in_ip = in_ip
        self.in_cid = in_cid
        self.layer = layer
        self.out_addr: Address | None = None
        self.out_ip: str | None = None
        self.out_cid: str | None = None
        self.out_kind: str | None = None
        self.last_used = now
        # Created on first use: an idle circuit costs no set (issue: < 2 KiB each).
        self.nonces: set[bytes] | None = None
        self.extending = False
        self.bridges_out: dict[str, "Bridge"] | None = None  # transfer -> bridge (make_bridge)
        self.sealed = False  # /2 exit whose tracker hop is sealed (§12): tracker traffic is its layers

    @property
    def v2(self) -> bool:
        return isinstance(self.layer, HopKeys)

    def wrap_backward(self, data: bytes) -> bytes:
        """This hop's backward layer over ``data`` (/1: random nonce; /2: the next counter)."""
        if isinstance(self.layer, HopKeys):
            return self.layer.seal_backward(data)
        return self.layer.wrap(data, BACKWARD)


class Bridge:
    """One end of a bridge (§7).

    ``outgoing`` (make_bridge): forward chunks of ``transfer`` on ``circuit``
    go to ``peer_addr`` under ``bridge_cid``. Incoming (receive_bridge): cells
    for ``bridge_cid`` from ``peer_ip`` go backward on ``circuit``.
    """

    __slots__ = ("bridge_cid", "circuit", "transfer", "peer_addr", "peer_ip", "outgoing", "last_used")

    def __init__(self, bridge_cid, circuit, transfer, peer_addr, peer_ip, outgoing, now):
        self.bridge_cid = bridge_cid
        self.circuit = circuit
        self.transfer = transfer
        self.peer_addr = peer_addr
        self.peer_ip = peer_ip
        self.outgoing = outgoing
        self.last_used = now


class RelayTable:
    def __init__(self, clock, *, idle_timeout: float = 600.0, bridge_idle_timeout: float = 600.0,
                 max_circuits: int = 100_000, max_nonces: int = 1_000_000, max_bridges: int = 100_000):
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.bridge_idle_timeout = bridge_idle_timeout
        self.max_circuits = max_circuits
        self.max_nonces = max_nonces
        self.max_bridges = max_bridges
        self.by_in: dict[str, RelayCircuit] = {}
        self.by_out: dict[str, RelayCircuit] = {}
        self.bridges_in: dict[str, Bridge] = {}
        self.bridges_out: dict[str, Bridge] = {}  # bridge_cid -> outgoing bridge

    def __len__(self) -> int:
        return len(self.by_in)

    @property
    def bridge_count(self) -> int:
        return len(self.bridges_in) + len(self.bridges_out)

    # --- circuits ---------------------------------------------------------------

    def create(self, in_ip: str, in_cid: str, session_key: bytes | HopKeys) -> RelayCircuit:
        """A circuit from a /1 session key, or from the ``HopKeys`` of a /2 handshake."""
        self.check_room(in_cid)
        layer = session_key if isinstance(session_key, HopKeys) else Layer(session_key)
        circuit = RelayCircuit(in_ip, in_cid, layer, self.clock.seconds())
        self.by_in[in_cid] = circuit
        return circuit

    def check_room(self, in_cid: str) -> None:
        """Refuse a CREATE before its handshake work: a CID in use (409), a full table (429)."""
        if in_cid in self.by_in or in_cid in self.by_out:
            raise Conflict("circuit id already in use")
        if len(self.by_in) >= self.max_circuits:
            raise RateLimited("node is at its circuit limit")

    def attach(self, circuit: RelayCircuit, out_addr: Address, out_ip: str, out_cid: str, kind: str) -> None:
        if circuit.in_cid not in self.by_in:
            # Destroyed while the extend was under way: leave nothing behind.
            raise Conflict("circuit was destroyed during extend")
        circuit.out_addr, circuit.out_ip, circuit.out_cid, circuit.out_kind = out_addr, out_ip, out_cid, kind
        self.by_out[out_cid] = circuit

    def forward(self, in_cid: str, source_ip: str) -> RelayCircuit | None:
        circuit = self.by_in.get(in_cid)
        if circuit is not None and circuit.in_ip != source_ip:
            raise Forbidden("not this circuit's inbound neighbour")
        return circuit

    def backward(self, out_cid: str, source_ip: str) -> RelayCircuit | None:
        circuit = self.by_out.get(out_cid)
        if circuit is not None and circuit.out_ip != source_ip:
            raise Forbidden("not this circuit's outbound neighbour")
        return circuit

    def peel_forward(self, circuit: RelayCircuit, layer: bytes) -> bytes:
        """Remove this hop's forward layer, refusing a nonce (/1) or counter (/2) seen before (409)."""
        if isinstance(circuit.layer, HopKeys):
            plaintext = circuit.layer.open_forward(layer)  # no state change when refused
            self.touch(circuit)
            return plaintext
        nonce, plaintext = circuit.layer.peel(layer, FORWARD)
        nonces = circuit.nonces
        if nonces is None:
            nonces = circuit.nonces = set()
        elif nonce in nonces:
            raise Conflict("replayed layer nonce")
        elif len(nonces) >= self.max_nonces:
            raise Conflict("circuit used up its nonce budget; build a new circuit")
        nonces.add(nonce)
        self.touch(circuit)
        return plaintext

    def touch(self, circuit: RelayCircuit) -> None:
        circuit.last_used = self.clock.seconds()

    def remove(self, circuit: RelayCircuit) -> bool:
        """Drop a circuit, its nonce set and its bridges; False if it was already gone."""
        if self.by_in.get(circuit.in_cid) is not circuit:
            return False
        del self.by_in[circuit.in_cid]
        if circuit.out_cid is not None:
            self.by_out.pop(circuit.out_cid, None)
        for bridge in list((circuit.bridges_out or {}).values()):
            self.remove_bridge(bridge)
        for bridge in [b for b in self.bridges_in.values() if b.circuit is circuit]:
            self.remove_bridge(bridge)
        circuit.nonces = None
        return True

    # --- bridges (§7) -------------------------------------------------------------

    def _check_bridge_room(self, bridge_cid: str, ends: dict) -> None:
        # Only the same kind of end clashes: when both exits are this node (§7), the
        # tracker sends receive_bridge and make_bridge here with the same bridge_CID.
        if bridge_cid in ends or bridge_cid in self.by_in or bridge_cid in self.by_out:
            raise Conflict("bridge_CID already in use")
        if self.bridge_count >= self.max_bridges:
            raise RateLimited("node is at its bridge limit")

    def make_bridge(self, out_cid: str, transfer: str, bridge_cid: str, to: Address, to_ip: str) -> Bridge:
        circuit = self.by_out.get(out_cid)
        if circuit is None or circuit.out_kind != EXIT:
            raise UnknownCircuit("make_bridge for a circuit this node does not exit")
        self._check_bridge_room(bridge_cid, self.bridges_out)
        if circuit.bridges_out and transfer in circuit.bridges_out:
            raise Conflict("a bridge for this transfer already exists on the circuit")
        bridge = Bridge(bridge_cid, circuit, transfer, to, to_ip, True, self.clock.seconds())
        if circuit.bridges_out is None:
            circuit.bridges_out = {}
        circuit.bridges_out[transfer] = bridge
        self.bridges_out[bridge_cid] = bridge
        return bridge

    def receive_bridge(self, out_cid: str, bridge_cid: str, source: Address, source_ip: str) -> Bridge:
        circuit = self.by_out.get(out_cid)
        if circuit is None or circuit.out_kind != EXIT:
            raise UnknownCircuit("receive_bridge for a circuit this node does not exit")
        self._check_bridge_room(bridge_cid, self.bridges_in)
        bridge = Bridge(bridge_cid, circuit, None, source, source_ip, False, self.clock.seconds())
        self.bridges_in[bridge_cid] = bridge
        return bridge

    def outgoing_bridge(self, circuit: RelayCircuit, transfer) -> Bridge | None:
        if not circuit.bridges_out or not isinstance(transfer, str):
            return None
        return circuit.bridges_out.get(transfer)

    def incoming_bridge(self, bridge_cid: str, source_ip: str) -> Bridge | None:
        bridge = self.bridges_in.get(bridge_cid)
        if bridge is not None and bridge.peer_ip != source_ip:
            raise Forbidden("not this bridge's sending exit")
        return bridge

    def remove_bridge(self, bridge: Bridge) -> bool:
        if bridge.outgoing:
            if self.bridges_out.pop(bridge.bridge_cid, None) is None:
                return False
            if bridge.circuit.bridges_out:
                bridge.circuit.bridges_out.pop(bridge.transfer, None)
            return True
        return self.bridges_in.pop(bridge.bridge_cid, None) is not None

    def bridge_by_cid(self, bridge_cid: str) -> Bridge | None:
        return self.bridges_in.get(bridge_cid) or self.bridges_out.get(bridge_cid)

    # --- expiry -------------------------------------------------------------------

    def expire(self) -> list[RelayCircuit]:
        """Drop idle circuits and idle bridges; return the circuits dropped."""
        now = self.clock.seconds()
        idle = [c for c in self.by_in.values() if now - c.last_used > self.idle_timeout and not c.extending]
        for circuit in idle:
            self.remove(circuit)
        stale = [b for b in (*self.bridges_in.values(), *self.bridges_out.values())
                 if now - b.last_used > self.bridge_idle_timeout]
        for bridge in stale:
            self.remove_bridge(bridge)
        return idle

    def drop_through(self, ips) -> list[RelayCircuit]:
        """Drop the circuits whose neighbour on either side is at one of ``ips`` (nodes that
        left the directory), and the bridges to or from an exit there; return the circuits."""
        gone = [c for c in self.by_in.values() if c.in_ip in ips or c.out_ip in ips]
        for circuit in gone:
            self.remove(circuit)
        for bridge in [b for b in (*self.bridges_in.values(), *self.bridges_out.values()) if b.peer_ip in ips]:
            self.remove_bridge(bridge)
        return gone
