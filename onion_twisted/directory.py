"""The signed directory of nodes (PROTOCOL.md §6), with no I/O.

A ``SignedDirectory`` keeps the tracker's body and signature byte for byte,
so a node can mirror it unchanged, and the parsed entries keyed by address
for the exit policy and for peers choosing their three nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import crypto, wire
from .errors import BadRequest, Forbidden


@dataclass(frozen=True, slots=True)
class NodeEntry:
    address: wire.Address
    public_key_pem: str
    fingerprint: str


@dataclass(frozen=True, slots=True)
class SignedDirectory:
    body: bytes
    signature: str
    issued: float
    nodes: dict  # Address -> NodeEntry
    node_ips: frozenset = frozenset()  # literal IPs of the listed nodes

    def __contains__(self, address: wire.Address) -> bool:
        return address in self.nodes


def parse_signed_directory(body: bytes, signature, tracker_key, default_port: int) -> SignedDirectory:
    """Verify the tracker's signature over ``body`` and parse the node list."""
    if not crypto.verify_body(tracker_key, body, signature):
        raise Forbidden("directory signature does not verify with the tracker's key")
    obj = wire.loads_object(body, "directory")
    issued = obj.get("issued")
    if not isinstance(issued, (int, float)) or isinstance(issued, bool):
        raise BadRequest("directory: issued is not a number")
    entries = obj.get("nodes")
    if not isinstance(entries, list):
        raise BadRequest("directory: nodes is not a list")
    nodes = {}
    for entry in entries:
        if not isinstance(entry, dict):
            raise BadRequest("directory: a node entry is not an object")
        address = wire.parse_address(entry.get("address"), default_port, field="directory address")
        pem = entry.get("public_key")
        key = crypto.load_public_key_pem(pem)
        fp = crypto.fingerprint(key)
        if entry.get("fingerprint") not in (None, fp):
            raise BadRequest("directory: fingerprint does not match the key")
        nodes[address] = NodeEntry(address, pem, fp)
    if isinstance(signature, bytes):
        signature = signature.decode("ascii")
    node_ips = frozenset(a.ip for a in nodes if a.ip is not None)
    return SignedDirectory(body, signature, issued, nodes, node_ips)
