"""Control messages from the tracker to exit nodes (PROTOCOL.md §7), with no I/O.

The tracker signs the exact bytes of the HTTP body; a node checks the
signature and that ``issued`` is within ``max_skew`` seconds of its clock.
"""

from __future__ import annotations

from dataclasses import dataclass

from onion_twisted.protocol import crypto, wire
from onion_twisted.protocol.errors import BadRequest, Forbidden
from onion_twisted.protocol.messages import is_transfer_id

MAKE_BRIDGE = "make_bridge"
RECEIVE_BRIDGE = "receive_bridge"
DROP_BRIDGE = "drop_bridge"
TYPES = (MAKE_BRIDGE, RECEIVE_BRIDGE, DROP_BRIDGE)


@dataclass(frozen=True, slots=True)
class ControlMessage:
    type: str
    issued: float
    bridge_cid: str
    cid: str | None = None          # make_bridge, receive_bridge
    transfer: str | None = None     # make_bridge
    peer: wire.Address | None = None  # make_bridge "to", receive_bridge "from"


def verify_control(body: bytes, signature, payload, tracker_key, now: float, max_skew: float,
                   default_port: int) -> ControlMessage:
    """Check a control cell's signature and freshness, then its fields."""
    if tracker_key is None:
        raise Forbidden("this node does not know the tracker's key yet")
    if not crypto.verify_body(tracker_key, body, signature):
        raise Forbidden("control message signature does not verify with the tracker's key")
    if not isinstance(payload, dict):
        raise BadRequest("control payload is not a JSON object")
    issued = payload.get("issued")
    if not isinstance(issued, (int, float)) or isinstance(issued, bool):
        raise BadRequest("control: issued is not a number")
    if abs(now - issued) > max_skew:
        raise Forbidden("control message is stale (issued too far from this node's clock)")
    kind = payload.get("type")
    if kind not in TYPES:
        raise BadRequest("control: unknown type")
    bridge_cid = payload.get("bridge_CID")
    if not wire.is_circuit_id(bridge_cid):
        raise BadRequest("control: bridge_CID is not a UUIDv4")
    if kind == DROP_BRIDGE:
        return ControlMessage(kind, issued, bridge_cid)
    cid = payload.get("CID")
    if not wire.is_circuit_id(cid):
        raise BadRequest("control: CID is not a UUIDv4")
    if kind == MAKE_BRIDGE:
        transfer = payload.get("transfer")
        if not is_transfer_id(transfer):
            raise BadRequest("control: transfer is not a string of 1 to 128 characters")
        peer = wire.parse_address(payload.get("to"), default_port, field="control.to")
        return ControlMessage(kind, issued, bridge_cid, cid, transfer, peer)
    peer = wire.parse_address(payload.get("from"), default_port, field="control.from")
    return ControlMessage(kind, issued, bridge_cid, cid, None, peer)


def sign_control(tracker_private_key, payload: dict) -> tuple[bytes, str]:
    """Body and signature header of a control cell (the tracker's side)."""
    body = wire.dumps({"CID": wire.CONTROL_CID, "payload": payload})
    return body, crypto.sign_body(tracker_private_key, body)
