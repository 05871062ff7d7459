"""The tracker's directory of nodes (PROTOCOL.md §6), with no I/O.

Nodes register every ``heartbeat`` seconds and leave the list when unseen
for three periods. The signed body is built once per change (or once per
heartbeat, to keep ``issued`` fresh) and served as the same bytes to all.
"""

from __future__ import annotations

from dataclasses import dataclass

import base64

from onion_twisted.protocol import crypto, wire
from onion_twisted.protocol.directory import entry_json
from onion_twisted.protocol.errors import Conflict


@dataclass(slots=True)
class RegisteredNode:
    address: wire.Address
    public_key_pem: str
    fingerprint: str
    last_seen: float
    ip: str | None = None  # the IP its cells come from (resolved at registration for a DNS name)
    onion_key: bytes | None = None  # X25519, raw: an onion-http/2 node (§10, §11); None for /1


class NodeRegistry:
    def __init__(self, clock, signing_key, *, heartbeat: float = 30.0, max_nodes: int = 10_000):
        self.clock = clock
        self.signing_key = signing_key
        self.heartbeat = heartbeat
        self.max_nodes = max_nodes
        self.nodes: dict[wire.Address, RegisteredNode] = {}
        self._signed: tuple[bytes, str] | None = None
        self._signed_at = float("-inf")
        self._ips: frozenset[str] | None = None
        self._tracker_onion_key: bytes | None = None

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def tracker_onion_key(self) -> bytes | None:
        return self._tracker_onion_key

    @tracker_onion_key.setter
    def tracker_onion_key(self, raw: bytes | None) -> None:
        """The tracker's current onion key, published in the signed body (re-signed when it changes)."""
        if raw != self._tracker_onion_key:
            self._tracker_onion_key = raw
            self._signed = None

    def already_verified(self, address: wire.Address, fingerprint: str, onion_key: bytes | None = None) -> bool:
        """A heartbeat from a node whose keys were checked before: no new /identity fetch.
        A changed onion key (a rotation) is checked again, like a changed RSA key."""
        node = self.nodes.get(address)
        return node is not None and node.fingerprint == fingerprint and node.onion_key == onion_key

    def register(self, address: wire.Address, public_key_pem: str, fingerprint: str,
                 ip: str | None = None, onion_key: bytes | None = None) -> bool:
        """Add or refresh a node; False when the list is full of other nodes,
        Conflict (409) when another node is listed at the same IP.

        ``ip`` is where the node's cells come from; by default the address's
        own IP literal (a DNS-named node passes the IP its name resolved to).
        """
        now = self.clock.seconds()
        ip = ip or address.ip
        node = self.nodes.get(address)
        if node is not None and node.fingerprint == fingerprint and node.ip == ip and node.onion_key == onion_key:
            node.last_seen = now
            return True
        # One node per IP (PROTOCOL.md §15): a host with many ports, or many DNS
        # names, would otherwise fill the directory and most circuits' paths. The
        # node listed first keeps the place until it goes unseen.
        if any(n.ip == ip and a != address for a, n in self.nodes.items()):
            raise Conflict("another node is listed at this IP: one node per IP")
        if node is None and len(self.nodes) >= self.max_nodes:
            return False
        self.nodes[address] = RegisteredNode(address, public_key_pem, fingerprint, now, ip, onion_key)
        self._signed = self._ips = None
        return True

    def expire(self) -> list[wire.Address]:
        now = self.clock.seconds()
        gone = [a for a, n in self.nodes.items() if now - n.last_seen > 3 * self.heartbeat]
        for address in gone:
            del self.nodes[address]
        if gone:
            self._signed = self._ips = None
        return gone

    def node_ips(self) -> frozenset[str]:
        if self._ips is None:
            self._ips = frozenset(n.ip for n in self.nodes.values() if n.ip is not None)
        return self._ips

    def is_node_ip(self, ip: str) -> bool:
        return ip in self.node_ips()

    def signed(self) -> tuple[bytes, str]:
        """(body, base64 signature) of ``GET /nodes``."""
        now = self.clock.seconds()
        if self._signed is None or now - self._signed_at >= self.heartbeat:
            directory = {
                "issued": int(now),
                "nodes": [entry_json(n.address, n.public_key_pem, n.fingerprint, n.onion_key)
                          for n in sorted(self.nodes.values(), key=lambda n: str(n.address))],
            }
            if self._tracker_onion_key is not None:
                directory["tracker_onion_key"] = base64.b64encode(self._tracker_onion_key).decode("ascii")
            body = wire.dumps(directory)
            self._signed = (body, crypto.sign_body(self.signing_key, body))
            self._signed_at = now
        return self._signed
