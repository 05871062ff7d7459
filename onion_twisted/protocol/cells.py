"""The cell of PROTOCOL.md §3 and the messages carried inside it, with no I/O.

``parse_cell`` validates every field of a ``POST /`` body and raises the
precise BadRequest; the builders produce the bytes sent on the wire: every
cell (``encode_*``) and every 200 answer (§5: ``EMPTY``, ``encode_reply_*``)
of every role is written here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from onion_twisted.protocol import wire
from onion_twisted.protocol.errors import BadRequest

CREATED = b'{"type":"created"}'
EMPTY = b"{}"  # the 200 answer with no payload (§5)


@dataclass(frozen=True, slots=True)
class Cell:
    cid: str
    payload: Any  # base64 on peer/node links (str, or bytes once decoded); dict from the tracker and on bridges
    destroy: bool
    # An object payload's own bytes, when the body is exactly {"CID": …, "payload": {…}}
    # as this project writes it: relayed as they came instead of serialised again.
    raw_object: bytes | None = None

    def object_bytes(self) -> bytes:
        """The JSON bytes of an object payload."""
        return self.raw_object if self.raw_object is not None else wire.dumps(payload_object(self))

    @property
    def is_control(self) -> bool:
        return self.cid == wire.CONTROL_CID


_BASE64_PAYLOAD = (("payload",),)
_BASE64_PAYLOAD_OR_CHUNK = (("payload",), ("payload", "data"))


def parse_cell(body: bytes, *, chunks: bool = False) -> Cell:
    """The cell in ``body``; a long base64 ``payload`` comes back decoded, as bytes.

    With ``chunks``, the ``data`` of an object payload (a file chunk over a
    bridge) comes back decoded too, and the cell keeps its raw object bytes
    for relaying (a node never re-serialises a chunk).
    """
    obj, decoded = wire.loads_with_base64(body, _BASE64_PAYLOAD_OR_CHUNK if chunks else _BASE64_PAYLOAD)
    cid = obj.get("CID")
    if cid is None:
        raise BadRequest("missing field CID")
    if not isinstance(cid, str):
        raise BadRequest("CID is not a string")
    if cid != wire.CONTROL_CID and not wire.is_circuit_id(cid):
        raise BadRequest("CID is not a canonical lowercase UUIDv4 nor 'control'")
    destroy = obj.get("destroy", False)
    if destroy is not False and destroy is not True:
        raise BadRequest("destroy must be true or absent")
    payload = obj.get("payload")
    if destroy:
        if cid == wire.CONTROL_CID:
            raise BadRequest("the control CID cannot be destroyed")
        if payload is not None and not isinstance(payload, (str, bytes)):
            # /2's layered destroy (§14) carries one base64 layer; a bare destroy none.
            raise BadRequest("a destroy cell carries no payload, or a base64 layer")
        return Cell(cid, payload, True)
    if payload is None:
        raise BadRequest("missing field payload")
    if not isinstance(payload, (str, bytes, dict)):
        raise BadRequest("payload is neither a base64 string nor a JSON object")
    raw = None
    if isinstance(payload, dict) and len(obj) == 2:
        prefix = b'{"CID":"' + cid.encode("ascii") + b'","payload":'
        if body.startswith(prefix) and body.endswith(b"}"):
            raw = body[len(prefix):-1]
    if decoded and isinstance(payload, dict) and raw is None:
        # A decoded chunk cannot be serialised again: keep the full parse.
        return parse_cell(body)
    return Cell(cid, payload, False, raw)


def payload_bytes(cell: Cell) -> bytes:
    """The payload of a node-to-node or peer-to-node cell, decoded."""
    if not isinstance(cell.payload, (str, bytes)):
        raise BadRequest("payload must be a base64 string on this link")
    return wire.b64decode(cell.payload)


def payload_object(cell: Cell) -> dict:
    """The payload of a cell from the tracker or over a bridge: a JSON object."""
    if not isinstance(cell.payload, dict):
        raise BadRequest("payload must be a JSON object on this link")
    return cell.payload


def encode_cell(cid: str, payload: bytes | dict | str) -> bytes:
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return wire.with_base64({"CID": cid}, "payload", payload)
    return wire.dumps({"CID": cid, "payload": payload})


def encode_object_cell(cid: str, object_bytes: bytes) -> bytes:
    """A cell whose payload is an already-serialised JSON object: spliced, not re-encoded."""
    return b'{"CID":"' + cid.encode("ascii") + b'","payload":' + object_bytes + b"}"


def encode_destroy(cid: str, layer: bytes | None = None) -> bytes:
    """A bare destroy (§9), or /2's layered one carrying ``layer`` (§14)."""
    if layer is not None:
        return wire.with_base64({"CID": cid, "destroy": True}, "payload", layer)
    return wire.dumps({"CID": cid, "destroy": True})


# --- the 200 answers (§5) -------------------------------------------------------------------

def encode_reply_layer(layer: bytes) -> bytes:
    """``{"payload": "<base64>"}``: a hop's answer, one backward layer."""
    return wire.with_base64({}, "payload", layer)


def encode_reply_object(obj: dict) -> bytes:
    """``{"payload": {...}}``: the tracker's answer to a message (plaintext at the exit)."""
    return encode_reply_object_bytes(wire.dumps(obj))


def encode_reply_object_bytes(object_bytes: bytes) -> bytes:
    """``encode_reply_object`` for an object serialised already (a cached ``files`` reply)."""
    return b'{"payload":' + object_bytes + b"}"


@dataclass(frozen=True, slots=True)
class Extend:
    to: wire.Address
    relay: str | dict  # str: a CREATE for a node (base64); dict: the tracker's first message

    @property
    def to_tracker(self) -> bool:
        return isinstance(self.relay, dict)


def parse_extend(plaintext: bytes, default_port: int) -> Extend:
    obj = wire.loads_object(plaintext, "extend")
    if "to" not in obj:
        raise BadRequest("extend: missing field to")
    if "relay" not in obj:
        raise BadRequest("extend: missing field relay")
    to = wire.parse_address(obj["to"], default_port, field="extend.to")
    relay = obj["relay"]
    if isinstance(relay, str):
        wire.b64decode(relay, "extend.relay")  # checked here so a bad relay changes nothing
    elif not isinstance(relay, dict):
        raise BadRequest("extend: relay is neither base64 nor a JSON object")
    return Extend(to, relay)


def parse_reply(body: bytes) -> Any:
    """The payload of a 200 answer (§5): None, a base64 string or an object."""
    obj = wire.loads_object(body, "reply")
    payload = obj.get("payload")
    if payload is not None and not isinstance(payload, (str, dict)):
        raise BadRequest("reply payload is neither base64 nor an object")
    return payload
