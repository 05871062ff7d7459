"""A tiny peer-and-exit for the tracker's sealed hop (PROTOCOL.md §12, §14), in memory.

``SealedClient`` plays what the tracker sees of a /2 circuit: the exit's
cells from one (exit IP, CID), carrying the peer's ntor handshake and then
its messages inside the tracker layer (``protocol.ntor`` and
``protocol.onion2``, as a peer uses them). It keeps every body it sent, so a
test can send one again (a replay).
"""

from __future__ import annotations

import base64

import orjson

from onion_twisted.protocol import cells, ntor, onion2, wire
from onion_twisted.protocol.onion2 import HopKeys


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def string_cell(cid: str, data: bytes) -> bytes:
    return orjson.dumps({"CID": cid, "payload": b64(data)})


class SealedClient:
    def __init__(self, harness, exit_ip: str, cid: str | None = None):
        self.h = harness
        self.exit_ip = exit_ip
        self.cid = cid or wire.new_circuit_id()
        self.keys: HopKeys | None = None
        self.sent: list[bytes] = []

    @property
    def key(self):
        return (self.exit_ip, self.cid)

    def tracker_identity(self) -> tuple[bytes, bytes]:
        """(ID_T, B_T) as a peer reads them: the pinned key and the signed directory."""
        return ntor.member_id(self.h.tracker.signing_key.public_key()), self.h.registry.tracker_onion_key

    async def handshake(self, member: bytes | None = None, onion: bytes | None = None) -> HopKeys:
        own_member, own_onion = self.tracker_identity()
        state, data = ntor.client_start(member or own_member, onion or own_onion)
        answer = await self.h.tracker.handle_cell(self.exit_ip, string_cell(self.cid, data))
        reply = cells.parse_reply(answer)
        assert isinstance(reply, str), answer
        self.keys = state.finish(base64.b64decode(reply))
        return self.keys

    def layer(self, message: bytes) -> bytes:
        return self.keys.seal_forward(onion2.pad_message(message))

    async def post(self, body: bytes) -> bytes:
        self.sent.append(body)
        return await self.h.tracker.handle_cell(self.exit_ip, body)

    async def send(self, message: dict) -> dict:
        """The tracker's reply to ``message`` sent inside the tracker layer, opened."""
        answer = await self.post(string_cell(self.cid, self.layer(orjson.dumps(message))))
        return self.open_answer(answer)

    def open_answer(self, answer: bytes) -> dict:
        reply = cells.parse_reply(answer)
        assert isinstance(reply, str), answer
        return orjson.loads(self.open_layer(base64.b64decode(reply)))

    def open_layer(self, layer: bytes) -> bytes:
        """A backward tracker layer, opened and unpadded (its padding checked)."""
        padded = self.keys.open_backward(layer)
        assert len(padded) == onion2.padded_size(len(onion2.unpad(padded))), len(padded)
        return onion2.unpad(padded)

    def destroy_body(self, message: bytes = onion2.DESTROY) -> bytes:
        """A layered destroy as the exit passes it on: the tracker layer, peeled of the others."""
        return orjson.dumps({"CID": self.cid, "destroy": True, "payload": b64(self.layer(message))})

    async def destroy(self, message: bytes = onion2.DESTROY) -> bytes:
        return await self.post(self.destroy_body(message))
